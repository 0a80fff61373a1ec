"""Can a tiny model from random init read one marker's colour, or its row, behind the paper's depth prompt?

    OMP_NUM_THREADS=1 python -m bench.probe --question colour    # which of two label colours is drawn
    OMP_NUM_THREADS=1 python -m bench.probe --question row       # is the marker in the top or the bottom half
    OMP_NUM_THREADS=1 python -m bench.probe --question row --lm-init-std 0.15   # the same from a larger LM init

The images are a plain random colour with one marker drawn by tasks.py (112 x 84 px: 12 visual tokens), the prompt
is the depth task's question plus the format prompt (134 text tokens with the tiny tokenizer), the answer a short
<think> and \\boxed{1} or \\boxed{2}. Trained like the cold start (ssrl's SFT path, AdamW, batch 16, constant lr),
greedy held-out accuracy is printed every --every steps (chance 0.5). This isolates the two skills the depth task
needs, colour (which marker is label 1) and position (where it is), from everything else.

    OMP_NUM_THREADS=1 python -m bench.probe --model tiny-qwen3-vl --question lookup --learning-rate 1e-3 \\
        --steps 2000 --every 250 --eval 200
    ... --layout filler --max-filler 12           # the options 10-12 words back instead
    ... --layers 6 --rope-theta 1e6                # a deeper language model, Qwen's rope_theta
    ... --steps 4000 --curriculum 1500             # 1,500 steps with the options near first, then far
    ... --answer scan                              # read the options in order instead (tasks.scan_options)

"lookup" isolates the last step of the position task's answer: four shuffled words as options A-D, then either
the position prompt's own closing text, the format prompt and a reasoning ("position"), or 10..--max-filler random
prompt words ("filler"), then "<word> is option" and the letter to predict (trained and scored on that one token,
argmax over A-D, chance 0.25). With --answer scan the reasoning names the word and the model writes "A. Left, no.
B. Back, yes." (trained on those tokens, scored on the letter before ", yes." in a greedy reading). Text only, so it
measures the language model alone: its layers, its rope_theta, whether it needs the lookup near before it learns it
far, and which of the two readings it learns (docs/tiny-model.md section 3).
"""
import argparse
import random
import re
import tempfile
import time

import torch
from PIL import Image, ImageDraw

from transformers import AutoModelForImageTextToText

import grpo
import ssrl
import tasks
import tiny


def probe_sample(rng, question):
    """(image, answer): a plain background and one marker; colour: label 1 or 2 drawn anywhere; row: label 1 drawn
    in the top (answer 1) or bottom (answer 2) half, never within a marker radius of the middle."""
    width, height, radius = 112, 84, 6
    image = Image.new("RGB", (width, height), tuple(rng.randrange(80, 180) for _ in range(3)))
    x = rng.randrange(radius + 2, width - radius - 2)
    answer = rng.choice("12")
    if question == "colour":
        label, y = int(answer), rng.randrange(radius + 2, height - radius - 2)
    else:
        label = 1
        y = (rng.randrange(radius + 2, height // 2 - radius) if answer == "1"
             else rng.randrange(height // 2 + radius, height - radius - 2))
    tasks.draw_marker(ImageDraw.Draw(image), (x, y), label, radius)
    return image, answer


def lookup_sample(rng, tokenizer, layout, max_filler, answer="letter"):
    """(token ids, target ids, index of the answer letter): find the option letter of a word among four, far back.
    "letter": the text ends "<word> is option" and the target is the letter; "scan": the text ends with the
    reasoning that names the word and the target reads the options up to it (tasks.scan_options)."""
    words, pick = rng.sample(tiny.OPTION_WORDS, 4), rng.randrange(4)
    options = " ".join(f"{tasks.LETTERS[i]}. {word}" for i, word in enumerate(words))
    if layout == "position":
        ignore = " and ignore the height difference between the two regions" if rng.random() < 0.5 else ""
        think = rng.choice(tasks.POSITION_DIRECTIONS).format(        # the position reasoning's own sentences
            facing=rng.choice(("left", "right", "towards me", "away from me")), camera=rng.choice("12"),
            target=rng.choice("12"), truth=words[pick])
        closing = tasks._POSITION.split("{options}")[1].format(ignore=ignore)    # the position prompt's own end
        text = (f"Where is the region marker '2'? {options}{closing}"
                f"{tasks.FORMAT_PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>The leftmost marker is "
                f"{rng.choice('12')}. The highest marker is {rng.choice('12')}. {think}")
    else:
        words_pool = tasks._POSITION.replace("{", "").replace("}", "").split()
        filler = " ".join(rng.choice(words_pool) for _ in range(rng.randint(10, max_filler)))
        text = f"Where is it? {options}. {filler}." + (f" It is {words[pick]}." if answer == "scan" else "")
    text, target = ((text + f" {words[pick]} is option", f" {tasks.LETTERS[pick]}") if answer == "letter" else
                    (text, " " + tasks.scan_options(words, words[pick]) + "</think>"))
    text_ids, target_ids = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in (text, target))
    return text_ids, target_ids, pick


def lookup(args, model, processor):
    """Train the option lookup on its target tokens; score the letter (argmax over A-D after "is option"), or the
    letter before ", yes." in a greedy scan."""
    tokenizer = processor.tokenizer
    letters = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in tasks.LETTERS]
    rng, held_rng = random.Random(args.seed), random.Random(args.seed + 1)
    held_out = [lookup_sample(held_rng, tokenizer, args.layout, args.max_filler, args.answer) for _ in range(args.eval)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)

    def left_padded(rows):                        # so that the last position is every row's next token
        width = max(map(len, rows))
        ids, mask = torch.full((len(rows), width), tokenizer.pad_token_id), torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, width - len(tokens):], mask[row, width - len(tokens):] = torch.tensor(tokens), 1
        return ids, mask

    def letter_logits(samples):                   # [B, 4]: the next token's logits over A-D
        ids, mask = left_padded([prompt for prompt, _, _ in samples])
        return model(input_ids=ids, attention_mask=mask).logits[:, -1, letters]

    @torch.no_grad()
    def predictions(samples):
        if args.answer == "letter":
            return letter_logits(samples).argmax(-1).tolist()
        ids, mask = left_padded([prompt for prompt, _, _ in samples])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(len(t) for _, t, _ in held_out) + 4,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        found = [re.search(r"([A-D])\. [^,]*, yes", text) for text in tokenizer.batch_decode(out[:, ids.shape[1]:])]
        return [tasks.LETTERS.index(match.group(1)) if match else -1 for match in found]

    def accuracy():
        model.eval()
        right = sum(guess == pick for k in range(0, len(held_out), 50)
                    for guess, (_, _, pick) in zip(predictions(held_out[k:k + 50]), held_out[k:k + 50]))
        model.train()
        return right / len(held_out)

    lengths = [len(ids) for ids, _, _ in held_out]
    print(f"lookup, {args.layout}, answer {args.answer}: {min(lengths)}-{max(lengths)} tokens, {args.layers or 3} "
          f"layers, rope_theta {args.rope_theta or 10:g}; step 0 accuracy {accuracy():.2f} (chance 0.25)", flush=True)

    def step_loss(step):         # letter: cross-entropy over A-D at the last position; scan: on the target tokens
        for group in optimizer.param_groups:            # 100 warmup steps
            group["lr"] = args.learning_rate * min(1.0, step / 100)
        layout, max_filler = ("filler", 12) if step <= args.curriculum else (args.layout, args.max_filler)
        batch = [lookup_sample(rng, tokenizer, layout, max_filler, args.answer) for _ in range(args.batch)]
        if args.answer == "letter":
            return torch.nn.functional.cross_entropy(letter_logits(batch), torch.tensor([pick for _, _, pick in batch]))
        rows = [prompt + target for prompt, target, _ in batch]
        width = max(map(len, rows))
        ids, labels = torch.full((len(rows), width), tokenizer.pad_token_id), torch.full((len(rows), width), -100)
        for row, (prompt, target, _) in enumerate(batch):
            ids[row, :len(rows[row])] = torch.tensor(rows[row])
            labels[row, len(prompt):len(rows[row])] = torch.tensor(target)
        mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
        logits = model(input_ids=ids, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    train(args, model, optimizer, step_loss, accuracy)


def train(args, model, optimizer, step_loss, accuracy):
    """--steps AdamW steps on step_loss(step), gradients clipped at 1.0; held-out accuracy every --every steps."""
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = step_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0:
            print(f"step {step} ({time.perf_counter() - started:.0f} s): loss {loss.item():.3f} "
                  f"accuracy {accuracy():.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--question", choices=("colour", "row", "lookup"), default="colour")
    p.add_argument("--layout", choices=("position", "filler"), default="position", help="lookup: what separates "
                   "the options from the word to look up")
    p.add_argument("--max-filler", type=int, default=90, help="lookup --layout filler: at most this many words")
    p.add_argument("--answer", choices=("letter", "scan"), default="letter", help="lookup: the letter after "
                   "\"<word> is option\", or the options read in order up to the word (tasks.scan_options)")
    p.add_argument("--curriculum", type=int, default=0, help="lookup: train the first N steps with the options "
                   "10-12 words back (scored on --layout throughout)")
    p.add_argument("--layers", type=int, default=None, help="language-model layers (tiny: 3)")
    p.add_argument("--rope-theta", type=float, default=None, help="the language model's rope_theta (tiny: 10)")
    p.add_argument("--model", choices=("tiny-qwen2.5-vl", "tiny-qwen3-vl"), default="tiny-qwen2.5-vl")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--eval", type=int, default=100, help="held-out samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-init-std", type=float, default=None,
                   help="re-initialise the language model's linear and embedding weights with this std (HF: 0.02)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    problem = "<image>" + tasks._DEPTH
    response = "<think>Looking at the marker.</think> \\boxed{{{}}}"
    with tempfile.TemporaryDirectory() as root:   # the tokenizer the default run trains: on real task samples
        tasks.build_dataset(root, per_task=100, eval_per_task=1, seed=args.seed, max_side=112, progress=False)
        corpus = tiny.tokenizer_corpus(tasks.load_records(root, "train"), args.seed)
    processor = ssrl.build_tiny_processor(ssrl.PRESETS[args.model][0], corpus)
    config = ssrl.tiny_config(ssrl.PRESETS[args.model][0], processor.tokenizer)
    text = config.text_config
    text.num_hidden_layers = args.layers or text.num_hidden_layers
    text.rope_parameters["rope_theta"] = args.rope_theta or text.rope_parameters["rope_theta"]
    torch.manual_seed(args.seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    if args.lm_init_std:
        # At 0.02 the tiny LM's attention logits start near 0: attention is uniform and an image token's state does
        # not depend on where it sits. At ~0.15 the random RoPE-dependent attention over the fixed system-prompt
        # tokens already stamps each image token with a code of its row and column, which the answer can read.
        with torch.no_grad():
            for module in model.model.language_model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    module.weight.normal_(0.0, args.lm_init_std)
    if args.question == "lookup":
        return lookup(args, model, processor)
    held_out = [probe_sample(rng, args.question) for _ in range(args.eval)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    pixels = (56 * 56, 128 * 128)

    def encode(samples):
        return grpo.encode_prompts(processor, [{"problem": problem}] * len(samples), [[im] for im, _ in samples], *pixels)

    @torch.no_grad()
    def accuracy():
        model.eval()
        right = 0
        for start in range(0, len(held_out), 50):
            chunk = held_out[start:start + 50]
            texts = processor.tokenizer.batch_decode(ssrl.generate_greedy(model, processor, encode(chunk), 24),
                                                     skip_special_tokens=True)
            right += sum(tasks.reward(text, answer)["accuracy"] for text, (_, answer) in zip(texts, chunk))
        model.train()
        return right / len(held_out)

    length = len(processor.tokenizer(grpo.prompt_text(processor, problem))["input_ids"]) - 1
    print(f"{args.model}, {args.question}: prompt of {length} text tokens + 12 visual tokens; step 0 accuracy {accuracy():.2f}", flush=True)

    def step_loss(step):
        batch = [probe_sample(rng, args.question) for _ in range(args.batch)]
        ids, mask = grpo.encode_responses(processor.tokenizer, [response.format(answer) for _, answer in batch])
        logp = grpo.response_logprobs(model, encode(batch), ids, mask)
        return -(logp * mask).sum() / mask.sum()

    train(args, model, optimizer, step_loss, accuracy)


if __name__ == "__main__":
    main()
