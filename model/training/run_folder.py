"""A training run's folder: its checkpoint directories, its log and its statistics.

::

    latest/                    the newest state, rewritten every so many steps; resume from here
    best/                      the checkpoint with the lowest validation loss so far
    epoch_001/, epoch_002/ ... one per finished epoch, kept
    timed_YYYYmmdd_HHMMSS/     one every so many minutes of wall-clock time, kept
    training_log.csv           a row every so many steps (:func:`append_log_row`)
    run_stats.json             the run's summary, written at its end

Each checkpoint the trainer saves carries the log and the statistics of the one it replaces
(:data:`TRAINER_FILES`, passed as ``keep`` to :func:`model.checkpoint.format.save_checkpoint`),
so ``latest`` keeps the whole log.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from model.checkpoint.files import CheckpointError

LOG_FILE = "training_log.csv"
RUN_STATS_FILE = "run_stats.json"
TRAINER_FILES = (LOG_FILE, RUN_STATS_FILE)


@dataclass(frozen=True)
class CheckpointDirs:
    """The checkpoint directories under one training output directory (see the module docstring)."""

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
