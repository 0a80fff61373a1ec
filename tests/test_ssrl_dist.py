"""ssrl.py under `torchrun --nproc_per_node 2` on the CPU (gloo, FSDP2 with bf16 mixed precision): a run killed
during the SFT cold start and again during GRPO, and resumed each time, ends with the same weights as one that never
stopped, and an
evaluation where one rank's images are all unreadable completes on both ranks (tests/dist_ssrl.py runs each rank)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import ssrl
from tests.helpers import tiny_dataset

HERE = Path(__file__).resolve().parent


def torchrun(*argv, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "dist_ssrl.py"), *map(str, argv)]
    return subprocess.run(command, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_bf16_killed_in_sft_and_in_grpo_and_resumed_ends_with_the_same_weights(tmp_path):
    """Killed after checkpoint 2 (SFT), resumed across the SFT -> GRPO boundary, killed after checkpoint 5 (GRPO),
    resumed to the end: the same weights as a run that never stopped, bit for bit."""
    data = tmp_path / "data"
    tiny_dataset(str(data), per_task=8, eval_per_task=1, seed=4)
    flags = ["--dtype", "bf16", "--data", data, "--tasks", "depth", "flip", "--sft-data-fraction", "0.5",
             "--sft-num-train-epochs", "2", "--sft-global-batch-size", "4", "--sft-micro-batch-size", "2",
             "--save-steps", "1", "--max-steps", "2", "--rollout-batch-size", "4", "--global-batch-size", "2",
             "--max-response-length", "12", "--eval-limit", "1"]
    straight = torchrun("run", "--", *flags, "--out", tmp_path / "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "resumed"
    for die_after in (2, 5):
        killed = torchrun("run", "--die-after-save", die_after, "--", *flags, "--out", out,
                          *(["--resume"] if die_after == 5 else []), cwd=tmp_path)
        assert killed.returncode != 0 and f"killed after checkpoint {die_after}" in killed.stderr, killed.stderr[-3000:]
        assert max(ssrl.checkpoint_step(p) for p in ssrl.checkpoints(out)) == die_after
    resumed = torchrun("run", "--", *flags, "--out", out, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    final = [load_file(str(tmp_path / run / "checkpoint-6" / "model.safetensors")) for run in ("straight", "resumed")]
    start = load_file(str(tmp_path / "straight" / "reference" / "model.safetensors"))     # after SFT
    assert final[0].keys() == final[1].keys()
    assert all((final[0][k] == final[1][k]).all() for k in final[0]), "resumed weights differ"
    assert any((final[0][k] != start[k]).any() for k in start), "GRPO never changed the policy"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", s) for s in (1, 2, 3, 4)] + [("grpo", 5), ("grpo", 6)]
    assert all(r["num_updates"] == 2 and r["shared_prompt"] == 1.0 for r in rows if r["stage"] == "grpo")
    for stage in ("base", "sft", "grpo"):
        assert json.loads((out / f"eval-{stage}.json").read_text())["all"]["n"] == 2


@pytest.mark.slow
def test_evaluation_with_one_ranks_images_all_unreadable_completes_on_both_ranks(tmp_path):
    result = torchrun("eval", tmp_path / "data", tmp_path / "eval.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["all"]["n"] == 10                  # rank 0's 10 of the 20 held-out records; rank 1's skipped
    assert "skipped 10 unreadable records" in result.stdout
