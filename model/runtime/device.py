"""Which device and precision a command runs with (shared by every entry point)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where it is faster: CUDA, and CPUs with AVX-512 (bf16/AMX units)."""
    if name == "auto":
        fast_cpu = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        return torch.bfloat16 if device.type == "cuda" or fast_cpu else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
