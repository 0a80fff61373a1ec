"""What only shows at the paper's settings: bf16 compute keeps fp32 master weights (the recipe's learning rates would
round away in bf16 weights), and the paper architectures at their real widths (real vocabulary, hidden sizes,
heads, vision width, patch and merge sizes; one decoder layer and one vision block) train, save and reload."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

import grpo
import ssrl
import tasks
import tiny
from tests.helpers import tiny_dataset, tiny_model


def length_reward(response, answer):
    """A reward an untrained policy already varies on (the task reward is 0 for all of its samples, which would make
    every advantage 0 and every update a no-op)."""
    score = min(len(response), 40) / 40
    return {"overall": score, "format": 0.0, "accuracy": score}


def changed(before, after, names):
    """Fraction of the elements of `names` whose value changed, in fp32 and once both are rounded to bf16."""
    total = sum(before[name].numel() for name in names)
    in_fp32 = sum(int((before[name] != after[name]).sum()) for name in names)
    in_bf16 = sum(int((before[name].bfloat16() != after[name].bfloat16()).sum()) for name in names)
    return in_fp32 / total, in_bf16 / total


@pytest.mark.slow
def test_bf16_compute_updates_fp32_master_weights_at_the_recipes_learning_rates(tmp_path, monkeypatch):
    """--dtype bf16 (FSDP2 mixed precision on one process): one SFT step at lr 1e-5 and one GRPO step at lr 1e-6
    change nearly every weight of the decoder layers. Rounded to bf16, few of those changes survive: an optimizer
    stepping bf16 weights would have left the model nearly as it was, with a healthy-looking loss."""
    monkeypatch.setattr(grpo, "task_reward", length_reward)
    data = tmp_path / "data"
    tiny_dataset(str(data), per_task=8, eval_per_task=1, seed=8)
    model, processor = tiny_model("qwen2_5_vl")
    model.save_pretrained(tmp_path / "base")       # a model folder: the paper's recipe defaults apply
    processor.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    ssrl.main(["--model", str(tmp_path / "base"), "--dtype", "bf16", "--data", str(data), "--out", str(out),
               "--tasks", "depth", "flip", "--sft-data-fraction", "0.125", "--sft-global-batch-size", "2",
               "--sft-num-train-epochs", "1", "--sft-warmup-ratio", "0", "--sft-lr-scheduler-type", "constant",
               "--rollout-batch-size", "2", "--global-batch-size", "2", "--max-steps", "1",
               "--max-response-length", "8", "--eval-limit", "1", "--min-pixels", "3136", "--max-pixels", "12544",
               "--sft-min-pixels", "3136", "--sft-max-pixels", "12544"])
    args = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["args"]
    assert (args["sft_learning_rate"], args["learning_rate"], args["dtype"]) == (1e-5, 1e-6, "bf16")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    after_sft = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    after_grpo = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    layers = [name for name in base if name.startswith("model.layers.")]      # saved in the hub's key layout
    assert layers and all(after_grpo[name].dtype == torch.float32 for name in after_grpo)
    for before, after in ((base, after_sft), (after_sft, after_grpo)):
        in_fp32, in_bf16 = changed(before, after, layers)
        assert in_fp32 > 0.9 and in_bf16 < 0.3, (in_fp32, in_bf16)
    optimizer = torch.load(out / "checkpoint-2" / "trainer.pt", weights_only=True)["optimizer"]["state"]
    moments = [value for state in optimizer.values() for key, value in state.items() if key.startswith("exp_avg")]
    assert moments and all(value.dtype == torch.float32 for value in moments)


def crop_and_depth_records(root):
    train, _ = tiny_dataset(str(root), per_task=3, eval_per_task=1, seed=9)
    return ([r for r in train if r["task"] == "crop"][:1] + [r for r in train if r["task"] == "depth"][:1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen3-vl-4b"])
def test_real_width_architecture_trains_saves_and_reloads(name, tmp_path, monkeypatch):
    """--init random --layers 1: the real widths (151,936-word vocabulary, 2,048 / 2,560 hidden, 1,280 / 1,024 vision
    width, 14 / 16-px patches) run an SFT step and a GRPO step on a crop prompt (5 images) and a depth prompt, save
    through ssrl.save_checkpoint and reload with from_pretrained with identical logits. Small images keep it
    cheap: the widths, not the pixel counts, are what a tiny model cannot show."""
    from transformers import AutoModelForImageTextToText
    monkeypatch.setattr(grpo, "task_reward", length_reward)
    records = crop_and_depth_records(tmp_path / "data")
    pixels = ["--min-pixels", "3136", "--max-pixels", "12544", "--sft-min-pixels", "3136", "--sft-max-pixels", "12544"]
    args = ssrl.parse_args(["--model", name, "--init", "random", "--layers", "1", "--out", str(tmp_path / "run"),
                            "--sft-data-fraction", "1", "--sft-global-batch-size", "2", "--sft-micro-batch-size", "2",
                            "--sft-num-train-epochs", "1", "--sft-warmup-ratio", "0", *pixels])
    assert args.gradient_checkpointing          # on by default for the paper models
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    model, processor, family = ssrl.load_model(args, dist, tiny.tokenizer_corpus(records))
    config = model.config.get_text_config()
    assert (config.vocab_size, config.num_hidden_layers, len(model.model.visual.blocks)) == (151936, 1, 1)
    assert config.hidden_size == {"qwen2.5-vl-3b": 2048, "qwen3-vl-4b": 2560}[name]
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    # one SFT step (its end-of-stage checkpoint with the optimizer would write 5 GB: skipped here)
    monkeypatch.setattr(ssrl, "save_checkpoint", lambda *a, **k: None)
    before = {key: value.clone() for key, value in model.state_dict().items() if "layers.0.mlp" in key}
    assert ssrl.run_sft(args, dist, model, processor, records, None, None, None) == 1
    assert all(not torch.equal(model.state_dict()[key], value) for key, value in before.items())
    monkeypatch.undo()
    monkeypatch.setattr(grpo, "task_reward", length_reward)

    # one GRPO step: 2 prompts x 2 responses of at most 4 tokens, shared prompts, one update
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    batch = grpo.encode_prompts(processor, records, [tasks.open_images(r) for r in records], 3136, 12544)
    assert batch["images_per_sample"].tolist() == [5, 1]
    cfg = grpo.GRPOConfig(num_generations=2, max_new_tokens=4, updates_per_step=1, kl_coef=0.0)
    torch.manual_seed(0)
    metrics, _ = grpo.grpo_step(model, None, optimizer, batch, [r["answer"] for r in records],
                                [r["task"] for r in records], processor, cfg)
    assert metrics["num_updates"] == 1 and torch.isfinite(torch.tensor(metrics["loss"]))

    path = ssrl.save_checkpoint(args, dist, model, processor, 2, "grpo")
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = {key: value for key, value in batch.items() if key != "images_per_sample"}
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
