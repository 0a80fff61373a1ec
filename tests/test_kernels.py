"""fused_logprobs: the Triton kernel (in the interpreter on CPU, see conftest.py) and the chunked PyTorch fallback
against the naive reference.

Ground truth is the reference in fp64 from the same inputs. Tolerances come from measurement: each path's error
may not exceed the naive same-dtype error (logits -> log_softmax -> gather in fp32) plus a margin. Measured here,
the largest excess over naive was 1.6e-6 on logp (fallback; its log-sum-exp sums in another order) and <= 1.5e-7
elsewhere; the margins are 5e-6 on logp and entropy, 1e-6 (relative) on the gradients.
"""
import pytest
import torch

import kernels.logprobs as lp
from kernels import fused_logprobs

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the same tests run the compiled kernels
# fp32 margins over the naive fp32 error: |logp|, |entropy| absolute; dh, dW relative to their largest entry
MARGIN = {"logp": 5e-6, "entropy": 5e-6, "grad_hidden": 1e-6, "grad_weight": 1e-6}


def make_inputs(n, dim, n_vocab, seed=0, ignored=(5,)):
    """Logits of std ~3, three rows with a dominant target logit (+40), some ignored rows, a random upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_vocab, dim, generator=gen) * 3 / dim ** 0.5
    hidden = torch.randn(n, dim, generator=gen)
    targets = torch.randint(0, n_vocab, (n,), generator=gen)
    top = weight[targets[:3]]
    hidden[:3] += 40 * top / top.pow(2).sum(1, keepdim=True)
    targets[list(ignored)] = IGNORE
    upstream = torch.randn(n, generator=gen)
    return [x.to(DEVICE) for x in (hidden, weight, targets, upstream)]


def run(impl, hidden, weight, targets, upstream, temperature, dtype=torch.float32):
    """logp, entropy, d hidden, d weight (as fp64) for sum(upstream * logp)."""
    h = hidden.detach().to(dtype).clone().requires_grad_()  # a fresh leaf each run: gradients must not add up
    w = weight.detach().to(dtype).clone().requires_grad_()
    logp, entropy = fused_logprobs(h, w, targets, temperature, return_entropy=True, impl=impl)
    (logp * upstream.to(logp.dtype)).sum().backward()
    return {"logp": logp.detach().double(), "entropy": entropy.double(), "grad_hidden": h.grad.double(),
            "grad_weight": w.grad.double()}


def errors(result, truth):
    out = {k: (result[k] - truth[k]).abs().max().item() for k in ("logp", "entropy")}
    for k in ("grad_hidden", "grad_weight"):
        out[k] = ((result[k] - truth[k]).abs().max() / truth[k].abs().max()).item()
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    """Several workspace chunks in the kernel's backward and several token chunks in the fallback."""
    monkeypatch.setattr(lp, "_workspace_columns", lambda n, itemsize: 384)  # 1.5 interpreter vocabulary tiles
    monkeypatch.setattr(lp, "CPU_CHUNK_BYTES", 16 * 4 * 1000)  # 5-31 rows at these vocabulary sizes


# N, D, V, T: ragged against the interpreter blocks (32 rows, 256 columns, 64 dims) and the chunks; V >> N
SHAPES = [(50, 123, 507, 1.0), (64, 64, 1000, 0.7), (20, 48, 3001, 1.3)]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_within_naive_error(impl, shape, small_chunks):
    n, dim, n_vocab, temperature = shape
    hidden, weight, targets, upstream = make_inputs(n, dim, n_vocab, ignored=(5, n - 1))
    truth = run("reference", hidden, weight, targets, upstream, temperature, torch.float64)
    naive = errors(run("reference", hidden, weight, targets, upstream, temperature), truth)
    result = run(impl, hidden, weight, targets, upstream, temperature)
    got = errors(result, truth)
    for key, margin in MARGIN.items():
        assert got[key] <= naive[key] + margin, (key, got[key], naive[key])
    for row in (5, n - 1):  # ignored rows: zero output, zero gradient
        assert result["logp"][row] == 0 and result["entropy"][row] == 0
        assert result["grad_hidden"][row].abs().max() == 0


def test_forward_merges_any_number_of_vocab_splits():
    hidden, weight, targets, _ = make_inputs(40, 64, 1000, ignored=())
    truth_logp, truth_entropy = lp.reference_logprobs(hidden.double(), weight.double(), targets, 0.9, True)
    for splits in (1, 3, 7):  # 4 vocabulary tiles of 256: 7 splits leave three of them empty
        logp, entropy, _ = lp._triton_forward(hidden, weight, targets, 1 / 0.9, True, num_splits=splits)
        assert (logp.double() - truth_logp).abs().max() < 2e-5
        assert (entropy.double() - truth_entropy).abs().max() < 2e-5


@pytest.mark.parametrize("n_vocab", [151936, 152064])  # Qwen2.5-VL-3B / Qwen3-VL-4B and Qwen2.5-VL-7B
def test_qwen_vocabulary_tails_stay_out_of_the_log_sum_exp(n_vocab, monkeypatch):
    """151,936 = 128 x 1187 is not a multiple of 256 or 1024: a tail read as 0 instead of -inf would add e^0 terms."""
    monkeypatch.setitem(lp.INTERPRETER_BLOCKS, "BLOCK_V", 4096)  # 38 vocabulary tiles (tails of 384 and 512)
    hidden, weight, targets, _ = make_inputs(8, 16, n_vocab, ignored=())
    hidden = hidden * 0.1  # small logits, so e^0 = 1 per leaked column would show at the 1e-5 level
    truth_logp, truth_entropy = lp.reference_logprobs(hidden.double(), weight.double(), targets, 1.0, True)
    with torch.no_grad():
        logp, entropy = fused_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
    assert (logp.double() - truth_logp).abs().max() < 1e-5
    assert (entropy.double() - truth_entropy).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_rows_ignored_give_zero_and_zero_gradient(impl):
    hidden, weight, targets, upstream = make_inputs(8, 32, 300, ignored=range(8))
    result = run(impl, hidden, weight, targets, upstream, 1.0)
    for value in result.values():
        assert value.abs().max() == 0


def relative_error(value, truth):
    return ((value.double() - truth).abs().max() / truth.abs().max()).item()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_tied_weights_gradients_add_up(impl):
    """weight is the input embedding too (Qwen2.5-VL-3B ties them): its gradient sums both uses."""
    gen = torch.Generator().manual_seed(1)
    n_vocab, dim = 400, 32
    input_ids = torch.randint(0, n_vocab, (24,), generator=gen).to(DEVICE)
    targets = torch.randint(0, n_vocab, (24,), generator=gen).to(DEVICE)
    targets[0] = IGNORE
    mix = (torch.randn(dim, dim, generator=gen) / dim ** 0.5).to(DEVICE)
    upstream = torch.randn(24, generator=gen).to(DEVICE)
    initial = torch.randn(n_vocab, dim, generator=gen).to(DEVICE)
    grads = {}
    for which, dtype in ((impl, torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        embedding = initial.to(dtype).clone().requires_grad_()  # a fresh leaf per run
        hidden = torch.tanh(embedding[input_ids] @ mix.to(dtype))  # [24, D]
        logp = fused_logprobs(hidden, embedding, targets, 0.8, impl=which)
        (logp * upstream.to(dtype)).sum().backward()
        grads[which, dtype] = embedding.grad
    truth = grads["reference", torch.float64]
    naive = relative_error(grads["reference", torch.float32], truth)
    assert relative_error(grads[impl, torch.float32], truth) <= naive + MARGIN["grad_weight"]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_frozen_weight_gets_no_gradient(impl):
    hidden, weight, targets, upstream = make_inputs(30, 40, 700)
    grads = {}
    for which, dtype in ((impl, torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        h = hidden.to(dtype).clone().requires_grad_()
        w = weight.to(dtype).clone()
        (fused_logprobs(h, w, targets, 1.2, impl=which) * upstream.to(dtype)).sum().backward()
        assert w.grad is None
        grads[which, dtype] = h.grad
    truth = grads["reference", torch.float64]
    naive = relative_error(grads["reference", torch.float32], truth)
    assert relative_error(grads[impl, torch.float32], truth) <= naive + MARGIN["grad_hidden"]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_no_grad_path_keeps_no_graph(impl):
    hidden, weight, targets, _ = make_inputs(16, 32, 300)
    with torch.no_grad():
        assert fused_logprobs(hidden.requires_grad_(), weight, targets, impl=impl).grad_fn is None
    assert fused_logprobs(hidden.detach(), weight, targets, impl=impl).grad_fn is None


@pytest.mark.parametrize("bad", [300, -1])
def test_out_of_range_target_raises(bad):
    hidden, weight, targets, _ = make_inputs(16, 32, 300)
    targets[7] = bad
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 300\)"):
        fused_logprobs(hidden, weight, targets)


def test_fallback_passes_gradcheck_in_fp64():
    hidden, weight, targets, _ = make_inputs(9, 6, 37, ignored=(2,))
    hidden, weight = hidden.double().requires_grad_(), weight.double().requires_grad_()

    def f(h, w):
        return fused_logprobs(h, w, targets, 0.6, impl="torch")

    assert torch.autograd.gradcheck(f, (hidden, weight))
    ones = torch.ones(9, device=DEVICE)
    truth = run("reference", hidden.detach(), weight.detach(), targets, ones, 0.6, torch.float64)
    result = run("torch", hidden.detach(), weight.detach(), targets, ones, 0.6, torch.float64)
    for key, value in errors(result, truth).items():
        assert value < 1e-12, key


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bf16_inputs_accumulate_in_fp32(impl, small_chunks):
    """bf16 in, fp32 math: within the GPU targets against an fp64 reference from the same bf16 inputs, and
    better than naive bf16 (whose logits are rounded to bf16)."""
    hidden, weight, targets, upstream = make_inputs(50, 123, 507)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    truth = run("reference", hidden, weight, targets, upstream, 0.7, torch.float64)
    naive = errors(run("reference", hidden, weight, targets, upstream, 0.7, torch.bfloat16), truth)
    got = errors(run(impl, hidden, weight, targets, upstream, 0.7, torch.bfloat16), truth)
    assert got["logp"] <= 2e-3 and got["entropy"] <= 2e-3
    assert got["grad_hidden"] <= 1e-2 and got["grad_weight"] <= 1e-2
    for key in MARGIN:
        assert got[key] <= naive[key] + MARGIN[key], (key, got[key], naive[key])


def test_backward_dh_gemm_falls_back_where_addmm_out_dtype_is_refused(monkeypatch):
    """torch.addmm(..., out_dtype=float32) runs on CUDA only (the CPU refuses it): the bf16 backward's dh then
    adds each chunk's bf16 product into its fp32 accumulator, within bf16 rounding of the fp32 product, and
    BACKWARD_GEMM says which path ran."""
    from kernels import logprobs
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 512, generator=generator).bfloat16()
    b = torch.randn(512, 96, generator=generator).bfloat16()
    start = torch.randn(64, 96, generator=generator)
    monkeypatch.setattr(logprobs, "BACKWARD_GEMM", None)
    result = logprobs._accumulate_fp32(start.clone(), a, b)
    exact = start + a.float() @ b.float()
    assert result.dtype == torch.float32 and logprobs.BACKWARD_GEMM.startswith("torch.bfloat16 mm + fp32 add")
    assert "refused" in logprobs.BACKWARD_GEMM
    assert (result - exact).abs().max() <= 2 ** -8 * (a.float() @ b.float()).abs().max()
    assert torch.equal(logprobs._accumulate_fp32(start.clone(), a, b), start + (a @ b).float())  # the same, again
