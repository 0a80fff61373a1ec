"""The paper's seven benchmarks (--eval-bench): each reader on a fixture in that benchmark's own file layout, each
scorer on responses whose scores were worked out by hand from the official rules (InternLM/Spatial-SSRL
evaluation/, VLMEvalKit's dataset classes), pass@k against its closed form, and the whole --eval-bench path on the
fixtures with scripted responses: the table and the per-benchmark JSON carry the hand-computed figures."""
import base64
import csv
import io
import itertools
import json
import math
import random
import re

import pytest
import torch

import ssrl
import tasks
from tests.helpers import tiny_model

FORMAT = tasks.FORMAT_PROMPT


def png(seed=0, size=(64, 48)):
    buffer = io.BytesIO()
    tasks.render_scene(random.Random(seed), *size)[0].save(buffer, "PNG")
    return buffer.getvalue()


def write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def b64(data):
    return base64.b64encode(data).decode()


# ---- fixtures in each benchmark's layout ------------------------------------------------------------------------

def spatial457_tsv(path, cases):
    """VLMEvalKit Spatial457.tsv: index, question, answer, category, image (base64 once, then the row's index)."""
    rows = [(i, f"@k{i}@ Is there a large bus?", answer, "L1_single" if i % 2 else "L4_pose",
             b64(png(0)) if i == 0 else "0") for i, (answer, _) in enumerate(cases)]
    return write_tsv(path, ["index", "question", "answer", "category", "image"], rows)


SPATIAL457_CASES = [   # (answer, response, right?) by utils/spatial457.py is_correct
    ("Yes", "<think>a bus is there</think> \\boxed{Yes}", 1),
    ("3", "<think>three</think> \\boxed{three}", 1),
    ("No", "\\boxed{0}", 1),
    ("Yes", "\\boxed{2}", 1),
    ("Yes", "\\boxed{12}", 0),                       # only a single digit reads as yes
    ("sedan", "\\boxed{suv}", 1),                    # both cars (SuperCLEVR super-category)
    ("sedan", "\\boxed{jet}", 0),
    ("No", "\\boxed{None}", 1),                      # "none" reads as "no"
    ("Yes", "{'Reasoning': 'seen', 'Answer': 'Yes'}", 1),   # no box: the JSON Answer field
    ("4", "\\boxed{{'Answer': 4}}", 1),
    ("Yes", "I think yes", 0),                       # robust mode: the whole response is the answer
    ("Yes", "<think>yes</think> \\boxed{ Yes}", 0),  # VLMEvalKit's box is not stripped
]


def test_spatial457_prompt_and_scores_follow_vlmevalkit(tmp_path):
    path = spatial457_tsv(tmp_path / "Spatial457.tsv", [(a, r) for a, r, _ in SPATIAL457_CASES])
    records = tasks.read_spatial457(str(path))
    assert [tasks.score_spatial457(r, rec)[0] for (_, r, _), rec in zip(SPATIAL457_CASES, records)] == \
        [right for _, _, right in SPATIAL457_CASES]
    first = records[0]
    # instruction, image, question, closing instruction, each text part followed by the format prompt
    assert first["problem"].startswith("You are an intelligent chatbot") and first["problem"].count(FORMAT) == 3
    assert f"question.\n{FORMAT}<image>@k0@ Is there a large bus?{FORMAT}First, you should" in first["problem"]
    assert "Small, Large, Airliner, Dirtbike, Road bike," in first["problem"] and first["problem"].endswith(
        "fits the question.\n\n" + FORMAT)
    assert first["images"][0] is records[5]["images"][0]          # the image decoded once, shared by reference
    assert first["format_prompt"] is False and {r["task"] for r in records} == {"L1_single", "L4_pose"}


def mcq_tsv(path, rows, qids=True):
    """VLMEvalKit 3DSRBench.tsv / SpatialEval.tsv: index, question, A-D (C, D may be empty), answer, category,
    image, qid."""
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "image"] + (["qid"] if qids else [])
    body = []
    for i, (qid, answer) in enumerate(rows):
        options = ["blue", "red", "", ""] if i % 2 else ["left", "right", "front", "back"]
        body.append([i, f"@k{i}@ Which one?", *options, answer, "height" if i < 3 else "location",
                     b64(png(i % 2)) if i < 2 else str(i % 2)] + ([qid] if qids else []))
    return write_tsv(path, header, body)


def test_multiple_choice_reads_letters_option_text_and_rejects_ambiguity(tmp_path):
    records = tasks.read_mcq(str(mcq_tsv(tmp_path / "SpatialEval.tsv", [(None, "B")] * 2, qids=False)),
                                     "SpatialEval")
    four, two = records
    assert four["problem"] == ("<image>Question: @k0@ Which one?\nOptions:\nA. left\nB. right\nC. front\nD. back\n"
                               "Please select the correct answer from the options above. \n" + FORMAT)
    assert two["meta"]["choices"] == {"A": "blue", "B": "red"}           # empty C, D are no options
    cases = [("<think>x</think> \\boxed{B. right}", four, 1), ("\\boxed{(B)}", four, 1), ("\\boxed{right}", four, 1),
             ("\\boxed{A or B}", four, 0), ("\\boxed{red}", two, 1), ("\\boxed{red or blue}", two, 0),
             ("The answer is B", four, 1),                           # no box: VLMEvalKit reads the whole response
             ("<think> A is wrong, B fits </think> no box", four, 0),   # two letters, no option text
             ("Cannot determine the answer", four, 0)]                # a refusal reads as Z
    assert [tasks.score_mcq(response, record)[0] for response, record, _ in cases] == [c[2] for c in cases]
    assert tasks.score_mcq("Cannot determine the answer", four)[1] == "Z"


def test_3dsrbench_flip_and_circular_variants_count_only_when_every_variant_is_right(tmp_path):
    rows = [("a0000001", "A"), ("a0000001-1", "B"), ("a0000001-flip", "A"), ("a0000001-flip-1", "B"),
            ("b0000002", "A"), ("b0000002-flip", "B")]
    records = tasks.read_mcq(str(mcq_tsv(tmp_path / "3DSRBench.tsv", rows)), "3DSRBench")
    hits = [1, 1, 0, 1, 1, 1]
    entries = [{"id": r["id"], "task": r["task"], "qid": r["meta"]["qid"], "score": float(h)}
               for r, h in zip(records, hits)]
    result = tasks.summarize_benchmark("3dsrbench", entries, records)
    # vanilla 5/6; flip pairs (a, a-flip) 0, (a-1, a-flip-1) 1, (b, b-flip) 1; circular groups a {1, 1},
    # a-flip {0, 1}, b {1}, b-flip {1}; flip+circular a {1, 1, 0, 1}, b {1, 1}
    assert result["score"] == pytest.approx(5 / 6)
    assert (result["flip_eval"], result["circ_eval"], result["flip_circ_eval"]) == (2 / 3, 3 / 4, 1 / 2)
    assert result["tasks"] == {"height": 2 / 3, "location": 1.0}


def qspatial_rows(folder):
    (folder / "QSpatial_plus").mkdir(parents=True)
    (folder / "QSpatial_plus" / "0.png").write_bytes(png(0))
    return [{"question": "@k0@ How far apart are the two chairs?", "answer_value": 2.0, "answer_unit": "meters",
             "question_type": "distance", "image": {"bytes": png(1), "path": "x.png"},
             "image_path": "QSpatial_plus/0.png"},
            {"question": "@k1@ How tall is the door?", "answer_value": 80.0, "answer_unit": "inches",
             "question_type": "size", "image": None, "image_path": "QSpatial_plus/0.png"},
            {"question": "scannet row", "answer_value": 1.0, "answer_unit": "m", "question_type": "distance",
             "image": None, "image_path": "QSpatial_scannet/7.png"}]


QSPATIAL_CASES = [   # response -> (centimetres read, right within a factor 2 of 200 cm)
    ("\\scalar{2.5} \\distance_unit{meters}", 250, 1),
    ("reasoning ... \\scalar{300} \\distance_unit{cm}", 300, 1),
    ("\\scalar{1-2} \\distance_unit{feet}", 45.72, 0),           # a range is its middle, 1.5 ft
    ("\\scalar{7} \\distance_unit{feet}", 213.36, 1),
    ("\\scalar{400} \\distance_unit{cm}", 400, 1),               # (400 + 1e-8) / (200 + 1e-8) < 2
    ("\\scalar{401} \\distance_unit{cm}", 401, 0),
    ("\\scalar{4} \\distance_unit{furlongs}", 0.0, 0),           # unknown unit: 0 cm
    ("\\boxed{2 meters}", 0.0, 0),                               # the box becomes \scalar{2} with no unit box
    ("\\boxed{\\scalar{2} \\distance_unit{m}}", 200, 1),
    ("about two metres", None, 0),
]


def test_qspatial_numbers_with_units(tmp_path):
    path = tmp_path / "QSpatial_plus.json"
    rows = qspatial_rows(tmp_path)
    path.write_text(json.dumps([{**r, "image": {"bytes": None, "path": None}} if r["image"] else r for r in rows]))
    records = tasks.read_qspatial(str(path))
    assert len(records) == 2 and records[0]["problem"] == (
        "<image>" + tasks.QSPATIAL_SYSTEM + "\nQuestion: @k0@ How far apart are the two chairs?\nLet's thinkg step "
        "by step and start by finding good reference objects or object parts in the image.")
    assert FORMAT not in records[0]["problem"] and records[1]["meta"]["centimetres"] == pytest.approx(203.2)
    for response, centimetres, right in QSPATIAL_CASES:
        read = tasks.qspatial_centimetres(response)
        assert read == pytest.approx(centimetres) if centimetres is not None else read is None, response
        assert tasks.score_qspatial(response, records[0])[0] == right, response
    assert tasks.score_qspatial("\\scalar{5} \\distance_unit{feet}", records[1])[0] == 1   # 152.4 vs 203.2 cm
    entries = [{"id": "0", "task": "distance", "response": r, "score": tasks.score_qspatial(r, records[0])[0]}
               for r, _, _ in QSPATIAL_CASES[:4]]
    # 250, 300 and 213 cm: VLMEvalKit adds 1e-8 cm to both, so 300 / 200 is just under 1.5
    assert tasks.summarize_benchmark("qspatial-plus", entries, records)["delta_1.5"] == 3 / 4


def test_qspatial_parquet_as_downloaded(tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    rows = qspatial_rows(tmp_path)
    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "QSpatial_plus-00000-of-00001.parquet")
    records = tasks.read_qspatial(str(tmp_path / "QSpatial_plus-00000-of-00001.parquet"))
    assert [r["answer"] for r in records] == ["2.0 meters", "80.0 inches"]
    assert isinstance(records[0]["images"][0], tasks.EmbeddedImage) and records[1]["images"][0].endswith("0.png")


def whatsup_json(folder):
    (folder / "data" / "controlled_images").mkdir(parents=True)
    rows = []
    for i, name in enumerate(("beer-bottle_on_armchair.jpeg", "cup_left_of_plate.jpeg")):
        (folder / "data" / "controlled_images" / name).write_bytes(png(i))
        rows.append({"image_path": f"data/controlled_images/{name}",
                     "caption_options": [f"@k{i}@ A beer bottle on a armchair", "A beer bottle under a armchair",
                                         "A beer bottle to the left of a armchair", "A beer bottle to the right of a "
                                         "armchair"]})
    (folder / "data" / "controlled_images_dataset.json").write_text(json.dumps(rows))
    return folder / "data" / "controlled_images_dataset.json"


def test_whatsup_scores_the_letter_a_anywhere_in_the_box(tmp_path):
    records = tasks.read_whatsup(str(whatsup_json(tmp_path)))
    assert records[0]["problem"] == ("<image>Based on the image, choose the correct option from the list below."
                                     + FORMAT + "A: @k0@ A beer bottle on a armchair\nB: A beer bottle under a "
                                     "armchair\nC: A beer bottle to the left of a armchair\nD: A beer bottle to the "
                                     "right of a armchair")
    assert [r["task"] for r in records] == ["on", "left_of"]
    cases = [("\\boxed{A}", 1), ("\\boxed{B}", 0), ("\\boxed{B: A beer bottle under a armchair}", 1),
             ("A", 0), ("\\boxed{a}", 0)]
    assert [tasks.score_whatsup(response, records[0])[0] for response, _ in cases] == [c[1] for c in cases]


def viewspatial_json(folder):
    (folder / "eval").mkdir()
    (folder / "ViewSpatial-Bench" / "scannetv2_val" / "scene0011_00").mkdir(parents=True)
    rows = []
    for i in range(2):
        name = f"ViewSpatial-Bench/scannetv2_val/scene0011_00/{i}.jpg"
        (folder / name).write_bytes(png(i, (96, 64)))
        rows.append({"question_type": "Camera perspective - Relative Direction", "image_path": [name],
                     "question": f"@k{i}@ Where is the counter?", "answer": "B. front-left",
                     "choices": "A. right\nB. front-left\nC. back\nD. front"})
    (folder / "eval" / "ViewSpatial-Bench.json").write_text(json.dumps(rows))
    return folder / "eval" / "ViewSpatial-Bench.json"


def test_viewspatial_reads_the_first_standalone_letter_of_the_box(tmp_path):
    records = tasks.read_viewspatial(str(viewspatial_json(tmp_path)))
    assert records[0]["problem"] == ("<image>@k0@ Where is the counter?\nA. right\nB. front-left\nC. back\nD. front"
                                     "\nThe final answer should be the option letter from the given choices.\n"
                                     + FORMAT)
    cases = [("\\boxed{B}", 1), ("\\boxed{b. front-left}", 1), ("\\boxed{front-left}", 0), ("\\boxed{C}", 0),
             ("B", 0), ("\\boxed{B} then \\boxed{C}", 0)]
    assert [tasks.score_viewspatial(response, records[0])[0] for response, _ in cases] == [c[1] for c in cases]


def vsi_fixture(folder, frames=20):
    """The paper's vsi_bench.json (mp4_path on another machine, A-D) with frames in DATASET/SCENE/, and a Hugging
    Face style jsonl row (dataset, scene_name, options, ground_truth) with frames in SCENE/."""
    for scene in ("arkitscenes/41069025", "scene0001_00"):
        (folder / scene).mkdir(parents=True)
        for i in range(frames):
            (folder / scene / f"frame_{i}.jpg").write_bytes(png(i % 3, (56, 42)))
    rows = [{"mp4_path": "/mnt/elsewhere/VSIBench/arkitscenes/41069025.mp4", "question_type": "object_counting",
             "question": "@k0@ How many table(s) are in this room?", "answer": "4", "A": None, "B": None, "C": None,
             "D": None},
            {"mp4_path": "/mnt/elsewhere/VSIBench/arkitscenes/41069025.mp4",
             "question_type": "object_rel_direction_easy", "question": "@k1@ Is the tv to the left or the right?",
             "answer": "A", "A": "A. left", "B": "B. right", "C": None, "D": None}]
    (folder / "vsi_bench.json").write_text(json.dumps(rows))
    hf = {"id": 7, "dataset": "scannet", "scene_name": "scene0001_00", "question_type": "room_size_estimation",
          "question": "@k2@ What is the size of this room (in square meters)?", "options": None, "ground_truth": "20"}
    (folder / "test.jsonl").write_text(json.dumps(hf) + "\n")
    return folder / "vsi_bench.json", folder / "test.jsonl"


def test_vsibench_frames_prompt_and_mean_relative_accuracy_at_the_edges(tmp_path):
    paper, hugging_face = vsi_fixture(tmp_path)
    records = tasks.read_vsibench(str(paper), frames=8)
    # linspace(0, 19, 8) rounded: 0, 3, 5, 8, 11, 14, 16, 19 (natural order: frame_2 before frame_10)
    assert [int(re.search(r"(\d+)\.jpg", p).group(1)) for p in records[0]["images"]] == [0, 3, 5, 8, 11, 14, 16, 19]
    assert records[1]["problem"] == ("<image>" * 8 + "Watch the given video and anser the following question.\n\n"
                                     "@k1@ Is the tv to the left or the right?A. A. leftB. B. right\nThe final answer "
                                     "should be the option letter from the given choices.\n" + FORMAT)
    assert records[0]["problem"].endswith("room?\nThe final answer should be a number(integer or decimal).\n" + FORMAT)
    other = tasks.read_vsibench(str(hugging_face), frames=64)
    assert len(other[0]["images"]) == 20 and other[0]["answer"] == "20" and other[0]["task"] == "room_size_estimation"

    letter = records[1]
    assert [tasks.score_vsibench(r, letter)[0] for r in ("\\boxed{A}", "\\boxed{a}", "\\boxed{A. left}", "")] == \
        [1, 1, 0, 0]
    number = {**records[0], "answer": "100"}
    mra = {"100": 1.0, "100.5": 1.0, "105": 0.9, "95": 0.9, "104.99": 1.0, "105.01": 0.9, "149": 0.1, "150": 0.0,
           "55": 0.1, "50": 0.0, "3 meters": 0.0, "": 0.0}
    assert {p: tasks.score_vsibench(f"\\boxed{{{p}}}", number)[0] for p in mra} == mra
    assert tasks.mean_relative_accuracy("4", "0") == 0.0
    summary = tasks.summary_vsibench([{"task": "object_rel_direction_easy", "score": 1.0},
                                      {"task": "object_counting", "score": 0.5}], records)
    assert summary["vsi_bench_overall"] == pytest.approx((1 / 3 + 0.5) / 2)   # missing directions count 0

    (tmp_path / "scene0001_00" / "frame_0.jpg").unlink()
    for path in (tmp_path / "scene0001_00").iterdir():
        path.unlink()
    with pytest.raises(tasks.BadRecord, match="no frames for 1 of 1 questions, e.g. .*scannet/scene0001_00"):
        tasks.read_vsibench(str(hugging_face))


def test_missing_or_malformed_files_stop_with_one_line_naming_them(tmp_path):
    cases = [(lambda: tasks.read_spatial457(str(tmp_path / "none.tsv")), "none.tsv: no such file; expected"),
             (lambda: tasks.read_mcq(str(write_tsv(tmp_path / "x.tsv", ["index", "question"], [[0, "q"]])),
                                             "3DSRBench"), "x.tsv: expected VLMEvalKit's 3DSRBench TSV .* no column"),
             (lambda: tasks.read_viewspatial(str(tmp_path / "x.tsv")), "x.tsv: not JSON"),
             (lambda: tasks.read_whatsup(str(write_json(tmp_path / "w.json", [{"image_path": "a.jpg"}]))),
              "row 0 lacks one of image_path, caption_options"),
             (lambda: tasks.read_whatsup(str(write_json(tmp_path / "w.json", [{"image_path": "a.jpg",
                                                                                 "caption_options": []}]))),
              "row 0: image a.jpg not found")]
    for read, message in cases:
        with pytest.raises(tasks.BadRecord, match=message) as error:
            read()
        assert "\n" not in str(error.value)
    with pytest.raises(ssrl.UserError, match="expected NAME=PATH with NAME one of spatial457, 3dsrbench"):
        ssrl.parse_args(["--eval-bench", "blink=BLINK.tsv"])


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


# ---- pass@k ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,right", [(5, 0), (5, 2), (5, 5), (8, 3), (4, 1)])
def test_pass_at_k_equals_the_chance_that_k_of_the_samples_hold_a_right_one(n, right):
    samples = [1] * right + [0] * (n - right)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        assert tasks.pass_at_k(n, right, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
        assert tasks.pass_at_k(n, right, k) == pytest.approx(1 - math.comb(n - right, k) / math.comb(n, k))
    assert tasks.pass_at_k(n, right, 1) == pytest.approx(right / n)       # pass@1: the mean accuracy
    assert tasks.pass_at_k(n, right, n) == float(right > 0)               # pass@n: any right


def test_sampled_evaluation_reports_pass_at_1_and_pass_at_k_per_task(tmp_path, monkeypatch):
    """Scripted samples: per depth prompt 1 and 0 right of 3, per flip prompt 3 of 3 -> pass@1 (1/3 + 0) / 2 and 1,
    pass@3 1/2 and 1."""
    model, processor = tiny_model("qwen2_5_vl")
    records = [{"id": f"r{i}", "task": task, "problem": "<image>q", "answer": answer, "meta": {},
                "images": [tasks.render_scene(random.Random(i), 56, 42)[0]]}
               for i, (task, answer) in enumerate((("depth", "1-2-3"), ("depth", "1-2-3"), ("flip", "0-1")))]
    right = {"r0": ["1-2-3", "3-2-1", "3-2-1"], "r1": ["2-1-3"] * 3, "r2": ["0-1"] * 3}
    asked = []

    def scripted(model, batch, n, max_new_tokens, temperature, top_p, eos, pad, seeds=None, **kwargs):
        asked.append((n, temperature, list(seeds)))
        ids = [record_id for seed in seeds for record_id in [seed.split(":")[1]] * n]
        texts = [f"<think>x</think> \\boxed{{{right[i][j % n]}}}" for j, i in enumerate(ids)]
        encoded = [processor.tokenizer(t)["input_ids"] for t in texts]
        width = max(map(len, encoded))
        return torch.tensor([e + [pad] * (width - len(e)) for e in encoded]), None, None

    monkeypatch.setattr(ssrl.grpo, "generate_completions", scripted)
    monkeypatch.setattr(ssrl, "generate_greedy", lambda model, processor, batch, max_new_tokens, **options:
                        torch.tensor([processor.tokenizer("\\boxed{0-1}")["input_ids"]] * batch["input_ids"].shape[0]))
    args = ssrl.parse_args(["--eval-batch-size", "2", "--seed", "5"])
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    results = ssrl.evaluate(args, dist, model, processor, records, samples=3, temperature=0.7)
    assert results["depth"]["pass@1"] == pytest.approx((1 / 3 + 0) / 2) and results["depth"]["pass@3"] == 0.5
    assert results["flip"]["pass@1"] == 1.0 and results["flip"]["pass@3"] == 1.0
    assert results["flip"]["accuracy"] == 1.0 and results["depth"]["accuracy"] == 0.0       # greedy beside them
    assert results["all"]["pass@1"] == pytest.approx((1 / 3 + 1) / 3) and results["all"]["temperature"] == 0.7
    assert {seed for _, _, seeds in asked for seed in seeds} == {"5:r0", "5:r1", "5:r2"}
    assert all(n == 3 and t == 0.7 for n, t, _ in asked)
    table = ssrl.format_table({"sft": results})
    assert "pass@1 (T=0.7) sft" in table and "pass@3 (T=0.7) sft" in table


@pytest.mark.parametrize("engine", ["ssrl", "hf"])
def test_seeded_samples_do_not_depend_on_the_batch_they_share(engine):
    """The same seed gives the same sampled responses whether a prompt is decoded alone or beside others (as it is
    on one rank or two), on either engine, and different responses for different samples of one prompt."""
    model, processor = tiny_model("qwen3_vl")
    rng = random.Random(0)
    records = [{"id": f"p{i}", "task": "depth", "problem": "<image>" + "word " * (3 + 4 * i), "answer": "1",
                "images": [tasks.render_scene(rng, 56, 42)[0]]} for i in range(3)]
    tokenizer = processor.tokenizer

    def samples(chosen):
        batch = ssrl.grpo.encode_prompts(processor, chosen, [r["images"] for r in chosen], 56 * 56, 128 * 128)
        with torch.no_grad():
            ids, _, _ = ssrl.grpo.generate_completions(model, batch, 2, 12, 1.0, 1.0, tokenizer.eos_token_id,
                                                       tokenizer.pad_token_id, seeds=[f"1:{r['id']}" for r in chosen],
                                                       engine=engine)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        return {r["id"]: texts[2 * i:2 * i + 2] for i, r in enumerate(chosen)}

    together = samples(records)
    alone = {k: v for r in records for k, v in samples([r]).items()}
    assert together == alone
    assert any(pair[0] != pair[1] for pair in together.values())        # sample 0 and 1 of a prompt differ


# ---- the whole --eval-bench path on the fixtures -------------------------------------------------------------------

def test_eval_bench_prints_table_1_and_writes_every_response(tmp_path, monkeypatch, capsys):
    """All seven benchmarks through ssrl.main with scripted answers keyed by the marker @kN@ in each question: the
    printed table and OUT/bench-NAME.json hold the figures worked out by hand."""
    spatial457 = spatial457_tsv(tmp_path / "Spatial457.tsv", [(a, r) for a, r, _ in SPATIAL457_CASES[:4]])
    threedsr = mcq_tsv(tmp_path / "3DSRBench.tsv", [("a0000001", "A"), ("a0000001-flip", "B")])
    (tmp_path / "q").mkdir()
    qspatial = write_json(tmp_path / "q" / "QSpatial_plus.json",
                          [{**r, "image": None} for r in qspatial_rows(tmp_path / "q")[:2]])
    (tmp_path / "w").mkdir()
    (tmp_path / "v").mkdir()
    (tmp_path / "s").mkdir()
    whatsup, viewspatial = whatsup_json(tmp_path / "w"), viewspatial_json(tmp_path / "v")
    vsi, _ = vsi_fixture(tmp_path / "s", frames=5)
    answers = {"spatial457": ["\\boxed{Yes}", "\\boxed{no}", "\\boxed{0}", "\\boxed{2}"],    # 3 of 4 (k1: 3 vs no)
               "3dsrbench": ["\\boxed{A}", "\\boxed{A}"],                                  # 1 of 2, flip_eval 0
               "qspatial": ["\\scalar{150} \\distance_unit{cm}", "\\scalar{10} \\distance_unit{cm}"],   # 1 of 2
               "whatsup": ["\\boxed{A}", "\\boxed{C}"],                                    # 1 of 2
               "viewspatial": ["\\boxed{B}", "\\boxed{B}"],                                # 2 of 2
               "vsi": ["\\boxed{3}", "\\boxed{A}"]}                                        # MRA(3, 4) 0.5, then 1
    scripted = {}
    for name, responses in answers.items():
        for i, response in enumerate(responses):
            scripted.setdefault(f"@k{i}@", {})[name] = response
    model, processor = tiny_model("qwen2_5_vl")

    def respond(model, processor, batch, max_new_tokens, **options):
        chosen = []
        for text in processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True):
            name = next(name for phrase, name in (("Is there a large bus", "spatial457"), ("Which one", "3dsrbench"),
                                                  ("How far", "qspatial"), ("How tall", "qspatial"),
                                                  ("beer bottle", "whatsup"), ("counter", "viewspatial"),
                                                  ("Watch the given video", "vsi")) if phrase in text)
            chosen.append(scripted[re.search(r"@k\d@", text).group(0)][name])
        encoded = [processor.tokenizer(t)["input_ids"] for t in chosen]
        width = max(map(len, encoded))
        return torch.tensor([e + [processor.tokenizer.pad_token_id] * (width - len(e)) for e in encoded])

    monkeypatch.setattr(ssrl, "generate_greedy", respond)
    monkeypatch.setattr(ssrl, "load_model", lambda args, dist, corpus=(): (model, processor, "qwen2_5_vl"))
    out = tmp_path / "out"
    ssrl.main(["--eval", "tiny-qwen2.5-vl", "--out", str(out), "--data", str(tmp_path / "none"), "--eval-bench",
               f"spatial457={spatial457}", f"qspatial-plus={qspatial}", f"whatsup={whatsup}",
               f"viewspatial={viewspatial}", f"vsi-bench={vsi}", f"3dsrbench={threedsr}", "--vsi-frames", "4",
               "--eval-num-samples", "0"])
    printed = capsys.readouterr().out
    scores = {name: json.loads((out / f"bench-{name}.json").read_text())["score"]
              for name in ("spatial457", "qspatial-plus", "whatsup", "viewspatial", "vsi-bench", "3dsrbench")}
    assert scores == {"spatial457": 0.75, "qspatial-plus": 0.5, "whatsup": 0.5, "viewspatial": 1.0,
                      "vsi-bench": 0.75, "3dsrbench": 0.5}
    bench = json.loads((out / "bench-3dsrbench.json").read_text())
    assert bench["flip_eval"] == 0.0 and bench["n"] == 2 and bench["responses"][1]["prediction"] == "A"
    vsi_result = json.loads((out / "bench-vsi-bench.json").read_text())
    assert [r["score"] for r in vsi_result["responses"]] == [0.5, 1.0] and vsi_result["pixels"] == [56 * 56, 128 * 128]
    header = next(line for line in printed.splitlines() if line.startswith("| model"))
    assert header == "| model | S457 | 3DSR | QSp+ | WhatsUp | ViewSp | VSI | Avg of 6 |"
    row = next(line for line in printed.splitlines() if line.startswith("| this model"))
    assert row == "| this model | 75.00 | 50.00 | 50.00 | 50.00 | 100.00 | 75.00 | 66.67 |"
    assert "no paper figures beside it" in printed


def test_table_shows_the_papers_figures_for_the_preset():
    results = {name: {"score": 0.5, "n": 10, "skipped": 0} for name in tasks.BENCHMARKS}
    table = ssrl.benchmark_table(results, "qwen2.5-vl-3b")
    lines = table.splitlines()
    assert lines[0] == "| model | S457 | 3DSR | SpEval | QSp+ | WhatsUp | ViewSp | VSI | Avg |"
    assert lines[3] == "| paper: Qwen2.5-VL-3B | 33.70 | 50.30 | 54.65 | 33.66 | 85.85 | 35.38 | 27.84 | 45.91 |"
    assert lines[4] == "| paper: Spatial-SSRL-3B | 46.07 | 51.72 | 59.59 | 39.60 | 86.71 | 36.62 | 33.49 | 50.54 |"
    assert lines[2] == "| this model | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 |"
