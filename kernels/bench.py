"""Time and peak extra memory of fused_logprobs against the naive reference, forward and forward+backward.

    python -m kernels.bench                          # CUDA: bf16 Qwen shapes; CPU: fp32 N=2048 D=256 V=32000
    python -m kernels.bench --shapes 4096x2048x151936 --repeats 5

Methods: naive (logits -> log_softmax -> gather), kernel (Triton, CUDA only), fallback (chunked PyTorch), liger
(LigerFusedLinearCrossEntropyLoss with reduction="none", CUDA only, when installed). "fwd" runs under no_grad (the
old / reference policy passes); "fwd+bwd" backpropagates sum(g * logp) with a random g. Every (method, pass) runs
in a fresh process, so one method's cached memory never counts against another.
Memory, CPU: the process runs with MALLOC_MMAP_THRESHOLD_=65536 (large blocks are returned to the OS when freed);
peak extra = VmHWM after resetting it (/proc/self/clear_refs <- 5) minus RSS before the call. CUDA: peak minus
allocated before (torch.cuda.max_memory_allocated). Both include the required outputs (dh, dW).
Time: CUDA wall time; CPU process time with one thread (the dev box is shared, and wall time there swings ~2x).
Roofline: the matmul FLOPs of our scheme (2NDV forward, 8NDV forward+backward) at the measured matmul rate of the
device for this dtype; eff TFLOP/s = those FLOPs / measured time (for every method, so the column compares times).
Error: max |logp - fp64 reference from the same inputs|.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CPU_SHAPES = ["2048x256x32000"]
CUDA_SHAPES = [f"{n}x{d}x{v}" for n in (4096, 16384) for d in (2048, 3584) for v in (151936, 152064)]
TEMPERATURE = 0.7


# --------------------------------------------------------------------------------------------------------------
# one measurement (runs in a child process)


def _rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _make_call(method, hidden, weight, targets):
    from kernels.logprobs import fused_logprobs, reference_logprobs

    if method == "naive":
        return lambda: reference_logprobs(hidden, weight, targets, TEMPERATURE)
    if method == "kernel":
        return lambda: fused_logprobs(hidden, weight, targets, TEMPERATURE, impl="triton")
    if method == "fallback":
        return lambda: fused_logprobs(hidden, weight, targets, TEMPERATURE, impl="torch")
    if method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda: -loss(weight, hidden / TEMPERATURE, targets)
    raise ValueError(method)


def measure(method, mode, shape, dtype, device, repeats):
    n, dim, n_vocab = map(int, shape.split("x"))
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, dim, device=device, generator=gen).to(dtype).requires_grad_(mode == "fwd+bwd")
    weight = (torch.randn(n_vocab, dim, device=device, generator=gen) / dim ** 0.5 * 4).to(dtype)
    weight.requires_grad_(mode == "fwd+bwd")
    targets = torch.randint(0, n_vocab, (n,), device=device, generator=gen)
    upstream = torch.randn(n, device=device, generator=gen)
    call = _make_call(method, hidden, weight, targets)
    cuda = device == "cuda"

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return call()
        logp = call()
        (logp.float() * upstream).sum().backward()
        hidden.grad = weight.grad = None
        return logp

    step()  # warm-up (autotuning, first-touch of buffers)
    # CPU: process CPU time (one thread), not wall time: the 2-core dev box is shared and wall time swings 2x
    sync, clock = (torch.cuda.synchronize, time.perf_counter) if cuda else ((lambda: None), time.process_time)
    times = []
    for _ in range(repeats):
        sync()
        start = clock()
        step()
        sync()
        times.append(clock() - start)
    # memory: one more call with the peak reset; the gradients are set to None inside step, so they count
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logp = step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        before = _rss_kb("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        logp = step()
        peak = (_rss_kb("VmHWM:") - before) / 1024
    logp = logp.detach()
    call = None     # drops the closure's reference: the inputs' gradients and the kernel's buffers go with it
    with torch.no_grad():
        from kernels.logprobs import reference_logprobs

        truth = torch.cat([reference_logprobs(hidden[i:i + 1024].double(), weight.double(), targets[i:i + 1024],
                                              TEMPERATURE) for i in range(0, n, 1024)])
    error = (logp.double() - truth).abs().max().item()
    from kernels import logprobs
    return {"time": statistics.median(times), "peak_mb": peak, "error": error,
            "backward_gemm": logprobs.BACKWARD_GEMM if method == "kernel" and mode == "fwd+bwd" else None}


def matmul_rate(shape, dtype, device):
    """Measured FLOP/s of one [N, D] x [D, V] matmul in this dtype (the bulk of every method's work)."""
    n, dim, n_vocab = map(int, shape.split("x"))
    a = torch.randn(n, dim, device=device).to(dtype)
    b = torch.randn(n_vocab, dim, device=device).to(dtype)
    cuda = device == "cuda"
    sync, clock = (torch.cuda.synchronize, time.perf_counter) if cuda else ((lambda: None), time.process_time)
    a @ b.t()
    times = []
    for _ in range(3):
        sync()
        start = clock()
        a @ b.t()
        sync()
        times.append(clock() - start)
    return 2 * n * dim * n_vocab / min(times)


# --------------------------------------------------------------------------------------------------------------
# driver


def _child(args_list):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env.setdefault("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, "-m", "kernels.bench", "--worker", *args_list], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        return {"failed": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", help="NxDxV; default per device")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per (method, pass); median reported")
    parser.add_argument("--methods", nargs="*", help="subset of naive kernel fallback liger")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, mode, shape, dtype, device, repeats = args.worker
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(measure(method, mode, shape, getattr(torch, dtype), device, int(repeats))))
        return

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    methods = args.methods or (["naive", "kernel", "fallback", "liger"] if cuda else ["naive", "fallback"])
    if "liger" in methods:
        if importlib.util.find_spec("liger_kernel") is None:
            print("liger: not installed, skipped (pip install liger-kernel to compare)")
            methods.remove("liger")
    if not cuda:
        print("no CUDA: the Triton kernel and Liger run only in Triton's interpreter here (a correctness oracle, "
              "100x+ slower), so they are not timed")
        methods = [m for m in methods if m not in ("kernel", "liger")]
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    name = torch.cuda.get_device_name() if cuda else f"CPU, {os.environ.get('OMP_NUM_THREADS', '1')} thread(s)"
    print(f"device: {name}; dtype {dtype}; T = {TEMPERATURE}; median of {args.repeats}")
    gemm_paths = set()
    header = (f"| {'shape NxDxV':<18} | {'method':<8} | {'pass':<7} | {'time ms':>9} | {'x naive':>7} | "
              f"{'roofline ms':>11} | {'eff TFLOP/s':>11} | {'peak MB':>8} | {'x naive':>7} | {'max err':>7} |")
    for shape in args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES):
        n, dim, n_vocab = map(int, shape.split("x"))
        rate = matmul_rate(shape, getattr(torch, dtype), device)
        print(f"\n{shape}: measured {dtype} matmul rate {rate / 1e12:.3f} TFLOP/s")
        print(header)
        print("|" + "|".join("-" * (len(c) + 0) for c in header.split("|")[1:-1]) + "|")
        for mode, flops in (("fwd", 2 * n * dim * n_vocab), ("fwd+bwd", 8 * n * dim * n_vocab)):
            base = None
            for method in methods:
                r = _child([method, mode, shape, dtype, device, str(args.repeats)])
                if "failed" in r:
                    print(f"| {shape:<18} | {method:<8} | {mode:<7} | failed: {r['failed']}")
                    continue
                base = base or r
                if r.get("backward_gemm"):
                    gemm_paths.add(r["backward_gemm"])
                print(f"| {shape:<18} | {method:<8} | {mode:<7} | {r['time'] * 1e3:9.1f} | "
                      f"{r['time'] / base['time']:7.2f} | {flops / rate * 1e3:11.1f} | {flops / r['time'] / 1e12:11.3f}"
                      f" | {r['peak_mb']:8.0f} | {r['peak_mb'] / max(base['peak_mb'], 1e-9):7.3f} | "
                      f"{r['error']:7.1e} |", flush=True)
    for path in sorted(gemm_paths):   # the Triton backward's dh GEMM in low precision (bench/gpu_check.py reads it)
        print(f"backward dh GEMM: {path}")


if __name__ == "__main__":
    main()
