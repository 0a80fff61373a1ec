"""Log-probabilities (and entropy) of target tokens under an lm_head, without materialising [N, V] logits.

    z_iv   = h_i . w_v / T                       logits at temperature T          h [N, D], W [V, D]
    lse_i  = m_i + log s_i                       per-row log-sum-exp, m_i = max_v z_iv, s_i = sum_v exp(z_iv - m_i)
    logp_i = z_iy - lse_i                        y = targets[i]
    H_i    = lse_i - sum_v p_iv z_iv             softmax entropy, p_iv = exp(z_iv - lse_i)   (no gradient)

For an upstream gradient g_i on logp_i, with dz_iv = g_i (1{v = y_i} - p_iv) / T:
    dh_i = sum_v dz_iv w_v          dW_v = sum_i dz_iv h_i

Backward saves only the per-row log-sum-exp, kept as its two parts (m, log s) rather than their sum: p is
recomputed as exp((z - m) - log s), so 1 - p_y stays exact to fp32 for confident tokens (as in a softmax), while
exp(z - lse) with |lse| ~ 30 loses ~30 ulp in p (measured: 1e-5 vs 1e-7 relative error in dW at T = 1.3).

The vocabulary is streamed with the online softmax of Milakov & Gimelshein (arXiv 1805.02867): over tiles of z,
    m' = max(m, max_v z_v)      s' = s e^(m - m') + sum_v e^(z_v - m')
and for the entropy t = sum_v e^(z_v - m) (z_v - m), so that H = log s - t / s,
    t' = e^(m - m') (t + (m - m') s) + sum_v e^(z_v - m') (z_v - m').

Usage:
    from kernels import fused_logprobs
    logp = fused_logprobs(hidden, lm_head.weight, targets, temperature=1.0)          # [N] fp32
    logp, entropy = fused_logprobs(hidden, weight, targets, return_entropy=True)

Paths (`impl`): "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1, as the tests run it), "torch" (chunked
PyTorch, the CPU default), "reference" (naive: logits -> log_softmax -> gather). Benchmark: python -m kernels.bench
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; elsewhere the PyTorch paths still work
    triton = None

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Forward: grid (token tiles, vocabulary splits). Each program owns BLOCK_N rows and one contiguous range of the
# vocabulary, computes [BLOCK_N, BLOCK_V] logit tiles with a loop over D in BLOCK_D chunks (a [BLOCK_N, D] tile of
# bf16 at D = 3584 would not fit in shared memory), and keeps the online (m, s, t) and the target logit per row.
# Splitting V gives enough programs when N is small (4k tokens = 32 tiles of 128 rows for 132 SMs); the splits'
# partials are merged in PyTorch ([splits, N] floats). Consecutive program ids are consecutive token tiles of the
# same split, so they stream the same weight tiles at the same time and share them through L2.
#
# Backward: recompute logit tiles, write dz for one vocabulary chunk to a bounded workspace ([N, chunk] in the
# input dtype), then run two ordinary matmuls: dh += dz @ W_chunk (fp32 accumulator) and dW_chunk = dz^T @ h.
# Why not accumulate dh and dW inside the kernel: D = 2-3.5k is too wide to keep [BLOCK_N, D] or [BLOCK_V, D]
# accumulators on chip, so every (token tile, vocab tile) program would read-modify-write its dh and dW rows with
# atomics or locks: (V / BLOCK_V) N D + (N / BLOCK_N) V D fp32 updates, ~230x the N D + V D of the outputs at
# N = 16k, V = 152k with 128-wide tiles (unfiltered CCE's backward is 2.7x slower for this reason; kernels notes
# section 2). The workspace costs one write and two reads of dz (2 N V bytes each in bf16: 3 x 5 GB at N = 16k,
# V = 152k, ~5 ms at 3.35 TB/s against ~39 ms of backward matmuls), keeps every FLOP in tensor-core GEMMs (dh and
# dW are plain cuBLAS calls) and needs no atomics, so results are deterministic. Chunking over V (not N) finishes
# each dW row block in one GEMM; only dh [N, D] is accumulated across chunks, and N < V.
# Total matmul work: 2NDV forward + 2NDV recompute + 2NDV dh + 2NDV dW = 8NDV (6NDV with a frozen head).

if triton is not None:

    @triton.jit
    def _logprobs_forward_kernel(
        h_ptr,  # [N, D] hidden rows (row stride stride_h, unit column stride)
        w_ptr,  # [V, D] weight (row stride stride_w, unit column stride)
        y_ptr,  # [N] int64 targets, all in [0, V)
        m_ptr,  # [splits, N] fp32 out: running max of z per split
        s_ptr,  # [splits, N] fp32 out: sum_v exp(z - m) per split
        t_ptr,  # [splits, N] fp32 out: sum_v exp(z - m) (z - m) per split (written only if RETURN_ENTROPY)
        zy_ptr,  # [splits, N] fp32 out: target logit z_iy (0 in splits that do not hold y_i)
        N, V, D, stride_h, stride_w,
        inv_temp,  # 1 / T, applied in fp32 after the dot
        num_splits,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        RETURN_ENTROPY: tl.constexpr,
        UPCAST: tl.constexpr,  # interpreter: its tl.dot computes bf16 on raw bits (triton#11584), so dot in fp32
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (GPU tl.dot defaults to TF32), unused for bf16/fp16
    ):
        # int64 before meeting strides: N * V and V * D pass 2^31 at real sizes
        pid_n = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        row_mask = rows < N
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
        tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), num_splits)
        v_begin = pid_s * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
        # a finite start keeps (m - m') s = 0 (not -inf * 0) on the first tile; every real logit is far above it
        m = tl.full([BLOCK_N], -1e30, tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        t = tl.zeros([BLOCK_N], tl.float32)
        zy = tl.zeros([BLOCK_N], tl.float32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            col_mask = cols < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_mask = dims < D
                h = tl.load(h_ptr + rows[:, None] * stride_h + dims[None, :],
                            mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                w = tl.load(w_ptr + cols[None, :] * stride_w + dims[:, None],
                            mask=col_mask[None, :] & dim_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_V]
                if UPCAST:
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
            # vocabulary tail -> -inf, not 0: a 0 would enter the log-sum-exp (verl #2899 at V = 151,936)
            z = tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))  # [BLOCK_N, BLOCK_V]
            m_new = tl.maximum(m, tl.max(z, 1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])  # 0 on the tail
            if RETURN_ENTROPY:
                z_shifted = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)  # not -inf on the tail
                t = alpha * (t + (m - m_new) * s) + tl.sum(e * z_shifted, 1)
            s = s * alpha + tl.sum(e, 1)
            m = m_new
            zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        out = pid_s * N + rows
        tl.store(m_ptr + out, m, mask=row_mask)
        tl.store(s_ptr + out, s, mask=row_mask)
        tl.store(zy_ptr + out, zy, mask=row_mask)
        if RETURN_ENTROPY:
            tl.store(t_ptr + out, t, mask=row_mask)

    @triton.jit
    def _logits_grad_kernel(
        h_ptr,  # [N, D] hidden rows
        w_ptr,  # [V, D] weight
        y_ptr,  # [N] int64 targets
        m_ptr,  # [N] fp32 row max of z from the forward
        log_s_ptr,  # [N] fp32 log sum_v exp(z - m) from the forward
        g_ptr,  # [N] fp32 upstream gradient of logp
        dz_ptr,  # [N, chunk] out: dz for vocabulary columns [v_begin, v_begin + chunk), workspace dtype
        N, V, D, stride_h, stride_w, stride_dz,
        v_begin,  # first vocabulary column of this chunk
        chunk,  # columns in this chunk (the last one may be narrower than the workspace)
        inv_temp,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0).to(tl.int64)
        pid_v = tl.program_id(1).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
        cols = v_begin + local
        col_mask = (local < chunk) & (cols < V)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_mask = dims < D
            h = tl.load(h_ptr + rows[:, None] * stride_h + dims[None, :],
                        mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * stride_w + dims[:, None],
                        mask=col_mask[None, :] & dim_mask[:, None], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
        m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
        log_s = tl.load(log_s_ptr + rows, mask=row_mask, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        p = tl.exp((acc * inv_temp - m[:, None]) - log_s[:, None])  # [BLOCK_N, BLOCK_V] softmax, recomputed
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        dz = (g * inv_temp)[:, None] * (onehot - p)
        tl.store(dz_ptr + rows[:, None] * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])

    # GPU: tuned per (V, D); N is left out of the key so a new batch length does not re-tune. Shared memory per
    # stage in bf16 is (BLOCK_N + BLOCK_V) * BLOCK_D * 2 bytes (48 KB for 128/256/64); configs that do not fit
    # (fp32 inputs) fail to compile and the autotuner skips them. One BLOCK_D for all, so the forward and the
    # backward sum over D in the same order and recompute the same logits (see the (m, log s) note at the top).
    _GPU_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)
        for bn, bv, bd, warps, stages in [
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
            (128, 128, 64, 4, 4), (64, 256, 64, 4, 4),
        ]
    ]
    _forward_tuned = triton.autotune(_GPU_CONFIGS, key=["V", "D", "RETURN_ENTROPY"])(_logprobs_forward_kernel)
    _grad_tuned = triton.autotune(_GPU_CONFIGS, key=["V", "D"])(_logits_grad_kernel)

# Interpreter: its cost is Python overhead per op per program and loop step, so big blocks (kept ragged against
# the test shapes so tails are exercised).
INTERPRETER_BLOCKS = {"BLOCK_N": 32, "BLOCK_V": 256, "BLOCK_D": 64}
# Bytes of the backward's dz workspace ([N, chunk]); the chunk width follows from N. Backward extra memory on GPU
# is this + 2 N D fp32 (dh accumulator, old and new during addmm) besides the outputs: at N = 16k, D = 2048, bf16,
# 128 + 256 MB, plus dW (594 MB) and dh (64 MB) = ~1.04 GB. The dh accumulator is re-read once per chunk (38 chunks
# there: ~10 GB, ~3 ms of HBM time); a 256 MB workspace halves that for 128 MB more.
WORKSPACE_BYTES = 128 << 20

# --------------------------------------------------------------------------------------------------------------
# launchers: check, allocate, launch


def _kernel_setup(hidden, weight):
    """(use tuned kernels, fixed block sizes, UPCAST, DOT_PRECISION) for these tensors, or a clear error."""
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"the Triton path needs hidden and weight of one dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton path takes fp32, bf16 or fp16, got {hidden.dtype}")
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    if hidden.is_cuda:
        return True, {}, False, precision
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("impl='triton' on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before importing kernels (tests/conftest.py does)")
    return False, INTERPRETER_BLOCKS, hidden.dtype != torch.float32, precision


def _num_splits(n, n_vocab, device):
    """Vocabulary splits so that (token tiles x splits) fills the GPU about twice, each split >= 1024 columns wide;
    in the interpreter 4 programs, so that the tests merge several splits."""
    if device.type == "cuda":
        target, tile_rows, min_cols = 2 * torch.cuda.get_device_properties(device).multi_processor_count, 128, 1024
    else:
        target, tile_rows, min_cols = 4, INTERPRETER_BLOCKS["BLOCK_N"], INTERPRETER_BLOCKS["BLOCK_V"]
    return max(1, min(triton.cdiv(target, max(1, triton.cdiv(n, tile_rows))), triton.cdiv(n_vocab, min_cols), 64))


def _workspace_columns(n, itemsize):
    """Vocabulary columns per backward chunk: WORKSPACE_BYTES / (n * itemsize), a multiple of 128, at least 128."""
    return max(128, WORKSPACE_BYTES // max(n, 1) // itemsize // 128 * 128)


def _triton_forward(hidden, weight, targets, inv_temp, want_entropy, num_splits=None):
    """Returns logp [n] fp32, entropy [n] fp32 or None, stats [2, n] fp32 = (m, log s) of the log-sum-exp."""
    tuned, blocks, upcast, precision = _kernel_setup(hidden, weight)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    n, dim = hidden.shape
    n_vocab = weight.shape[0]
    num_splits = num_splits or _num_splits(n, n_vocab, hidden.device)
    m, s, t, zy = torch.empty(4, num_splits, n, dtype=torch.float32, device=hidden.device)
    kernel = _forward_tuned if tuned else _logprobs_forward_kernel
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), num_splits)  # noqa: E731
    if n:
        kernel[grid](hidden, weight, targets, m, s, t, zy, n, n_vocab, dim, hidden.stride(0), weight.stride(0),
                     inv_temp, num_splits, RETURN_ENTROPY=want_entropy, UPCAST=upcast, DOT_PRECISION=precision,
                     **blocks)
    # merge the splits' partials (an empty split has m = -1e30, s = t = 0 and drops out)
    m_all = m.amax(0)  # [n]
    scale = torch.exp(m - m_all)  # [splits, n]
    s_all = (s * scale).sum(0)
    log_s = s_all.log()
    logp = zy.sum(0) - m_all - log_s
    entropy = None
    if want_entropy:
        t_all = (scale * (t + (m - m_all) * s)).sum(0)
        entropy = log_s - t_all / s_all
    return logp, entropy, torch.stack([m_all, log_s])


# Which GEMM the last bf16 backward ran for dh (bench/gpu_check.py reports it): torch.addmm with out_dtype exists as
# a CUDA kernel only (torch 2.13) and may be refused elsewhere or by a future build; then each chunk's product is
# rounded to bf16 once, as a stock bf16 backward rounds its dh, and added into the fp32 accumulator.
BACKWARD_GEMM = None


def _accumulate_fp32(accumulator, a, b):
    """accumulator (fp32) + a @ b for low-precision a, b: torch.addmm(out_dtype=float32) (fp32 output, no rounding
    of the product) where torch runs it, else the bf16 product added in fp32; records the path in BACKWARD_GEMM."""
    global BACKWARD_GEMM
    if BACKWARD_GEMM is None or BACKWARD_GEMM.startswith("torch.addmm"):
        try:
            result = torch.addmm(accumulator, a, b, out_dtype=torch.float32)
            BACKWARD_GEMM = "torch.addmm(out_dtype=float32)"
            return result
        except (RuntimeError, NotImplementedError, TypeError) as error:
            BACKWARD_GEMM = (f"{a.dtype} mm + fp32 add (torch.addmm out_dtype refused: "
                             f"{type(error).__name__}: {str(error).splitlines()[0][:60]})")
    return accumulator.add_(a @ b)


def _triton_backward(hidden, weight, targets, stats, grad_logp, inv_temp, need_hidden, need_weight):
    tuned, blocks, upcast, precision = _kernel_setup(hidden, weight)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    n, dim = hidden.shape
    n_vocab = weight.shape[0]
    # workspace dtype: the input dtype on GPU (bf16 GEMMs at tensor-core rate); fp32 in the interpreter
    work_dtype = torch.float32 if upcast else hidden.dtype
    chunk = min(_workspace_columns(n, work_dtype.itemsize), n_vocab)
    dz = torch.empty(n, chunk, dtype=work_dtype, device=hidden.device)
    grad_hidden = torch.zeros(n, dim, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_logp = grad_logp.float().contiguous()
    kernel = _grad_tuned if tuned else _logits_grad_kernel
    low_precision_gpu = hidden.is_cuda and hidden.dtype != torch.float32
    for v_begin in range(0, n_vocab if n else 0, chunk):
        width = min(chunk, n_vocab - v_begin)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_V"]))  # noqa: E731
        kernel[grid](hidden, weight, targets, stats[0], stats[1], grad_logp, dz, n, n_vocab, dim, hidden.stride(0),
                     weight.stride(0), chunk, v_begin, width, inv_temp, UPCAST=upcast, DOT_PRECISION=precision,
                     **blocks)
        dz_chunk = dz[:, :width]  # [n, width]
        w_chunk = weight[v_begin:v_begin + width]  # [width, D]
        if need_hidden:
            if low_precision_gpu:  # bf16 GEMM, fp32 output and accumulation across chunks
                grad_hidden = _accumulate_fp32(grad_hidden, dz_chunk, w_chunk)
            else:
                grad_hidden.addmm_(dz_chunk, w_chunk.to(work_dtype))
        if need_weight:
            if work_dtype == weight.dtype:
                torch.mm(dz_chunk.t(), hidden, out=grad_weight[v_begin:v_begin + width])
            else:
                grad_weight[v_begin:v_begin + width] = dz_chunk.t() @ hidden.to(work_dtype)
    if need_weight and not n:
        grad_weight.zero_()
    if need_hidden:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight


# --------------------------------------------------------------------------------------------------------------
# autograd wrapper


class FusedLogprobs(torch.autograd.Function):
    """Saves the inputs and the per-row log-sum-exp (as m, log s); backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, want_entropy, impl):
        logp, entropy, stats = _forward(hidden, weight, targets, inv_temp, want_entropy, impl)
        ctx.save_for_backward(hidden, weight, targets, stats)
        ctx.inv_temp, ctx.impl = inv_temp, impl
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, stats = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logp is None:
            grad_logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        backward = _torch_backward if ctx.impl == "torch" else _triton_backward
        grad_hidden, grad_weight = backward(
            hidden, weight, targets, stats, grad_logp, ctx.inv_temp, need_hidden, need_weight)
        return grad_hidden, grad_weight, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# PyTorch reference and chunked CPU fallback


def reference_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """Naive version for tests and benchmarks, as trainers write it: [N, V] logits in the input dtype, upcast to
    fp32 (fp64 stays fp64), then log_softmax and gather. Targets must all be valid."""
    logits = (hidden @ weight.t()).to(_compute_dtype(hidden)) / temperature  # [N, V]
    logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)  # [N]
    if not return_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1)  # [N]
    return logp, entropy


# Byte budget of the one [rows, V] temporary of the chunked path; the row count follows from V (rows = budget /
# (V * itemsize)) so a 152k vocabulary gets proportionally fewer rows than a 32k one. Measured on CPU (kernels.bench).
CPU_CHUNK_BYTES = 32 << 20


def _chunk_rows(n_vocab, itemsize):
    return max(1, CPU_CHUNK_BYTES // (n_vocab * itemsize))


def _compute_dtype(hidden):
    return torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _torch_forward(hidden, weight, targets, inv_temp, want_entropy):
    """Chunked forward: per token chunk, one [rows, V] buffer reused in place.
    Returns logp, entropy or None, stats [2, n] = (m, log s) of the log-sum-exp."""
    dtype = _compute_dtype(hidden)
    weight = weight.to(dtype)  # no copy for fp32 weights; low-precision heads are upcast once (CPU only)
    n, n_vocab = hidden.shape[0], weight.shape[0]
    # the same rows as the backward: equal matmul shapes recompute bit-identical logits, so exp(z - m) of the top
    # logit is exactly 1 there and 1 - p_y stays exact (with other shapes: 1e-5 relative error in dW, measured)
    rows = max(1, min(n, _chunk_rows(n_vocab, dtype.itemsize)))
    buffer = torch.empty(rows, n_vocab, dtype=dtype, device=hidden.device)
    stats = torch.empty(2, n, dtype=dtype, device=hidden.device)  # m, log s
    entropy = torch.empty(n, dtype=dtype, device=hidden.device) if want_entropy else None
    z_targets = torch.empty(n, dtype=dtype, device=hidden.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        h = hidden[start:stop].to(dtype) * inv_temp  # [r, D], 1/T folded into the small operand
        z = torch.mm(h, weight.t(), out=buffer[: stop - start])  # [r, V]
        z_target = z.gather(1, targets[start:stop, None]).squeeze(1)  # [r]
        m = z.amax(1, keepdim=True)  # [r, 1]
        z.sub_(m)  # z - m
        if want_entropy:  # H = log s - sum_v e (z - m) / s, in column blocks: one temporary of a quarter buffer
            s = torch.zeros(stop - start, dtype=dtype, device=hidden.device)
            t = torch.zeros_like(s)
            width = -(-n_vocab // 4)
            for column in range(0, n_vocab, width):
                z_block = z[:, column:column + width]  # [r, V / 4]
                e = torch.exp(z_block)
                s += e.sum(1)
                t += e.mul_(z_block).sum(1)
            entropy[start:stop] = s.log() - t / s
        else:
            s = z.exp_().sum(1)  # [r]
        stats[0, start:stop] = m.squeeze(1)
        stats[1, start:stop] = s.log()
        z_targets[start:stop] = z_target
    return z_targets - stats[0] - stats[1], entropy, stats


def _torch_backward(hidden, weight, targets, stats, grad_logp, inv_temp, need_hidden, need_weight):
    """Chunked backward: recompute e = exp(z - m) per token chunk in the one buffer (p = e / s), then
    dh = gs w_y - (gs / s) (e W) and dW = -e^T ((gs / s) h) + scatter_y(gs h), with gs = g / T. The scales go on
    the [r, D] operands instead of the [r, V] buffer, which saves passes over it."""
    dtype, hidden_dtype, weight_dtype = _compute_dtype(hidden), hidden.dtype, weight.dtype
    weight = weight.to(dtype)
    n, n_vocab = hidden.shape[0], weight.shape[0]
    rows = max(1, min(n, _chunk_rows(n_vocab, dtype.itemsize)))
    buffer = torch.empty(rows, n_vocab, dtype=dtype, device=hidden.device)
    grad_hidden = torch.empty(n, hidden.shape[1], dtype=dtype, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros(n_vocab, weight.shape[1], dtype=dtype, device=weight.device) if need_weight else None
    gs = grad_logp.to(dtype) * inv_temp  # [n]
    gs_over_s = gs * torch.exp(-stats[1])  # [n]
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        h = hidden[start:stop].to(dtype)  # [r, D]
        y = targets[start:stop]  # [r]
        z = torch.mm(h * inv_temp, weight.t(), out=buffer[: stop - start])  # [r, V]
        e = z.sub_(stats[0, start:stop, None]).exp_()  # [r, V] exp(z - m), in place
        g, g_s = gs[start:stop, None], gs_over_s[start:stop, None]  # [r, 1]
        if need_hidden:
            grad_hidden[start:stop] = g * weight[y] - g_s * (e @ weight)  # [r, D]
        if need_weight:
            grad_weight.addmm_(e.t(), g_s * h, alpha=-1.0)  # [V, D]
            grad_weight.index_add_(0, y, g * h)
    if need_hidden:
        grad_hidden = grad_hidden.to(hidden_dtype)
    if need_weight:
        grad_weight = grad_weight.to(weight_dtype)
    return grad_hidden, grad_weight


# --------------------------------------------------------------------------------------------------------------
# public entry point


def _forward(hidden, weight, targets, inv_temp, want_entropy, impl):
    forward = _torch_forward if impl == "torch" else _triton_forward
    return forward(hidden, weight, targets, inv_temp, want_entropy)


def fused_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100, impl=None):
    """log p(targets) [N] (fp32; fp64 for fp64 inputs) and optionally the entropy [N] (no gradient).

    hidden [N, D], weight [V, D] (the lm_head or tied embedding matrix), targets [N] int64. Rows whose target is
    `ignore_index` give 0 with zero gradient and are dropped before any work. impl: None picks Triton for CUDA
    tensors and the chunked PyTorch path otherwise; "triton", "torch" or "reference" force one.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expected integer targets [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if impl is None:
        impl = "triton" if hidden.is_cuda else "torch"
    if impl not in ("triton", "torch", "reference"):
        raise ValueError(f"impl must be None, 'triton', 'torch' or 'reference', got {impl!r}")
    n, n_vocab = hidden.shape[0], weight.shape[0]
    targets = targets.long()
    active = targets != ignore_index  # [N]
    bad = active & ((targets < 0) | (targets >= n_vocab))
    n_bad, n_active = torch.stack([bad.sum(), active.sum()]).tolist()  # one device sync for both
    if n_bad:
        rows = bad.nonzero().squeeze(1)[:5].tolist()
        raise ValueError(f"targets must lie in [0, {n_vocab}) or equal ignore_index={ignore_index}; "
                         f"rows {rows} hold {targets[rows].tolist()}")
    if n_active < n:  # drop ignored rows before any work; autograd scatters their zero gradient back
        index = active.nonzero().squeeze(1)  # [n_active]
        hidden, targets = hidden.index_select(0, index), targets.index_select(0, index)

    if impl == "reference":
        out = reference_logprobs(hidden, weight, targets, temperature, return_entropy)
        logp, entropy = out if return_entropy else (out, None)
    elif torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logp, entropy = FusedLogprobs.apply(hidden, weight, targets, 1.0 / temperature, return_entropy, impl)
    else:  # no-grad path (old / reference policy passes): nothing is saved
        logp, entropy, _ = _forward(hidden, weight, targets, 1.0 / temperature, return_entropy, impl)

    if n_active < n:
        logp = logp.new_zeros(n).index_copy(0, index, logp)
        if entropy is not None:
            entropy = entropy.new_zeros(n).index_copy(0, index, entropy)
    return (logp, entropy) if return_entropy else logp
