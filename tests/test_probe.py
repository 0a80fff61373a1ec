"""bench/probe.py's labels: its conclusions are only as good as the answers it trains on."""
import random
import re

import numpy as np
import pytest

import tiny
from bench.probe import lookup_sample, probe_sample
from tasks import PALETTE


def marker_pixels(image, label):
    array = np.asarray(image).astype(int)
    return np.argwhere(np.abs(array - np.array(PALETTE[label])).sum(-1) < 30)     # [k, (y, x)]


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


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny.shipped_base("tiny-qwen3-vl"))


def test_lookup_answer_is_the_letter_of_the_word_asked(tokenizer):
    """The lookup's label is the letter printed before the word that the text ends by asking about, in both layouts,
    and the answers are spread over the four letters (no position shortcut)."""
    rng, picks = random.Random(2), []
    for layout in ("position", "filler"):
        for _ in range(100):
            ids, target, pick = lookup_sample(rng, tokenizer, layout, 90)
            assert tokenizer.decode(target).strip() == "ABCD"[pick]
            text = tokenizer.decode(ids)
            word = text.rsplit(" is option", 1)[0].split()[-1]
            assert re.search(rf"{'ABCD'[pick]}\. {re.escape(word)}[ .]", text.split(" is option")[0]), text
            picks.append(pick)
    assert all(picks.count(k) > 25 for k in range(4))


def test_lookup_scan_reads_the_options_in_order_up_to_the_word_the_reasoning_names(tokenizer):
    rng = random.Random(3)
    for layout in ("position", "filler"):
        for _ in range(50):
            ids, target, pick = lookup_sample(rng, tokenizer, layout, 90, "scan")
            text, scan = tokenizer.decode(ids), tokenizer.decode(target)
            options = dict(re.findall(r"([A-D])\. (\S+?)(?= [A-D]\.|\. |\?|$)", text.split("?", 1)[1])[:4])
            read = re.findall(r"([A-D])\. (\S+), (yes|no)\.", scan)
            assert [letter for letter, _, _ in read] == list("ABCD"[:pick + 1]), scan
            assert all(options[letter] == word for letter, word, _ in read), (text, scan)
            assert [said for _, _, said in read] == ["no"] * pick + ["yes"], scan
            assert re.search(rf"{re.escape(read[-1][1])}\.$", text.rstrip()), text
