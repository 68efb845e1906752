"""Where a Triton kernel can run: compiled on CUDA tensors, interpreted on CPU ones.

`triton.jit` chooses between compiling and Triton's CPU interpreter once, when the kernel
(and triton.language itself) is imported, from TRITON_INTERPRET. The test suite sets it
before anything imports Triton when no GPU is present.
"""

import os
from typing import Any

import torch


def interpreting() -> bool:
    """Whether this process runs Triton kernels under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def launcher(kernel: Any, device: torch.device) -> Any:
    """`kernel` (a `triton.jit` function), after checking it can run on `device`."""
    if device.type == "cuda" and not interpreting():
        return kernel
    if device.type == "cpu" and interpreting():
        return kernel
    raise RuntimeError(
        f"Triton kernel {kernel.__name__} cannot run on {device.type} tensors here: it needs "
        "CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before Triton is imported."
    )
