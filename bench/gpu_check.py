"""The GPU check: one command for the minutes a GPU is lent, printing one table of what only a GPU can show.

    python -m bench.gpu_check                      # everything, within --budget (560 s) on one H200, no network
    python -m bench.gpu_check --only kernels grpo-3b engine-3b
    python -m bench.gpu_check --dry-run            # preflight and plan, runs nothing; works anywhere (CI runs it)

First a preflight row per requirement, each saying in one line what is missing and how to get it: the GPU and its
free memory, the driver against the one torch's CUDA wheel needs (CUDA 13.0, torch 2.13's default wheel, needs a
driver >= 580), a C compiler and Python.h (Triton builds its launcher with them on first use), pytest. What a
missing piece rules out is skipped with its reason; the rest still runs (without a compiler the GRPO sections run
the chunked PyTorch log-probs instead of the Triton kernel, and say so).

Sections, each a subprocess with its own time limit; the limits add up within --budget (a failure or a timeout is
a row of the table, not a crash):
  images        renders the GRPO and engine sections' recipe prompts once (bench.grpo --render-only), so that
                their limits time the model, not numpy drawing 100 scenes
  kernel-tests  tests/test_kernels.py with the Triton kernels compiled for real (no interpreter): fp32, bf16, the
                151,936 / 152,064-word vocabulary tails, gradients against fp64
  kernels       python -m kernels.bench at Qwen shapes (N x D x V = 4096 x 2048 x 151,936 and 16384 x 3584 x
                152,064, bf16): milliseconds, effective TFLOP/s and peak memory of the fused kernel against naive
                logits and the chunked fallback, and which GEMM its backward ran (torch.addmm with
                out_dtype=float32, or the bf16 fallback where that is refused)
  grpo-3b       python -m bench.grpo: qwen2.5-vl-3b with --init random, the per-GPU share of the recipe batch (256
  grpo-4b       prompts / 8 GPUs = 32 prompts x 5 responses, 2 updates, KL), 2-5 images of 512 x 512 px per prompt
                (5-image crop prompts included), 200 new tokens (a 16-token warm-up step first), shared prompts,
                fp32 master weights with bf16 compute and a bf16 reference (what a one-GPU ssrl.py run holds):
                seconds per step and its split, tokens/s, peak memory; the same for qwen3-vl-4b
  engine-3b     python -m bench.grpo --generation: qwen2.5-vl-3b, 16 of those prompts x 5 samples of up to 128
                tokens (stop tokens end them after ~48, spread as real responses are), 4 prompts in flight (per
                generate call): transformers' generate, the rollout engine, and the engine with its decode step
                captured as a CUDA graph (--compile-decode): generate seconds, tokens/s, KV cache per prompt, peak
                memory, and the share of tokens the captured step sampled as the eager one did (same seeds)
  tiny-bf16     the default run (python ssrl.py) in bf16 on the GPU with 10 GRPO steps: format learnt, no NaN
Results also go to OUT/gpu_check.json. Put the table, with the GPU's name, in the README and your note.
"""
import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

GRPO_FLAGS = ["--shapes", "recipe", "--image-size", "512", "--prompts", "32", "--max-new-tokens", "200",
              "--warmup-new-tokens", "16", "--paths", "shared", "--steps", "1", "--rollout-micro-batch-size", "16",
              "--dtype", "bf16", "--no-generation"]
ENGINE_FLAGS = ["--generation", "--shapes", "recipe", "--image-size", "512", "--prompts", "16", "--max-new-tokens",
                "128", "--mean-length", "48", "--rollout-micro-batch-size", "4", "--rollout-engine", "hf,ssrl",
                "--compile-decode", "--repeats", "1", "--dtype", "bf16"]
# The driver each CUDA major version of torch's wheels needs (NVIDIA's CUDA toolkit release notes, table 3: 13.x
# >= 580; 12.x >= 525 through minor-version compatibility).
MIN_DRIVER = {"13": 580, "12": 525}
BUDGET = 560      # a lent GPU runs one command for at most 600 s; 40 s for Python, CUDA start-up and the table


def sections(out, triton=True):
    """name -> (command, time limit in seconds, environment changes). Without Triton (no C compiler or Python.h)
    the GRPO sections and the tiny run use the chunked PyTorch log-probs (grpo.LOGPROBS_IMPL). The limits add up to
    BUDGET: engine-3b's 75 s came out of the others before any of them had run on a GPU."""
    python = sys.executable
    impls = [] if triton else ["--impls", "torch"]
    records = ["--records", str(out / "images")]
    return {
        "images": ([python, "-m", "bench.grpo", *GRPO_FLAGS, *records, "--render-only"], 25, {}),
        "kernel-tests": ([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"], 60,
                         {"TRITON_INTERPRET": None}),
        "kernels": ([python, "-m", "kernels.bench", "--shapes", "4096x2048x151936", "16384x3584x152064",
                     "--methods", "naive", "kernel", "fallback", "--repeats", "3"], 90, {}),
        "grpo-3b": ([python, "-m", "bench.grpo", "--model", "qwen2.5-vl-3b", *GRPO_FLAGS, *records, *impls,
                     "--json", str(out / "grpo-3b.json")], 120, {}),
        "engine-3b": ([python, "-m", "bench.grpo", "--model", "qwen2.5-vl-3b", *ENGINE_FLAGS, *records,
                       "--json", str(out / "engine-3b.json")], 75, {}),
        "grpo-4b": ([python, "-m", "bench.grpo", "--model", "qwen3-vl-4b", *GRPO_FLAGS, *records, *impls,
                     "--json", str(out / "grpo-4b.json")], 100, {}),
        "tiny-bf16": ([python, "ssrl.py", "--dtype", "bf16", "--max-steps", "10", "--out", str(out / "tiny-bf16"),
                       "--data", str(out / "tiny-data")], 90, {} if triton else {"SSRL_LOGPROBS_IMPL": "torch"}),
    }


# ---------------------------------------------------------------------------------------------------------------
# Preflight: what the sections need, one row each; `blocked` says which sections cannot run and why

def nvidia_smi():
    """(name, driver version, free MiB) of GPU 0 from nvidia-smi, or None without it (it needs no CUDA from torch,
    so it still answers when the driver is too old for torch's wheel)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.free",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.strip().splitlines()
    if result.returncode or not lines:
        return None
    name, driver, free = [cell.strip() for cell in lines[0].split(",")][:3]
    return name, driver, free


def c_compiler():
    """The compiler Triton would use to build its launcher (triton/runtime/build.py: $CC, else gcc, else clang)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def python_header():
    """Python.h where Triton looks for it (the include path of the running interpreter's install scheme)."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    return Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"


def preflight(smi=None, cuda_available=None, wheel_cuda=None, compiler=None, header=None, pytest_found=None,
              free_bytes=None):
    """(rows, blocked): a row per requirement and {section or "all": reason} for what cannot run. Every argument
    defaults to what this machine has; tests pass their own."""
    import torch
    smi = nvidia_smi() if smi is None else smi
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    wheel_cuda = torch.version.cuda if wheel_cuda is None else wheel_cuda
    compiler = c_compiler() if compiler is None else compiler
    header = python_header().is_file() if header is None else header
    pytest_found = importlib.util.find_spec("pytest") is not None if pytest_found is None else pytest_found
    rows, blocked = [], {}

    def row(item, ok, value, problem=None):
        rows.append(("preflight", item, "ok" if ok else "MISSING", value if ok else problem))

    name, driver, _ = smi or ("none", None, None)
    row("GPU", smi is not None, name, "no NVIDIA GPU or driver found (nvidia-smi missing or failing)")
    if smi is None and not cuda_available:
        blocked["all"] = "no NVIDIA GPU or driver"
    needed = MIN_DRIVER.get((wheel_cuda or "").split(".")[0])
    too_old = driver and needed and int(driver.split(".")[0]) < needed
    row("driver / wheel CUDA", bool(driver) and not too_old and bool(wheel_cuda), f"{driver} / {wheel_cuda}",
        f"torch {torch.__version__} is a CPU wheel: pip install torch==2.13.0 (CUDA 13.0) or its cu128 wheel"
        if not wheel_cuda else f"driver {driver} is older than {needed}, which torch's CUDA {wheel_cuda} wheel needs: "
        "update the driver, or pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
        if too_old else "no driver version (nvidia-smi did not answer)")
    if not wheel_cuda or too_old or not cuda_available:
        blocked.setdefault("all", "CUDA is not usable from torch" if wheel_cuda and not too_old else
                           "torch's CUDA wheel cannot run on this driver" if too_old else "torch has no CUDA")
    row("C compiler", bool(compiler), str(compiler), "no C compiler for Triton's launcher: apt-get install gcc "
        "(or set CC)")
    row("Python.h", header, str(python_header()), f"no {python_header()} for Triton's launcher: apt-get install "
        f"python{sys.version_info.major}.{sys.version_info.minor}-dev")
    if not (compiler and header):
        blocked["triton"] = "Triton cannot build its launcher (" + ("no C compiler" if not compiler else
                                                                    "no Python.h") + ")"
        for section in ("kernel-tests", "kernels"):
            blocked[section] = blocked["triton"]
    row("pytest", pytest_found, "installed", "pytest is not installed: pip install -r requirements-dev.txt")
    if not pytest_found:
        blocked.setdefault("kernel-tests", "pytest is not installed (pip install -r requirements-dev.txt)")
    if free_bytes is None and cuda_available:
        free_bytes = torch.cuda.mem_get_info()[0]
    if free_bytes is not None:
        row("free GPU memory", True, f"{free_bytes / 2 ** 30:.1f} GiB")
    return rows, blocked


# ---------------------------------------------------------------------------------------------------------------
# What each section's output becomes: rows of (section, item, figure, value)

def parse_images(stdout, out):
    return [("images", "recipe prompts", "rendered", stdout.strip().splitlines()[-1][:80] if stdout.strip() else "-")]


def parse_kernel_tests(stdout, out):
    passed = re.search(r"(\d+) passed", stdout)
    failed = re.search(r"(\d+) failed", stdout)
    return [("kernel-tests", "tests/test_kernels.py", "passed / failed",
             f"{passed.group(1) if passed else 0} / {failed.group(1) if failed else 0}")]


def parse_kernels(stdout, out):
    """The rows of kernels.bench's tables: | shape | method | pass | time ms | x naive | roofline | TFLOP/s | MB |...,
    and the backward's GEMM path."""
    rows = []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+x\d+x\d+", cells[0]) and re.fullmatch(r"[\d.]+", cells[3]):
            item = f"{cells[0]} {cells[1]} {cells[2]}"
            rows += [("kernels", item, "ms", cells[3]), ("kernels", item, "TFLOP/s", cells[6]),
                     ("kernels", item, "peak MB", cells[7]), ("kernels", item, "max error", cells[9])]
        elif "failed:" in line:
            rows.append(("kernels", " ".join(cells[:3]), "failed", cells[3][:80]))
        elif line.startswith("backward dh GEMM:"):
            rows.append(("kernels", "fused backward", "dh GEMM", line.split(":", 1)[1].strip()[:100]))
    return rows


def parse_grpo(section):
    def parse(stdout, out):
        rows = []
        for result in json.loads((out / f"{section}.json").read_text()):
            item = f"{result['model']} {result['path']} {result['impl']}"
            rows += [(section, item, "s/step", f"{result['time/step']:.1f}"),
                     (section, item, "generate / log-probs / update s",
                      f"{result['time/generate']:.1f} / {result['time/logprobs']:.1f} / {result['time/update']:.1f}"),
                     (section, item, "tokens/s", f"{result['tokens_per_second']:.0f}"),
                     (section, item, "mean prompt tokens", f"{result['prompt_tokens']:.0f}"),
                     (section, item, "rollout micro-batch", f"{result.get('rollout_micro_batch_size', '-')}"),
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


PARSERS = {"images": parse_images, "kernel-tests": parse_kernel_tests, "kernels": parse_kernels,
           "grpo-3b": parse_grpo("grpo-3b"), "engine-3b": parse_engine("engine-3b"), "grpo-4b": parse_grpo("grpo-4b"),
           "tiny-bf16": parse_tiny}


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
    except (OSError, ValueError, KeyError, IndexError) as error:
        rows = [(name, "section", "unreadable output", str(error)[:120])]
    return rows + [(name, "section", "seconds", f"{seconds:.0f}")]


def plan(out, only, blocked, budget):
    """(sections to run, skipped rows): what preflight allows, in order; refused unless the limits fit the budget."""
    chosen = {name: spec for name, spec in sections(out, "triton" not in blocked).items()
              if not only or name in only or (name == "images" and set(only) & {"grpo-3b", "engine-3b", "grpo-4b"})}
    skipped = []
    for name in list(chosen):
        reason = blocked.get("all") or blocked.get(name)
        if reason:
            skipped.append((name, "section", "skipped", reason))
            del chosen[name]
    total = sum(limit for _, limit, _ in chosen.values())
    if total > budget:
        raise SystemExit(f"error: the sections' limits add up to {total} s, over the {budget}-s budget")
    return chosen, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(PARSERS), help="these sections only")
    parser.add_argument("--out", default="runs/gpu_check", help="logs, JSON results and the tiny run")
    parser.add_argument("--dry-run", action="store_true", help="preflight and the plan, run nothing")
    parser.add_argument("--budget", type=int, default=BUDGET, help="seconds for all sections together: their "
                        "limits must add up within it, and each gets at most what is left")
    args = parser.parse_args(argv)
    out = Path(args.out)
    checks, blocked = preflight()
    chosen, skipped = plan(out, args.only, blocked, args.budget)
    if args.dry_run:
        print(table(checks + skipped))
        for name, (command, limit, _) in chosen.items():
            print(f"{name} (<= {limit} s): {' '.join(command)}")
        print(f"limits {sum(limit for _, limit, _ in chosen.values())} s of the {args.budget}-s budget")
        return checks + skipped
    out.mkdir(parents=True, exist_ok=True)
    import torch
    rows = checks + ([("device", torch.cuda.get_device_name(), "torch / CUDA",
                       f"{torch.__version__} / {torch.version.cuda}")] if "all" not in blocked else []) + skipped
    deadline = time.perf_counter() + args.budget
    for name, (command, limit, env_changes) in chosen.items():
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
