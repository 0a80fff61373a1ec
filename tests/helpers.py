"""Shared test fixtures: tiny Qwen2.5-VL / Qwen3-VL models with their processors, a small procedural dataset, and
records with any number of images of any size. Everything is built in code (no committed weights).

    from tests.helpers import tiny_model, tiny_dataset, make_record
    model, processor = tiny_model("qwen2_5_vl")          # fresh random weights each call (seeded)
"""
import functools
import random

import numpy as np
from PIL import Image

import ssrl
import tasks
import tiny

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@functools.lru_cache(maxsize=None)
def tiny_dataset(root, per_task=8, eval_per_task=4, seed=0, max_side=112):
    """A procedural dataset written under `root` (built once per process); returns (train, eval) records."""
    tasks.build_dataset(root, per_task=per_task, eval_per_task=eval_per_task, seed=seed, max_side=max_side,
                        progress=False, overwrite=True)
    return tasks.load_records(root, "train"), tasks.load_records(root, "eval")


@functools.lru_cache(maxsize=None)
def _corpus():
    """Tokenizer texts: a few generated samples of every task and their cold-start answers."""
    rng = random.Random(0)
    image, depth = tasks.render_scene(random.Random(0), 112, 84)
    records = []
    for make in (lambda: tasks.shuffle_task(image, rng), lambda: tasks.flip_task(image, rng),
                 lambda: tasks.crop_task(image, rng), lambda: tasks.depth_task(image, depth, None, rng),
                 lambda: tasks.position_task(image, depth, None, rng)):
        for _ in range(6):
            try:
                sample = make()
            except tasks.Skip:
                continue
            records.append({"task": sample.task, "problem": sample.problem, "answer": sample.answer,
                            "meta": {"size": list(image.size), **sample.meta}})
    return tuple(tiny.tokenizer_corpus(records))


def tiny_model(family="qwen2_5_vl", seed=0):
    """(model, processor): a tiny model of `family` with random weights (seeded) and the trained BPE tokenizer."""
    model, processor = ssrl.build_tiny(family, list(_corpus()), seed=seed)
    return model.eval(), processor


def random_image(rng, width, height):
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_record(rng, n_images, question="Which region is nearer?", answer="A", sizes=None):
    """A record with `n_images` placeholders spread through the question, and its PIL images (random sizes)."""
    sizes = sizes or [rng.choice(((56, 56), (112, 84), (84, 112), (112, 112), (70, 98))) for _ in range(n_images)]
    words = question.split()
    cuts = sorted(rng.randrange(len(words) + 1) for _ in range(n_images))
    parts, last = [], 0
    for cut in cuts:
        parts.append(" ".join(words[last:cut]))
        parts.append("<image>")
        last = cut
    parts.append(" ".join(words[last:]))
    problem = " ".join(p for p in parts if p).replace("<image> ", "<image>")
    record = {"id": f"r{rng.randrange(1 << 20)}", "task": "depth", "problem": problem, "answer": answer,
              "images": [], "meta": {}}
    return record, [random_image(rng, w, h) for w, h in sizes]
