"""A training run's folder: its checkpoint directory names and its CSV log."""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import pytest

from model.checkpoint.files import CheckpointError
from model.training.run_folder import append_log_row, checkpoint_dirs


def test_append_log_row(tmp_path: Path) -> None:
    file = append_log_row(tmp_path, {"step": 1, "loss": 3.5, "lr": 0.01})
    append_log_row(tmp_path, {"step": 2, "loss": 3.25})
    with file.open(newline="") as f:
        assert list(csv.reader(f)) == [["step", "loss", "lr"], ["1", "3.5", "0.01"],
                                       ["2", "3.25", ""]]
    with pytest.raises(CheckpointError, match="training_log.csv: columns \\['grad_norm'\\]"):
        append_log_row(tmp_path, {"step": 3, "grad_norm": 1.0})


def test_checkpoint_dirs(tmp_path: Path) -> None:
    dirs = checkpoint_dirs(tmp_path / "run")
    assert (dirs.latest, dirs.best) == (tmp_path / "run" / "latest", tmp_path / "run" / "best")
    assert dirs.epoch(1) == tmp_path / "run" / "epoch_001"
    assert dirs.timed(datetime(2025, 1, 2, 3, 4, 5)) == tmp_path / "run" / "timed_20250102_030405"
    for path in (dirs.epoch(10), dirs.epoch(2), dirs.epoch(1), dirs.timed(datetime(2025, 1, 2, 3, 4, 5)),
                 tmp_path / "run" / "epoch_x", tmp_path / "run" / "timed_soon"):
        path.mkdir(parents=True)
    assert [p.name for p in dirs.epochs()] == ["epoch_001", "epoch_002", "epoch_010"]
    assert [p.name for p in dirs.timed_dirs()] == ["timed_20250102_030405"]
