"""Read MIDI files into typed note records, and write them back.

A file is read strictly with mido first. When that fails (real files carry running status with
no status byte, data bytes over 127, truncated tracks, missing track headers), the tolerant reader
in :mod:`model.midi.repair` recovers every event it can, and the returned :class:`Score` says what
was dropped. A file that cannot be read at all raises :class:`MidiReadError` with the reason.

Note pairing rules (the same for every file):

* ``note_on`` with velocity 0 is a note-off;
* a ``note_on`` for a pitch already sounding on the same track and channel ends the sounding
  note at that tick and starts a new one (re-strike);
* a note-off with no sounding note is ignored (counted in ``Score.problems``);
* a note never released ends at the last event tick of the file (counted in ``Score.problems``).

Voices: in a type 1 file every (track, channel) pair that holds notes is one voice, numbered in
track order; in a type 0 file every channel is one voice.

Every failure is a :class:`MidiReadError` naming the file and saying what is wrong, whatever the
bytes (the reader is fuzzed: ``python -m tests.fuzz_midi``); a file over one of the
:class:`model.midi.limits.ReadLimits` is refused before the expensive work. A tempo of 0 and a
time signature with a 0 numerator are left out (counted in ``Score.problems``).
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import mido

from model.midi.limits import Deadline, ReadLimits
from model.midi.repair import MidiRepairError, read_tolerant
from model.midi.score import (DEFAULT_TEMPO, DEFAULT_TIME_SIGNATURE, MidiReadError, Note, Score,
                              TempoChange, TimeSignature)

logger = logging.getLogger(__name__)

MIDI_SUFFIXES = (".mid", ".midi", ".smf", ".kar")
MAX_DENOMINATOR = 64  # time signatures below 1/64 (a bar shorter than a 64th) are not music


def find_midi_files(midi_dir: str | Path) -> list[Path]:
    """Every MIDI file under ``midi_dir`` (searched recursively), in path order."""
    root = Path(midi_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{midi_dir}: no such folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES)


def read_midi(source: str | Path | bytes, *, name: str | None = None,
              limits: ReadLimits | None = None) -> Score:
    """Read a MIDI file (a path or its bytes) into a :class:`Score`.

    Raises :class:`MidiReadError` if the data is not MIDI, cannot be recovered, holds no notes, or
    passes one of ``limits`` (default :class:`ReadLimits`).
    """
    limits = limits or ReadLimits()
    deadline = Deadline(limits.seconds)
    if isinstance(source, (str, Path)):
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise MidiReadError(f"{name}: cannot open: {exc.strerror or exc}") from exc
    else:
        data = bytes(source)
        name = name or "<bytes>"
    strict_error: Exception | None = None
    try:
        midi = mido.MidiFile(file=io.BytesIO(data))
    except Exception as exc:  # mido raises many kinds (KeySignatureError, EOFError, ...)
        strict_error = exc
    else:
        if not _has_notes(midi):  # e.g. a header that declares tracks mido does not read
            strict_error = MidiReadError("no notes in the tracks the header declares")
    recovered, repair_problems = False, []
    if strict_error is not None:
        try:
            midi, report = read_tolerant(data, limits, deadline)
        except MidiRepairError as exc:
            raise MidiReadError(f"{name}: not a readable MIDI file: {exc}") from exc
        except Exception as exc:  # a reader bug must not escape as another type
            logger.exception("%s: the tolerant reader failed", name)
            raise MidiReadError(f"{name}: not a readable MIDI file ({type(exc).__name__}: {exc})") from exc
        recovered, repair_problems = True, list(report.problems)
        logger.info("%s: strict read failed (%s); recovered with: %s", name, strict_error,
                    "; ".join(repair_problems) or "no changes")
    try:
        score = score_from_midifile(midi, source=name, limits=limits, deadline=deadline)
    except MidiReadError:
        raise
    except Exception as exc:  # values no MIDI file should hold; say so rather than crash
        logger.exception("%s: pairing notes failed", name)
        raise MidiReadError(f"{name}: not a readable MIDI file ({type(exc).__name__}: {exc})") from exc
    score.recovered = recovered
    score.problems = repair_problems + score.problems
    if not score.notes:
        raise MidiReadError(f"{name}: the file holds no notes")
    return score


def _has_notes(midi: mido.MidiFile) -> bool:
    return any(msg.type == "note_on" for track in midi.tracks for msg in track)


def score_from_midifile(midi: mido.MidiFile, *, source: str = "<bytes>", limits: ReadLimits | None = None,
                        deadline: Deadline | None = None) -> Score:
    """Pair note-ons with note-offs and collect the tempo and time-signature maps.

    Raises :class:`MidiReadError` for a file over ``limits`` or past ``deadline``."""
    limits = limits or ReadLimits()
    tpb = midi.ticks_per_beat
    if not isinstance(tpb, int) or tpb < 0:
        raise MidiReadError(f"{source}: SMPTE time division is not supported")
    if tpb == 0:
        raise MidiReadError(f"{source}: the header says 0 ticks per beat")
    limits.check("track count", len(midi.tracks), "max_tracks", source, MidiReadError)
    limits.check("event count", sum(len(track) for track in midi.tracks), "max_events", source, MidiReadError)
    last_tick = max((sum(msg.time for msg in track) for track in midi.tracks), default=0)
    limits.check("length in beats", last_tick / tpb, "max_beats", source, MidiReadError)
    problems: Counter[str] = Counter()
    raw: list[tuple[int, int, int, int, int, int]] = []  # onset, end, pitch, velocity, channel, track
    tempos: dict[int, int] = {}
    signatures: dict[int, tuple[int, int]] = {}
    track_ends: list[int] = []
    open_notes: list[dict[tuple[int, int], tuple[int, int]]] = []

    for track_index, track in enumerate(midi.tracks):
        tick = 0
        sounding: dict[tuple[int, int], tuple[int, int]] = {}  # (channel, pitch) -> (onset, velocity)
        if deadline is not None and deadline.passed():
            raise MidiReadError(f"{source}: reading took longer than {deadline.seconds:g} s (the limit, seconds)")
        limits.check("note count", len(raw), "max_notes", source, MidiReadError)
        for msg in track:
            tick += msg.time
            kind = msg.type
            if kind == "note_on" and msg.velocity > 0:
                key = (msg.channel, msg.note)
                if key in sounding:
                    onset, velocity = sounding[key]
                    raw.append((onset, tick, msg.note, velocity, msg.channel, track_index))
                    problems["notes re-struck while sounding (ended at the new onset)"] += 1
                sounding[key] = (tick, msg.velocity)
            elif kind == "note_off" or kind == "note_on":
                key = (msg.channel, msg.note)
                if key in sounding:
                    onset, velocity = sounding.pop(key)
                    raw.append((onset, tick, msg.note, velocity, msg.channel, track_index))
                else:
                    problems["note-offs without a sounding note (ignored)"] += 1
            elif kind == "set_tempo":
                if msg.tempo > 0:
                    tempos[tick] = msg.tempo
                else:
                    problems["tempo changes of 0 microseconds per beat (ignored)"] += 1
            elif kind == "time_signature":
                if 0 < msg.numerator and 0 < msg.denominator <= MAX_DENOMINATOR:
                    signatures[tick] = (msg.numerator, msg.denominator)
                else:
                    problems[f"time signatures with a 0 numerator or a denominator not in 1-{MAX_DENOMINATOR} "
                             "(ignored)"] += 1
        track_ends.append(tick)
        open_notes.append(sounding)

    limits.check("note count", len(raw), "max_notes", source, MidiReadError)
    file_end = max(track_ends, default=0)
    for track_index, sounding in enumerate(open_notes):
        for (channel, pitch), (onset, velocity) in sounding.items():
            raw.append((onset, file_end, pitch, velocity, channel, track_index))
            problems["notes never released (ended at the end of the file)"] += 1

    voice_of = _assign_voices(raw, midi.type)
    raw.sort(key=lambda r: (r[0], voice_of[(r[5], r[4])], -r[2]))
    notes = [
        Note(pitch=pitch, velocity=velocity, onset_tick=onset, duration_tick=end - onset,
             onset_beat=onset / tpb, duration_beat=(end - onset) / tpb, channel=channel,
             track=track_index, voice=voice_of[(track_index, channel)])
        for onset, end, pitch, velocity, channel, track_index in raw
    ]
    if 0 not in tempos:
        tempos[0] = DEFAULT_TEMPO
    if 0 not in signatures:
        signatures[0] = DEFAULT_TIME_SIGNATURE
    return Score(
        ticks_per_beat=tpb,
        notes=notes,
        tempos=[TempoChange(t, tempos[t]) for t in sorted(tempos)],
        time_signatures=[TimeSignature(t, *signatures[t]) for t in sorted(signatures)],
        midi_type=midi.type,
        source=source,
        problems=[f"{count} {what}" for what, count in problems.items()],
    )


def _assign_voices(raw: list[tuple[int, int, int, int, int, int]],
                   midi_type: int) -> dict[tuple[int, int], int]:
    """Number the (track, channel) pairs that hold notes: 0, 1, ... in track then channel order."""
    pairs = sorted({(r[5], r[4]) for r in raw})
    if midi_type == 0:
        channels = sorted({channel for _, channel in pairs})
        return {pair: channels.index(pair[1]) for pair in pairs}
    return {pair: index for index, pair in enumerate(pairs)}

