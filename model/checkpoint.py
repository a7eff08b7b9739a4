"""Safe, self-describing checkpoint directories for the Field Machine.

Nothing here pickles or calls ``torch.load``: loading a checkpoint reads JSON and safetensors
only, so a checkpoint from anywhere can be opened without running code from it.

One checkpoint is one directory::

    config.json             {"format": 1, "model": asdict(ModelConfig), "train": asdict(TrainConfig)
                             or null, "step", "epoch", "val_loss" (or null), "created" (ISO, UTC)}
    model.safetensors       the model's state_dict (tied tensors are stored once per name)
    tokenizer.json          Tokenizer.save / Tokenizer.load
    optimizer.safetensors   optional, for resuming: every tensor of optimizer.state_dict()
    optimizer.json          ... and everything else in it (param_groups, scalars), tensors by name
    extras.safetensors      optional: tensors the trainer keeps beside the model (baseline counts)
    training_log.csv        written by the trainer (append_log_row); carried over by each save
    run_stats.json          written by the trainer (write_json); carried over by each save

The trainer manages this set of directories under its output directory (:func:`checkpoint_dirs`)::

    latest/                    the newest state, rewritten every so many steps; resume from here
    best/                      a copy of the checkpoint with the lowest validation loss so far
    epoch_001/, epoch_002/ ... one per finished epoch, kept
    timed_YYYYmmdd_HHMMSS/     one every so many minutes of wall-clock time, kept
    .latest.tmp-<pid>/         a save in progress (gone after it; a killed save's is removed
                               by the next save)
    .latest.old-<pid>/         the replaced ``latest`` for the instant of the swap

Writes are atomic. :func:`save_checkpoint` and :func:`link_or_copy` write everything into the
sibling ``.<name>.tmp-<pid>``, fsync it, then rename the old directory to ``.<name>.old-<pid>``,
rename the new one into place, and delete the old one. A process killed at any moment leaves the
old complete checkpoint or the new complete one. In the one window where neither sits under the
real name (between the two renames) the old one is complete under ``.<name>.old-<pid>``:
:func:`load_checkpoint` reads it from there, and the next save renames it back first. Two
processes must not save to the same directory at once.

Files of a saved checkpoint are never rewritten in place (``write_json`` replaces a file whole),
so :func:`link_or_copy` can hard-link them; ``training_log.csv`` is appended to and is therefore
always copied.
"""

from __future__ import annotations

import csv
import json
import logging
import numbers
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from model.fm import FieldMachine

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1  # config.json "format"; bump when the layout or a file's meaning changes
OPTIMIZER_FORMAT = 1  # optimizer.json "format"

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
EXTRAS_FILE = "extras.safetensors"
LOG_FILE = "training_log.csv"
RUN_STATS_FILE = "run_stats.json"

# Written by the trainer into a checkpoint directory; a save carries them over from the checkpoint
# it replaces, so ``latest`` keeps its whole log.
TRAINER_FILES = (LOG_FILE, RUN_STATS_FILE)
# Appended to in place, so never hard-linked.
_APPENDED_FILES = frozenset({LOG_FILE})

# JSON markers for values of an optimizer state_dict that JSON has no type for.
_TENSOR_REF = "__tensor__"
_TUPLE = "__tuple__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message names the offending file and what is wrong."""


# ====================================================================== the checkpoint
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
                    extras: Mapping[str, Tensor] | None = None) -> Path:
    """Write a complete checkpoint to ``directory``, atomically replacing any checkpoint there.

    ``model_config`` and ``train_config`` are config dataclasses (stored as ``asdict``) or plain
    mappings. ``optimizer`` adds ``optimizer.safetensors`` + ``optimizer.json`` for resuming;
    ``extras`` adds ``extras.safetensors``. Trainer files (``training_log.csv``,
    ``run_stats.json``) of the checkpoint being replaced are carried over. Everything is checked
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
    config_text = _dumps({
        "format": CHECKPOINT_FORMAT,
        "model": model_dict,
        "train": train_dict,
        "step": _as_int(step, "step"),
        "epoch": _as_int(epoch, "epoch"),
        "val_loss": None if val_loss is None else float(val_loss),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, "config.json")
    state = _tensors_for_saving(_unwrap(model).state_dict(), "the model's state_dict")
    extra_tensors = _tensors_for_saving(extras, "extras") if extras else None
    optimizer_parts = _flatten_optimizer(optimizer.state_dict()) if optimizer is not None else None

    def write(tmp: Path) -> None:
        _save_tensors(state, tmp / MODEL_FILE)
        tokenizer.save(tmp / TOKENIZER_FILE)
        _fsync_file(tmp / TOKENIZER_FILE)
        if optimizer_parts is not None:
            tensors, meta = optimizer_parts
            _save_tensors(tensors, tmp / OPTIMIZER_FILE)
            _write_file(tmp / OPTIMIZER_JSON, _dumps(meta, OPTIMIZER_JSON))
        if extra_tensors is not None:
            _save_tensors(extra_tensors, tmp / EXTRAS_FILE)
        for name in TRAINER_FILES:
            if (directory / name).is_file():
                shutil.copy2(directory / name, tmp / name)
                _fsync_file(tmp / name)
        _write_file(tmp / CONFIG_FILE, config_text)  # last: a directory with it is complete

    _write_atomically(directory, write)
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
    state_dict = _load_tensors(path / MODEL_FILE, map_location)
    tokenizer = _load_tokenizer(path / TOKENIZER_FILE)
    vocab_size = meta["model"].get("vocab_size")
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{path / TOKENIZER_FILE}: the tokenizer has {tokenizer.vocab_size} "
                              f"tokens but {CONFIG_FILE} says vocab_size {vocab_size}")
    extras_file = path / EXTRAS_FILE
    extras = _load_tensors(extras_file, map_location) if extras_file.exists() else {}
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
    path = _resolve(Path(directory))
    meta_file, tensor_file = path / OPTIMIZER_JSON, path / OPTIMIZER_FILE
    if not meta_file.exists() and not tensor_file.exists():
        return None
    if not meta_file.exists():
        raise CheckpointError(f"{meta_file}: missing, but {tensor_file.name} is there")
    meta = _read_json(meta_file)
    if not isinstance(meta, dict) or meta.get("format") != OPTIMIZER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_file}: optimizer format {found!r}, this code reads "
                              f"format {OPTIMIZER_FORMAT}")
    tensors = _load_tensors(tensor_file, "cpu")
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

    Files are hard-linked where the filesystem allows (checkpoint files are never rewritten in
    place) and copied otherwise; ``training_log.csv`` is always copied. Returns ``dst_dir``.
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
            if item.name not in _APPENDED_FILES:
                try:
                    os.link(item, target)
                    continue
                except OSError as exc:  # other filesystem, or no hard links there
                    logger.debug("copying %s, cannot link it (%s)", item, exc)
            shutil.copy2(item, target)
            _fsync_file(target)

    _write_atomically(dst, write)
    logger.info("copied checkpoint %s to %s", src, dst)
    return dst


# ====================================================================== trainer files
def append_log_row(directory: str | Path, row: Mapping[str, Any]) -> Path:
    """Append ``row`` to ``directory/training_log.csv``, writing the header when it is new.

    The first row fixes the columns; a later row may leave some out (empty cells) but may not add
    any. Returns the CSV path.
    """
    file = Path(directory) / LOG_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    columns = list(row)
    new = not file.exists() or file.stat().st_size == 0
    if not new:
        with file.open(newline="", encoding="utf-8") as f:
            columns = next(csv.reader(f), [])
        if extra := [c for c in row if c not in columns]:
            raise CheckpointError(f"{file}: columns {extra} are not in its header {columns}")
    with file.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())
    return file


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically: a temp file beside it, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, _dumps(obj, path.name))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


# ====================================================================== directory set
@dataclass(frozen=True)
class CheckpointDirs:
    """The checkpoint directories under one training output directory (see the module doc)."""

    root: Path
    latest: Path
    best: Path

    def epoch(self, epoch: int) -> Path:
        """``epoch_001`` for epoch 1."""
        return self.root / f"epoch_{epoch:03d}"

    def timed(self, when: datetime | None = None) -> Path:
        """``timed_YYYYmmdd_HHMMSS`` for ``when`` (default: now, local time)."""
        return self.root / f"timed_{(when or datetime.now()):%Y%m%d_%H%M%S}"

    def epochs(self) -> list[Path]:
        """Existing ``epoch_*`` checkpoints, in epoch order."""
        found = [p for p in self.root.glob("epoch_*") if re.fullmatch(r"epoch_\d+", p.name)]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def timed_dirs(self) -> list[Path]:
        """Existing ``timed_*`` checkpoints, oldest first."""
        return sorted(p for p in self.root.glob("timed_*")
                      if re.fullmatch(r"timed_\d{8}_\d{6}", p.name))


def checkpoint_dirs(out_dir: str | Path) -> CheckpointDirs:
    """The named checkpoint paths under ``out_dir`` (nothing is created)."""
    root = Path(out_dir)
    return CheckpointDirs(root=root, latest=root / "latest", best=root / "best")


# ====================================================================== atomic directories
def _sibling(directory: Path, kind: str, pid: int | None = None) -> Path:
    return directory.with_name(f".{directory.name}.{kind}-{os.getpid() if pid is None else pid}")


def _write_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a fresh sibling temp directory, fsync it, swap it into place."""
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover(directory)
    tmp = _sibling(directory, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        _swap_into_place(tmp, directory)
    except BaseException:
        _remove_tree(tmp)
        raise


def _swap_into_place(new: Path, target: Path) -> None:
    trash = _sibling(target, "old")
    had_old = target.exists()
    if had_old:
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(target, trash)
    try:
        os.replace(new, target)
    except BaseException:
        if had_old:
            os.replace(trash, target)
        raise
    _fsync_dir(target.parent)
    if had_old:
        _remove_tree(trash)


def _leftovers(directory: Path) -> list[tuple[str, int, Path]]:
    """(kind, pid, path) of the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` siblings."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.(tmp|old)-(\d+)")
    found = []
    if directory.parent.is_dir():
        for p in directory.parent.iterdir():
            if m := pattern.fullmatch(p.name):
                found.append((m[1], int(m[2]), p))
    return found


def _recover(directory: Path) -> None:
    """Clean up after saves that were killed: restore the old checkpoint of a half-done swap,
    remove temp directories of processes that no longer run."""
    stale = [(kind, p) for kind, pid, p in _leftovers(directory)
             if pid == os.getpid() or not _pid_alive(pid)]
    # Old checkpoints first, newest first: at most one is restored, the rest are removed.
    stale.sort(key=lambda item: (item[0] != "old", -item[1].stat().st_mtime))
    for kind, p in stale:
        if kind == "old" and not directory.exists() and (p / CONFIG_FILE).is_file():
            logger.warning("restoring %s from %s, left by an interrupted save", directory, p)
            os.replace(p, directory)
        else:
            logger.warning("removing %s, left by an interrupted save", p)
            shutil.rmtree(p)


def _resolve(directory: Path) -> Path:
    """The directory to read: ``directory``, or the old checkpoint of an unfinished swap."""
    if directory.is_dir():
        return directory
    if directory.exists():
        raise CheckpointError(f"{directory}: not a directory")
    old = [p for kind, _, p in _leftovers(directory)
           if kind == "old" and (p / CONFIG_FILE).is_file()]
    if old:
        chosen = max(old, key=lambda p: p.stat().st_mtime)
        logger.warning("%s is being replaced; reading the previous checkpoint %s",
                       directory, chosen)
        return chosen
    raise CheckpointError(f"{directory}: no such checkpoint directory")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def _remove_tree(path: Path) -> None:
    """Remove a directory on a cleanup path; a failure is logged, not raised over the real error.
    The next save removes what is left."""
    if not path.exists():
        return
    try:
        shutil.rmtree(path)
    except OSError as exc:
        logger.warning("could not remove %s (%s); the next save removes it", path, exc)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":  # directories cannot be opened for fsync elsewhere
        _fsync_file(path)


def _write_file(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ====================================================================== tensors and JSON
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself for a ``torch.compile``d model (whose keys carry ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def _tensors_for_saving(tensors: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
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


def _save_tensors(tensors: dict[str, Tensor], file: Path) -> None:
    save_file(tensors, str(file), metadata={"format": "pt"})
    _fsync_file(file)


def _load_tensors(file: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    device = map_location if isinstance(map_location, (str, int)) else str(map_location)
    try:
        return load_file(str(file), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt "
                              f"({exc})") from exc


def _load_tokenizer(file: Path) -> Tokenizer:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return Tokenizer.load(file)
    except ValueError as exc:  # TokenizerError included
        message = str(exc)
        raise CheckpointError(message if str(file) in message else f"{file}: {message}") from exc


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: invalid JSON ({exc})") from exc


def _read_config(file: Path) -> dict:
    data = _read_json(file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(data).__name__}")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file}: checkpoint format {data.get('format')!r}, this code reads "
                              f"format {CHECKPOINT_FORMAT}")
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


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
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
    return _tensors_for_saving(tensors, "optimizer state"), meta


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


def _dumps(obj: Any, what: str) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, PurePath):
            return str(value)
        raise TypeError(f"{what}: cannot store a {type(value).__name__} ({value!r}) in JSON")

    return json.dumps(obj, indent=2, default=default) + "\n"


def _first(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


__all__ = [
    "CHECKPOINT_FORMAT", "Checkpoint", "CheckpointDirs", "CheckpointError", "append_log_row",
    "check_state_dict", "checkpoint_dirs", "link_or_copy", "load_checkpoint",
    "load_model", "load_optimizer_state", "save_checkpoint", "write_json",
]


# ====================================================================== model loading
def load_model(directory: str | Path, *, device: str | torch.device = "cpu"
               ) -> tuple["FieldMachine", Tokenizer, Checkpoint]:
    """Rebuild the Field Machine of a checkpoint in eval mode on ``device``.

    Checks the weights against ``ModelConfig(**config)`` (a mismatch is a CheckpointError
    naming the file).
    """
    from model.fm import FieldMachine, ModelConfig  # the model module does not depend on this one

    loaded = load_checkpoint(directory, map_location=device)
    try:
        config = ModelConfig(**loaded.model_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{loaded.path / CONFIG_FILE}: model settings do not fit: {exc}") from exc
    model = FieldMachine(config).to(device)
    loaded.load_into(model)
    return model.eval(), loaded.tokenizer, loaded
