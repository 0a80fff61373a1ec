"""GRPO for Spatial-SSRL, written to read like the equations of shared/spec/paper.md section 5.

One call of `grpo_step` does one step for this rank's prompts:
  1. generate n responses per prompt with transformers' `generate` (KV cache, left-padded multi-image prompts)
  2. decode them (skip_special_tokens) and score each with `tasks.reward`: 0.9 accuracy + 0.1 format
  3. group advantages  A_i = (r_i - mean_g r) / (std_g r + 1e-6), unbiased std; a group of equal rewards gets 0
  4. log-probs of the responses under the policy before the update (old) and the frozen reference, no grad
     (with a single update per step the old log-probs are the update's own, detached: exact and one pass less)
  5. `updates_per_step` mini-batches, each split into micro-batches:
        log rho = clamp(logp - old_logp, -20, 20)
        L = max(-A rho, -A clip(rho, 1 - 0.2, 1 + 0.3)),  and  min(L, -3.0 A)  where A < 0  (dual clip)
        + 0.01 * k3(ref || policy)
     averaged over the response tokens of the whole mini-batch on all ranks; clip grad norm 1.0; optimizer step

The recipe and its sources (EasyR1 as used by InternLM/Spatial-SSRL; spec sections 3.2 and 5):
  n = 5, temperature 1.0, top_p 1.0, top_k off                  [P 4.1; examples/config.yaml]
  256 prompts per rollout, 128 per update: 2 updates per step    [spatial-ssrl_qwen*.sh; config.yaml]
  ratio clip [0.8, 1.3], dual clip 3.0 for A < 0                 [verl/trainer/core_algos.py compute_policy_loss]
  k3 ("low_var_kl") KL to the reference, weight 0.01, in the loss [config.yaml; core_algos.py kl_penalty]
  loss = token mean over the global mini-batch                   [workers/actor/dp_actor.py, loss_avg_mode "token"]
  grad clip 1.0 (here); AdamW lr 1e-6 constant, wd 0.01 (the caller owns optimizer and schedule)
Departures from EasyR1: one engine (HF generate, no vLLM) samples and scores, so old log-probs only differ from the
sampler's by numerics; mini-batches are contiguous runs of sequences (no `_balance_batch` reordering); padding is
masked instead of packed; vision tokens (<|image_pad|> etc.) are never sampled, since a later forward would take a
sampled one for an image slot. ssrl.py imports this file (`python ssrl.py` runs SFT then GRPO); this file never
imports ssrl.py.

Distributed: under torchrun every rank passes the same number of prompts (its own share of whole groups). The
policy must average gradients over ranks (FSDP2 `fully_shard`, or DDP): each rank divides its token sum by
(global tokens / world size), so the average of the ranks' gradients is the global token mean.
"""
import dataclasses
import math
import time
import types
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from kernels import fused_logprobs
from tasks import extract_boxed, reward as task_reward


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
    micro_batch_size: int = 1         # sequences per forward/backward (EasyR1 micro_batch_size_per_device_for_update)
    logprob_micro_batch_size: int = 2  # sequences per no-grad pass (..._for_experience)
    max_grad_norm: float = 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Batches: select samples with their images, repeat prompts, append completions

def select_samples(batch, index):
    """Rows `index` (a 1-D LongTensor) of a prompt batch from ssrl.encode_prompts, with their images' pixel rows.
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


def repeat_prompts(batch, n):
    """Each prompt n times in a row: sample i * n + j is prompt i (the layout group_advantages expects)."""
    return select_samples(batch, torch.arange(batch["input_ids"].shape[0]).repeat_interleave(n))


def join_completions(batch, completion_ids, completion_mask, k):
    """Prompt i repeated k times followed by its k completions; completion tokens are text (mm_token_type_ids 0)."""
    prompts = repeat_prompts(batch, k)
    full = dict(prompts)
    full["input_ids"] = torch.cat([prompts["input_ids"], completion_ids], 1)                      # [B*k, P+R]
    full["attention_mask"] = torch.cat([prompts["attention_mask"],
                                        completion_mask.to(prompts["attention_mask"].dtype)], 1)  # [B*k, P+R]
    full["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"],
                                           torch.zeros_like(completion_ids, dtype=prompts["mm_token_type_ids"].dtype)],
                                          1)                                                       # [B*k, P+R]
    return full


def _model_inputs(batch):
    return {key: batch[key] for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                        "image_grid_thw") if key in batch}


def fsdp_method(model, name):
    """`model.<name>` of a sharded model, registered once as an FSDP forward method (ssrl.shard registers
    `generate` through it). FSDP2 gathers the root's own parameters (embeddings, lm_head, norms, patch embed,
    merger) only around `forward`; any other entry point must be registered (env.md section 5: generate fails
    with "mixed torch.Tensor and DTensor" otherwise). Registering twice would gather twice, so remember it."""
    registered = model.__dict__.setdefault("_grpo_fsdp_methods", set())
    if name not in registered:
        register_fsdp_forward_method(model, name)
        registered.add(name)
    return getattr(model, name)


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs of response tokens: the model's hidden states, then the fused lm_head -> log-softmax kernel

def _response_logprobs(model, full_batch, prompt_len, temperature, return_entropy):
    hidden = model.model(**_model_inputs(full_batch), use_cache=False).last_hidden_state   # [B, P+R, D]
    hidden = hidden[:, prompt_len - 1:-1]                  # [B, R, D] the state that predicts each response token
    targets = full_batch["input_ids"][:, prompt_len:]      # [B, R]
    mask = full_batch["attention_mask"][:, prompt_len:].bool()                               # [B, R]
    weight = model.get_output_embeddings().weight                                            # [V, D]
    logp_rows, entropy_rows = fused_logprobs(hidden[mask], weight, targets[mask], temperature=temperature,
                                             return_entropy=True, impl=LOGPROBS_IMPL)        # [N], [N]
    logp = torch.zeros(mask.shape, dtype=logp_rows.dtype, device=mask.device).masked_scatter(mask, logp_rows)  # [B, R]
    if not return_entropy:
        return logp
    entropy = torch.zeros_like(logp).masked_scatter(mask, entropy_rows)                      # [B, R]
    return logp, entropy


def response_logprobs(model, full_batch, prompt_len, temperature=1.0, return_entropy=False):
    """log pi(token) [B, R] at response positions (0 at padding), from model.model's hidden states and
    kernels.fused_logprobs on response rows only: no [tokens x vocab] logits. Temperature divides the logits."""
    if isinstance(model, FSDPModule):
        if "_grpo_response_logprobs" not in model.__dict__:
            model._grpo_response_logprobs = types.MethodType(_response_logprobs, model)
        return fsdp_method(model, "_grpo_response_logprobs")(full_batch, prompt_len, temperature, return_entropy)
    return _response_logprobs(model, full_batch, prompt_len, temperature, return_entropy)


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts

@torch.no_grad()
def generate_completions(model, batch, n, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id):
    """n sampled responses per prompt -> completion_ids [B*n, R] right-padded with pad_token_id, completion_mask
    [B*n, R] (1 up to and including the first EOS), truncated [B*n] (no EOS within max_new_tokens).
    temperature 0 decodes greedily. Every sampling knob is passed explicitly: unset ones would come from the
    checkpoint's generation_config (Qwen's: top_k 1, repetition_penalty 1.05) or transformers' top_k 50."""
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    prompts = _model_inputs(repeat_prompts(batch, n))                                         # [B*n, P]
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=None, typical_p=1.0)
                if temperature > 0 else dict(do_sample=False))
    # a sampled <|image_pad|> would be taken for an image slot by every later forward ("Image features and image
    # tokens do not match"); an untrained policy does sample it, so the vision tokens are never generated
    vision_ids = [getattr(model.config, name, None) for name in
                  ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")]
    sharded = isinstance(model, FSDPModule)
    generate = fsdp_method(model, "generate") if sharded else model.generate
    output = generate(**prompts, **sampling, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
                      num_return_sequences=1, min_new_tokens=0,
                      suppress_tokens=[token for token in vision_ids if token is not None],
                      max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_token_id, use_cache=True,
                      # sharded layers all-gather in every forward, so ranks must run the same number of steps
                      synced_gpus=sharded and dist.is_initialized() and dist.get_world_size() > 1)
    completion_ids = output[:, prompts["input_ids"].shape[1]:]                               # [B*n, R]
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [B*n, R]
    after_eos = (torch.cumsum(is_eos, 1) - is_eos.long()) > 0                                 # [B*n, R]
    completion_mask = (~after_eos).long()                                                     # [B*n, R]
    truncated = ~is_eos.any(1)                                                                # [B*n]
    return completion_ids.masked_fill(after_eos, pad_token_id), completion_mask, truncated


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


def policy_loss(logp, old_logp, ref_logp, advantages, mask, total_tokens, clip_low=0.2, clip_high=0.3,
                dual_clip=3.0, kl_coef=0.01):
    """The per-token loss of spec section 5, summed over `mask` and divided by `total_tokens`: pass the token count
    of the whole mini-batch (divided by the world size when ranks average gradients), and micro-batches and ranks
    add up to the global token mean. This is not a mean per sequence then per batch (tiny-grpo, simple_GRPO).
    Metrics use the same normalisation, so they add up over micro-batches the same way."""
    mask = mask.to(logp.dtype)                                                                # [b, R]
    advantages = advantages[:, None].to(logp.dtype)                                           # [b, 1]
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)                                     # [b, R]
    ratio = torch.exp(log_ratio)                                                              # [b, R]
    clipped_ratio = torch.exp(torch.clamp(log_ratio, math.log(1 - clip_low), math.log(1 + clip_high)))  # [b, R]
    loss_unclipped = -advantages * ratio                                                      # [b, R]
    loss_clipped = -advantages * clipped_ratio                                                # [b, R]
    loss_dual = -advantages * dual_clip                                                       # [b, 1]
    pessimistic = torch.maximum(loss_unclipped, loss_clipped)                                 # [b, R]
    pg_loss = torch.where(advantages < 0, torch.minimum(pessimistic, loss_dual), pessimistic)  # [b, R]
    # k3 estimator of KL(pi || pi_ref): r - 1 - log r with r = pi_ref / pi, unbiased and always >= 0
    # (J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html); clamps as verl low_var_kl
    log_ref_ratio = torch.clamp(ref_logp - logp, -20.0, 20.0)                                 # [b, R]
    kl = torch.clamp(torch.exp(log_ref_ratio) - log_ref_ratio - 1, -10.0, 10.0)               # [b, R]
    per_token = pg_loss + kl_coef * kl                                                        # [b, R]
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
# One step

def _world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_reduce(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _micro_batch(full, index, prompt_len):
    """Sequences `index` of the full batch with the columns that are padding in all of them cut off (left of the
    prompts, right of the responses); returns inputs, their prompt length and their response length."""
    micro = select_samples(full, index)
    mask = micro["attention_mask"]                                                           # [b, P+R]
    left = int(mask[:, :prompt_len].any(0).long().argmax())
    length = int(mask[:, prompt_len:].any(0).nonzero().max()) + 1 if mask[:, prompt_len:].any() else 1
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        micro[key] = micro[key][:, left:prompt_len + length]
    return micro, prompt_len - left, length


@torch.no_grad()
def _logprobs(model, full, prompt_len, temperature, micro_batch_size):
    """log-probs [S, R] of every response token, micro-batch by micro-batch, without gradient."""
    mask = full["attention_mask"][:, prompt_len:]                                            # [S, R]
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)                  # [S, R]
    for start in range(0, mask.shape[0], micro_batch_size):
        index = torch.arange(start, min(start + micro_batch_size, mask.shape[0]), device=mask.device)
        inputs, micro_prompt_len, length = _micro_batch(full, index, prompt_len)
        logp[index, :length] = response_logprobs(model, inputs, micro_prompt_len, temperature).float()
    return logp


def update_policy(policy, optimizer, full, prompt_len, old_logp, ref_logp, advantages, cfg):
    """`cfg.updates_per_step` optimizer updates on the rollouts, each on a contiguous mini-batch of sequences.
    old_logp (or ref_logp) None means "the policy's own log-probs, detached": exact for a single on-policy update.
    A non-finite loss or gradient norm (on any rank) skips that update; returns summed metrics and counts."""
    world = _world_size()
    mask = full["attention_mask"][:, prompt_len:]                                            # [S, R]
    sequences = mask.shape[0]
    mini_size = math.ceil(sequences / cfg.updates_per_step)
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    sums, updates, skipped, grad_norms = defaultdict(float), 0, 0, []
    for mini_start in range(0, sequences, mini_size):
        mini_end = min(mini_start + mini_size, sequences)
        global_tokens = _all_reduce(mask[mini_start:mini_end].sum().float())
        total_tokens = global_tokens / world      # ranks average gradients: each divides by its share
        mini = defaultdict(lambda: torch.zeros((), device=mask.device))
        for start in range(mini_start, mini_end, cfg.micro_batch_size):
            index = torch.arange(start, min(start + cfg.micro_batch_size, mini_end), device=mask.device)
            inputs, micro_prompt_len, length = _micro_batch(full, index, prompt_len)
            logp, entropy = response_logprobs(policy, inputs, micro_prompt_len, temperature, return_entropy=True)
            micro_mask = mask[index, :length]                                                # [b, R']
            old = logp.detach() if old_logp is None else old_logp[index, :length]             # [b, R']
            ref = logp.detach() if ref_logp is None else ref_logp[index, :length]             # [b, R']
            loss, metrics = policy_loss(logp, old, ref, advantages[index],
                                        micro_mask, total_tokens, cfg.clip_low, cfg.clip_high, cfg.dual_clip,
                                        cfg.kl_coef)
            loss.backward()
            mini["loss"] += loss.detach()
            mini["entropy"] += (entropy.detach() * micro_mask).sum() / total_tokens
            for key, value in metrics.items():
                mini[key] += value
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad],
                                                   cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        values = _all_reduce(torch.stack(list(mini.values())).float()) / world
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


def grpo_step(policy, reference, optimizer, batch, answers, tasks, tokenizer, cfg):
    """One GRPO step on this rank's prompts (a batch from ssrl.encode_prompts; answers and task names per prompt).
    Returns (metrics over all ranks, this rank's rollout records); writes nothing."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)                   # a processor works too
    n, device, prompt_len = cfg.num_generations, batch["input_ids"].device, batch["input_ids"].shape[1]
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
    was_training = policy.training
    policy.eval()

    start = _clock(device)
    completion_ids, completion_mask, truncated = generate_completions(
        policy, batch, n, cfg.max_new_tokens, cfg.temperature, cfg.top_p, sorted(eos_ids - {None}), pad_id)
    generated = _clock(device)

    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    scores = [task_reward(text, answers[i // n]) for i, text in enumerate(texts)]
    rewards = torch.tensor([score["overall"] for score in scores], dtype=torch.float32, device=device)  # [B*n]
    advantages = group_advantages(rewards, n)                                                # [B*n]
    rewarded = _clock(device)

    full = join_completions(batch, completion_ids, completion_mask, n)                       # [B*n, P+R]
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    # one update per step is on-policy: the old log-probs are the update's own, detached (TRL does the same with
    # num_iterations 1), which saves a pass; with more updates the later ones need the rollout policy's
    old_logp = (_logprobs(policy, full, prompt_len, temperature, cfg.logprob_micro_batch_size)          # [B*n, R]
                if cfg.updates_per_step > 1 else None)
    ref_logp = (_logprobs(reference, full, prompt_len, temperature, cfg.logprob_micro_batch_size)       # [B*n, R]
                if cfg.kl_coef > 0 else None)
    scored = _clock(device)

    policy.train()
    update_metrics = update_policy(policy, optimizer, full, prompt_len, old_logp, ref_logp, advantages, cfg)
    policy.train(was_training)
    updated = _clock(device)

    # metrics: sums on this rank, then over ranks
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
    local["tokens"] = float(full["attention_mask"].sum())
    total = _gather_sums(dict(local))

    task_names = sorted(key.split("/", 1)[1] for key in total if key.startswith("count/"))
    count = total["sequences"]
    step_time = updated - start
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
        **update_metrics,
        "tokens_per_second": total["tokens"] / step_time,
        "time/generate": generated - start,
        "time/reward": rewarded - generated,
        "time/logprobs": scored - rewarded,
        "time/update": updated - scored,
        "time/step": step_time,
    }
    for task in task_names:
        task_count = total[f"count/{task}"]
        metrics[f"reward/{task}"] = total[f"sum/overall/{task}"] / task_count
        metrics[f"accuracy/{task}"] = total[f"sum/accuracy/{task}"] / task_count
        metrics[f"format/{task}"] = total[f"sum/format/{task}"] / task_count

    prompt_texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    rollouts = [{"index": i // n, "sample": i % n, "task": tasks[i // n], "prompt": prompt_texts[i // n],
                 "completion": text, "answer": answers[i // n], "parsed": extract_boxed(text),
                 "reward": score["overall"], "accuracy": score["accuracy"], "format": score["format"],
                 "advantage": float(advantages[i]), "length": int(lengths[i]), "truncated": bool(truncated[i])}
                for i, (text, score) in enumerate(zip(texts, scores))]
    return metrics, rollouts
