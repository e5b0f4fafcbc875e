"""What a device can do with the speed options (bf16, torch.compile, CUDA graphs), checked
once at the start of a command so that an option a device cannot use is a one-line error
instead of a traceback minutes into a run."""

from __future__ import annotations

import shutil
import sys

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for a --precision value on `device`. auto = bf16 on GPUs that support
    it and fp32 on CPUs (a CPU's bf16 speed depends on its instructions, and a default that
    changes numbers from machine to machine would make results unreproducible)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16 support: use --precision fp32")
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls
    ran 5x faster than fp32 (2-core AMD EPYC); without, slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warn_slow_bf16(precision: str, device: torch.device) -> None:
    """A note, not an error: bf16 on a CPU without native bf16 works, only slowly."""
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX): bf16 runs slower than fp32 here", file=sys.stderr)


def check_compile(device: torch.device) -> None:
    """torch.compile's default backend (inductor) writes C++ on CPUs and Triton on GPUs."""
    device = torch.device(device)
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ValueError("--compile on a CPU needs a C++ compiler (g++ or clang++) for torch.compile; install one or leave --compile out")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ValueError("--compile on a GPU needs triton (pip install triton) for torch.compile; install it or leave --compile out") from None


def check_cuda_graphs(device: torch.device) -> None:
    if torch.device(device).type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA GPU, but this run is on {torch.device(device).type}: leave it out")


def compile_for_sampling(model: torch.nn.Module, device: torch.device, cuda_graphs: bool = False) -> None:
    """Compile `model`'s forward in place for sampling (same module, same weights and names):
    with `cuda_graphs`, torch.compile's "reduce-overhead" mode replays each static-shape step
    as one CUDA graph, which removes the launch cost that dominates small batches on a GPU."""
    check_compile(device)
    if cuda_graphs:
        check_cuda_graphs(device)
    model.compile(mode="reduce-overhead" if cuda_graphs else None)
