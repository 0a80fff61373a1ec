"""FSDP2 check for grpo.py, run by tests/test_grpo_dist.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist_grpo.py OUT_DIR

Every rank builds the same tiny Qwen2.5-VL and the same fixed rollouts (4 prompts x 3 responses with fixed
completions, advantages, old and reference log-probs); rank r keeps prompts 2r and 2r+1, shards the model with
`fully_shard` (each vision block, each decoder layer, then the root) and runs `grpo.update_policy`. Rank 0 writes
the gathered parameters to OUT_DIR/sharded.pt; the test compares them with one process updating on the whole batch
(`single_process_update`). Then each rank samples from the sharded model and from an unsharded copy with the same
seed: the completions must be equal, and the ranks stop at different lengths (so `synced_gpus` is exercised).
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from test_grpo import build_model, build_tokenizer, colour_batch  # noqa: E402

N = 3
CFG = grpo.GRPOConfig(num_generations=N, updates_per_step=2, micro_batch_size=2, kl_coef=0.01)
# the global mini-batches are {prompt 0, prompt 2} then {1, 3}: rank 0 holds prompts 0 and 1, rank 1 holds 2 and 3
RANK_PROMPTS = [[0, 1], [2, 3]]
SINGLE_ORDER = [0, 2, 1, 3]


def fixed_rollouts(tokenizer, model):
    """The whole batch, completions, advantages, old and reference log-probs; the same on every process."""
    batch, _, _ = colour_batch(tokenizer, prompts=4, seed=3)
    generator = torch.Generator().manual_seed(7)
    completion_ids = torch.randint(10, 290, (4 * N, 6), generator=generator)
    lengths = torch.randint(1, 7, (4 * N,), generator=generator)
    completion_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    advantages = torch.randn(4 * N, generator=generator)
    full = grpo.join_completions(batch, completion_ids, completion_mask, N)
    prompt_len = batch["input_ids"].shape[1]
    logp = grpo._logprobs(model, full, prompt_len, 1.0, 4 * N)
    old_logp = (logp + 0.3 * torch.randn(logp.shape, generator=generator)) * completion_mask  # some ratios clip
    ref_logp = (logp + 0.3 * torch.randn(logp.shape, generator=generator)) * completion_mask
    return batch, completion_ids, completion_mask, advantages, old_logp, ref_logp


def take(prompts, batch, completion_ids, completion_mask, advantages, old_logp, ref_logp):
    """The rollouts of `prompts` (prompt indices), in that order."""
    sequences = torch.tensor([prompt * N + j for prompt in prompts for j in range(N)])
    part = grpo.select_samples(batch, torch.tensor(prompts))
    full = grpo.join_completions(part, completion_ids[sequences], completion_mask[sequences], N)
    return full, part["input_ids"].shape[1], old_logp[sequences], ref_logp[sequences], advantages[sequences]


def optimizer_for(model):
    """Plain SGD: the update is linear in the gradient, so the comparison sees rounding at its own size. Adam's first
    step lr * g / (|g| + 1e-8) turns a 1e-11 rounding difference in a near-zero gradient (the sum over the ranks
    adds in another order than one process) into a 1e-6 weight difference: with AdamW at lr 1e-3 the measured
    worst parameter sat at 0.9 of the tolerance, a coin flip away from failing."""
    return torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.01)


def single_process_update():
    """Parameters after one process updates on the whole batch (the reference for the sharded run)."""
    tokenizer = build_tokenizer()
    model = build_model("qwen2.5-vl", tokenizer)
    rollouts = fixed_rollouts(tokenizer, model)
    full, prompt_len, old_logp, ref_logp, advantages = take(SINGLE_ORDER, *rollouts)
    cfg = grpo.GRPOConfig(**{**CFG.__dict__, "micro_batch_size": 3})      # other micro-batches, same result
    metrics = grpo.update_policy(model, optimizer_for(model), full, prompt_len, old_logp, ref_logp, advantages, cfg)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, metrics


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
    rollouts = fixed_rollouts(tokenizer, model)
    unsharded = copy.deepcopy(model)
    shard(model)

    full, prompt_len, old_logp, ref_logp, advantages = take(RANK_PROMPTS[rank], *rollouts)
    metrics = grpo.update_policy(model, optimizer_for(model), full, prompt_len, old_logp, ref_logp, advantages, CFG)
    state = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"params": state, "metrics": metrics}, os.path.join(out, "sharded.pt"))

    # generate on the sharded model: the same samples as the unsharded copy of the updated weights, each rank with
    # its own prompts; a frequent token is made a stop token so that the ranks finish at different steps
    unsharded.load_state_dict(state)
    batch, _, _ = colour_batch(tokenizer, prompts=2, seed=10 + rank)
    stop = torch.zeros(4, dtype=torch.long)
    if rank == 0:           # rank 0's own third sampled tokens become stop tokens: it finishes after 3 steps
        torch.manual_seed(100)
        ids, _, _ = grpo.generate_completions(unsharded, batch, 2, 10, 1.0, 1.0, [tokenizer.eos_token_id],
                                              tokenizer.pad_token_id)
        stop = ids[:, 2].clone()
    dist.broadcast(stop, 0)
    eos = [tokenizer.eos_token_id] + stop.tolist()
    results = []
    for candidate in (unsharded, model):
        torch.manual_seed(100 + rank)
        results.append(grpo.generate_completions(candidate, batch, 2, 10, 1.0, 1.0, eos, tokenizer.pad_token_id))
    same = all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
    widths = [None, None]
    dist.all_gather_object(widths, (same, results[1][0].shape[1], int(results[1][1].sum())))
    if rank == 0:
        torch.save({"generate": widths}, os.path.join(out, "generate.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
