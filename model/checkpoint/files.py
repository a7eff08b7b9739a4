"""Tensors and JSON on disk: safetensors files (never pickle) and JSON files, with errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.checkpoint import atomic


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message names the offending file and what is wrong."""


def tensors_for_saving(tensors: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """CPU, contiguous tensors, none sharing storage with another (safetensors refuses shared
    tensors, e.g. tied weights: each name gets its own copy; loading into a tied model works)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: key {name!r} is not a string")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(tensor).__name__}, not a Tensor")
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or (storage and storage in seen):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def save_tensors(tensors: dict[str, Tensor], file: Path) -> None:
    save_file(tensors, str(file), metadata={"format": "pt"})
    atomic.fsync_file(file)


def load_tensors(file: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    device = map_location if isinstance(map_location, (str, int)) else str(map_location)
    try:
        return load_file(str(file), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt "
                              f"({exc})") from exc


def read_json(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: invalid JSON ({exc})") from exc

