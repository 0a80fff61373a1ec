"""GRPO learns where a signal exists, and unlearns when the advantage sign is flipped.

The task (defined here): a noisy solid image of one of 4 colours, "What colour is the image? A red B green C blue
D yellow", answer the letter. A tiny Qwen2.5-VL is first SFT'd to write "<think>COLOUR</think> \\boxed{L}" where
the think names the colour truly but the letter follows a scrambled key (one colour right) or is random: the format,
at chance accuracy (0.25). GRPO (grpo_step, tasks.reward, recipe clips and KL; 2 updates per step, lr 2e-3) must
raise held-out accuracy well above chance; with the advantages negated it must drive it to ~0.

Why the scrambled key rather than letters independent of the image: from an image-blind letter the tiny model needs
~90 GRPO steps (about a minute) before its accuracy leaves chance; with an image-dependent but wrong answer it needs
~20, which keeps this CI test at ~25 s per seed.

    OMP_NUM_THREADS=1 python tests/test_grpo_learning.py 5    # before/after for seeds 0-4, both signs (the spread)
"""
import itertools
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from test_grpo import build_model, build_tokenizer, colour_batch  # noqa: E402

SFT_STEPS, GRPO_STEPS, PROMPTS_PER_STEP, LR = 80, 24, 24, 2e-3
COLOUR_NAMES = ("red", "green", "blue", "yellow")
CFG = grpo.GRPOConfig(num_generations=5, max_new_tokens=12, updates_per_step=2)


def scrambled_key(seed):
    """A colour -> letter key with exactly one colour right: answering by it is right 1 time in 4 (chance)."""
    keys = [key for key in itertools.permutations("ABCD") if sum(a == b for a, b in zip(key, "ABCD")) == 1]
    return random.Random(seed).choice(keys)


def sft_on_format(model, tokenizer, seed):
    """SFT on '<think>COLOUR</think> \\boxed{L}<|im_end|>': the think names the image's colour (true: the policy
    perceives, as a pretrained model would); the letter follows a scrambled key half the time and is uniform
    otherwise, so the answer depends on the image but is right only at chance (0.25 sampled and greedy).
    GRPO then has to move each colour's probability to its right letter."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng, key = random.Random(seed), scrambled_key(seed)
    for step in range(SFT_STEPS):
        batch, answers, _ = colour_batch(tokenizer, prompts=16, seed=1000 * seed + step)
        letters = [key["ABCD".index(answer)] if rng.random() < 0.5 else rng.choice("ABCD") for answer in answers]
        texts = [f"<think>{COLOUR_NAMES['ABCD'.index(answer)]}</think> \\boxed{{{letter}}}<|im_end|>"
                 for answer, letter in zip(answers, letters)]
        ids = [tokenizer(text)["input_ids"] for text in texts]
        width = max(len(row) for row in ids)
        completion_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
        completion_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        logp = grpo.response_logprobs(model, batch, completion_ids, completion_mask)
        loss = -(logp * completion_mask).sum() / completion_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def held_out_accuracy(model, tokenizer, seed, prompts=48, samples=4):
    """Accuracy on held-out images (seeds the training never uses): sampled at T = 1 (the policy's own chance of
    being right), greedy, and the sampled format rate."""
    batch, answers, _ = colour_batch(tokenizer, prompts=prompts, seed=10_000 + seed)
    model.eval()
    results = {}
    for name, count, temperature in (("sampled", samples, 1.0), ("greedy", 1, 0.0)):
        torch.manual_seed(seed)
        ids, _, _ = grpo.generate_completions(model, batch, count, CFG.max_new_tokens, temperature, 1.0,
                                              tokenizer.eos_token_id, tokenizer.pad_token_id)
        scores = [grpo.task_reward(text, answers[i // count]) for i, text in
                  enumerate(tokenizer.batch_decode(ids, skip_special_tokens=True))]
        results[name] = sum(score["accuracy"] for score in scores) / len(scores)
        if name == "sampled":
            results["format"] = sum(score["format"] for score in scores) / len(scores)
    model.train()
    return results


def run(seed, advantage_sign=1.0, steps=GRPO_STEPS):
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    policy = build_model("qwen2.5-vl", tokenizer, seed=seed)
    sft_on_format(policy, tokenizer, seed)
    before = held_out_accuracy(policy, tokenizer, seed)
    reference = build_model("qwen2.5-vl", tokenizer, seed=seed)
    reference.load_state_dict(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.01)
    real_advantages = grpo.group_advantages
    grpo.group_advantages = lambda rewards, n, eps=1e-6: advantage_sign * real_advantages(rewards, n, eps)
    try:
        for step in range(steps):
            batch, answers, tasks = colour_batch(tokenizer, prompts=PROMPTS_PER_STEP, seed=100 * seed + step + 7)
            metrics, _ = grpo.grpo_step(policy, reference, optimizer, batch, answers, tasks, tokenizer, CFG)
    finally:
        grpo.group_advantages = real_advantages
    after = held_out_accuracy(policy, tokenizer, seed)
    return before, after, metrics


# Measured (1 thread, 24 steps of 24 prompts x 5, lr 2e-3, shared prompts; ~8 s per seed, the other core busy):
#   held-out sampled accuracy  seed 0: 0.26 -> 0.88, 1: 0.20 -> 0.86, 2: 0.19 -> 0.66, 3: 0.19 -> 0.66
#   (greedy 0.00-0.29 -> 0.73-1.00); advantages negated: 0.19-0.26 -> 0.00 in every seed, format 0.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_raises_accuracy_from_chance(seed):
    torch.set_num_threads(1)
    before, after, _ = run(seed)
    assert before["format"] >= 0.75 and before["sampled"] <= 0.35 and before["greedy"] <= 0.5   # format, at chance
    assert after["sampled"] >= 0.45 and after["sampled"] - before["sampled"] >= 0.2
    assert after["format"] >= 0.85


@pytest.mark.slow
def test_negated_advantages_unlearn():
    """The sign error a GRPO implementation can make: it must drive accuracy down, not up."""
    torch.set_num_threads(1)
    before, after, _ = run(0, advantage_sign=-1.0, steps=10)
    assert after["sampled"] <= 0.15 < before["sampled"]


if __name__ == "__main__":
    import time
    torch.set_num_threads(1)
    for sign in (1.0, -1.0):
        for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
            start = time.time()
            before, after, metrics = run(seed, sign)
            print(f"sign {sign:+.0f} seed {seed}: sampled accuracy {before['sampled']:.2f} -> {after['sampled']:.2f}, "
                  f"greedy {before['greedy']:.2f} -> {after['greedy']:.2f}, format {before['format']:.2f} -> "
                  f"{after['format']:.2f} ({time.time() - start:.1f} s)", flush=True)
