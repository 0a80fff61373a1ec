"""Seconds per GRPO step and where they go, tokens/s and peak memory, with the fused log-probs on and off.

    OMP_NUM_THREADS=1 python -m bench.grpo                                   # tiny Qwen2.5-VL on the CPU
    python -m bench.grpo --model qwen2.5-vl-3b --prompts 16 --max-new-tokens 256   # real shape, random init, CUDA

Each variant runs `grpo.grpo_step` on the same prompts (procedural pretext-task samples from tasks.py, encoded by
ssrl.encode_prompts) after one warm-up step, with `grpo.LOGPROBS_IMPL` set to each of --impls: "triton" (the fused
kernel, CUDA) or "torch" (its chunked PyTorch fallback, CPU) are the fused log-probs on; "reference" materialises
[tokens x vocab] logits (log_softmax + gather): the fused log-probs off. A model from random init rarely
samples EOS, so responses run to --max-new-tokens: the step length is fixed, which is what a timing wants.
Peak memory: CUDA max_memory_allocated, or the process's peak RSS on the CPU (reset before each variant).
"""
import argparse
import copy
import os
import tempfile

import torch

import grpo
import ssrl
import tasks


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


def build(args, device):
    family = ssrl.PRESETS[args.model][0]
    root = tempfile.mkdtemp(prefix="bench-grpo-")
    tasks.build_dataset(root, per_task=max(2, args.prompts // len(tasks.TASKS) + 1), eval_per_task=1,
                        max_side=args.image_size, progress=False, overwrite=True)
    records = tasks.load_records(root, "train")[:args.prompts]
    if ssrl.PRESETS[args.model][1] is None:
        policy, processor = ssrl.build_tiny(family, ssrl.tokenizer_corpus(records))
    else:
        from transformers import AutoModelForImageTextToText
        processor = ssrl.build_tiny_processor(family, ssrl.tokenizer_corpus(records))
        with torch.device(device):
            policy = AutoModelForImageTextToText.from_config(ssrl.real_config(args.model, processor.tokenizer),
                                                             dtype=torch.bfloat16, attn_implementation="sdpa")
        policy.gradient_checkpointing_enable()
    policy.to(device)
    pixels = args.image_size ** 2
    batch = ssrl.to_device(ssrl.encode_prompts(processor, records, [tasks.open_images(r) for r in records],
                                               min_pixels=pixels // 4, max_pixels=pixels), device)
    return policy, processor, batch, [r["answer"] for r in records], [r["task"] for r in records]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2.5-vl", choices=list(ssrl.PRESETS))
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (x n responses)")
    parser.add_argument("--n", type=int, default=5, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=112, help="longest image side in pixels")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="sequences per pass (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--impls", default=None, help="comma-separated grpo.LOGPROBS_IMPL values (default: the "
                        "device's fused path, then reference: triton,reference on CUDA, torch,reference on a CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    policy, processor, batch, answers, task_names = build(args, device)
    reference = copy.deepcopy(policy).eval()
    micro = args.micro_batch_size or args.prompts * args.n
    cfg = grpo.GRPOConfig(num_generations=args.n, max_new_tokens=args.max_new_tokens, micro_batch_size=micro,
                          logprob_micro_batch_size=micro)
    print(f"{args.model} on {device}: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, vocab "
          f"{policy.config.get_text_config().vocab_size}, {args.prompts} prompts x {args.n}, prompt length "
          f"{batch['input_ids'].shape[1]}, max new tokens {args.max_new_tokens}, {args.steps} steps per variant")
    rows = []
    for impl in (args.impls or ("triton" if device.type == "cuda" else "torch") + ",reference").split(","):
        grpo.LOGPROBS_IMPL = impl
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.01)
        torch.manual_seed(0)
        grpo.grpo_step(policy, reference, optimizer, batch, answers, task_names, processor, cfg)   # warm-up
        peak_reset(device)
        runs = [grpo.grpo_step(policy, reference, optimizer, batch, answers, task_names, processor, cfg)[0]
                for _ in range(args.steps)]
        mean = {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
        rows.append((impl, mean, peak_mib(device)))
    grpo.LOGPROBS_IMPL = None
    print("| log-probs | s/step | generate | reward | log-probs (old+ref) | update | tokens/s | response length "
          "| peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for impl, mean, peak in rows:
        print(f"| {impl} | {mean['time/step']:.2f} | {mean['time/generate']:.2f} | {mean['time/reward']:.3f} | "
              f"{mean['time/logprobs']:.2f} | {mean['time/update']:.2f} | {mean['tokens_per_second']:.0f} | "
              f"{mean['completions/mean_length']:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
