"""Test set-up that must happen before any kernel module is imported.

Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it is set here, before the tests import
`kernels`; on a machine without CUDA every kernel test then runs the real kernel code in the interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
