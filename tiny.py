"""The CPU demo's tiny Qwen-VL, its tokenizer and perception pre-training; not the paper's method (ssrl, grpo, tasks).
The ~2M-parameter model and the pre-training that made the shipped base in checkpoints/tiny-qwen3-vl.

The paper starts from a Qwen-VL that can already see. A tiny model from random weights cannot, and learns nothing
but the answer format from the pretext tasks (docs/tiny-model.md, section 1). So the tiny presets start from a base
taught, once, what a real VLM's pre-training gives and the tasks rest on: which labelled marker is drawn, where,
which is highest / lowest / leftmost / rightmost, which option of a list names a word (PRIMITIVES, questions on
rendered scenes; none is a pretext task's question), by SFT in phases (PRETRAIN_PHASES).

    python ssrl.py                                  # the default run starts from checkpoints/tiny-qwen3-vl
    python ssrl.py --stage pretrain                 # remakes it (~50 CPU-minutes; the same weights, bit for bit)
    python ssrl.py --model tiny-qwen2.5-vl --init random   # a tiny model from random weights

ssrl.py imports this file; it imports grpo.py and tasks.py only.
"""
import hashlib
import itertools
import json
import random
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen3VLConfig, get_cosine_schedule_with_warmup

import grpo
import tasks

# ---------------------------------------------------------------------------------------------------------------
# What the tiny presets change in ssrl.py's flags, and why

MIN_PIXELS, MAX_PIXELS = 56 * 56, 128 * 128    # 112-px images: 12-16 visual tokens each

# A 2M-parameter model pre-trained for perception only must train its vision tower (far from done), needs a learning
# rate ~100x the recipe's, and a CPU affords a few thousand SFT examples (batch 16). The cold start has the paper's
# shape: a small slice (10% of the training split, 5 epochs, 190 steps) that teaches the format and leaves depth half
# learnt, room for the reward (docs/tiny-model.md, section 5; the full split over 375 steps teaches depth itself).
# Fewer than ~100 steps left the answers garbled at T = 1. SFT lr 1e-3 keeps what the base sees (section 3). 200
# held-out prompts per task: a standard error <= 0.035 on an accuracy. 8 frames per VSI-Bench video (the paper's 128
# at 16 tokens each would fill twice the 1,024-token prompts a tiny model trains on).
TINY_DEFAULTS = dict(
    data="data/tiny", per_task=1200, eval_per_task=200, max_side=112,
    sft_learning_rate=1e-3, sft_num_train_epochs=5, sft_data_fraction=0.1, sft_global_batch_size=16,
    sft_micro_batch_size=16, sft_weight_decay=0.0, freeze_vision_tower=False, freeze_multi_modal_projector=False,
    sft_min_pixels=MIN_PIXELS, sft_max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
    max_prompt_length=1024, max_response_length=128, eval_batch_size=64, save_steps=200, gradient_checkpointing=False,
    vsi_frames=8,
    save_dtype="fp32",      # 2M parameters: a checkpoint seeds the next stage (--stage grpo --model CKPT) as it is
)

# GRPO: lr 1e-4, 100x the recipe's (3e-4 first knocked depth down: docs/tiny-model.md, sections 4-5), 16 prompts x 5
# responses, one update per step, 300 steps with a held-out evaluation every 50: what the 10-minute default run has
# room for.
TINY_GRPO_DEFAULTS = dict(
    max_steps=300, rollout_batch_size=16, global_batch_size=16, learning_rate=1e-4, weight_decay=0.0,
    rollout_micro_batch_size=16, eval_steps=50, rollout_save_steps=20,
)

# ---------------------------------------------------------------------------------------------------------------
# The tokenizer: a byte-level BPE trained on the prompts, with Qwen's special tokens at the end of its vocabulary

QWEN_SPECIALS = ("<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
                 "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> "
                 "<|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> "
                 "<|repo_name|> <|file_sep|> <tool_response> </tool_response> <think> </think>").split()
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
# Qwen's pre-tokenizer split (digits one by one, words with their leading space, punctuation runs)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
# The Qwen2-VL chat layout: an image is <|vision_start|><|image_pad|><|vision_end|> where it sits in the content.
# Qwen2.5-VL opens with a default system turn, Qwen3-VL does not.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}SYSTEM{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEFAULT_SYSTEM = {"qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "qwen3_vl": ""}


def train_tokenizer(texts, family, vocab_size=1024):
    """A byte-level BPE trained on `texts`, wrapped for transformers, with the Qwen special tokens added last and
    the family's chat template. Byte-level, so any text still encodes; 0.01 s on a few hundred strings. Also the
    paper presets' tokenizer under --init random when the hub's is not there (no network)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(QWEN_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in QWEN_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", model_max_length=1 << 20)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("SYSTEM", DEFAULT_SYSTEM[family])
    return tokenizer


def tokenizer_corpus(records, seed=0):
    """Texts the tiny tokenizer is trained on: the prompts and cold-start answers of the given records (a cold-start
    file's written answer, else three the program writes from the record's meta; a release row has neither)."""
    rng = random.Random(seed)
    texts = [tasks.FORMAT_PROMPT, "You are a helpful assistant.", "\\boxed{A} \\boxed{B} \\boxed{C} \\boxed{D}"]
    for record in records:
        texts.append(record["problem"])
        if record.get("response"):
            texts.append(record["response"])
        elif record.get("meta"):
            texts += [tasks.cold_start_response(record, rng) for _ in range(3)]
    return texts


def tiny_config(family, tokenizer):
    """The tiny shape: a vision tower of depth 4 and width 128 with a language model of width 96 and 3 layers (1.7M
    parameters with the ~1k BPE vocabulary); a smaller language model learnt the format but not to write a
    permutation (docs/tiny-model.md, section 1). rope_theta 10 with most of each head's rotary pairs on the two
    spatial axes: with Qwen's 1e6 one step of the 4x4 visual grid turns a tiny head by <= 0.03 rad and the spatial
    tasks stayed at chance; with 10 it turns 0.1-1 rad."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vocab = -(-len(tokenizer) // 64) * 64
    text = dict(vocab_size=vocab, hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id)
    vision = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=96,
                  spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 5, 5]}
        vision.update(patch_size=14, window_size=112, fullatt_block_indexes=[1, 3])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    text.update(head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [4, 4, 4],
                                              "mrope_interleaved": True})
    vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)

# ---------------------------------------------------------------------------------------------------------------
# The shipped base: checkpoints/<preset>, checked against the sha256 its pretrain.json records

def shipped_base(name):
    """checkpoints/<tiny preset>: the preset's perception base, as --stage pretrain writes it."""
    return Path(__file__).resolve().parent / "checkpoints" / name


def remake_command(name):
    return f"python ssrl.py --stage pretrain --model {name}"


def check_base(name):
    """The shipped base's folder, after checking that its weights are the ones pretrain.json recorded;
    FileNotFoundError or ValueError with a one-line message naming the way back otherwise."""
    path = shipped_base(name)
    recipe, weights = path / "pretrain.json", path / "model.safetensors"
    if not recipe.is_file() or not weights.is_file():
        raise FileNotFoundError(f"no perception base for {name} in {path}: make it with `{remake_command(name)}` "
                                "(~50 CPU-minutes), or start from random weights with --init random")
    try:
        expected = json.loads(recipe.read_text())["sha256"]
    except (ValueError, KeyError):
        expected = None
    if expected != file_sha256(weights):
        raise ValueError(f"the perception base in {path} is corrupted (its weights do not match pretrain.json): "
                         f"restore it with `git checkout -- {path}` or remake it with `{remake_command(name)}`")
    return path


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

# ---------------------------------------------------------------------------------------------------------------
# Perception primitives: what a real VLM's pre-training already gives and the pretext tasks rest on (which marker
# is drawn, where it is, which is highest/lowest/leftmost/rightmost, is one above or left of another, which option
# of a list names a word), asked about labelled markers drawn on rendered scenes. They pre-train the tiny base
# (`python ssrl.py --stage pretrain`); none is a pretext task's question, and each answer is computed from the drawn
# centres that `meta` keeps (primitive_answer re-derives it).

PRIMITIVES = {
    "which": "Which marker is in the image?",
    "where": "Where is marker {a}?",
    "highest": "Which marker is highest in the image?",
    "lowest": "Which marker is lowest in the image?",
    "leftmost": "Which marker is leftmost in the image?",
    "rightmost": "Which marker is rightmost in the image?",
    "above": "Is marker {a} above marker {b}?",
    "left": "Is marker {a} left of marker {b}?",
    "option": "Which option is {word}? {options}",
    "choice": "Is marker {a} {axis} marker {b}? {options}. Look at where both markers are drawn in the image. The "
              "final answer should be chosen from 'A', 'B', 'C', and 'D'.",
}
OPTION_WORDS = ("Left", "Right", "Front", "Back", "Left-Front", "Right-Front", "Right-Back", "Left-Back", "Up", "Down",
                "Near", "Far", "Red", "Green", "Blue", "Top", "Bottom")
_CHOICE_AXES = (("to the left or the right of", ("Left", "Right")), ("above or below", ("Up", "Down")))
GRID_ROWS, GRID_COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")
PRIMITIVE_CHANCE = {"which": 1 / 3, "where": 1 / 9, "highest": 5 / 12, "lowest": 5 / 12, "leftmost": 5 / 12,
                    "rightmost": 5 / 12, "above": 1 / 2, "left": 1 / 2, "option": 1 / 4, "choice": 1 / 4}
#                   (the comparisons ask about 2 or 3 markers: (1/2 + 1/3) / 2 = 5/12)


def _place_markers(rng, count, width, height, radius, tries=20):
    """`count` centres wholly inside the image and >= 2.2 radii apart (as the depth task spaces them), or None."""
    points = []
    for _ in range(tries * count):
        x, y = rng.randrange(radius + 1, width - radius - 1), rng.randrange(radius + 1, height - radius - 1)
        if all((x - a) ** 2 + (y - b) ** 2 >= (2.2 * radius) ** 2 for a, b in points):
            points.append((x, y))
            if len(points) == count:
                return points
    return None


def primitive_sample(rng, kind, width=112, radius=6, max_radius=None, plain=False, min_gap=8, count=None):
    """One perception question about 1-3 labelled markers on a rendered scene (or a plain colour if `plain`).

    The marker radius is drawn from [radius, max_radius] when max_radius is given: a tiny model from random init
    learns colour and position on large markers first, then on the tasks' small ones. Comparisons need a gap of
    >= min_gap px between the compared coordinates; "where" answers a 3x3 grid cell ("top left" ... "bottom right")
    with the centre >= min_gap / 2 px from the cell borders. `count` markers (default: 1 for "which", 1-3 for
    "where", 2-3 for the comparisons). "option" asks which letter of four shuffled words names one of them (the
    multiple-choice reading that the position task's answer needs), over a scene without markers; "choice" asks it
    where the position task needs it: whether marker a is left/right of (or above/below) marker b, among four
    options ~100 tokens back, past a closing sentence and the format prompt, the word found in the reasoning and
    the options read in order up to it ("The leftmost marker is 2. The highest marker is 1. From 2, 1 is Right.
    A. Up, no. B. Right, yes."), as the position reasoning reads them (scan_options, docs/tiny-model.md).
    """
    height = max(tasks.MIN_PATCH, round(width * 3 / 4))
    if max_radius:
        radius = rng.randint(radius, max_radius)
    image = (Image.new("RGB", (width, height), tuple(rng.randrange(60, 200) for _ in range(3))) if plain
             else tasks.render_scene(rng, width, height)[0])
    if kind == "option":
        words, pick = rng.sample(OPTION_WORDS, 4), rng.randrange(4)
        options = " ".join(f"{tasks.LETTERS[i]}. {word}" for i, word in enumerate(words))
        meta = {"kind": kind, "words": words, "size": [width, height], "plain": plain,
                "think": f"{words[pick]} is option {tasks.LETTERS[pick]}."}
        return tasks.Sample("primitive", "<image>" + PRIMITIVES[kind].format(word=words[pick], options=options),
                      tasks.LETTERS[pick], [image], meta)
    extra = {}
    if kind == "which":
        count = 1
    elif kind == "choice":
        count = 2
    elif count is None:
        count = rng.choice((1, 2, 3)) if kind == "where" else rng.choice((2, 3))
    labels = rng.sample((1, 2) if kind == "choice" else (1, 2, 3), count)
    while True:
        points = _place_markers(rng, count, width, height, radius)
        if points is None:                      # too crowded for this radius: shrink it
            radius = max(2, radius - 2)
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if kind == "which":
            answer, think, question = str(labels[0]), f"It is marker {labels[0]}.", PRIMITIVES[kind]
        elif kind == "where":
            i = rng.randrange(count)
            fx, fy = xs[i] * 3 / width, ys[i] * 3 / height
            if min(abs(fx - 1), abs(fx - 2)) * width / 3 < min_gap / 2 or \
                    min(abs(fy - 1), abs(fy - 2)) * height / 3 < min_gap / 2:
                continue
            answer = f"{GRID_ROWS[int(fy)]} {GRID_COLUMNS[int(fx)]}"
            think, question = f"Marker {labels[i]} is at the {answer}.", PRIMITIVES[kind].format(a=labels[i])
        elif kind in ("highest", "lowest", "leftmost", "rightmost"):
            values = ys if kind in ("highest", "lowest") else xs
            order = sorted(range(count), key=values.__getitem__, reverse=kind in ("lowest", "rightmost"))
            if abs(values[order[0]] - values[order[1]]) < min_gap:
                continue
            answer, question = str(labels[order[0]]), PRIMITIVES[kind]
            think = f"The {kind} marker is {answer}."
        elif kind == "choice":
            if abs(xs[0] - xs[1]) < min_gap or abs(ys[0] - ys[1]) < min_gap:
                continue
            a, b = labels
            axis, pair = rng.choice(_CHOICE_AXES)
            word = pair[0] if (xs[0] < xs[1] if pair[0] == "Left" else ys[0] < ys[1]) else pair[1]
            words = [*pair, *rng.sample([w for w in OPTION_WORDS if w not in pair], 2)]
            rng.shuffle(words)
            answer, extra = tasks.LETTERS[words.index(word)], {"words": words}
            question = PRIMITIVES[kind].format(a=a, b=b, axis=axis, options=" ".join(
                f"{tasks.LETTERS[i]}. {w}" for i, w in enumerate(words)))
            think = (f"The leftmost marker is {tasks.extreme(labels, points, 'leftmost')}. The highest marker is "
                     f"{tasks.extreme(labels, points, 'highest')}. From {b}, {a} is {word}. "
                     f"{tasks.scan_options(words, word)}")
        else:                                   # above / left: a yes-no comparison of two labels
            i, j = rng.sample(range(count), 2)
            values = ys if kind == "above" else xs
            if abs(values[i] - values[j]) < min_gap:
                continue
            yes = values[i] < values[j]
            relation = {"above": ("above", "below"), "left": ("left of", "right of")}[kind][0 if yes else 1]
            answer, question = ("yes" if yes else "no"), PRIMITIVES[kind].format(a=labels[i], b=labels[j])
            think = f"Marker {labels[i]} is {relation} marker {labels[j]}."
        break
    draw = ImageDraw.Draw(image)
    for point, label in zip(points, labels):
        tasks.draw_marker(draw, point, label, radius)
    meta = {"kind": kind, "labels": labels, "centres": [list(p) for p in points], "radius": radius,
            "size": [width, height], "plain": plain, "think": think, **extra}
    return tasks.Sample("primitive", "<image>" + question, answer, [image], meta)


def primitive_answer(meta, problem):
    """Re-derive a primitive's answer from its meta and question (the tests' audit); None when ambiguous."""
    kind = meta["kind"]
    if kind == "choice":
        a, b = (int(d) for d in re.findall(r"marker (\d)", problem))
        (xa, ya), (xb, yb) = (meta["centres"][meta["labels"].index(label)] for label in (a, b))
        word = ("Left" if xa < xb else "Right") if "left or the right" in problem else ("Up" if ya < yb else "Down")
        return tasks.LETTERS[meta["words"].index(word)]
    if kind == "option":
        word = re.match(r"<image>Which option is (\S+)\?", problem).group(1)
        return tasks.LETTERS[meta["words"].index(word)]
    labels, (width, height) = meta["labels"], meta["size"]
    xs, ys = ([c[i] for c in meta["centres"]] for i in (0, 1))
    asked = [int(d) for d in re.findall(r"marker (\d)", problem)]
    if kind == "which":
        return str(labels[0])
    if kind == "where":
        i = labels.index(asked[0])
        return f"{GRID_ROWS[int(ys[i] * 3 / height)]} {GRID_COLUMNS[int(xs[i] * 3 / width)]}"
    if kind in ("highest", "lowest", "leftmost", "rightmost"):
        values = ys if kind in ("highest", "lowest") else xs
        best = (min if kind in ("highest", "leftmost") else max)(values)
        return str(labels[values.index(best)]) if values.count(best) == 1 else None
    i, j = labels.index(asked[0]), labels.index(asked[1])
    values = ys if kind == "above" else xs
    return None if values[i] == values[j] else ("yes" if values[i] < values[j] else "no")

# ---------------------------------------------------------------------------------------------------------------
# Pre-training (--stage pretrain): the primitives, taught by SFT in phases. What made them learnable on one CPU core
# (docs/tiny-model.md, section 2): Qwen3-VL's learnt absolute position embedding in the vision tower, initialised at
# std 0.5 so that an image token knows where it is (a tiny Qwen2.5-VL, whose tower has 2-D RoPE only, stayed at chance
# on "where"); big markers first, then the tasks' 6-px ones; a curriculum (one marker on a plain background, then
# scenes, then comparisons); the depth task's look; then "choice", the position task's letter as the reasoning reads
# it (tasks.scan_options). Half the questions carry the format prompt, so that perception survives behind it. The
# fifth phase's "option" questions are what "choice" replaced; they stay because the shipped base was made with them.

@dataclass
class Phase:
    """A stretch of pre-training: `steps` batches of questions drawn uniformly from `kinds` ("kind/n" asks with n
    markers; a repeated kind weighs more), a plain background in `plain` of them, marker radius 6-`max_radius` px
    (6 when None), comparisons by >= `min_gap` px. `learning_rate` starts a fresh AdamW with linear warmup and a
    cosine to 0 over the phases up to the next one that sets it."""
    steps: int
    kinds: tuple
    plain: float = 0.0
    max_radius: int | None = None
    min_gap: int = 8
    learning_rate: float | None = None
    warmup: int = 50


_COMPARE = ("highest", "lowest", "leftmost", "rightmost")
PRETRAIN_PHASES = (
    Phase(600, ("which", "where/1"), plain=1.0, max_radius=24, learning_rate=5e-4, warmup=100),
    Phase(900, ("which", "where/1", "where"), plain=0.5, max_radius=24),
    Phase(1500, ("which", "where/1", "where", *_COMPARE, "above", "left"), plain=0.2, max_radius=24),
    Phase(1500, (*(k + "/3" for k in _COMPARE), "where/3"), min_gap=4, learning_rate=5e-4),
    Phase(3000, ("option",) * 4 + tuple(k + "/3" for k in _COMPARE), min_gap=4, learning_rate=1e-3),
    Phase(5000, ("choice",) * 6 + tuple(k + "/3" for k in _COMPARE), min_gap=4, learning_rate=1e-3),
)
PRETRAIN_POSITION_STD = 0.5
PRETRAIN_EVAL_KINDS = ("which", "where", *_COMPARE, "above", "left", "option", "choice")


def primitive_record(sample, format_prompt=True):
    """A tasks.primitive_sample as a record (the image stays in memory) and its image."""
    return ({"task": "primitive", "problem": sample.problem, "answer": sample.answer, "meta": sample.meta,
             "format_prompt": format_prompt}, sample.images[0])


def primitive_response(record, rng):
    """The cold-start answer to a primitive: its one-sentence reasoning, then the boxed answer."""
    return tasks.reasoned_answer(record["meta"]["think"], record["answer"], rng)


def primitive_examples(rng, phase, count):
    """`count` (record, image) pairs of the phase's kinds; half the records ask with the format prompt."""
    out = []
    for _ in range(count):
        kind, _, markers = rng.choice(phase.kinds).partition("/")
        sample = primitive_sample(rng, kind, 112, 6, phase.max_radius, rng.random() < phase.plain,
                                        phase.min_gap, int(markers) if markers else None)
        out.append(primitive_record(sample, rng.random() < 0.5))
    return out


def pretrain_corpus(seed):
    """The base's tokenizer corpus: every pretext prompt and cold-start answer of a small build, and primitives."""
    with tempfile.TemporaryDirectory() as root:
        tasks.build_dataset(root, per_task=100, eval_per_task=1, seed=seed, max_side=112, progress=False)
        corpus = tokenizer_corpus(tasks.load_records(root, "train"), seed)
    rng = random.Random(f"{seed}:corpus")
    for kind in PRETRAIN_EVAL_KINDS:
        for _ in range(40):
            sample = primitive_sample(rng, kind, 112, 6, 24, rng.random() < 0.5)
            corpus += [sample.problem, primitive_response(primitive_record(sample)[0], rng)]
    return corpus


@torch.no_grad()
def evaluate_primitives(model, processor, held_out, batch_size=60, max_new_tokens=80):
    """Greedy held-out accuracy per primitive kind (and all), asked with the format prompt as the cold start asks."""
    model.eval()
    right = defaultdict(list)
    for start in range(0, len(held_out), batch_size):
        chunk = held_out[start:start + batch_size]
        batch = grpo.encode_prompts(processor, [r for r, _ in chunk], [[image] for _, image in chunk], MIN_PIXELS,
                                     MAX_PIXELS)
        tokenizer = processor.tokenizer
        completions, _, _ = grpo.generate_completions(model, batch, 1, max_new_tokens, 0.0, 1.0, tokenizer.eos_token_id,
                                                      tokenizer.pad_token_id)
        texts = processor.tokenizer.batch_decode(completions, skip_special_tokens=True)
        for (record, _), text in zip(chunk, texts):
            right[record["meta"]["kind"]].append(tasks.reward(text, record["answer"])["accuracy"])
    model.train()
    results = {kind: sum(v) / len(v) for kind, v in right.items()}
    results["all"] = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return results


def primitive_held_out(seed, count):
    """`count` held-out primitives at the tasks' marker size (radius 6), the kinds in turn, on scenes."""
    rng = random.Random(f"{seed}:pretrain-eval")
    kinds = PRETRAIN_EVAL_KINDS
    return [primitive_record(primitive_sample(rng, kinds[i % len(kinds)], 112, 6)) for i in range(count)]


def pretrain(args, model, processor, out, log):
    """Teach a freshly built tiny model the perception primitives (PRETRAIN_PHASES) and save it at `out` as a
    from_pretrained folder: weights, tokenizer, processor, and pretrain.json (recipe, held-out accuracy per kind,
    the weights' sha256, the command that remakes it). `log` takes each step's metrics row."""
    started, cpu_started = time.perf_counter(), time.process_time()
    family = model.config.model_type
    if family == "qwen3_vl":     # an image token should know where it is from the start
        with torch.no_grad():
            model.model.visual.pos_embed.weight.normal_(0.0, PRETRAIN_POSITION_STD)
    rng = random.Random(f"{args.seed}:pretrain")
    held_out = primitive_held_out(args.seed, args.pretrain_eval)
    phases = [replace(p, steps=max(1, round(p.steps * args.pretrain_scale))) for p in PRETRAIN_PHASES]
    steps = sum(phase.steps for phase in phases)
    print(f"pretrain: {steps} steps of {args.pretrain_batch_size} primitive questions, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    bar = tqdm(total=steps, desc="pretrain", dynamic_ncols=True)
    history, step = [], 0
    model.train()
    for index, phase in enumerate(phases):
        if phase.learning_rate:
            span = phase.steps + sum(p.steps for p in itertools.takewhile(lambda p: not p.learning_rate,
                                                                          phases[index + 1:]))
            optimizer = torch.optim.AdamW(model.parameters(), lr=phase.learning_rate, weight_decay=0.0)
            scheduler = get_cosine_schedule_with_warmup(optimizer, min(phase.warmup, span // 2), span)
        for _ in range(phase.steps):
            step += 1
            batch = primitive_examples(rng, phase, args.pretrain_batch_size)
            records, images = [r for r, _ in batch], [[image] for _, image in batch]
            prompts = grpo.encode_prompts(processor, records, images, MIN_PIXELS, MAX_PIXELS)
            ids, mask = grpo.encode_responses(processor.tokenizer, [primitive_response(r, rng) for r in records])
            logp = grpo.response_logprobs(model, prompts, ids, mask)
            loss = -(logp * mask).sum() / mask.sum()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"stage": "pretrain", "step": step, "phase": index, "loss": loss.item(),
                   "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
            if step % args.pretrain_eval_steps == 0 or step == steps:
                results = evaluate_primitives(model, processor, held_out)
                row.update({f"eval/{kind}": value for kind, value in results.items()})
                history.append({"step": step, **results})
                bar.write(f"pretrain step {step} ({time.perf_counter() - started:.0f} s): held-out accuracy "
                          + " ".join(f"{k} {v:.2f}" for k, v in results.items()))
            log(row)
            bar.set_postfix(loss=f"{row['loss']:.3g}", refresh=False)
            bar.update(1)
    bar.close()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    with tasks.written_atomically(out) as temp:
        model.save_pretrained(temp, safe_serialization=True)
        processor.save_pretrained(temp)
        recipe = {"tiny": True, "model": args.model, "seed": args.seed, "steps": steps,
                  "batch_size": args.pretrain_batch_size, "phases": [vars(phase) for phase in phases],
                  "position_embedding_std": PRETRAIN_POSITION_STD if family == "qwen3_vl" else None,
                  "wall_seconds": round(seconds), "cpu_seconds": round(cpu), "threads": torch.get_num_threads(),
                  "held_out": history[-1], "chance": PRIMITIVE_CHANCE, "history": history,
                  "sha256": file_sha256(Path(temp) / "model.safetensors"),
                  "command": remake_command(args.model) + (f" --seed {args.seed}" if args.seed != 1 else "")
                  + (f" --pretrain-scale {args.pretrain_scale}" if args.pretrain_scale != 1 else "")}
        (Path(temp) / "pretrain.json").write_text(json.dumps(recipe, indent=1))
    print(f"base written to {out} ({seconds / 60:.1f} min wall, {cpu / 60:.1f} CPU-min); held-out accuracy: "
          + " ".join(f"{k} {v:.2f} (chance {PRIMITIVE_CHANCE[k]:.2f})" for k, v in history[-1].items()
                     if k in PRIMITIVE_CHANCE) + f", all {history[-1]['all']:.2f}", flush=True)
    return out
