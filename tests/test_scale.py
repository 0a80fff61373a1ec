"""What only shows at the paper's settings: bf16 compute keeps fp32 master weights (the recipe's learning rates would
round away in bf16 weights), and the paper architectures at their real widths (real vocabulary, hidden sizes,
heads, vision width, patch and merge sizes; one decoder layer and one vision block) train, save and reload."""
import json

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
               "--sft-min-pixels", "3136", "--sft-max-pixels", "12544", "--save-dtype", "fp32"])
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
    from torch.distributed.checkpoint import FileSystemReader
    saved = FileSystemReader(str(out / "checkpoint-2" / "trainer")).read_metadata().state_dict_metadata
    moments = [entry for key, entry in saved.items() if key.startswith("optimizer.state.") and "exp_avg" in key]
    masters = [entry for key, entry in saved.items() if key.startswith("model.")]
    assert moments and all(entry.properties.dtype == torch.float32 for entry in moments + masters)


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
                            "--save-dtype", "fp32",
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


def test_fused_adamw_gives_the_reference_update():
    """ssrl.adamw(fused=True), what a CUDA run steps with (no foreach copy of the weights), against torch's
    per-tensor reference AdamW over three steps: the same weights to an ulp, where the updates move them by ~1e-3.
    (bench/memory.py --optimizer-step measures the copy: one step's peak over 256 MiB of weights, foreach 256 MiB,
    fused 0.)"""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(300, 37, generator=generator), torch.randn(1000, generator=generator), torch.randn(5, 4, 3)]
    grads = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(3)]
    results = []
    for make in (lambda params: ssrl.adamw(params, 1e-3, 0.01, fused=True),
                 lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=False)):
        params = [p.clone().requires_grad_(True) for p in start]
        optimizer = make(params)
        for step in grads:
            for param, grad in zip(params, step):
                param.grad = grad.clone()
            optimizer.step()
        results.append((optimizer, [p.detach() for p in params]))
    (fused, after), (_, expected) = results
    assert fused.defaults["fused"] and not ssrl.adamw(start[:1], 1e-3, 0.0).defaults["fused"]
    for value, reference, before in zip(after, expected, start):
        assert (value - reference).abs().max() <= 2 * torch.finfo(torch.float32).eps * reference.abs().max()
        assert (reference - before).abs().max() > 1e-3


def test_expandable_segments_are_set_before_cuda_starts_unless_the_user_set_them(monkeypatch):
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")          # recorded, so that the test leaves the environment as it found it
        monkeypatch.delenv(name)
    ssrl.compute_init("fp32")
    assert ssrl.os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    ssrl.compute_init("fp32")
    assert "PYTORCH_ALLOC_CONF" not in ssrl.os.environ


def test_rollout_micro_batch_auto_fills_free_gpu_memory_by_the_arithmetic(monkeypatch):
    """--rollout-micro-batch-size auto (the paper presets' default): on CUDA, with the policy gathered, as many
    prompts in flight as the free memory holds less max(2 GiB, 5%), for the engine in use; off CUDA the preset's
    fallback. Here CUDA's memory figures are stood in for, and the 3B architecture's bytes written out by hand."""
    from transformers import AutoModelForImageTextToText
    args = ssrl.parse_args(["--model", "qwen2.5-vl-3b"])
    assert (args.rollout_micro_batch_size, args.eval_batch_size, args.fallback_micro_batch) == ("auto", "auto", 16)
    assert ssrl.parse_args(["--model", "qwen2.5-vl-3b", "--rollout-micro-batch-size", "5"]).rollout_micro_batch_size == 5
    with pytest.raises(SystemExit):
        ssrl.parse_args(["--rollout-micro-batch-size", "many"])
    _, processor = tiny_model("qwen2_5_vl")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(ssrl.real_config("qwen2.5-vl-3b", processor.tokenizer),
                                                        dtype=torch.bfloat16)
    kv = 2 * 36 * 2 * 128 * 2                         # bytes per token: K,V x layers x kv heads x head dim x bf16
    transient = 4 * (6 * 1280 + 3 * 3420) * 2         # per prompt token: a vision block's, > a decoder layer's
    pixels = 4 * (3 * 2 * 14 * 14) * 4                # per prompt token, fp32
    sampling = 5 * 151936 * 4 * 8                     # per prompt: n rows over the vocabulary, 8 fp32 copies

    def engine(m):      # rows of 2,000 (the empty one, m, m / 2 spare) + 5 slots of 2,048; 8 prompts prefilled
        return ((1 + m + -(-m // 2)) * 2000 + m * 5 * 2048) * kv + min(m, 8) * 2000 * (kv + transient + pixels) + \
            m * sampling

    def generate(m):    # n x (prompt + response) per prompt; the call's m prompts prefilled at once
        return m * 5 * (2000 + 2048) * kv + m * 2000 * (kv + transient + pixels) + m * sampling

    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    cuda = torch.device("cuda")
    budget = 31 * gib - 4 * gib                       # free + cached, less 5% of 80 GiB
    for name, total, expected in (("ssrl", engine, 50), ("hf", generate, 24)):
        assert total(expected) <= budget < total(expected + 1)
        assert grpo.memory_micro_batch(model, cuda, 2000, 5, 2048, 16, 256, name) == expected
        assert grpo.memory_micro_batch(model, cuda, 2000, 5, 2048, 16, 8, name) == 8
    assert grpo.memory_micro_batch(model, torch.device("cpu"), 2000, 5, 2048, fallback=16, limit=256) == 16


def test_auto_micro_batch_is_logged_and_falls_back_off_cuda(tmp_path):
    model, processor = tiny_model("qwen2_5_vl")
    records = crop_and_depth_records(tmp_path / "data")
    batch = grpo.encode_prompts(processor, records, [tasks.open_images(r) for r in records], 3136, 12544)
    cfg = grpo.GRPOConfig(num_generations=2, max_new_tokens=3, updates_per_step=1, kl_coef=0.0,
                          rollout_micro_batch_size=1, auto_rollout_micro_batch=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    metrics, _ = grpo.grpo_step(model, None, optimizer, batch, ["A", "B"], ["crop", "depth"], processor, cfg)
    assert metrics["rollout_micro_batch_size"] == 1
