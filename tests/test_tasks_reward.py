"""The reward matches EasyR1's `img_score` + mathruler (InternLM/Spatial-SSRL training/GRPO/examples/reward_function/
math.py) and stays linear on adversarial strings."""
import re
import time

import pytest
from hypothesis import assume, given, settings, strategies as st

from tasks import extract_boxed, reward


def reference_extract(text):
    """mathruler.grader.extract_boxed_content, (mathruler 0.1.0 grader.py: "None" when absent)."""
    start = text.rfind(r"\boxed{")
    if start == -1:
        return "None"
    depth, content = 0, text[start + len(r"\boxed{"):]
    for i, char in enumerate(content):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == -1:
            return content[:i].strip()
    return "None"


def reference_reward(response, answer):
    """img_score's regexes, verbatim (quadratic on long inputs: only for short strings)."""
    response = re.sub(r"\s*(<|>|/)\s*", r"\1", response)
    format_score = 1.0 if re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", response, re.DOTALL) else 0.0
    accuracy = 1.0 if reference_extract(response) == answer else 0.0
    return {"overall": 0.9 * accuracy + 0.1 * format_score, "format": format_score, "accuracy": accuracy}


@pytest.mark.parametrize("response, answer, expected", [
    ("<think>ok</think> so \\boxed{2-0-3-1}", "2-0-3-1", (1.0, 1.0, 1.0)),
    (" < think >ok< / think >\n\\boxed{ A }", "A", (1.0, 1.0, 1.0)),          # whitespace around < > / and in box
    ("\\boxed{A}", "A", (0.9, 0.0, 1.0)),                                    # correct, no think tags
    ("<think>x</think>\\boxed{B}", "A", (0.1, 1.0, 0.0)),
    ("<think>x</think>\\boxed{A} then \\boxed{B}", "A", (0.1, 1.0, 0.0)),   # the last box counts
    ("<think>x</think>\\boxed{\\text{A}}", "\\text{A}", (1.0, 1.0, 1.0)),    # nested braces
    ("<think>x</think>\\boxed{A", "A", (0.0, 0.0, 0.0)),                     # unclosed: no format, no answer
    ("<think>x</think>\\boxed{A} \\boxed{", "A", (0.1, 1.0, 0.0)),          # unclosed last box hides the first
    ("<think>x</think>\\boxed{C. Left}", "C", (0.1, 1.0, 0.0)),             # no normalisation of the content
    ("x<think>y</think>\\boxed{A}", "A", (0.9, 0.0, 1.0)),                   # must start with <think>
    ("", "A", (0.0, 0.0, 0.0)),
    ("<think>\ud800</think>\\boxed{\udfff}", "A", (0.1, 1.0, 0.0)),        # lone surrogates (bad decoding)
])
def test_reward_examples(response, answer, expected):
    scores = reward(response, answer)
    assert (scores["overall"], scores["format"], scores["accuracy"]) == pytest.approx(expected)
    assert scores == pytest.approx(reference_reward(response, answer))


def test_extract_boxed():
    assert extract_boxed("a \\boxed{ 1-2 } b") == "1-2"
    assert extract_boxed("\\boxed{a}\\boxed{{b}c}") == "{b}c"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{open {") is None


pieces = st.sampled_from(["<think>", "</think>", "< think >", "</ think>", "\\boxed{", "{", "}", " ", "\n", "\t",
                          "/", "<", ">", "A", "1-0", "é", "日本", "\u00a0", "\u2003", "\\", "boxed", "x"])


@settings(max_examples=400, deadline=None)
@given(st.lists(pieces, max_size=30), st.sampled_from(["A", "1-0", "{", ""]))
def test_reward_equals_the_reference_on_random_strings(parts, answer):
    response = "".join(parts)
    assert reward(response, answer) == reference_reward(response, answer)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200), st.text(max_size=5))
def test_reward_never_raises_and_is_bounded(response, answer):
    # mathruler returns the string "None" for a response without a box, so a ground truth "None" would score any
    # such response right; our extract_boxed returns None instead (no task's answer is "None"). Hypothesis found it.
    assume(answer != "None")
    scores = reward(response, answer)
    assert set(scores) == {"overall", "format", "accuracy"}
    assert 0.0 <= scores["overall"] <= 1.0
    assert scores == reference_reward(response, answer)


MEGABYTE = 1 << 20


@pytest.mark.parametrize("response", [
    " " * MEGABYTE,                                              # quadratic for \s*(<|>|/)\s*
    "<think>" + " " * MEGABYTE + "x",
    "<think>" + "</think>" * (MEGABYTE // 8),                    # many closing tags, no box
    "<think></think>" + "\\boxed{" * (MEGABYTE // 7),            # many boxes, none closed
    "<think></think>\\boxed{" + "{" * MEGABYTE,                  # deeply nested, unbalanced
    "<think></think>\\boxed{" + "{}" * (MEGABYTE // 2) + "}",
    "é日" * (MEGABYTE // 2) + "<think>\\boxed{A}",
    " /" * (MEGABYTE // 2),
])
def test_reward_is_linear_on_megabyte_inputs(response):
    start = time.perf_counter()
    scores = reward(response, "A")
    assert time.perf_counter() - start < 0.5
    assert 0.0 <= scores["overall"] <= 1.0
