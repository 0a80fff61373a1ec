"""Can a tiny model from random init read one marker's colour, or its row, behind the paper's depth prompt?

    OMP_NUM_THREADS=1 python -m bench.probe --question colour    # which of two label colours is drawn
    OMP_NUM_THREADS=1 python -m bench.probe --question row       # is the marker in the top or the bottom half
    OMP_NUM_THREADS=1 python -m bench.probe --question row --lm-init-std 0.15   # the same from a larger LM init

The images are a plain random colour with one marker drawn by tasks.py (112 x 84 px: 12 visual tokens), the prompt
is the depth task's question plus the format prompt (134 text tokens with the tiny tokenizer), the answer a short
<think> and \\boxed{1} or \\boxed{2}. Trained like the cold start (ssrl's SFT path, AdamW, batch 16, constant lr),
greedy held-out accuracy is printed every --every steps (chance 0.5). This isolates the two skills the depth task
needs, colour (which marker is label 1) and position (where it is), from everything else.
"""
import argparse
import random
import tempfile
import time

import torch
from PIL import Image, ImageDraw

import grpo
import ssrl
import tasks


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
    tasks._draw_marker(ImageDraw.Draw(image), (x, y), label, radius)
    return image, answer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--question", choices=("colour", "row"), default="colour")
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
    held_out = [probe_sample(rng, args.question) for _ in range(args.eval)]
    with tempfile.TemporaryDirectory() as root:   # the tokenizer the default run trains: on real task samples
        tasks.build_dataset(root, per_task=100, eval_per_task=1, seed=args.seed, max_side=112, progress=False)
        corpus = ssrl.tokenizer_corpus(tasks.load_records(root, "train"), args.seed)
    model, processor = ssrl.build_tiny(ssrl.PRESETS[args.model][0], corpus, seed=args.seed)
    if args.lm_init_std:
        # At 0.02 the tiny LM's attention logits start near 0: attention is uniform and an image token's state does
        # not depend on where it sits. At ~0.15 the random RoPE-dependent attention over the fixed system-prompt
        # tokens already stamps each image token with a code of its row and column, which the answer can read.
        with torch.no_grad():
            for module in model.model.language_model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    module.weight.normal_(0.0, args.lm_init_std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    pixels = (56 * 56, 128 * 128)

    def encode(samples):
        return ssrl.encode_prompts(processor, [{"problem": problem}] * len(samples), [[im] for im, _ in samples], *pixels)

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

    length = len(processor.tokenizer(ssrl.prompt_text(processor, problem))["input_ids"]) - 1
    print(f"{args.model}, {args.question}: prompt of {length} text tokens + 12 visual tokens; step 0 accuracy {accuracy():.2f}", flush=True)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = [probe_sample(rng, args.question) for _ in range(args.batch)]
        prompts = encode(batch)
        ids, mask = ssrl.encode_responses(processor.tokenizer, [response.format(answer) for _, answer in batch])
        logp = grpo.response_logprobs(model, prompts, ids, mask)
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0:
            print(f"step {step} ({time.perf_counter() - started:.0f} s): loss {loss.item():.3f} "
                  f"accuracy {accuracy():.2f}", flush=True)


if __name__ == "__main__":
    main()
