"""Fused kernels. One public op: log-probabilities (and entropy) of targets under lm_head, without [N, V] logits."""
from kernels.logprobs import fused_logprobs

__all__ = ["fused_logprobs"]
