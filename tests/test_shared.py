"""Shared-prompt GRPO (grpo.pack with several responses per row) against the per-response path, and the micro-batch
machinery around it: the same log-probs, entropies and gradients of every parameter, whatever the token budget; the
same greedy completions from one shared prefill per prompt and from micro-batched generate calls.

Both model families, prompts with 1-5 images of different sizes, ragged responses (one of a single token), and
completions that end in padding. Tolerances: fp32 on one thread; the two paths run the same weights on the same
tokens, but the shared row attends over other key sets (a prompt's keys once, masked keys adding exact zeros) and
its matmuls have other shapes, so sums round in another order: measured differences are <= 5e-7 in log-probs and
<= 1e-6 relative in gradients; the asserts allow 4x that. A wrong position, mask or gather shows at 1e-2 or more.
"""
import random

import pytest
import torch

import grpo
from test_grpo import build_image_processor, build_model, build_tokenizer, coloured, encode

N = 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def five_prompts(family, tokenizer):
    """Prompts with 1, 2, 3, 4 and 5 images of different sizes and questions of different lengths."""
    processor = build_image_processor(family)
    rng = random.Random(0)
    sizes = [(28, 28), (56, 28), (28, 56), (56, 56), (40, 30)]
    images = [[coloured(tuple(rng.randrange(256) for _ in range(3)), rng.choice(sizes), seed=10 * count + i)
               for i in range(count)] for count in range(1, 6)]
    questions = ["What colour?", "A red B green", "What colour is the image? A red B green C blue D yellow",
                 "Which one", "red green blue yellow A B C D"]
    return encode(tokenizer, processor, questions, images)


def ragged_rollouts(batch, seed=0):
    """N responses per prompt of 1-7 tokens, right-padded to 9 columns (so every response ends in padding)."""
    generator = torch.Generator().manual_seed(seed)
    sequences = batch["input_ids"].shape[0] * N
    lengths = torch.randint(1, 8, (sequences,), generator=generator)
    lengths[1] = 1
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    ids = torch.randint(10, 290, (sequences, 9), generator=generator) * mask
    return grpo.Rollouts(batch, ids, mask, N)


def logprobs_and_grads(model, rollouts, shared, max_tokens):
    """Per-token log-probs and entropies [S, R] and the gradient of sum_t w_t logp_t for every parameter."""
    model.zero_grad(set_to_none=True)
    logp = torch.zeros(rollouts.completion_mask.shape)
    entropy = torch.zeros(rollouts.completion_mask.shape)
    weights = torch.randn(rollouts.completion_mask.shape, generator=torch.Generator().manual_seed(1))
    rows, lengths = grpo.pass_rows(rollouts, shared)
    for micro in grpo.micro_batches(lengths, max_tokens):
        inputs, where = grpo.pack(model, rollouts, [rows[i] for i in micro])
        values, entropies = grpo.packed_logprobs(model, inputs, where, temperature=0.7, return_entropy=True)
        at = (where["sequence"], where["token"])
        (values * weights[at]).sum().backward()
        logp[at], entropy[at] = values.detach(), entropies
    return logp, entropy, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_shared_prompt_rows_equal_one_row_per_response(family, tokenizer):
    model = build_model(family, tokenizer)
    rollouts = ragged_rollouts(five_prompts(family, tokenizer))
    logp, entropy, grads = logprobs_and_grads(model, rollouts, shared=False, max_tokens=10_000)
    mask = rollouts.completion_mask.bool()
    assert (logp[mask] < 0).all() and (logp[~mask] == 0).all() and (entropy[mask] > 0).all()
    for shared, max_tokens in ((True, 10_000), (True, 200), (False, 150)):    # one or several micro-batches
        shared_logp, shared_entropy, shared_grads = logprobs_and_grads(model, rollouts, shared, max_tokens)
        torch.testing.assert_close(shared_logp, logp, atol=2e-6, rtol=0)
        torch.testing.assert_close(shared_entropy, entropy, atol=2e-6, rtol=0)
        assert shared_grads.keys() == grads.keys() and any("visual" in name for name in grads)
        for name, grad in grads.items():
            scale = float(grad.abs().max())
            torch.testing.assert_close(shared_grads[name], grad, atol=4e-6 * scale + 1e-9, rtol=0, msg=name)


def test_the_comparison_catches_wrong_positions_and_masks(tokenizer):
    """The comparison above can fail: responses whose positions continue after the previous response (the row read
    as one sequence), or that see the other responses (a plain causal mask), move log-probs far beyond it."""
    model = build_model("qwen2.5-vl", tokenizer)
    rollouts = ragged_rollouts(five_prompts("qwen2.5-vl", tokenizer))
    rows, _ = grpo.pass_rows(rollouts, shared=True)
    inputs, where = grpo.pack(model, rollouts, rows)
    with torch.no_grad():
        right = grpo.packed_logprobs(model, inputs, where)
        prompt_len = rollouts.prompts["attention_mask"].sum(1)                            # [rows]
        columns = torch.arange(inputs["input_ids"].shape[1])
        in_responses = columns[None] >= prompt_len[:, None]                              # [rows, L]
        drifted = dict(inputs, position_ids=inputs["position_ids"] + 3 * in_responses.cumsum(1)[None] // 5)
        causal = dict(inputs, attention_mask=torch.ones_like(inputs["attention_mask"]).tril())
        for wrong in (drifted, causal):
            assert (grpo.packed_logprobs(model, wrong, where) - right).abs().max() > 1e-3


def test_micro_batches_respect_the_token_budget():
    lengths = [5, 30, 12, 12, 7, 40, 3]
    batches = grpo.micro_batches(lengths, 36)
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    for batch in batches:
        widest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * widest <= 36
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert batches[0] == [5]                                 # 40 tokens: over the budget, alone


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_update_does_not_depend_on_the_budget_or_the_path(family, tokenizer):
    """The loss is the token mean over the whole mini-batch: how rows are grouped into micro-batches, and whether a
    group's responses share one row, leaves the update unchanged (SGD, so that rounding stays rounding)."""
    rollouts = ragged_rollouts(five_prompts(family, tokenizer), seed=2)
    generator = torch.Generator().manual_seed(3)
    advantages = torch.randn(rollouts.completion_mask.shape[0], generator=generator)
    reference = build_model(family, tokenizer, seed=1)
    ref_logp = grpo.rollout_logprobs(reference, rollouts, False, 10_000)
    results = []
    for shared, budget in ((False, 10_000), (True, 10_000), (True, 120), (False, 60)):
        model = build_model(family, tokenizer)
        cfg = grpo.GRPOConfig(num_generations=N, updates_per_step=1, shared_prompt=shared,
                              max_tokens_per_micro_batch=budget)
        metrics = grpo.update_policy(model, torch.optim.SGD(model.parameters(), lr=1.0), rollouts, None, ref_logp,
                                     advantages, cfg)
        results.append(({name: p.detach() for name, p in model.named_parameters()}, metrics))
    initial = build_model(family, tokenizer).state_dict()
    assert max(float((results[0][0][k] - initial[k]).abs().max()) for k in initial) > 1e-3
    for params, metrics in results[1:]:
        assert metrics["loss"] == pytest.approx(results[0][1]["loss"], rel=1e-5, abs=1e-8)
        assert metrics["kl"] == pytest.approx(results[0][1]["kl"], rel=1e-5)
        for name, value in results[0][0].items():
            torch.testing.assert_close(params[name], value, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_shared_prefill_and_micro_batches_give_the_same_greedy_completions(family, tokenizer):
    """transformers' generate (--rollout-engine hf): one call over every prompt repeated n times against one
    prefill per prompt with its KV cache copied n times, in micro-batches of 1 and 2 prompts bucketed by length.
    (The rollout engine against generate: tests/test_engine.py.)"""
    model = build_model(family, tokenizer).eval()
    batch = five_prompts(family, tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    expected = grpo.generate_completions(model, batch, N, 8, 0.0, 1.0, eos, pad, None, shared_prompt=False,
                                         engine="hf")
    assert expected[1].sum(1).min() >= 1 and len({tuple(row) for row in expected[0].tolist()}) > 1
    for shared, micro_batch_size in ((True, None), (True, 1), (True, 2), (False, 2)):
        got = grpo.generate_completions(model, batch, N, 8, 0.0, 1.0, eos, pad, micro_batch_size, shared,
                                        engine="hf")
        for a, b in zip(got, expected):
            assert torch.equal(a, b), (shared, micro_batch_size)
