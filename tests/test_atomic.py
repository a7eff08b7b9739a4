"""Atomic files and directories (the checkpoint format's atomic saves are tested in test_checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.checkpoint.atomic import leftovers, resolve, write_atomically, write_json


def test_write_json(tmp_path: Path) -> None:
    path = write_json(tmp_path / "run_stats.json", {"tokens_per_s": 1.5e5, "steps": [1, 2]})
    assert json.loads(path.read_text()) == {"tokens_per_s": 1.5e5, "steps": [1, 2]}
    write_json(path, {"steps": []})
    assert json.loads(path.read_text()) == {"steps": []}
    assert [p.name for p in tmp_path.iterdir()] == ["run_stats.json"]
    with pytest.raises(TypeError, match="run_stats.json: cannot store a set"):
        write_json(path, {"steps": {1}})
    assert json.loads(path.read_text()) == {"steps": []}


def test_a_directory_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "box"

    def write(n: int):
        def fill(tmp: Path) -> None:
            (tmp / "data").write_text(str(n))
            (tmp / "done").write_text("")
        return fill

    write_atomically(target, write(1), "done")
    write_atomically(target, write(2), "done")
    assert (target / "data").read_text() == "2" and leftovers(target) == []
    assert resolve(target, "done") == target
    with pytest.raises(FileNotFoundError, match="no such"):
        resolve(tmp_path / "other", "done")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        write_atomically(tmp_path / "file", write(3), "done")
