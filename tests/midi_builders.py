"""Hand-made MIDI files for the tests, built with mido from readable note lists."""

from __future__ import annotations

import io

import mido

from model.midi.write import events_to_track


def build_midi(notes: list[tuple[float, float, int]] | list[tuple[float, float, int, int, int]],
               *, time_signatures: list[tuple[float, int, int]] = ((0, 4, 4),),
               ticks_per_beat: int = 480, tempo_bpm: float = 120.0, midi_type: int = 1) -> bytes:
    """Bytes of a MIDI file.

    ``notes``: ``(start_beat, duration_beats, pitch[, velocity[, voice]])``; in a type 1 file each
    voice is its own track, in a type 0 file its own channel. ``time_signatures``:
    ``(beat, numerator, denominator)``.
    """
    events: dict[int, list[tuple[int, int, mido.Message]]] = {}
    for note in notes:
        start, duration, pitch, *rest = note
        velocity = rest[0] if rest else 80
        voice = rest[1] if len(rest) > 1 else 0
        on, off = round(start * ticks_per_beat), round((start + duration) * ticks_per_beat)
        channel = voice if midi_type == 0 else 0
        bucket = events.setdefault(voice, [])
        bucket.append((on, 1, mido.Message("note_on", note=pitch, velocity=velocity, channel=channel)))
        bucket.append((off, 0, mido.Message("note_off", note=pitch, velocity=0, channel=channel)))
    meta = [(0, 0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo_bpm)))]
    for beat, num, den in time_signatures:
        meta.append((round(beat * ticks_per_beat), 0,
                     mido.MetaMessage("time_signature", numerator=num, denominator=den)))
    midi = mido.MidiFile(type=midi_type, ticks_per_beat=ticks_per_beat)
    if midi_type == 0:
        merged = meta + [e for voice in sorted(events) for e in events[voice]]
        midi.tracks.append(events_to_track(merged))
    else:
        midi.tracks.append(events_to_track(meta))
        for voice in sorted(events):
            midi.tracks.append(events_to_track(events[voice]))
    out = io.BytesIO()
    midi.save(file=out)
    return out.getvalue()

