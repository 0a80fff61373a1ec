"""Inputs, builder and loader: odd image modes, broken files and layouts are counted skips; builds are
deterministic whatever the worker count, atomic, and never overwrite silently; the loader stays inside its root."""
import io
import json
import os
import random
import sys
import types

import numpy as np
import pytest
from PIL import Image

import tasks


def _scene(seed, width=96, height=72):
    return tasks.render_scene(random.Random(seed), width, height)


def _save_plain(folder, name, seed, **kwargs):
    image, depth = _scene(seed, **kwargs)
    image.save(os.path.join(folder, name + ".png"))
    np.save(os.path.join(folder, name + ".npy"), depth)
    return image, depth


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


# ---- images of every kind ------------------------------------------------------------------------------------

def test_load_rgb_converts_every_mode(tmp_path):
    base = _scene(0)[0]
    cases = {"grey.png": base.convert("L"), "palette.png": base.convert("P"), "rgba.png": base.convert("RGBA"),
             "la.png": base.convert("LA"), "cmyk.jpg": base.convert("CMYK"), "bits.png": base.convert("1")}
    for name, image in cases.items():
        image.save(tmp_path / name)
    transparent = base.convert("P")
    transparent.info["transparency"] = 0
    transparent.save(tmp_path / "palette_alpha.png", transparency=0)
    sixteen = np.full((40, 50), 65535, np.uint16)
    sixteen[:, :25] = 32896
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    for name in list(cases) + ["palette_alpha.png"]:
        loaded = tasks.load_rgb(str(tmp_path / name))
        assert loaded.mode == "RGB" and loaded.size == base.size, name
    loaded = np.asarray(tasks.load_rgb(str(tmp_path / "sixteen.png")))
    assert loaded.shape == (40, 50, 3) and loaded[0, 0, 0] == 128 and loaded[0, -1, 0] == 255


def test_load_rgb_applies_exif_orientation(tmp_path):
    image = _scene(1, 80, 40)[0]
    exif = Image.Exif()
    exif[0x0112] = 6                     # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert tasks.load_rgb(str(tmp_path / "rotated.jpg")).size == (40, 80)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_corrupt_images_are_skipped(tmp_path, content):
    if content == "truncated":
        buffer = io.BytesIO()
        _scene(2)[0].save(buffer, "JPEG")
        content = buffer.getvalue()[:len(buffer.getvalue()) // 2]
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises(tasks.Skip, match="corrupt image"):
        tasks.load_rgb(str(tmp_path / "bad.jpg"))


# ---- depth inputs ----------------------------------------------------------------------------------------------

def test_bad_depth_inputs_are_skips(tmp_path):
    image, depth = _save_plain(tmp_path, "good", 3)
    np.save(tmp_path / "short.npy", depth[:-1])
    np.save(tmp_path / "nan.npy", np.full_like(depth, np.nan))
    np.save(tmp_path / "inf.npy", np.where(depth > 0, np.inf, -1.0))
    np.save(tmp_path / "zero.npy", np.zeros_like(depth))
    np.save(tmp_path / "mask_wrong.npy", np.ones((3, 3), bool))
    np.save(tmp_path / "mask_none.npy", np.zeros_like(depth, bool))
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    good, png = str(tmp_path / "good.png"), str(tmp_path / "good.npy")
    with pytest.raises(tasks.Skip, match="depth shape mismatch"):
        tasks.load_rgbd(good, str(tmp_path / "short.npy"))
    with pytest.raises(tasks.Skip, match="corrupt depth"):
        tasks.load_rgbd(good, str(tmp_path / "broken.npy"))
    with pytest.raises(tasks.Skip, match="mask shape mismatch"):
        tasks.load_rgbd(good, png, str(tmp_path / "mask_wrong.npy"))
    for name, mask in (("nan.npy", None), ("inf.npy", None), ("zero.npy", None), ("good.npy", "mask_none.npy")):
        image, depth, mask = tasks.load_rgbd(good, str(tmp_path / name), mask and str(tmp_path / mask))
        for make in (tasks.depth_task, tasks.position_task):
            with pytest.raises(tasks.Skip, match="too little valid depth"):
                make(image, depth, mask, random.Random(0))
    with pytest.raises(tasks.Skip, match="depth shape mismatch"):
        tasks.depth_task(image, np.ones((5, 5)), None, random.Random(0))
    with pytest.raises(tasks.Skip, match="mask shape mismatch"):
        tasks.position_task(image, depth, np.ones((5, 5), bool), random.Random(0))


class _FakeH5File:
    """Stands in for h5py.File (h5py is an optional extra): the test's .h5 files are .npy bytes."""

    def __init__(self, path, mode):
        self.data = {"depth": np.load(path, allow_pickle=False)}

    def __enter__(self):
        return self.data

    def __exit__(self, *exc):
        return False


def _make_layouts(root):
    """One source in every supported layout, plus broken ones; returns the expected (image, depth, mask) names."""
    plain = root / "plain"
    plain.mkdir(parents=True)
    _save_plain(plain, "a", 10)
    image, depth = _save_plain(plain, "b", 11)
    np.save(plain / "b_mask.npy", depth > 0)
    image, depth = _scene(12)
    image.save(plain / "c.jpg")
    Image.fromarray(np.clip(depth * 1000, 0, 65535).astype(np.uint16)).save(plain / "c_depth.png")
    diode = root / "diode" / "scene_00001"
    diode.mkdir(parents=True)
    image, depth = _scene(13)
    image.save(diode / "00001_00.png")
    np.save(diode / "00001_00_depth.npy", depth[..., None])
    np.save(diode / "00001_00_depth_mask.npy", (depth > 0).astype(np.float32))
    mega = root / "MegaDepth_v1" / "0001" / "dense0"
    (mega / "imgs").mkdir(parents=True)
    (mega / "depths").mkdir()
    image, depth = _scene(14)
    image.save(mega / "imgs" / "1234.jpg")
    with open(mega / "depths" / "1234.h5", "wb") as handle:
        np.save(handle, depth)
    broken = root / "broken"
    broken.mkdir()
    (broken / "corrupt.jpg").write_bytes(b"garbage")
    np.save(broken / "corrupt.npy", np.ones((72, 96), np.float32))
    image, depth = _scene(15)
    image.save(broken / "wrong.png")
    np.save(broken / "wrong.npy", depth[:10])
    image.save(broken / "masked.png")
    np.save(broken / "masked.npy", depth)
    np.save(broken / "masked_mask.npy", np.ones((4, 4), bool))
    image.save(broken / "nodepth.png")
    np.save(broken / "orphan.npy", depth)
    image.resize((12, 9)).save(broken / "tiny.png")
    np.save(broken / "tiny.npy", depth[:9, :12])
    return {"plain/a.png", "plain/b.png", "plain/c.jpg", "diode/scene_00001/00001_00.png",
            "MegaDepth_v1/0001/dense0/imgs/1234.jpg"}


def test_find_rgbd_understands_every_layout(tmp_path):
    good = _make_layouts(tmp_path)
    pairs, skipped = tasks.find_rgbd(str(tmp_path))
    found = {os.path.relpath(image, tmp_path): (depth, mask) for image, depth, mask in pairs}
    assert good <= set(found)
    assert found["plain/b.png"][1].endswith("b_mask.npy") and found["plain/a.png"][1] is None
    assert found["plain/c.jpg"][0].endswith("c_depth.png")
    assert found["diode/scene_00001/00001_00.png"][1].endswith("00001_00_depth_mask.npy")
    assert found["MegaDepth_v1/0001/dense0/imgs/1234.jpg"][0].endswith("depths/1234.h5")
    assert skipped == {"image without depth": 1, "depth without image": 1}
    assert all(not image.endswith("_depth.png") for image in tasks.find_images(str(tmp_path)))


def test_megadepth_without_h5py_is_a_named_skip(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(tasks.Skip, match="pip install h5py"):
        tasks.load_depth(str(tmp_path / "x.h5"))


def test_build_from_every_layout_counts_skips_and_keeps_eval_disjoint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", types.SimpleNamespace(File=_FakeH5File))
    good = _make_layouts(tmp_path / "in")
    summary = tasks.build_dataset(tmp_path / "out", rgbd=str(tmp_path / "in"), per_task=12, eval_per_task=4,
                                  max_side=96, progress=False)
    assert summary["train"] == dict.fromkeys(tasks.TASKS, 12) and summary["eval"] == dict.fromkeys(tasks.TASKS, 4)
    reasons = " | ".join(summary["skips"])
    for reason in ("corrupt image", "depth shape mismatch", "mask shape mismatch", "too small",
                   "input: depth without image", "input: image without depth"):
        assert reason in reasons
    sources = {split: {record["meta"]["source"] for record in tasks.load_records(tmp_path / "out", split)}
               for split in ("train", "eval")}
    assert not sources["train"] & sources["eval"]
    depth_sources = {record["meta"]["source"] for split in ("train", "eval")
                     for record in tasks.load_records(tmp_path / "out", split) if tasks.TASKS[record["task"]].depth}
    assert depth_sources == good                        # every layout read, MegaDepth through the fake h5py


# ---- builder ---------------------------------------------------------------------------------------------------

def test_build_writes_valid_records(tmp_path):
    summary = tasks.build_dataset(tmp_path, per_task=5, eval_per_task=2, max_side=112, progress=False)
    assert summary["samples"] == 35 and not summary["missing"]
    for split, count in (("train", 25), ("eval", 10)):
        records = tasks.load_records(tmp_path, split)
        assert len(records) == count
        for record in records:
            assert record["problem"].count("<image>") == len(record["images"]) == (5 if record["task"] == "crop"
                                                                                    else 1)
            images = tasks.open_images(record)
            assert images[0].mode == "RGB" and tuple(record["meta"]["size"]) == (112, 84)
            if record["task"] in ("crop", "depth", "position"):      # grids cut the image to whole patches
                assert images[0].size == (112, 84)
            assert tasks.reward(f"<think>.</think>\\boxed{{{record['answer']}}}", record["answer"])["overall"] == 1
    train = {r["meta"]["source"] for r in tasks.load_records(tmp_path, "train")}
    held_out = {r["meta"]["source"] for r in tasks.load_records(tmp_path, "eval")}
    assert not train & held_out
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_build_bytes_do_not_depend_on_workers(tmp_path):
    for workers in (1, 2):
        tasks.build_dataset(tmp_path / str(workers), per_task=4, eval_per_task=2, max_side=64, seed=5,
                            workers=workers, progress=False)
    first, second = _files(tmp_path / "1"), _files(tmp_path / "2")
    assert first.keys() == second.keys() and len(first) > 30
    assert all(first[name] == second[name] for name in first)


def test_build_refuses_to_overwrite_and_replaces_with_the_flag(tmp_path):
    tasks.build_dataset(tmp_path, per_task=2, eval_per_task=1, max_side=64, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        tasks.build_dataset(tmp_path, per_task=1, eval_per_task=1, max_side=64, progress=False)
    tasks.build_dataset(tmp_path, per_task=1, eval_per_task=0, tasks=("flip",), max_side=64, overwrite=True,
                        progress=False)
    assert len(tasks.load_records(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path / "flip")) == ["train_000000_0.jpg"]
    assert os.listdir(tmp_path / "crop") == []            # the old dataset's images went with it


def test_interrupted_build_leaves_no_jsonl(tmp_path, monkeypatch):
    made = tasks._make_sample
    calls = []

    def dies_midway(job):
        calls.append(job)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return made(job)

    monkeypatch.setattr(tasks, "_make_sample", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        tasks.build_dataset(tmp_path, per_task=3, eval_per_task=1, max_side=64, progress=False)
    assert not [name for name in os.listdir(tmp_path) if ".jsonl" in name]


def test_cli_builds_and_refuses_a_second_time(tmp_path, capsys):
    arguments = ["--out", str(tmp_path), "--per-task", "2", "--eval-per-task", "1", "--max-side", "64",
                 "--no-progress", "--tasks", "shuffle", "position", "--facing-weights", "code"]
    tasks.main(arguments)
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == {"shuffle": 2, "position": 2}
    with pytest.raises(SystemExit) as exit_info:
        tasks.main(arguments)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


# ---- loader ----------------------------------------------------------------------------------------------------

def _write_jsonl(root, images):
    record = {"id": "x", "task": "flip", "problem": "<image>q", "answer": "0-1", "images": images, "meta": {}}
    (root / "train.jsonl").write_text(json.dumps(record) + "\n")


@pytest.mark.parametrize("path", ["../outside.jpg", "/etc/passwd", "a/../../b.jpg", "", "C:\\..\\x.jpg"])
def test_loader_rejects_paths_leaving_the_root(tmp_path, path):
    _write_jsonl(tmp_path, [path])
    with pytest.raises(tasks.BadRecord):
        tasks.load_records(tmp_path)


def test_loader_rejects_symlinks_out_of_the_root(tmp_path):
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path, tmp_path / "root" / "link")
    _write_jsonl(tmp_path / "root", ["link/x.jpg"])
    with pytest.raises(tasks.BadRecord, match="leaves the dataset root"):
        tasks.load_records(tmp_path / "root")


def test_loader_checks_placeholders_and_json(tmp_path):
    _write_jsonl(tmp_path, ["a.jpg", "b.jpg"])
    with pytest.raises(tasks.BadRecord, match="placeholders"):
        tasks.load_records(tmp_path)
    (tmp_path / "train.jsonl").write_text("{not json\n")
    with pytest.raises(tasks.BadRecord, match=":1: not JSON"):
        tasks.load_records(tmp_path)
    with pytest.raises(FileNotFoundError):
        tasks.load_records(tmp_path, "eval")


def test_open_images_names_the_bad_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(tasks.BadRecord, match="bad.jpg: corrupt image"):
        tasks.open_images({"images": [str(tmp_path / "bad.jpg")]})
    with pytest.raises(tasks.BadRecord, match="missing"):
        tasks.open_images({"images": [str(tmp_path / "gone.jpg")]})


def test_released_parquet_needs_pyarrow(tmp_path, monkeypatch):
    (tmp_path / "spatialssrl.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        tasks.load_records(tmp_path)


def test_released_parquet_rows_become_records(tmp_path, monkeypatch):
    """The reader's two pyarrow calls faked, so that this runs without pyarrow (tests/test_release.py reads real
    parquet files)."""
    (tmp_path / "data" / "parquets").mkdir(parents=True)
    (tmp_path / "data" / "parquets" / "train.parquet").write_bytes(b"PAR1")
    for name in ("flip/0001.png", "crop/1.png", "crop/2.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _scene(0)[0].save(tmp_path / name)
    rows = [{"problem": "<image>q", "answer": "3-0", "images": ["flip/0001.png"]},
            {"problem": "q <image><image>", "answer": "B", "images": [{"path": "crop/1.png"}, {"path": "crop/2.png"}]}]
    table = types.SimpleNamespace(to_pylist=lambda: rows)
    schema = types.SimpleNamespace(names=["problem", "answer", "images"])
    parquet = types.SimpleNamespace(read_table=lambda path, columns: table, read_schema=lambda path: schema)
    monkeypatch.setitem(sys.modules, "pyarrow", types.SimpleNamespace(parquet=parquet))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)
    records = tasks.load_records(tmp_path)
    assert [r["task"] for r in records] == ["flip", "crop"]
    assert records[1]["images"] == [str(tmp_path / "crop" / "1.png"), str(tmp_path / "crop" / "2.png")]


def test_rgb_folder_feeds_the_rgb_tasks_and_scenes_the_depth_tasks(tmp_path):
    (tmp_path / "rgb" / "nested").mkdir(parents=True)
    for seed in range(4):
        _scene(seed)[0].save(tmp_path / "rgb" / "nested" / f"{seed}.jpg")
    summary = tasks.build_dataset(tmp_path / "out", rgb=str(tmp_path / "rgb"), per_task=3, eval_per_task=1,
                                  max_side=64, progress=False)
    assert not summary["missing"] and summary["sources"]["rgbd"] == "rendered scenes"
    for record in tasks.load_records(tmp_path / "out") + tasks.load_records(tmp_path / "out", "eval"):
        source = record["meta"]["source"]
        assert source.startswith("scene:") if tasks.TASKS[record["task"]].depth else source.startswith("nested/")
    with pytest.raises(ValueError, match="not a directory"):
        tasks.build_dataset(tmp_path / "other", rgb=str(tmp_path / "missing"), progress=False)
