"""The GRPO stage of ssrl.py end to end on the tiny model: a killed and resumed run ends with the same weights as
one that never stopped (tests/test_ssrl_dist.py does the same across the SFT -> GRPO boundary under torchrun)."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import grpo
import ssrl
import tiny
from tests.helpers import tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def length_reward(response, answer):
    """A stand-in reward that an untrained policy already varies on (the task reward is 0 for all of its samples,
    which would make every advantage 0 and every update a no-op, so the resume check could not fail)."""
    score = min(len(response), 40) / 40
    return {"overall": score, "format": 0.0, "accuracy": score}


def grpo_flags(data, out, steps):
    return ["--stage", "grpo", "--data", str(data), "--out", str(out), "--tasks", "depth", "flip",
            "--max-steps", str(steps), "--rollout-batch-size", "4", "--global-batch-size", "2",
            "--max-response-length", "12", "--save-steps", "2", "--save-limit", "2", "--eval-limit", "1",
            "--rollout-save-steps", "1"]


@pytest.mark.slow
def test_killed_and_resumed_grpo_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "task_reward", length_reward)
    data = tmp_path / "data"
    tiny_dataset(str(data), per_task=8, eval_per_task=1, seed=3)
    ssrl.main(grpo_flags(data, tmp_path / "straight", 4))
    ssrl.main(grpo_flags(data, tmp_path / "resumed", 2))                 # the run killed after checkpoint 2 ...
    ssrl.main(grpo_flags(data, tmp_path / "resumed", 4) + ["--resume"])  # ... and resumed from it

    straight = load_file(str(tmp_path / "straight/checkpoint-4/model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed/checkpoint-4/model.safetensors"))
    reference = load_file(str(tiny.shipped_base("tiny-qwen3-vl") / "model.safetensors"))     # where GRPO started
    assert straight.keys() == resumed.keys()
    assert all((straight[k] == resumed[k]).all() for k in straight), "resumed weights differ"
    assert any((straight[k] != reference[k]).any() for k in straight), "GRPO never changed the policy"

    rows = [json.loads(line) for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["grpo_step"] for r in rows if "grpo_step" in r] == [1, 2, 3, 4]
    assert all(r["num_updates"] == 2 and r["grad_norm"] > 0 for r in rows if "grpo_step" in r)
    state = json.loads((tmp_path / "resumed/checkpoint-4/trainer_state.json").read_text())
    assert state["stage"] == "grpo" and state["grpo_step"] == 4
    assert sorted(p.name for p in (tmp_path / "resumed/rollouts").iterdir()) == [f"step-{i}.jsonl" for i in (1, 2, 3, 4)]
    rollout = json.loads((tmp_path / "resumed/rollouts/step-3.jsonl").read_text().splitlines()[0])
    assert {"prompt", "completion", "parsed", "reward", "images", "id"} <= rollout.keys()
    assert len(ssrl.checkpoints(tmp_path / "resumed")) == 2      # --save-limit


def test_grpo_flag_mistakes_give_one_line_errors(tmp_path):
    data = tmp_path / "data"
    tiny_dataset(str(data), per_task=2, eval_per_task=1, seed=5)
    cases = [(["--rollout-batch-size", "6", "--global-batch-size", "4"], "must be a multiple of --global-batch-size"),
             (["--num-generations", "1"], "--num-generations must be at least 2"),
             (["--rollout-batch-size", "64", "--global-batch-size", "32"], "needs at least --rollout-batch-size 64")]
    for argv, message in cases:
        with pytest.raises(ssrl.UserError, match=message) as error:
            ssrl.main(["--stage", "grpo", "--data", str(data), "--out", str(tmp_path / "run"), *argv])
        assert "\n" not in str(error.value)


def test_unreadable_rollout_records_are_counted_and_replaced(tmp_path):
    import argparse
    import torch
    train, _ = tiny_dataset(str(tmp_path / "data"), per_task=2, eval_per_task=1, seed=7)
    args = argparse.Namespace(rollout_batch_size=4, seed=1)
    single = ssrl.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    chosen, _, _ = ssrl.rollout_prompts(args, single, train, 0, len(train) // 4)
    for record in chosen[:2]:
        Path(record["images"][0]).unlink()
    kept, images, skipped = ssrl.rollout_prompts(args, single, train, 0, len(train) // 4)
    assert skipped == 2 and len(kept) == len(images) == 4        # every rank keeps its prompt count
    assert all(r in chosen[2:] for r in kept)
