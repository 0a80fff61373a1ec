"""The shipped tiny base (checkpoints/tiny-qwen3-vl) and the stage that makes it: the base loads and sees (held-out
perception primitives far above chance), every primitive's answer is what its drawn markers say, a missing or
corrupted base is a one-line error naming the command that remakes it, and --stage pretrain writes a base that the
rest of the recipe trains from."""
import json
import random
import shutil

import pytest
import torch

import ssrl
import tasks
import tiny


def test_every_primitive_answer_is_what_the_markers_say():
    """2,700 primitives (markers of every size, plain and scene backgrounds): the answer re-derived from the drawn
    centres equals the sample's, comparisons are never ties, and the reasoning states the answer."""
    rng = random.Random(7)
    kinds = tuple(tiny.PRIMITIVES)
    for index in range(2700):
        kind = kinds[index % len(kinds)]
        sample = tiny.primitive_sample(rng, kind, 112, 6, rng.choice((None, 12, 24)), rng.random() < 0.3,
                                        rng.choice((4, 8)), rng.choice((None, 3)) if kind not in ("which",) else None)
        assert tiny.primitive_answer(sample.meta, sample.problem) == sample.answer, (kind, sample.meta)
        if kind != "option":
            radius = sample.meta["radius"]
            assert all(radius < x < 112 - radius and radius < y < 84 - radius for x, y in sample.meta["centres"])
        response = tiny.primitive_response({"task": "primitive", "answer": sample.answer, "meta": sample.meta}, rng)
        assert tasks.reward(response, sample.answer)["accuracy"] == 1.0
        if kind not in ("above", "left"):      # yes/no: the reasoning states the relation itself
            assert sample.answer in sample.meta["think"]
    # a marker moved to the other side flips a comparison's answer: the audit reads the geometry, not the sample
    sample = tiny.primitive_sample(random.Random(1), "leftmost", 112, 6, None, False, 8, 2)
    meta = json.loads(json.dumps(sample.meta))
    meta["centres"] = [[112 - x, y] for x, y in meta["centres"]]
    assert tiny.primitive_answer(meta, sample.problem) != sample.answer


def test_depth_and_position_reasonings_name_what_the_base_reads():
    """The cold start's depth and position reasonings state the lowest/highest/leftmost marker as the primitives
    do, true of the drawn centres, and read the options in order up to the direction they name."""
    rng = random.Random(5)
    image, depth = tasks.render_scene(random.Random(2), 112, 84)
    seen = set()
    for _ in range(200):
        try:
            sample = (tasks.depth_task if rng.random() < 0.5 else tasks.position_task)(image, depth, None, rng)
        except tasks.Skip:
            continue
        record = {"task": sample.task, "answer": sample.answer, "meta": sample.meta}
        think = tasks.cold_start_response(record, rng).split("</think>")[0]
        if sample.task == "depth":
            ys = [c[1] for c in sample.meta["centres"]]
            assert f"The lowest marker is {ys.index(max(ys)) + 1}." in think
            assert f"The highest marker is {ys.index(min(ys)) + 1}." in think
        else:
            meta = sample.meta
            points = {meta["camera_label"]: meta["camera"], 3 - meta["camera_label"]: meta["target"]}
            leftmost = min((1, 2), key=lambda label: points[label][0])
            truth = meta["options"]["ABCD".index(sample.answer)]
            assert f"The leftmost marker is {leftmost}." in think
            assert think.endswith(tasks.scan_options(meta["options"], truth))
            assert think.endswith(f"{sample.answer}. {truth}, yes.")
        seen.add(sample.task)
    assert seen == {"depth", "position"}


def test_shipped_base_loads_and_sees():
    """The committed base (what `python ssrl.py` starts from) answers held-out primitives at the tasks' marker size,
    drawn from a seed its training never used, far above chance: code and artefact cannot drift apart."""
    args = ssrl.parse_args(["--out", "unused"])
    assert args.model == "tiny-qwen3-vl" and args.tiny
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    model, processor, family = ssrl.load_model(args, dist)
    assert family == "qwen3_vl" and sum(p.numel() for p in model.parameters()) < 2.5e6
    results = tiny.evaluate_primitives(model, processor, tiny.primitive_held_out("ci", 300))   # 30 per kind
    # the reads the depth and position reasonings use (the last phases drop "where", "above" and "left": unused)
    comparisons = [results[kind] for kind in ("lowest", "highest", "leftmost", "rightmost")]
    assert sum(comparisons) / 4 > tiny.PRIMITIVE_CHANCE["lowest"] + 0.3 and min(comparisons) > 0.6, results
    assert results["choice"] > tiny.PRIMITIVE_CHANCE["choice"] + 0.5, results     # the position reasoning's reading
    recipe = json.loads((tiny.shipped_base("tiny-qwen3-vl") / "pretrain.json").read_text())
    assert recipe["command"] == "python ssrl.py --stage pretrain --model tiny-qwen3-vl"
    assert recipe["sha256"] == tiny.file_sha256(tiny.shipped_base("tiny-qwen3-vl") / "model.safetensors")


def test_missing_or_corrupted_base_is_one_line_naming_the_remake_command(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "shipped_base", lambda name: tmp_path / name)
    argv = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--stage", "eval"]
    with pytest.raises(ssrl.UserError, match="python ssrl.py --stage pretrain --model tiny-qwen3-vl") as error:
        ssrl.load_model(ssrl.parse_args(argv), ssrl.Dist(0, 1, 0, torch.device("cpu")))
    assert "\n" not in str(error.value)
    base = tmp_path / "tiny-qwen3-vl"
    shutil.copytree(ssrl.Path(ssrl.__file__).parent / "checkpoints" / "tiny-qwen3-vl", base)
    weights = bytearray((base / "model.safetensors").read_bytes())
    weights[-100] ^= 0x40                        # one flipped bit in a weight: from_pretrained would load it silently
    (base / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ssrl.UserError, match="corrupted.*python ssrl.py --stage pretrain --model tiny-qwen3-vl"):
        ssrl.load_model(ssrl.parse_args(argv), ssrl.Dist(0, 1, 0, torch.device("cpu")))
    (base / "model.safetensors").write_bytes(b"")
    with pytest.raises(ssrl.UserError, match="corrupted"):
        ssrl.load_model(ssrl.parse_args(argv), ssrl.Dist(0, 1, 0, torch.device("cpu")))


def test_pretrain_stage_writes_a_base_the_recipe_trains_from(tmp_path):
    """A 63-step --stage pretrain writes a from_pretrained folder (weights, tokenizer, processor, pretrain.json
    whose sha256 matches); --model on that folder gets the tiny defaults and runs the cold start from it."""
    ssrl.main(["--stage", "pretrain", "--pretrain-scale", "0.005", "--pretrain-eval", "10", "--out",
               str(tmp_path / "base")])
    recipe = json.loads((tmp_path / "base" / "pretrain.json").read_text())
    assert recipe["steps"] == 63 and recipe["sha256"] == tiny.file_sha256(tmp_path / "base" / "model.safetensors")
    assert set(recipe["held_out"]) >= set(tiny.PRETRAIN_EVAL_KINDS)
    assert ssrl.is_tiny(str(tmp_path / "base"))
    ssrl.main(["--model", str(tmp_path / "base"), "--stage", "sft", "--data", str(tmp_path / "data"), "--per-task",
               "8", "--eval-per-task", "2", "--max-response-length", "16", "--sft-data-fraction", "1",
               "--sft-num-train-epochs", "1", "--out", str(tmp_path / "run")])
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stage"] == "sft" and state["args"]["tiny"]


@pytest.mark.slow
def test_cold_start_from_the_base_teaches_depth_ordering(tmp_path):
    """What the base is for: 150 cold-start steps on the depth task alone (reasonings that name the lowest and the
    highest marker) take held-out depth ordering from 0.00 to far above chance (0.167). Measured: 0.783 on 60
    held-out prompts in 54 s on one core; from random init the same task stayed at chance through 2,000 steps."""
    torch.set_num_threads(1)
    ssrl.main(["--stage", "sft", "--tasks", "depth", "--per-task", "2400", "--eval-per-task", "60", "--data",
               str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--save-steps", "1000", "--sft-data-fraction", "1",
               "--sft-num-train-epochs", "1"])
    base = json.loads((tmp_path / "run" / "eval-base.json").read_text())["depth"]
    after = json.loads((tmp_path / "run" / "eval-sft.json").read_text())["depth"]
    assert base["accuracy"] < 0.1 and after["n"] == 60
    assert after["accuracy"] > 0.5 and after["format"] == 1.0, after
