"""The released Spatial-SSRL-81k as downloaded (InternLM/Spatial-SSRL training/training.md): spatialssrl.parquet
whose `images` are absolute paths of a machine that is not this one, root-relative or prefixed paths, {"path"},
{"bytes"} or raw bytes, with depth/ and position/ sharing file names; no eval split; and SFT-coldstart.json in
LLaMA-Factory's alpaca layout. The fixture is built from rendered samples in exactly that layout."""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import ssrl
import tasks
from tests.helpers import tiny_dataset

HERE = Path(__file__).resolve().parent
BOX_SENTENCES = ("Please put your final answer in '\\boxed{}'.", "Think step by step and put your final answer in "
                 "'\\boxed{}'.", tasks.FORMAT_PROMPT)


def release_names(task, index, count):
    """File names as images.zip has them: crop's masked image and its four options share the source number."""
    if task == "crop":
        return [f"blackened_image_{index:05d}_{index + 500:05d}.jpg"] + [f"cropped_img_{index:05d}_{k}.jpg"
                                                                         for k in range(count - 1)]
    if task in ("depth", "position"):
        return [f"image_{index}.jpg"]                 # the same names in both folders
    return [f"image_{index}_{k}.jpg" for k in range(count)]


def entry_forms(old_root):
    """The ways a row may name one image (path relative to images/): EasyR1 opens all of them."""
    return [lambda rel, data: f"{old_root}/images/{rel}",           # absolute, from a root that has since moved
            lambda rel, data: f"data/images/{rel}",                 # root-relative (data.image_dir=/)
            lambda rel, data: f"images/{rel}",
            lambda rel, data: rel,
            lambda rel, data: {"path": f"images/{rel}", "bytes": None},
            lambda rel, data: {"bytes": data, "path": f"{rel}"},
            lambda rel, data: data]                                 # raw bytes


def build_release(tmp_path, per_task=6, seed=3):
    """(root, rows with the originals they were built from): rendered samples renamed and laid out as the release,
    the parquet written under a root that is then moved; the last row has one <image> too many."""
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    train, _ = tiny_dataset(str(tmp_path / "rendered"), per_task=per_task, eval_per_task=1, seed=seed)
    old_root = tmp_path / "downloaded"
    forms = entry_forms(old_root)
    rows, originals = [], []
    for number, record in enumerate(train):
        names = release_names(record["task"], number, len(record["images"]))
        entries = []
        for k, (source, name) in enumerate(zip(record["images"], names)):
            relative = f"{record['task']}/{name}"
            (old_root / "images" / record["task"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, old_root / "images" / relative)
            entries.append(forms[(number + k) % len(forms)](relative, Path(source).read_bytes()))
        # a row of raw bytes names no folder: the task column (null elsewhere, as no release column is known)
        named = any(not isinstance(e, bytes) and (e.get("path") if isinstance(e, dict) else e) for e in entries)
        rows.append({"problem": record["problem"], "answer": record["answer"], "images": entries,
                     "task": None if named else record["task"]})
        originals.append(record)
    rows.append({**rows[0], "problem": rows[0]["problem"] + " <image>"})
    # the types of a real column: a list of strings, a struct or binary per entry cannot mix in one Arrow column,
    # so the entries travel as they would through datasets' to_parquet of a python list: as JSON-compatible objects
    table = pyarrow.Table.from_pylist([{**row, "images": [_arrow_entry(e) for e in row["images"]]} for row in rows])
    parquet.write_table(table, old_root / "spatialssrl.parquet")
    root = tmp_path / "moved"
    os.rename(old_root, root)
    return root, originals


def _arrow_entry(entry):
    """One parquet column holds one type: every entry as a struct {path, bytes} (the Hugging Face Image layout);
    a plain path has bytes None, raw bytes have path None."""
    if isinstance(entry, dict):
        return entry
    if isinstance(entry, bytes):
        return {"path": None, "bytes": entry}
    return {"path": entry, "bytes": None}


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_release_parquet_loads_with_the_right_tasks_images_and_a_disjoint_held_out_slice(tmp_path):
    root, originals = build_release(tmp_path)
    problems = Counter()
    records = tasks.load_records(root, "train", problems)
    assert sum(problems.values()) == 1 and "placeholders" in next(iter(problems))
    assert [r["task"] for r in records] == [r["task"] for r in originals]
    for record, original in zip(records, originals):
        assert record["answer"] == original["answer"] and len(record["images"]) == len(original["images"])
        for path in record["images"]:          # never outside the moved root
            assert isinstance(path, tasks.EmbeddedImage) or path.startswith(str(root))
        for image, source in zip(tasks.open_images(record), original["images"]):
            assert np.array_equal(pixels(image), pixels(tasks.load_rgb(source))), (record["id"], source)
    depth = [r for r in records if r["task"] == "depth" and isinstance(r["images"][0], str)]
    assert depth and all("/depth/" in r["images"][0] for r in depth)      # image_N.jpg of depth/, not position/
    assert tasks.split_file(str(root), "eval") is None

    train, held_out, dropped = tasks.hold_out(records, per_task=2, seed=1)
    assert Counter(r["task"] for r in held_out) == {task: 2 for task in tasks.TASKS}
    assert not {r["id"] for r in train} & {r["id"] for r in held_out}
    held_sources = set().union(*map(tasks.source_keys, held_out))
    assert not any(tasks.source_keys(r) & held_sources for r in train)
    assert len(train) + len(held_out) + dropped == len(records)
    crop = next(r for r in records if r["task"] == "crop" and isinstance(r["images"][1], str))
    assert len(tasks.source_keys(crop)) == 1                  # masked image and options: one source


def test_release_paths_never_leave_the_data_folder(tmp_path):
    (tmp_path / "root" / "images" / "crop").mkdir(parents=True)
    (tmp_path / "elsewhere" / "crop").mkdir(parents=True)
    image = tasks.render_scene(__import__("random").Random(0), 32, 24)[0]
    image.save(tmp_path / "elsewhere" / "crop" / "x.jpg")
    image.save(tmp_path / "root" / "images" / "crop" / "y.jpg")
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "link")
    root = str(tmp_path / "root")
    assert tasks.release_image(root, "/somewhere/else/crop/y.jpg", "w")[0] == f"{root}/images/crop/y.jpg"
    for entry, message in [(str(tmp_path / "elsewhere" / "crop" / "x.jpg"), "not found under"),   # exists, outside
                           ("../elsewhere/crop/x.jpg", "leaves the dataset root"),
                           ("link/crop/x.jpg", "leaves the dataset root \\(symlink\\)"),
                           ("/etc/passwd", "no task folder"), (3, "an image must be a path")]:
        with pytest.raises(tasks.BadRecord, match=message):
            tasks.release_image(root, entry, "w")


def test_held_out_split_is_written_to_the_run_and_read_back_by_eval_and_resume(tmp_path):
    root, _ = build_release(tmp_path)
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    out = tmp_path / "run"
    args = ssrl.parse_args(["--data", str(root), "--out", str(out), "--eval-per-task", "1", "--seed", "4"])
    train, held_out = ssrl.prepare_data(args, dist)
    saved = json.loads((out / "held-out.json").read_text())
    assert sorted(saved["ids"]) == sorted(r["id"] for r in held_out) and len(held_out) == 5
    assert not {r["id"] for r in train} & set(saved["ids"])
    # a resumed run (same --out) and a later --eval of one of its checkpoints (another --out) draw nothing anew
    again = ssrl.parse_args(["--data", str(root), "--out", str(out), "--eval-per-task", "3", "--seed", "9"])
    assert [r["id"] for r in ssrl.prepare_data(again, dist)[1]] == [r["id"] for r in held_out]
    (out / "checkpoint-7").mkdir()
    later = ssrl.parse_args(["--data", str(root), "--out", str(tmp_path / "eval"), "--seed", "9", "--eval",
                             str(out / "checkpoint-7")])
    assert [r["id"] for r in ssrl.prepare_data(later, dist)[1]] == [r["id"] for r in held_out]
    assert json.loads((tmp_path / "eval" / "held-out.json").read_text())["ids"] == saved["ids"]


def write_cold_start(folder, records, think_every=2):
    """SFT-coldstart.json as LLaMA-Factory's alpaca rows (instruction with its own \\boxed{} sentence, input "",
    output, images relative to the file's folder in coldstart_SFT_images/); every `think_every`-th output keeps
    its <think> tags, the others are bare reasoning then the box."""
    (folder / "coldstart_SFT_images").mkdir(parents=True, exist_ok=True)
    rows, count = [], 0
    for i, record in enumerate(records):
        images = []
        for source in record["images"]:
            name = f"coldstart_SFT_images/img_{count}.jpg"
            shutil.copy(source, folder / name)
            images.append(name)
            count += 1
        output = tasks.cold_start_response(record, __import__("random").Random(i))
        if i % think_every:
            output = output.replace("<think>", "").replace("</think>", "")
        rows.append({"instruction": record["problem"].replace("<image>", "image<image>", 1) + " "
                     + BOX_SENTENCES[i % 3], "input": "", "output": output, "images": images})
    (folder / "SFT-coldstart.json").write_text(json.dumps(rows))
    return folder / "SFT-coldstart.json"


def test_cold_start_file_reader_wraps_bare_reasonings_and_skips_bad_rows(tmp_path):
    train, _ = tiny_dataset(str(tmp_path / "data"), per_task=2, eval_per_task=1, seed=2)
    path = write_cold_start(tmp_path / "sft", train)
    rows = json.loads(path.read_text())
    rows.append({"instruction": "<image>q", "input": "", "output": "no box here", "images": rows[0]["images"][:1]})
    rows.append({**rows[0], "images": rows[0]["images"] + ["coldstart_SFT_images/gone.jpg"]})
    rows.append({"messages": [{"role": "user", "content": rows[1]["instruction"]},
                              {"role": "assistant", "content": "<think>r</think> \\boxed{B}"}],
                 "images": rows[1]["images"]})
    path.write_text(json.dumps(rows))
    problems = Counter()
    records, wrapped = tasks.load_cold_start(str(path), problems)
    assert len(records) == len(train) + 1 and wrapped == len(train) // 2
    assert problems == {"output without <think>...</think> and without \\boxed{}": 1, "image not found": 1}
    assert all(tasks.reward(r["response"], r["answer"]) == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}
               for r in records)
    assert [r["task"] for r in records[:len(train)]] == [r["task"] for r in train]
    bare = records[1]
    assert bare["response"].startswith("<think>") and bare["format_prompt"] is False
    assert bare["images"][0] == str(tmp_path / "sft" / "coldstart_SFT_images" / "img_1.jpg") or \
        bare["images"][0].startswith(str(tmp_path / "sft"))
    assert records[-1]["response"] == "<think>r</think> \\boxed{B}"


@pytest.mark.slow
def test_alpaca_cold_start_with_and_without_think_trains_the_format(tmp_path, capsys):
    """A from-scratch tiny model (format 0) trained on an alpaca file whose outputs half lack <think> tags answers
    held-out prompts in the format afterwards (the recipe of test_ssrl_slow's cold-start test)."""
    data = tmp_path / "data"
    train, _ = tiny_dataset(str(data), per_task=40, eval_per_task=6, seed=5)
    path = write_cold_start(tmp_path / "sft", train)
    out = tmp_path / "run"
    ssrl.main(["--model", "tiny-qwen2.5-vl", "--init", "random", "--stage", "sft", "--data", str(data), "--out",
               str(out), "--sft-data", str(path), "--sft-num-train-epochs", "6", "--sft-global-batch-size", "8",
               "--sft-micro-batch-size", "8", "--sft-learning-rate", "5e-3", "--max-response-length", "96",
               "--eval-batch-size", "30", "--save-steps", "1000", "--eval-num-samples", "0"])
    printed = capsys.readouterr().out
    assert f"sft-data: {len(train)} cold-start rows" in printed and f"{len(train) // 2} outputs had no" in printed
    base = json.loads((out / "eval-base.json").read_text())
    after = json.loads((out / "eval-sft.json").read_text())
    assert base["all"]["format"] < 0.05 and after["all"]["format"] > 0.9, after


@pytest.mark.slow
def test_two_ranks_skip_the_bad_row_alike_and_train_on_the_release(tmp_path):
    """torchrun, 2 ranks on gloo: the release fixture (with its bad row, no eval split and SFT-coldstart.json beside
    the parquet) runs base eval, cold start, GRPO and the evaluations with pass@1 at T = 1."""
    root, originals = build_release(tmp_path, per_task=4)
    write_cold_start(root, originals[:8])
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "dist_ssrl.py"), "run", "--", "--data", str(root), "--out", str(out), "--eval-per-task", "1",
               "--sft-num-train-epochs", "1", "--sft-global-batch-size", "4", "--sft-micro-batch-size", "2",
               "--max-steps", "1", "--rollout-batch-size", "4", "--global-batch-size", "2",
               "--max-response-length", "8", "--save-steps", "100", "--eval-num-samples", "2"]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: skipped 1 rows" in result.stdout and "placeholders" in result.stdout
    assert "sft-data: using" in result.stdout and "has no eval split: held out 5 rows" in result.stdout
    grpo = json.loads((out / "eval-grpo.json").read_text())
    assert grpo["all"]["n"] == 5 and "pass@2" in grpo["all"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["sft", "sft", "grpo"]
