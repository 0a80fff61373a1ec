"""bench/probe.py's labels: its conclusions are only as good as the answers it trains on."""
import random

import numpy as np

from bench.probe import probe_sample
from tasks import _PALETTE


def marker_pixels(image, label):
    array = np.asarray(image).astype(int)
    return np.argwhere(np.abs(array - np.array(_PALETTE[label])).sum(-1) < 30)     # [k, (y, x)]


def test_colour_answer_is_the_drawn_label():
    rng = random.Random(0)
    for _ in range(50):
        image, answer = probe_sample(rng, "colour")
        other = "2" if answer == "1" else "1"
        assert len(marker_pixels(image, int(answer))) > 20 and len(marker_pixels(image, int(other))) == 0


def test_row_answer_is_the_half_the_marker_is_in():
    rng = random.Random(1)
    answers = []
    for _ in range(50):
        image, answer = probe_sample(rng, "row")
        ys = marker_pixels(image, 1)[:, 0]
        assert len(ys) > 20
        assert (ys.max() < image.height / 2) if answer == "1" else (ys.min() >= image.height / 2)
        answers.append(answer)
    assert 10 < answers.count("1") < 40
