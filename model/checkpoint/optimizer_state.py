"""The optimizer state beside a checkpoint, for resuming: ``optimizer.safetensors`` (every tensor of
``optimizer.state_dict()``) and ``optimizer.json`` (everything else, tensors referred to by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from model.checkpoint.files import CheckpointError, load_tensors, read_json, tensors_for_saving

OPTIMIZER_FORMAT = 1  # optimizer.json "format"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"

# JSON markers for values of an optimizer state_dict that JSON has no type for.
_TENSOR_REF = "__tensor__"
_TUPLE = "__tuple__"


def read_optimizer_state(path: Path) -> dict | None:
    """The optimizer state_dict saved in checkpoint directory ``path`` (CPU tensors), or None.

    The result goes straight to ``optimizer.load_state_dict``, which moves the tensors to the
    parameters' device.
    """
    meta_file, tensor_file = path / OPTIMIZER_JSON, path / OPTIMIZER_FILE
    if not meta_file.exists() and not tensor_file.exists():
        return None
    if not meta_file.exists():
        raise CheckpointError(f"{meta_file}: missing, but {tensor_file.name} is there")
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or meta.get("format") != OPTIMIZER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_file}: optimizer format {found!r}, this code reads "
                              f"format {OPTIMIZER_FORMAT}")
    tensors = load_tensors(tensor_file, "cpu")
    used: set[str] = set()

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_TENSOR_REF}:
                name = value[_TENSOR_REF]
                if name not in tensors:
                    raise CheckpointError(f"{tensor_file}: no tensor {name!r}, which "
                                          f"{meta_file.name} refers to")
                used.add(name)
                return tensors[name]
            if set(value) == {_TUPLE}:
                return tuple(decode(v) for v in value[_TUPLE])
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    try:
        state = {entry["param"]: decode(entry["state"]) for entry in meta["state"]}
        groups = [decode(group) for group in meta["param_groups"]]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_file}: malformed optimizer state ({exc!r})") from exc
    if unused := sorted(set(tensors) - used):
        raise CheckpointError(f"{tensor_file}: tensors {unused[:5]} are not referred to by "
                              f"{meta_file.name}; the two files do not belong together")
    return {"state": state, "param_groups": groups}


def flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer state_dict into tensors (named ``state.<param>.<key>`` and
    ``param_groups.<i>.<key>``) and a JSON document that refers to them by name."""
    tensors: dict[str, Tensor] = {}

    def encode(value: Any, name: str) -> Any:
        if isinstance(value, Tensor):
            if name in tensors:
                raise ValueError(f"optimizer state: two tensors would be named {name!r}")
            tensors[name] = value
            return {_TENSOR_REF: name}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, f"{name}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{name}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"optimizer state {name}: keys must be strings, not {list(value)}")
            return {k: encode(v, f"{name}.{k}") for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"optimizer state {name}: cannot store a {type(value).__name__}")

    meta = {
        "format": OPTIMIZER_FORMAT,
        "state": [{"param": param, "state": encode(values, f"state.{param}")}
                  for param, values in state["state"].items()],
        "param_groups": [encode(group, f"param_groups.{i}")
                         for i, group in enumerate(state["param_groups"])],
    }
    return tensors_for_saving(tensors, "optimizer state"), meta

