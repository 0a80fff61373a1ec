"""The GPU check: one command for the minutes a GPU is lent, printing one table of what only a GPU can show.

    python -m bench.gpu_check                      # everything, under 10 minutes on one H200 (no network needed)
    python -m bench.gpu_check --only kernels grpo-3b engine-3b
    python -m bench.gpu_check --dry-run            # the commands it would run; works anywhere (CI runs it)

Sections, each a subprocess with its own time limit (a failure or a timeout is a row of the table, not a crash):
  kernel-tests  tests/test_kernels.py with the Triton kernels compiled for real (no interpreter): fp32, bf16, the
                151,936 / 152,064-word vocabulary tails, gradients against fp64
  kernels       python -m kernels.bench at Qwen shapes (N x D x V = 4096 x 2048 x 151,936 and 16384 x 3584 x
                152,064, bf16): milliseconds, effective TFLOP/s and peak memory of the fused kernel against naive
                logits and the chunked fallback
  grpo-3b       python -m bench.grpo: qwen2.5-vl-3b with --init random, the per-GPU share of the recipe batch (256
  grpo-4b       prompts / 8 GPUs = 32 prompts x 5 responses, 2 updates, KL), 2-5 images of 512 x 512 px per prompt
                (5-image crop prompts included), 200 new tokens, shared prompts, fp32 master weights with bf16
                compute and a bf16 reference (what a one-GPU ssrl.py run holds): seconds per step and its split,
                tokens/s, peak memory; the same for qwen3-vl-4b
  engine-3b     python -m bench.grpo --generation: qwen2.5-vl-3b, 16 recipe prompts x 5 samples of up to 128 tokens
                (stop tokens end them after ~48, spread as real responses are), 4 prompts in flight (per generate
                call): transformers' generate, the rollout engine, and the engine with its decode step captured as a
                CUDA graph (--compile-decode): generate seconds, tokens/s, KV cache per prompt, peak memory, and
                the share of tokens the captured step sampled as the eager one did (same seeds)
  tiny-bf16     the default run (python ssrl.py) in bf16 on the GPU with 20 GRPO steps: format learnt, no NaN
Results also go to OUT/gpu_check.json. Put the table, with the GPU's name, in the README and your note.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

GRPO_FLAGS = ["--shapes", "recipe", "--image-size", "512", "--prompts", "32", "--max-new-tokens", "200",
              "--paths", "shared", "--steps", "1", "--rollout-micro-batch-size", "16", "--dtype", "bf16",
              "--no-generation"]
ENGINE_FLAGS = ["--generation", "--shapes", "recipe", "--image-size", "512", "--prompts", "16", "--max-new-tokens",
                "128", "--mean-length", "48", "--rollout-micro-batch-size", "4", "--rollout-engine", "hf,ssrl",
                "--compile-decode", "--repeats", "1", "--dtype", "bf16"]


def sections(out):
    """name -> (command, time limit in seconds, environment changes). The limits add up to one 600-s command;
    engine-3b's 90 s came out of the others before any of them had run on a GPU."""
    python = sys.executable
    return {
        "kernel-tests": ([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"], 80,
                         {"TRITON_INTERPRET": None}),
        "kernels": ([python, "-m", "kernels.bench", "--shapes", "4096x2048x151936", "16384x3584x152064",
                     "--methods", "naive", "kernel", "fallback", "--repeats", "3"], 110, {}),
        "grpo-3b": ([python, "-m", "bench.grpo", "--model", "qwen2.5-vl-3b", *GRPO_FLAGS,
                     "--json", str(out / "grpo-3b.json")], 110, {}),
        "engine-3b": ([python, "-m", "bench.grpo", "--model", "qwen2.5-vl-3b", *ENGINE_FLAGS,
                       "--json", str(out / "engine-3b.json")], 90, {}),
        "grpo-4b": ([python, "-m", "bench.grpo", "--model", "qwen3-vl-4b", *GRPO_FLAGS,
                     "--json", str(out / "grpo-4b.json")], 110, {}),
        "tiny-bf16": ([python, "ssrl.py", "--dtype", "bf16", "--max-steps", "10", "--out", str(out / "tiny-bf16"),
                       "--data", str(out / "tiny-data")], 100, {}),
    }


# ---------------------------------------------------------------------------------------------------------------
# What each section's output becomes: rows of (section, item, figure, value)

def parse_kernel_tests(stdout, out):
    passed = re.search(r"(\d+) passed", stdout)
    failed = re.search(r"(\d+) failed", stdout)
    return [("kernel-tests", "tests/test_kernels.py", "passed / failed",
             f"{passed.group(1) if passed else 0} / {failed.group(1) if failed else 0}")]


def parse_kernels(stdout, out):
    """The rows of kernels.bench's tables: | shape | method | pass | time ms | x naive | roofline | TFLOP/s | MB |..."""
    rows = []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+x\d+x\d+", cells[0]) and re.fullmatch(r"[\d.]+", cells[3]):
            item = f"{cells[0]} {cells[1]} {cells[2]}"
            rows += [("kernels", item, "ms", cells[3]), ("kernels", item, "TFLOP/s", cells[6]),
                     ("kernels", item, "peak MB", cells[7]), ("kernels", item, "max error", cells[9])]
        elif "failed:" in line:
            rows.append(("kernels", " ".join(cells[:3]), "failed", cells[3][:80]))
    return rows


def parse_grpo(section):
    def parse(stdout, out):
        rows = []
        for result in json.loads((out / f"{section}.json").read_text()):
            item = f"{result['model']} {result['path']}"
            rows += [(section, item, "s/step", f"{result['time/step']:.1f}"),
                     (section, item, "generate / log-probs / update s",
                      f"{result['time/generate']:.1f} / {result['time/logprobs']:.1f} / {result['time/update']:.1f}"),
                     (section, item, "tokens/s", f"{result['tokens_per_second']:.0f}"),
                     (section, item, "mean prompt tokens", f"{result['prompt_tokens']:.0f}"),
                     (section, item, "peak GiB", f"{result['peak_mib'] / 1024:.1f}")]
        return rows
    return parse


def parse_engine(section):
    def parse(stdout, out):
        rows = []
        for result in json.loads((out / f"{section}.json").read_text()):
            item = f"{result['model']} {result['engine']}"
            rows += [(section, item, "generate s", f"{result['generate_s']:.1f}"),
                     (section, item, "tokens/s", f"{result['tokens_per_s']:.0f}"),
                     (section, item, "mean length", f"{result['mean_length']:.0f}"),
                     (section, item, "KV MiB per prompt", f"{result['kv_mib_per_prompt']:.0f}"),
                     (section, item, "peak GiB", f"{result['peak_mib'] / 1024:.1f}")]
            if "same_tokens_as_eager" in result:
                rows.append((section, item, "tokens as eager", f"{result['same_tokens_as_eager']:.3f}"))
        return rows
    return parse


def parse_tiny(stdout, out):
    run = out / "tiny-bf16"
    rows = []
    for stage in ("base", "sft", "grpo"):
        result = json.loads((run / f"eval-{stage}.json").read_text())["all"]
        rows.append(("tiny-bf16", f"eval {stage}", "format / accuracy", f"{result['format']:.3f} / "
                     f"{result['accuracy']:.3f}"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finite = all(math.isfinite(row[key]) for row in metrics for key in ("loss", "grad_norm") if key in row)
    skipped = sum(row.get("num_skipped_updates", 0) for row in metrics)
    steps = [row["time/step"] for row in metrics if "time/step" in row]
    rows += [("tiny-bf16", "metrics", "all finite / skipped updates", f"{finite} / {skipped}"),
             ("tiny-bf16", "grpo", "s/step (median)", f"{sorted(steps)[len(steps) // 2]:.2f}" if steps else "-")]
    return rows


PARSERS = {"kernel-tests": parse_kernel_tests, "kernels": parse_kernels, "grpo-3b": parse_grpo("grpo-3b"),
           "engine-3b": parse_engine("engine-3b"), "grpo-4b": parse_grpo("grpo-4b"), "tiny-bf16": parse_tiny}


def table(rows):
    lines = ["| section | item | figure | value |", "|---|---|---|---|"]
    lines += [f"| {section} | {item} | {figure} | {value} |" for section, item, figure, value in rows]
    return "\n".join(lines)


def run_section(name, command, limit, env_changes, out):
    env = dict(os.environ)
    for key, value in env_changes.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return [(name, "section", "failed", f"timed out after {limit} s")]
    seconds = time.perf_counter() - start
    (out / f"{name}.log").write_text(result.stdout + "\n" + result.stderr)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["?"])[-1]
        return [(name, "section", "failed", f"exit {result.returncode}: {last[:120]}")]
    try:
        rows = PARSERS[name](result.stdout, out)
    except (OSError, ValueError, KeyError) as error:
        rows = [(name, "section", "unreadable output", str(error)[:120])]
    return rows + [(name, "section", "seconds", f"{seconds:.0f}")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(PARSERS), help="these sections only")
    parser.add_argument("--out", default="runs/gpu_check", help="logs, JSON results and the tiny run")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--budget", type=int, default=560, help="seconds for all sections together: each gets at "
                        "most what is left (a lent GPU gives one command at most 600 s)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    plan = {name: spec for name, spec in sections(out).items() if not args.only or name in args.only}
    if args.dry_run:
        for name, (command, limit, _) in plan.items():
            print(f"{name} (<= {limit} s): {' '.join(command)}")
        return []
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("error: the GPU check needs CUDA (--dry-run lists what it would run)")
    out.mkdir(parents=True, exist_ok=True)
    rows = [("device", torch.cuda.get_device_name(), "torch / CUDA", f"{torch.__version__} / {torch.version.cuda}")]
    deadline = time.perf_counter() + args.budget
    for name, (command, limit, env_changes) in plan.items():
        left = int(deadline - time.perf_counter())
        if left < 20:
            rows.append((name, "section", "skipped", "out of time"))
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows += run_section(name, command, min(limit, left), env_changes, out)
    print(table(rows))
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
