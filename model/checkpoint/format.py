"""Safe, self-describing checkpoint directories for the Field Machine.

Nothing here pickles or calls ``torch.load``: loading a checkpoint reads JSON and safetensors
only, so a checkpoint from anywhere can be opened without running code from it.

One checkpoint is one directory::

    config.json             {"format": 1, "model": asdict(ModelConfig), "train": asdict(TrainConfig)
                             or null, "step", "epoch", "val_loss" (or null), "created" (ISO, UTC)}
    model.safetensors       the model's state_dict (tied tensors are stored once per name)
    tokenizer.json          Tokenizer.save / Tokenizer.load
    optimizer.safetensors   optional, for resuming (:mod:`model.checkpoint.optimizer_state`)
    optimizer.json          ... and everything else in optimizer.state_dict(), tensors by name
    extras.safetensors      optional: tensors the trainer keeps beside the model (baseline counts)

A save may carry other files over from the checkpoint it replaces (``keep``: the trainer's log and
run statistics, :mod:`model.training.run_folder`). Writes are atomic (:mod:`model.checkpoint.atomic`,
with ``config.json`` as the marker of a complete checkpoint): a process killed at any moment
leaves the old complete checkpoint or the new one. The files above are never rewritten in place,
so :func:`link_or_copy` hard-links them; any other file is copied.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoint import atomic
from model.checkpoint.files import CheckpointError, load_tensors, read_json, save_tensors, tensors_for_saving
from model.checkpoint.optimizer_state import (OPTIMIZER_FILE, OPTIMIZER_JSON, flatten_optimizer,
                                              read_optimizer_state)
from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# config.json "format"; bump when the layout or a file's meaning changes. 2: the note head
# (voice and velocity given the chosen token) and field layers. 3: the voice register (a format 2
# checkpoint is read as one without it). 4: the note head's chord term (``chord_voices``; a format 3
# checkpoint is read as one without it).
CHECKPOINT_FORMAT = 4
NO_CHORD_FORMAT = 3
NO_REGISTER_FORMAT = 2

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
EXTRAS_FILE = "extras.safetensors"
# The checkpoint's own files: written once, never in place, so copies may hard-link them.
FORMAT_FILES = frozenset({CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, OPTIMIZER_FILE, OPTIMIZER_JSON, EXTRAS_FILE})


@dataclass
class Checkpoint:
    """A loaded checkpoint. Rebuild the model with ``ModelConfig(**ckpt.model_config)``.

    ``path`` is the directory actually read: the one asked for, or during an interrupted swap the
    previous checkpoint under ``.<name>.old-<pid>``.
    """

    path: Path
    model_config: dict
    train_config: dict | None
    step: int
    epoch: int
    val_loss: float | None
    state_dict: dict[str, Tensor]
    tokenizer: Tokenizer
    extras: dict[str, Tensor] = field(default_factory=dict)
    created: str = ""

    @property
    def has_optimizer(self) -> bool:
        return (self.path / OPTIMIZER_JSON).is_file()

    def load_into(self, model: torch.nn.Module) -> None:
        """Check the state_dict against ``model`` (:func:`check_state_dict`), then load it."""
        target = _unwrap(model)
        check_state_dict(target, self.state_dict, self.path / MODEL_FILE)
        target.load_state_dict(self.state_dict, strict=True)


def save_checkpoint(directory: str | Path, *, model: torch.nn.Module, model_config: Any,
                    tokenizer: Tokenizer, step: int, epoch: int, val_loss: float | None = None,
                    train_config: Any = None, optimizer: torch.optim.Optimizer | None = None,
                    extras: Mapping[str, Tensor] | None = None, keep: tuple[str, ...] = ()) -> Path:
    """Write a complete checkpoint to ``directory``, atomically replacing any checkpoint there.

    ``model_config`` and ``train_config`` are config dataclasses (stored as ``asdict``) or plain
    mappings. ``optimizer`` adds ``optimizer.safetensors`` + ``optimizer.json`` for resuming;
    ``extras`` adds ``extras.safetensors``. The files named in ``keep`` are carried over from the
    checkpoint being replaced. Everything is checked
    and gathered before the disk is touched; a failure leaves the previous checkpoint as it was.
    Returns ``directory``.
    """
    directory = Path(directory)
    model_dict = _config_dict(model_config, "model_config")
    train_dict = None if train_config is None else _config_dict(train_config, "train_config")
    vocab_size = model_dict.get("vocab_size")  # FM configs have one; only checked where present
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model_config.vocab_size is {vocab_size} but the tokenizer has "
                         f"{tokenizer.vocab_size} tokens")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    config_text = atomic.dumps_json({
        "format": CHECKPOINT_FORMAT,
        "model": model_dict,
        "train": train_dict,
        "step": _as_int(step, "step"),
        "epoch": _as_int(epoch, "epoch"),
        "val_loss": None if val_loss is None else float(val_loss),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, CONFIG_FILE)
    state = tensors_for_saving(_unwrap(model).state_dict(), "the model's state_dict")
    extra_tensors = tensors_for_saving(extras, "extras") if extras else None
    optimizer_parts = flatten_optimizer(optimizer.state_dict()) if optimizer is not None else None

    def write(tmp: Path) -> None:
        save_tensors(state, tmp / MODEL_FILE)
        tokenizer.save(tmp / TOKENIZER_FILE)
        atomic.fsync_file(tmp / TOKENIZER_FILE)
        if optimizer_parts is not None:
            tensors, meta = optimizer_parts
            save_tensors(tensors, tmp / OPTIMIZER_FILE)
            atomic.write_file(tmp / OPTIMIZER_JSON, atomic.dumps_json(meta, OPTIMIZER_JSON))
        if extra_tensors is not None:
            save_tensors(extra_tensors, tmp / EXTRAS_FILE)
        for name in keep:
            if (directory / name).is_file():
                shutil.copy2(directory / name, tmp / name)
                atomic.fsync_file(tmp / name)
        atomic.write_file(tmp / CONFIG_FILE, config_text)  # last: a directory with it is complete

    atomic.write_atomically(directory, write, CONFIG_FILE)
    logger.info("saved checkpoint %s (step %d, epoch %d)", directory, step, epoch)
    return directory


def load_checkpoint(directory: str | Path, *, map_location: str | torch.device = "cpu"
                    ) -> Checkpoint:
    """Read and validate a checkpoint; tensors go to ``map_location``.

    Raises :class:`CheckpointError` naming the file for a missing directory or file, invalid
    JSON, a format this code does not read, a truncated or corrupt safetensors file, or a
    tokenizer whose size differs from the model config's ``vocab_size``.
    """
    path = _resolve(Path(directory))
    meta = _read_config(path / CONFIG_FILE)
    state_dict = load_tensors(path / MODEL_FILE, map_location)
    tokenizer = _load_tokenizer(path / TOKENIZER_FILE)
    vocab_size = meta["model"].get("vocab_size")
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{path / TOKENIZER_FILE}: the tokenizer has {tokenizer.vocab_size} "
                              f"tokens but {CONFIG_FILE} says vocab_size {vocab_size}")
    extras_file = path / EXTRAS_FILE
    extras = load_tensors(extras_file, map_location) if extras_file.exists() else {}
    logger.info("loaded checkpoint %s (step %d, epoch %d)", path, meta["step"], meta["epoch"])
    return Checkpoint(path=path, model_config=meta["model"], train_config=meta["train"],
                      step=meta["step"], epoch=meta["epoch"], val_loss=meta["val_loss"],
                      state_dict=state_dict, tokenizer=tokenizer, extras=extras,
                      created=meta["created"])


def load_optimizer_state(directory: str | Path) -> dict | None:
    """The optimizer state_dict saved with a checkpoint (CPU tensors), or None if it has none.

    The result goes straight to ``optimizer.load_state_dict``, which moves the tensors to the
    parameters' device.
    """
    return read_optimizer_state(_resolve(Path(directory)))


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor],
                     path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless ``state_dict`` fits ``model``.

    Reports missing keys, unexpected keys and shape mismatches together.
    """
    expected = _unwrap(model).state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [f"{key} {tuple(state_dict[key].shape)} in the file, "
                  f"{tuple(expected[key].shape)} in the model"
                  for key in sorted(expected.keys() & state_dict.keys())
                  if state_dict[key].shape != expected[key].shape]
    problems = [f"{label}: {_first(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches", mismatched)) if items]
    if problems:
        raise CheckpointError(f"{path}: the state_dict does not fit {type(model).__name__}: "
                              + "; ".join(problems))


def link_or_copy(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Make ``dst_dir`` a copy of the checkpoint ``src_dir``, atomically (e.g. ``best`` from
    ``latest``).

    The checkpoint's own files (:data:`FORMAT_FILES`, never rewritten in place) are hard-linked
    where the filesystem allows and copied otherwise; any other file (a log that is appended to)
    is always copied. Returns ``dst_dir``.
    """
    src, dst = _resolve(Path(src_dir)), Path(dst_dir)
    if not (src / CONFIG_FILE).is_file():
        raise CheckpointError(f"{src / CONFIG_FILE}: missing; {src} is not a checkpoint")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: cannot copy a checkpoint onto itself")

    def write(tmp: Path) -> None:
        for item in sorted(src.iterdir()):
            if item.name.startswith("."):  # a write_json in progress
                continue
            target = tmp / item.name
            if item.is_dir():
                shutil.copytree(item, target)
                continue
            if item.name in FORMAT_FILES:
                try:
                    os.link(item, target)
                    continue
                except OSError as exc:  # other filesystem, or no hard links there
                    logger.debug("copying %s, cannot link it (%s)", item, exc)
            shutil.copy2(item, target)
            atomic.fsync_file(target)

    atomic.write_atomically(dst, write, CONFIG_FILE)
    logger.info("copied checkpoint %s to %s", src, dst)
    return dst


def load_model(directory: str | Path, *, device: str | torch.device = "cpu"
               ) -> tuple[FieldMachine, Tokenizer, Checkpoint]:
    """Rebuild the Field Machine of a checkpoint in eval mode on ``device``.

    Checks the weights against ``ModelConfig(**config)`` (a mismatch is a CheckpointError
    naming the file).
    """
    loaded = load_checkpoint(directory, map_location=device)
    try:
        config = ModelConfig(**loaded.model_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{loaded.path / CONFIG_FILE}: model settings do not fit: {exc}") from exc
    model = FieldMachine(config).to(device)
    loaded.load_into(model)
    return model.eval(), loaded.tokenizer, loaded


def checkpoint_digest(directory: str | Path) -> str:
    """A digest of what a checkpoint computes (its settings, weights and tokenizer), to tell two
    checkpoints apart: snapshots of a session name the checkpoint that wrote them."""
    folder = _resolve(Path(directory))
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE):
        with open(folder / name, "rb") as file:
            digest.update(name.encode() + b"\0")
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def _resolve(directory: Path) -> Path:
    """The checkpoint directory to read (the previous one while a save swaps it)."""
    try:
        return atomic.resolve(directory, CONFIG_FILE)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise CheckpointError(str(exc)) from exc


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself for a ``torch.compile``d model (whose keys carry ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)



def _load_tokenizer(file: Path) -> Tokenizer:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return Tokenizer.load(file)
    except ValueError as exc:  # TokenizerError included
        message = str(exc)
        raise CheckpointError(message if str(file) in message else f"{file}: {message}") from exc



def _read_config(file: Path) -> dict:
    data = read_json(file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    if data.get("format") in (NO_REGISTER_FORMAT, NO_CHORD_FORMAT) and isinstance(data.get("model"), dict):
        if data["format"] == NO_REGISTER_FORMAT:
            data["model"].setdefault("voice_register", False)
        data["model"].setdefault("chord_voices", False)
        data["format"] = CHECKPOINT_FORMAT
    if data.get("format") != CHECKPOINT_FORMAT:
        hint = (": it was trained before voice and velocity were chosen for each note; train it again "
                "with python -m model.train" if data.get("format") == 1 else "")
        raise CheckpointError(f"{file}: checkpoint format {data.get('format')!r}, this code reads "
                              f"format {CHECKPOINT_FORMAT}{hint}")
    checks = {
        "model": (lambda v: isinstance(v, dict), "an object"),
        "train": (lambda v: v is None or isinstance(v, dict), "an object or null"),
        "step": (_is_int, "an integer"),
        "epoch": (_is_int, "an integer"),
        "val_loss": (lambda v: v is None or (isinstance(v, (int, float))
                                             and not isinstance(v, bool)), "a number or null"),
        "created": (lambda v: isinstance(v, str), "a string"),
    }
    for key, (ok, expected) in checks.items():
        if key not in data:
            raise CheckpointError(f"{file}: no {key!r} field")
        if not ok(data[key]):
            raise CheckpointError(f"{file}: {key!r} must be {expected}, not {data[key]!r}")
    if data["val_loss"] is not None:
        data["val_loss"] = float(data["val_loss"])
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)



def _config_dict(config: Any, name: str) -> dict:
    if is_dataclass(config) and not isinstance(config, type):
        return asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"{name} must be a dataclass instance or a mapping, "
                    f"not {type(config).__name__}")


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    return int(value)



def _first(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
