"""Picking how a Triton kernel runs: compiled for CUDA tensors, interpreted for CPU ones.

`triton.jit` chooses between compiling and interpreting once, when the kernel's module is
imported, from TRITON_INTERPRET. That breaks when a test sets the variable after something
else imported the kernels. Here the choice is made per call instead: CPU tensors run the
kernel's Python source under the interpreter whenever TRITON_INTERPRET is set at call time.
"""

import os
from typing import Any

import torch

_interpreted: dict[Any, Any] = {}


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def launcher(kernel: Any, device: torch.device) -> Any:
    """The form of `kernel` (a `triton.jit` function) to launch on tensors on `device`."""
    if device.type == "cuda":
        return kernel
    if device.type != "cpu" or not interpreting():
        raise RuntimeError(
            f"Triton kernel {kernel.__name__} needs CUDA tensors, got {device.type} ones; set "
            "TRITON_INTERPRET=1 to run it on CPU tensors under Triton's interpreter."
        )
    # Imported here: only the CPU path needs the interpreter.
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel.fn not in _interpreted:
        _interpreted[kernel.fn] = InterpretedFunction(kernel.fn)
    return _interpreted[kernel.fn]
