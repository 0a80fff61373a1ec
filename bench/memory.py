"""Memory per GPU of a GRPO step at the recipe's settings, by arithmetic from each preset's architecture: estimates,
not measurements (bench/gpu_check.py measures a one-GPU step of 3B and 4B when a GPU is lent).

    python -m bench.memory                      # the README's table: 1 and 8 GPUs per preset
    python -m bench.memory --gpus 4 --rollout-micro-batch-size 8 --max-tokens-per-micro-batch 8192

What holds memory, per GPU of W (FSDP2 shards everything it owns over W):
  master weights fp32 4 B/param, gradients fp32 4 B, AdamW moments 8 B, reference bf16 2 B      (all / W)
  rollouts and no-grad passes: the policy gathered whole in bf16 (2 B/param, grpo.gathered) and the KV cache
    (grpo.rollout_kv_tokens x grpo.kv_bytes_per_token): the rollout engine's, 1.5 rows of P per prompt in flight
    (its spare rows) + m x n slots of T tokens, or with --rollout-engine hf one generate call's, m x n x (P + T)
  update: one micro-batch's activations with gradient checkpointing: the bf16 hidden state at every decoder layer
    (layers x D x 2 B per token) plus one layer recomputed in full (~2 B x (10 D + 3 I) per token), and the root's
    gathered bf16 embeddings and lm_head (FSDP keeps the root gathered through forward and backward)
Peak = the larger of the two phases. Not counted: the CUDA context and allocator slack (~2-5 GB), the vision
tower's activations (small at <= 5 images of 512 px), the fused log-prob kernel's bounded workspace (< 1 GB).
"""
import argparse

import torch

import grpo
import ssrl
import tiny

PROMPT_TOKENS = 2000      # a 5-image crop prompt at 512 px (5 x ~334 visual tokens + ~130 text tokens)


def architecture(name):
    """(parameters, layers, hidden, intermediate, KV bytes per token, vocabulary, tied) of a preset, on meta."""
    from transformers import AutoModelForImageTextToText
    processor = ssrl.build_tiny_processor(ssrl.PRESETS[name][0], tiny.tokenizer_corpus([]))
    config = ssrl.real_config(name, processor.tokenizer)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = config.get_text_config()
    return (sum(p.numel() for p in model.parameters()), text.num_hidden_layers, text.hidden_size,
            text.intermediate_size, grpo.kv_bytes_per_token(config), text.vocab_size, config.tie_word_embeddings)


def estimate(name, gpus, micro_batch, tokens, n=5, response=2048, engine="ssrl"):
    params, layers, hidden, intermediate, kv_per_token, vocab, tied = architecture(name)
    gib = 2 ** 30
    sharded = {"master": 4 * params / gpus, "grads": 4 * params / gpus, "adam": 8 * params / gpus,
               "reference": 2 * params / gpus}
    kv = grpo.rollout_kv_tokens(micro_batch, PROMPT_TOKENS, n, response, engine) * kv_per_token
    gathered = 2 * params
    activations = tokens * (layers * hidden * 2 + 2 * (10 * hidden + 3 * intermediate))
    root = 2 * vocab * hidden * (1 if tied else 2)
    rollout = sharded["master"] + sharded["adam"] + sharded["reference"] + gathered + kv
    update = sum(sharded.values()) + root + activations
    return {key: value / gib for key, value in {
        **sharded, "gathered": gathered, "kv": kv, "activations": activations, "rollout": rollout, "update": update,
        "peak": max(rollout, update)}.items()} | {"params": params / 1e9}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rollout-micro-batch-size", type=int, default=None, help="default: each preset's own")
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=16384)
    parser.add_argument("--rollout-engine", choices=("ssrl", "hf"), default="ssrl")
    args = parser.parse_args()
    print("| preset | params | GPUs | master fp32 | grads fp32 | AdamW | reference bf16 | gathered bf16 (rollout) | "
          "KV cache (m prompts x 5) | activations (16k tokens) | rollout phase | update phase | peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, defaults in ssrl.PRESET_DEFAULTS.items():
        micro = args.rollout_micro_batch_size or defaults["rollout_micro_batch_size"]
        for gpus in args.gpus:
            e = estimate(name, gpus, micro, args.max_tokens_per_micro_batch, engine=args.rollout_engine)
            print(f"| {name} | {e['params']:.2f} B | {gpus} | {e['master']:.1f} | {e['grads']:.1f} | {e['adam']:.1f} | "
                  f"{e['reference']:.1f} | {e['gathered']:.1f} | {e['kv']:.1f} (m = {micro}) | {e['activations']:.1f} | "
                  f"{e['rollout']:.1f} | {e['update']:.1f} | **{e['peak']:.0f}** |")


if __name__ == "__main__":
    main()
