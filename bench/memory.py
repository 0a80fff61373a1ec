"""Memory per GPU of a GRPO step at the recipe's settings, by arithmetic from each preset's architecture: estimates,
not measurements (bench/gpu_check.py measures a one-GPU step of 3B and 4B when a GPU is lent).

    python -m bench.memory                      # the README's table: 1 and 8 GPUs per preset, on 80 GB GPUs
    python -m bench.memory --gpus 4 --rollout-micro-batch-size 8 --max-tokens-per-micro-batch 8192
    python -m bench.memory --rollout-engine hf  # generate's KV cache instead of the rollout engine's
    python -m bench.memory --optimizer-step     # CPU measurement: peak of one AdamW step, foreach against fused

Every term, per GPU of W (FSDP2 shards what it owns over W), in GiB:
  sharded      fp32 master weights 4 B/param, fp32 gradients 4 B, AdamW moments 8 B, the bf16 reference 2 B (all / W)
  step temp    what optimizer.step() allocates: 0 with the fused AdamW ssrl.adamw takes on CUDA (torch's default
               foreach step would allocate _foreach_sqrt(exp_avg_sq), 4 B/param / W: 14 GiB for 3B on one GPU)
  context      the CUDA context, cuBLAS workspaces, NCCL buffers: 1.5 GiB on one GPU, 3 GiB with NCCL
  rollout      master, AdamW state and reference (gradients are freed between steps), the policy gathered whole in
               bf16 (2 B/param, grpo.gathered) and what m prompts in flight add (grpo.rollout_bytes, 2,000-token crop
               prompts, 2,048-token responses): the KV cache (grpo.rollout_kv_tokens x grpo.kv_bytes_per_token: the
               rollout engine's 1.5 rows of P per prompt + m x n slots of T, or with --rollout-engine hf one
               generate call's m x n x (P + T)), the prefill's transient (its own KV cache, one decoder layer's or
               one vision block's activations per prompt token, whichever is larger, the pixels), sampling's fp32
               rows over the vocabulary. m: --rollout-micro-batch-size auto fills what is free less max(2 GiB, 5%)
               (grpo.fitting_prompts, as ssrl.py's presets run)
  update       sharded states, the root's gathered bf16 embeddings and lm_head (kept through forward and backward),
               one micro-batch's pixels, and the largest of three moments of the backward:
                 start   checkpointed activations of every decoder layer (T x layers x D x 2 B) and vision block
                         (4 patches x blocks x vision width x 2 B per visual token: ~330 KB for Qwen2.5-VL), one
                         decoder layer recomputed (T x (10 D + 3 I) x 2 B), and the fused log-prob kernel's backward
                         (lm_head gradient in bf16, 128 MiB workspace, fp32 dh accumulator)
                 vision  the vision blocks' activations, one block recomputed over the micro-batch's patches, and the
                         root's bf16 lm_head gradient held since the start
                 end     the root's gradients: bf16 unsharded plus the fp32 copy FSDP2 reduce-scatters, 6 B/param of
                         the root (embeddings, lm_head if untied, patch embed, merger)
               The micro-batch holds T = --max-tokens-per-micro-batch padded tokens, visual ones as if every row
               were a crop prompt with empty responses (~85% of its tokens; the worst case)
  peak         the largest of rollout, update and step
"""
import argparse
import subprocess
import sys

import torch

import grpo
import ssrl
import tiny

GiB = 2 ** 30
PROMPT_TOKENS = 2000      # a 5-image crop prompt at 512 px (5 x ~341 visual tokens + ~130 text tokens)
VISUAL_SHARE = 0.85       # visual tokens of such a prompt: ~1,700 of 2,000
CAPACITY = 81559 * 2 ** 20   # what an 80 GB H100 reports (nvidia-smi: 81,559 MiB)


def architecture(name):
    """(model config, parameters, root parameters) of a preset, built on the meta device."""
    from transformers import AutoModelForImageTextToText
    processor = ssrl.build_tiny_processor(ssrl.PRESETS[name][0], tiny.tokenizer_corpus([]))
    config = ssrl.real_config(name, processor.tokenizer)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    in_layers = {id(p) for module in (*model.model.visual.blocks, *model.model.language_model.layers)
                 for p in module.parameters()}
    params = sum(p.numel() for p in model.parameters())
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    return config, params, root


def estimate(name, gpus, micro_batch="auto", tokens=16384, n=5, response=2048, capacity=CAPACITY, engine="ssrl"):
    """Every term of the docstring in GiB, for `gpus` GPUs of `capacity` bytes; `micro_batch` prompts in flight
    (hf: per generate call) or "auto" (what ssrl.py's presets run: grpo.fitting_prompts on this capacity)."""
    config, params, root = architecture(name)
    text, vision = config.get_text_config(), config.vision_config
    hidden, intermediate, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    vision_width, vision_intermediate = vision.hidden_size, vision.intermediate_size
    merge = vision.spatial_merge_size ** 2
    patch_bytes = 3 * vision.temporal_patch_size * vision.patch_size ** 2 * 4       # fp32 pixels per patch
    term = {"master": 4 * params / gpus, "grads": 4 * params / gpus, "adam": 8 * params / gpus,
            "reference": 2 * params / gpus, "step_temp": 0.0, "context": (1.5 if gpus == 1 else 3.0) * GiB,
            "gathered": 2 * params}
    rollout_fixed = (term["master"] + term["adam"] + term["reference"] + term["gathered"] + term["context"])

    def in_flight(prompts):
        return grpo.rollout_bytes(config, prompts, PROMPT_TOKENS, n, response, 2, engine, tokens)
    if micro_batch == "auto":
        micro_batch = grpo.fitting_prompts(capacity - rollout_fixed, capacity, in_flight, limit=256 // gpus)
    term["micro_batch"] = micro_batch
    term["rollout_prompts"] = in_flight(micro_batch)
    visual = tokens * VISUAL_SHARE                                                   # merged visual tokens
    vision_blocks = vision.depth
    term["lm_activations"] = tokens * layers * hidden * 2
    term["vision_activations"] = visual * merge * vision_blocks * vision_width * 2
    recompute = tokens * (10 * hidden + 3 * intermediate) * 2
    vision_recompute = visual * merge * (10 * vision_width + 3 * vision_intermediate) * 2
    head = text.vocab_size * hidden * 2                                              # bf16 [V, D]
    kernel = head + (128 << 20) + 2 * tokens * hidden * 4
    term["root_gathered"] = head * (1 if config.tie_word_embeddings else 2)
    term["pixels"] = visual * merge * patch_bytes
    moments = {"start": term["lm_activations"] + term["vision_activations"] + recompute + kernel,
               "vision": term["vision_activations"] + vision_recompute + head,
               "end": 6 * root}
    term["backward"] = max(moments.values())
    sharded = term["master"] + term["grads"] + term["adam"] + term["reference"]
    term["rollout"] = rollout_fixed + term["rollout_prompts"]
    term["update"] = sharded + term["root_gathered"] + term["pixels"] + term["backward"] + term["context"]
    term["step"] = sharded + term["step_temp"] + term["context"]
    term["peak"] = max(term["rollout"], term["update"], term["step"])
    return {key: value if key == "micro_batch" else value / GiB for key, value in term.items()} | \
        {"params": params / 1e9}


def optimizer_step_peak(implementation, megabytes=256):
    """Peak resident memory (MiB) one AdamW step adds on the CPU over `megabytes` of fp32 parameters in 16 tensors,
    after a first step allocated the moments; run in a fresh process per implementation."""
    code = f"""
import torch
torch.manual_seed(0)
params = [torch.randn({megabytes} * 2 ** 20 // 4 // 16, requires_grad=True) for _ in range(16)]
kind = {implementation!r}
optimizer = torch.optim.AdamW(params, lr=1e-3, **({{"fused": True}} if kind == "fused" else
                                                 {{"foreach": kind == "foreach"}}))
for p in params:
    p.grad = torch.randn_like(p)
optimizer.step()
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
optimizer.step()
print((status("VmHWM") - before) / 1024)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""})
    return float(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rollout-micro-batch-size", type=ssrl.micro_batch_flag, default="auto",
                        help="prompts per generate call per GPU, or auto (as the presets run)")
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=16384)
    parser.add_argument("--rollout-engine", choices=("ssrl", "hf"), default="ssrl")
    parser.add_argument("--capacity-gib", type=float, default=CAPACITY / GiB, help="GPU memory (80 GB H100: 79.6)")
    parser.add_argument("--optimizer-step", action="store_true", help="measure one AdamW step's peak on the CPU")
    args = parser.parse_args()
    if args.optimizer_step:
        print("| AdamW implementation (CPU, 256 MiB of fp32 parameters) | peak MiB above the state, one step |")
        print("|---|---|")
        for implementation in ("foreach", "fused", "for-loop"):
            print(f"| {implementation} | {optimizer_step_peak(implementation):.0f} |", flush=True)
        return
    print("| preset | params | GPUs | master fp32 | grads fp32 | AdamW | reference bf16 | step temp | context | "
          "gathered bf16 | m (prompts in flight) | KV + prefill + sampling of m | LM act | vision act | backward peak "
          "| rollout | update | step | peak |")
    print("|" + "---|" * 19)
    for name in ssrl.PRESET_DEFAULTS:
        for gpus in args.gpus:
            e = estimate(name, gpus, args.rollout_micro_batch_size, args.max_tokens_per_micro_batch,
                         capacity=args.capacity_gib * GiB, engine=args.rollout_engine)
            print(f"| {name} | {e['params']:.2f} B | {gpus} | {e['master']:.1f} | {e['grads']:.1f} | {e['adam']:.1f} | "
                  f"{e['reference']:.1f} | {e['step_temp']:.0f} | {e['context']:.1f} | {e['gathered']:.1f} | "
                  f"{e['micro_batch']} | {e['rollout_prompts']:.1f} | {e['lm_activations']:.1f} | "
                  f"{e['vision_activations']:.1f} | {e['backward']:.1f} | {e['rollout']:.1f} | {e['update']:.1f} | "
                  f"{e['step']:.1f} | **{e['peak']:.1f}** |")


if __name__ == "__main__":
    main()
