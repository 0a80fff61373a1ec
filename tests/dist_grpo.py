"""FSDP2 checks for grpo.py, run by tests/test_grpo_dist.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist_grpo.py OUT_DIR

Update: every rank builds the same tiny Qwen2.5-VL and the same fixed rollouts (8 prompts x 3 responses with fixed
completions, advantages, old and reference log-probs); rank r keeps prompts 4r to 4r + 3, shards the model with
`fully_shard` (each vision block, each decoder layer, then the root) and runs `grpo.update_policy` on the shared-prompt
path with a token budget that gives the two ranks different numbers of micro-batches (so the weight-0 passes that
keep them in step run). Rank 0 writes the gathered parameters to OUT_DIR/sharded.pt; the test compares them with one
process updating on the whole batch on the per-response path (`single_process_update`).

Generation: each rank then decodes its own prompts on the sharded model gathered once (`grpo.gathered`), greedily
(the test compares with one process) and sampled against an unsharded copy with the same seed, with a stop token
that makes the ranks finish after different numbers of tokens and a different number of generate calls per rank:
nothing in generation is collective any more, so neither may wait for the other. Last, each rank samples its
strided share of 4 prompts with per-prompt seeds (SEEDS, by global index): one process with all 4 must draw the same.
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from test_grpo import build_model, build_tokenizer, colour_batch  # noqa: E402

N = 3
CFG = grpo.GRPOConfig(num_generations=N, updates_per_step=2, kl_coef=0.01, shared_prompt=True)
# token budgets: rank 0's rows fit one micro-batch, rank 1's need two (the test checks the counts differ)
BUDGET = [10_000, 60]
# the global mini-batches are prompts {0, 1, 4, 5} then {2, 3, 6, 7}: rank 0 holds 0-3, rank 1 holds 4-7
PROMPTS = 8
RANK_PROMPTS = [[0, 1, 2, 3], [4, 5, 6, 7]]
SINGLE_ORDER = [0, 1, 4, 5, 2, 3, 6, 7]
SEEDS = [11, 12, 13, 14]          # the sampling seed of each prompt of the seeded batch, by its global index


def fixed_rollouts(tokenizer, model):
    """The whole batch's rollouts, advantages, old and reference log-probs; the same on every process."""
    batch, _, _ = colour_batch(tokenizer, prompts=PROMPTS, seed=3)
    generator = torch.Generator().manual_seed(7)
    completion_ids = torch.randint(10, 290, (PROMPTS * N, 6), generator=generator)
    lengths = torch.randint(1, 7, (PROMPTS * N,), generator=generator)
    completion_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    advantages = torch.randn(PROMPTS * N, generator=generator)
    rollouts = grpo.Rollouts(batch, completion_ids, completion_mask, N)
    logp = grpo.rollout_logprobs(model, rollouts, False, 10_000)
    old_logp = (logp + 0.3 * torch.randn(logp.shape, generator=generator)) * completion_mask  # some ratios clip
    ref_logp = (logp + 0.3 * torch.randn(logp.shape, generator=generator)) * completion_mask
    return rollouts, advantages, old_logp, ref_logp


def take(prompts, rollouts, advantages, old_logp, ref_logp):
    """The rollouts of `prompts` (prompt indices), in that order."""
    sequences = torch.tensor([prompt * N + j for prompt in prompts for j in range(N)])
    part = grpo.Rollouts(grpo.select_samples(rollouts.prompts, torch.tensor(prompts)),
                         rollouts.completion_ids[sequences], rollouts.completion_mask[sequences], N)
    return part, advantages[sequences], old_logp[sequences], ref_logp[sequences]


def optimizer_for(model):
    """Plain SGD: the update is linear in the gradient, so the comparison sees rounding at its own size. Adam's first
    step lr * g / (|g| + 1e-8) turns a 1e-11 rounding difference in a near-zero gradient (the sum over the ranks
    adds in another order than one process) into a 1e-6 weight difference: with AdamW at lr 1e-3 the measured
    worst parameter sat at 0.9 of the tolerance, a coin flip away from failing."""
    return torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.01)


def single_process_update():
    """Parameters after one process updates on the whole batch (the reference for the sharded run), on the
    per-response path in one micro-batch per mini-batch."""
    tokenizer = build_tokenizer()
    model = build_model("qwen2.5-vl", tokenizer)
    rollouts, advantages, old_logp, ref_logp = take(SINGLE_ORDER, *fixed_rollouts(tokenizer, model))
    cfg = grpo.GRPOConfig(**{**CFG.__dict__, "shared_prompt": False, "max_tokens_per_micro_batch": 10_000})
    metrics = grpo.update_policy(model, optimizer_for(model), rollouts, old_logp, ref_logp, advantages, cfg)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, metrics


def greedy(model, tokenizer, batch, micro_batch_size):
    ids, mask, _ = grpo.generate_completions(model, batch, 2, 8, 0.0, 1.0, tokenizer.eos_token_id,
                                             tokenizer.pad_token_id, micro_batch_size)
    return ids * mask


def seeded(model, tokenizer, batch, seeds):
    """3 samples per prompt (T = 1) from the engine, one prompt in flight, sampling seeded per prompt."""
    ids, mask, _ = grpo.generate_completions(model, batch, 3, 10, 1.0, 1.0, tokenizer.eos_token_id,
                                             tokenizer.pad_token_id, 1, seeds=seeds)
    return ids * mask


def seeded_batch(tokenizer):
    return colour_batch(tokenizer, prompts=len(SEEDS), seed=11)[0]


def rank_prompts(tokenizer, rank):
    """Rank 0 decodes 3 prompts in 2 generate calls, rank 1 one prompt in one call."""
    batch, _, _ = colour_batch(tokenizer, prompts=4, seed=10)
    return grpo.select_samples(batch, torch.tensor([0, 1, 2] if rank == 0 else [3])), 2 if rank == 0 else 1


def shard(model):
    from torch.distributed.fsdp import fully_shard
    for block in model.model.visual.blocks:
        fully_shard(block)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main(out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = build_tokenizer()
    model = build_model("qwen2.5-vl", tokenizer)
    everything = fixed_rollouts(tokenizer, model)
    unsharded = copy.deepcopy(model)
    shard(model)

    rollouts, advantages, old_logp, ref_logp = take(RANK_PROMPTS[rank], *everything)
    cfg = grpo.GRPOConfig(**{**CFG.__dict__, "max_tokens_per_micro_batch": BUDGET[rank]})
    micro = len(grpo.micro_batches(grpo.pass_rows(rollouts, True, range(2))[1], BUDGET[rank]))
    metrics = grpo.update_policy(model, optimizer_for(model), rollouts, old_logp, ref_logp, advantages, cfg)
    state = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    counts = [None, None]
    dist.all_gather_object(counts, micro)

    # generation on the sharded model, gathered once: greedy, and sampled against the unsharded copy
    unsharded.load_state_dict(state)
    batch, calls = rank_prompts(tokenizer, rank)
    model.eval()
    with grpo.gathered(model):
        sharded_greedy = greedy(model, tokenizer, batch, micro_batch_size=2 if rank == 0 else 1)
        stop = [tokenizer.eos_token_id]
        if rank == 0:     # rank 0's own third sampled token becomes a stop token: it finishes early
            torch.manual_seed(100)
            ids, _, _ = grpo.generate_completions(unsharded, batch, 2, 10, 1.0, 1.0, stop, tokenizer.pad_token_id)
            stop = stop + ids[:, 2].tolist()
        sampled = []
        for candidate in (unsharded, model):
            torch.manual_seed(100 + rank)
            sampled.append(grpo.generate_completions(candidate, batch, 2, 10, 1.0, 1.0, stop, tokenizer.pad_token_id,
                                                     micro_batch_size=2))
        share = torch.arange(rank, len(SEEDS), 2)                   # the strided share, as ssrl.rollout_prompts
        seeded_share = seeded(model, tokenizer, grpo.select_samples(seeded_batch(tokenizer), share),
                              [SEEDS[i] for i in share])
    same = all(torch.equal(a, b) for a, b in zip(sampled[0], sampled[1]))
    results = [None, None]
    dist.all_gather_object(results, {"greedy": sharded_greedy, "same_sampled": same, "calls": calls,
                                     "width": sampled[1][0].shape[1], "seeded": seeded_share})
    if rank == 0:
        torch.save({"params": state, "metrics": metrics, "micro_batches": counts, "generate": results},
                   os.path.join(out, "sharded.pt"))
    dist.barrier()   # leave together: a gloo rank that tears down while the other still talks aborts at exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
