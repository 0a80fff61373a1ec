"""GRPO as the paper's released code (EasyR1) computes it: the loss, prompt batches, rollouts, passes, one step.
Not here: the tasks, data and reward (tasks.py); models, flags, the SFT and GRPO loops, evaluation and checkpoints
(ssrl.py, which imports this file; this file never imports it).

One call of `grpo_step` does one step for this rank's prompts (a batch from `encode_prompts`):
  1. n responses per prompt (`generate_completions`), a micro-batch of prompts per generate call (bucketed by
     length); each prompt's images and prefill run once and its KV cache is copied n times (`shared_prompt`)
  2. each decoded (skip_special_tokens) and scored with `tasks.reward`: 0.9 accuracy + 0.1 format
  3. group advantages  A_i = (r_i - mean_g r) / (std_g r + 1e-6), unbiased std; a group of equal rewards gets 0
  4. log-probs of the responses under the policy before the update (old) and the frozen reference, no grad
     (with a single update per step the old log-probs are the update's own, detached: exact and one pass less)
  5. `updates_per_step` mini-batches of prompts, each split into micro-batches by a token budget (`policy_loss`):
        log rho = clamp(logp - old_logp, -20, 20)
        L = max(-A rho, -A clip(rho, 1 - 0.2, 1 + 0.3)),  and  min(L, -3.0 A)  where A < 0  (dual clip)
        + 0.01 * k3(ref || policy)
     averaged over the response tokens of the whole mini-batch on all ranks; clip grad norm 1.0; optimizer step

The recipe and its sources (paper section 4.1; InternLM/Spatial-SSRL training/GRPO/: examples/config.yaml,
examples/spatial-ssrl_qwen*.sh, verl/trainer/core_algos.py, verl/workers/actor/dp_actor.py):
  n = 5, temperature 1.0, top_p 1.0, top_k off                  [paper 4.1; config.yaml]
  256 prompts per rollout, 128 per update: 2 updates per step    [spatial-ssrl_qwen*.sh; config.yaml]
  ratio clip [0.8, 1.3], dual clip 3.0 for A < 0                 [core_algos.py compute_policy_loss]
  k3 ("low_var_kl") KL to the reference, weight 0.01, in the loss [config.yaml; core_algos.py kl_penalty]
  loss = token mean over the global mini-batch                   [dp_actor.py, loss_avg_mode "token"]
  grad clip 1.0; AdamW lr 1e-6 constant, wd 0.01 (the caller owns optimizer and schedule)
Departures from EasyR1: one engine (HF generate, no vLLM) samples and scores, so old log-probs only differ from the
sampler's by numerics; mini-batches are whole prompts' groups (no `_balance_batch` reordering); vision tokens
(<|image_pad|> etc.) are never sampled, since a later forward would take a sampled one for an image slot.

Shared prompts (Prefix Grouper, arXiv 2506.05433, here for multimodal M-RoPE models): a Spatial-SSRL prompt is long
(1-5 images, >= 334 visual tokens each at 512 px) and its answers short, so each group is one packed row
[prompt, r_1, ..., r_n] in every pass (`pack`): the linear layers do P + sum R_i tokens instead of n P + sum R_i,
and outputs and gradients equal the per-response path (tests/test_shared.py).

Distributed: every rank passes the same number of prompts (whole groups). FSDP2 averages gradients over ranks, so
each rank divides its token sum by (global tokens / world size) and the average is the global token mean. Rollouts
and the no-grad passes run inside `gathered` (no collective per generated token); the update's micro-batches are
gathered per layer as usual, so every rank runs the same number of them (padded with weight-0 passes).
"""
import contextlib
import dataclasses
import math
import random
import time
import types
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from kernels import fused_logprobs
from tasks import BadRecord, extract_boxed, make_prompt, reward as task_reward


# kernels.fused_logprobs path of every log-prob pass (SFT, old, reference, policy): None picks by device (Triton on
# CUDA, the chunked PyTorch fallback on a CPU); "torch", "triton" or "reference" force one. "reference" materialises
# [tokens x vocab] logits: bench/grpo.py sets it to time the step with the fused log-probs off.
LOGPROBS_IMPL = None


@dataclasses.dataclass
class GRPOConfig:
    num_generations: int = 5          # n responses per prompt (TRL num_generations)
    temperature: float = 1.0          # sampling and log-prob temperature (verl divides logits by it in every pass)
    top_p: float = 1.0
    max_new_tokens: int = 2048        # EasyR1 max_response_length (TRL max_completion_length)
    clip_low: float = 0.2             # EasyR1 clip_ratio_low (TRL epsilon)
    clip_high: float = 0.3            # EasyR1 clip_ratio_high (TRL epsilon_high)
    dual_clip: float = 3.0            # EasyR1 clip_ratio_dual
    kl_coef: float = 0.01             # k3 KL weight in the loss (TRL beta); 0 skips the reference pass
    updates_per_step: int = 2         # rollout 256 prompts / update 128 prompts
    rollout_micro_batch_size: int = 8  # prompts (each with its n responses) per generate call
    max_tokens_per_micro_batch: int = 16384  # padded tokens per forward in the log-prob and update passes
    shared_prompt: bool = True        # each group as one packed row [prompt, r_1..r_n]; False: a row per response
    max_grad_norm: float = 1.0

# ---------------------------------------------------------------------------------------------------------------------
# The algorithm: group advantages and the clipped, KL-regularised policy loss

def group_advantages(rewards, n, eps=1e-6):
    """A_i = (r_i - mean_g r) / (std_g r + eps) over each prompt's n responses (torch.std: unbiased, N - 1).
    Groups of equal rewards get exactly 0 (rounding in the mean would otherwise leave ~1e-8 / 1e-6 = 1e-2)."""
    if n < 2:
        raise ValueError("GRPO needs n >= 2 responses per prompt for a group baseline")
    grouped = rewards.double().view(-1, n)                                                   # [B, n]
    advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)  # [B, n]
    spread = grouped.amax(1, keepdim=True) > grouped.amin(1, keepdim=True)                   # [B, 1]
    return torch.where(spread, advantages, 0.0).view(-1).to(rewards.dtype)                   # [B*n]


def kl_k3(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || pi_ref): r - 1 - log r with r = pi_ref / pi, unbiased and always >= 0
    (J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html); clamped as EasyR1's
    low_var_kl (verl/trainer/core_algos.py kl_penalty)."""
    log_ref_ratio = torch.clamp(ref_logp - logp, -20.0, 20.0)                                 # [T]
    return torch.clamp(torch.exp(log_ref_ratio) - log_ref_ratio - 1, -10.0, 10.0)            # [T]


def policy_loss(logp, old_logp, ref_logp, advantages, mask, total_tokens, clip_low=0.2, clip_high=0.3,
                dual_clip=3.0, kl_coef=0.01):
    """The per-token loss of EasyR1's compute_policy_loss (the module docstring, step 5), summed over `mask` and
    divided by `total_tokens`: pass the token count of the whole mini-batch (divided by the world size when ranks
    average gradients), and micro-batches and ranks add up to the global token mean. This is not a mean per
    sequence then per batch (tiny-grpo, simple_GRPO). Per-token tensors of one shape; `advantages` broadcasts
    against them (a sequence's A on each of its tokens). Metrics use the same normalisation, so they add up over
    micro-batches the same way."""
    mask = mask.to(logp.dtype)                                                                # [T]
    advantages = advantages.to(logp.dtype)                                                    # [T]
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)                                     # [T]
    ratio = torch.exp(log_ratio)                                                              # [T]
    clipped_ratio = torch.exp(torch.clamp(log_ratio, math.log(1 - clip_low), math.log(1 + clip_high)))  # [T]
    loss_unclipped = -advantages * ratio                                                      # [T]
    loss_clipped = -advantages * clipped_ratio                                                # [T]
    loss_dual = -advantages * dual_clip                                                       # [T]
    pessimistic = torch.maximum(loss_unclipped, loss_clipped)                                 # [T]
    pg_loss = torch.where(advantages < 0, torch.minimum(pessimistic, loss_dual), pessimistic)  # [T]
    kl = kl_k3(logp, ref_logp)                                                                # [T]
    per_token = pg_loss + kl_coef * kl                                                        # [T]
    loss = (per_token * mask).sum() / total_tokens

    def token_mean(value):
        return ((value.to(logp.dtype) * mask).sum() / total_tokens).detach()

    low = (ratio < 1 - clip_low) & (advantages < 0)        # where the lower clip holds the loss (TRL clip_ratio/low)
    high = (ratio > 1 + clip_high) & (advantages > 0)      # where the upper clip holds it (TRL clip_ratio/high)
    dual = (pessimistic > loss_dual) & (advantages < 0)    # where the dual clip holds it (EasyR1 pg_clipfrac_lower)
    metrics = {"pg_loss": token_mean(pg_loss), "kl": token_mean(kl), "clip_ratio/low_mean": token_mean(low),
               "clip_ratio/high_mean": token_mean(high), "clip_ratio/region_mean": token_mean(low | high),
               "clip_ratio/dual_mean": token_mean(dual)}
    return loss, metrics

# ---------------------------------------------------------------------------------------------------------------------
# Prompt batches: what a step consumes (`encode_prompts`) and how it is sliced

def chat_messages(problem, format_prompt=True):
    """One user turn: the question stripped plus the format prompt (make_prompt), an image at each <image>."""
    content = []
    for i, text in enumerate((make_prompt(problem) if format_prompt else problem).split("<image>")):
        if i:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def prompt_text(processor, problem, format_prompt=True):
    return processor.apply_chat_template(chat_messages(problem, format_prompt), tokenize=False,
                                         add_generation_prompt=True)


def encode_prompts(processor, records, images, min_pixels, max_pixels):
    """Left-padded chat-template inputs for a batch of records (dicts with "problem") and their PIL images.

    Returns input_ids, attention_mask and mm_token_type_ids [B, P] (padded alike), pixel_values [patches, C*p*p],
    image_grid_thw [n_images, 3] and images_per_sample [B]. Qwen2.5-VL silently falls back to 1-D positions when
    mm_token_type_ids is missing (transformers 5.x), so every consumer must pass it on.
    """
    texts, flat = [], []
    for record, record_images in zip(records, images):
        if record["problem"].count("<image>") != len(record_images):
            raise BadRecord(f"record {record.get('id')}: {record['problem'].count('<image>')} <image> "
                                  f"placeholders but {len(record_images)} images")
        texts.append(prompt_text(processor, record["problem"], record.get("format_prompt", True)))
        flat.extend(record_images)
    batch = processor(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt",
                      images_kwargs={"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}})
    batch = dict(batch)
    batch["images_per_sample"] = torch.tensor([len(x) for x in images], dtype=torch.long)
    if "mm_token_type_ids" not in batch:
        batch["mm_token_type_ids"] = (batch["input_ids"] == processor.image_token_id).long()
    return batch


def encode_responses(tokenizer, responses):
    """Right-padded response ids [B, R] ending in <|im_end|> (the end of the assistant turn) and their mask."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in responses]
    width = max(len(x) for x in ids)
    completion_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        completion_ids[i, :len(row)] = torch.tensor(row)
        completion_mask[i, :len(row)] = 1
    return completion_ids, completion_mask


def select_samples(batch, index):
    """Rows `index` (a 1-D LongTensor) of a prompt batch from `encode_prompts`, with their images' pixel rows.
    The index arithmetic runs on the CPU (images_per_sample stays there); the tensors keep their device."""
    index = index.cpu()
    out = {key: batch[key][index.to(batch[key].device)]
           for key in ("input_ids", "attention_mask", "mm_token_type_ids", "images_per_sample")}
    if "pixel_values" not in batch:
        return out
    images = batch["images_per_sample"].cpu()                                    # [B]
    patches = batch["image_grid_thw"].prod(-1).cpu()                             # [I] pixel rows per image
    image_start = torch.cumsum(images, 0) - images                               # [B]
    patch_start = torch.cumsum(patches, 0) - patches                             # [I]
    taken_images = images[index]                                                 # [b]
    image_rows = (torch.repeat_interleave(image_start[index] - torch.cumsum(taken_images, 0) + taken_images,
                                          taken_images) + torch.arange(int(taken_images.sum())))   # [i] images kept
    taken_patches = patches[image_rows]                                          # [i]
    patch_rows = (torch.repeat_interleave(patch_start[image_rows] - torch.cumsum(taken_patches, 0) + taken_patches,
                                          taken_patches) + torch.arange(int(taken_patches.sum())))  # [p]
    out["image_grid_thw"] = batch["image_grid_thw"][image_rows.to(batch["image_grid_thw"].device)]      # [i, 3]
    out["pixel_values"] = batch["pixel_values"][patch_rows.to(batch["pixel_values"].device)]            # [p, C]
    return out


def _trim_left_padding(batch):
    """The columns that are padding in every row cut off (prompts are left-padded)."""
    first = int(batch["attention_mask"].any(0).long().argmax())
    return {**batch, **{key: batch[key][:, first:] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}}


def _model_inputs(batch):
    return {key: batch[key] for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                        "image_grid_thw") if key in batch}

# ---------------------------------------------------------------------------------------------------------------------
# Rollouts: the policy gathered once, n responses per prompt

def fsdp_method(model, name):
    """`model.<name>` of a sharded model, registered once as an FSDP forward method. FSDP2 gathers the root's own
    parameters (embeddings, lm_head, norms, patch embed, merger) only around `forward`; any other entry point must
    be registered (generate fails with "mixed torch.Tensor and DTensor" otherwise, huggingface/trl#4550). Registering
    twice would gather twice, so remember it."""
    registered = model.__dict__.setdefault("_grpo_fsdp_methods", set())
    if name not in registered:
        register_fsdp_forward_method(model, name)
        registered.add(name)
    return getattr(model, name)


@contextlib.contextmanager
def gathered(model):
    """Under FSDP2: all-gather every layer once, keep it through any number of forwards, reshard at the end.

    Generating with per-layer resharding all-gathers every layer for every new token: 4.8 GB per token per rank
    for Qwen2.5-VL-3B in bf16 (11.5 GB for 7B), ~70 ms a token for 7B on 8 GPUs, ~150 s of a step's 2,048 tokens.
    Gathered once, the full bf16 weights stay resident meanwhile (7.5 GB for 3B, 16.6 GB for 7B, 8.9 GB for
    Qwen3-VL-4B) and decoding makes no collective call at all, so ranks need no `synced_gpus` lockstep and may run
    different numbers of generate calls and tokens. No-grad forwards only: a backward would reduce-scatter per
    micro-batch anyway. Not sharded, or gathered already (the contexts nest): nothing to do."""
    if not isinstance(model, FSDPModule) or model.__dict__.get("_grpo_gathered"):
        yield model
        return
    model._grpo_gathered = True
    modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    model.set_reshard_after_forward(False)
    handles = [module.unshard(async_op=True) for module in modules]
    for handle in handles:
        if handle is not None:
            handle.wait()
    try:
        yield model
    finally:
        model._grpo_gathered = False
        for module in modules:
            module.reshard()
        # back to FSDP's defaults: layers reshard after forward; the root does not (its parameters, embeddings and
        # lm_head, are needed again at once by the backward)
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)


@dataclasses.dataclass
class Rollouts:
    """A rank's rollouts: the prompt batch of `encode_prompts` ([B, P] left-padded, with its images) and n
    responses per prompt (response i * n + j answers prompt i), right-padded, with their mask."""
    prompts: dict
    completion_ids: torch.Tensor       # [B*n, R]
    completion_mask: torch.Tensor      # [B*n, R]
    n: int


def kv_bytes_per_token(config, bytes_per_value=2):
    """Bytes of KV cache one token takes in the language model: K and V x layers x kv heads x head dim x bf16.
    qwen2.5-vl-3b 36 x 2 x 128: 36.9 KB; qwen2.5-vl-7b 28 x 4 x 128: 57.3 KB; qwen3-vl-4b 36 x 8 x 128: 147.5 KB."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * bytes_per_value


def _sampling_kwargs(model, max_new_tokens, temperature, top_p, eos_ids, pad_token_id):
    """Every sampling knob passed explicitly: unset ones would come from the checkpoint's generation_config (Qwen's:
    top_k 1, repetition_penalty 1.05) or transformers' top_k 50. temperature 0 decodes greedily."""
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=None, typical_p=1.0)
                if temperature > 0 else dict(do_sample=False))
    # a sampled <|image_pad|> would be taken for an image slot by every later forward ("Image features and image
    # tokens do not match"); an untrained policy does sample it, so the vision tokens are never generated
    vision_ids = [getattr(model.config, name, None) for name in
                  ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")]
    return dict(**sampling, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, num_return_sequences=1,
                min_new_tokens=0, suppress_tokens=[token for token in vision_ids if token is not None],
                max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_token_id, use_cache=True,
                synced_gpus=False)   # gathered once (`gathered`): decoding makes no collective call


def _sample(model, prompts, n, shared, kwargs):
    """n responses [b*n, r] to each prompt of a (left-padded) micro-batch, the model gathered: `generate` is not
    registered as an FSDP forward method (its nested forwards would leave the root resharded after the call)."""
    prompt_len = prompts["input_ids"].shape[1]
    if not shared or n == 1:
        repeated = select_samples(prompts, torch.arange(prompts["input_ids"].shape[0]).repeat_interleave(n))
        return model.generate(**_model_inputs(repeated), **kwargs)[:, prompt_len:]
    # the prompt once (its images through the vision tower, its prefill), then its KV cache copied n times. The
    # prefill stops one token short: generate then feeds the last prompt token itself and samples from its logits.
    # Only the last position's logits are made (logits_to_keep): [b, P, 151,936] in bf16 would be 2.4 GB per 8k tokens.
    head = {key: prompts[key][:, :-1] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    images = {key: prompts[key] for key in ("pixel_values", "image_grid_thw") if key in prompts}
    core = model.model
    core.rope_deltas = None     # the prefill sets it (M-RoPE offset of the text after the images); none without images
    cache = model(**head, **images, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(n)
    deltas = core.rope_deltas if core.rope_deltas is not None else torch.zeros(len(head["input_ids"]), 1).long()
    core.rope_deltas = deltas.to(head["input_ids"].device).repeat_interleave(n, 0)
    repeated = {key: prompts[key].repeat_interleave(n, 0) for key in head}
    return model.generate(**repeated, cache=cache, **kwargs)[:, prompt_len:]


class SeededSampler:
    """A transformers logits processor that samples each row from its own generator, seeded by a string: the row's
    tokens then depend on its seed and its own logits, whatever else shares the batch (up to the last bits of
    the logits, which the batch's padding can move). Softmax at `temperature`, nucleus `top_p`, then the inverse
    CDF at the row's next uniform draw; the scores returned are 0 at the drawn token and -inf elsewhere, so that
    generate's greedy pick takes it."""

    def __init__(self, seeds, temperature, top_p=1.0):
        self.seeds = [random.Random(seed).getrandbits(63) for seed in seeds]
        self.temperature, self.top_p, self.generators = temperature, top_p, None

    def __call__(self, input_ids, scores):
        if self.generators is None:
            self.generators = [torch.Generator(scores.device).manual_seed(seed) for seed in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, -1)                          # [rows, V]
        if self.top_p < 1.0:
            ordered, order = probs.sort(-1, descending=True)
            outside = ordered.cumsum(-1) - ordered > self.top_p                               # [rows, V]
            probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
        draws = torch.stack([torch.rand((), generator=g, device=scores.device) for g in self.generators])  # [rows]
        cumulative = probs.cumsum(-1)                                                         # [rows, V]
        tokens = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True)   # [rows, 1]
        tokens = tokens.clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, tokens, 0.0)


@torch.no_grad()
def generate_completions(model, batch, n, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id,
                         micro_batch_size=None, shared_prompt=True, seeds=None):
    """n responses per prompt -> completion_ids [B*n, R] right-padded with pad_token_id, completion_mask [B*n, R]
    (1 up to and including the first EOS), truncated [B*n] (no EOS within max_new_tokens).

    Prompts go `micro_batch_size` at a time (with their n responses), longest first, so that each call pads to
    similar lengths: the KV cache and the prefill's activations are bounded by the micro-batch, not the batch.
    A sharded model is gathered once for the whole call (or by the caller's `gathered`).
    `seeds` (one per prompt; evaluation): response j of prompt i is drawn by its own generator seeded by
    (seeds[i], j) (`SeededSampler`), so it does not depend on which prompts share the batch or the rank, and the
    global RNG is not touched."""
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    seeded = seeds is not None and temperature > 0
    kwargs = _sampling_kwargs(model, max_new_tokens, 0.0 if seeded else temperature, top_p, eos_ids, pad_token_id)
    lengths = batch["attention_mask"].sum(1).cpu()                                            # [B]
    order = torch.argsort(lengths, descending=True, stable=True)                              # [B]
    pieces = []
    with gathered(model):
        for chunk in order.split(micro_batch_size or len(order)):
            prompts = _trim_left_padding(select_samples(batch, chunk))
            if seeded:
                row_seeds = [f"{seeds[p]}:{j}" for p in chunk.tolist() for j in range(n)]
                kwargs["logits_processor"] = [SeededSampler(row_seeds, temperature, top_p)]
            ids = _sample(model, prompts, n, shared_prompt, kwargs)                           # [b*n, r]
            # mask per call, before padding to a common width: the pad id may be an EOS id (Qwen's <|endoftext|>)
            is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))                # [b*n, r]
            after_eos = (torch.cumsum(is_eos, 1) - is_eos.long()) > 0                         # [b*n, r]
            rows = (chunk[:, None] * n + torch.arange(n)).reshape(-1)                         # [b*n]
            pieces.append((rows, ids.masked_fill(after_eos, pad_token_id), (~after_eos).long(), ~is_eos.any(1)))
    width = max(ids.shape[1] for _, ids, _, _ in pieces)
    device = batch["input_ids"].device
    completion_ids = torch.full((len(order) * n, width), pad_token_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros_like(completion_ids)
    truncated = torch.zeros(len(order) * n, dtype=torch.bool, device=device)
    for rows, ids, mask, cut in pieces:
        rows = rows.to(device)
        completion_ids[rows, :ids.shape[1]] = ids
        completion_mask[rows, :ids.shape[1]] = mask
        truncated[rows] = cut
    return completion_ids, completion_mask, truncated

# ---------------------------------------------------------------------------------------------------------------------
# Packed passes: what a log-prob pass feeds the model, and where each response token's log-prob comes from

def pass_rows(rollouts, shared, prompts=None):
    """The rows of a pass over `prompts` (a range of prompt indices; all by default), as (prompt, [sequences])
    pairs, and each row's length in tokens: one row per group [prompt, r_1..r_n] when shared, else one row per
    response [prompt, r_j]."""
    prompts = range(rollouts.prompts["input_ids"].shape[0]) if prompts is None else prompts
    n = rollouts.n
    rows = ([(p, list(range(p * n, (p + 1) * n))) for p in prompts] if shared else
            [(p, [p * n + j]) for p in prompts for j in range(n)])
    prompt_len = rollouts.prompts["attention_mask"].sum(1).tolist()
    response_len = rollouts.completion_mask.sum(1).tolist()
    return rows, [prompt_len[p] + sum(response_len[s] for s in sequences) for p, sequences in rows]


def micro_batches(lengths, max_tokens):
    """Row indices in micro-batches of at most `max_tokens` padded tokens (rows x longest row), longest rows first
    so that each micro-batch pads to similar lengths; a row longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pack(model, rollouts, rows):
    """Model inputs for `rows` and where each response token's log-prob is read.

    A row is a prompt (its padding removed) followed by one or more of its responses, right-padded (with token 0,
    never attended) to the longest row. One response per row is the stock path: a 2-D padding mask, and the model
    computes its M-RoPE positions. Several (shared prompt): the mask is 4-D, True where query q may see key k:
        k <= q  and  (k in the prompt  or  k in q's own response)
    (padding queries see the prompt and earlier padding: a fully masked query row would give NaN in SDPA), and the
    positions are explicit: the prompt's own 3-D M-RoPE positions, then each response from the prompt's next
    position, as if it followed the prompt alone. 3-D positions also keep transformers from reading the row as
    packed sequences (it would cut it where positions stop increasing). Response token t of a row's response is
    predicted by the hidden state before it: the prompt's last token for t = 0, its own token t - 1 after.

    Returns (inputs, where): where = (row [N], column [N]) of each predicting hidden state, targets [N] and the
    token's (sequence [N], position in its response [N]) in the rollouts' [B*n, R] layout."""
    batch, n_rows = rollouts.prompts, len(rows)
    device = batch["input_ids"].device
    prompt_mask = batch["attention_mask"].bool().cpu()                                       # [B, P]
    prompt_ids, prompt_types = batch["input_ids"].cpu(), batch["mm_token_type_ids"].cpu()    # [B, P]
    completion_ids = rollouts.completion_ids.cpu()                                           # [S, R]
    response_len = rollouts.completion_mask.sum(1).tolist()
    prompt_len = prompt_mask.sum(1).tolist()
    width = max(prompt_len[p] + sum(response_len[s] for s in sequences) for p, sequences in rows)
    input_ids = torch.zeros((n_rows, width), dtype=torch.long)                               # [rows, L]
    token_types = torch.zeros((n_rows, width), dtype=prompt_types.dtype)                     # [rows, L]
    segment = torch.full((n_rows, width), -1, dtype=torch.long)  # 0 prompt, j response j, -1 padding
    shared = any(len(sequences) > 1 for _, sequences in rows)
    index = torch.tensor([p for p, _ in rows])
    images = select_samples(batch, index)           # the rows' prompts, their images once per row, in row order
    if shared:   # the prompts' own M-RoPE positions [3, rows, P] (left-padded like the prompt batch)
        prompt_positions, _ = model.model.get_rope_index(
            images["input_ids"], images["mm_token_type_ids"], image_grid_thw=images.get("image_grid_thw"),
            attention_mask=images["attention_mask"])
        prompt_positions = prompt_positions.cpu()
        positions = torch.zeros((3, n_rows, width), dtype=torch.long)                        # [3, rows, L]
    where_row, where_col, targets, sequence_of, token_of = [], [], [], [], []
    for r, (p, sequences) in enumerate(rows):
        length = prompt_len[p]
        input_ids[r, :length] = prompt_ids[p][prompt_mask[p]]
        token_types[r, :length] = prompt_types[p][prompt_mask[p]]
        segment[r, :length] = 0
        if shared:
            own = prompt_positions[:, r][:, prompt_mask[p]]                                  # [3, Lp]
            positions[:, r, :length] = own
            next_position = int(own.max()) + 1
        start = length
        for j, s in enumerate(sequences, 1):
            tokens = response_len[s]
            if not tokens:
                continue
            input_ids[r, start:start + tokens] = completion_ids[s, :tokens]
            segment[r, start:start + tokens] = j
            if shared:
                positions[:, r, start:start + tokens] = next_position + torch.arange(tokens)
            where_col.append(torch.cat([torch.tensor([length - 1]), torch.arange(start, start + tokens - 1)]))
            where_row.append(torch.full((tokens,), r))
            targets.append(completion_ids[s, :tokens])
            sequence_of.append(torch.full((tokens,), s))
            token_of.append(torch.arange(tokens))
            start += tokens
    inputs = {"input_ids": input_ids.to(device), "mm_token_type_ids": token_types.to(device)}
    inputs.update({key: images[key] for key in ("pixel_values", "image_grid_thw") if key in images})
    if shared:
        query, key = segment[:, :, None], segment[:, None, :]                                # [rows, L, L] below
        causal = torch.ones(width, width, dtype=torch.bool).tril()                           # [L, L]
        inputs["attention_mask"] = (causal & ((key == 0) | (key == query)))[:, None].to(device)   # [rows, 1, L, L]
        inputs["position_ids"] = positions.to(device)                                        # [3, rows, L]
    else:
        inputs["attention_mask"] = (segment >= 0).long().to(device)                          # [rows, L]
    def cat(parts):
        return torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.long, device=device)
    where = {"row": cat(where_row), "column": cat(where_col), "target": cat(targets), "sequence": cat(sequence_of),
             "token": cat(token_of)}
    return inputs, where


def _packed_logprobs(model, inputs, where, temperature, return_entropy):
    hidden = model.model(**inputs, use_cache=False).last_hidden_state                        # [rows, L, D]
    weight = model.get_output_embeddings().weight                                            # [V, D]
    hidden = hidden[where["row"], where["column"]].to(weight.dtype)                          # [N, D]
    return fused_logprobs(hidden, weight, where["target"], temperature=temperature, return_entropy=return_entropy,
                          impl=LOGPROBS_IMPL)


def packed_logprobs(model, inputs, where, temperature=1.0, return_entropy=False):
    """log pi(token) [N] (fp32) of the response tokens located by `pack`, and their entropy [N] if asked: the
    model's hidden states, then kernels.fused_logprobs on response rows only (no [tokens x vocab] logits).
    Temperature divides the logits. Under FSDP2 the root's parameters (lm_head) are gathered around the call."""
    if isinstance(model, FSDPModule):
        if "_grpo_packed_logprobs" not in model.__dict__:
            model._grpo_packed_logprobs = types.MethodType(_packed_logprobs, model)
        return fsdp_method(model, "_grpo_packed_logprobs")(inputs, where, temperature, return_entropy)
    return _packed_logprobs(model, inputs, where, temperature, return_entropy)


def response_logprobs(model, prompts, completion_ids, completion_mask, temperature=1.0, return_entropy=False):
    """log pi(token) [B, R] (0 at padding) of one given response per prompt, and the entropy [B, R] if asked: one
    pass of the stock path (the SFT loss, tests). Under FSDP2 call it the same way on every rank."""
    rollouts = Rollouts(prompts, completion_ids, completion_mask, 1)
    inputs, where = pack(model, rollouts, pass_rows(rollouts, shared=False)[0])
    values = packed_logprobs(model, inputs, where, temperature, return_entropy)
    logp, entropy = values if return_entropy else (values, None)
    dense = []
    for value in (logp, entropy):
        if value is not None:
            out = torch.zeros(completion_mask.shape, dtype=value.dtype, device=value.device)        # [B, R]
            dense.append(out.index_put((where["sequence"], where["token"]), value))
    return tuple(dense) if return_entropy else dense[0]


@torch.no_grad()
def rollout_logprobs(model, rollouts, shared, max_tokens, temperature=1.0):
    """log-probs [B*n, R] (fp32, 0 at padding) of every response token under `model`, without gradient, in
    micro-batches of at most `max_tokens` padded tokens; the model gathered once if sharded."""
    logp = torch.zeros(rollouts.completion_mask.shape, dtype=torch.float32, device=rollouts.completion_mask.device)
    rows, lengths = pass_rows(rollouts, shared)
    with gathered(model):
        for micro in micro_batches(lengths, max_tokens):
            inputs, where = pack(model, rollouts, [rows[i] for i in micro])
            logp[where["sequence"], where["token"]] = packed_logprobs(model, inputs, where, temperature).float()
    return logp

# ---------------------------------------------------------------------------------------------------------------------
# The update

def all_reduce(values, op=dist.ReduceOp.SUM, device=None):
    """`values` reduced over ranks: a tensor (in place, and returned), or a list of floats (reduced in float64 on
    `device`, returned as a list). Without a process group, unchanged."""
    tensor = values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor if torch.is_tensor(values) else tensor.tolist()


def _world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def _clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def update_policy(policy, optimizer, rollouts, old_logp, ref_logp, advantages, cfg):
    """`cfg.updates_per_step` optimizer updates on the rollouts, each on a contiguous mini-batch of prompts (whole
    groups), split into micro-batches of at most cfg.max_tokens_per_micro_batch padded tokens.
    old_logp (or ref_logp) None means "the policy's own log-probs, detached": exact for a single on-policy update.
    A non-finite loss or gradient norm (on any rank) skips that update; returns averaged metrics and counts."""
    world = _world_size()
    device = rollouts.completion_mask.device
    prompts = rollouts.prompts["input_ids"].shape[0]
    mini_size = math.ceil(prompts / cfg.updates_per_step)
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    sums, updates, skipped, grad_norms = defaultdict(float), 0, 0, []
    for mini_start in range(0, prompts, mini_size):
        mini_prompts = range(mini_start, min(mini_start + mini_size, prompts))
        rows, lengths = pass_rows(rollouts, cfg.shared_prompt, mini_prompts)
        micro = micro_batches(lengths, cfg.max_tokens_per_micro_batch)
        sequences = slice(mini_start * rollouts.n, mini_prompts.stop * rollouts.n)
        global_tokens = all_reduce(rollouts.completion_mask[sequences].sum().double())
        # every rank runs as many micro-batches as the rank that needs most (FSDP gathers per layer in each):
        # extra ones repeat the last with weight 0
        passes = int(all_reduce(torch.tensor(len(micro), device=device), dist.ReduceOp.MAX))
        weights = [1.0] * len(micro) + [0.0] * (passes - len(micro))
        micro = micro + [micro[-1]] * (passes - len(micro))
        total_tokens = float(global_tokens) / world      # ranks average gradients: each divides by its share
        mini = defaultdict(lambda: torch.zeros((), device=device))
        for part, weight in zip(micro, weights):
            inputs, where = pack(policy, rollouts, [rows[i] for i in part])
            logp, entropy = packed_logprobs(policy, inputs, where, temperature, return_entropy=True)   # [N]
            at = (where["sequence"], where["token"])
            old = logp.detach() if old_logp is None else old_logp[at]                        # [N]
            ref = logp.detach() if ref_logp is None else ref_logp[at]                        # [N]
            loss, metrics = policy_loss(logp, old, ref, advantages[where["sequence"]], torch.ones_like(logp),
                                        total_tokens, cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.kl_coef)
            (loss * weight).backward()
            mini["loss"] += loss.detach() * weight
            mini["entropy"] += entropy.detach().sum() / total_tokens * weight
            for key, value in metrics.items():
                mini[key] += value * weight
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad],
                                                   cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        values = all_reduce(torch.stack(list(mini.values())).float()) / world
        finite = torch.isfinite(values[0]) & torch.isfinite(grad_norm)
        if bool(finite):
            optimizer.step()
            updates += 1
            grad_norms.append(float(grad_norm))
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        for key, value in zip(mini.keys(), values.tolist()):
            sums[key] += value
    metrics = {key: value / (updates + skipped) for key, value in sums.items()}
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    metrics["num_updates"] = updates
    metrics["num_skipped_updates"] = skipped
    return metrics

# ---------------------------------------------------------------------------------------------------------------------
# One step

def grpo_step(policy, reference, optimizer, batch, answers, tasks, tokenizer, cfg):
    """One GRPO step on this rank's prompts (a batch from `encode_prompts`; answers and task names per prompt).
    Returns (metrics over all ranks, this rank's rollout records); writes nothing."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)                   # a processor works too
    n, device = cfg.num_generations, batch["input_ids"].device
    if dist.is_initialized():
        counts = torch.tensor([len(answers), -len(answers)], device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if int(counts[0]) != -int(counts[1]):
            raise ValueError(f"every rank must pass the same number of prompts (got {-int(counts[1])} to "
                             f"{int(counts[0])}): sharded passes are collective")
    eos_ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    eos_ids |= set([generation_eos] if isinstance(generation_eos, int) else generation_eos or [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    was_training = policy.training
    policy.eval()

    times = {"start": _clock(device)}
    with gathered(policy):   # one all-gather for the rollouts and the old log-probs
        # 1. n responses per prompt
        completion_ids, completion_mask, truncated = generate_completions(
            policy, batch, n, cfg.max_new_tokens, cfg.temperature, cfg.top_p, sorted(eos_ids - {None}), pad_id,
            cfg.rollout_micro_batch_size, cfg.shared_prompt)
        times["generated"] = _clock(device)
        # 2. rewards
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        scores = [task_reward(text, answers[i // n]) for i, text in enumerate(texts)]
        rewards = torch.tensor([score["overall"] for score in scores], dtype=torch.float32, device=device)  # [B*n]
        # 3. group advantages
        advantages = group_advantages(rewards, n)                                            # [B*n]
        times["rewarded"] = _clock(device)
        # 4. old and reference log-probs. One update per step is on-policy: the old log-probs are the update's own,
        # detached (TRL does the same with num_iterations 1), which saves a pass; with more updates the later ones
        # need the rollout policy's
        rollouts = Rollouts(batch, completion_ids, completion_mask, n)
        old_logp = (rollout_logprobs(policy, rollouts, cfg.shared_prompt, cfg.max_tokens_per_micro_batch,
                                     temperature) if cfg.updates_per_step > 1 else None)     # [B*n, R]
    ref_logp = (rollout_logprobs(reference, rollouts, cfg.shared_prompt, cfg.max_tokens_per_micro_batch,
                                 temperature) if cfg.kl_coef > 0 else None)                  # [B*n, R]
    times["scored"] = _clock(device)
    # 5. the updates
    policy.train()
    update_metrics = update_policy(policy, optimizer, rollouts, old_logp, ref_logp, advantages, cfg)
    policy.train(was_training)
    times["updated"] = _clock(device)

    metrics = _step_metrics(scores, tasks, rewards, completion_mask, truncated, texts, batch, n, times)
    metrics.update(update_metrics, shared_prompt=float(cfg.shared_prompt))
    prompt_texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    lengths = completion_mask.sum(1)                                                          # [B*n]
    records = [{"index": i // n, "sample": i % n, "task": tasks[i // n], "prompt": prompt_texts[i // n],
                "completion": text, "answer": answers[i // n], "parsed": extract_boxed(text),
                "reward": score["overall"], "accuracy": score["accuracy"], "format": score["format"],
                "advantage": float(advantages[i]), "length": int(lengths[i]), "truncated": bool(truncated[i])}
               for i, (text, score) in enumerate(zip(texts, scores))]
    return metrics, records


def _step_metrics(scores, tasks, rewards, completion_mask, truncated, texts, batch, n, times):
    """The step's figures over all ranks, under TRL's names where TRL has one (reward, reward_std,
    frac_reward_zero_std, completions/...), per task too; sums on this rank first, then over ranks."""
    lengths = completion_mask.sum(1)                                                          # [B*n]
    grouped = rewards.view(-1, n)                                                            # [B, n]
    local = defaultdict(float)
    for i, score in enumerate(scores):
        task = tasks[i // n]
        local[f"count/{task}"] += 1
        for key in ("overall", "accuracy", "format"):
            local[f"sum/{key}/{task}"] += score[key]
    local["sequences"] = len(scores)
    local["groups"] = grouped.shape[0]
    local["groups_zero_std"] = float((grouped.amax(1) == grouped.amin(1)).sum())
    local["sum/reward_std"] = float(grouped.std(1).sum())
    local["sum/length"] = float(lengths.sum())
    local["sum/terminated_length"] = float(lengths[~truncated].sum())
    local["terminated"] = float((~truncated).sum())
    local["truncated"] = float(truncated.sum())
    local["empty"] = float(sum(text.strip() == "" for text in texts))
    local["max/length"] = float(lengths.max())
    local["max/neg_min_length"] = -float(lengths.min())
    # tokens a step covers, counted the same way on either path: each response with its own prompt
    local["tokens"] = float(batch["attention_mask"].sum() * n + lengths.sum())
    total = _gather_sums(dict(local))

    task_names = sorted(key.split("/", 1)[1] for key in total if key.startswith("count/"))
    count = total["sequences"]
    step_time = times["updated"] - times["start"]
    metrics = {
        "reward": sum(total[f"sum/overall/{t}"] for t in task_names) / count,
        "reward_std": total["sum/reward_std"] / total["groups"],
        "accuracy": sum(total[f"sum/accuracy/{t}"] for t in task_names) / count,
        "format": sum(total[f"sum/format/{t}"] for t in task_names) / count,
        "frac_reward_zero_std": total["groups_zero_std"] / total["groups"],
        "completions/mean_length": total["sum/length"] / count,
        "completions/max_length": total["max/length"],
        "completions/min_length": -total["max/neg_min_length"],
        "completions/mean_terminated_length": total["sum/terminated_length"] / max(total["terminated"], 1),
        "completions/clipped_ratio": total["truncated"] / count,
        "completions/num_truncated": total["truncated"],
        "completions/num_empty": total["empty"],
        "tokens_per_second": total["tokens"] / step_time,
        "time/generate": times["generated"] - times["start"],
        "time/reward": times["rewarded"] - times["generated"],
        "time/logprobs": times["scored"] - times["rewarded"],
        "time/update": times["updated"] - times["scored"],
        "time/step": step_time,
    }
    for task in task_names:
        task_count = total[f"count/{task}"]
        metrics[f"reward/{task}"] = total[f"sum/overall/{task}"] / task_count
        metrics[f"accuracy/{task}"] = total[f"sum/accuracy/{task}"] / task_count
        metrics[f"format/{task}"] = total[f"sum/format/{task}"] / task_count
    return metrics


def _gather_sums(local):
    """Combine per-rank dicts of sums ('max/...' keys take the max) into global ones."""
    if not dist.is_initialized():
        return dict(local)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    combined = {}
    for part in parts:
        for key, value in part.items():
            combined[key] = (max(combined.get(key, value), value) if key.startswith("max/")
                             else combined.get(key, 0) + value)
    return combined
