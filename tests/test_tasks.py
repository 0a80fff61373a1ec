"""Audits of the five pretext tasks: every answer is re-derived from the source pixels (and depth) and the meta.

Hundreds of samples per task on small rendered scenes (64-160 px), as the issue asks; the whole file runs in a few
seconds. Inputs and reward tests: test_tasks_inputs.py, test_tasks_reward.py.
"""
import math
import random
from collections import Counter

import numpy as np
import pytest

import tasks

SAMPLES = 300


@pytest.fixture(scope="module")
def scenes():
    """40 rendered scenes of assorted sizes: (RGB image, depth)."""
    sizes = [(64, 48), (96, 96), (112, 84), (128, 160), (160, 120)]
    return [tasks.render_scene(random.Random(k), *sizes[k % len(sizes)]) for k in range(40)]


def _samples(scenes, make, count=SAMPLES):
    """count samples (source index, sample) drawn from the scenes with fresh rngs; skips are allowed but few."""
    out, skipped = [], 0
    for k in range(count * 3):
        if len(out) == count:
            break
        image, depth = scenes[k % len(scenes)]
        try:
            out.append((k % len(scenes), make(image, depth, random.Random(1000 + k))))
        except tasks.Skip:
            skipped += 1
    assert len(out) == count, f"only {len(out)} samples, {skipped} skips"
    return out


def _annotation_mask(height, width, rows, cols, meta):
    """True where the task drew borders or labels over the patches (excluded from pixel equality)."""
    patch_w, patch_h = meta["patch"]
    drawn = np.zeros((rows * patch_h, cols * patch_w), bool)
    for r in range(rows):
        for c in range(cols):
            top, left = r * patch_h, c * patch_w
            drawn[top:top + patch_h, left:left + patch_w][:meta["border"] + 1] = True
            drawn[top:top + patch_h, left:left + patch_w][-meta["border"] - 1:] = True
            drawn[top:top + patch_h, left:left + patch_w][:, :meta["border"] + 1] = True
            drawn[top:top + patch_h, left:left + patch_w][:, -meta["border"] - 1:] = True
            drawn[top:top + meta["label_box"], left:left + meta["label_box"]] = True
    return drawn


def test_shuffle_answer_unshuffles_to_the_source(scenes):
    variants = Counter()
    for index, sample in _samples(scenes, lambda image, depth, rng: tasks.shuffle_task(image, rng)):
        rows, cols = sample.meta["grid"]
        variants[rows, cols, sample.meta["masked"] is not None] += 1
        patch_w, patch_h = sample.meta["patch"]
        source = np.asarray(scenes[index][0])[:rows * patch_h, :cols * patch_w]
        shown = np.asarray(sample.images[0])
        labels = [int(label) for label in sample.answer.split("-")]
        assert sorted(labels) == list(range(rows * cols))
        restored = np.zeros_like(source)
        keep = ~_annotation_mask(*source.shape[:2], rows, cols, sample.meta)
        for position, label in enumerate(labels):       # source position k holds the patch labelled labels[k]
            r, c = divmod(position, cols)
            lr, lc = divmod(label, cols)
            restored[r * patch_h:(r + 1) * patch_h, c * patch_w:(c + 1) * patch_w] = \
                shown[lr * patch_h:(lr + 1) * patch_h, lc * patch_w:(lc + 1) * patch_w]
            if label == sample.meta["masked"]:
                assert (shown[lr * patch_h:(lr + 1) * patch_h, lc * patch_w:(lc + 1) * patch_w]
                        [keep[:patch_h, :patch_w]] == 255).all()
                keep[r * patch_h:(r + 1) * patch_h, c * patch_w:(c + 1) * patch_w] = False
        assert (restored[keep] == source[keep]).all()
        assert sample.problem.count("<image>") == 1 and len(sample.images) == 1
    assert {(2, 2, False), (2, 2, True), (1, 3, False), (1, 4, False), (3, 1, False), (4, 1, False)} <= set(variants)


def test_flip_answer_names_the_flipped_patch(scenes):
    answers = Counter()
    for index, sample in _samples(scenes, lambda image, depth, rng: tasks.flip_task(image, rng)):
        label, direction = map(int, sample.answer.split("-"))
        answers[sample.answer] += 1
        patch_w, patch_h = sample.meta["patch"]
        source = np.asarray(scenes[index][0])[:2 * patch_h, :2 * patch_w]
        shown = np.asarray(sample.images[0]).copy()
        drawn = _annotation_mask(*source.shape[:2], 2, 2, sample.meta)
        r, c = divmod(label, 2)
        box = (slice(r * patch_h, (r + 1) * patch_h), slice(c * patch_w, (c + 1) * patch_w))
        flip = (lambda a: a[::-1]) if direction == 0 else (lambda a: a[:, ::-1])
        before = shown[box].copy()
        shown[box] = flip(shown[box])
        drawn[box] |= flip(drawn[box])                    # the label drawn on top moves with the flip-back
        assert (shown[~drawn] == source[~drawn]).all()
        assert np.abs(before.astype(int) - source[box])[~drawn[box]].mean() > 0   # the flip is visible
    assert len(answers) == 8


def test_crop_answer_option_is_the_blacked_out_square(scenes):
    letters, kinds = Counter(), Counter()
    for index, sample in _samples(scenes, lambda image, depth, rng: tasks.crop_task(image, rng)):
        source = np.asarray(scenes[index][0])
        x, y, side, _ = sample.meta["box"]
        assert side == min(source.shape[:2]) // 2
        masked = np.asarray(sample.images[0])
        assert (masked[y:y + side, x:x + side] == 0).all()
        outside = np.ones(source.shape[:2], bool)
        outside[y:y + side, x:x + side] = False
        assert (masked[outside] == source[outside]).all()
        options = [np.asarray(option).astype(int) for option in sample.images[1:]]
        truth = "ABCD".index(sample.answer)
        assert (options[truth] == source[y:y + side, x:x + side]).all()
        assert sample.meta["options"][truth] == "truth"
        for i in range(4):
            assert options[i].shape == (side, side, 3)
            for j in range(i):      # >= 4 on 2x2 averages in crop_task, so >= 3 here (rounding of the averages)
                assert np.abs(options[i] - options[j]).mean() >= 3.0
        letters[sample.answer] += 1
        kinds.update(sample.meta["options"])
        assert sample.problem.count("<image>") == 5
    assert set(letters) == set("ABCD") and min(letters.values()) > SAMPLES / 8
    assert len(kinds) == 6


def test_depth_answer_orders_the_source_depths(scenes):
    orders = Counter()
    for index, sample in _samples(scenes, lambda image, depth, rng: tasks.depth_task(image, depth, None, rng)):
        depth = scenes[index][1]
        order = [int(label) for label in sample.answer.split("-")]
        assert sorted(order) == [1, 2, 3]
        along = [depth[sample.meta["centres"][label - 1][1], sample.meta["centres"][label - 1][0]] for label in order]
        assert along[0] < along[1] < along[2] and along[0] > 0
        assert sample.meta["depths"] == [float(depth[y, x]) for x, y in sample.meta["centres"]]
        orders[sample.answer] += 1
    assert len(orders) == 6 and min(orders.values()) > SAMPLES / 20


THETA = {"away": 0, "left": 90, "towards": 180, "right": 270}


def _paper_answer(facing, dx, dd, variant):
    """Spec 1.5, paper form: [x~, z~] = Rot(theta) [dx, dd]; x~ > 0 Right, z~ > 0 Front; near pairs read only the
    component made of dx, far ones only the one made of dd, diagonal both."""
    theta = math.radians(THETA[facing])
    cos, sin = round(math.cos(theta)), round(math.sin(theta))
    x_rot, z_rot = cos * dx + sin * dd, -sin * dx + cos * dd
    lateral = "Right" if x_rot > 0 else "Left"
    depthwise = "Front" if z_rot > 0 else "Back"
    if variant == "diagonal":
        return f"{lateral}-{depthwise}"
    lateral_uses_dx = cos != 0
    return lateral if lateral_uses_dx == (variant == "near") else depthwise


def test_position_answer_agrees_with_the_geometry(scenes):
    letters, variants, facings = Counter(), Counter(), Counter()
    for index, sample in _samples(scenes, lambda image, depth, rng: tasks.position_task(image, depth, None, rng)):
        depth = scenes[index][1].astype(float)
        meta = sample.meta
        (cx, cy), (tx, ty) = meta["camera"], meta["target"]
        half = meta["window"] // 2

        def window_max(x, y):
            block = depth[max(0, y - half):y + half + 1, max(0, x - half):x + half + 1]
            return np.nanmax(np.where(block > 0, block, np.nan))

        dx, dd = tx - cx, window_max(tx, ty) - window_max(cx, cy)
        assert dx == meta["dx"] and dd == pytest.approx(meta["dd"], abs=1e-4)
        if meta["variant"] == "near":
            assert abs(dx) >= min(depth.shape) // 8
        else:
            assert dd != 0 and np.sign(depth[ty, tx] - depth[cy, cx]) == np.sign(dd)
        if meta["variant"] == "diagonal":
            assert abs(dx) > meta["diagonal_gap"]
        truth = _paper_answer(meta["facing"], dx, dd, meta["variant"])
        assert meta["options"]["ABCD".index(sample.answer)] == truth
        assert f"camera at position '{meta['camera_label']}'" in sample.problem
        assert f"{sample.answer}. {truth}" in sample.problem
        assert ("ignore the height" in sample.problem) == (meta["variant"] != "near")
        letters[sample.answer] += 1
        variants[meta["variant"]] += 1
        facings[meta["facing"]] += 1
    assert set(letters) == set("ABCD") and set(variants) == {"near", "far", "diagonal"} and len(facings) == 4


def test_position_facing_weights_flag():
    image, depth = tasks.render_scene(random.Random(3), 160, 120)
    counts = Counter()
    for k in range(200):
        try:
            sample = tasks.position_task(image, depth, None, random.Random(k), facing_weights=tasks.FACING_WEIGHTS_CODE)
        except tasks.Skip:
            continue
        counts[sample.meta["facing"]] += 1
    assert counts["away"] < counts["left"] / 2          # 10 vs 30


def test_markers_use_per_label_colours():
    for seed in range(20):
        image, depth = tasks.render_scene(random.Random(seed), 112, 84)
        try:
            sample = tasks.depth_task(image, depth, None, random.Random(0))
            break
        except tasks.Skip:
            continue
    pixels = np.asarray(sample.images[0]).astype(int)
    radius = tasks._marker_radius(112, 84)
    for label, (x, y) in enumerate(sample.meta["centres"], 1):
        ring = pixels[y - radius + 2:y + radius - 1, x - radius + 2]     # inside the circle, left of the digit
        assert np.abs(ring - tasks.PALETTE[label]).sum(axis=1).min() < 60


def test_render_scene_is_deterministic_and_varied():
    first = tasks.render_scene(random.Random(11), 96, 72)
    again = tasks.render_scene(random.Random(11), 96, 72)
    other = tasks.render_scene(random.Random(12), 96, 72)
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0])) and np.array_equal(first[1], again[1])
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    assert first[0].size == (96, 72) and first[1].shape == (72, 96) and first[1].dtype == np.float32
    assert (first[1] >= 0).all() and (first[1] > 0).mean() > 0.3


def test_tasks_skip_images_too_small_for_a_grid():
    tiny = tasks.render_scene(random.Random(0), 24, 18)[0]
    for make in (tasks.shuffle_task, tasks.flip_task, tasks.crop_task):
        with pytest.raises(tasks.Skip, match="too small"):
            make(tiny, random.Random(0))


def test_chance_and_prompt():
    assert tasks.TASKS["flip"].chance == 1 / 8 and tasks.TASKS["depth"].chance == 1 / 6
    assert 1 / 24 < tasks.TASKS["shuffle"].chance < 1 / 6
    prompt = tasks.make_prompt("  <image>Question?\n")
    assert prompt == "<image>Question? " + tasks.FORMAT_PROMPT
    assert tasks.FORMAT_PROMPT.endswith("The final answer MUST BE put in \\boxed{}.")
