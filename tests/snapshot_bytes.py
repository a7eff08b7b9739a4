"""Snapshot bytes with their metadata changed, for the tests of bad snapshots."""

from __future__ import annotations

import json
import struct


def with_metadata(data: bytes, change) -> bytes:
    """``data`` with its snapshot metadata changed by ``change(meta)`` (the tensors kept)."""
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    meta = json.loads(header["__metadata__"]["fm_snapshot"])
    change(meta)
    header["__metadata__"]["fm_snapshot"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


def set_key(path: str, value):
    def change(meta):
        *parents, last = path.split(".")
        for part in parents:
            meta = meta[part]
        meta[last] = value
    return change
