"""ssrl.py end to end on the tiny model: the cold start teaches the answer format; a stopped and resumed run ends
with the same weights as one that never stopped."""
import json

import pytest
import torch
from safetensors.torch import load_file

import ssrl
from tests.helpers import tiny_dataset


@pytest.mark.slow
def test_cold_start_drives_format_on_held_out_prompts_above_95_percent(tmp_path):
    data = tmp_path / "data"
    tiny_dataset(str(data), per_task=40, eval_per_task=6, seed=5)
    out = tmp_path / "run"
    # A 1.7M-parameter model from random init (not the shipped base, which already answers in the format) needs
    # optimizer steps more than examples: 52 steps of 16 at 3e-3 left the loss at 1.2 (floor ~0.3) and greedy
    # decoding looping ("2-1-1-1-...", no </think>) on crop and position; 125 steps of 8 at 5e-3, in about the same
    # compute, reached ~0.4 and format 1.0 on two seeds.
    ssrl.main(["--model", "tiny-qwen2.5-vl", "--init", "random", "--stage", "sft", "--data", str(data), "--out",
               str(out), "--sft-num-train-epochs", "6", "--sft-data-fraction", "1",
               "--sft-global-batch-size", "8", "--sft-micro-batch-size", "8", "--sft-learning-rate", "5e-3",
               "--max-response-length", "96", "--eval-batch-size", "30", "--save-steps", "1000"])
    base = json.loads((out / "eval-base.json").read_text())
    after = json.loads((out / "eval-sft.json").read_text())
    assert base["all"]["format"] < 0.05
    assert after["all"]["format"] > 0.95, after
    assert after["all"]["n"] == 30 and set(after) == {"shuffle", "flip", "crop", "depth", "position", "all"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] / 3 and all(f"loss/{t}" in rows[-1] for t in ("depth", "crop"))


def final_weights(out):
    return load_file(str(max(ssrl.checkpoints(out), key=ssrl.checkpoint_step) / "model.safetensors"))


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    data = tmp_path / "data"
    tiny_dataset(str(data), per_task=8, eval_per_task=1, seed=6)
    flags = ["--stage", "sft", "--data", str(data), "--sft-global-batch-size", "8", "--sft-micro-batch-size", "3",
             "--sft-num-train-epochs", "1", "--sft-data-fraction", "1", "--save-steps", "2", "--save-limit", "2",
             "--max-response-length", "4"]
    ssrl.main(flags + ["--out", str(tmp_path / "straight")])

    real_save = ssrl.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(args, dist, model, processor, step, stage, *rest, **kwargs):
        path = real_save(args, dist, model, processor, step, stage, *rest, **kwargs)
        if step == 2:
            raise Killed
        return path

    monkeypatch.setattr(ssrl, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        ssrl.main(flags + ["--out", str(tmp_path / "stopped")])
    monkeypatch.setattr(ssrl, "save_checkpoint", real_save)
    (tmp_path / "stopped" / ".tmp-checkpoint-4").mkdir()     # a save the kill interrupted: ignored on resume
    ssrl.main(flags + ["--out", str(tmp_path / "stopped"), "--resume"])

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert [p.name for p in sorted(ssrl.checkpoints(tmp_path / "stopped"), key=ssrl.checkpoint_step)] == \
        ["checkpoint-4", "checkpoint-5"]
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    rows = {json.dumps(r, sort_keys=True) for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").open())}
    resumed_rows = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").open()]
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5]
    for row in resumed_rows:     # same losses at the same steps (timings differ)
        match = [json.loads(r) for r in rows if json.loads(r)["step"] == row["step"]][0]
        assert match["loss"] == row["loss"] and match["learning_rate"] == row["learning_rate"]
