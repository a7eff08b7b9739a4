"""Write scores as Standard MIDI Files: a conductor track, then one track per voice."""

from __future__ import annotations

import io
from pathlib import Path

import mido

from model.midi.score import Score


def score_to_midifile(score: Score) -> mido.MidiFile:
    """Write a score as a type 1 file: a conductor track, then one track per voice.

    Voice ``v`` plays on channel ``v`` (skipping channel 10, the General MIDI drum channel).
    """
    midi = mido.MidiFile(type=1, ticks_per_beat=score.ticks_per_beat)
    conductor: list[tuple[int, int, mido.MetaMessage]] = []
    for tempo in score.tempos:
        conductor.append((tempo.tick, 0, mido.MetaMessage("set_tempo", tempo=tempo.microseconds_per_beat)))
    for sig in score.time_signatures:
        conductor.append((sig.tick, 0, mido.MetaMessage(
            "time_signature", numerator=sig.numerator, denominator=sig.denominator)))
    midi.tracks.append(events_to_track(conductor))
    for voice in sorted({n.voice for n in score.notes}):
        channel = voice_channel(voice)
        events: list[tuple[int, int, mido.Message]] = []
        for n in score.notes:
            if n.voice != voice:
                continue
            # Offs sort before ons at the same tick so a repeated pitch is not cut short.
            events.append((n.onset_tick, 1, mido.Message(
                "note_on", note=n.pitch, velocity=n.velocity, channel=channel)))
            events.append((n.onset_tick + n.duration_tick, 0, mido.Message(
                "note_off", note=n.pitch, velocity=0, channel=channel)))
        track = events_to_track(events)
        track.insert(0, mido.MetaMessage("track_name", name=f"voice {voice}"))
        midi.tracks.append(track)
    return midi


def voice_channel(voice: int) -> int:
    """The MIDI channel a voice is written on: 0-8, then 10-15 (channel 9 is GM drums)."""
    channel = voice % 15
    return channel if channel < 9 else channel + 1


def events_to_track(events: list[tuple[int, int, mido.Message | mido.MetaMessage]]) -> mido.MidiTrack:
    """A track from ``(absolute tick, order at the same tick, message)``, with delta times."""
    track = mido.MidiTrack()
    now = 0
    for tick, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(msg.copy(time=tick - now))
        now = tick
    return track


def write_midi(score: Score, path: str | Path) -> None:
    score_to_midifile(score).save(str(path))


def midi_bytes(score: Score) -> bytes:
    """The file :func:`write_midi` would write, as bytes."""
    buffer = io.BytesIO()
    score_to_midifile(score).save(file=buffer)
    return buffer.getvalue()
