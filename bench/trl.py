"""Seconds per GRPO step, side by side with TRL's GRPOTrainer: the same tiny model, prompts and recipe, one thread,
each side in its own process, the two run in turn (pairs).

    OMP_NUM_THREADS=1 python -m bench.trl --pairs 3
    OMP_NUM_THREADS=1 python -m bench.trl --pairs 3 --shapes recipe --steps 2

trl is not a requirement of this repository: `pip install trl` for this benchmark only.

The same work on both sides: the prompts of bench.grpo (`--shapes default`: 16 prompts of the five tasks at 112 px;
`recipe`: 2-5 scenes of 364 px each), one tiny Qwen2.5-VL saved once and loaded by both (TRL loads its reference from
the same folder), n = 5 samples at T = 1 and top-p 1 (random weights never sample EOS: every sample runs to
--max-new-tokens), tasks.reward, k3 KL 0.01 to the reference, ratio clip [0.8, 1.3], AdamW lr 1e-6 and weight decay
0.01, grad clip 1.0, 2 optimizer updates per step on half the samples each (TRL: steps_per_generation 2, so it also
computes the old log-probs), token-mean loss (TRL loss_type "dapo"). One step here is grpo.grpo_step; one step of TRL
is the two optimizer steps that share a generation. Each process times --steps steps after one warm-up step and
prints the median; the table gives each pair and the median of the per-pair ratios.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import grpo
import ssrl
import tasks
import tiny
from bench.grpo import default_records, recipe_records

N, LEARNING_RATE, WEIGHT_DECAY, KL = 5, 1e-6, 0.01, 0.01
NO_TRL = "bench.trl needs trl (and datasets), which this repository does not require: pip install trl"


def prepare(args, root):
    """Records, the saved model folder and the image size: the same for both sides (built from fixed seeds)."""
    side = args.image_size or (364 if args.shapes == "recipe" else 112)
    records = (recipe_records(root, args.prompts, side) if args.shapes == "recipe"
               else default_records(root, args.prompts))
    corpus = tiny.tokenizer_corpus([r for r in records if "meta" in r]) + [r["problem"] for r in records]
    model, processor = ssrl.build_tiny("qwen2_5_vl", corpus)
    processor.image_processor.size = {"shortest_edge": side * side, "longest_edge": side * side}
    folder = os.path.join(root, "model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return records, folder, side * side


def run_ssrl(args, records, folder, pixels):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    processor = ssrl.load_processor(folder, "qwen2_5_vl")
    batch = grpo.encode_prompts(processor, records, [tasks.open_images(r) for r in records], min_pixels=pixels,
                                max_pixels=pixels)
    cfg = grpo.GRPOConfig(num_generations=N, max_new_tokens=args.max_new_tokens, kl_coef=KL, updates_per_step=2,
                          rollout_engine=args.rollout_engine, rollout_micro_batch_size=len(records))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    answers, task_names = [r["answer"] for r in records], [r["task"] for r in records]
    seconds = []
    for step in range(args.steps + 1):
        torch.manual_seed(step)
        start = time.perf_counter()
        metrics, _ = grpo.grpo_step(model, reference, optimizer, batch, answers, task_names, processor, cfg)
        seconds.append(time.perf_counter() - start)
    return seconds[1:], float(batch["attention_mask"].sum(1).float().mean()), metrics["completions/mean_length"]


def run_trl(args, records, folder, pixels):
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit(NO_TRL) from None
    processor = ssrl.load_processor(folder, "qwen2_5_vl")
    dataset = Dataset.from_list([{"prompt": grpo.chat_messages(r["problem"]), "images": tasks.open_images(r),
                                  "answer": r["answer"]} for r in records])

    def reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [tasks.reward(text, truth)["overall"] for text, truth in zip(texts, answer)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *unused, **kwargs):
            self.ends.append(time.perf_counter())

    prompts = len(records)
    config = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(folder), "trl"), use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_dropout=True, shuffle_dataset=False, seed=0,
        num_generations=N, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        per_device_train_batch_size=prompts * N // 2, steps_per_generation=2, num_iterations=1,
        gradient_accumulation_steps=1, beta=KL, epsilon=0.2, epsilon_high=0.3, loss_type="dapo",
        learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=2 * (args.steps + 1), dataloader_num_workers=0,
        gradient_checkpointing=False)   # TRL's default recomputes activations; bench.grpo's tiny model does not
    clock = Clock()
    trainer = GRPOTrainer(model=folder, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=processor, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    ends = [start] + clock.ends
    seconds = [ends[i + 2] - ends[i] for i in range(0, len(ends) - 2, 2)]   # two optimizer steps per generation
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    encoded = grpo.encode_prompts(processor, records, [tasks.open_images(r) for r in records], min_pixels=pixels,
                                  max_pixels=pixels)
    return seconds[1:], float(encoded["attention_mask"].sum(1).float().mean()), lengths[-1] if lengths else None


def one(args):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        records, folder, pixels = prepare(args, root)
        seconds, prompt_tokens, length = (run_ssrl if args.one == "ssrl" else run_trl)(args, records, folder, pixels)
    print(json.dumps({"side": args.one, "seconds": seconds, "median": statistics.median(seconds),
                      "prompt_tokens": prompt_tokens, "mean_length": length}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="(ssrl, trl) process pairs, run in turn")
    parser.add_argument("--shapes", choices=("default", "recipe"), default="default")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after 1 warm-up)")
    parser.add_argument("--rollout-engine", choices=("ssrl", "hf"), default="ssrl", help="this side's rollouts")
    parser.add_argument("--one", choices=("ssrl", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(NO_TRL)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("| pair | ssrl s/step | TRL s/step | TRL / ssrl | prompt tokens (ssrl / TRL) | mean length (ssrl / TRL) |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for pair in range(args.pairs):
        results = {}
        for side in (("ssrl", "trl") if pair % 2 == 0 else ("trl", "ssrl")):   # alternate who goes first
            command = [sys.executable, "-m", "bench.trl", "--one", side, "--shapes", args.shapes, "--prompts",
                       str(args.prompts), "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps),
                       "--rollout-engine", args.rollout_engine]
            if args.image_size:
                command += ["--image-size", str(args.image_size)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
        ours, theirs = results["ssrl"], results["trl"]
        ratios.append(theirs["median"] / ours["median"])
        print(f"| {pair + 1} | {ours['median']:.2f} | {theirs['median']:.2f} | {ratios[-1]:.2f} | "
              f"{ours['prompt_tokens']:.0f} / {theirs['prompt_tokens']:.0f} | {ours['mean_length']:.1f} / "
              f"{theirs['mean_length'] or float('nan'):.1f} |", flush=True)
    print(f"\nmedian TRL / ssrl over {args.pairs} pairs: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
