"""GRPO as the paper's released code (EasyR1) computes it: the loss, prompt batches, rollouts, passes, one step.
Not here: the tasks, data and reward (tasks.py); models, flags, the SFT and GRPO loops, evaluation and checkpoints
(ssrl.py, which imports this file; this file never imports it).

One call of `grpo_step` does one step for this rank's prompts (a batch from `encode_prompts`):
  1. n responses per prompt (`generate_completions`) on the rollout engine (`engine_generate`): each prompt
     prefilled once (its images included) and held once in a KV cache allocated once, its n samples decoding
     against it; a sample that ends frees its slot for the next prompt at once. `rollout_engine="hf"`: transformers'
     `generate`, a micro-batch of prompts per call, each prompt's prefill run once and its KV cache copied n times
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
Departures from EasyR1: one model (the stock transformers one, no vLLM) samples and scores, so old log-probs only
differ from the sampler's by numerics; mini-batches are whole prompts' groups (no `_balance_batch` reordering);
vision tokens (<|image_pad|> etc.) are never sampled, since a later forward would take a sampled one for an image
slot.

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
import os
import random
import time
import types
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kernels import fused_logprobs
from tasks import BadRecord, extract_boxed, make_prompt, reward as task_reward


# kernels.fused_logprobs path of every log-prob pass (SFT, old, reference, policy): None picks by device (Triton on
# CUDA, the chunked PyTorch fallback on a CPU); "torch", "triton" or "reference" force one. "reference" materialises
# [tokens x vocab] logits: bench/grpo.py sets it to time the step with the fused log-probs off; the environment
# variable SSRL_LOGPROBS_IMPL sets it for a whole run (bench/gpu_check.py, where Triton cannot build its launcher).
LOGPROBS_IMPL = os.environ.get("SSRL_LOGPROBS_IMPL") or None


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
    rollout_engine: str = "ssrl"      # "ssrl" (engine_generate) or "hf" (transformers' generate, the reference)
    rollout_micro_batch_size: int = 8  # prompts in flight, n slots each (hf: prompts per generate call)
    auto_rollout_micro_batch: bool = False  # on CUDA, as many as fit free memory (memory_micro_batch); else the above
    compile_decode: bool = False      # the engine's decode step replayed as a captured CUDA graph (CUDA only)
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
    """The model's inputs of a prompt batch, on the device of its token ids: a step's pixels stay on the host
    (ssrl.to_device) and come to the device one micro-batch at a time."""
    device = batch["input_ids"].device
    return {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                   "pixel_values", "image_grid_thw") if key in batch}

# ---------------------------------------------------------------------------------------------------------------------
# Rollouts: the policy gathered once, n responses per prompt, sampled the same way on either engine

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


def _kv_shape(config):
    """(layers, kv heads, head dim) of the language model's KV cache."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, text.num_key_value_heads, head_dim


def kv_bytes_per_token(config, bytes_per_value=2):
    """Bytes of KV cache one token takes in the language model: K and V x layers x kv heads x head dim x bf16.
    qwen2.5-vl-3b 36 x 2 x 128: 36.9 KB; qwen2.5-vl-7b 28 x 4 x 128: 57.3 KB; qwen3-vl-4b 36 x 8 x 128: 147.5 KB."""
    layers, kv_heads, head_dim = _kv_shape(config)
    return 2 * layers * kv_heads * head_dim * bytes_per_value


def vision_token_ids(model):
    """Ids that are never sampled: a sampled <|image_pad|> would be taken for an image slot by every later forward
    ("Image features and image tokens do not match"), and an untrained policy does sample it."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [token for token in (getattr(model.config, name, None) for name in names) if token is not None]


def prompt_uniforms(seeds, n, max_new_tokens, device):
    """The uniforms in [0, 1) that sampling inverts, [len(seeds) * n, T] fp64: row i * n + j is sample j of prompt
    i, and its token t takes column t. Each prompt's n x T come from its own generator, seeded by 63 bits of
    Python's Random(seeds[i]) (an int or a string; Random hashes a string the same in every process, where hash()
    is salted), so a sample depends on its prompt's seed only: not on the slot, step, call, rank or engine that
    decodes it, nor on what else is in flight."""
    return torch.cat([torch.rand((n, max_new_tokens), dtype=torch.float64, device=device,
                                 generator=torch.Generator(device).manual_seed(random.Random(seed).getrandbits(63)))
                      for seed in seeds])                                                     # [k*n, T]


def sample_tokens(logits, temperature, top_p, suppress, uniforms):
    """One token per row of logits [S, V] and its log-prob [S] under the policy at `temperature` (before the vision
    tokens are suppressed and before top-p: what the training passes recompute). temperature 0: the argmax.

    Otherwise the warpers of transformers' sampling in its order (suppress, temperature, top-p: the smallest set of
    most likely tokens holding top_p of the mass, as TopPLogitsWarper keeps it), then the inverse of the cumulative
    distribution at a uniform u per row (`uniforms` [S], from prompt_uniforms): the first token whose cumulative
    mass exceeds u x total, which is token i with probability p_i exactly. The cumulative sums run in fp64, so a
    token's share is off by ~1e-16, not fp32's ~1e-7 x V."""
    logits = logits.float()                                                                  # [S, V]
    scaled = logits / temperature if temperature > 0 else logits                              # [S, V]
    logprobs = torch.log_softmax(scaled, -1)                                                  # [S, V]
    allowed = scaled.index_fill(1, suppress, -math.inf)                                       # [S, V]
    if temperature <= 0:
        tokens = allowed.argmax(-1)                                                           # [S]
    else:
        probs = torch.softmax(allowed, -1)                                                    # [S, V]
        order = None
        if top_p < 1:
            probs, order = probs.sort(-1, descending=True)                                    # [S, V]
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)                 # [S, V]
        cumulative = probs.double().cumsum(-1)                                                # [S, V]
        total = cumulative[:, -1]                                                             # [S]
        # u x total < total, so the chosen token has p > 0 (its cumulative mass exceeds its predecessor's)
        target = torch.minimum(uniforms.double() * total, torch.nextafter(total, torch.zeros_like(total)))  # [S]
        tokens = torch.searchsorted(cumulative, target[:, None], right=True)[:, 0]            # [S]
        if order is not None:
            tokens = order.gather(1, tokens[:, None])[:, 0]                                   # [S]
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


@torch.no_grad()
def generate_completions(model, batch, n, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id,
                         micro_batch_size=None, shared_prompt=True, seeds=None, engine="ssrl", compile_decode=False,
                         max_prefill_tokens=16384):
    """n responses per prompt -> completion_ids [B*n, R] right-padded with pad_token_id, completion_mask [B*n, R]
    (1 up to and including the first EOS), truncated [B*n] (no EOS within max_new_tokens).

    engine "ssrl" (`engine_generate`): `micro_batch_size` prompts in flight, n slots each, refilled as samples end,
    each prompt held once in the KV cache, prefills of at most `max_prefill_tokens` padded tokens. engine "hf"
    (transformers' `generate`, the reference): `micro_batch_size` prompts per call, longest first, so that each
    call pads to similar lengths (with `shared_prompt`, one prefill per prompt whose cache is copied n times).
    Either way the KV cache and the prefill's activations are bounded by the micro-batch, not the batch (None: all
    prompts at once). A sharded model is gathered once for the whole call (or by the caller's `gathered`).

    Sampling (temperature > 0) is the same on both engines: sample j of prompt i inverts the uniforms of its
    prompt's own generator (prompt_uniforms, seeded by seeds[i]; a seed per prompt drawn from torch's global
    generator when `seeds` is None) through sample_tokens. A seed then gives the same samples whichever prompts
    share the call, whichever rank or engine decodes them, up to the logits' last bits."""
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if temperature > 0 and seeds is None:
        seeds = torch.randint(0, 2 ** 62, (batch["input_ids"].shape[0],)).tolist()
    if engine == "ssrl":
        out = engine_generate(model, batch, n, max_new_tokens, temperature, top_p, eos_ids, pad_token_id,
                              micro_batch_size, seeds, max_prefill_tokens, compile_decode)
        return out.completion_ids, out.completion_mask, out.truncated
    if engine != "hf":
        raise ValueError(f"unknown rollout engine {engine!r} (ssrl or hf)")
    return _generate_hf(model, batch, n, max_new_tokens, temperature, top_p, eos_ids, pad_token_id,
                        micro_batch_size, shared_prompt, seeds)

# ---------------------------------------------------------------------------------------------------------------------
# transformers' generate (--rollout-engine hf): the reference the rollout engine is tested against

def _sampling_kwargs(model, max_new_tokens, eos_ids, pad_token_id):
    """Every knob passed explicitly: unset ones would come from the checkpoint's generation_config (Qwen's: top_k 1,
    repetition_penalty 1.05) or transformers' top_k 50. Greedy: a sampled token is drawn by SeededSampler, which
    leaves generate's argmax nothing else to pick."""
    return dict(do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, num_return_sequences=1,
                min_new_tokens=0, suppress_tokens=vision_token_ids(model), max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids, pad_token_id=pad_token_id, use_cache=True,
                synced_gpus=False)   # gathered once (`gathered`): decoding makes no collective call


class SeededSampler:
    """sample_tokens as a transformers logits processor: row r of a generate call takes column t of `uniforms`
    [rows, T] (prompt_uniforms of the call's prompts) at its t-th new token, as the engine's slot does. The scores
    returned are 0 at the drawn token and -inf elsewhere, so that generate's greedy pick takes it."""

    def __init__(self, uniforms, temperature, top_p, suppress):
        self.uniforms, self.temperature, self.top_p, self.suppress = uniforms, temperature, top_p, suppress
        self.step = 0

    def __call__(self, input_ids, scores):
        tokens, _ = sample_tokens(scores, self.temperature, self.top_p, self.suppress, self.uniforms[:, self.step])
        self.step += 1                                    # generate calls its processors once per new token
        return torch.full_like(scores, -math.inf).scatter_(1, tokens[:, None], 0.0)


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
    images = {key: prompts[key].to(head["input_ids"].device) for key in ("pixel_values", "image_grid_thw")
              if key in prompts}
    core = model.model
    core.rope_deltas = None     # the prefill sets it (M-RoPE offset of the text after the images); none without images
    cache = model(**head, **images, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(n)
    deltas = core.rope_deltas if core.rope_deltas is not None else torch.zeros(len(head["input_ids"]), 1).long()
    core.rope_deltas = deltas.to(head["input_ids"].device).repeat_interleave(n, 0)
    repeated = {key: prompts[key].repeat_interleave(n, 0) for key in head}
    return model.generate(**repeated, cache=cache, **kwargs)[:, prompt_len:]


def _generate_hf(model, batch, n, max_new_tokens, temperature, top_p, eos_ids, pad_token_id, micro_batch_size,
                 shared_prompt, seeds):
    """generate_completions on transformers' generate, `micro_batch_size` prompts per call, longest first."""
    kwargs = _sampling_kwargs(model, max_new_tokens, eos_ids, pad_token_id)
    device = batch["input_ids"].device
    suppress = torch.tensor(vision_token_ids(model), dtype=torch.long, device=device)
    lengths = batch["attention_mask"].sum(1).cpu()                                            # [B]
    order = torch.argsort(lengths, descending=True, stable=True)                              # [B]
    pieces = []
    with gathered(model):
        for chunk in order.split(micro_batch_size or len(order)):
            prompts = _trim_left_padding(select_samples(batch, chunk))
            if temperature > 0:
                uniforms = prompt_uniforms([seeds[p] for p in chunk.tolist()], n, max_new_tokens, device)
                kwargs["logits_processor"] = [SeededSampler(uniforms, temperature, top_p, suppress)]
            ids = _sample(model, prompts, n, shared_prompt, kwargs)                           # [b*n, r]
            # mask per call, before padding to a common width: the pad id may be an EOS id (Qwen's <|endoftext|>)
            is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))                # [b*n, r]
            after_eos = (torch.cumsum(is_eos, 1) - is_eos.long()) > 0                         # [b*n, r]
            rows = (chunk[:, None] * n + torch.arange(n)).reshape(-1)                         # [b*n]
            pieces.append((rows, ids.masked_fill(after_eos, pad_token_id), (~after_eos).long(), ~is_eos.any(1)))
    width = max(ids.shape[1] for _, ids, _, _ in pieces)
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
# Rollout engine: each prompt once in the KV cache, a finished sample's slot refilled at once
#
# The shape of karpathy/nanochat nanochat/engine.py (a KV cache allocated once, a loop feeding one token per row) and
# pytorch-labs/gpt-fast generate.py (a static cache, an optionally captured decode step), with images, M-RoPE and a
# prompt shared by its n samples. The stock model runs every pass: the prefill is its ordinary forward; a decode
# step is its forward on one token per slot with explicit positions and a `rollout` keyword, which transformers
# hands to the attention function registered below under ROLLOUT_ATTENTION.

ROLLOUT_ATTENTION = "ssrl_rollout"


def _attention_part(query, keys, values, bias):
    """softmax(q k^T + bias) v and the log-sum-exp of the scores. query [..., q, d] (already scaled), keys/values
    [..., k, d], bias 0 where a key is visible and -inf where not. lse = m + log sum exp(s - m) with m the row's
    largest score (a row that sees no key: lse -inf and an output of zeros, not 0/0): the exponentials are taken once
    and serve both the output and the log-sum-exp."""
    scores = query @ keys.transpose(-1, -2)                                                   # [..., q, k]
    scores += bias
    peak = scores.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)                              # [..., q, 1]
    weights = scores.sub_(peak).exp_()                                                        # [..., q, k]
    total = weights.sum(-1, keepdim=True)                                                     # [..., q, 1]
    out = (weights @ values).div_(total.clamp_min(torch.finfo(total.dtype).tiny))            # [..., q, d]
    return out, peak + total.log()


class RolloutKV:
    """A rollout's keys and values, allocated once. Per layer:
        prompt_keys / prompt_values  [rows, kv heads, P, d]   one row per prompt, held once for its n samples
        slot_keys / slot_values      [slots, kv heads, T, d]  the response so far of the sample in each slot
    Row 0 stays empty: free slots point at it. Tokens held: rows x P + slots x T (rollout_kv_tokens), against
    slots x (P + T) when every sample has its own copy of its prompt (`generate`).

    Attention of a slot's new token (query q) over its prompt's keys K_p and its own keys K_s (up to itself) is one
    softmax over [K_p | K_s], computed as two parts merged by their log-sum-exps:
        out = exp(lse_p - lse) out_p + exp(lse_s - lse) out_s,   lse = log(exp(lse_p) + exp(lse_s))
    which is exact (the same sums, grouped): against fp64 it is off by as much as one fp32 softmax over the
    concatenation is (6e-6 and 3e-6 on outputs of size ~2, 300 + 60 keys). The prompt part runs once per prompt row
    with that prompt's n samples as n queries (n x kv-group queries per kv head), so a prompt's keys are read once
    per step, not n times: the memory-bound part of decoding shrinks n-fold along with the cache (a gather of
    [K_p | K_s] per slot would read and copy the prompt n times). Scores, softmax and sums run in fp32 whatever the
    cache's dtype.

    The engine sets, per step: each slot's prompt row, its sample index in the group (0..n-1) and its response
    length so far (where this step's token goes); each row's prompt length; and `bounds` (slots, rows, P, T) that
    limit the work to what is in use (eager) or cover the whole cache (a captured step, whose shapes are fixed)."""

    def __init__(self, config, rows, prompt_capacity, slots, response_capacity, n, dtype, device):
        layers, kv_heads, head_dim = _kv_shape(config)

        def store(count, length):   # zeros, not empty: stale entries are read with weight 0, and 0 x NaN is NaN
            return [torch.zeros(count, kv_heads, length, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.prompt_keys, self.prompt_values = store(rows, prompt_capacity), store(rows, prompt_capacity)
        self.slot_keys, self.slot_values = store(slots, response_capacity), store(slots, response_capacity)
        self.n = n
        self.slot_row = torch.zeros(slots, dtype=torch.long, device=device)                   # [S]
        self.slot_sample = torch.zeros(slots, dtype=torch.long, device=device)                # [S]
        self.slot_length = torch.zeros(slots, dtype=torch.long, device=device)                # [S]
        self.row_length = torch.zeros(rows, dtype=torch.long, device=device)                  # [R]
        self.capacity = (slots, rows, prompt_capacity, response_capacity)
        self.bounds = self.capacity

    def nbytes(self):
        return sum(t.numel() * t.element_size()
                   for t in self.prompt_keys + self.prompt_values + self.slot_keys + self.slot_values)

    def attend(self, layer, query, key, value, scaling):
        """query [S, H, 1, d], key/value [S, kv heads, 1, d] of this step's token (after RoPE) -> [S, 1, H, d]."""
        slots, rows, prompt_length, response_length = self.bounds
        device, n = query.device, self.n
        slot_keys, slot_values = self.slot_keys[layer], self.slot_values[layer]
        at = (torch.arange(slots, device=device), slice(None), self.slot_length[:slots])
        slot_keys[at], slot_values[at] = key[:, :, 0], value[:, :, 0]     # this token into its slot, no concatenation
        kv_heads, head_dim = slot_keys.shape[1], slot_keys.shape[3]
        group = query.shape[1] // kv_heads            # query heads per kv head: head h reads kv head h // group
        query = query.float().view(slots, kv_heads, group, head_dim) * scaling                  # [S, Hkv, g, d]
        row, sample = self.slot_row[:slots], self.slot_sample[:slots]                           # [S]
        # the prompt part: each row's samples as one block of n x g queries per kv head (free slots all land on
        # row 0, sample 0: the empty row, whose output is never read)
        grouped = query.new_zeros(rows, n, kv_heads, group, head_dim)                          # [R, n, Hkv, g, d]
        grouped[row, sample] = query
        grouped = grouped.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, n * group, head_dim)  # [R, Hkv, n*g, d]
        if layer == 0:   # the same visibility for every layer of a step: additive biases (0 or -inf), made once
            hidden = torch.arange(prompt_length, device=device) >= self.row_length[:rows, None]                # [R, P]
            self.prompt_bias = torch.zeros(hidden.shape, device=device).masked_fill_(hidden, -math.inf)[:, None, None]
            hidden = torch.arange(response_length, device=device) > self.slot_length[:slots, None]             # [S, T]
            self.own_bias = torch.zeros(hidden.shape, device=device).masked_fill_(hidden, -math.inf)[:, None, None]
        prompt_out, prompt_lse = _attention_part(
            grouped, self.prompt_keys[layer][:rows, :, :prompt_length].float(),
            self.prompt_values[layer][:rows, :, :prompt_length].float(), self.prompt_bias)  # [R, Hkv, n*g, d|1]
        def per_slot(tensor):                                                                   # -> [S, Hkv, g, d|1]
            return tensor.view(rows, kv_heads, n, group, -1).permute(0, 2, 1, 3, 4)[row, sample]
        prompt_out, prompt_lse = per_slot(prompt_out), per_slot(prompt_lse)
        # the slot's own part: its response up to and including this token
        own_out, own_lse = _attention_part(query, slot_keys[:slots, :, :response_length].float(),
                                           slot_values[:slots, :, :response_length].float(),
                                           self.own_bias)                                       # [S, Hkv, g, d|1]
        lse = torch.logaddexp(prompt_lse, own_lse)                                              # [S, Hkv, g, 1]
        out = prompt_out * torch.exp(prompt_lse - lse) + own_out * torch.exp(own_lse - lse)     # [S, Hkv, g, d]
        return out.reshape(slots, 1, kv_heads * group, head_dim).to(key.dtype)                  # [S, 1, H, d]


def rollout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, rollout=None, **kwargs):
    """The attention function the engine registers: a decode step (`rollout`, a RolloutKV) attends through it; any
    other forward while it is set (the prefill) takes the stock SDPA path with the stock mask."""
    if rollout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return rollout.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ROLLOUT_ATTENTION, rollout_attention)
AttentionMaskInterface.register(ROLLOUT_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def rollout_attention_set(model):
    """The language model's attention switched to ROLLOUT_ATTENTION for the rollout (the vision tower keeps its
    own), then back."""
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": ROLLOUT_ATTENTION})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": previous})


def _prefill(model, batch, chosen):
    """The prompts `chosen` (batch indices), their images through the vision tower and their tokens through the
    language model once, on the stock path: (logits of each last prompt token [k, V], the DynamicCache and the M-RoPE
    position of each prompt's first response token [k]). Positions are the prompt's own 3-D M-RoPE
    positions (as `pack` computes them); a response continues from the prompt's largest position + 1 on all three
    axes (text after images), as `generate` and the log-prob passes place it."""
    prompts = _trim_left_padding(select_samples(batch, torch.tensor(chosen)))
    mask = prompts["attention_mask"].bool()                                                  # [k, P]
    positions, _ = model.model.get_rope_index(prompts["input_ids"], prompts["mm_token_type_ids"],
                                              image_grid_thw=prompts.get("image_grid_thw"),
                                              attention_mask=prompts["attention_mask"])       # [3, k, P]
    out = model(**_model_inputs(prompts), position_ids=positions, use_cache=True, logits_to_keep=1)
    next_position = positions.masked_fill(~mask[None], 0).amax((0, 2)) + 1                   # [k]
    return out.logits[:, -1], out.cache, next_position


def _decode_step(model, kv, tokens, positions):
    """Logits [S, V] after feeding one token per slot (tokens [S]) at its M-RoPE position (positions [S], the same
    on the three axes)."""
    position_ids = positions.view(1, -1, 1).expand(3, -1, 1)                                 # [3, S, 1]
    return model(input_ids=tokens[:, None], position_ids=position_ids, use_cache=False, rollout=kv).logits[:, -1]


def _captured_step(model, kv, tokens, positions):
    """The decode step over the whole cache recorded once as a CUDA graph: replaying it costs one launch where the
    eager step makes ~800 (gpt-fast generate.py compiles its decode step with mode="reduce-overhead" for the same
    reason). `tokens`, `positions` and kv's per-slot tensors are its inputs, updated in place; returns (graph, its
    logits [S, V], rewritten by each replay)."""
    kv.bounds = kv.capacity
    stream = torch.cuda.Stream(tokens.device)
    stream.wait_stream(torch.cuda.current_stream(tokens.device))
    with torch.cuda.stream(stream):   # warm-up (cuBLAS workspaces, allocator); it writes what the first replay writes
        for _ in range(2):
            _decode_step(model, kv, tokens, positions)
    torch.cuda.current_stream(tokens.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = _decode_step(model, kv, tokens, positions)
    return graph, logits


def engine_rows(prompts_in_flight, n):
    """Prompt rows the engine keeps for `prompts_in_flight` groups of n samples, beside the empty row 0. With n > 1,
    half as many again: a group keeps its row until its last sample ends, and the spare rows let its finished
    samples' slots serve new prompts meanwhile (with one row per prompt in flight a prompt could only start when a
    whole group had ended, and a group's early finishers would idle until its longest did: the per-call tail again,
    per group). P per spare row is small beside a group's n x T at the recipe's lengths (~800-2,000 against
    5 x 2,048)."""
    return prompts_in_flight if n == 1 else prompts_in_flight + -(-prompts_in_flight // 2)


def rollout_kv_tokens(prompts, prompt_tokens, n, max_new_tokens, engine="ssrl"):
    """Tokens of KV cache a rollout holds with `prompts` prompts in flight (hf: per generate call) of up to
    `prompt_tokens`, n samples of up to `max_new_tokens` each: the engine's rows (the empty one included) and slots
    (RolloutKV), or `generate`'s n x (P + T) per prompt. Times kv_bytes_per_token: bytes."""
    if engine == "hf":
        return prompts * n * (prompt_tokens + max_new_tokens)
    return (1 + engine_rows(prompts, n)) * prompt_tokens + prompts * n * max_new_tokens


def rollout_bytes(config, prompts, prompt_tokens, n, max_new_tokens, itemsize, engine="ssrl",
                  max_prefill_tokens=16384):
    """Device bytes beyond the gathered model that a rollout needs at most with `prompts` prompts in flight (hf: per
    generate call) of up to `prompt_tokens` tokens, n samples of up to `max_new_tokens` each, `itemsize` bytes per
    value (the gathered model's dtype), from the model config:
      KV cache   rollout_kv_tokens x kv_bytes_per_token: the engine's rows and slots, or generate's n x (P + T) each
      prefill    for the prompts prefilled at once (hf: the call's; the engine: as many as fit max_prefill_tokens
                 padded tokens): their own KV cache before it is copied into the engine's rows (hf: n times), per
                 prompt token the largest transient of one decoder layer (residual, normed input, q, k, v, o, and
                 the MLP's gate, up and product: ~(6 D + 3 I) values) or of one vision block over its merged
                 patches, whichever is larger (the tower runs first), and their pixels in fp32 (as if every prompt
                 token were a merged visual token: on the safe side)
      sampling   per sample in flight a row over the vocabulary eight times in fp32: the model's logits, their fp32
                 copy, scaled, log-softmax, suppressed, probabilities and the fp64 cumulative sum (sample_tokens)"""
    text, vision = config.get_text_config(), config.vision_config
    merge = vision.spatial_merge_size ** 2
    kv_per_token = kv_bytes_per_token(config, itemsize)
    prefilled = prompts if engine == "hf" else min(prompts, max(1, max_prefill_tokens // max(prompt_tokens, 1)))
    decoder = (6 * text.hidden_size + 3 * text.intermediate_size) * itemsize
    tower = merge * (6 * vision.hidden_size + 3 * vision.intermediate_size) * itemsize
    pixels = merge * 3 * vision.temporal_patch_size * vision.patch_size ** 2 * 4
    prefill = prefilled * prompt_tokens * (kv_per_token + max(decoder, tower) + pixels)
    sampling = prompts * n * text.vocab_size * 4 * 8
    return rollout_kv_tokens(prompts, prompt_tokens, n, max_new_tokens, engine) * kv_per_token + prefill + sampling


def fitting_prompts(free_bytes, total_bytes, bytes_for, limit):
    """The most prompts m in [1, limit] whose bytes_for(m) fit `free_bytes` less a spare of max(2 GiB, 5% of the
    device's `total_bytes`) for what the arithmetic leaves out (allocator rounding, a decode step's activations,
    generate's cache growing by concatenation)."""
    budget = free_bytes - max(2 << 30, total_bytes // 20)
    prompts = 1
    while prompts < limit and bytes_for(prompts + 1) <= budget:
        prompts += 1
    return prompts


def memory_micro_batch(model, device, prompt_tokens, n, max_new_tokens, fallback, limit, engine="ssrl",
                       max_prefill_tokens=16384):
    """Prompts in flight (hf: per generate call) for prompts of up to `prompt_tokens` (the longest: the engine's
    rows and generate's calls are as wide as it) with n samples of up to `max_new_tokens`: on CUDA the most, up to
    `limit`, whose rollout_bytes fit the memory free now (call it with the model gathered: what generation will
    have), counting what the caching allocator holds unused as free; elsewhere `fallback`."""
    if device.type != "cuda":
        return fallback
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    itemsize = model.get_input_embeddings().weight.element_size()       # gathered: the compute dtype
    return fitting_prompts(free, total, lambda prompts: rollout_bytes(
        model.config, prompts, prompt_tokens, n, max_new_tokens, itemsize, engine, max_prefill_tokens), limit)


@dataclasses.dataclass
class EngineOutput:
    completion_ids: torch.Tensor       # [B*n, R] right-padded with the pad id
    completion_mask: torch.Tensor      # [B*n, R] 1 up to and including the first EOS
    truncated: torch.Tensor            # [B*n] no EOS within max_new_tokens
    logprobs: torch.Tensor             # [B*n, R] log pi(token) as the sampler computed it (0 at padding)
    kv_bytes: int                      # the KV cache allocated for the rollout
    slots: int
    steps: int                         # decode steps
    prefills: int                      # prefill forwards


@torch.no_grad()
def engine_generate(model, batch, n, max_new_tokens, temperature, top_p, eos_ids, pad_token_id,
                    prompts_in_flight=None, seeds=None, max_prefill_tokens=16384, compile_decode=False):
    """n samples of each prompt of `batch` (ssrl.encode_prompts), decoded as one stream over n x prompts_in_flight
    slots (all prompts when None): a sample that ends frees its slot at once, and the next prompts (longest first)
    are prefilled into the free slots in groups of n, as many at a time as fit max_prefill_tokens padded tokens.
    A rollout takes about (its tokens / slots) steps plus one tail, where calls of `generate` each wait for their
    longest sample.

    Sampling (temperature > 0; sample_tokens): token t of sample j of prompt i inverts uniform [j, t] of
    prompt_uniforms(seeds[i]) (`seeds`, one per prompt, required then; generate_completions draws them when its
    caller has none), so a sample depends on its prompt's seed only, as on the hf path. With seeds from (run seed,
    step, the prompt's global index) one rank or several draw the same rollouts.

    compile_decode (CUDA): the decode step runs as a captured CUDA graph over the whole cache. A sharded model is
    gathered once for the whole rollout (`gathered`)."""
    with gathered(model), rollout_attention_set(model):
        return _engine_loop(model, batch, n, max_new_tokens, temperature, top_p, eos_ids, pad_token_id,
                            prompts_in_flight, seeds, max_prefill_tokens, compile_decode)


def _engine_loop(model, batch, n, max_new_tokens, temperature, top_p, eos_ids, pad_token_id, prompts_in_flight,
                 seeds, max_prefill_tokens, compile_decode):
    device = batch["input_ids"].device
    if compile_decode and device.type != "cuda":
        raise ValueError("compile_decode captures a CUDA graph: it needs the model on a GPU")
    prompts = batch["input_ids"].shape[0]
    eos = torch.tensor(eos_ids, device=device)
    suppress = torch.tensor(vision_token_ids(model), dtype=torch.long, device=device)
    prompt_lengths = batch["attention_mask"].sum(1).tolist()
    queue = sorted(range(prompts), key=lambda i: -prompt_lengths[i])[::-1]   # popped from the end: longest first
    sampled = temperature > 0
    if sampled and seeds is None:
        raise ValueError("sampling on the engine needs a seed per prompt (generate_completions draws them)")
    in_flight = min(prompts_in_flight or prompts, prompts)
    slots = in_flight * n
    rows = 1 + min(prompts, engine_rows(in_flight, n))          # row 0: the free slots' empty row
    dummy = prompts * n                           # the output row that free slots write to, dropped at the end
    completion_ids = torch.full((prompts * n + 1, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((prompts * n + 1, max_new_tokens), dtype=torch.float32, device=device)
    lengths, truncated = [0] * (prompts * n), [False] * (prompts * n)
    # per slot, on the device: the token to feed, its prompt's first response position, its output row, its uniforms
    last_token = torch.full((slots,), pad_token_id, dtype=torch.long, device=device)        # [S]
    first_position = torch.zeros(slots, dtype=torch.long, device=device)                    # [S]
    output_row = torch.full((slots,), dummy, dtype=torch.long, device=device)               # [S]
    uniforms = torch.zeros((slots, max_new_tokens), dtype=torch.float64, device=device) if sampled else None
    # the same on the host: slot -> (row, tokens sampled so far, output row); free slots and rows, lowest first
    slot_row, slot_tokens, slot_output = [0] * slots, [0] * slots, [dummy] * slots
    row_live, row_length = [0] * rows, [0] * rows
    free_slots, free_rows, active = list(range(slots)), list(range(1, rows)), set()
    kv, graph, steps, prefills = None, None, 0, 0
    positions = torch.zeros(slots, dtype=torch.long, device=device)                         # [S]

    def finish(finished):
        """Free the slots of samples that ended: (slot, ended with EOS) pairs."""
        for slot, ended in finished:
            output = slot_output[slot]
            lengths[output], truncated[output] = slot_tokens[slot], not ended
            row_live[slot_row[slot]] -= 1
            if row_live[slot_row[slot]] == 0:
                free_rows.append(slot_row[slot])
                row_length[slot_row[slot]] = 0
            active.discard(slot)
            free_slots.append(slot)
            slot_row[slot], slot_tokens[slot], slot_output[slot] = 0, 0, dummy
        if finished:
            free_slots.sort()
            free_rows.sort()
            index = torch.tensor([slot for slot, _ in finished], device=device)
            for tensor, value in ((kv.slot_row, 0), (kv.slot_sample, 0), (kv.slot_length, 0), (output_row, dummy)):
                tensor[index] = value
            # kv.row_length keeps a freed row's old length: no slot points at it until admit() rewrites it

    def admit():
        nonlocal kv, prefills
        while queue and len(free_slots) >= n and free_rows:
            count, widest = 1, prompt_lengths[queue[-1]]
            while (count < min(len(queue), len(free_slots) // n, len(free_rows))
                   and (count + 1) * widest <= max_prefill_tokens):
                count += 1
            chosen = [queue.pop() for _ in range(count)]
            logits, cache, next_position = _prefill(model, batch, chosen)
            prefills += 1
            if kv is None:
                kv = RolloutKV(model.config, rows, max(prompt_lengths), slots, max_new_tokens, n,
                               cache.layers[0].keys.dtype, device)
            chosen_rows = [free_rows.pop(0) for _ in chosen]
            new_slots = [free_slots.pop(0) for _ in range(count * n)]
            for i, (prompt, row) in enumerate(zip(chosen, chosen_rows)):
                length = prompt_lengths[prompt]
                for layer, cached in enumerate(cache.layers):   # left-padded: the prompt is the last `length` columns
                    kv.prompt_keys[layer][row, :, :length] = cached.keys[i, :, cached.keys.shape[2] - length:]
                    kv.prompt_values[layer][row, :, :length] = cached.values[i, :, cached.values.shape[2] - length:]
                row_live[row], row_length[row] = n, length
                for j in range(n):
                    slot = new_slots[i * n + j]
                    slot_row[slot], slot_tokens[slot], slot_output[slot] = row, 1, prompt * n + j
                    active.add(slot)
            del cache
            index = torch.tensor(new_slots, device=device)                                    # [k*n]
            outputs = torch.tensor([slot_output[slot] for slot in new_slots], device=device)  # [k*n]
            kv.slot_row[index] = torch.tensor(chosen_rows, device=device).repeat_interleave(n)
            kv.slot_sample[index] = torch.arange(n, device=device).repeat(count)
            kv.row_length.copy_(torch.tensor(row_length, device=device))
            first_position[index] = next_position.to(device).repeat_interleave(n)
            output_row[index] = outputs
            first_uniforms = None
            if sampled:
                uniforms[index] = prompt_uniforms([seeds[prompt] for prompt in chosen], n, max_new_tokens, device)
                first_uniforms = uniforms[index, 0]
            tokens, token_logprobs = sample_tokens(logits.repeat_interleave(n, 0), temperature, top_p, suppress,
                                                   first_uniforms)                            # [k*n]
            completion_ids[outputs, 0], logprobs[outputs, 0] = tokens, token_logprobs
            last_token[index] = tokens
            ended = torch.isin(tokens, eos).tolist()
            finish([(slot, end) for slot, end in zip(new_slots, ended) if end or max_new_tokens == 1])

    admit()
    while active:
        if compile_decode:
            bound = slots
            positions.copy_(first_position + kv.slot_length)
            if graph is None:
                graph, graph_logits = _captured_step(model, kv, last_token, positions)
            graph.replay()
            logits = graph_logits
        else:
            bound = max(active) + 1
            used_rows = {slot_row[slot] for slot in active}
            kv.bounds = (bound, max(used_rows) + 1, max(row_length[row] for row in used_rows),
                         max(slot_tokens[slot] for slot in active))
            logits = _decode_step(model, kv, last_token[:bound], first_position[:bound] + kv.slot_length[:bound])
        steps += 1
        live = output_row[:bound] != dummy        # [s]: on the device already (a host list here would sync)
        position = kv.slot_length[:bound] + 1                     # index of the token sampled now, in its response
        at = position.clamp(max=max_new_tokens - 1)                                          # [s]
        step_uniforms = uniforms[torch.arange(bound, device=device), at] if sampled else None
        tokens, token_logprobs = sample_tokens(logits[:bound], temperature, top_p, suppress, step_uniforms)
        completion_ids[output_row[:bound], at], logprobs[output_row[:bound], at] = tokens, token_logprobs
        last_token[:bound] = torch.where(live, tokens, last_token[:bound])
        kv.slot_length[:bound] += live
        state = torch.stack([torch.isin(tokens, eos), position == max_new_tokens - 1]).tolist()  # one host sync
        for slot in active:
            slot_tokens[slot] += 1
        finish([(slot, state[0][slot]) for slot in sorted(active) if state[0][slot] or state[1][slot]])
        admit()
    width = max(lengths)
    completion_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long().to(device)
    return EngineOutput(completion_ids[:dummy, :width], completion_mask, torch.tensor(truncated, device=device),
                        logprobs[:dummy, :width] * completion_mask, kv.nbytes(), slots, steps, prefills)


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
    inputs.update({key: images[key].to(device) for key in ("pixel_values", "image_grid_thw") if key in images})
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

def grpo_step(policy, reference, optimizer, batch, answers, tasks, tokenizer, cfg, seeds=None):
    """One GRPO step on this rank's prompts (a batch from `encode_prompts`; answers and task names per prompt;
    `seeds`, one per prompt, seed its samples: generate_completions). Returns (metrics over all ranks, this rank's
    rollout records); writes nothing."""
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
        # 1. n responses per prompt, as many prompts in flight as the flag says or (auto) as fit the memory left
        micro = cfg.rollout_micro_batch_size
        if cfg.auto_rollout_micro_batch:
            micro = memory_micro_batch(policy, device, int(batch["attention_mask"].sum(1).max()), n,
                                       cfg.max_new_tokens, micro, len(answers), cfg.rollout_engine,
                                       cfg.max_tokens_per_micro_batch)
        completion_ids, completion_mask, truncated = generate_completions(
            policy, batch, n, cfg.max_new_tokens, cfg.temperature, cfg.top_p, sorted(eos_ids - {None}), pad_id,
            micro, cfg.shared_prompt, seeds, cfg.rollout_engine, cfg.compile_decode, cfg.max_tokens_per_micro_batch)
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

    metrics = _step_metrics(scores, tasks, rewards, completion_mask, truncated, texts, batch, n, micro, times)
    metrics.update(update_metrics, shared_prompt=float(cfg.shared_prompt))
    prompt_texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    lengths = completion_mask.sum(1)                                                          # [B*n]
    records = [{"index": i // n, "sample": i % n, "task": tasks[i // n], "prompt": prompt_texts[i // n],
                "completion": text, "answer": answers[i // n], "parsed": extract_boxed(text),
                "reward": score["overall"], "accuracy": score["accuracy"], "format": score["format"],
                "advantage": float(advantages[i]), "length": int(lengths[i]), "truncated": bool(truncated[i])}
               for i, (text, score) in enumerate(zip(texts, scores))]
    return metrics, records


def _step_metrics(scores, tasks, rewards, completion_mask, truncated, texts, batch, n, micro, times):
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
    spread = grouped.amax(1) > grouped.amin(1)                                   # [G]: groups that carry a gradient
    local["groups_zero_std"] = float((~spread).sum())
    for group, carries in enumerate(spread.tolist()):
        local[f"sum/signal/{tasks[group]}"] += carries
    local["sum/reward_std"] = float(grouped.std(1).sum())
    local["sum/length"] = float(lengths.sum())
    local["sum/terminated_length"] = float(lengths[~truncated].sum())
    local["terminated"] = float((~truncated).sum())
    local["truncated"] = float(truncated.sum())
    local["empty"] = float(sum(text.strip() == "" for text in texts))
    local["max/length"] = float(lengths.max())
    local["max/neg_min_length"] = -float(lengths.min())
    local["max/neg_micro_batch"] = -float(micro or batch["input_ids"].shape[0])
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
        "rollout_micro_batch_size": -total["max/neg_micro_batch"],     # the smallest any rank chose
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
        # the task's learning signal: the share of its groups whose rewards differ (a non-zero advantage)
        metrics[f"signal/{task}"] = total.get(f"sum/signal/{task}", 0.0) / (task_count / n)
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
