"""Tests for the tolerant MIDI reader (model.midi_repair), on hand-made broken files."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import mido
import pytest

from model.midi.repair import MidiRepairError, RepairReport, read_tolerant

STRICT_FAILURES = [
    "suites/airgstr4.mid", "wtcbki/fugue11.mid", "wtcbki/fugue12.mid", "wtcbki/fugue13.mid",
    "wtcbki/fugue15.mid", "wtcbki/fugue19.mid", "wtcbki/fugue24.mid", "wtcbki/fugue6.mid",
    "wtcbki/fugue8.mid", "wtcbki/prelude1.mid", "wtcbki/prelude2.mid",
]

END = b"\x00\xff\x2f\x00"  # delta 0, End-of-Track
TEMPO = b"\x00\xff\x51\x03\x07\xa1\x20"  # delta 0, set_tempo 500000


# ----------------------------------------------------------------------------- helpers


def header(ntracks: int, fmt: int = 1, tpb: int = 96) -> bytes:
    return b"MThd" + struct.pack(">LHHH", 6, fmt, ntracks, tpb)


def chunk(body: bytes, length: int | None = None, name: bytes = b"MTrk") -> bytes:
    return name + struct.pack(">L", len(body) if length is None else length) + body


def name_event(text: bytes) -> bytes:
    return b"\x00\xff\x03" + bytes([len(text)]) + text


def scale_track(channel: int, pitches: list[int], *, start_delta: int = 0) -> bytes:
    """Quarter notes (96 ticks) on ``channel``, written without running status."""
    body = bytearray()
    for index, pitch in enumerate(pitches):
        body += bytes([start_delta if index == 0 else 0, 0x90 | channel, pitch, 64])
        body += bytes([0x60, 0x80 | channel, pitch, 64])
    return bytes(body)


def scale_notes(track: int, pitches: list[int], start: int = 0) -> list[tuple[int, str, int, int]]:
    notes = []
    for index, pitch in enumerate(pitches):
        onset = start + 96 * index
        notes += [(track, "on", pitch, onset), (track, "off", pitch, onset + 96)]
    return notes


def notes_of(midi: mido.MidiFile) -> list[tuple[int, str, int, int]]:
    """(track, 'on'/'off', pitch, absolute tick) for every note message; velocity 0 is 'off'."""
    notes = []
    for track_index, track in enumerate(midi.tracks):
        tick = 0
        for msg in track:
            tick += msg.time
            if msg.type in ("note_on", "note_off"):
                kind = "on" if msg.type == "note_on" and msg.velocity > 0 else "off"
                notes.append((track_index, kind, msg.note, tick))
    return notes


def problems_text(report: RepairReport) -> str:
    return "\n".join(report.problems)


def strict_fails(data: bytes) -> bool:
    try:
        mido.MidiFile(file=io.BytesIO(data))
    except (OSError, EOFError, ValueError, KeyError, IndexError):
        return True
    return False


# ----------------------------------------------------------------------------- good data


def test_well_formed_file_is_read_like_mido() -> None:
    midi = mido.MidiFile(type=1, ticks_per_beat=96)
    conductor = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=400_000),
                                mido.MetaMessage("time_signature", numerator=3, denominator=4)])
    notes = mido.MidiTrack([mido.MetaMessage("track_name", name="Sopran"),
                            mido.Message("program_change", program=6),
                            mido.Message("note_on", note=60, velocity=70, time=0),
                            mido.Message("note_on", note=60, velocity=0, time=96),
                            mido.Message("sysex", data=[0x7E, 0x7F, 0x09, 0x01]),
                            mido.Message("note_on", note=64, velocity=70, time=10),
                            mido.Message("note_off", note=64, velocity=0, time=86)])
    midi.tracks += [conductor, notes]
    buffer = io.BytesIO()
    midi.save(file=buffer)
    data = buffer.getvalue()

    recovered, report = read_tolerant(data)

    strict = mido.MidiFile(file=io.BytesIO(data))
    assert (recovered.type, recovered.ticks_per_beat) == (1, 96)
    assert [list(track) for track in recovered.tracks] == [list(track) for track in strict.tracks]
    assert report == RepairReport([], 0, 0)


# ----------------------------------------------------------------------------- broken data


def test_missing_running_status_at_track_start_is_inferred() -> None:
    # The first note event has a delta time and data bytes but no status byte, and there is no
    # running status yet; the stream continues with explicit note_off/note_on on channel 0.
    body = b"\x00\x3c\x40" + b"\x60\x80\x3c\x40" + b"\x00\x90\x3e\x40\x60\x80\x3e\x40" + END
    data = header(2) + chunk(TEMPO + END) + chunk(body)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(1, [60, 62])
    assert midi.tracks[1][0] == mido.Message("note_on", channel=0, note=60, velocity=64, time=0)
    assert ("track 1: 1 event with no status byte and no running status (status 0x90"
            in problems_text(report))
    assert (report.dropped_events, report.dropped_bytes) == (0, 0)


def test_text_meta_length_too_long_swallowing_the_next_status() -> None:
    # As in wtcbki/fugue11.mid: the text "RH L /LH H" (10 bytes) is declared as 13 bytes, which
    # swallows the next event's delta time (81 70 = 240) and status byte (91).
    text = b"RH L /LH H"
    body = (b"\x00\xff\x01\x0d" + text + b"\x81\x70\x91\x3c\x40" + b"\x78\x81\x3c\x40"
            + b"\x00\x91\x3e\x40\x78\x81\x3e\x40" + END)
    data = header(2, tpb=240) + chunk(TEMPO + END) + chunk(body)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert midi.tracks[1][0] == mido.MetaMessage("text", text="RH L /LH H")
    assert notes_of(midi) == [(1, "on", 60, 240), (1, "off", 60, 360),
                              (1, "on", 62, 360), (1, "off", 62, 480)]
    assert {msg.channel for msg in midi.tracks[1] if msg.type.startswith("note")} == {1}
    assert "track 1: 1 text meta event 3 bytes too long" in problems_text(report)


def test_missing_delta_time_before_meta_event() -> None:
    # As in suites/airgstr4.mid: a track whose first delta byte is missing (declared length 12,
    # 11 bytes present), so the next track header follows one byte early.
    short = b"\xff\x04\x04Bach" + END
    data = (header(3) + chunk(TEMPO + END) + chunk(short, length=len(short) + 1)
            + chunk(scale_track(0, [67]) + END))
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert len(midi.tracks) == 3
    assert midi.tracks[1][0] == mido.MetaMessage("instrument_name", name="Bach", time=0)
    assert notes_of(midi) == scale_notes(2, [67])
    text = problems_text(report)
    assert "track 1: 1 event with a missing delta time" in text
    assert "track 1: declared length 12 is wrong" in text


def test_data_byte_over_127_is_clipped() -> None:
    body = b"\x00\x90\x3c\xc8" + b"\x60\x80\x3c\x40" + b"\x00\x90\x3e\x40\x60\x80\x3e\x40" + END
    data = header(2) + chunk(TEMPO + END) + chunk(body)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(1, [60, 62])
    assert midi.tracks[1][0].velocity == 127
    assert "track 1: 1 data byte over 127 clipped to 127" in problems_text(report)
    assert (report.dropped_events, report.dropped_bytes) == (0, 0)


def test_truncated_track_is_read_to_end_of_file(tmp_path: Path) -> None:
    # The last track declares 200 bytes but the file ends inside a note_off (delta + status + pitch).
    body = scale_track(0, [60, 62]) + END
    cut = body[:-5]  # drops "40" (velocity) and the End-of-Track
    path = tmp_path / "truncated.mid"
    path.write_bytes(header(2) + chunk(TEMPO + END) + chunk(cut, length=200))
    data = path.read_bytes()
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(1, [60, 62])[:-1]  # the last note is left sounding
    text = problems_text(report)
    assert "track 1: truncated" in text
    assert "1 note left sounding" in text
    assert (report.dropped_events, report.dropped_bytes) == (1, 3)


def test_truncated_track_at_event_boundary() -> None:
    body = scale_track(0, [60, 62])
    data = header(1) + chunk(body, length=len(body) + 4)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(0, [60, 62])
    assert "track 0: truncated: no End-of-Track before the end of the file" in problems_text(report)
    assert (report.dropped_events, report.dropped_bytes) == (0, 0)


def test_missing_mtrk_header_is_read_as_a_track() -> None:
    # The second track's 8-byte chunk header is missing altogether.
    data = (header(3) + chunk(TEMPO + END) + name_event(b"Alto") + scale_track(1, [64, 65]) + END
            + chunk(scale_track(2, [48]) + END))
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert len(midi.tracks) == 3
    assert midi.tracks[1][0] == mido.MetaMessage("track_name", name="Alto")
    assert notes_of(midi) == scale_notes(1, [64, 65]) + scale_notes(2, [48])
    assert "track 1: MTrk header missing" in problems_text(report)


def test_damaged_mtrk_id_is_read_as_a_track() -> None:
    data = header(3) + chunk(TEMPO + END) + chunk(scale_track(1, [64, 65]) + END, name=b"MTrx") + \
        chunk(scale_track(2, [48]) + END)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(1, [64, 65]) + scale_notes(2, [48])
    assert "track 1: chunk id 'MTrx' instead of 'MTrk'" in problems_text(report)


@pytest.mark.parametrize("error", [+10, -5], ids=["too-long", "too-short"])
def test_wrong_track_length_is_read_up_to_end_of_track(error: int) -> None:
    body = scale_track(0, [60, 62, 64]) + END
    data = header(2) + chunk(body, length=len(body) + error) + chunk(scale_track(1, [48, 50]) + END)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(0, [60, 62, 64]) + scale_notes(1, [48, 50])
    assert f"track 0: declared length {len(body) + error} is wrong" in problems_text(report)
    assert (report.dropped_events, report.dropped_bytes) == (0, 0)


def test_garbage_between_tracks_is_skipped() -> None:
    garbage = b"\x00\x00garbage!\x7f"
    data = header(2) + chunk(scale_track(0, [60]) + END) + garbage + chunk(scale_track(1, [48]) + END)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(0, [60]) + scale_notes(1, [48])
    assert f"file: {len(garbage)} bytes of garbage" in problems_text(report)
    assert report.dropped_bytes == len(garbage)


def test_undefined_status_byte_is_dropped_keeping_time() -> None:
    # delta 48 + undefined status F4, then the note_off 48 ticks later: the note still lasts 96.
    body = (b"\x00\x90\x3c\x40" + b"\x30\xf4" + b"\x30\x80\x3c\x40"
            + b"\x00\x90\x3e\x40\x60\x80\x3e\x40" + END)
    data = header(1) + chunk(body)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(0, [60, 62])
    assert "track 0: 1 event with undefined status byte 0xF4 dropped" in problems_text(report)
    assert (report.dropped_events, report.dropped_bytes) == (1, 2)


def test_meta_length_past_end_of_file_before_another_track_is_skipped() -> None:
    # A corrupt text length (0x7FFF) in track 0 cannot mean truncation: another track follows.
    body = b"\x00\xff\x01\x81\xff\x7fabc" + scale_track(0, [60, 62, 64, 65, 67]) + END
    data = header(2) + chunk(body) + chunk(scale_track(1, [48]) + END)
    assert strict_fails(data)

    midi, report = read_tolerant(data)

    assert notes_of(midi) == scale_notes(0, [60, 62, 64, 65, 67]) + scale_notes(1, [48])
    assert "track 0: 9 unreadable bytes skipped (eof)" in problems_text(report)
    assert (report.dropped_events, report.dropped_bytes) == (1, 9)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty data"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00", "not a MIDI file"),
    (b"hello, this is plain text and not MIDI at all", "not a MIDI file"),
    (b"MThd\x00\x00\x00\x06\x00\x01", "header truncated"),
    (b"MThd\x00\x00\x00\x06\x00\x01\x00\x00\x00\x60", "no track with any event"),
    (header(1) + b"\x00\x00\x00\x00\x00\x00", "no track with any event"),
], ids=["empty", "wav", "text", "short-header", "no-tracks", "zeros"])
def test_unusable_data_raises_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(MidiRepairError, match=message):
        read_tolerant(data)


def test_midi_repair_error_is_a_value_error() -> None:
    assert issubclass(MidiRepairError, ValueError)


# ----------------------------------------------------------------------------- real files


def test_corpus_files_that_fail_strict_reading_are_recovered(bach_dir: Path) -> None:
    recovered = []
    for name in STRICT_FAILURES:
        try:
            midi, _ = read_tolerant((bach_dir / name).read_bytes())
        except MidiRepairError:
            continue
        if any(msg.type == "note_on" for track in midi.tracks for msg in track):
            recovered.append(name)
    assert len(recovered) >= 9, f"only {recovered} recovered"


def test_corpus_files_that_read_strictly_are_not_changed(bach_dir: Path) -> None:
    accepted = 0
    for path in sorted(bach_dir.rglob("*.mid")):
        data = path.read_bytes()
        try:
            strict = mido.MidiFile(file=io.BytesIO(data))
        except (OSError, EOFError, ValueError, KeyError, IndexError):
            continue
        accepted += 1
        tolerant, report = read_tolerant(data)
        name = path.relative_to(bach_dir)
        assert (tolerant.type, tolerant.ticks_per_beat) == (strict.type, strict.ticks_per_beat), name
        assert [list(t) for t in tolerant.tracks] == [list(t) for t in strict.tracks], name
        assert report == RepairReport([], 0, 0), name
    assert accepted >= 190
