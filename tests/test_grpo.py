"""grpo.py: EasyR1's equations by hand on fixed tensors, the log-prob path against the model's own logits (both
model families), generation on left-padded multi-image batches, and the fault paths of a step.

The tiny models, tokenizer and prompt batches are built here from transformers' configs, so these tests
depend on nothing but grpo.py (tests/test_grpo_learning.py and tests/dist_grpo.py import them from this file).
"""
import math
import statistics

import pytest
import torch
from PIL import Image

import grpo

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
CORPUS = ["<think>x</think> \\boxed{A}", "<think>red</think> \\boxed{B}", "<think>yellow</think>",
          "What colour is the image? A red B green C blue D yellow", "system user assistant 0123456789 -"]


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models, tokenizer and prompt batches

def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tokenizer.add_tokens(["<think>", "</think>"])       # plain added tokens: decoding keeps them, as Qwen3's do
    return tokenizer


def build_model(family, tokenizer, seed=0, rope_theta=10.0):
    """A ~0.2M-parameter Qwen2.5-VL or Qwen3-VL; rope_theta 10 so that positions in a tiny grid are visible."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if family == "qwen2.5-vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                                   "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                      deepstack_visual_indexes=[1])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        model = Qwen3VLForConditionalGeneration(config)
    return model.float()


def build_image_processor(family, max_side=56):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    patch = 14 if family == "qwen2.5-vl" else 16
    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": (2 * patch) ** 2,
                                          "longest_edge": (max_side // patch * patch) ** 2})


def encode(tokenizer, image_processor, questions, images):
    """The contract's prompt batch: chat-formatted, LEFT-padded, one image block per image before the question."""
    grids, pixels, rows, counts = [], [], [], []
    for question, sample_images in zip(questions, images):
        encoded = image_processor(sample_images, return_tensors="pt")
        grids.append(encoded["image_grid_thw"])
        pixels.append(encoded["pixel_values"])
        blocks = "".join("<|vision_start|>" + "<|image_pad|>" * (int(grid.prod()) // 4) + "<|vision_end|>"
                         for grid in encoded["image_grid_thw"])   # merge 2x2 patches per image token
        text = f"<|im_start|>user\n{blocks}{question}<|im_end|>\n<|im_start|>assistant\n"
        rows.append(tokenizer(text)["input_ids"])
        counts.append(len(sample_images))
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == image_pad).long() * attention_mask,
            "pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids),
            "images_per_sample": torch.tensor(counts)}


def coloured(colour, size=(28, 28), seed=0):
    """A solid image with a little noise so that patches differ."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(-20, 21, (size[1], size[0], 3), generator=generator)
    array = (torch.tensor(colour)[None, None] + noise).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


def join_completions(batch, completion_ids, completion_mask, k):
    """The stock model input of prompt i repeated k times (left-padded, its images copied) followed by its k
    completions: the ground truth that grpo's packed rows are checked against."""
    full = grpo.select_samples(batch, torch.arange(batch["input_ids"].shape[0]).repeat_interleave(k))
    full["input_ids"] = torch.cat([full["input_ids"], completion_ids], 1)
    full["attention_mask"] = torch.cat([full["attention_mask"], completion_mask], 1)
    full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1)
    return {key: value for key, value in full.items() if key != "images_per_sample"}


def mixed_batch(family, tokenizer):
    """3 prompts with 1, 3 and 2 images of different sizes, questions of different lengths."""
    processor = build_image_processor(family)
    images = [[coloured((255, 0, 0), (28, 28))],
              [coloured((0, 255, 0), (56, 28), 1), coloured((0, 0, 255), (28, 56), 2),
               coloured((9, 9, 9), (56, 56), 3)],
              [coloured((255, 255, 0), (28, 28), 4), coloured((0, 255, 255), (40, 30), 5)]]
    return encode(tokenizer, processor, ["What colour is the image?", "A red", "What colour? A red B green C blue"],
                  images)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# The equations on fixed tensors

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.1, 0.1, 1.0, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 1.0, 0.9, 0.0])
    advantages = grpo.group_advantages(rewards, 5)
    for group in range(3):
        values = rewards[group * 5:(group + 1) * 5].tolist()
        mean, std = statistics.mean(values), statistics.stdev(values)          # stdev: unbiased, as torch.std
        expected = [0.0 if max(values) == min(values) else (v - mean) / (std + 1e-6) for v in values]
        assert advantages[group * 5:(group + 1) * 5].tolist() == pytest.approx(expected, abs=1e-6)
    assert advantages[5:10].eq(0).all()                           # equal rewards: exactly 0, not rounding / 1e-6
    with pytest.raises(ValueError):
        grpo.group_advantages(rewards, 1)


def hand_loss(logp, old, ref, advantage, clip_low=0.2, clip_high=0.3, dual=3.0, kl_coef=0.01):
    """One token of EasyR1's compute_policy_loss and low_var_kl (verl/trainer/core_algos.py) in plain floats."""
    log_ratio = min(max(logp - old, -20.0), 20.0)
    ratio = math.exp(log_ratio)
    clipped = math.exp(min(max(log_ratio, math.log(1 - clip_low)), math.log(1 + clip_high)))
    loss = max(-advantage * ratio, -advantage * clipped)
    if advantage < 0:
        loss = min(loss, -advantage * dual)
    kl = min(max(ref - logp, -20.0), 20.0)
    return loss + kl_coef * min(max(math.exp(kl) - kl - 1, -10.0), 10.0)


# (logp - old, ref - logp, advantage): every branch of the loss
CASES = [(0.0, 0.0, 1.0),            # on-policy
         (0.5, 0.1, 1.5),            # A > 0, ratio 1.65 > 1.3: upper clip
         (-0.5, -0.2, 1.0),          # A > 0, ratio 0.61: unclipped
         (-0.5, 0.3, -1.0),          # A < 0, ratio 0.61 < 0.8: lower clip
         (0.2, 0.0, -0.7),           # A < 0, ratio 1.22: unclipped
         (2.0, 0.0, -1.0),           # A < 0, ratio 7.4: dual clip at 3.0
         (30.0, 25.0, -0.5),         # log-ratio clamp at 20, dual clip; KL exponent clamp 20 then k3 clamp 10
         (-25.0, -30.0, 2.0),        # log-ratio clamp at -20; KL clamp -20
         (0.1, 3.0, 0.0)]            # A = 0: only the KL term


def case_tensors():
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2, -0.3, -40.0, -0.1, -2.2])
    logp = old + torch.tensor([case[0] for case in CASES])
    ref = logp + torch.tensor([case[1] for case in CASES])
    advantages = torch.tensor([case[2] for case in CASES])
    return logp, old, ref, advantages


def test_policy_loss_matches_the_spec_by_hand():
    logp, old, ref, advantages = case_tensors()
    # 9 sequences of 2 tokens: token 0 is the case, token 1 an on-policy copy; the mask keeps 9 + 7 tokens
    logp2 = torch.stack([logp, old], 1)
    old2, ref2 = torch.stack([old, old], 1), torch.stack([ref, old], 1)
    mask2 = torch.ones(9, 2)
    mask2[7:, 1] = 0
    loss, metrics = grpo.policy_loss(logp2, old2, ref2, advantages[:, None], mask2, total_tokens=mask2.sum())
    expected = [hand_loss(float(logp2[i, t]), float(old2[i, t]), float(ref2[i, t]), float(advantages[i]))
                for i in range(9) for t in range(2) if mask2[i, t]]
    assert float(loss) == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    # clipped tokens: upper clip case 1; lower clip case 3 (and case 7, ratio e^-20 with A > 0 is unclipped);
    # dual clip cases 5 and 6
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(1 / 16)
    assert float(metrics["clip_ratio/low_mean"]) == pytest.approx(1 / 16)
    assert float(metrics["clip_ratio/dual_mean"]) == pytest.approx(2 / 16)
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(2 / 16)
    kls = [min(max(math.exp(k) - k - 1, -10), 10) for k in (min(max(c[1], -20), 20) for c in CASES)]
    assert float(metrics["kl"]) == pytest.approx(sum(kls) / 16, rel=1e-6)


def test_policy_loss_gradient_by_hand():
    """d loss / d logp per token: -A rho where the ratio term is live, 0 where a clip holds, plus the k3 slope."""
    logp, old, ref, advantages = case_tensors()
    logp = logp[:, None].clone().requires_grad_(True)
    loss, _ = grpo.policy_loss(logp, old[:, None], ref[:, None], advantages[:, None], torch.ones(9, 1), total_tokens=9)
    loss.backward()
    step = 1e-4
    for i in range(9):
        value = float(logp[i].detach())
        slope = (hand_loss(value + step, float(old[i]), float(ref[i]), float(advantages[i])) -
                 hand_loss(value - step, float(old[i]), float(ref[i]), float(advantages[i]))) / (2 * step) / 9
        assert float(logp.grad[i]) == pytest.approx(slope, rel=1e-3, abs=1e-6), CASES[i]


def test_two_micro_batches_equal_one_batch():
    """Token mean over the global token count: two micro-batches (different lengths) sum to the big batch's loss
    and gradient; a mean per micro-batch would not."""
    generator = torch.Generator().manual_seed(0)
    logp = (-torch.rand(6, 5, generator=generator) * 3).requires_grad_(True)
    old = logp.detach() + torch.randn(6, 5, generator=generator) * 0.3
    ref = logp.detach() + torch.randn(6, 5, generator=generator) * 0.3
    advantages = torch.randn(6, 1, generator=generator)
    mask = (torch.arange(5)[None] < torch.tensor([5, 1, 3, 4, 2, 5])[:, None]).float()
    whole, _ = grpo.policy_loss(logp, old, ref, advantages, mask, mask.sum())
    (whole_grad,) = torch.autograd.grad(whole, logp)
    parts = [grpo.policy_loss(logp[rows], old[rows], ref[rows], advantages[rows], mask[rows], mask.sum())[0]
             for rows in (slice(0, 2), slice(2, 6))]
    (parts_grad,) = torch.autograd.grad(sum(parts), logp)
    assert float(sum(parts).detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    torch.testing.assert_close(parts_grad, whole_grad)
    per_micro_mean = [grpo.policy_loss(logp[rows], old[rows], ref[rows], advantages[rows], mask[rows],
                                       mask[rows].sum())[0] for rows in (slice(0, 2), slice(2, 6))]
    assert abs(float(sum(per_micro_mean).detach()) / 2 - float(whole.detach())) > 1e-3


def test_zero_advantage_gives_zero_loss_and_gradient():
    logp = torch.full((4, 3), -1.5, requires_grad=True)
    loss, metrics = grpo.policy_loss(logp, logp.detach(), logp.detach(), torch.zeros(4, 1), torch.ones(4, 3), 12)
    loss.backward()
    assert float(loss.detach()) == 0.0 and logp.grad.abs().max() == 0.0
    assert all(math.isfinite(float(value)) for value in metrics.values())


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs and generation on the tiny models

@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_response_logprobs_equal_the_models_own_log_softmax(family, tokenizer):
    model = build_model(family, tokenizer)
    batch = mixed_batch(family, tokenizer)
    generator = torch.Generator().manual_seed(1)
    completion_ids = torch.randint(10, 290, (6, 7), generator=generator)
    completion_mask = (torch.arange(7)[None] < torch.tensor([7, 3, 1, 5, 7, 2])[:, None]).long()
    prompt_len = batch["input_ids"].shape[1]
    repeated = grpo.select_samples(batch, torch.arange(3).repeat_interleave(2))
    logp, entropy = grpo.response_logprobs(model, repeated, completion_ids, completion_mask, temperature=0.7,
                                           return_entropy=True)
    with torch.no_grad():
        logits = model(**join_completions(batch, completion_ids, completion_mask, 2)).logits[:, prompt_len - 1:-1]
    log_softmax = torch.log_softmax(logits.float() / 0.7, -1)                              # [6, 7, V]
    expected = log_softmax.gather(2, completion_ids[..., None])[..., 0] * completion_mask
    expected_entropy = -(log_softmax.exp() * log_softmax).sum(-1) * completion_mask
    torch.testing.assert_close(logp.detach(), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=2e-5, rtol=1e-5)
    # the same sequence alone, without the batch's padding, gives the same log-probs
    single = grpo.response_logprobs(model, grpo.select_samples(batch, torch.tensor([1])), completion_ids[3:4, :5],
                                    completion_mask[3:4, :5], temperature=0.7)
    torch.testing.assert_close(single.detach()[0], expected[3, :5], atol=2e-5, rtol=1e-5)


def select_by_hand(batch, index):
    """select_samples spelt out with Python lists: each chosen prompt's images and their pixel rows, in order."""
    images = batch["images_per_sample"].tolist()
    patches = batch["image_grid_thw"].prod(-1).tolist()
    image_rows, patch_rows = [], []
    for i in index:
        first = sum(images[:i])
        for image in range(first, first + images[i]):
            image_rows.append(image)
            patch_rows.extend(range(sum(patches[:image]), sum(patches[:image + 1])))
    return image_rows, patch_rows


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_select_samples_takes_each_prompts_own_images(device, tokenizer):
    """Repeated and reordered prompts keep their own image rows; on CUDA, images_per_sample stays on the CPU (as
    ssrl.to_device leaves it) while the other tensors are on the GPU."""
    batch = mixed_batch("qwen2.5-vl", tokenizer)                      # 1, 3 and 2 images of different sizes
    index = torch.tensor([2, 0, 1, 2, 1])
    image_rows, patch_rows = select_by_hand(batch, index.tolist())
    moved = {key: value if key == "images_per_sample" else value.to(device) for key, value in batch.items()}
    out = grpo.select_samples(moved, index.to(device))
    assert torch.equal(out["image_grid_thw"].cpu(), batch["image_grid_thw"][image_rows])
    assert torch.equal(out["pixel_values"].cpu(), batch["pixel_values"][patch_rows])
    assert torch.equal(out["input_ids"].cpu(), batch["input_ids"][index])
    assert out["pixel_values"].device.type == device and out["images_per_sample"].device.type == "cpu"


@pytest.mark.parametrize("engine", ["ssrl", "hf"])
@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_generate_on_left_padded_multi_image_batch(family, engine, tokenizer):
    model = build_model(family, tokenizer)
    batch = mixed_batch(family, tokenizer)
    prompt_len = batch["input_ids"].shape[1]
    # greedy: the generated tokens are the argmax of the scoring pass, so generate's KV-cache positions and the
    # log-prob pass agree (left padding, M-RoPE with images of different sizes)
    eos = tokenizer.eos_token_id
    ids, mask, truncated = grpo.generate_completions(model, batch, 2, 6, 0.0, 1.0, eos, tokenizer.pad_token_id,
                                                     engine=engine)
    assert ids.shape[0] == 6 and mask.shape == ids.shape and truncated.shape == (6,)
    with torch.no_grad():
        logits = model(**join_completions(batch, ids, mask, 2)).logits[:, prompt_len - 1:-1]
    suppressed = [model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id,
                  model.config.vision_end_token_id]
    logits[..., suppressed] = -torch.inf                   # generate never emits vision tokens
    assert torch.equal(logits.argmax(-1)[mask.bool()], ids[mask.bool()])
    # sampling ignores the checkpoint's own generation_config (Qwen ships top_k 1 and repetition_penalty 1.05)
    model.generation_config.top_k, model.generation_config.repetition_penalty = 1, 1.05
    torch.manual_seed(0)
    ids, mask, truncated = grpo.generate_completions(model, batch, 4, 12, 1.0, 1.0, [eos], tokenizer.pad_token_id,
                                                     engine=engine)
    assert len({tuple(row) for row in ids[:4].tolist()}) > 1
    # a stop token: everything after the first EOS is masked and padded; truncated rows have no EOS
    stop = int(ids[0, 2])
    torch.manual_seed(0)
    ids, mask, truncated = grpo.generate_completions(model, batch, 4, 12, 1.0, 1.0, [eos, stop],
                                                     tokenizer.pad_token_id, engine=engine)
    for row, row_mask, row_truncated in zip(ids.tolist(), mask.tolist(), truncated.tolist()):
        stops = [i for i, token in enumerate(row) if token in (eos, stop) and row_mask[i]]
        if row_truncated:
            assert not stops and all(row_mask)
        else:
            assert row_mask == [1] * (stops[0] + 1) + [0] * (len(row) - stops[0] - 1)
            assert all(token == tokenizer.pad_token_id for token in row[stops[0] + 1:])
    assert not truncated[0]


# ---------------------------------------------------------------------------------------------------------------------
# A whole step and its faults

def colour_batch(tokenizer, family="qwen2.5-vl", prompts=4, seed=0,
                 question="What colour is the image? A red B green C blue D yellow"):
    """Noisy solid images of 4 colours; the answer is the colour's letter."""
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, 4, (prompts,), generator=generator).tolist()
    processor = build_image_processor(family)
    questions = [question] * prompts if isinstance(question, str) else question
    batch = encode(tokenizer, processor, questions,
                   [[coloured(colours[pick], seed=seed * 1000 + i)] for i, pick in enumerate(picks)])
    return batch, ["ABCD"[pick] for pick in picks], ["colour"] * prompts


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def test_grpo_step_runs_and_reports(tokenizer):
    policy = build_model("qwen2.5-vl", tokenizer)
    reference = build_model("qwen2.5-vl", tokenizer)
    reference.load_state_dict(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    batch, answers, tasks = colour_batch(tokenizer)
    cfg = grpo.GRPOConfig(num_generations=3, max_new_tokens=8, rollout_micro_batch_size=3,
                          max_tokens_per_micro_batch=150)
    before = parameters(policy)
    torch.manual_seed(0)
    metrics, rollouts = grpo.grpo_step(policy, reference, optimizer, batch, answers, tasks, tokenizer, cfg)
    assert len(rollouts) == 12 and {r["index"] for r in rollouts} == {0, 1, 2, 3}
    assert {"prompt", "completion", "answer", "parsed", "reward", "advantage"} <= set(rollouts[0])
    for key in ("reward", "reward_std", "accuracy", "format", "frac_reward_zero_std", "kl", "entropy", "grad_norm",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/dual_mean", "completions/mean_length",
                "completions/max_length", "completions/clipped_ratio", "tokens_per_second", "time/generate",
                "time/reward", "time/logprobs", "time/update", "reward/colour", "accuracy/colour", "format/colour",
                "signal/colour"):
        assert math.isfinite(metrics[key]), key
    assert metrics["signal/colour"] == 1 - metrics["frac_reward_zero_std"]    # one task: its groups are all groups
    assert metrics["num_updates"] == 2 and metrics["num_skipped_updates"] == 0
    assert metrics["entropy"] > 0 and metrics["completions/clipped_ratio"] <= 1
    assert policy.training and any(not torch.equal(a, b) for a, b in zip(before, parameters(policy)))


def test_equal_rewards_leave_the_policy_unchanged(tokenizer, monkeypatch):
    """Every group scores the same: zero advantages, zero policy gradient, no NaN (KL off, no weight decay)."""
    policy = build_model("qwen2.5-vl", tokenizer)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    batch, answers, tasks = colour_batch(tokenizer)
    monkeypatch.setattr(grpo, "task_reward", lambda response, answer: {"overall": 0.1, "format": 1.0,
                                                                        "accuracy": 0.0})
    before = parameters(policy)
    cfg = grpo.GRPOConfig(num_generations=3, max_new_tokens=6, kl_coef=0.0)
    metrics, _ = grpo.grpo_step(policy, None, optimizer, batch, answers, tasks, tokenizer, cfg)
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(policy)))


def test_signal_is_the_share_of_each_tasks_groups_with_a_reward_spread(tokenizer, monkeypatch):
    """signal/<task>: task "spread" scores [1, 0, 0] in every group, task "flat" 0.1 throughout: 1.0 and 0.0."""
    policy = build_model("qwen2.5-vl", tokenizer)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    batch, _, _ = colour_batch(tokenizer)
    calls = iter(range(1000))      # responses are scored in order, a group's n together
    monkeypatch.setattr(grpo, "task_reward", lambda response, answer: (
        {"overall": float(next(calls) % 3 == 0), "format": 1.0, "accuracy": 0.0} if answer == "spread"
        else {"overall": 0.1 + 0 * next(calls), "format": 1.0, "accuracy": 0.0}))
    cfg = grpo.GRPOConfig(num_generations=3, max_new_tokens=6, kl_coef=0.0)
    names = ["spread", "flat", "spread", "flat"]
    metrics, _ = grpo.grpo_step(policy, None, optimizer, batch, names, names, tokenizer, cfg)
    assert metrics["signal/spread"] == 1.0 and metrics["signal/flat"] == 0.0
    assert metrics["frac_reward_zero_std"] == 0.5


def test_non_finite_loss_skips_the_update_and_counts_it(tokenizer, monkeypatch):
    policy = build_model("qwen2.5-vl", tokenizer)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    batch, answers, tasks = colour_batch(tokenizer)
    real = grpo.group_advantages

    def poisoned(rewards, n, eps=1e-6):
        advantages = real(rewards, n, eps)
        advantages[0] = float("nan")                   # first mini-batch only
        return advantages

    monkeypatch.setattr(grpo, "group_advantages", poisoned)
    before = parameters(policy)
    cfg = grpo.GRPOConfig(num_generations=3, max_new_tokens=6, kl_coef=0.0)
    metrics, _ = grpo.grpo_step(policy, None, optimizer, batch, answers, tasks, tokenizer, cfg)
    assert metrics["num_skipped_updates"] == 1 and metrics["num_updates"] == 1
    after = parameters(policy)
    assert all(torch.isfinite(p).all() for p in after)
    # the second update ran only if it had a gradient; AdamW's weight decay moves the weights either way
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in policy.parameters())


def test_single_update_uses_its_own_log_probs_as_old(tokenizer):
    """updates_per_step 1 skips the old-policy pass (old = the update's own log-probs, detached): the same update as
    recomputing them in a separate pass."""
    batch, _, _ = colour_batch(tokenizer)
    generator = torch.Generator().manual_seed(3)
    completion_ids = torch.randint(10, 290, (12, 5), generator=generator)
    completion_mask = (torch.arange(5)[None] < torch.randint(1, 6, (12, 1), generator=generator)).long()
    advantages = torch.randn(12, generator=generator)
    rollouts = grpo.Rollouts(batch, completion_ids, completion_mask, 3)
    cfg = grpo.GRPOConfig(num_generations=3, updates_per_step=1, max_tokens_per_micro_batch=100, kl_coef=0.0)
    results = []
    for explicit in (False, True):
        model = build_model("qwen2.5-vl", tokenizer)
        old_logp = grpo.rollout_logprobs(model, rollouts, True, 100) if explicit else None
        # SGD, linear in the gradient: the no-grad pass may round differently (SDPA picks its kernel by grad mode),
        # and Adam's first step lr * g / |g| would blow a 1e-9 difference in a near-zero gradient up to lr
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        metrics = grpo.update_policy(model, optimizer, rollouts, old_logp, None, advantages, cfg)
        results.append((parameters(model), metrics))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert results[0][1]["clip_ratio/region_mean"] == 0.0
