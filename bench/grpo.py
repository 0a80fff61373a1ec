"""Seconds per GRPO step and where they go, tokens/s and peak memory: shared-prompt rows against one row per
response, and the fused log-probs on and off; generation on the rollout engine against transformers' `generate`;
the memory of a rollout against its micro-batch.

    OMP_NUM_THREADS=1 python -m bench.grpo                                # tiny model, CPU: recipe-like + default
    OMP_NUM_THREADS=1 python -m bench.grpo --shapes default --paths shared,unshared --rollout-engine ssrl,hf
    OMP_NUM_THREADS=1 python -m bench.grpo --generation --mean-length 20  # generation only, both engines
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

Generation table (--generation, also printed by a plain run): the same prompts and n samples on each engine ("ssrl":
grpo.engine_generate; "ssrl+graph": with its decode step captured as a CUDA graph, --compile-decode; "hf":
transformers' generate, one prefill per prompt and its cache copied n times), --rollout-micro-batch-size prompts in
flight (per generate call for hf): generate seconds (median of --repeats after a warm-up), generated tokens per
second, the KV cache per prompt (the engine's allocation divided by its prompts in flight; for generate its largest
call's cache, n x (longest prompt + longest response) x its prompts, divided by them) and the peak memory of the
rollout above the loaded model (CPU: each engine in a fresh process, whose heap has not held another's). Random
weights rarely sample EOS, so every sample runs to the limit; --mean-length L adds stop tokens (every L-th id) so
that lengths spread roughly geometrically, as real responses do, which is where refilled slots matter.
Precision as the trainer has it: fp32 master weights and AdamW state; with a bf16 compute dtype (--dtype, auto: bf16
on CUDA) the policy computes through FSDP2's mixed precision on one process and the reference is bf16, so a real
preset's peak memory is what a one-GPU run of ssrl.py holds (~16 B per parameter + 2 B for the reference).
"""
import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import random
import tempfile
import time

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
            path = os.path.join(root, f"recipe-{side}-{seed}-{i}-{j}.jpg")
            if not os.path.isfile(path):      # rendered once per folder (--records), then reused
                with tasks.written_atomically(path) as temp:
                    tasks.render_scene(random.Random(f"{seed}:{i}:{j}"), side, side)[0].save(temp, "JPEG", quality=90)
            paths.append(path)
        records.append({"id": f"recipe-{i}", "task": "crop", "problem": "<image>" * count + rng.choice(questions),
                        "answer": "A", "images": paths})
    return records


def default_records(root, prompts):
    """The default run's prompts: the five tasks' samples at 112 px."""
    tasks.build_dataset(root, per_task=max(2, prompts // len(tasks.TASKS) + 1), eval_per_task=1, max_side=112,
                        progress=False, overwrite=True)
    return tasks.load_records(root, "train")[:prompts]


@contextlib.contextmanager
def prompt_folder(args):
    """Where the prompts' images go: --records for the recipe shapes (rendered once, then reused), else a
    temporary folder."""
    if args.records and args.shapes == "recipe":
        os.makedirs(args.records, exist_ok=True)
        yield args.records
    else:
        with tempfile.TemporaryDirectory() as root:
            yield root


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


def time_steps(args, device, policy, reference, processor, batch, answers, task_names, shared, impl, engine):
    grpo.LOGPROBS_IMPL = impl
    auto = args.rollout_micro_batch_size == "auto"
    cfg = grpo.GRPOConfig(num_generations=args.n, max_new_tokens=args.max_new_tokens, shared_prompt=shared,
                          rollout_engine=engine, rollout_micro_batch_size=16 if auto else args.rollout_micro_batch_size,
                          auto_rollout_micro_batch=auto, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
    optimizer = ssrl.adamw(policy.parameters(), 1e-6, 0.01, fused=device.type == "cuda")   # as the trainer's
    torch.manual_seed(0)
    warmup = dataclasses.replace(cfg, max_new_tokens=args.warmup_new_tokens or args.max_new_tokens)
    grpo.grpo_step(policy, reference, optimizer, batch, answers, task_names, processor, warmup)   # compiles, tunes
    peak_reset(device)
    runs = [grpo.grpo_step(policy, reference, optimizer, batch, answers, task_names, processor, cfg)[0]
            for _ in range(args.steps)]
    grpo.LOGPROBS_IMPL = None
    return {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}, peak_mib(device)


def generate_kv_bytes(batch, completion_mask, n, micro, per_token):
    """The largest KV cache of one `generate` call and its prompts: n copies of (longest prompt + longest response)
    per prompt of the call, prompts taken longest first as grpo.generate_completions takes them."""
    lengths = batch["attention_mask"].sum(1).cpu()
    responses = completion_mask.sum(1).view(-1, n).amax(1).cpu()                           # [B]
    order = torch.argsort(lengths, descending=True, stable=True)
    calls = [(len(chunk) * n * int(lengths[chunk].max() + responses[chunk].max()) * per_token, len(chunk))
             for chunk in order.split(micro or len(order))]
    return max(calls)


def generate_steps(batch, completion_mask, n, micro):
    """Decode steps of the `generate` calls: each runs to the longest sample of its prompts."""
    order = torch.argsort(batch["attention_mask"].sum(1).cpu(), descending=True, stable=True)
    longest = completion_mask.sum(1).view(-1, n).amax(1).cpu()                               # [B]
    return sum(int(longest[chunk].max()) for chunk in order.split(micro or len(order)))


def stop_ids(processor, model, mean_length):
    """EOS and, for --mean-length L, every L-th token id that is not special: with a random model's near-uniform
    next-token distribution a sample then stops after ~L tokens, geometrically spread."""
    tokenizer = processor.tokenizer
    ids = [tokenizer.eos_token_id]
    if mean_length:
        special = set(tokenizer.all_special_ids) | set(grpo.vision_token_ids(model))
        ids += [i for i in range(mean_length // 2, model.config.get_text_config().vocab_size, mean_length)
                if i not in special]
    return ids


def generate_row(args, dist, policy, processor, batch, engine, eager_ids=None):
    """One generation-table row: a warm-up, then --repeats timed runs on the same prompts, run r's prompt i seeded
    "r:i" on every engine (so that they draw the same samples, up to the logits' rounding). With `eager_ids`, the
    eager engine's completions of the last run, the row also gives the share of tokens that the captured step
    sampled alike (rounding differs between the two steps)."""
    device = dist.device
    policy.eval()
    tokenizer = processor.tokenizer
    stops = stop_ids(processor, policy, args.mean_length)
    name, compile_decode = engine.split("+")[0], engine.endswith("+graph")
    seconds, base = [], None
    for run in range(args.repeats + 1):
        seeds = [f"{run}:{i}" for i in range(len(batch["input_ids"]))]
        if run == min(1, args.repeats):
            peak_reset(device)
            base = peak_mib(device)
        start = grpo._clock(device)
        if name == "ssrl":
            out = grpo.engine_generate(policy, batch, args.n, args.max_new_tokens, 1.0, 1.0, stops,
                                       tokenizer.pad_token_id, args.rollout_micro_batch_size, seeds,
                                       max_prefill_tokens=args.max_tokens_per_micro_batch,
                                       compile_decode=compile_decode)
            mask, kv, steps = out.completion_mask, out.kv_bytes, out.steps
            per_prompt = kv / (out.slots // args.n)                 # the cache serves this many prompts at a time
        else:
            _, mask, _ = grpo.generate_completions(policy, batch, args.n, args.max_new_tokens, 1.0, 1.0, stops,
                                                   tokenizer.pad_token_id, args.rollout_micro_batch_size,
                                                   seeds=seeds, engine="hf")
            kv, prompts = generate_kv_bytes(batch, mask, args.n, args.rollout_micro_batch_size,
                                            grpo.kv_bytes_per_token(policy.config, torch.finfo(dist.dtype).bits // 8))
            per_prompt, steps = kv / prompts, generate_steps(batch, mask, args.n, args.rollout_micro_batch_size)
        seconds.append(grpo._clock(device) - start)
    timed = seconds[1:] or seconds
    median = sorted(timed)[len(timed) // 2]
    tokens, prompts = float(mask.sum()), len(batch["input_ids"])
    row = {"model": args.model, "shapes": args.shapes, "engine": engine, "prompts": prompts,
           "prompt_tokens": float(batch["attention_mask"].sum(1).float().mean()), "generated_tokens": tokens,
           "mean_length": tokens / (prompts * args.n), "generate_s": median, "tokens_per_s": tokens / median,
           "steps": steps, "kv_mib": kv / 2 ** 20, "kv_mib_per_prompt": per_prompt / 2 ** 20,
           "peak_mib": peak_mib(device) - base}
    if name == "ssrl" and eager_ids is not None:
        width = min(eager_ids.shape[1], out.completion_ids.shape[1])
        row["same_tokens_as_eager"] = float((eager_ids[:, :width] == out.completion_ids[:, :width]).float().mean())
    return row, (out.completion_ids if name == "ssrl" else None)


def generate_one(args, dist, engine):
    with prompt_folder(args) as root:
        policy, _, processor, batch, _, _ = build(args, dist, root)
    return generate_row(args, dist, policy, processor, batch, engine)[0]


def each_shape(args):
    """Each shape --shapes names, with args.shapes and args.max_new_tokens set for it (60 new tokens at the
    recipe-like shapes, 48 at the default run's, unless given); both flags as given again afterwards."""
    flag, max_new_tokens = args.shapes, args.max_new_tokens
    try:
        for shapes in (("recipe", "default") if flag == "both" else (flag,)):
            args.shapes, args.max_new_tokens = shapes, max_new_tokens or (60 if shapes == "recipe" else 48)
            yield shapes
    finally:
        args.shapes, args.max_new_tokens = flag, max_new_tokens


def generation_table(args, dist, engines):
    """The generation rows for each shape and engine. CPU: each row in a fresh process (peak resident memory), the
    engines in turn --pairs times (who goes first alternates): medians over the pairs and the median of each pair's
    ratio to the first engine. CUDA: in this process (peak allocated memory, reset per row), once."""
    import statistics
    import subprocess
    import sys
    print("| shapes | engine | prompts x n | prompt tokens | mean length | generate s | tokens/s | decode steps | "
          "KV MiB per prompt | peak MiB above the loaded model | generate s / first engine's (pairs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shapes in each_shape(args):
        runs = {engine: [] for engine in engines}
        if dist.device.type == "cuda":   # one model for every engine
            with prompt_folder(args) as root:
                policy, _, processor, batch, _, _ = build(args, dist, root)
            eager_ids = None
            for engine in engines:
                row, ids = generate_row(args, dist, policy, processor, batch, engine,
                                        eager_ids if engine == "ssrl+graph" else None)
                eager_ids = ids if engine == "ssrl" else eager_ids
                runs[engine].append(row)
        else:
            for pair in range(args.pairs):
                for engine in (engines if pair % 2 == 0 else engines[::-1]):
                    command = [sys.executable, "-m", "bench.grpo", "--generate-one", engine, "--shapes", shapes,
                               "--model", args.model, "--prompts", str(args.prompts), "--n", str(args.n),
                               "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats),
                               "--rollout-micro-batch-size", str(args.rollout_micro_batch_size),
                               "--max-tokens-per-micro-batch", str(args.max_tokens_per_micro_batch),
                               "--mean-length", str(args.mean_length), "--dtype", args.dtype]
                    for flag, value in (("--image-size", args.image_size), ("--layers", args.layers),
                                        ("--records", args.records)):
                        command += [flag, str(value)] if value else []
                    result = subprocess.run(command, capture_output=True, text=True, check=True)
                    runs[engine].append(json.loads(result.stdout.strip().splitlines()[-1]))
        first = runs[engines[0]]
        for engine in engines:
            row = dict(runs[engine][-1])
            for key in ("generate_s", "tokens_per_s", "peak_mib"):
                row[key] = statistics.median(run[key] for run in runs[engine])
            row["pairs"] = len(runs[engine])
            row["ratio_to_first"] = statistics.median(run["generate_s"] / base["generate_s"]
                                                      for run, base in zip(runs[engine], first))
            rows.append(row)
            steps = str(row["steps"])
            same = f" ({row['same_tokens_as_eager']:.1%} of tokens as eager)" if "same_tokens_as_eager" in row else ""
            print(f"| {shapes} | {engine}{same} | {row['prompts']} x {args.n} | {row['prompt_tokens']:.0f} | "
                  f"{row['mean_length']:.1f} | {row['generate_s']:.2f} | {row['tokens_per_s']:.0f} | {steps} | "
                  f"{row['kv_mib_per_prompt']:.2f} | {row['peak_mib']:.0f} | {row['ratio_to_first']:.2f} "
                  f"({row['pairs']}) |", flush=True)
    return rows


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
    with prompt_folder(args) as root:
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
    parser.add_argument("--rollout-engine", default=None, help="comma-separated: ssrl, hf (and ssrl+graph in the "
                        "generation table); default: ssrl for the step table, ssrl,hf for the generation table")
    parser.add_argument("--compile-decode", action="store_true", help="CUDA: also the engine with its decode step "
                        "captured as a CUDA graph (ssrl+graph) in the generation table")
    parser.add_argument("--generation", action="store_true", help="only the generation table")
    parser.add_argument("--no-generation", action="store_true", help="only the step table")
    parser.add_argument("--mean-length", type=int, default=0, help="generation table: stop tokens so that samples "
                        "end after ~L tokens (0: only EOS, which random weights rarely sample)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation runs per engine (after 1 warm-up)")
    parser.add_argument("--pairs", type=int, default=1, help="CPU: processes per engine in the generation table, "
                        "run in turn (medians and per-pair ratios)")
    parser.add_argument("--generate-one", metavar="ENGINE", help=argparse.SUPPRESS)
    parser.add_argument("--impls", default=None, help="comma-separated grpo.LOGPROBS_IMPL values (default: the "
                        "device's fused path only; add 'reference' for [tokens x vocab] logits)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (x n responses)")
    parser.add_argument("--n", type=int, default=5, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 60 recipe, 48 default")
    parser.add_argument("--image-size", type=int, default=None, help="image side in px (default 364 / 112)")
    parser.add_argument("--rollout-micro-batch-size", type=ssrl.micro_batch_flag, default=16,
                        help="prompts in flight (hf: per generate call); step table: or auto (from free GPU memory, "
                        "as ssrl.py's presets)")
    parser.add_argument("--warmup-new-tokens", type=int, default=None, help="new tokens of the untimed warm-up step "
                        "(default: --max-new-tokens); it compiles and tunes kernels, so a few tokens do")
    parser.add_argument("--records", metavar="DIR", default=None, help="recipe shapes: render the prompts' images "
                        "into DIR once and reuse them (default: a temporary folder per run)")
    parser.add_argument("--render-only", action="store_true", help="with --records: render the images and exit")
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--rollout-memory", action="store_true", help="only the rollout memory table")
    parser.add_argument("--rollout-batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--rollout-one", type=int, nargs=2, metavar=("B", "M"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="compute dtype, as ssrl.py")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE (bench/gpu_check.py reads it)")
    args = parser.parse_args()
    if args.render_only:
        started = time.perf_counter()
        os.makedirs(args.records, exist_ok=True)
        records = recipe_records(args.records, args.prompts, args.image_size or 364)
        print(f"{len(records)} prompts, {sum(len(r['images']) for r in records)} images of {args.image_size or 364} "
              f"px in {args.records} ({time.perf_counter() - started:.0f} s)")
        return
    if args.rollout_micro_batch_size == "auto" and not args.no_generation:
        parser.error("--rollout-micro-batch-size auto sizes the step table only: add --no-generation")
    dist = ssrl.compute_init(args.dtype)
    device = dist.device
    if args.rollout_memory or args.rollout_one:
        args.shapes, args.max_new_tokens = "recipe", args.max_new_tokens or 60
        return rollout_one(args, dist, *args.rollout_one) if args.rollout_one else rollout_memory(args)
    if args.generate_one:
        print(json.dumps(generate_one(args, dist, args.generate_one)))
        return
    generation_rows = []
    if not args.no_generation:
        engines = (args.rollout_engine or "ssrl,hf").split(",")
        if args.compile_decode and "ssrl+graph" not in engines:   # after the eager engine, whose tokens it compares
            engines.insert(engines.index("ssrl") + 1 if "ssrl" in engines else len(engines), "ssrl+graph")
        generation_rows = generation_table(args, dist, engines)
        if args.generation:
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(generation_rows, handle)
            return
        print()
    impls = (args.impls or ("triton" if device.type == "cuda" else "torch")).split(",")
    print("| shapes | path | engine | log-probs | prompt tokens | s/step | generate | reward | log-probs (old+ref) | "
          "update | passes | tokens/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shapes in each_shape(args):
        with prompt_folder(args) as root:
            policy, reference, processor, batch, answers, task_names = build(args, dist, root)
            prompt_tokens = float(batch["attention_mask"].sum(1).float().mean())
            for path, engine, impl in itertools.product(args.paths.split(","),
                                                        (args.rollout_engine or "ssrl").split(","), impls):
                mean, peak = time_steps(args, device, policy, reference, processor, batch, answers, task_names,
                                        path == "shared", impl, engine)
                passes = mean["time/logprobs"] + mean["time/update"]
                print(f"| {shapes} | {path} | {engine} | {impl} | {prompt_tokens:.0f} | {mean['time/step']:.2f} | "
                      f"{mean['time/generate']:.2f} | {mean['time/reward']:.3f} | {mean['time/logprobs']:.2f} | "
                      f"{mean['time/update']:.2f} | {passes:.2f} | {mean['tokens_per_second']:.0f} | "
                      f"{peak:.0f} |", flush=True)
                rows.append({"model": args.model, "shapes": shapes, "path": path, "engine": engine, "impl": impl,
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
