"""bench/gpu_check.py without a GPU: the plan it would run, and the table its sections' outputs become (the parsers
read the same formats the benchmarks write; the real run needs CUDA)."""
import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_lists_every_section_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["kernel-tests", "kernels", "grpo-3b", "engine-3b", "grpo-4b",
                                                   "tiny-bf16"]
    assert "--model qwen3-vl-4b" in lines[4] and "--image-size 512" in lines[4] and "--dtype bf16" in lines[5]
    assert "--compile-decode" in lines[3] and "--rollout-engine hf,ssrl" in lines[3]
    limits = [int(line.split("(<= ")[1].split(" s)")[0]) for line in lines]
    assert sum(limits) <= 600                                   # one command of a lent GPU's 600-s limit


def test_section_outputs_become_one_table(tmp_path):
    kernels_out = ("| 4096x2048x151936   | naive    | fwd     |      12.5 |    1.00 |        10.1 |      200.000 |"
                   "     4800 |   1.000 | 1.2e-05 |\n| 4096x2048x151936   | kernel   | fwd+bwd | failed: boom\n")
    rows = gpu_check.parse_kernels(kernels_out, tmp_path)
    assert ("kernels", "4096x2048x151936 naive fwd", "TFLOP/s", "200.000") in rows
    assert rows[-1][2] == "failed"
    (tmp_path / "grpo-3b.json").write_text(json.dumps([{
        "model": "qwen2.5-vl-3b", "path": "shared", "time/step": 20.0, "time/generate": 10.0, "time/logprobs": 3.0,
        "time/update": 7.0, "tokens_per_second": 9000.0, "prompt_tokens": 1500.0, "peak_mib": 70 * 1024.0}]))
    rows += gpu_check.parse_grpo("grpo-3b")("", tmp_path)
    (tmp_path / "engine-3b.json").write_text(json.dumps([{
        "model": "qwen2.5-vl-3b", "engine": "ssrl+graph", "generate_s": 12.0, "tokens_per_s": 800.0,
        "mean_length": 47.6, "kv_mib_per_prompt": 96.0, "peak_mib": 20 * 1024.0}]))
    rows += gpu_check.parse_engine("engine-3b")("", tmp_path)
    rows += gpu_check.parse_kernel_tests("12 passed, 1 failed in 30.2s", tmp_path)
    text = gpu_check.table(rows)
    assert "| grpo-3b | qwen2.5-vl-3b shared | peak GiB | 70.0 |" in text
    assert "| engine-3b | qwen2.5-vl-3b ssrl+graph | tokens/s | 800 |" in text
    assert "| kernel-tests | tests/test_kernels.py | passed / failed | 12 / 1 |" in text
    assert text.splitlines()[1] == "|---|---|---|---|"
