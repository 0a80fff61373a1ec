"""ssrl.py under `torchrun --nproc_per_node 2` on the CPU (gloo, FSDP2 with bf16 mixed precision): a run killed
during the SFT cold start and again during GRPO, and resumed each time, ends with the same weights as one that never
stopped; its sharded checkpoint resumes in one process with the same state; loading at real width keeps one full
copy of the weights on rank 0 only; an evaluation where one rank's images are all unreadable completes on both
ranks (tests/dist_ssrl.py runs each rank)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ssrl
from tests.helpers import tiny_dataset

HERE = Path(__file__).resolve().parent


def torchrun(*argv, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "dist_ssrl.py"), *map(str, argv)]
    return subprocess.run(command, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


def same_state(a, b):
    """Two dumps of tests/dist_ssrl.py (full fp32 weights and AdamW state by parameter name) equal bit for bit."""
    return (a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and a["optimizer"].keys() == b["optimizer"].keys() and len(a["optimizer"]) > 10
            and all(torch.equal(torch.as_tensor(a["optimizer"][k][m]), torch.as_tensor(b["optimizer"][k][m]))
                    for k in a["optimizer"] for m in ("exp_avg", "exp_avg_sq", "step")))


@pytest.mark.slow
def test_torchrun_bf16_killed_in_sft_and_in_grpo_and_resumed_ends_with_the_same_weights(tmp_path):
    """Killed after checkpoint 2 (SFT), resumed across the SFT -> GRPO boundary, killed after checkpoint 5 (GRPO),
    resumed to the end: the same weights as a run that never stopped, bit for bit. The 2-rank checkpoint 2 also
    resumes in one unsharded fp32 process with the very weights and AdamW state the 2 ranks held when they saved
    it, and runs to the end; every checkpoint's weights load with from_pretrained."""
    from transformers import AutoModelForImageTextToText
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
        dump = ["--dump-after-save", 2, tmp_path / "saved-2.pt"] if die_after == 2 else []
        killed = torchrun("run", "--die-after-save", die_after, *dump, "--", *flags, "--out", out,
                          *(["--resume"] if die_after == 5 else []), cwd=tmp_path)
        assert killed.returncode != 0 and f"killed after checkpoint {die_after}" in killed.stderr, killed.stderr[-3000:]
        assert max(ssrl.checkpoint_step(p) for p in ssrl.checkpoints(out)) == die_after
        if die_after == 2:
            shutil.copytree(out, tmp_path / "one-process")
    resumed = torchrun("run", "--", *flags, "--out", out, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    pretrained = AutoModelForImageTextToText.from_pretrained(tmp_path / "one-process" / "checkpoint-2").state_dict()
    one = subprocess.run([sys.executable, str(HERE / "dist_ssrl.py"), "run", "--dump-loaded", tmp_path / "loaded.pt",
                          "--", *map(str, flags), "--dtype", "fp32", "--out", tmp_path / "one-process", "--resume"],
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    saved, loaded = torch.load(tmp_path / "saved-2.pt"), torch.load(tmp_path / "loaded.pt")
    assert same_state(saved, loaded), "the 2-rank checkpoint resumed in one process with other weights or state"
    assert pretrained.keys() == saved["model"].keys()        # the tiny preset saves fp32: the masters themselves
    assert all(torch.equal(pretrained[name], saved["model"][name]) for name in saved["model"])
    for folder in [*ssrl.checkpoints(out), *ssrl.checkpoints(tmp_path / "one-process")]:
        AutoModelForImageTextToText.from_pretrained(folder)
    assert ssrl.checkpoint_step(max(ssrl.checkpoints(tmp_path / "one-process"), key=ssrl.checkpoint_step)) == 6

    final = [load_file(str(tmp_path / run / "checkpoint-6" / "model.safetensors")) for run in ("straight", "resumed")]
    start = load_file(str(tmp_path / "straight" / "checkpoint-4" / "model.safetensors"))  # after SFT
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


@pytest.mark.slow
def test_sharded_loading_at_real_width_keeps_one_full_copy_on_rank_0_only(tmp_path):
    """Qwen2.5-VL-3B's real widths with 2 decoder layers and 2 vision blocks (2.2 GB in fp32), built on the meta
    device, sharded, and filled from rank 0: rank 1's resident memory never grows by a full copy (its shard is half
    of one, the broadcast pieces 64 MB), and every rank's weights and rotary tables are those of rank 0's full
    model, which ssrl.load_model initialised as a one-process run does (the same seed, the same weights)."""
    result = torchrun("load", tmp_path / "load.json", "--", "--model", "qwen2.5-vl-3b", "--init", "random",
                      "--layers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "load.json").read_text())
    full = report["full_bytes"]
    assert full > 2e9 and report["equal"]
    assert report["peak_bytes"][1] < 0.75 * full, report          # measured: 0.57 x (shard 0.5 x + pieces)
    assert report["peak_bytes"][0] > full, report                 # rank 0 holds the one full copy
