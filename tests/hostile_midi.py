"""Hostile MIDI files, the kinds that once crashed or stalled the reader: written to
``tests/fixtures/hostile`` by ``python -m tests.hostile_midi`` and kept there as fixtures."""

from __future__ import annotations

import struct
import sys

from tests.fuzz_midi import EOT, HOSTILE, smf, vlq

NOTE = b"\x90\x3c\x40"  # note on, middle C
OFF = b"\x80\x3c\x00"


def hostile_files() -> dict[str, bytes]:
    huge_delta = smf([b"\x00" + NOTE + b"\x8f\xff\xff\x7f" + OFF + EOT], division=96)  # a note 2.8 M beats long
    late_note = smf([vlq(0x0FFFFFFF) + NOTE + b"\x60" + OFF + EOT], division=96)  # one note 2.8 M beats in
    many_tracks = smf([b"\x00" + NOTE + b"\x60" + OFF + EOT] * 3000, ntracks=65535)
    declared_tracks = smf([b"\x00" + NOTE + b"\x60" + OFF + EOT], ntracks=65535)
    broken_key = smf([b"\x00\xff\x59\x02\x14\x05" + b"\x00" + NOTE + b"\x60" + OFF + EOT])
    zero_tempo = smf([b"\x00\xff\x51\x03\x00\x00\x00" + b"\x00" + NOTE + b"\x60" + OFF + EOT])
    huge_denominator = smf([b"\x00\xff\x58\x04\x04\xff\x18\x08" + b"\x00" + NOTE + vlq(96 * 20_000) + OFF + EOT],
                           division=96)
    tiny_bars = smf([b"\x00\xff\x58\x04\x01\x06\x18\x08" + b"\x00" + NOTE + vlq(480 * 50_000) + OFF + EOT])
    zero_division = smf([b"\x00" + NOTE + b"\x60" + OFF + EOT], division=0)
    smpte = smf([b"\x00" + NOTE + b"\x60" + OFF + EOT], division=0xE728)
    truncated_header = b"MThd" + struct.pack(">L", 6) + b"\x00\x01"
    return {"huge_delta.mid": huge_delta, "late_note.mid": late_note, "many_tracks.mid": many_tracks,
            "declared_tracks.mid": declared_tracks, "broken_key_signature.mid": broken_key,
            "zero_tempo.mid": zero_tempo, "huge_denominator.mid": huge_denominator, "tiny_bars.mid": tiny_bars,
            "zero_division.mid": zero_division, "smpte.mid": smpte, "truncated_header.mid": truncated_header}


def main() -> int:
    HOSTILE.mkdir(parents=True, exist_ok=True)
    for name, data in hostile_files().items():
        (HOSTILE / name).write_bytes(data)
        print(f"{HOSTILE / name}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
