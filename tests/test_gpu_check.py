"""bench/gpu_check.py without a GPU: the preflight rows and what they rule out, the plan and its budget, and the
table its sections' outputs become (the parsers read the same formats the benchmarks write; the real run needs
CUDA)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
H200 = ("NVIDIA H200", "580.65.06", "140000")


def test_dry_run_on_a_cpu_box_says_what_is_missing_and_runs_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| preflight | GPU | MISSING | no NVIDIA GPU or driver found (nvidia-smi missing or failing) |" in lines
    assert any(line.startswith("| grpo-3b | section | skipped |") for line in lines)
    assert not list(tmp_path.iterdir())


def test_section_limits_add_up_within_the_budget(tmp_path):
    chosen, skipped = gpu_check.plan(tmp_path, None, {}, gpu_check.BUDGET)
    assert list(chosen) == ["images", "kernel-tests", "kernels", "grpo-3b", "engine-3b", "grpo-4b", "tiny-bf16"]
    assert not skipped
    assert sum(limit for _, limit, _ in chosen.values()) <= gpu_check.BUDGET <= 600 - 30
    command = " ".join(chosen["grpo-3b"][0])
    assert "--records" in command and "--warmup-new-tokens 16" in command and "--impls" not in command
    assert chosen["grpo-4b"][0][chosen["grpo-4b"][0].index("--model") + 1] == "qwen3-vl-4b"
    engine = " ".join(chosen["engine-3b"][0])
    assert "--compile-decode" in engine and "--rollout-engine hf,ssrl" in engine and "--records" in engine
    with pytest.raises(SystemExit, match="over the 300-s budget"):
        gpu_check.plan(tmp_path, None, {}, 300)
    only, _ = gpu_check.plan(tmp_path, ["grpo-3b"], {}, gpu_check.BUDGET)
    assert list(only) == ["images", "grpo-3b"]                    # its images are rendered first


def test_preflight_names_an_old_driver_and_stops_everything(tmp_path):
    rows, blocked = gpu_check.preflight(smi=("NVIDIA H100", "570.124.06", "80000"), cuda_available=False,
                                        wheel_cuda="13.0", compiler="/usr/bin/gcc", header=True, pytest_found=True)
    driver = next(row for row in rows if row[1] == "driver / wheel CUDA")
    assert driver[2] == "MISSING" and "older than 580" in driver[3] and "cu128" in driver[3]
    chosen, skipped = gpu_check.plan(tmp_path, None, blocked, gpu_check.BUDGET)
    assert not chosen and len(skipped) == 7


def test_preflight_without_a_compiler_or_pytest_skips_what_needs_them(tmp_path):
    rows, blocked = gpu_check.preflight(smi=H200, cuda_available=True, wheel_cuda="13.0", compiler="",
                                        header=True, pytest_found=False, free_bytes=130 * 2 ** 30)
    missing = {row[1]: row[3] for row in rows if row[2] == "MISSING"}
    assert set(missing) == {"C compiler", "pytest"} and "apt-get install gcc" in missing["C compiler"]
    assert ("preflight", "free GPU memory", "ok", "130.0 GiB") in rows
    chosen, skipped = gpu_check.plan(tmp_path, None, blocked, gpu_check.BUDGET)
    assert {name for name, *_ in skipped} == {"kernel-tests", "kernels"}
    assert "--impls torch" in " ".join(chosen["grpo-3b"][0])      # the GRPO step still gets numbers
    assert chosen["tiny-bf16"][2] == {"SSRL_LOGPROBS_IMPL": "torch"}
    rows, blocked = gpu_check.preflight(smi=H200, cuda_available=True, wheel_cuda="13.0", compiler="/usr/bin/gcc",
                                        header=True, pytest_found=False, free_bytes=0)
    chosen, skipped = gpu_check.plan(tmp_path, None, blocked, gpu_check.BUDGET)
    assert skipped == [("kernel-tests", "section", "skipped",
                        "pytest is not installed (pip install -r requirements-dev.txt)")]
    assert "kernels" in chosen and "--impls" not in " ".join(chosen["grpo-3b"][0])


def test_section_outputs_become_one_table(tmp_path):
    kernels_out = ("| 4096x2048x151936   | naive    | fwd     |      12.5 |    1.00 |        10.1 |      200.000 |"
                   "     4800 |   1.000 | 1.2e-05 |\n| 4096x2048x151936   | kernel   | fwd+bwd | failed: boom\n"
                   "backward dh GEMM: torch.addmm(out_dtype=float32)\n")
    rows = gpu_check.parse_kernels(kernels_out, tmp_path)
    assert ("kernels", "4096x2048x151936 naive fwd", "TFLOP/s", "200.000") in rows
    assert ("kernels", "fused backward", "dh GEMM", "torch.addmm(out_dtype=float32)") in rows
    assert rows[-2][2] == "failed"
    (tmp_path / "grpo-3b.json").write_text(json.dumps([{
        "model": "qwen2.5-vl-3b", "path": "shared", "impl": "triton", "time/step": 20.0, "time/generate": 10.0,
        "time/logprobs": 3.0, "time/update": 7.0, "tokens_per_second": 9000.0, "prompt_tokens": 1500.0,
        "rollout_micro_batch_size": 16.0, "peak_mib": 70 * 1024.0}]))
    rows += gpu_check.parse_grpo("grpo-3b")("", tmp_path)
    (tmp_path / "engine-3b.json").write_text(json.dumps([{
        "model": "qwen2.5-vl-3b", "engine": "ssrl+graph", "generate_s": 12.0, "tokens_per_s": 800.0,
        "mean_length": 47.6, "kv_mib_per_prompt": 96.0, "peak_mib": 20 * 1024.0, "same_tokens_as_eager": 0.98}]))
    rows += gpu_check.parse_engine("engine-3b")("", tmp_path)
    rows += gpu_check.parse_kernel_tests("12 passed, 1 failed in 30.2s", tmp_path)
    text = gpu_check.table(rows)
    assert "| grpo-3b | qwen2.5-vl-3b shared triton | peak GiB | 70.0 |" in text
    assert "| kernel-tests | tests/test_kernels.py | passed / failed | 12 / 1 |" in text
    assert "| engine-3b | qwen2.5-vl-3b ssrl+graph | tokens/s | 800 |" in text
    assert text.splitlines()[1] == "|---|---|---|---|"
