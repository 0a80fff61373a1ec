"""ssrl.py: prompts, padding invariance of response log-probs, cold-start answers, checkpoints, evaluation, flags."""
import base64
import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo
import ssrl
import tasks
import tiny
from tests.helpers import FAMILIES, make_record, tiny_dataset, tiny_model


def image_runs(ids, image_token_id):
    """(start, length) of each run of image tokens in a 1-D id list."""
    runs, start = [], None
    for i, token in enumerate(ids + [-1]):
        if token == image_token_id and start is None:
            start = i
        elif token != image_token_id and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_image_token_sits_where_its_placeholder_was(family):
    _, processor = tiny_model(family)
    rng = random.Random(1)
    records, images = zip(*[make_record(rng, n) for n in (1, 5, 3)])
    batch = grpo.encode_prompts(processor, list(records), list(images), 56 * 56, 128 * 128)
    tokenizer = processor.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    grids = iter(batch["image_grid_thw"].tolist())
    assert batch["images_per_sample"].tolist() == [1, 5, 3]
    for row, record in enumerate(records):
        mask = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][mask].tolist()
        assert batch["attention_mask"][row].tolist() == sorted(batch["attention_mask"][row].tolist())   # left pad
        assert (batch["mm_token_type_ids"][row] == (batch["input_ids"][row] == processor.image_token_id)).all()
        runs = image_runs(ids, processor.image_token_id)
        assert len(runs) == record["problem"].count("<image>")
        for run_start, length in runs:
            t, h, w = next(grids)
            assert length == t * h * w // 4
            assert ids[run_start - 1] == start and ids[run_start + length] == end
        # the text between the images is the question's text between its placeholders, in order
        pieces, last = [], 0
        for run_start, length in runs:
            pieces.append(tokenizer.decode(ids[last:run_start - 1]))
            last = run_start + length + 1
        pieces.append(tokenizer.decode(ids[last:]))
        expected = tasks.make_prompt(record["problem"]).split("<image>")
        assert pieces[0].endswith(expected[0]) and all(p == e for p, e in zip(pieces[1:-1], expected[1:-1]))
        assert pieces[-1].startswith(expected[-1])


def response_logprobs(model, processor, records, images, responses):
    batch = grpo.encode_prompts(processor, records, images, 56 * 56, 128 * 128)
    completion_ids, completion_mask = grpo.encode_responses(processor.tokenizer, responses)
    with torch.no_grad():
        logp = grpo.response_logprobs(model, batch, completion_ids, completion_mask)
    return [row[mask.bool()] for row, mask in zip(logp, completion_mask)]


@pytest.mark.parametrize("family", FAMILIES)
def test_response_logprobs_same_alone_and_left_padded_in_a_mixed_batch(family):
    """M-RoPE positions and mm_token_type_ids must follow the padding (TRL #5785, verl #4243)."""
    model, processor = tiny_model(family)
    rng = random.Random(2)
    samples = [make_record(rng, n, question=q) for n, q in
               ((2, "Which of the two regions is nearer to the camera?"), (1, "Short?"),
                (5, "Pick the missing part among the options shown here."), (3, "Order these images by depth please."))]
    records, images = [list(x) for x in zip(*samples)]
    responses = ["<think>Region 1 is lower.</think> \\boxed{A}", "<think>x</think> \\boxed{B}",
                 "<think>The black square is top-left; option C continues the edges.</think> \\boxed{C}",
                 "<think>near to far</think> \\boxed{1-2-3}"]
    together = response_logprobs(model, processor, records, images, responses)
    reordered = response_logprobs(model, processor, records[::-1], images[::-1], responses[::-1])[::-1]
    for i in range(len(records)):
        alone = response_logprobs(model, processor, records[i:i + 1], images[i:i + 1], responses[i:i + 1])[0]
        torch.testing.assert_close(together[i], alone, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(reordered[i], alone, atol=2e-5, rtol=1e-5)
    # and the positions matter: dropping mm_token_type_ids (1-D fallback) changes Qwen2.5-VL's log-probs
    if family == "qwen2_5_vl":
        batch = grpo.encode_prompts(processor, records[:1], images[:1], 56 * 56, 128 * 128)
        inputs = {k: v for k, v in batch.items() if k != "images_per_sample"}
        with torch.no_grad():
            logits_3d = model(**inputs).logits
            inputs.pop("mm_token_type_ids")
            logits_1d = model(**inputs).logits
        assert (logits_1d - logits_3d).abs().max() > 1e-4


def test_every_cold_start_answer_scores_one():
    """Thousands of generated samples, several phrasings each: format 1 and accuracy 1 against their own answer."""
    rng = random.Random(3)
    scenes = [tasks.render_scene(random.Random(seed), 112, 84) for seed in range(6)]
    count = 0
    phrasings = {task: set() for task in tasks.TASKS}
    for index in range(2500):
        image, depth = scenes[index % len(scenes)]
        task = list(tasks.TASKS)[index % 5]
        entry = tasks.TASKS[task]
        try:
            sample = entry.sample(*((image, depth, None, rng) if entry.depth else (image, rng)))
        except tasks.Skip:
            continue
        record = {"task": task, "answer": sample.answer, "meta": {"size": list(image.size), **sample.meta}}
        response = tasks.cold_start_response(record, rng)
        score = tasks.reward(response, sample.answer)
        assert score == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}, (task, response, sample.answer)
        phrasings[task].add(re.sub(r"\b\w\b|\d", "", response.split("</think>")[0]))   # the wording, not its labels
        count += 1
    assert count > 2000
    assert all(len(p) >= 3 for p in phrasings.values()), phrasings


def test_checkpoint_weights_are_bf16_by_default_and_the_trainer_state_keeps_fp32(tmp_path):
    """A paper model's checkpoint: from_pretrained weights in bf16 (half the disk; config.json says so), rounded
    from the fp32 masters, which the trainer state beside them keeps exactly and a resumed run loads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    model, processor = tiny_model("qwen2_5_vl")
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    args = ssrl.parse_args(["--model", str(tmp_path / "base"), "--out", str(tmp_path / "run")])
    assert args.save_dtype == "bf16" and ssrl.parse_args([]).save_dtype == "fp32"      # recipe / tiny presets
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    path = ssrl.save_checkpoint(args, dist, model, processor, 1, "sft", optimizer)
    weights = load_file(str(path / "model.safetensors"))
    masters = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], masters[k].bfloat16().float()) for k in masters)
    fresh, _ = tiny_model("qwen2_5_vl", seed=3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    ssrl.load_trainer_state(path, dist, fresh, fresh_optimizer)
    assert all(torch.equal(fresh.state_dict()[k], masters[k]) for k in masters)
    state, fresh_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(state[i][key], fresh_state[i][key]) for i in state for key in ("exp_avg", "exp_avg_sq"))


def test_checkpoint_loads_with_from_pretrained_and_gives_identical_logits(tmp_path):
    from transformers import AutoModelForImageTextToText
    model, processor = tiny_model("qwen3_vl")
    args = ssrl.parse_args(["--out", str(tmp_path), "--save-limit", "2"])
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (1, 2, 3):
        path = ssrl.save_checkpoint(args, dist, model, processor, step, "sft", optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]   # --save-limit 2
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    loaded_processor = ssrl.load_processor(path, "qwen3_vl")
    rng = random.Random(4)
    records, images = zip(*[make_record(rng, n) for n in (1, 2)])
    batch = grpo.encode_prompts(processor, list(records), list(images), 56 * 56, 128 * 128)
    batch_loaded = grpo.encode_prompts(loaded_processor, list(records), list(images), 56 * 56, 128 * 128)
    for key in batch:
        assert torch.equal(batch[key], batch_loaded[key]), key
    inputs = {k: v for k, v in batch.items() if k != "images_per_sample"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"


def write_tsv(path, rows):
    buffer = io.BytesIO()
    tasks.render_scene(random.Random(0), 64, 48)[0].save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\timage"]
    for i, (answer, _) in enumerate(rows):
        lines.append(f"{i}\tWhere is the cup?\tLeft\tRight\tFront\tBack\t{answer}\t{image if i == 0 else '0'}")
    path.write_text("\n".join(lines) + "\n")


def test_tsv_eval_of_a_model_that_always_answers_A(tmp_path, monkeypatch):
    model, processor = tiny_model("qwen2_5_vl")
    answers = ["A", "B", "A", "C", "A", "D", "A"]
    write_tsv(tmp_path / "bench.tsv", [(a, None) for a in answers])
    forced = processor.tokenizer("<think>It is on the left.</think> \\boxed{A. Left}")["input_ids"]
    seen = []

    def always_a(model, processor, batch, max_new_tokens, **options):
        seen.append((batch["input_ids"].shape[0], options["engine"], options["micro_batch_size"]))
        return torch.tensor([forced] * batch["input_ids"].shape[0])

    monkeypatch.setattr(ssrl, "generate_greedy", always_a)
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    for engine, calls in (("hf", [3, 3, 1]), ("ssrl", [7])):   # the engine: 4 batches a call, 3 prompts in flight
        seen.clear()
        args = ssrl.parse_args(["--eval-batch-size", "3", "--rollout-engine", engine])
        result = ssrl.evaluate_tsv(args, dist, model, processor, tmp_path / "bench.tsv")
        assert result == {"accuracy": 4 / 7, "format": 1.0, "n": 7, "skipped": 0}
        assert seen == [(size, engine, 3) for size in calls]
    # VLMEvalKit's matching (tasks.can_infer) on the last box: a letter, an option's text
    record = {"meta": {"choices": {"A": "Left", "C": "Front"}}, "answer": "C"}
    assert tasks.score_mcq("<think></think>\\boxed{Front}", record) == (1.0, "C")
    assert tasks.score_mcq("\\boxed{(C)}", record) == (1.0, "C")
    assert tasks.score_mcq("\\boxed{A or C}", record) == (0.0, None)


def test_engine_calls_of_several_batches_answer_as_a_call_per_batch_does(tmp_path, monkeypatch):
    """Evaluation on the engine takes ENGINE_EVAL_BATCHES batches a call, slots refilled as answers end: the shipped
    base's greedy answers (which end at different lengths) are those of one engine call per batch and of
    transformers' generate, held-out prompts of all five tasks, 3 per batch."""
    _, held_out = tiny_dataset(str(tmp_path / "data"), per_task=1, eval_per_task=3)
    args = ssrl.parse_args(["--eval-batch-size", "3", "--max-response-length", "48", "--out", str(tmp_path / "out")])
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    model, processor, _ = ssrl.load_model(args, dist)
    answers = {}
    for engine, batches in (("ssrl", 4), ("ssrl", 1), ("hf", 1)):
        monkeypatch.setattr(ssrl, "ENGINE_EVAL_BATCHES", batches)
        args.rollout_engine = engine
        answered, _ = ssrl.generate_answers(args, dist, model, processor, held_out, args.min_pixels, args.max_pixels)
        answers[engine, batches] = [text for _, text, _ in answered]
    lengths = [len(processor.tokenizer(text)["input_ids"]) for text in answers["ssrl", 4]]
    assert len(answers["ssrl", 4]) == 15 and len(set(lengths)) >= 3
    assert answers["ssrl", 4] == answers["ssrl", 1] == answers["hf", 1]


def test_tiny_presets_have_their_own_defaults_and_user_flags_win():
    args = ssrl.parse_args([])
    assert args.model == "tiny-qwen3-vl" and args.sft_learning_rate == tiny.TINY_DEFAULTS["sft_learning_rate"]
    assert args.freeze_vision_tower is False and args.data == "data/tiny"
    args = ssrl.parse_args(["--sft-learning-rate", "0.01", "--model", "tiny-qwen2.5-vl"])
    assert args.sft_learning_rate == 0.01 and args.max_pixels == 128 * 128
    args = ssrl.parse_args(["--model", "qwen2.5-vl-7b"])
    assert (args.sft_learning_rate, args.sft_num_train_epochs, args.sft_global_batch_size) == (1e-5, 5, 256)
    assert args.freeze_vision_tower and args.sft_max_pixels == 512 * 512 and args.min_pixels == 512 * 512


@pytest.mark.parametrize("name,billions", [("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29), ("qwen3-vl-4b", 4.44)])
def test_random_init_builds_the_real_architectures(name, billions):
    from transformers import AutoModelForImageTextToText
    family = ssrl.PRESETS[name][0]
    _, processor = tiny_model(family)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(ssrl.real_config(name, processor.tokenizer))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_user_mistakes_give_one_line_errors(tmp_path):
    train, _ = tiny_dataset(str(tmp_path / "data"))
    cases = [(["--model", "gpt-5"], "unknown --model 'gpt-5'"),
             (["--model", str(tmp_path)], "is not a model folder"),
             (["--resume", str(tmp_path / "nothing")], "no such checkpoint folder"),
             (["--sft-micro-batch-size", "0"], "must be at least 1"),
             (["--compile-decode"], "needs a GPU and --rollout-engine ssrl")]
    half = tmp_path / "run" / "checkpoint-5"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    cases.append((["--resume", str(half)], "checkpoint is incomplete"))
    for argv, message in cases:
        with pytest.raises(ssrl.UserError, match=message) as error:
            ssrl.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--stage", "sft", *argv])
        assert "\n" not in str(error.value)
    with pytest.raises(ssrl.UserError, match="no train records for task"):
        ssrl.main(["--data", str(tmp_path / "empty"), "--tasks", "depth", "--per-task", "0", "--eval-per-task", "1",
                   "--out", str(tmp_path / "run")])
    # a record whose image vanished is skipped and counted, never a crash
    Path(train[0]["images"][0]).unlink()
    kept, images, skipped = ssrl.open_batch(train[:3])
    assert skipped == 1 and len(kept) == 2
    processor = tiny_model("qwen2_5_vl")[1]
    assert len(ssrl.filter_records(processor, train, 4096, 56 * 56, 128 * 128)) == len(train) - 1
    assert ssrl.filter_records(processor, train[1:], 20, 56 * 56, 128 * 128) == []   # too long: dropped, not cut


def test_command_line_error_is_one_line():
    result = subprocess.run([sys.executable, "ssrl.py", "--model", "nope", "--stage", "eval"], capture_output=True,
                            text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown --model 'nope'")
    assert "Traceback" not in result.stderr


def test_report_to_sends_every_row_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    import types
    logged = []
    fake = types.SimpleNamespace(init=lambda **kwargs: types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values))))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    dist = ssrl.Dist(0, 1, 0, torch.device("cpu"))
    metrics = ssrl.Metrics(tmp_path, dist, report_to="wandb", config={"seed": 1})
    metrics.log({"stage": "grpo", "step": 7, "reward": 0.5, "shared_prompt": 1.0, "note": "text"})
    assert logged == [(7, {"grpo/reward": 0.5, "grpo/shared_prompt": 1.0})]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward"] == 0.5
    monkeypatch.setitem(sys.modules, "wandb", None)           # not installed: import fails
    with pytest.raises(ssrl.UserError, match="pip install wandb") as error:
        ssrl.Metrics(tmp_path, dist, report_to="wandb")
    assert "\n" not in str(error.value)


def corner_task(image, rng):
    """A toy sixth task: which corner of the image holds a painted square."""
    corner = rng.randrange(4)
    width, height = image.size
    side = min(width, height) // 3
    left, top = (corner % 2) * (width - side), (corner // 2) * (height - side)
    image = image.copy()
    image.paste(tuple(rng.randrange(256) for _ in range(3)), (left, top, left + side, top + side))
    problem = "<image>Which corner holds the square? A. top left B. top right C. bottom left D. bottom right"
    return tasks.Sample("corner", problem, "ABCD"[corner], [image], {"corner": corner, "box": [left, top, side]})


def corner_reasoning(meta, answer, rng):
    return f"The square is at the {('top', 'bottom')[meta['corner'] // 2]} {('left', 'right')[meta['corner'] % 2]}."


def test_a_sixth_task_is_one_function_and_one_entry(tmp_path, monkeypatch):
    """Registered in tasks.TASKS and nowhere else, a toy task is built, cold-started on its own reasoning and
    evaluated against its own chance."""
    monkeypatch.setitem(tasks.TASKS, "corner", tasks.Task(corner_task, corner_reasoning, chance=1 / 4))
    data, out = tmp_path / "data", tmp_path / "run"
    ssrl.main(["--model", "tiny-qwen2.5-vl", "--init", "random", "--tasks", "corner", "--data", str(data),
               "--out", str(out), "--stage", "sft", "--per-task", "32", "--eval-per-task", "8",
               "--sft-num-train-epochs", "6", "--sft-data-fraction", "1", "--save-steps", "100"])
    records = tasks.load_records(data, "train")
    assert len(records) == 32 and {r["task"] for r in records} == {"corner"}
    for record in records[:8]:     # the answer names the corner the square was pasted in
        (image,) = tasks.open_images(record)
        left, top, side = record["meta"]["box"]
        corner = "ABCD".index(record["answer"])
        assert (left > 0, top > 0) == (corner % 2 == 1, corner // 2 == 1)
        low, high = image.crop((left + 2, top + 2, left + side - 2, top + side - 2)).convert("L").getextrema()
        assert high - low < 40                                   # the square is there, one flat colour
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss/corner"] for row in rows if row.get("stage") == "sft"]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.5        # its cold-start answers were learnt
    evaluation = json.loads((out / "eval-sft.json").read_text())
    assert evaluation["corner"]["n"] == 8 and evaluation["corner"]["chance"] == 0.25
