"""Compiles recorded kernel launches for a GPU architecture, on a machine without that GPU.

Each launch goes through Triton's own CUDA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas)
with the types, constexprs and divisibility that Triton would derive from the real
arguments, and ptxas reports what the kernel uses: registers, spills and shared memory.
This catches a kernel that would not build, or would spill, on an H100/H200 (sm_90)
before any GPU time is spent on it.

Triton's interpreter patches triton.language in its process, so the compiling runs in a
child process started without TRITON_INTERPRET:

    with recording_launches() as launches:
        ...  # run the sparse pass with kernels="triton"
    resources = compile_launches(launches, arch=90)
"""

import argparse
import functools
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from fisedit.engine.kernels.launch import Launch

# What ptxas -v says of a kernel's resources.
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel variant uses per thread (registers, spills) and per program
    (shared memory), as ptxas reports it."""

    kernel: str
    constexprs: dict[str, Any]
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int


def describe(launch: Launch) -> dict[str, Any]:
    """A JSON description of a launch: tensors by dtype and 16-byte alignment, the rest as is."""

    def value(arg: Any) -> Any:
        if hasattr(arg, "data_ptr"):
            dtype = str(arg.dtype).removeprefix("torch.")
            return {"tensor": dtype, "aligned": arg.data_ptr() % 16 == 0}
        return arg

    fn = launch.kernel.fn
    return {
        "kernel": f"{fn.__module__}:{fn.__name__}",
        "args": [value(a) for a in launch.args],
        "kwargs": {k: value(v) for k, v in launch.kwargs.items()},
    }


_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_TRITON_TYPES.update({f"int{n}": f"i{n}" for n in (8, 16, 32, 64)}, uint8="u8")


@dataclass(frozen=True)
class _Parameter:
    name: str
    constexpr: bool
    specialised: bool
    """Whether Triton specialises an integer on its value (== 1) and divisibility by 16."""


@functools.cache
def _parameters(kernel: Any) -> list[_Parameter]:
    """The parameters of a `triton.jit` function, compiled or interpreted (which keeps
    jit's options in `kwargs`)."""
    options = getattr(kernel, "kwargs", None) or {}
    unspecialised = (
        getattr(kernel, "do_not_specialize", None) or options.get("do_not_specialize") or ()
    )
    params = inspect.signature(kernel.fn).parameters.values()
    return [
        _Parameter(
            p.name,
            "constexpr" in str(p.annotation),
            p.name not in unspecialised and position not in unspecialised,
        )
        for position, p in enumerate(params)
    ]


def _specialise(params: list[_Parameter], bound: dict[str, Any]):
    """Signature, constexprs and attributes as Triton's launcher derives them."""
    signature, constexprs, attrs = {}, {}, {}
    for position, param in enumerate(params):
        name, arg = param.name, bound[param.name]
        specialised = param.specialised and type(arg) is int
        if param.constexpr or (specialised and arg == 1):
            signature[name], constexprs[name] = "constexpr", arg
            continue
        if isinstance(arg, dict):
            signature[name] = "*" + _TRITON_TYPES[arg["tensor"]]
            divisible = arg["aligned"]
        elif isinstance(arg, float):
            signature[name], divisible = "fp32", False
        else:
            signature[name] = "i32" if -(2**31) <= arg < 2**31 else "i64"
            divisible = specialised and arg % 16 == 0
        if divisible:
            attrs[(position,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _ptxas_path(arch: int) -> str:
    """The ptxas that Triton's backend runs for `arch` (its helper's signature and return
    type changed across Triton 3.x releases)."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        tool = nvidia.get_ptxas(arch)
    except TypeError:
        tool = nvidia.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from running ptxas -v on `ptx`, as Triton's backend does."""
    ptxas = _ptxas_path(arch)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        command = [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", source, "-o", source + ".o"]
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    spills = _SPILLS.search(log)
    return int(_REGISTERS.search(log).group(1)), sum(map(int, spills.groups())) if spills else 0


def _variant(description: dict[str, Any]) -> tuple:
    """What Triton compiles for a launch: kernel, signature, constexprs, attributes, options.
    Launches that differ only in unspecialised values share one variant."""
    module_name, name = description["kernel"].split(":")
    kernel = getattr(importlib.import_module(module_name), name)
    params = _parameters(kernel)
    param_names = [p.name for p in params]
    kwargs = description["kwargs"]
    bound = dict(zip(param_names, description["args"], strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in param_names})
    options = {k: v for k, v in kwargs.items() if k not in param_names}
    signature, constexprs, attrs = _specialise(params, bound)
    shown = {p.name: bound[p.name] for p in sorted(params, key=lambda p: p.name) if p.constexpr}
    return kernel, signature, constexprs, attrs, options, shown


def _variant_key(variant: tuple) -> str:
    return repr((variant[0].__name__, *variant[1:5]))


def variant_key(launch: Launch) -> str:
    """What tells one compiled variant of a kernel from another (Triton compiles each new
    one on first launch): equal for launches that share a compiled kernel."""
    return _variant_key(_variant(json.loads(json.dumps(describe(launch)))))


def _compile(variant: tuple, arch: int) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs, options, shown = variant
    source = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    registers, spill_bytes = _ptxas_report(compiled.asm["ptx"], arch)
    return KernelResources(
        kernel=kernel.__name__,
        constexprs=shown,
        registers=registers,
        spill_bytes=spill_bytes,
        shared_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
    )


def compile_launches(launches: list[Launch], arch: int = 90) -> list[KernelResources]:
    """Compiles the launches for sm_`arch` in a child process: one result per distinct
    compiled variant, in first-seen order. Raises RuntimeError with the compiler's output
    when a kernel does not build."""
    descriptions = list({json.dumps(describe(launch)): None for launch in launches})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-m", __name__, "--arch", str(arch)],
        input="[" + ",".join(descriptions) + "]",
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode:
        raise RuntimeError(f"compiling for sm_{arch} failed:\n{done.stderr[-4000:]}")
    return [KernelResources(**r) for r in json.loads(done.stdout.strip().splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    args = parser.parse_args()
    variants = {}
    for description in json.load(sys.stdin):
        variant = _variant(description)
        variants.setdefault(_variant_key(variant), variant)
    print(json.dumps([asdict(_compile(v, args.arch)) for v in variants.values()]))


if __name__ == "__main__":
    main()
