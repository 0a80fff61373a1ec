"""Seconds per GRPO step and where they go, tokens/s and peak memory: shared-prompt rows against one row per
response, and the fused log-probs on and off; the memory of a rollout against its micro-batch.

    OMP_NUM_THREADS=1 python -m bench.grpo                                # tiny model, CPU: recipe-like + default
    OMP_NUM_THREADS=1 python -m bench.grpo --shapes default --paths shared,unshared
    OMP_NUM_THREADS=1 python -m bench.grpo --rollout-memory               # peak memory of generation vs micro-batch
    python -m bench.grpo --model qwen2.5-vl-3b --shapes recipe --image-size 512 --prompts 32 --max-new-tokens 256

Shapes: "recipe" is recipe-like on the tiny model: each prompt carries 2-5 images of ~160 visual tokens (364 px
squares, rendered scenes) and a pretext task's question, ~700 tokens in all, answered with 60 new tokens, n = 5.
"default" is the default run's GRPO step: 16 prompts of the five tasks at 112 px (12-16 visual tokens per image,
~200-token prompts), 48 new tokens. A model from random init rarely samples EOS, so every response runs to the
limit: the step's length is fixed, which is what a timing wants. Each variant runs `grpo.grpo_step` (2 updates per
step, k3 KL to a reference: every pass of the recipe) on the same prompts after one warm-up step. Paths: "shared"
(each group one packed row, one prefill per prompt) or "unshared" (a row and a prefill per response). Log-probs
(--impls): the device's fused path ("torch" on a CPU, "triton" on CUDA) or "reference" ([tokens x vocab] logits).
Peak memory: CUDA max_memory_allocated, or the process's peak resident set on the CPU (reset before each variant).
Precision as the trainer has it: fp32 master weights and AdamW state; with a bf16 compute dtype (--dtype, auto: bf16
on CUDA) the policy computes through FSDP2's mixed precision on one process and the reference is bf16, so a real
preset's peak memory is what a one-GPU run of ssrl.py holds (~16 B per parameter + 2 B for the reference).
"""
import argparse
import copy
import json
import os
import random
import tempfile

import torch

import grpo
import ssrl
import tasks
import tiny


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:   # Linux: writing 5 resets VmHWM, the peak resident set size
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def recipe_records(root, prompts, side, seed=0):
    """Records of 2-5 rendered scenes each (side x side px) with a pretext task's question, written under root."""
    rng = random.Random(seed)
    questions = [tasks._CROP.replace("<image>", ""), tasks._DEPTH, tasks._POSITION, tasks._FLIP]
    records = []
    for i in range(prompts):
        count = 2 + i % 4
        paths = []
        for j in range(count):
            path = os.path.join(root, f"recipe-{i}-{j}.jpg")
            tasks.render_scene(random.Random(f"{seed}:{i}:{j}"), side, side)[0].save(path, quality=90)
            paths.append(path)
        records.append({"id": f"recipe-{i}", "task": "crop", "problem": "<image>" * count + rng.choice(questions),
                        "answer": "A", "images": paths})
    return records


def default_records(root, prompts):
    """The default run's prompts: the five tasks' samples at 112 px."""
    tasks.build_dataset(root, per_task=max(2, prompts // len(tasks.TASKS) + 1), eval_per_task=1, max_side=112,
                        progress=False, overwrite=True)
    return tasks.load_records(root, "train")[:prompts]


def build(args, dist, root):
    device = dist.device
    if args.shapes == "recipe":
        records, pixels = recipe_records(root, args.prompts, args.image_size or 364), (args.image_size or 364) ** 2
    else:
        records, pixels = default_records(root, args.prompts), (args.image_size or 112) ** 2
    family = ssrl.PRESETS[args.model][0]
    corpus = tiny.tokenizer_corpus([r for r in records if "meta" in r]) + [r["problem"] for r in records]
    if ssrl.PRESETS[args.model][1] is None:
        policy, processor = ssrl.build_tiny(family, corpus)
    else:
        from transformers import AutoModelForImageTextToText
        processor = ssrl.build_tiny_processor(family, corpus)
        with torch.device(device):
            policy = AutoModelForImageTextToText.from_config(
                ssrl.real_config(args.model, processor.tokenizer, args.layers), dtype=torch.float32,
                attn_implementation="sdpa")
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy = ssrl.vision_attention(policy.to(device), device)
    reference = copy.deepcopy(policy).to(dist.dtype).eval().requires_grad_(False)
    if dist.sharded:
        policy, reference = ssrl.shard(policy, dist.dtype), ssrl.shard(reference, dist.dtype)
    batch = ssrl.to_device(grpo.encode_prompts(processor, records, [tasks.open_images(r) for r in records],
                                               min_pixels=pixels, max_pixels=pixels), device)
    return policy, reference, processor, batch, [r["answer"] for r in records], [r["task"] for r in records]


def time_steps(args, device, policy, reference, processor, batch, answers, task_names, shared, impl):
    grpo.LOGPROBS_IMPL = impl
    cfg = grpo.GRPOConfig(num_generations=args.n, max_new_tokens=args.max_new_tokens, shared_prompt=shared,
                          rollout_micro_batch_size=args.rollout_micro_batch_size,
                          max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
    torch.manual_seed(0)
    grpo.grpo_step(policy, reference, optimizer, batch, answers, task_names, processor, cfg)   # warm-up
    peak_reset(device)
    runs = [grpo.grpo_step(policy, reference, optimizer, batch, answers, task_names, processor, cfg)[0]
            for _ in range(args.steps)]
    grpo.LOGPROBS_IMPL = None
    return {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}, peak_mib(device)


def rollout_memory(args):
    """Peak memory of generating n responses to B recipe-like prompts in micro-batches of m prompts, each (B, m) in
    a fresh process (a freed heap would hide the next one's growth): it follows m, not B."""
    import subprocess
    import sys
    print("| rollout batch B (prompts) | micro-batch m (prompts) | generate s | peak MiB above the loaded model |")
    print("|---|---|---|---|")
    for prompts in args.rollout_batches:
        for micro in sorted({4, 16, prompts}):
            if micro <= prompts:
                command = [sys.executable, "-m", "bench.grpo", "--rollout-one", str(prompts), str(micro),
                           "--max-new-tokens", str(args.max_new_tokens), "--n", str(args.n)]
                print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip(), flush=True)


def rollout_one(args, dist, prompts, micro):
    device = dist.device
    with tempfile.TemporaryDirectory() as root:
        args.prompts = prompts
        policy, _, processor, batch, _, _ = build(args, dist, root)
        tokenizer = processor.tokenizer
        peak_reset(device)
        base = peak_mib(device)
        start = grpo._clock(device)
        grpo.generate_completions(policy, batch, args.n, args.max_new_tokens, 1.0, 1.0, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, micro)
        seconds = grpo._clock(device) - start
        print(f"| {prompts} | {micro} | {seconds:.2f} | {peak_mib(device) - base:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2.5-vl", choices=list(ssrl.PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="real presets: decoder layers and vision blocks")
    parser.add_argument("--shapes", choices=("recipe", "default", "both"), default="both")
    parser.add_argument("--paths", default="shared,unshared", help="comma-separated: shared, unshared")
    parser.add_argument("--impls", default=None, help="comma-separated grpo.LOGPROBS_IMPL values (default: the "
                        "device's fused path only; add 'reference' for [tokens x vocab] logits)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (x n responses)")
    parser.add_argument("--n", type=int, default=5, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 60 recipe, 48 default")
    parser.add_argument("--image-size", type=int, default=None, help="image side in px (default 364 / 112)")
    parser.add_argument("--rollout-micro-batch-size", type=int, default=16)
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--rollout-memory", action="store_true", help="only the rollout memory table")
    parser.add_argument("--rollout-batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--rollout-one", type=int, nargs=2, metavar=("B", "M"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="compute dtype, as ssrl.py")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE (bench/gpu_check.py reads it)")
    args = parser.parse_args()
    dist = ssrl.compute_init(args.dtype)
    device = dist.device
    if args.rollout_memory or args.rollout_one:
        args.shapes, args.max_new_tokens = "recipe", args.max_new_tokens or 60
        return rollout_one(args, dist, *args.rollout_one) if args.rollout_one else rollout_memory(args)
    impls = (args.impls or ("triton" if device.type == "cuda" else "torch")).split(",")
    print("| shapes | path | log-probs | prompt tokens | s/step | generate | reward | log-probs (old+ref) | update | "
          "passes | tokens/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    max_new_tokens, rows = args.max_new_tokens, []
    for shapes in (("recipe", "default") if args.shapes == "both" else (args.shapes,)):
        args.shapes, args.max_new_tokens = shapes, max_new_tokens or (60 if shapes == "recipe" else 48)
        with tempfile.TemporaryDirectory() as root:
            policy, reference, processor, batch, answers, task_names = build(args, dist, root)
            prompt_tokens = float(batch["attention_mask"].sum(1).float().mean())
            for path in args.paths.split(","):
                for impl in impls:
                    mean, peak = time_steps(args, device, policy, reference, processor, batch, answers, task_names,
                                            path == "shared", impl)
                    passes = mean["time/logprobs"] + mean["time/update"]
                    print(f"| {shapes} | {path} | {impl} | {prompt_tokens:.0f} | {mean['time/step']:.2f} | "
                          f"{mean['time/generate']:.2f} | {mean['time/reward']:.3f} | {mean['time/logprobs']:.2f} | "
                          f"{mean['time/update']:.2f} | {passes:.2f} | {mean['tokens_per_second']:.0f} | "
                          f"{peak:.0f} |", flush=True)
                    rows.append({"model": args.model, "shapes": shapes, "path": path, "impl": impl,
                                 "prompt_tokens": prompt_tokens, "peak_mib": peak, **mean})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle)


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
