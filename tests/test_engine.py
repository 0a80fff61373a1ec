"""The rollout engine (grpo.engine_generate) against transformers' `generate` and the training passes.

- attention: a slot's two-part attention (its prompt's row once, its own tokens) equals one softmax over
  [prompt | own] for any slot, with free slots, reused rows and stale entries around, at the bounds in use and over
  the whole cache (what a captured step runs);
- greedy: the same tokens as `generate` for both families, prompts of 1-5 images of different sizes, samples that
  end at different steps and slots refilled mid-stream, and the same completions in a whole GRPO step;
- sampling: the log-prob the sampler computed for each token equals the training pass's within 1e-5 (fp32); the
  first token's frequencies over 4,000 samples match the softmax (temperature, suppressed vision tokens, top-p);
  a prompt's samples depend on its seed only, so one rank or two draw the same rollouts, and the hf path
  (grpo.SeededSampler) draws the same samples from the same seeds.
"""
import math

import pytest
import torch

import grpo
from test_grpo import build_model, build_tokenizer, colour_batch, parameters
from test_shared import five_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stop_tokens(model, tokenizer, batch, n=1, max_new_tokens=12):
    """EOS plus tokens that greedy decoding writes at different steps of different prompts, so that samples end at
    1 to ~8 tokens (a random-init model rarely writes EOS)."""
    ids, _, _ = grpo.generate_completions(model, batch, n, max_new_tokens, 0.0, 1.0, tokenizer.eos_token_id,
                                          tokenizer.pad_token_id, engine="hf")
    return [tokenizer.eos_token_id] + [int(ids[i * n, 2 + 2 * i]) for i in range(3)]


# ---------------------------------------------------------------------------------------------------------------------
# Attention over a shared prompt row and a slot's own tokens

def test_two_part_attention_equals_one_softmax_over_prompt_and_own_tokens():
    """Random cache contents (stale ones included), 3 prompt rows of different lengths plus the empty row 0, 7 slots
    of which 2 are free (pointing at row 0), n = 3, GQA with 2 query heads per kv head: every active slot's output
    equals softmax(q [K_p | K_s]^T / sqrt(d)) [V_p | V_s] in fp64 over exactly its prompt's and its own keys, as
    closely as fp32 SDPA over that concatenation does (4x its error, plus 1e-7); the bounds in use and the whole
    cache give the same outputs. A slot pointed at the wrong row, a row length or a slot position off by one move
    an output by 0.4 or more (measured)."""
    generator = torch.Generator().manual_seed(0)
    config = build_model("qwen2.5-vl", build_tokenizer()).config
    kv_heads, heads, head_dim = 2, 4, 16
    kv = grpo.RolloutKV(config, rows=5, prompt_capacity=9, slots=7, response_capacity=6, n=3, dtype=torch.float32,
                        device=torch.device("cpu"))
    for store in kv.prompt_keys + kv.prompt_values + kv.slot_keys + kv.slot_values:
        store.copy_(torch.randn(store.shape, generator=generator))
    rows, samples, lengths = [1, 1, 0, 2, 3, 0, 3], [0, 2, 0, 1, 0, 0, 2], [0, 3, 0, 5, 1, 2, 4]
    kv.slot_row.copy_(torch.tensor(rows))
    kv.slot_sample.copy_(torch.tensor(samples))
    kv.slot_length.copy_(torch.tensor(lengths))
    kv.row_length.copy_(torch.tensor([0, 4, 9, 2, 0]))
    active = [0, 1, 3, 4, 6]
    query = torch.randn(7, heads, 1, head_dim, generator=generator)
    key, value = torch.randn(2, 7, kv_heads, 1, head_dim, generator=generator)
    outputs = []
    for bounds in ((7, 4, 9, 6), kv.capacity):
        kv.bounds = bounds
        outputs.append(kv.attend(0, query, key, value, head_dim ** -0.5))                     # [S, 1, H, d]
    torch.testing.assert_close(outputs[0][active], outputs[1][active], atol=1e-6, rtol=0)
    engine_error = sdpa_error = 0.0
    for slot in active:
        row, length = rows[slot], int(kv.row_length[rows[slot]])
        keys = torch.cat([kv.prompt_keys[0][row, :, :length], kv.slot_keys[0][slot, :, :lengths[slot] + 1]], 1)
        values = torch.cat([kv.prompt_values[0][row, :, :length], kv.slot_values[0][slot, :, :lengths[slot] + 1]], 1)
        assert torch.equal(kv.slot_keys[0][slot, :, lengths[slot]], key[slot, :, 0])       # written in place
        for head in range(heads):
            scores = keys[head // 2].double() @ query[slot, head, 0].double() * head_dim ** -0.5      # [L]
            expected = torch.softmax(scores, 0) @ values[head // 2].double()                          # [d]
            sdpa = torch.nn.functional.scaled_dot_product_attention(
                query[slot, head, 0][None, None], keys[head // 2][None], values[head // 2][None])[0, 0]  # [d]
            engine_error = max(engine_error, float((outputs[0][slot, 0, head].double() - expected).abs().max()))
            sdpa_error = max(sdpa_error, float((sdpa.double() - expected).abs().max()))
    assert engine_error <= 4 * sdpa_error + 1e-7, (engine_error, sdpa_error)


# ---------------------------------------------------------------------------------------------------------------------
# Greedy: the same tokens as transformers' generate

@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_greedy_tokens_equal_generate(family, tokenizer):
    """Prompts of 1-5 images of different sizes (ragged lengths), stop tokens that end samples after 1 to ~8 of 12
    tokens, and 1 or 2 prompts in flight of 5, so that finished samples' slots (and rows) are refilled mid-stream."""
    model = build_model(family, tokenizer).eval()
    batch = five_prompts(family, tokenizer)
    stops, pad = stop_tokens(model, tokenizer, batch), tokenizer.pad_token_id
    for n, in_flight in ((1, 2), (2, 1), (3, None)):
        expected = grpo.generate_completions(model, batch, n, 12, 0.0, 1.0, stops, pad, None, shared_prompt=False,
                                             engine="hf")
        out = grpo.engine_generate(model, batch, n, 12, 0.0, 1.0, stops, pad, in_flight)
        for got, want in zip((out.completion_ids, out.completion_mask, out.truncated), expected):
            assert torch.equal(got, want), (n, in_flight)
        lengths = out.completion_mask.sum(1)
        assert len(set(lengths.tolist())) >= 3 and out.truncated.any() and not out.truncated.all()
        assert out.prefills >= math.ceil(5 / (in_flight or 5))      # refilled: one prefill per admission
        if in_flight:   # the cache bench/memory.py counts (rows as wide as the longest prompt, n x T per prompt)
            widest = int(batch["attention_mask"].sum(1).max())
            assert out.kv_bytes == grpo.rollout_kv_tokens(in_flight, widest, n, 12) * grpo.kv_bytes_per_token(
                model.config, 4)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_left_padded_text_only_prompts_decode_as_full_forwards_do(family, tokenizer):
    """Prompts without images, left-padded to a common width: the engine's greedy tokens are the argmax of the
    model's plain forward over prompt + tokens so far, prompt by prompt. (transformers' generate misplaces the
    padded Qwen3-VL prompt's positions here and decodes other tokens; the recipe's prompts all carry images.)"""
    model = build_model(family, tokenizer).eval()
    rows = [tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
            for question in ("What colour?", "A red B green C blue D yellow")]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": torch.zeros_like(input_ids),
             "images_per_sample": torch.zeros(2, dtype=torch.long)}
    out = grpo.engine_generate(model, batch, 2, 6, 0.0, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        sequence = torch.tensor([row])
        with torch.no_grad():
            for _ in range(6):
                logits = model(input_ids=sequence, mm_token_type_ids=torch.zeros_like(sequence)).logits[0, -1]
                logits[grpo.vision_token_ids(model)] = -math.inf
                sequence = torch.cat([sequence, logits.argmax()[None, None]], 1)
        assert torch.equal(out.completion_ids[2 * i], sequence[0, len(row):])


def test_grpo_step_on_the_engine_equals_the_hf_path_given_the_same_completions(tokenizer, monkeypatch):
    """A whole step (rewards, advantages, old and reference log-probs, 2 updates) from the engine's sampled
    completions, and from `generate`'s path handed the same completions: the same metrics and weights. (A random
    policy scores 0 on the task, so the reward here is a made-up function of the text: advantages that differ.)"""
    batch, answers, tasks = colour_batch(tokenizer, prompts=4, seed=1)
    monkeypatch.setattr(grpo, "task_reward", lambda text, answer: {"overall": len(text) % 5 / 4, "accuracy": 0.0,
                                                                   "format": float(len(text) % 2)})
    cfg = grpo.GRPOConfig(num_generations=3, max_new_tokens=10, rollout_micro_batch_size=2,
                          max_tokens_per_micro_batch=150)
    results, recorded = [], {}
    real_engine = grpo.engine_generate

    def recording(*args, **kwargs):
        recorded["out"] = real_engine(*args, **kwargs)
        return recorded["out"]

    for engine in ("ssrl", "hf"):
        policy = build_model("qwen2.5-vl", tokenizer)
        reference = build_model("qwen2.5-vl", tokenizer)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
        if engine == "ssrl":
            monkeypatch.setattr(grpo, "engine_generate", recording)
        else:   # generate's calls return the engine's completions for their prompts (longest first, 2 per call)
            order = torch.argsort(batch["attention_mask"].sum(1), descending=True, stable=True)
            calls = iter(order.split(2))
            completions = recorded["out"].completion_ids
            monkeypatch.setattr(grpo, "_sample", lambda model, prompts, n, shared, kwargs: completions[
                (next(calls)[:, None] * n + torch.arange(n)).reshape(-1)])
        metrics, records = grpo.grpo_step(policy, reference, optimizer, batch, answers, tasks, tokenizer,
                                          grpo.GRPOConfig(**{**cfg.__dict__, "rollout_engine": engine}))
        results.append((metrics, records, parameters(policy)))
    (metrics, records, weights), (hf_metrics, hf_records, hf_weights) = results
    assert len({r["completion"] for r in records}) > 4 and metrics["frac_reward_zero_std"] < 1
    assert [r["completion"] for r in records] == [r["completion"] for r in hf_records]
    for key, value in metrics.items():
        if not key.startswith("time/") and key != "tokens_per_second":
            assert hf_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert any(not torch.equal(a, b) for a, b in zip(weights, parameters(build_model("qwen2.5-vl", tokenizer))))
    for a, b in zip(weights, hf_weights):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling

@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_sampled_logprobs_equal_the_training_pass(family, tokenizer):
    """log pi(token) as the sampler computed it (temperature 0.7, top-p 0.9) against grpo.rollout_logprobs, the pass
    the update uses, on the shared-prompt rows: within 1e-5 in fp32, every token of samples that end at different
    steps, with 2 prompts in flight of 5."""
    model = build_model(family, tokenizer).eval()
    batch = five_prompts(family, tokenizer)
    args = (batch, 3, 10, 0.7, 0.9)
    free = grpo.engine_generate(model, *args, [tokenizer.eos_token_id], tokenizer.pad_token_id, 2, seeds=range(5))
    stops = [tokenizer.eos_token_id] + [int(free.completion_ids[3 * i, 2 + 3 * i]) for i in range(3)]
    out = grpo.engine_generate(model, *args, stops, tokenizer.pad_token_id, 2, seeds=range(5))
    mask = out.completion_mask.bool()
    assert len(set(mask.sum(1).tolist())) >= 3
    rollouts = grpo.Rollouts(batch, out.completion_ids, out.completion_mask, 3)
    expected = grpo.rollout_logprobs(model, rollouts, True, 10_000, temperature=0.7)
    assert (out.logprobs[mask] < 0).all() and (out.logprobs[~mask] == 0).all()
    torch.testing.assert_close(out.logprobs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature, top_p", [(0.5, 1.0), (1.0, 0.6)])
def test_first_token_frequencies_match_the_softmax(temperature, top_p, tokenizer):
    """4,000 samples of one prompt: each token's frequency within 4.5 standard errors of its probability under
    softmax(logits / T) with the vision tokens suppressed and, for top-p, the tokens outside the smallest set holding
    top_p of the mass removed (those, and the vision tokens, never drawn); the chi-square statistic (rare tokens
    pooled) within 5 sigma of its mean. The check can fail: the same counts against the softmax at T = 1 (or
    without top-p) are far off."""
    model = build_model("qwen2.5-vl", tokenizer).eval()
    with torch.no_grad():     # a random model's next-token distribution is nearly flat; sharpen it so that the
        model.lm_head.weight *= 8   # temperature and top-p change it a lot
    batch, _, _ = colour_batch(tokenizer, prompts=1)
    samples = 4000
    out = grpo.engine_generate(model, batch, samples, 1, temperature, top_p, [tokenizer.eos_token_id],
                               tokenizer.pad_token_id, seeds=[7])
    counts = torch.bincount(out.completion_ids[:, 0], minlength=model.config.text_config.vocab_size).double()
    with torch.no_grad():
        logits = model(**{key: batch[key] for key in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                      "pixel_values", "image_grid_thw")}).logits[0, -1].double()
    logits[grpo.vision_token_ids(model)] = -math.inf

    def distribution(temperature, top_p):
        probs = torch.softmax(logits / temperature, 0)
        ordered, order = probs.sort(descending=True)
        removed = order[(ordered.cumsum(0) - ordered) >= top_p]
        probs[removed] = 0
        return probs / probs.sum()

    def chi_square(probs):
        """Pearson's statistic and its bins: a bin per token expected at least 5 times, the other possible tokens
        pooled in one (a token expected 0.0004 times and drawn once would add 2,500 on its own)."""
        expected = samples * probs
        large, small = expected >= 5, (expected > 0) & (expected < 5)
        observed, expected = (torch.cat([counts[large], counts[small].sum()[None]]),
                              torch.cat([expected[large], expected[small].sum()[None]]))
        if not small.any():
            observed, expected = observed[:-1], expected[:-1]
        return float(((observed - expected) ** 2 / expected).sum()), len(expected)

    probs = distribution(temperature, top_p)
    assert (counts[probs == 0] == 0).all() and (probs == 0).sum() >= (4 if top_p == 1 else 20)
    error = (samples * probs * (1 - probs)).sqrt()
    assert ((counts - samples * probs).abs() <= 4.5 * error + 1).all()
    statistic, kept = chi_square(probs)
    assert statistic < kept - 1 + 5 * math.sqrt(2 * (kept - 1))
    wrong = distribution(1.0, 1.0) if top_p == 1 else distribution(temperature, 1.0)
    wrong_statistic, wrong_kept = chi_square(wrong)
    assert wrong_statistic > 3 * (wrong_kept - 1 + 5 * math.sqrt(2 * (wrong_kept - 1)))


def test_same_seed_same_rollouts_on_one_or_two_ranks(tokenizer):
    """Seeds per prompt (as ssrl.train_grpo makes them from the run seed, the step and the prompt's global index): one
    process decoding 6 prompts 3 at a time, and two ranks decoding the strided shares [0, 2, 4] and [1, 3, 5] one at a
    time, draw the same samples; another seed draws others. Stop tokens taken from the samples themselves end them
    at different steps."""
    model = build_model("qwen2.5-vl", tokenizer).eval()
    batch, _, _ = colour_batch(tokenizer, prompts=6, seed=2,
                               question=["What colour?", "A red B green", "Which one is it", "What colour is the "
                                         "image? A red B green C blue D yellow", "red", "yellow or blue"])
    seeds = [f"1-5-{index}" for index in range(6)]
    free = grpo.engine_generate(model, batch, 4, 12, 1.0, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                                seeds=seeds)
    stops = [tokenizer.eos_token_id] + [int(free.completion_ids[5 * i, 2 + 3 * i]) for i in range(3)]
    args = (4, 12, 1.0, 1.0, stops, tokenizer.pad_token_id)
    one = grpo.engine_generate(model, batch, *args, prompts_in_flight=3, seeds=seeds)
    assert len(set(one.completion_mask.sum(1).tolist())) >= 3
    for rank in range(2):
        share = torch.arange(rank, 6, 2)
        part = grpo.engine_generate(model, grpo.select_samples(batch, share), *args, prompts_in_flight=1,
                                    seeds=[seeds[i] for i in share])
        rows = (share[:, None] * 4 + torch.arange(4)).reshape(-1)
        width = part.completion_ids.shape[1]
        assert torch.equal(part.completion_ids, one.completion_ids[rows, :width])
        assert torch.equal(part.completion_mask, one.completion_mask[rows, :width])
        assert not one.completion_mask[rows, width:].any()
    other = grpo.engine_generate(model, batch, *args, prompts_in_flight=3, seeds=[seed + "'" for seed in seeds])
    assert not torch.equal(other.completion_ids[:, :4], one.completion_ids[:, :4])


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_same_seeds_draw_the_same_samples_on_both_engines(family, tokenizer):
    """generate_completions(seeds=...) means one thing whatever the engine: the engine (2 prompts in flight) and
    transformers' generate (2 prompts per call, shared prefill) sampling at T 0.8 and top-p 0.9 through
    grpo.SeededSampler draw the same tokens, masks and truncation flags from the same seeds, for prompts of 1-5
    images and samples that end at different steps."""
    model = build_model(family, tokenizer).eval()
    batch = five_prompts(family, tokenizer)
    seeds = [f"3:{family}:{i}" for i in range(5)]
    args = (batch, 3, 10, 0.8, 0.9)
    free = grpo.generate_completions(model, *args, [tokenizer.eos_token_id], tokenizer.pad_token_id, 2, seeds=seeds)
    stops = [tokenizer.eos_token_id] + [int(free[0][3 * i, 1 + 3 * i]) for i in range(3)]
    ssrl, hf = (grpo.generate_completions(model, *args, stops, tokenizer.pad_token_id, 2, seeds=seeds, engine=engine)
                for engine in ("ssrl", "hf"))
    for got, want in zip(ssrl, hf):
        assert torch.equal(got, want)
    assert len(set(ssrl[1].sum(1).tolist())) >= 3 and len({tuple(row) for row in ssrl[0].tolist()}) == 15
