"""Directories and files replaced atomically, with recovery after a kill at any moment.

:func:`write_atomically` writes everything into the sibling ``.<name>.tmp-<pid>``, fsyncs it,
then renames the old directory to ``.<name>.old-<pid>``, renames the new one into place, and
deletes the old one. A process killed at any moment leaves the old complete directory or the new
complete one. In the one window where neither sits under the real name (between the two renames)
the old one is complete under ``.<name>.old-<pid>``: :func:`resolve` reads it from there, and the
next write renames it back first. A directory counts as complete when it holds its ``marker``
file, which the writer writes last. Two processes must not write the same directory at once.

:func:`write_json` replaces one file the same way (temp file beside it, fsync, rename).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

logger = logging.getLogger(__name__)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically: a temp file beside it, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_file(tmp, dumps_json(obj, path.name))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def dumps_json(obj: Any, what: str) -> str:
    """Indented JSON (paths as strings); a value JSON has no type for is a ``TypeError`` naming ``what``."""
    def default(value: Any) -> Any:
        if isinstance(value, PurePath):
            return str(value)
        raise TypeError(f"{what}: cannot store a {type(value).__name__} ({value!r}) in JSON")

    return json.dumps(obj, indent=2, default=default) + "\n"


def sibling(directory: Path, kind: str, pid: int | None = None) -> Path:
    return directory.with_name(f".{directory.name}.{kind}-{os.getpid() if pid is None else pid}")


def write_atomically(directory: Path, write: Callable[[Path], None], marker: str) -> None:
    """Run ``write(tmp)`` on a fresh sibling temp directory, fsync it, swap it into place."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory, marker)
    tmp = sibling(directory, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        fsync_dir(tmp)
        swap_into_place(tmp, directory)
    except BaseException:
        remove_tree(tmp)
        raise


def swap_into_place(new: Path, target: Path) -> None:
    trash = sibling(target, "old")
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
    fsync_dir(target.parent)
    if had_old:
        remove_tree(trash)


def leftovers(directory: Path) -> list[tuple[str, int, Path]]:
    """(kind, pid, path) of the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` siblings."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.(tmp|old)-(\d+)")
    found = []
    if directory.parent.is_dir():
        for p in directory.parent.iterdir():
            if m := pattern.fullmatch(p.name):
                found.append((m[1], int(m[2]), p))
    return found


def recover(directory: Path, marker: str) -> None:
    """Clean up after writes that were killed: restore the old directory of a half-done swap,
    remove temp directories of processes that no longer run."""
    stale = [(kind, p) for kind, pid, p in leftovers(directory)
             if pid == os.getpid() or not _pid_alive(pid)]
    # Old checkpoints first, newest first: at most one is restored, the rest are removed.
    stale.sort(key=lambda item: (item[0] != "old", -item[1].stat().st_mtime))
    for kind, p in stale:
        if kind == "old" and not directory.exists() and (p / marker).is_file():
            logger.warning("restoring %s from %s, left by an interrupted save", directory, p)
            os.replace(p, directory)
        else:
            logger.warning("removing %s, left by an interrupted save", p)
            shutil.rmtree(p)


def resolve(directory: Path, marker: str) -> Path:
    """The directory to read: ``directory``, or the old complete one of an unfinished swap.

    Raises ``NotADirectoryError`` or ``FileNotFoundError`` when there is neither."""
    if directory.is_dir():
        return directory
    if directory.exists():
        raise NotADirectoryError(f"{directory}: not a directory")
    old = [p for kind, _, p in leftovers(directory)
           if kind == "old" and (p / marker).is_file()]
    if old:
        chosen = max(old, key=lambda p: p.stat().st_mtime)
        logger.warning("%s is being replaced; reading the previous one, %s", directory, chosen)
        return chosen
    raise FileNotFoundError(f"{directory}: no such checkpoint directory")


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


def remove_tree(path: Path) -> None:
    """Remove a directory on a cleanup path; a failure is logged, not raised over the real error.
    The next save removes what is left."""
    if not path.exists():
        return
    try:
        shutil.rmtree(path)
    except OSError as exc:
        logger.warning("could not remove %s (%s); the next save removes it", path, exc)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    if os.name == "posix":  # directories cannot be opened for fsync elsewhere
        fsync_file(path)


def write_file(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

