"""Spatial-SSRL (arXiv 2510.27606) from scratch, the entry point: flags, models, the SFT and GRPO loops, evaluation.
Not the algorithm (grpo.py), nor the tasks (tasks.py), nor the CPU demo's tiny model (tiny.py).

In the order a reader looks for things: flags -> compute -> model and prompts -> the cold start -> the GRPO loop ->
evaluation -> checkpoints and metrics -> main.

    python ssrl.py                                 # the whole recipe on the tiny base (cold start, then GRPO), CPU
    python ssrl.py --stage sft                     # build tiny data, eval, SFT cold start, eval
    python ssrl.py --eval runs/ssrl/checkpoint-120 # greedy eval of a checkpoint on the held-out split
    python ssrl.py --eval CKPT --eval-tsv MMBench_DEV_EN.tsv   # any VLMEvalKit multiple-choice TSV
    python ssrl.py --eval CKPT --eval-bench spatial457=Spatial457.tsv vsi-bench=VSIBench/vsi_bench.json  # Table 1
    python ssrl.py --plot runs/ssrl                # metrics.jsonl -> metrics.png
    torchrun --nproc_per_node 8 ssrl.py --model qwen2.5-vl-7b --data data/Spatial-SSRL-81k   # the release as downloaded
    python ssrl.py --model qwen3-vl-4b --init random --stage sft   # real architecture, random weights (speed/memory)

Defaults are the paper's recipe (section 4.1 and the released training scripts); the tiny presets (`tiny-qwen3-vl`,
the default, and `tiny-qwen2.5-vl`) replace some of them with tiny.TINY_DEFAULTS so that a CPU learns in minutes.
Everything a run writes goes under --out: metrics.jsonl, eval-<stage>.json, checkpoint-<step>/ folders that
`AutoModelForImageTextToText.from_pretrained` loads as they are, metrics.png, held-out.json (the rows held out of a
dataset without an eval split) and bench-<name>.json (--eval-bench).
"""
import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from PIL import Image
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm.auto import tqdm
from torch.distributed.tensor import DTensor
from transformers import (AttentionInterface, AutoConfig, AutoModelForImageTextToText, GenerationConfig,
                          Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen3VLConfig, Qwen3VLProcessor, get_constant_schedule,
                          get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging as transformers_logging

import grpo
import tasks
import tiny


# ---------------------------------------------------------------------------------------------------------------
# Flags

PRESETS = {  # name -> (family, hub id); the tiny ones are built from a config in code
    "tiny-qwen2.5-vl": ("qwen2_5_vl", None),
    "tiny-qwen3-vl": ("qwen3_vl", None),
    "qwen2.5-vl-3b": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
    "qwen2.5-vl-7b": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "qwen3-vl-4b": ("qwen3_vl", "Qwen/Qwen3-VL-4B-Instruct"),
}

# Prompts in flight per rank (--rollout-micro-batch-size), each with its n = 5 responses, and prompts per evaluation
# call (--eval-batch-size). The paper presets default to "auto": on CUDA, with the policy gathered, as many as the
# free memory holds at the batch's longest prompt (grpo.memory_micro_batch: the KV cache of the engine in use, the
# prefill's transient, sampling, pixels; max(2 GiB, 5%) kept spare): ~18 prompts for 3B on one 80 GB GPU at
# 2,000-token prompts and 2,048-token responses (`python -m bench.memory`). Off CUDA each preset falls back to what
# keeps `generate`'s KV cache (the larger engine's) within ~12-14 GB: n x 4,096 tokens x grpo.kv_bytes_per_token per
# prompt, 3B 0.76 GB -> 16 prompts, 7B 1.17 GB -> 12, Qwen3-VL-4B 3.02 GB -> 4; evaluation 16.
PRESET_DEFAULTS = {name: dict(rollout_micro_batch_size="auto", eval_batch_size="auto")
                   for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-4b")}
FALLBACK_MICRO_BATCH = {"qwen2.5-vl-3b": 16, "qwen2.5-vl-7b": 12, "qwen3-vl-4b": 4}   # and 4 for any other model
FALLBACK_EVAL_BATCH = 16
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}    # --save-dtype


def micro_batch_flag(text):
    """A micro-batch flag's value: a number, or "auto" (from free GPU memory)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None


class UserError(Exception):
    """A mistake in flags or inputs: main prints its one-line message, without a traceback."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model", default="tiny-qwen3-vl", help=f"preset ({', '.join(PRESETS)}), a local model folder or a hub id; "
        "a tiny preset starts from its perception base in checkpoints/ (see --stage pretrain)")
    add("--init", choices=("pretrained", "random"), default="pretrained",
        help="random: build the preset's architecture from its config with random weights (no download; for a tiny "
        "preset, the from-scratch model instead of its shipped base)")
    add("--layers", type=int, default=None, metavar="K", help="with --init random: only K decoder layers and K vision "
        "blocks at the preset's real widths (vocabulary, hidden size, heads, patch and merge sizes)")
    add("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="compute dtype (auto: bf16 on CUDA, fp32 on "
        "CPU); weights and optimizer state stay fp32, bf16 computes through FSDP2's mixed precision")
    add("--stage", choices=("all", "sft", "grpo", "eval", "pretrain"), default="all",
        help="all: eval base -> SFT -> GRPO -> eval; sft: eval -> SFT -> eval; grpo: GRPO on --model; eval: eval only; "
        "pretrain: a tiny preset's perception base from random init, into checkpoints/<preset> (or --out)")
    add("--eval", metavar="CHECKPOINT", help="shortcut for --stage eval --model CHECKPOINT")
    add("--eval-tsv", nargs="+", default=[], metavar="TSV",
        help="also score VLMEvalKit multiple-choice TSVs (index, question, A-D, answer, image as base64) with "
        "VLMEvalKit's prompt and answer matching")
    add("--eval-bench", nargs="+", default=[], metavar="NAME=PATH",
        help=f"score the model on the paper's benchmarks (Table 1) from files you downloaded, each with its own "
        f"prompt and scoring: {', '.join(f'{name} ({spec.expected})' for name, spec in tasks.BENCHMARKS.items())}")
    add("--vsi-frames", type=int, default=128, help="frames per VSI-Bench video, uniformly spaced (the paper: 128)")
    add("--eval-num-samples", type=int, default=1, metavar="K", help="also sample K responses per held-out prompt "
        "at --eval-temperature and report pass@1 (their mean accuracy) and pass@K beside greedy (0: greedy only)")
    add("--eval-temperature", type=float, default=1.0, help="temperature of those samples (1: what GRPO samples and "
        "maximises)")
    add("--plot", metavar="RUN_DIR", help="turn RUN_DIR/metrics.jsonl into RUN_DIR/metrics.png and exit")
    add("--data", default=None, help="dataset folder (train.jsonl/eval.jsonl, or the released Spatial-SSRL-81k: "
        "spatialssrl.parquet and images/ as downloaded); built with tasks.build_dataset from procedural scenes when it "
        "holds no dataset")
    add("--sft-data", metavar="FILE.json", help="cold-start examples with written answers (the release's "
        "SFT-coldstart.json: alpaca rows; sharegpt too), in place of the program-written reasonings")
    add("--out", default="runs/ssrl", help="run folder: metrics, evaluations, checkpoints")
    add("--tasks", nargs="+", default=list(tasks.TASKS), choices=tasks.TASKS, help="pretext tasks to train and evaluate")
    add("--per-task", type=int, default=4000, help="training samples per task when the data is built")
    add("--eval-per-task", type=int, default=200, help="held-out samples per task when the data is built, or rows "
        "held out per task from a dataset without an eval split (the release; written to OUT/held-out.json)")
    add("--max-side", type=int, default=512, help="longest image side when the data is built")
    add("--seed", type=int, default=1, help="seed for model init, data order and sampling (EasyR1 data.seed)")
    # SFT cold start: LLaMA-Factory's recipe (paper section 4.1; InternLM/Spatial-SSRL training/SFT-coldstart/
    # sft_scripts/*.yaml), flag names as in TRL's SFTConfig with an sft- prefix.
    # Our choice: full fine-tuning of the language model, where the released config uses LoRA rank 128 (alpha 256)
    # on its linear layers. The cold start only teaches the answer format (75 steps at lr 1e-5; "hardly improves
    # spatial understanding", training.md); GRPO then updates every parameter with AdamW anyway, so a full-parameter
    # SFT fits wherever GRPO fits (its optimizer is freed before GRPO), and it needs neither a LoRA implementation
    # nor a merge step between the stages.
    add("--sft-learning-rate", type=float, default=1e-5, help="AdamW learning rate")
    add("--sft-num-train-epochs", type=float, default=5, help="epochs over the cold-start subset")
    add("--sft-lr-scheduler-type", choices=("cosine", "constant"), default="cosine", help="after warmup")
    add("--sft-warmup-ratio", type=float, default=0.1, help="linear warmup, fraction of all steps")
    add("--sft-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--sft-max-grad-norm", type=float, default=1.0, help="gradient clipping")
    add("--sft-data-fraction", type=float, default=0.044, help="fraction of the training split used for the cold start "
        "(the paper's ~3,600 of 81k)")
    add("--sft-global-batch-size", type=int, default=256, help="examples per optimizer step over all ranks "
        "(paper: 4 per device x 8 accumulation x 8 GPUs); accumulation = global / (micro x ranks)")
    add("--sft-micro-batch-size", type=int, default=4, help="examples per forward pass per rank")
    add("--freeze-vision-tower", action=argparse.BooleanOptionalAction, default=True,
        help="freeze the ViT in SFT (LLaMA-Factory default)")
    add("--freeze-multi-modal-projector", action=argparse.BooleanOptionalAction, default=True,
        help="freeze the vision merger in SFT (LLaMA-Factory default)")
    add("--sft-min-pixels", type=int, default=32 * 32, help="image_min_pixels in SFT")
    add("--sft-max-pixels", type=int, default=512 * 512, help="image_max_pixels in SFT")
    # rollout / evaluation (EasyR1 data.* names)
    add("--min-pixels", type=int, default=512 * 512, help="min_pixels for GRPO rollouts and evaluation")
    add("--max-pixels", type=int, default=2048 * 2048, help="max_pixels for GRPO rollouts and evaluation")
    add("--max-prompt-length", type=int, default=4096, help="prompts longer than this are dropped (counted), never cut")
    add("--max-response-length", type=int, default=2048, help="max new tokens when generating")
    add("--eval-batch-size", type=micro_batch_flag, default=16, help="prompts per generate call per rank (the "
        "engine: prompts in flight, ENGINE_EVAL_BATCHES batches a call), or auto (as --rollout-micro-batch-size with "
        "one response each; the paper presets' default)")
    add("--eval-limit", type=int, default=None, help="evaluate at most this many held-out samples per task")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
        help="recompute each layer's activations in backward: one 4k-token crop sequence on 7B holds ~42 GB without")
    # GRPO: EasyR1's recipe as the Spatial-SSRL scripts set it (training/GRPO/examples/config.yaml and
    # spatial-ssrl_qwen*.sh); EasyR1's flag names, TRL's where EasyR1 has none
    add("--max-steps", type=int, default=360, help="GRPO steps (the paper reports 360)")
    add("--rollout-batch-size", type=int, default=256, help="prompts per GRPO step over all ranks (data.rollout_batch_size)")
    add("--global-batch-size", type=int, default=128, help="prompts per optimizer update (actor.global_batch_size): "
        "rollout / global updates per step")
    add("--num-generations", type=int, default=5, help="responses per prompt, the GRPO group (rollout.n)")
    add("--temperature", type=float, default=1.0, help="sampling temperature, also applied to every log-prob pass")
    add("--top-p", type=float, default=1.0, help="nucleus sampling")
    add("--learning-rate", type=float, default=1e-6, help="AdamW learning rate, constant")
    add("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    add("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    add("--clip-ratio-low", type=float, default=0.2, help="ratio clipped below at 1 - this")
    add("--clip-ratio-high", type=float, default=0.3, help="ratio clipped above at 1 + this")
    add("--clip-ratio-dual", type=float, default=3.0, help="dual clip: loss bound -c*A for negative advantages")
    add("--kl-coef", type=float, default=1e-2, help="weight of the k3 KL to the reference in the loss (0: no reference)")
    add("--rollout-micro-batch-size", type=micro_batch_flag, default=4, help="prompts in flight per rank, n slots "
        "each, refilled as samples end (--rollout-engine hf: prompts per generate call), or auto: on CUDA as many as "
        "fit the free memory for the engine in use, else the preset's fallback (the paper presets' default; "
        "PRESET_DEFAULTS)")
    add("--rollout-engine", choices=("ssrl", "hf"), default="ssrl", help="rollouts and evaluation: ssrl (grpo."
        "engine_generate: each prompt once in the KV cache, a finished sample's slot refilled at once) or hf "
        "(transformers' generate, the reference); both sample the same way from the same seeds")
    add("--compile-decode", action="store_true", help="CUDA: the engine's decode step captured once as a CUDA graph "
        "and replayed (not yet measured on a GPU)")
    add("--max-tokens-per-micro-batch", type=int, default=16384, help="padded tokens per forward in the log-prob and "
        "update passes, per rank (EasyR1 max_token_len_per_gpu): rows sorted by length, as many as fit")
    add("--shared-prompt", action=argparse.BooleanOptionalAction, default=True, help="run each prompt once per group "
        "in every pass (generation prefill, log-probs, update): exact, and n times less work on the prompt")
    add("--ref-offload", action="store_true", help="keep the sharded reference model's parameters on the CPU")
    add("--eval-steps", type=int, default=0, help="evaluate on the held-out split every N GRPO steps (0: at the end)")
    add("--rollout-save-steps", type=int, default=10, help="write OUT/rollouts/step-N.jsonl every N GRPO steps")
    add("--save-steps", type=int, default=15, help="save a checkpoint every N optimizer steps (and at each stage end)")
    add("--save-limit", type=int, default=3, help="keep the last K checkpoints")
    add("--save-dtype", choices=tuple(SAVE_DTYPES), default="bf16", help="dtype of the from_pretrained weights in "
        "each checkpoint (the trainer state beside them keeps the fp32 master weights either way); tiny presets: fp32")
    add("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
        help="continue from CHECKPOINT, or from the newest complete one under --out when given alone")
    # perception pre-training of a tiny base (--stage pretrain); its phases are PRETRAIN_PHASES
    add("--pretrain-batch-size", type=int, default=16, help="primitive questions per step")
    add("--pretrain-scale", type=float, default=1.0, help="multiply every phase's steps (a quick look: 0.1)")
    add("--pretrain-eval", type=int, default=300, help="held-out primitive questions (30 per kind)")
    add("--pretrain-eval-steps", type=int, default=1500, help="evaluate the primitives every N steps")
    add("--logging-steps", type=int, default=10, help="print a line every N steps (metrics.jsonl gets every step)")
    add("--report-to", choices=("none", "tensorboard", "wandb"), default="none",
        help="also send every metrics row to TensorBoard (OUT/tensorboard) or Weights & Biases (needs the package)")
    add("--ddp-timeout", type=int, default=3600, help="seconds a collective may wait (rank 0 writes a checkpoint's "
        "from_pretrained weights, 16.6 GB for 7B in bf16, while the others wait; torch's default is 600)")
    return p


def parse_args(argv=None):
    """Parse flags; a tiny model (preset, or checkpoint of one) gets TINY_DEFAULTS under the user's own flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval:
        args.stage, args.model = "eval", args.eval
    small = is_tiny(args.model)
    if small or args.model in PRESET_DEFAULTS:
        parser.set_defaults(**(dict(**tiny.TINY_DEFAULTS, **tiny.TINY_GRPO_DEFAULTS) if small
                              else PRESET_DEFAULTS[args.model]))
        eval_model, args = args.model, parser.parse_args(argv)
        if args.eval:
            args.stage, args.model = "eval", eval_model
    args.tiny = small   # saved with each checkpoint, so that a checkpoint of a tiny model keeps the tiny defaults
    args.fallback_micro_batch = FALLBACK_MICRO_BATCH.get(args.model, 4)   # auto's value where it cannot measure
    args.data = args.data or "data/ssrl"
    if not (args.model in PRESETS or Path(args.model).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", args.model)):
        raise UserError(f"unknown --model {args.model!r}: choose one of {', '.join(PRESETS)}, a model folder or a "
                        "hub id")
    for name in ("sft_global_batch_size", "sft_micro_batch_size", "eval_batch_size", "max_response_length",
                 "rollout_batch_size", "global_batch_size", "rollout_micro_batch_size", "max_tokens_per_micro_batch"):
        if getattr(args, name) != "auto" and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.layers is not None and (args.layers < 1 or args.init != "random"):
        raise UserError("--layers K needs --init random and K >= 1")
    if args.num_generations < 2:
        raise UserError("--num-generations must be at least 2: GRPO's baseline is the group mean")
    args.eval_bench = parse_benchmarks(args.eval_bench)
    if args.vsi_frames < 1 or args.eval_num_samples < 0 or args.eval_temperature <= 0:
        raise UserError("--vsi-frames must be at least 1, --eval-num-samples at least 0, --eval-temperature above 0")
    if args.rollout_batch_size % args.global_batch_size:
        raise UserError(f"--rollout-batch-size {args.rollout_batch_size} must be a multiple of --global-batch-size "
                        f"{args.global_batch_size}")
    return args


def parse_benchmarks(items):
    """--eval-bench NAME=PATH ... -> {name: path}, in Table 1's order."""
    chosen = {}
    for item in items:
        name, separator, path = item.partition("=")
        if not separator or name.lower() not in tasks.BENCHMARKS or not path:
            raise UserError(f"--eval-bench {item!r}: expected NAME=PATH with NAME one of {', '.join(tasks.BENCHMARKS)}")
        chosen[name.lower()] = path
    return {name: chosen[name] for name in tasks.BENCHMARKS if name in chosen}


def is_tiny(model):
    """A tiny preset, a tiny base written by --stage pretrain (its pretrain.json), or a checkpoint of either."""
    if model in PRESETS:
        return PRESETS[model][1] is None
    if (Path(model) / "pretrain.json").is_file():
        return True
    state = Path(model) / "trainer_state.json"
    return state.is_file() and bool(json.loads(state.read_text())["args"].get("tiny"))

# ---------------------------------------------------------------------------------------------------------------
# Compute

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype = torch.float32      # compute dtype; parameters and optimizer state are always fp32

    @property
    def sharded(self):
        """FSDP2 holds the policy: to shard it over ranks, and to compute in bf16 from fp32 master weights."""
        return self.world > 1 or self.dtype != torch.float32


def compute_init(dtype="auto", timeout=3600):
    """Read torchrun's variables; start the process group when launched so (NCCL on CUDA, gloo on CPU), or a
    one-process group when the compute dtype is not fp32.

    Precision: master weights and AdamW state are fp32 on every path. bf16 computes through FSDP2's
    MixedPrecisionPolicy (bf16 copies for each forward and backward, fp32 gradients), also for one process. An
    optimizer stepping bf16 weights silently learns nothing at the recipe's rates: 10 AdamW steps at lr 1e-6
    change 1.9% of bf16 weights (mean |dw| 5.5e-8, below bf16's rounding step) against 99.99% of fp32 weights
    (measured, torch 2.13).

    Threads: OMP_NUM_THREADS when set, else the cores this process may use shared among the local ranks (1 per
    rank on 2 cores): oversubscribed threads made steps 10-30x slower on a 2-core machine.
    """
    cuda_allocator_settings()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    dist = Dist(rank, world, local_rank, device, compute)
    backend, timeout = ("nccl" if device.type == "cuda" else "gloo"), datetime.timedelta(seconds=timeout)
    if launched and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, timeout=timeout)
    elif dist.sharded and not torch_dist.is_initialized():   # FSDP2 needs a process group, even of one
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, cores // local_world)))
    return dist


def cuda_allocator_settings():
    """expandable_segments for CUDA's caching allocator, unless the user set its variable: the KV cache and every
    generate call and micro-batch have their own sizes, which strands freed blocks of odd sizes in fixed segments;
    expandable segments map more memory into one segment instead. torch reads the variable when the allocator
    starts, so this runs before anything touches the GPU (PYTORCH_CUDA_ALLOC_CONF: the older name, still read)."""
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


def adamw(parameters, learning_rate, weight_decay, fused=False):
    """AdamW over the fp32 master weights; `fused` (pass it on CUDA) takes torch's fused kernel.

    On CUDA torch defaults to the foreach implementation, whose step allocates `_foreach_sqrt(exp_avg_sq)`: an fp32
    copy of every parameter it steps, 14 GiB for Qwen2.5-VL-3B on one GPU, enough to take a one-GPU 3B step past
    80 GB. The fused kernel updates each tensor in place with no such copy (FSDP2's DTensor shards included). On the
    CPU torch's default is the per-tensor loop (foreach kernels are CUDA-only), kept so that CPU runs compute as
    they did; the fused update agrees with it to an ulp of the weight (tests/test_scale.py)."""
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay,
                             **({"fused": True} if fused else {}))


def print0(*values, dist=None, **kwargs):
    if dist is None or dist.rank == 0:
        print(*values, **kwargs, flush=True)


def gather_objects(items, dist):
    """Every rank's list, concatenated in rank order (one all_gather_object that every rank reaches)."""
    if dist.world == 1:
        return list(items)
    gathered = [None] * dist.world
    torch_dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def broadcast_object(value, dist):
    """Rank 0's `value` (picklable) on every rank."""
    if dist.world == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def on_every_rank(function, dist):
    """function() on every rank; a UserError on any rank becomes the same UserError on all of them (naming the
    first rank that had one), so that no rank waits at a collective for a rank that already stopped."""
    result, error = None, None
    try:
        result = function()
    except UserError as raised:
        error = str(raised)
    errors = gather_objects([error], dist)
    failed = [rank for rank, message in enumerate(errors) if message]
    if failed:
        where = "" if dist.world == 1 else f"rank {failed[0]}{' (and others)' if len(failed) > 1 else ''}: "
        raise UserError(where + errors[failed[0]])
    return result


def disk_leader(dist, folder):
    """The lowest rank that sees `folder` on the same disk as this rank (a collective; 0 in one process): the one
    rank that builds data, renames finished checkpoints and prunes old ones on that disk.

    Nodes need not share a disk: each node's local rank 0 drops a probe file named with a token from rank 0 into
    `folder`, and every rank takes the lowest rank among the probes it sees (every rank sees its own node's). On a
    disk all nodes share that is rank 0 everywhere; on local disks, each node's local rank 0."""
    if dist.world == 1:
        return 0
    import secrets
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = broadcast_object(secrets.token_hex(8), dist)
    probe = folder / f".probe-{token}-{dist.rank}"
    if dist.local_rank == 0:
        probe.touch()
    torch_dist.barrier()
    leader = min(int(path.name.rsplit("-", 1)[1]) for path in folder.glob(f".probe-{token}-*"))
    torch_dist.barrier()
    if dist.local_rank == 0:
        probe.unlink()
    return leader


def shard(model, compute_dtype, offload=False, materialize=None):
    """FSDP2: each vision block and decoder layer, then the root.

    Parameters keep their dtype in the shards (fp32 master weights for the policy, bf16 for the frozen reference)
    and are all-gathered in `compute_dtype`; gradients are reduced in fp32. The model code is untouched; grpo
    gathers it whole for generation (grpo.gathered) and per layer for the training passes. A model built on the meta
    device is sharded there and its shards allocated, uninitialised, on `materialize` (broadcast_weights fills them).
    """
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}
    if offload:   # parameters live on the CPU and are copied in per layer (used for the frozen reference)
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in model.model.visual.blocks:
        fully_shard(block, **kwargs)
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if materialize is not None:
        model.to_empty(device=materialize)
    # FSDP2 fixes each layer's gradient dtype at its lazy init, from the parameters that require grad then: run it
    # now, while every parameter does. Left to the first forward, a resumed run reaches it after the SFT freeze,
    # the frozen vision blocks record none, and GRPO's unfrozen ViT gradients then arrive in bf16 for fp32
    # parameters ("attempting to assign a gradient with dtype BFloat16").
    model._get_fsdp_state()._lazy_init()
    return model

# ---------------------------------------------------------------------------------------------------------------
# Models, tokenizer, processor

def processor_class(family):
    """The stock Qwen processor minus its video processor, which needs torchvision in transformers >= 5.4.

    Saved as the stock class name, so `AutoProcessor` loads the folder wherever torchvision is installed;
    `load_processor` loads it everywhere.
    """
    base = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}[family]

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def to_dict(self):
            return {**super().to_dict(), "processor_class": base.__name__}

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor


def image_processor(family, min_pixels, max_pixels):
    return Qwen2VLImageProcessorPil(patch_size=16 if family == "qwen3_vl" else 14, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def build_tiny_processor(family, texts, vocab_size=1024):
    """A processor around tiny.train_tokenizer's BPE trained on `texts`, at the tiny presets' image sizes."""
    tokenizer = tiny.train_tokenizer(texts, family, vocab_size)
    return processor_class(family)(image_processor(family, tiny.MIN_PIXELS, tiny.MAX_PIXELS), tokenizer,
                                   chat_template=tokenizer.chat_template)


def real_config(name, tokenizer, layers=None):
    """The paper models' architectures, written out (their config.json values), for `--init random`; `layers` keeps
    only that many decoder layers and vision blocks at the real widths (the full-attention and deepstack blocks
    that still exist, else the last one), so the real shapes run on a laptop."""
    def keep(indexes):
        return indexes if not layers else [i for i in indexes if i < layers] or [layers - 1]

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=151643)
    if name == "qwen3-vl-4b":
        text = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                        "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        vision = dict(depth=layers or 24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=keep([5, 11, 17]), hidden_act="gelu_pytorch_tanh")
        text["num_hidden_layers"] = layers or text["num_hidden_layers"]
        return Qwen3VLConfig(text_config={**text, **special}, vision_config=vision, tie_word_embeddings=True, **ids)
    big = name == "qwen2.5-vl-7b"
    text = dict(vocab_size=152064 if big else 151936, hidden_size=3584 if big else 2048,
                intermediate_size=18944 if big else 11008, num_hidden_layers=28 if big else 36,
                num_attention_heads=28 if big else 16, num_key_value_heads=4 if big else 2,
                max_position_embeddings=128000, rms_norm_eps=1e-6, sliding_window=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    text["num_hidden_layers"] = layers or text["num_hidden_layers"]
    vision = dict(depth=layers or 32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=keep([7, 15, 23, 31]), tokens_per_second=2,
                  hidden_act="silu")
    return Qwen2_5_VLConfig(text_config={**text, **special}, vision_config=vision, tie_word_embeddings=not big, **ids)


def model_family(path):
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UserError(f"{path} is not a model folder (no config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in ("qwen2_5_vl", "qwen3_vl"):
        raise UserError(f"{path}: model_type {model_type!r} is not supported (qwen2_5_vl or qwen3_vl)")
    return model_type


def load_processor(path, family):
    try:
        return processor_class(family).from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the processor from {path}: {str(error).splitlines()[0]}") from None


def build_tiny(family="qwen2_5_vl", texts=None, seed=0):
    """A tiny model of `family` from random init and its processor; `texts` train the tokenizer."""
    processor = build_tiny_processor(family, texts or tiny.tokenizer_corpus([]))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny.tiny_config(family, processor.tokenizer),
                                                    attn_implementation="sdpa")
    return model, processor


# The name padded_vision_attention is registered under with transformers' AttentionInterface. It contains "flash" on
# purpose: transformers 5.24 hands the vision tower's attention all windows of a block at once (the packed sequence
# and its `cu_seqlens`) only when the name does (utils/generic.py `is_flash_attention_requested`; the vision
# attention of models/qwen2_5_vl and models/qwen3_vl); any other name gets one call per window. It is set on the
# vision config directly, because `set_attn_implementation` would try to import flash-attn for such a name.
PADDED_VISION_ATTENTION = "flash_api_padded_sdpa"


def padded_vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, **kwargs):
    """The vision tower's attention over every window (Qwen2.5-VL's windowed blocks) or image (its full-attention
    blocks, all of Qwen3-VL's) of a block in one SDPA call: the windows gathered into a batch padded to the longest,
    a key mask hiding the padding. query, key, value [1, heads, L, head dim] packed; returns [1, L, heads, head dim].

    Why padded windows, not a block-diagonal mask over the packed sequence: that mask is L x L, and L is every patch
    of a generate call's images (16 crop prompts of 5 x 1,369 patches at 512 px: L = 110k, a 12 GB boolean mask
    and L^2 work where the windows need L x 64); torch's varlen_attn would need no padding but runs on CUDA only,
    and this is the code the CPU tests hold against the window loop (values and gradients, both families). Padded,
    memory and work are O(L x longest window): Qwen2.5-VL's windows are <= 64 patches (112 px), and a
    full-attention block pads each image to the longest in its group. Windows go into groups, longest first, each
    padded to at most twice its real tokens, so one very large image among small ones takes a second call instead
    of padding every small one to its size (same-size images and windows: one call per block)."""
    starts = cu_seq_lens_q.tolist()
    lengths = [end - begin for begin, end in zip(starts, starts[1:])]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups = []
    for i in order:      # a group grows while its padded size stays within twice its real tokens
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * lengths[group[0]] <= 2 * (sum(lengths[j] for j in group) + lengths[i]):
            group.append(i)
        else:
            groups.append([i])
    device = query.device
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))                       # [L, heads, head dim]
    pieces, positions = [], []
    for group in groups:
        width = lengths[group[0]]
        sizes = torch.tensor([lengths[i] for i in group])                                # [G]
        index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in group]).to(device)   # [Lg]
        rows = torch.repeat_interleave(torch.arange(len(group)), sizes).to(device)       # [Lg]
        columns = torch.cat([torch.arange(size) for size in sizes.tolist()]).to(device)  # [Lg]

        def padded(x):                                                                   # [G, heads, width, d]
            out = x.new_zeros(len(group), width, *x.shape[1:])
            return out.index_put((rows, columns), x[index]).transpose(1, 2)

        mask = (torch.arange(width)[None] < sizes[:, None]).to(device)[:, None, None, :]  # [G, 1, 1, width]
        out = torch.nn.functional.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask,
                                                               scale=scaling)            # [G, heads, width, d]
        pieces.append(out.transpose(1, 2)[rows, columns])                                 # [Lg, heads, d]
        positions.append(index)
    out = torch.cat(pieces)[torch.argsort(torch.cat(positions))]                         # [L, heads, d]
    return out[None], None


def vision_attention(model, device):
    """The vision tower's attention in one call per block over all of a batch's windows, on CUDA: flash attention's
    variable-length kernel when flash-attn is installed, else padded_vision_attention (SDPA). transformers' SDPA
    path runs one call per attention window: a 512-px image is ~25 windows of 8 x 8 patches, ~700 small calls per
    image per forward over Qwen2.5-VL's 28 windowed and 4 full-attention blocks (~2 M a GRPO step for 3B on one
    GPU), each too small to keep a GPU busy. On the CPU the stock loop stays: it costs little at CPU sizes, and the
    padded call agrees with it to ~1e-7, not bit for bit, which would change the tiny run's numbers. The language
    model stays on SDPA: the shared-prompt rows need its 4-D block mask, which flash attention does not take."""
    if device.type != "cuda":
        return model
    if importlib.util.find_spec("flash_attn") is not None:
        model.set_attn_implementation({"vision_config": "flash_attention_2"})
        return model
    return use_padded_vision_attention(model)


def use_padded_vision_attention(model):
    """The model's vision tower on padded_vision_attention (any device; vision_attention picks it on CUDA)."""
    AttentionInterface.register(PADDED_VISION_ATTENTION, padded_vision_attention)
    model.model.visual.config._attn_implementation = PADDED_VISION_ATTENTION
    return model


def load_model(args, dist, corpus=(), device=None, meta=False):
    """(model, processor, family) for --model: a preset, a local folder (checkpoint) or a hub id. The policy is
    always fp32: these are the master weights the optimizer updates (bf16 compute comes from `shard`). The model
    ends on `device` (default: the compute device); `meta` builds the same architecture on the meta device without
    reading or initialising any weight (load_sharded_model's skeleton)."""
    dtype = torch.float32
    device = device or dist.device
    name, remake = args.model, ""
    if name in PRESETS and PRESETS[name][1] is None and args.init == "pretrained":   # the shipped base: a folder
        try:
            name, remake = str(tiny.check_base(name)), f"; remake it with `{tiny.remake_command(name)}`"
        except (OSError, ValueError) as error:
            raise UserError(str(error)) from None
    if name in PRESETS:
        family, hub_id = PRESETS[name]
        if hub_id is None and meta:           # --init random: the from-scratch tiny model's skeleton
            processor = build_tiny_processor(family, list(corpus) or tiny.tokenizer_corpus([]))
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(tiny.tiny_config(family, processor.tokenizer),
                                                                attn_implementation="sdpa")
            return model, processor, family
        if hub_id is None:                    # --init random: the from-scratch tiny model
            model, processor = build_tiny(family, list(corpus), seed=args.seed)
            return model.to(device), processor, family
        if args.init == "random":
            try:
                processor = load_processor(hub_id, family)
            except UserError:   # no cached hub files: a trained BPE with the specials; ids stay below the real vocab
                print0(f"note: no tokenizer for {hub_id} offline; using a small BPE (real vocab size kept)", dist=dist)
                processor = build_tiny_processor(family, list(corpus) or tiny.tokenizer_corpus([]))
            processor.image_processor = image_processor(family, args.min_pixels, args.max_pixels)
            torch.manual_seed(args.seed)
            # initialised where a one-process run initialises them (its RNG stream), then moved: the same weights
            with torch.device("meta" if meta else dist.device):
                model = AutoModelForImageTextToText.from_config(real_config(name, processor.tokenizer, args.layers),
                                                                dtype=dtype, attn_implementation="sdpa")
            return vision_attention(model if meta else model.to(device), dist.device), processor, family
        path = hub_id
    elif Path(name).exists():
        family, path = model_family(name), name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        path = name
        family = "qwen3_vl" if "qwen3" in name.lower() else "qwen2_5_vl"
    else:
        raise UserError(f"unknown --model {name!r}: choose one of {', '.join(PRESETS)}, a model folder or a hub id")
    try:
        if meta:
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype,
                                                                attn_implementation="sdpa")
            try:      # what from_pretrained reads besides the weights: the eos ids that end a generation
                model.generation_config = GenerationConfig.from_pretrained(path)
            except OSError:
                pass
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot load model {name}: {str(error).splitlines()[0]}{remake}") from None
    return vision_attention(model if meta else model.to(device), dist.device), load_processor(path, family), family


# Bytes of one broadcast piece while loading a sharded model: what a rank other than 0 holds beyond its shards.
BROADCAST_PIECE_BYTES = 64 << 20


def load_sharded_model(args, dist, corpus=()):
    """(model, processor, family) under torchrun: the model sharded with FSDP2 and loaded once, for any --model.

    Every rank builds the architecture on the meta device (no memory), shards it and allocates its own shards; rank
    0 alone loads or initialises the full model in host memory, exactly as a one-process run does (the same weights
    for the same seed), and broadcasts it into everyone's shards. Host memory holds one full fp32 copy in the run
    (rank 0's) instead of one per rank: 33 GB for 7B, which eight ranks each building it made ~265 GB per node.
    torch's set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True) does the same broadcast a whole
    tensor at a time, so every rank would hold the largest tensor in full (the 7B embedding, 2.2 GB; on gloo in
    host memory, more than a rank's shards at a few layers); here each tensor goes in pieces of
    BROADCAST_PIECE_BYTES and each rank keeps the rows of its shard. Gradient checkpointing is set on the skeleton
    before sharding, as run() does in one process."""
    source = on_every_rank(lambda: load_model(args, dist, corpus, device=torch.device("cpu"))[0]
                           if dist.rank == 0 else None, dist)
    model, processor, family = on_every_rank(lambda: load_model(args, dist, corpus, meta=True), dist)
    if args.gradient_checkpointing:   # non-reentrant: the variant FSDP2 supports
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = shard(model, dist.dtype, materialize=dist.device)
    broadcast_weights(source, model, dist)
    del source
    return model, processor, family


@torch.no_grad()
def broadcast_weights(source, model, dist):
    """Rank 0's full `source` (None elsewhere) into the FSDP2-sharded `model` of the same architecture on every rank:
    parameters and buffers (the rotary tables too), bit for bit, in pieces of at most BROADCAST_PIECE_BYTES. FSDP2
    shards dim 0 as torch.chunk does, so rank r keeps rows [r c, (r + 1) c) with c = ceil(rows / world)."""
    full = {**dict(source.named_parameters()), **dict(source.named_buffers())} if dist.rank == 0 else {}
    for name, target in [*model.named_parameters(), *model.named_buffers()]:
        local = target.to_local() if isinstance(target, DTensor) else target
        rows = target.shape[0] if target.dim() else 1
        begin, end = 0, rows
        if isinstance(target, DTensor):
            per_rank = -(-rows // dist.world)
            begin, end = min(dist.rank * per_rank, rows), min((dist.rank + 1) * per_rank, rows)
        width = target.numel() // max(rows, 1)
        local_rows = local.reshape(end - begin, width)
        step = max(1, BROADCAST_PIECE_BYTES // max(1, width * local.element_size()))
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            if dist.rank == 0:
                piece = full[name].reshape(rows, width)[start:stop].to(dist.device, local.dtype).contiguous()
            else:
                piece = torch.empty(stop - start, width, dtype=local.dtype, device=dist.device)
            torch_dist.broadcast(piece, src=0)
            low, high = max(start, begin), min(stop, end)
            if low < high:
                local_rows[low - begin:high - begin].copy_(piece[low - start:high - start])

# ---------------------------------------------------------------------------------------------------------------
# Prompts: records to model inputs (grpo.encode_prompts), never cut, unreadable ones skipped and counted

def to_device(batch, device):
    """The batch on `device`, except images_per_sample (bookkeeping) and pixel_values. A GRPO step's pixels in fp32
    are ~3 GiB on one GPU at the recipe's 256 prompts (~1.8 images of ~6.8 MB each at 512 px; 8 GiB if all were
    crop prompts): they stay in host memory and go to the device one prefill or micro-batch at a time
    (grpo._model_inputs, grpo._sample, grpo.pack)."""
    return {key: value if key in ("images_per_sample", "pixel_values") else value.to(device)
            for key, value in batch.items()}


def prompt_length(processor, record, min_pixels, max_pixels, size=None):
    """Prompt tokens of a record from its image sizes (headers only, or every image `size` when given: resized
    first), without decoding the pixels."""
    text = grpo.prompt_text(processor, record["problem"], record.get("format_prompt", True))
    text_tokens = len(processor.tokenizer(text)["input_ids"])
    merge = processor.image_processor.merge_size ** 2
    image_tokens = 0
    for item in record["images"]:     # a path, embedded bytes (tasks.EmbeddedImage) or a PIL image
        try:
            if size or isinstance(item, Image.Image):
                width, height = size or item.size
            else:
                with Image.open(tasks.image_file(item)) as image:
                    width, height = image.size
        except (OSError, ValueError) as error:
            raise tasks.BadRecord(f"record {record.get('id')}: cannot open {item}: {error}") from None
        patches = processor.image_processor.get_number_of_image_patches(
            height, width, {"min_pixels": min_pixels, "max_pixels": max_pixels})
        image_tokens += patches // merge - 1
    return text_tokens + image_tokens


def filter_records(processor, records, max_prompt_length, min_pixels, max_pixels, dist=None, what="records"):
    """Drop prompts over the limit and records whose images are missing, with counts (prompts are never cut)."""
    kept, too_long, bad = [], 0, 0
    for record in records:
        try:
            length = prompt_length(processor, record, min_pixels, max_pixels)
        except tasks.BadRecord as error:
            bad += 1
            if bad <= 3:
                print0(f"skip: {error}", dist=dist)
            continue
        if length > max_prompt_length:
            too_long += 1
        else:
            kept.append(record)
    if too_long or bad:
        print0(f"{what}: dropped {too_long} prompts over {max_prompt_length} tokens and {bad} unreadable records; "
               f"{len(kept)} kept", dist=dist)
    if dist is not None:      # images one node cannot read would change its list, and so every rank's share
        check_same_data(dist, f"{what} records kept", kept)
    return kept


def open_batch(records):
    """Images of each record; records whose images cannot be read are skipped and counted."""
    kept, images, skipped = [], [], 0
    for record in records:
        try:
            images.append(tasks.open_images(record))
            kept.append(record)
        except tasks.BadRecord:
            skipped += 1
    return kept, images, skipped


def stand_in(records, start=0):
    """The first readable record from `start` on (wrapping round) with its images: what a rank whose share is all
    unreadable passes instead, so that it still reaches every collective (with weight 0, or as a counted
    replacement). Every rank would fail alike only if no record at all is readable."""
    for offset in range(len(records)):
        kept, images, _ = open_batch([records[(start + offset) % len(records)]])
        if kept:
            return kept[0], images[0]
    raise UserError("no record of the dataset has readable images")

# ---------------------------------------------------------------------------------------------------------------
# The SFT cold start

def sft_subset(records, fraction, seed):
    """The cold-start subset: a seeded random `fraction` of the training split (the paper: ~3,600 of 81k)."""
    count = max(1, round(len(records) * fraction))
    return random.Random(seed).sample(records, count) if count < len(records) else list(records)


def sft_examples(args, records):
    """The cold-start examples: every row of --sft-data (a cold-start file is used whole), else a seeded
    --sft-data-fraction of the training split."""
    return list(records) if args.sft_data else sft_subset(records, args.sft_data_fraction, args.seed)


def load_sft_data(args, dist, train):
    """The rows of --sft-data (tasks.load_cold_start), with one line on what was read, wrapped and skipped; None when
    the cold start draws from the training split. Release rows carry no meta, from which the program writes its
    reasonings: a dataset of such rows takes the release's own cold-start set, DATA/SFT-coldstart.json."""
    path = args.sft_data
    if not path and any(not record["meta"] for record in train):
        path = Path(args.data) / "SFT-coldstart.json"
        if not path.is_file():
            raise UserError(f"{args.data} has no metadata for program-written cold-start reasonings (the release's "
                            "rows): pass --sft-data path/to/SFT-coldstart.json")
        print0(f"sft-data: using {path}, the release's cold-start set", dist=dist)
        args.sft_data = str(path)        # saved with the checkpoints; sft_examples then takes the file whole
    if not path:
        return None
    problems = Counter()
    try:
        records, wrapped = tasks.load_cold_start(str(path), problems)
    except (OSError, ValueError) as error:     # tasks.BadRecord is a ValueError
        raise UserError(str(error).splitlines()[0]) from None     # the message names the file
    skipped = f"; skipped {sum(problems.values())} rows ({reasons(problems)})" if problems else ""
    if not records:
        raise UserError(f"--sft-data {path}: no usable rows{skipped}")
    print0(f"sft-data: {len(records)} cold-start rows from {path}" + (
        f"; {wrapped} outputs had no <think>...</think>: the text before their last \\boxed{{}} was wrapped in it"
        if wrapped else "") + skipped, dist=dist)
    return records


def reasons(problems, most=3):
    """The `most` common reasons of a Counter of skipped rows, on one line."""
    return "; ".join(f"{count} x {reason}" for reason, count in problems.most_common(most)) + (
        "; ..." if len(problems) > most else "")


def freeze_for_sft(model, freeze_vision_tower, freeze_projector):
    visual = model.model.visual
    mergers = [name for name, _ in visual.named_children() if "merger" in name]
    for name, module in visual.named_children():
        frozen = freeze_projector if name in mergers else freeze_vision_tower
        module.requires_grad_(not frozen)
    return [p for p in model.parameters() if p.requires_grad]


def sft_schedule(optimizer, args, total_steps):
    warmup = math.ceil(args.sft_warmup_ratio * total_steps)
    if args.sft_lr_scheduler_type == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def step_examples(examples, step, steps_per_epoch, global_batch, seed):
    """The global batch of optimizer step `step`: a seeded shuffle per epoch, so a step number is a data position."""
    epoch, index = divmod(step, steps_per_epoch)
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return epoch, [examples[i] for i in order[index * global_batch:(index + 1) * global_batch]]


def rank_micro_batches(share, micro_size, count):
    """`count` micro-batches of this rank's share; missing ones repeat an example with weight 0 so that every
    rank runs the same number of forward passes (FSDP collectives)."""
    batches = [(share[i:i + micro_size], 1.0) for i in range(0, len(share), micro_size)]
    return batches + [(share[:1] or [None], 0.0)] * (count - len(batches))


def train_sft(args, dist, model, processor, train_records, optimizer=None, scheduler=None, state=None, metrics=None):
    """The cold start: token-mean NLL of the cold-start answers through grpo's shared log-prob path.

    Loss over response tokens only, averaged over all response tokens of the global batch (micro-batches and
    ranks), as LLaMA-Factory's trainer does with gradient accumulation. Returns the optimizer step reached.
    """
    examples = sft_examples(args, train_records)
    steps_per_epoch = math.ceil(len(examples) / args.sft_global_batch_size)
    total_steps = max(1, math.ceil(args.sft_num_train_epochs * steps_per_epoch))
    micro_count = math.ceil(math.ceil(args.sft_global_batch_size / dist.world) / args.sft_micro_batch_size)
    step = state["step"] if state else 0
    print0(f"sft: {len(examples)} examples, {total_steps} steps of {args.sft_global_batch_size} "
           f"({micro_count} micro-batches of {args.sft_micro_batch_size} x {dist.world} ranks)", dist=dist)
    progress = Progress(total_steps, step, "sft", dist)
    model.train()
    while step < total_steps:
        started = time.perf_counter()
        epoch, batch = step_examples(examples, step, steps_per_epoch, args.sft_global_batch_size, args.seed)
        share = batch[dist.rank::dist.world]
        prepared, skipped = [], 0
        for records, weight in rank_micro_batches(share, args.sft_micro_batch_size, micro_count):
            kept, images, bad = open_batch([r for r in records if r is not None])
            skipped += bad
            if not kept:     # nothing readable: a weight-0 pass keeps the ranks' forward counts equal
                record, record_images = stand_in(examples)
                kept, images, weight = [record], [record_images], 0.0
            # a cold-start file's written answer, else the program's: its phrasing depends on (seed, step, example)
            # only, so the data is the same whatever the number of ranks, and on resume
            responses = [r.get("response")
                         or tasks.cold_start_response(r, random.Random(f"{args.seed}-{step}-{r['id']}")) for r in kept]
            prepared.append((kept, images, responses, weight))
        local_tokens = 0
        encoded = []
        for kept, images, responses, weight in prepared:
            completion_ids, completion_mask = grpo.encode_responses(processor.tokenizer, responses)
            local_tokens += int(completion_mask.sum()) * weight
            encoded.append((kept, images, completion_ids, completion_mask, weight))
        total_tokens, total_skipped = grpo.all_reduce([local_tokens, skipped], device=dist.device)
        loss_sum, task_sums = 0.0, defaultdict(lambda: [0.0, 0.0])
        for kept, images, completion_ids, completion_mask, weight in encoded:
            prompts = to_device(grpo.encode_prompts(processor, kept, images, args.sft_min_pixels,
                                                    args.sft_max_pixels), dist.device)
            logp = grpo.response_logprobs(model, prompts, completion_ids.to(dist.device),
                                          completion_mask.to(dist.device))                      # [B, R]
            mask = completion_mask.to(dist.device, logp.dtype)
            token_nll = -(logp * mask).sum(1)                                                  # [B]
            # FSDP averages gradients over ranks, hence the factor world: the result is the global token mean
            loss = token_nll.sum() * weight * dist.world / max(total_tokens, 1)
            loss.backward()
            loss_sum += float(token_nll.detach().sum()) * weight
            for record, nll, n in zip(kept, token_nll.detach().tolist(), mask.sum(1).tolist()):
                task_sums[record["task"]][0] += nll * weight
                task_sums[record["task"]][1] += n * weight
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   args.sft_max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        names = sorted(tasks.TASKS)
        sums = grpo.all_reduce([loss_sum] + [task_sums[t][i] for t in names for i in (0, 1)], device=dist.device)
        elapsed = time.perf_counter() - started
        row = {"stage": "sft", "step": step, "epoch": epoch, "loss": sums[0] / max(total_tokens, 1),
               "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens_per_second": total_tokens / elapsed, "step_time": elapsed, "skipped_records": total_skipped}
        for i, task in enumerate(names):
            if sums[2 + 2 * i]:
                row[f"loss/{task}"] = sums[1 + 2 * i] / sums[2 + 2 * i]
        if metrics:
            metrics.log(row)
        progress.update(row, every=args.logging_steps)
        if step % args.save_steps == 0 or step == total_steps:
            save_checkpoint(args, dist, model, processor, step, "sft", optimizer, scheduler)
    progress.close()
    return step


def run_sft(args, dist, model, processor, train, state, resume, metrics):
    """The cold start with its own optimizer, freed on return: GRPO's AdamW then holds the only fp32 Adam state
    (7B under FSDP on 8 GPUs: the SFT optimizer's 7.6 GB per GPU would otherwise stay alive through GRPO)."""
    parameters = freeze_for_sft(model, args.freeze_vision_tower, args.freeze_multi_modal_projector)
    optimizer = adamw(parameters, args.sft_learning_rate, args.sft_weight_decay, fused=dist.device.type == "cuda")
    examples = sft_examples(args, train)
    total = max(1, math.ceil(args.sft_num_train_epochs * math.ceil(len(examples) / args.sft_global_batch_size)))
    scheduler = sft_schedule(optimizer, args, total)
    if resume:
        load_trainer_state(resume, dist, model, optimizer, scheduler)
    if state and state["step"] >= total:
        return state["step"]
    return train_sft(args, dist, model, processor, train, optimizer, scheduler, state, metrics)

# ---------------------------------------------------------------------------------------------------------------
# The GRPO loop (grpo.grpo_step does the algorithm)

def reference_like(model, dist, offload=False):
    """An empty frozen model of the policy's architecture for the KL reference: in the compute dtype (it is never
    updated: bf16 halves it, 2 B per parameter), sharded like the policy so that its shards line up with the
    policy's rank by rank; its passes gather it once and reshard after (grpo.rollout_logprobs). Unsharded (one
    process, fp32): a copy of the policy."""
    if not isinstance(model, FSDPModule):
        import copy
        return copy.deepcopy(model).eval().requires_grad_(False)
    with torch.device("meta"):
        reference = AutoModelForImageTextToText.from_config(model.config, dtype=dist.dtype,
                                                            attn_implementation="sdpa")
    # the policy's vision attention (vision_attention's choice, set the way it sets it)
    reference.model.visual.config._attn_implementation = model.model.visual.config._attn_implementation
    reference = shard(reference.eval().requires_grad_(False), dist.dtype, offload=offload,
                      materialize=torch.device("cpu") if offload else dist.device)
    buffers = dict(model.named_buffers())     # the rotary tables: in no state dict, the same in both models
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            buffer.copy_(buffers[name])
    return reference


@torch.no_grad()
def reference_from_policy(model, dist, offload=False):
    """The frozen KL reference: the policy as GRPO starts, copied in memory shard by shard (each rank its own; no
    disk, no collective), rounded to the compute dtype as loading the fp32 weights in bf16 would."""
    reference = reference_like(model, dist, offload)
    if isinstance(model, FSDPModule):
        policy = dict(model.named_parameters())
        for name, tensor in reference.named_parameters():
            source = policy[name]
            (tensor.to_local() if isinstance(tensor, DTensor) else tensor).copy_(
                source.to_local() if isinstance(source, DTensor) else source)
    return reference


def save_reference(args, dist, reference):
    """OUT/reference: the frozen reference's own (sharded, compute-dtype) weights with torch.distributed.checkpoint,
    every rank its shards, kept apart from the rotating checkpoints so that a resumed GRPO run finds them."""
    temp, leader = begin_folder(dist, args.out, "reference")
    save_trainer_state(temp, reference)
    return finish_folder(dist, args.out, "reference", temp, leader)


def load_reference(path, dist, model, offload=False):
    """The reference save_reference wrote, for a resumed GRPO run, sharded like `model` (the policy)."""
    if not path or not (Path(path) / ".metadata").is_file():
        raise UserError(f"GRPO reference model {path} is missing; restart the GRPO stage without --resume")
    reference = reference_like(model, dist, offload)
    load_saved_state(path, reference)
    return reference


def rollout_prompts(args, dist, records, step, steps_per_epoch):
    """This rank's prompts of GRPO step `step` (a seeded shuffle per epoch, so the step is the data position) with
    their images. Unreadable records are counted and replaced by readable ones of the same share, because every
    rank must pass the same number of prompts to the collective passes."""
    _, batch = step_examples(records, step, steps_per_epoch, args.rollout_batch_size, args.seed + 1)
    share = batch[dist.rank::dist.world]
    kept, images, skipped = open_batch(share)
    if not kept:
        record, record_images = stand_in(records, start=step * args.rollout_batch_size + dist.rank)
        kept, images = [record], [record_images]
    readable = len(kept)
    for i in range(len(share) - readable):
        kept.append(kept[i % readable])
        images.append(images[i % readable])
    return kept, images, skipped


def write_rollouts(args, dist, step, records, rollouts):
    """OUT/rollouts/step-N.jsonl: every rank's rollouts with the record id and image paths, written by rank 0."""
    for rollout in rollouts:
        record = records[rollout["index"]]
        rollout.update(id=record["id"], images=[str(p) for p in record["images"]], rank=dist.rank)
    rollouts = gather_objects(rollouts, dist)
    if dist.rank == 0:
        folder = Path(args.out) / "rollouts"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"step-{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts))


def train_grpo(args, dist, model, processor, train_records, held_out, state, metrics, first_step=0):
    """GRPO on the pretext tasks (grpo.grpo_step does the algorithm). Checkpoints are numbered on after the SFT
    steps (`first_step`), so that the newest checkpoint is always the one to resume from."""
    if args.rollout_batch_size % dist.world:
        raise UserError(f"--rollout-batch-size {args.rollout_batch_size} must be a multiple of the {dist.world} "
                        "ranks: each rank rolls out whole groups")
    if len(train_records) < args.rollout_batch_size:
        raise UserError(f"GRPO needs at least --rollout-batch-size {args.rollout_batch_size} training prompts; the "
                        f"dataset has {len(train_records)} (lower the flag or add data)")
    cfg = grpo.GRPOConfig(
        num_generations=args.num_generations, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_response_length, clip_low=args.clip_ratio_low, clip_high=args.clip_ratio_high,
        dual_clip=args.clip_ratio_dual, kl_coef=args.kl_coef,
        updates_per_step=args.rollout_batch_size // args.global_batch_size,
        rollout_engine=args.rollout_engine,
        rollout_micro_batch_size=(args.fallback_micro_batch if args.rollout_micro_batch_size == "auto"
                                  else args.rollout_micro_batch_size),
        auto_rollout_micro_batch=args.rollout_micro_batch_size == "auto", compile_decode=args.compile_decode,
        max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        shared_prompt=args.shared_prompt, max_grad_norm=args.max_grad_norm)
    model.requires_grad_(True)   # full-parameter RL, vision tower included (EasyR1 freeze_vision_tower: false)
    optimizer = adamw(model.parameters(), args.learning_rate, args.weight_decay, fused=dist.device.type == "cuda")
    scheduler = get_constant_schedule(optimizer)
    reference = reference_path = None
    if state and state["stage"] == "grpo":
        load_trainer_state(args.model, dist, model, optimizer, scheduler)
        grpo_step, first_step, reference_path = state["grpo_step"], state["first_step"], state["reference"]
        if args.kl_coef > 0:
            reference = load_reference(reference_path, dist, model, args.ref_offload)
    else:
        grpo_step = 0
        if args.kl_coef > 0:
            reference = reference_from_policy(model, dist, args.ref_offload)
            reference_path = save_reference(args, dist, reference)
    steps_per_epoch = max(1, len(train_records) // args.rollout_batch_size)
    print0(f"grpo: {args.max_steps} steps of {args.rollout_batch_size} prompts x {args.num_generations} responses, "
           f"{cfg.updates_per_step} update(s) per step, {len(train_records)} prompts", dist=dist)
    progress = Progress(args.max_steps, grpo_step, "grpo", dist)
    chosen = None      # auto: the prompts in flight last printed
    while grpo_step < args.max_steps:
        records, images, skipped = rollout_prompts(args, dist, train_records, grpo_step, steps_per_epoch)
        # each prompt's samples seeded by (seed, step, its index in the step's global batch: rank r holds r, r + world,
        # ...): the same rollouts on any number of ranks, with either engine, in reruns and resumed runs
        seeds = [f"{args.seed}-{grpo_step}-{dist.rank + i * dist.world}" for i in range(len(records))]
        batch = to_device(grpo.encode_prompts(processor, records, images, args.min_pixels, args.max_pixels), dist.device)
        step_metrics, rollouts = grpo.grpo_step(model, reference, optimizer, batch, [r["answer"] for r in records],
                                                [r["task"] for r in records], processor, cfg, seeds)
        scheduler.step()
        grpo_step += 1
        if grpo_step == 1 and step_metrics["format"] < 0.05:
            print0(f"WARNING: format rate {step_metrics['format']:.3f} at the first GRPO step: the policy almost never "
                   "writes <think>..</think> \\boxed{}; GRPO from here collapses (the paper's no-cold-start case). "
                   "Run the SFT cold start first (--stage all) or start from its checkpoint.", dist=dist)
        step = first_step + grpo_step
        row = {"stage": "grpo", "step": step, "grpo_step": grpo_step, "learning_rate": scheduler.get_last_lr()[0],
               "skipped_records": grpo.all_reduce([skipped], device=dist.device)[0], **step_metrics}
        metrics.log(row)
        if cfg.auto_rollout_micro_batch and row["rollout_micro_batch_size"] != chosen:
            chosen = row["rollout_micro_batch_size"]
            print0(f"grpo step {grpo_step}: {chosen:.0f} prompts in flight per rank (auto, from free memory)",
                   dist=dist)
        progress.update(row, every=args.logging_steps)
        if args.rollout_save_steps and grpo_step % args.rollout_save_steps == 0:
            write_rollouts(args, dist, grpo_step, records, rollouts)
        if args.eval_steps and grpo_step % args.eval_steps == 0 and grpo_step < args.max_steps:
            results = evaluate(args, dist, model, processor, held_out)
            metrics.log({"stage": "grpo", "step": step, **{f"eval/{key}/{task}": entry[key] for task, entry in
                                                           results.items() for key in ("accuracy", "format")}})
        if grpo_step % args.save_steps == 0 or grpo_step == args.max_steps:
            save_checkpoint(args, dist, model, processor, step, "grpo", optimizer, scheduler,
                            extra_state={"grpo_step": grpo_step, "first_step": first_step,
                                         "reference": reference_path and str(reference_path)})
    progress.close()
    return first_step + grpo_step

# ---------------------------------------------------------------------------------------------------------------
# Evaluation: one answer loop (`generate_answers`) for the held-out split, VLMEvalKit TSVs and the paper's benchmarks

# Batches of --eval-batch-size prompts that one engine call takes, --eval-batch-size of them in flight: a finished
# prompt's slot goes to the next prompt of the call, so the call waits for its longest answer once, not once per batch
# (their images are held at once). Greedy answers do not depend on it (tests/test_ssrl.py).
ENGINE_EVAL_BATCHES = 4


def decode_options(args, batch_size):
    """generate_completions' engine keywords in evaluation: the engine with `batch_size` prompts in flight (hf: per
    generate call) and prefills of at most --max-tokens-per-micro-batch padded tokens."""
    return dict(engine=args.rollout_engine, compile_decode=args.compile_decode, micro_batch_size=batch_size,
                max_prefill_tokens=args.max_tokens_per_micro_batch)


def eval_batch_size(args, dist, model, processor, records, min_pixels, max_pixels, resize=None, samples=0):
    """--eval-batch-size, or with auto: on CUDA as many prompts in flight as fit the free memory with the model
    gathered (grpo.memory_micro_batch, max(1, `samples`) responses of up to --max-response-length each: the sampled
    pass holds K slots per prompt, the greedy one 1) at the longest prompt of
    `records` (from their image headers; --max-prompt-length when none can be read), printed; elsewhere
    FALLBACK_EVAL_BATCH."""
    if args.eval_batch_size != "auto":
        return args.eval_batch_size
    if dist.device.type != "cuda" or not records:
        return FALLBACK_EVAL_BATCH
    longest = 0
    for record in records:
        try:
            longest = max(longest, prompt_length(processor, record, min_pixels, max_pixels, resize))
        except tasks.BadRecord:
            pass
    longest = longest or args.max_prompt_length
    size = grpo.memory_micro_batch(model, dist.device, longest, max(1, samples), args.max_response_length,
                                   FALLBACK_EVAL_BATCH, len(records), args.rollout_engine,
                                   args.max_tokens_per_micro_batch)
    print(f"eval (rank {dist.rank}): {size} prompts in flight (auto, {longest}-token prompts)", flush=True)
    return size


def generate_greedy(model, processor, batch, max_new_tokens, **options):
    """Greedy completions [B, R] for an encoded prompt batch, through grpo's rollout function (temperature 0)."""
    tokenizer = processor.tokenizer
    completion_ids, _, _ = grpo.generate_completions(model, batch, 1, max_new_tokens, 0.0, 1.0,
                                                     tokenizer.eos_token_id, tokenizer.pad_token_id, **options)
    return completion_ids


def call_batches(records, size):
    """Records in generate calls of at most `size` prompts and 5 x `size` images (a batch of 5-image crop prompts):
    a VSI-Bench prompt of 128 frames goes alone."""
    batches, images = [], 0
    for record in records:
        count = len(record["images"])
        if batches and len(batches[-1]) < size and images + count <= 5 * size:
            batches[-1].append(record)
            images += count
        else:
            batches.append([record])
            images = count
    return batches


@torch.no_grad()
def generate_answers(args, dist, model, processor, records, min_pixels, max_pixels, samples=0, temperature=1.0,
                     resize=None, sort_key=None):
    """This rank's strided share of `records` answered on the model gathered once: greedily, and with `samples`
    K > 0 also K responses each at `temperature`, a record's K drawn from its own seed "--seed:record id"
    (grpo.generate_completions), so that a seed gives the same samples whatever the batching, the number of ranks or
    the engine, and the greedy answers and the global RNG are the same as without them.

    Prompts go --eval-batch-size per generate call (`call_batches`; ENGINE_EVAL_BATCHES times as many on the engine,
    --eval-batch-size in flight), sorted by `sort_key` (largest first), their images opened per call (and resized
    to `resize` first); unreadable ones are skipped and counted. Returns [(record, greedy text, [sampled texts])] and
    that count. No collective inside, so a rank whose records are unreadable (or fewer) cannot stall the others."""
    was_training = model.training
    model.eval()
    tokenizer = processor.tokenizer
    share = records[dist.rank::dist.world]
    answers, skipped = [], 0
    with grpo.gathered(model):
        batch_size = eval_batch_size(args, dist, model, processor, share, min_pixels, max_pixels, resize, samples)
        options = decode_options(args, batch_size)
        per_call = batch_size * (ENGINE_EVAL_BATCHES if args.rollout_engine == "ssrl" else 1)
        batches = call_batches(sorted(share, key=sort_key, reverse=True) if sort_key else share, per_call)
        progress = Progress(len(batches), 0, "eval", dist, leave=False)
        for chunk in batches:
            kept, images, bad = open_batch(chunk)
            skipped += bad
            if kept:
                if resize:
                    images = [[image.resize(resize) for image in group] for group in images]
                batch = to_device(grpo.encode_prompts(processor, kept, images, min_pixels, max_pixels), dist.device)
                greedy = tokenizer.batch_decode(generate_greedy(model, processor, batch, args.max_response_length,
                                                                **options), skip_special_tokens=True)
                sampled = [[] for _ in kept]
                if samples:
                    ids, _, _ = grpo.generate_completions(
                        model, batch, samples, args.max_response_length, temperature, 1.0, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, seeds=[f"{args.seed}:{record['id']}" for record in kept], **options)
                    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
                    sampled = [texts[i * samples:(i + 1) * samples] for i in range(len(kept))]
                answers += zip(kept, greedy, sampled)
            progress.update({})
    progress.close()
    model.train(was_training)
    return answers, skipped


@torch.no_grad()
def evaluate(args, dist, model, processor, records, min_pixels=None, max_pixels=None, samples=0, temperature=1.0):
    """Held-out records answered by `generate_answers`, longest prompts first (each generate call then pads to similar
    lengths: a mixed batch of 1- and 5-image prompts is ~60% left padding); per task and overall: reward, accuracy
    (greedy), format rate, n and chance, and with `samples` K > 0 the sampled answers' pass@1 (their mean accuracy:
    what GRPO maximises at T = 1) and pass@K (tasks.pass_at_k)."""
    min_pixels, max_pixels = min_pixels or args.min_pixels, max_pixels or args.max_pixels

    def length(record):
        try:
            return prompt_length(processor, record, min_pixels, max_pixels)
        except tasks.BadRecord:
            return 0      # unreadable ones last: they are skipped anyway
    answers, skipped = generate_answers(args, dist, model, processor, records, min_pixels, max_pixels, samples,
                                        temperature, sort_key=length)
    passes = sorted({1, samples}) if samples else []      # pass@1, and pass@K when K > 1
    keys = ["reward", "accuracy", "format"] + [f"pass@{k}" for k in passes]
    sums = defaultdict(lambda: dict.fromkeys(keys + ["n"], 0.0))
    for record, text, sampled in answers:
        score, entry = tasks.reward(text, record["answer"]), sums[record["task"]]
        entry["reward"] += score["overall"]
        entry["accuracy"] += score["accuracy"]
        entry["format"] += score["format"]
        entry["n"] += 1
        right = sum(int(tasks.reward(response, record["answer"])["accuracy"]) for response in sampled)
        for k in passes:
            entry[f"pass@{k}"] += tasks.pass_at_k(samples, right, k)
    names = sorted({r["task"] for r in records})
    fields = keys + ["n"]
    totals = grpo.all_reduce([sums[t][key] for t in names for key in fields] + [skipped], device=dist.device)
    results = {}
    for j, task in enumerate(names):
        figures = dict(zip(fields, totals[len(fields) * j:len(fields) * (j + 1)]))
        n = figures.pop("n")
        results[task] = {key: value / max(n, 1) for key, value in figures.items()}
        results[task].update(n=int(n), chance=tasks.TASKS[task].chance if task in tasks.TASKS else float("nan"))
    n_all = sum(r["n"] for r in results.values())
    results["all"] = {key: sum(r[key] * r["n"] for r in results.values()) / max(n_all, 1)
                      for key in keys + ["chance"]}
    results["all"]["n"] = n_all
    if samples:
        results["all"]["temperature"] = temperature
    if totals[-1]:
        print0(f"eval: skipped {int(totals[-1])} unreadable records", dist=dist)
    return results


def shown(value):
    """A figure with 3 decimals, or "-" where there is none (the chance of a task outside tasks.TASKS)."""
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def run_evaluation(args, dist, model, processor, held_out, stage, evaluations):
    results = evaluate(args, dist, model, processor, held_out, samples=args.eval_num_samples,
                       temperature=args.eval_temperature)
    evaluations[stage] = results
    if dist.rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"eval-{stage}.json").write_text(json.dumps(results, indent=1))
        figures = results["all"]
        sampled = f", pass@1 at T={args.eval_temperature:g} {figures['pass@1']:.3f}" if "pass@1" in figures else ""
        print0(f"\n{stage}: accuracy {figures['accuracy']:.3f} (chance {shown(figures['chance'])}){sampled}, "
               f"format {figures['format']:.3f}, reward {figures['reward']:.3f}")
    return results


def format_table(evaluations):
    """Markdown table of {"base": results, "sft": results, ...}: one row per task, the stages side by side; greedy
    accuracy, then the sampled pass@k where it was measured (pass@1 at T = 1 beside greedy), format and reward."""
    stages = list(evaluations)
    seen = {task for results in evaluations.values() for task in results}
    rows = [t for t in tasks.TASKS if t in seen] + sorted(seen - set(tasks.TASKS) - {"all"}) + ["all"]
    passes = sorted({key for results in evaluations.values() for key in results.get("all", {})
                     if key.startswith("pass@")}, key=lambda key: int(key[5:]))
    temperature = next((r["all"]["temperature"] for r in evaluations.values() if "temperature" in r.get("all", {})),
                       None)
    keys = ["accuracy"] + passes + ["format", "reward"]
    labels = {key: f"{key} (T={temperature:g})" for key in passes}
    labels.update({"accuracy": "accuracy (greedy)"} if passes else {})      # named apart only when both are there
    header = ["task", "n", "chance"] + [f"{labels.get(key, key)} {stage}" for key in keys for stage in stages]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in rows:
        results = [evaluations[stage].get(task) for stage in stages]
        first = next(r for r in results if r)
        cells = [task, str(first["n"]), shown(first["chance"])]
        cells += [f"{r[key]:.3f}" if r and key in r else "-" for key in keys for r in results]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_tsv(args, dist, model, processor, path):
    """Accuracy and format rate of greedy answers on a VLMEvalKit multiple-choice TSV: its prompt and answer
    matching (tasks.read_mcq, tasks.score_mcq), as 3DSRBench and SpatialEval under --eval-bench."""
    records = tasks.read_mcq(str(path))
    answers, skipped = generate_answers(args, dist, model, processor, records, args.min_pixels, args.max_pixels)
    correct = sum(tasks.score_mcq(text, record)[0] for record, text, _ in answers)
    formatted = sum(tasks.reward(text, record["answer"])["format"] for record, text, _ in answers)
    correct, formatted, n, skipped = grpo.all_reduce([correct, formatted, len(answers), skipped], device=dist.device)
    return {"accuracy": correct / max(n, 1), "format": formatted / max(n, 1), "n": int(n), "skipped": int(skipped)}


def run_benchmarks(args, dist, model, processor):
    """--eval-bench: each benchmark read from the user's files (its official prompt), answered greedily at its
    official pixel range (the run's for a tiny model), scored by its own rule; OUT/bench-NAME.json holds the figures
    and every response; rank 0 prints the Table 1 row beside the paper's for this preset. Returns {name: result}."""
    results = {}
    for name, path in args.eval_bench.items():
        spec = tasks.BENCHMARKS[name]
        try:
            records = spec.read(path, frames=args.vsi_frames) if name == "vsi-bench" else spec.read(path)
        except (OSError, ValueError, ImportError) as error:    # tasks.BadRecord is a ValueError
            raise UserError(f"--eval-bench {name}: {str(error).splitlines()[0]}") from None
        pixels = (args.min_pixels, args.max_pixels) if args.tiny or spec.pixels is None else spec.pixels
        print0(f"{name}: {len(records)} questions from {path}", dist=dist)
        answers, skipped = generate_answers(args, dist, model, processor, records, *pixels, resize=spec.resize,
                                            sort_key=lambda record: (len(record["images"]), len(record["problem"])))
        entries = []
        for record, text, _ in answers:
            score, prediction = spec.score(text, record)
            entries.append({"id": record["id"], "task": record["task"], "answer": record["answer"], "response": text,
                            "prediction": prediction, "score": score,
                            **({"qid": record["meta"]["qid"]} if record["meta"].get("qid") else {})})
        order = {record["id"]: i for i, record in enumerate(records)}
        entries = sorted(gather_objects(entries, dist), key=lambda entry: order[entry["id"]])
        skipped = int(grpo.all_reduce([skipped], device=dist.device)[0])
        results[name] = {"benchmark": name, "file": str(path), **tasks.summarize_benchmark(name, entries, records),
                         "skipped": skipped, "pixels": list(pixels), "responses": entries}
        if dist.rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"bench-{name}.json").write_text(json.dumps(results[name], indent=1))
    if dist.rank == 0 and results:
        print0("\n" + benchmark_table(results, paper_preset(args, model)))
        print0(f"responses and per-category figures: {Path(args.out)}/bench-<name>.json")
    return results


def paper_preset(args, model):
    """The preset whose paper figures (tasks.PAPER_TABLE1) belong beside this model's: the --model preset, else
    the architecture's family and width (a checkpoint of a preset, or --init random of one)."""
    if args.model in tasks.PAPER_TABLE1:
        return args.model
    config = model.config
    width = getattr(getattr(config, "text_config", config), "hidden_size", None)
    return {("qwen2_5_vl", 2048): "qwen2.5-vl-3b", ("qwen2_5_vl", 3584): "qwen2.5-vl-7b",
            ("qwen3_vl", 2560): "qwen3-vl-4b"}.get((config.model_type, width))


def benchmark_table(results, preset=None):
    """Table 1's layout: one column per benchmark run and their plain mean, this model's row and the paper's rows
    for `preset` (its base and Spatial-SSRL model) on the same columns; percentages as the paper prints them."""
    names = [name for name in tasks.BENCHMARKS if name in results]
    index = {name: i for i, name in enumerate(tasks.BENCHMARKS)}
    average = "Avg" if len(names) == len(tasks.BENCHMARKS) else f"Avg of {len(names)}"
    header = ["model"] + [tasks.BENCHMARKS[name].column for name in names] + [average]
    rows = [["this model"] + [100 * results[name]["score"] for name in names]]
    for label, figures in tasks.PAPER_TABLE1.get(preset, {}).items():
        rows.append([f"paper: {label}"] + [figures[index[name]] for name in names])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        mean = sum(row[1:]) / len(row[1:])
        lines.append("| " + " | ".join([row[0]] + [f"{value:.2f}" for value in row[1:] + [mean]]) + " |")
    extras = [f"{name}: " + ", ".join(f"{key} {100 * results[name][key]:.2f}" for key in
                                      ("flip_eval", "circ_eval", "flip_circ_eval", "delta_1.5", "vsi_bench_overall")
                                      if key in results[name]) for name in names]
    notes = ["n: " + ", ".join(f"{name} {results[name]['n']}" for name in names)]
    notes += [line for line in extras if not line.endswith(": ")]
    skipped = [f"{name} {results[name]['skipped']}" for name in names if results[name]["skipped"]]
    notes += [f"skipped (unreadable images): {', '.join(skipped)}"] if skipped else []
    if preset is None:
        notes.append("no paper figures beside it: Table 1 covers " + ", ".join(tasks.PAPER_TABLE1))
    return "\n".join(lines + [""] + notes)
# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and metrics

def consolidated_weights(model, dtype, dist):
    """The model's full state dict in `dtype` in rank 0's host memory (None on the other ranks): what
    from_pretrained loads. Under FSDP2 each tensor is all-gathered on the device in turn (every rank takes part)
    and only rank 0 keeps it, cast: rank 0 holds 2 B per parameter in bf16 (16.6 GB for 7B), not the 100 GB of fp32
    weights and Adam state of a full trainer state. Tied tensors are gathered once."""
    weights, done = {}, {}
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in done:
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
                done[id(tensor)] = (full.to("cpu", dtype if full.is_floating_point() else full.dtype)
                                    if dist.rank == 0 else None)
            weights[name] = done[id(tensor)]
    return weights if dist.rank == 0 else None


@contextlib.contextmanager
def one_process_checkpoint():
    """Quiet torch.distributed.checkpoint's warning that one process without a process group saves or loads in one
    process: what a one-process run means to do, at every save."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_trainer_state(folder, model, optimizer=None):
    """fp32 master weights and AdamW state with torch.distributed.checkpoint: every rank writes its own shards in
    parallel (one file per rank), and a checkpoint written by W ranks loads on any number (DCP reshards on load).
    One process without a process group writes the same format. An optimizer that never stepped has no state to
    save (asking torch for it would initialise it with a zero step, which a straight run never takes). Returns
    whether the optimizer's state was saved."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None and optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with one_process_checkpoint():
        dcp.save(state, checkpoint_id=str(folder), no_dist=not torch_dist.is_initialized())
    return "optimizer" in state


def load_saved_state(folder, model, optimizer=None):
    """save_trainer_state's inverse, on any number of ranks: the model's weights (and the optimizer's state)
    replaced by the saved ones, bit for bit, each rank reading the pieces of its own shards."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with one_process_checkpoint():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not torch_dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def rng_states():
    return {"python": json.dumps(random.getstate()), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)}


def set_rng_states(states):
    version, internal, gauss = json.loads(states["python"])
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"].numel():
        torch.cuda.set_rng_state(states["cuda"])


def begin_folder(dist, out, name):
    """OUT/.tmp-NAME, empty, made by the leader of each disk (disk_leader) while the others wait; returns (temp,
    leader). Every rank then writes its part into its own disk's copy. (A folder one rank writes alone takes
    tasks.written_atomically; this is that, for many writers.)"""
    leader = disk_leader(dist, out)
    temp = Path(out) / f".tmp-{name}"
    if leader == dist.rank:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    if dist.world > 1:
        torch_dist.barrier()
    return temp, leader


def finish_folder(dist, out, name, temp, leader, keep=None):
    """After every rank wrote its part: each disk's leader renames OUT/.tmp-NAME to OUT/NAME (a crash never leaves a
    half folder under the real name) and, with `keep`, deletes all but the newest `keep` checkpoint-N folders there.
    On a disk the nodes do not share, the folder holds that node's shards only (no trainer_state.json: not a
    checkpoint to resume from; copied into rank 0's folder, the files make it whole)."""
    if dist.world > 1:
        torch_dist.barrier()
    final = Path(out) / name
    if leader == dist.rank:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        if keep:
            folders = [p for p in Path(out).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
            for old in sorted(folders, key=checkpoint_step)[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    if dist.world > 1:
        torch_dist.barrier()
    return final


def save_checkpoint(args, dist, model, processor, step, stage, optimizer=None, scheduler=None, extra_state=None):
    """OUT/checkpoint-STEP: a from_pretrained folder (safetensors in --save-dtype, config, tokenizer, chat template),
    written by rank 0, and the trainer state: fp32 master weights and AdamW state under trainer/ (every rank writes
    its shards in parallel; it resumes on any number of ranks), scheduler and every rank's RNG in trainer.pt, and
    trainer_state.json (step, stage, flags, `extra_state` such as a data position), written last.

    Written to a hidden temp folder and renamed when complete (begin_folder, finish_folder), so a crash never leaves
    a half checkpoint under the real name; only then are checkpoints beyond --save-limit deleted, oldest first.
    """
    save_dtype = SAVE_DTYPES[args.save_dtype]
    temp, leader = begin_folder(dist, args.out, f"checkpoint-{step}")
    weights = consolidated_weights(model, save_dtype, dist)
    has_optimizer = save_trainer_state(temp / "trainer", model, optimizer)
    rng = gather_objects([rng_states()], dist)     # every rank's, in rank order
    if dist.rank == 0:
        model.save_pretrained(temp, state_dict=weights, safe_serialization=True)
        config = json.loads((temp / "config.json").read_text())     # the dtype the weights are in, for loaders
        (temp / "config.json").write_text(json.dumps({**config, "dtype": str(save_dtype).split(".")[-1]},
                                                     indent=2, sort_keys=True) + "\n")
        processor.save_pretrained(temp)
        torch.save({"scheduler": scheduler.state_dict() if scheduler else None, "rng": rng}, temp / "trainer.pt")
        state = {"step": step, "stage": stage, "world": dist.world, "optimizer_state": has_optimizer,
                 "args": vars(args), **(extra_state or {})}
        (temp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
    del weights
    return finish_folder(dist, args.out, f"checkpoint-{step}", temp, leader,
                         keep=args.save_limit if args.save_limit > 0 else None)


def checkpoint_step(path):
    return int(path.name.split("-")[-1])


def checkpoints(out):
    """Complete checkpoints under `out` (a folder has its real name only once complete)."""
    return [p for p in Path(out).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()]


def resolve_resume(args):
    """The checkpoint folder to resume from, or None; a half-written one is an error, never a silent restart."""
    if not args.resume:
        return None
    if args.resume == "auto":
        found = sorted(checkpoints(args.out), key=checkpoint_step)
        return found[-1] if found else None
    path = Path(args.resume)
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such checkpoint folder")
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {path}: checkpoint is incomplete (no trainer_state.json); use an earlier one")
    return path


def agree_on_resume(args, dist):
    """(checkpoint folder, its trainer_state.json) to resume from, or (None, None), as rank 0 finds them, on every
    rank: each node resolving --resume on its own could resume GRPO on one node while another starts from the base
    model, and the collectives would no longer match. Resuming reads the checkpoint (and the GRPO reference) on
    every rank, so every rank checks that it sees each of rank 0's files there, with the same size; if any does
    not, every rank stops with one line naming what is missing, instead of some ranks waiting forever."""
    def resolve():
        found = resolve_resume(args)
        if found is None:
            return None
        state = json.loads((found / "trainer_state.json").read_text())
        folders = [found] + ([Path(state["reference"])] if state.get("reference") else [])
        files = [(str(path), path.stat().st_size) for folder in folders for path in sorted(folder.rglob("*"))
                 if path.is_file()]
        return str(found), state, files
    found = broadcast_object(on_every_rank(lambda: resolve() if dist.rank == 0 else None, dist), dist)
    if found is None:
        return None, None
    path, state, files = found
    missing = [name for name, size in files if not (Path(name).is_file() and Path(name).stat().st_size == size)]
    reports = gather_objects([[missing[0], len(missing)] if missing else None], dist)
    blind = [rank for rank, report in enumerate(reports) if report]
    if blind:
        first, count = reports[blind[0]]
        ranks = f"rank {blind[0]}" + (f" and {len(blind) - 1} other rank(s)" if len(blind) > 1 else "")
        raise UserError(f"--resume {path}: {ranks} cannot see {first}" + (f" (and {count - 1} more files)" if count > 1
                        else "") + ": resuming reads the checkpoint on every rank, so --out must be on a disk every "
                        "node shares (or copy every node's checkpoint files into each node's folder)")
    return Path(path), state


def load_trainer_state(path, dist, model, optimizer=None, scheduler=None):
    """Restore the fp32 master weights, the optimizer's state (saved with torch.distributed.checkpoint, on any
    number of ranks), the scheduler and this rank's RNG from a checkpoint; returns trainer_state.json's dict. The
    weights come from the trainer state, not the safetensors beside it (those may be bf16). Each rank reads only
    the pieces of its own shards."""
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    if not (Path(path) / "trainer" / ".metadata").is_file():
        raise UserError(f"{path} holds no sharded trainer state (trainer/): an older ssrl.py wrote it; resume with "
                        f"that version, or start the next stage from its weights with --model {path}")
    with_optimizer = optimizer is not None and state.get("optimizer_state", True)
    load_saved_state(Path(path) / "trainer", model, optimizer if with_optimizer else None)
    trainer = torch.load(Path(path) / "trainer.pt", weights_only=True, map_location="cpu")
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    rng = trainer["rng"]
    set_rng_states(rng[dist.rank] if dist.rank < len(rng) else rng[0])
    return state


class Metrics:
    """OUT/metrics.jsonl, one JSON object per step (rank 0). On resume, rows past the resumed step are dropped.
    --report-to tensorboard / wandb also sends each row's numbers there (the package is imported only then)."""

    def __init__(self, out, dist, resume_stage=None, resume_step=None, report_to="none", config=None):
        self.path, self.enabled = Path(out) / "metrics.jsonl", dist.rank == 0
        self.tensorboard = self.wandb = None
        if self.enabled and resume_stage and self.path.exists():
            order = ("sft", "grpo")
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            keep = [r for r in rows if "stage" not in r or (order.index(r["stage"]), r.get("step", 0)) <=
                    (order.index(resume_stage), resume_step)]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if report_to == "tensorboard":     # imported on every rank, so that a missing package stops all of them
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") \
                    from None
            self.tensorboard = SummaryWriter(Path(out) / "tensorboard") if self.enabled else None
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise UserError("--report-to wandb needs the wandb package: pip install wandb") from None
            self.wandb = (wandb.init(project="ssrl", dir=str(out), config=config, resume="allow") if self.enabled
                          else None)

    def log(self, row):
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        numbers = {f"{row.get('stage', 'eval')}/{key}": value for key, value in row.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])


class Progress:
    """A tqdm bar on rank 0 with the key figures, and a plain line every `every` steps."""

    KEYS = ("loss", "reward", "accuracy", "format", "learning_rate", "grad_norm", "tokens_per_second")

    def __init__(self, total, initial, desc, dist, leave=True):
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=dist.rank != 0, leave=leave,
                        dynamic_ncols=True, file=sys.stderr)

    def update(self, row, every=0):
        figures = {k: f"{row[k]:.3g}" for k in self.KEYS if k in row}
        if figures:
            self.bar.set_postfix(figures, refresh=False)
        self.bar.update(1)
        if every and row.get("step", 0) % every == 0 and not self.bar.disable:
            self.bar.write(f"{row.get('stage', '')} step {row['step']}: " + " ".join(f"{k} {v}" for k, v in figures.items()))

    def close(self):
        self.bar.close()


def plot_metrics(run_dir):
    """RUN_DIR/metrics.jsonl -> RUN_DIR/metrics.png: one panel per figure, one line per stage (a colour each), and
    the held-out accuracy per task after each stage (eval-<stage>.json) beside chance."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = [k for k in ("loss", "reward", "accuracy", "format", "kl", "grad_norm", "learning_rate",
                        "completions/mean_length") if any(k in r for r in rows)]
    evaluations = {stage: json.loads((Path(run_dir) / f"eval-{stage}.json").read_text())
                   for stage in ("base", "sft", "grpo") if (Path(run_dir) / f"eval-{stage}.json").is_file()}
    # held-out greedy accuracy per task across GRPO: the cold start's, every --eval-steps, and the end's
    curves = defaultdict(list)
    grpo_steps = [r["step"] for r in rows if r.get("stage") == "grpo" and "grpo_step" in r]
    if grpo_steps and any(key.startswith("eval/accuracy/") for r in rows for key in r):
        marks = [(grpo_steps[0] - 1, evaluations.get("sft"))] + [
            (r["step"], {key.split("/")[-1]: {"accuracy": value} for key, value in r.items()
                         if key.startswith("eval/accuracy/")}) for r in rows if "eval/accuracy/all" in r]
        for step, results in marks + [(grpo_steps[-1], evaluations.get("grpo"))]:
            for task in [t for t in tasks.TASKS if results and t in results]:
                curves[task].append((step, results[task]["accuracy"]))
    panels = len(keys) + bool(evaluations) + bool(curves)
    columns = min(panels, 4) or 1
    rows_of_panels = -(-panels // columns) or 1
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(4 * columns, 3.2 * rows_of_panels), squeeze=False)
    colours = {"pretrain": "C2", "sft": "C0", "grpo": "C1", "base": "C7"}
    for axis in axes.flat[panels:]:
        axis.axis("off")
    for axis, key in zip(axes.flat, keys):
        for stage in dict.fromkeys(r.get("stage", "") for r in rows):
            points = [(r["step"], r[key]) for r in rows if r.get("stage", "") == stage and key in r]
            if points:
                axis.plot(*zip(*points), label=stage, linewidth=1, color=colours.get(stage))
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.legend()
    if evaluations:
        axis = axes.flat[len(keys)]
        names = [t for t in tasks.TASKS if any(t in e for e in evaluations.values())] + ["all"]
        width = 0.8 / len(evaluations)
        for i, (stage, results) in enumerate(evaluations.items()):
            axis.bar([x + i * width for x in range(len(names))], [results.get(t, {}).get("accuracy", 0) for t in names],
                     width, label=stage, color=colours[stage])
        chance = [next(e[t]["chance"] for e in evaluations.values() if t in e) for t in names]
        axis.scatter([x + 0.4 - width / 2 for x in range(len(names))], chance, marker="_", s=300, color="k",
                     label="chance", zorder=3)
        axis.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=30)
        axis.set_title("held-out accuracy")
        axis.legend(fontsize="small")
    if curves:
        axis = axes.flat[len(keys) + bool(evaluations)]
        for i, (task, points) in enumerate(curves.items()):
            axis.plot(*zip(*points), marker="o", markersize=3, label=task, color=f"C{i}")
            axis.axhline(tasks.TASKS[task].chance, color=f"C{i}", linestyle=":", linewidth=0.8)
        axis.set_title("held-out accuracy in GRPO (dotted: chance)")
        axis.set_xlabel("step")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(Path(run_dir) / "metrics.png", dpi=100)
    plt.close(figure)
    return Path(run_dir) / "metrics.png"

# ---------------------------------------------------------------------------------------------------------------
# Main

def has_dataset(root):
    """train.jsonl is written last by tasks.build_dataset, so its presence marks a finished build."""
    return (Path(root) / "train.jsonl").is_file() or any(Path(root).glob("**/*.parquet"))


def prepare_data(args, dist):
    """(train, eval) records of the requested tasks; builds procedural data first when --data has none.

    Nodes need not share a disk: the data is read where it is built. When rank 0 has no dataset, the leader of
    every disk (disk_leader: rank 0 on a shared disk, each node's local rank 0 on local ones) builds it, the same
    bytes from the same seed. When rank 0 has one, every rank must see one too (a node that built procedural
    scenes beside someone's real data would train on other data): a missing one is reported at startup, and so are
    records that differ between ranks."""
    root = Path(args.data)
    present = gather_objects([has_dataset(root)], dist)
    if any(present) and not all(present):
        having = [rank for rank, found in enumerate(present) if found]
        lacking = [rank for rank, found in enumerate(present) if not found]
        raise UserError(f"{root}: rank(s) {', '.join(map(str, having[:4]))} have a dataset there and rank(s) "
                        f"{', '.join(map(str, lacking[:4]))} do not: copy it to every node or put --data on a disk "
                        "every node shares")
    if not present[0]:
        if disk_leader(dist, root) == dist.rank:
            print(f"building {args.per_task} train + {args.eval_per_task} eval samples per task of {args.max_side}-px "
                  f"procedural scenes in {root}" + (f" (rank {dist.rank})" if dist.world > 1 else "") + " ...",
                  flush=True)
            summary = tasks.build_dataset(root, per_task=args.per_task, eval_per_task=args.eval_per_task,
                                          tasks=args.tasks, seed=args.seed, max_side=args.max_side, overwrite=True,
                                          workers=torch.get_num_threads())
            print(f"built {summary['samples']} samples in {summary['seconds']:.0f} s", flush=True)
        if dist.world > 1:
            torch_dist.barrier()
    train, held_out = on_every_rank(lambda: read_data(args, dist, root), dist)
    check_same_data(dist, f"dataset in {root}", train, held_out)
    if args.eval_limit:     # the first N of each task, so that every run scores the same prompts
        by_task = defaultdict(list)
        for record in held_out:
            by_task[record["task"]].append(record)
        held_out = [r for records in by_task.values() for r in records[:args.eval_limit]]
    return train, held_out


def read_data(args, dist, root):
    """(train, eval) records of --tasks in the dataset at `root`, each split holding every task; a dataset without
    an eval split (the release) gets one held out (held_out_split)."""
    problems = Counter()    # rows skipped at load time; the same on every rank (each reads the same files)
    try:
        train = tasks.load_records(root, "train", problems)
        held_out = tasks.load_records(root, "eval", problems) if tasks.split_file(str(root), "eval") else None
    except (OSError, ValueError, ImportError) as error:     # tasks.BadRecord is a ValueError
        raise UserError(f"cannot read the dataset in {root}: {str(error).splitlines()[0]}") from None
    if problems:
        print0(f"data: skipped {sum(problems.values())} rows of {root}: {reasons(problems)}", dist=dist)
    if held_out is None:
        train, held_out = held_out_split(args, dist, root, train)
    train = [r for r in train if r["task"] in args.tasks]
    held_out = [r for r in held_out if r["task"] in args.tasks]
    for split, records in (("train", train), ("eval", held_out)):
        missing = [t for t in args.tasks if not any(r["task"] == t for r in records)]
        if missing:
            raise UserError(f"{root}: no {split} records for task(s) {', '.join(missing)} (choose --tasks)")
    return train, held_out


def held_out_files(args):
    """Where a held-out split drawn before is looked for: the run folder, then the folder of the checkpoint that
    --resume or --eval/--model names (its run folder)."""
    folders = [Path(args.out)]
    if args.resume and args.resume != "auto":
        folders.append(Path(args.resume).parent)
    if Path(args.model).is_dir():
        folders.append(Path(args.model).parent)
    return [folder / "held-out.json" for folder in folders]


def held_out_split(args, dist, root, records):
    """(train, held-out) of a dataset without an eval split (the release): --eval-per-task rows per task, seeded,
    disjoint by source image (tasks.hold_out). The held-out ids go to OUT/held-out.json, and a later --eval or
    --resume of the run reads them back instead of drawing anew, so every evaluation scores the same rows."""
    saved = next((path for path in held_out_files(args) if path.is_file()), None)
    if saved:
        state = json.loads(saved.read_text())
        if state.get("rows") != len(records):
            raise UserError(f"{saved} holds a split of {state.get('rows')} rows; {root} has {len(records)} usable "
                            "rows: remove the file (or choose another --out) to draw a new split")
        train, held_out, dropped = tasks.hold_out(records, ids=state["ids"])
        how = f"read from {saved}"
    else:
        train, held_out, dropped = tasks.hold_out(records, args.eval_per_task, args.seed)
        state = {"data": str(root), "rows": len(records), "eval_per_task": args.eval_per_task, "seed": args.seed,
                 "ids": [record["id"] for record in held_out]}
        how = f"{args.eval_per_task} per task, seed {args.seed}"
    path = Path(args.out) / "held-out.json"
    if dist.rank == 0 and saved != path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tasks.written_atomically(path) as temp:
            Path(temp).write_text(json.dumps(state, indent=1))
    counts = Counter(record["task"] for record in held_out)
    print0(f"data: {root} has no eval split: held out {len(held_out)} rows ({how}: "
           + ", ".join(f"{task} {counts[task]}" for task in sorted(counts))
           + f"), disjoint by source image ({dropped} training rows sharing one left out) -> {path}", dist=dist)
    return train, held_out


def check_same_data(dist, what, *splits):
    """Stop every rank with one line unless all ranks hold the same records (ids, tasks, answers, in order): ranks
    take their shares of one list by position, so nodes whose copies of the data differ (a file missing or
    different on one node, images one node cannot read) would silently train on other prompts than the data order
    says."""
    if dist.world == 1:
        return
    records = [record for split in splits for record in split]
    text = "\n".join(f"{r.get('id')}\t{r['task']}\t{r['answer']}" for r in records)
    seen = gather_objects([(len(records), zlib.crc32(text.encode()))], dist)
    differing = [rank for rank, value in enumerate(seen) if value != seen[0]]
    if differing:
        raise UserError(f"the {what} differ between ranks: rank 0 has {seen[0][0]} records, rank {differing[0]} "
                        f"{seen[differing[0]][0]} (or other ones): every node must read the same data and images")


def run_pretrain(args, dist):
    """--stage pretrain: a tiny preset's perception base from random weights (tiny.pretrain), into
    checkpoints/<preset> (or --out), its curves into runs/pretrain-<preset>."""
    if dist.world > 1:
        raise UserError("--stage pretrain runs in one process")
    if args.model not in PRESETS or PRESETS[args.model][1] is not None:
        raise UserError("--stage pretrain builds a tiny preset's base: --model tiny-qwen3-vl or tiny-qwen2.5-vl")
    default_out = args.out == build_parser().get_default("out")
    out = tiny.shipped_base(args.model) if default_out else Path(args.out)
    run_dir = Path("runs") / f"pretrain-{args.model}" if default_out else out.parent / f"pretrain-{out.name}"
    model, processor = build_tiny(PRESETS[args.model][0], tiny.pretrain_corpus(args.seed), seed=args.seed)
    tiny.pretrain(args, model, processor, out, Metrics(run_dir, dist, report_to=args.report_to, config=vars(args)).log)
    plot_metrics(run_dir)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        print(plot_metrics(args.plot))
        return
    dist = compute_init(args.dtype, args.ddp_timeout)
    try:
        run(args, dist)
        if dist.world > 1:   # ranks leave together: a gloo rank that tears down while another still talks aborts
            torch_dist.barrier()
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def run(args, dist):
    started = time.perf_counter()
    if args.compile_decode and (dist.device.type != "cuda" or args.rollout_engine != "ssrl"):
        raise UserError("--compile-decode captures the engine's decode step as a CUDA graph: it needs a GPU and "
                        "--rollout-engine ssrl")
    transformers_logging.disable_progress_bar()   # "Writing model shards" bars at each save
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.stage == "pretrain":
        run_pretrain(args, dist)
        return
    resume, state = agree_on_resume(args, dist)        # rank 0's choice of checkpoint and stage, on every rank
    if (args.stage == "eval" and (args.eval_tsv or args.eval_bench)
            and not broadcast_object(has_dataset(args.data), dist)):
        train, held_out = [], []     # only the benchmarks
    else:
        train, held_out = prepare_data(args, dist)
    if resume:
        print0(f"resuming from {resume} ({state['stage']} step {state['step']})", dist=dist)
        args.model = str(resume)
    sft_runs = args.stage in ("all", "sft") and (not state or state["stage"] == "sft")
    sft_records = load_sft_data(args, dist, train) if sft_runs else None
    tiny_build = args.model in PRESETS and args.init == "random"
    sample = random.Random(args.seed).sample(train, min(len(train), 2000)) if tiny_build else []
    if tiny_build and sft_records:
        sample += random.Random(args.seed).sample(sft_records, min(len(sft_records), 500))
    corpus = tiny.tokenizer_corpus(sample, args.seed)
    if args.ref_offload and dist.device.type != "cuda":
        print0("note: --ref-offload does nothing without a GPU (the reference is in host memory already)", dist=dist)
        args.ref_offload = False
    if args.ref_offload and not dist.sharded:
        raise UserError("--ref-offload needs a sharded reference: run under torchrun or with --dtype bf16")
    if dist.world > 1:        # built on the meta device, checkpointed, sharded, loaded once from rank 0
        model, processor, family = load_sharded_model(args, dist, corpus)
    else:
        model, processor, family = load_model(args, dist, corpus)
        if args.gradient_checkpointing:   # non-reentrant: the variant FSDP2 supports
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if dist.sharded:
            model = shard(model, dist.dtype)
    sft_pixels = (args.sft_min_pixels, args.sft_max_pixels)
    if args.stage in ("all", "sft") and sft_records is None:
        train = filter_records(processor, train, args.max_prompt_length, *sft_pixels, dist, "train")
    elif args.stage in ("all", "sft"):
        sft_records = filter_records(processor, sft_records, args.max_prompt_length, *sft_pixels, dist, "sft-data")
    held_out = filter_records(processor, held_out, args.max_prompt_length, args.min_pixels, args.max_pixels, dist, "eval")
    metrics = Metrics(args.out, dist, state and state["stage"], state and state["step"], args.report_to, vars(args))
    evaluations, sft_steps = {}, 0
    for stage in ("base", "sft", "grpo"):   # earlier evaluations of a resumed run
        path = Path(args.out) / f"eval-{stage}.json"
        if resume and path.is_file():
            evaluations[stage] = json.loads(path.read_text())
    if args.stage == "eval" and held_out:   # named after the checkpoint's stage (eval-sft.json ...), else eval-base.json
        saved = Path(args.model) / "trainer_state.json"
        name = json.loads(saved.read_text())["stage"] if saved.is_file() else "base"
        run_evaluation(args, dist, model, processor, held_out, name, evaluations)
    if args.stage in ("all", "sft") and not resume:
        run_evaluation(args, dist, model, processor, held_out, "base", evaluations)
    if args.stage in ("all", "sft") and (not state or state["stage"] == "sft"):
        sft_steps = run_sft(args, dist, model, processor, train if sft_records is None else sft_records, state,
                            resume, metrics)
        run_evaluation(args, dist, model, processor, held_out, "sft", evaluations)
        state = None
    if args.stage in ("all", "grpo"):
        # at the rollout resolution, unless the SFT filter already ran on the training split at the same one
        if args.stage == "grpo" or sft_records is not None or (args.min_pixels, args.max_pixels) != sft_pixels:
            train = filter_records(processor, train, args.max_prompt_length, args.min_pixels, args.max_pixels, dist,
                                   "train")
        train_grpo(args, dist, model, processor, train, held_out, state, metrics, first_step=sft_steps)
        run_evaluation(args, dist, model, processor, held_out, "grpo", evaluations)
    for tsv in args.eval_tsv:
        result = evaluate_tsv(args, dist, model, processor, tsv)
        print0(f"{tsv}: accuracy {result['accuracy']:.3f} format {result['format']:.3f} "
               f"n {result['n']} skipped {result['skipped']}", dist=dist)
    if args.eval_bench:
        run_benchmarks(args, dist, model, processor)
    if dist.rank == 0 and evaluations:
        print0("\n" + format_table(evaluations))
        print0(f"\nwall time {time.perf_counter() - started:.0f} s; outputs in {args.out}")
        if (Path(args.out) / "metrics.jsonl").is_file():
            try:
                print0(f"curves: {plot_metrics(args.out)}")
            except UserError as error:
                print0(f"no curves: {error}")


if __name__ == "__main__":
    try:
        main()
    except (UserError, tasks.BadRecord) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
