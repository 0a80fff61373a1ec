"""Test set-up that must happen before torch and any kernel module are imported.

Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it is set here, before the tests import
`kernels`; on a machine without CUDA every kernel test then runs the real kernel code in the interpreter.
One thread per process: the tests compare passes that must sum in the same order (a kernel's forward and its
recomputed backward, one pass against two micro-batches), and with several BLAS threads the blocking of a matmul
can change between calls of different shapes; torchrun tests also start two processes on a 2-core machine.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
