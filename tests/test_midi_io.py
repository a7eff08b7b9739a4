"""Reading MIDI files into notes: pairing rules, maps, voices, and writing back."""

from __future__ import annotations

import struct

import mido
import pytest

from model.midi.read import read_midi
from model.midi.score import MidiReadError
from model.midi.write import score_to_midifile, write_midi
from tests.midi_builders import build_midi


def smf(*tracks: bytes, division: int = 96, fmt: int = 1) -> bytes:
    """A MIDI file from raw track bodies (event bytes), with correct chunk lengths."""
    out = b"MThd" + struct.pack(">IHHH", 6, fmt, len(tracks), division)
    for body in tracks:
        out += b"MTrk" + struct.pack(">I", len(body)) + body
    return out


END = b"\x00\xff\x2f\x00"


def test_notes_carry_ticks_beats_channel_track_and_voice():
    score = read_midi(build_midi([(0, 1, 60, 90, 0), (0.5, 1.5, 48, 70, 1)], ticks_per_beat=96))
    assert score.ticks_per_beat == 96 and not score.recovered
    first, second = score.notes
    assert (first.pitch, first.velocity, first.onset_tick, first.duration_tick) == (60, 90, 0, 96)
    assert (first.onset_beat, first.duration_beat, first.track, first.voice) == (0, 1, 1, 0)
    assert (second.pitch, second.onset_beat, second.duration_beat, second.voice) == (48, 0.5, 1.5, 1)


def test_tempo_and_time_signature_maps():
    score = read_midi(build_midi([(0, 1, 60), (7, 1, 62)], tempo_bpm=90,
                                 time_signatures=[(0, 3, 4), (3, 2, 2)]))
    assert [round(t.bpm, 3) for t in score.tempos] == [90]
    assert [(s.tick / score.ticks_per_beat, s.numerator, s.denominator) for s in score.time_signatures] == [
        (0, 3, 4), (3, 2, 2)]


def test_running_status_and_velocity_zero_note_off():
    # note_on C4, then running status: E4 on, C4 "on" with velocity 0 (= off), E4 off.
    body = b"\x00\x90\x3c\x40" b"\x00\x40\x40" b"\x60\x3c\x00" b"\x30\x40\x00" + END
    score = read_midi(smf(body))
    assert sorted((n.pitch, n.onset_tick, n.duration_tick) for n in score.notes) == [(60, 0, 96), (64, 0, 144)]
    assert not score.recovered and score.problems == []


def test_restruck_pitch_ends_the_sounding_note():
    # C4 on at 0, C4 on again at 48, one off at 96, another off at 144 (left over).
    body = (b"\x00\x90\x3c\x40" b"\x30\x90\x3c\x40" b"\x30\x80\x3c\x00" b"\x30\x80\x3c\x00" + END)
    score = read_midi(smf(body))
    assert [(n.onset_tick, n.duration_tick) for n in score.notes] == [(0, 48), (48, 48)]
    assert "1 notes re-struck while sounding (ended at the new onset)" in score.problems
    assert "1 note-offs without a sounding note (ignored)" in score.problems


def test_note_never_released_ends_at_the_end_of_the_file():
    held = b"\x00\x90\x3c\x40" + b"\x00\xff\x2f\x00"
    other = b"\x00\x90\x40\x40" + b"\x83\x00\x80\x40\x00" + END  # E4 for 384 ticks
    score = read_midi(smf(held, other))
    assert sorted((n.pitch, n.duration_tick) for n in score.notes) == [(60, 384), (64, 384)]
    assert "1 notes never released (ended at the end of the file)" in score.problems


def test_type0_voices_are_channels():
    body = (b"\x00\x92\x30\x40" b"\x00\x90\x48\x40" b"\x60\x82\x30\x00" b"\x00\x80\x48\x00" + END)
    score = read_midi(smf(body, fmt=0))
    assert sorted((n.pitch, n.channel, n.voice) for n in score.notes) == [(48, 2, 1), (72, 0, 0)]


def test_type1_voices_follow_track_order():
    score = read_midi(build_midi([(0, 1, 72, 80, 0), (0, 1, 60, 80, 1), (0, 1, 48, 80, 2)]))
    assert {n.pitch: n.voice for n in score.notes} == {72: 0, 60: 1, 48: 2}


@pytest.mark.parametrize("data, message", [
    (b"", "not a readable MIDI file"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "not a readable MIDI file"),
    (b"MThd\x00\x00", "not a readable MIDI file"),
], ids=["empty", "wav", "truncated-header"])
def test_not_midi_is_a_clear_error(data, message):
    with pytest.raises(MidiReadError, match=f"upload.mid: {message}"):
        read_midi(data, name="upload.mid")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MidiReadError, match="nowhere.mid: cannot open"):
        read_midi(tmp_path / "nowhere.mid")


def test_no_notes_is_a_clear_error():
    with pytest.raises(MidiReadError, match="holds no notes"):
        read_midi(build_midi([]), name="silent.mid")


def test_written_file_reads_back_the_same(tmp_path):
    score = read_midi(build_midi([(0, 1, 60, 90, 0), (0, 2, 48, 50, 1), (1, 1, 60, 90, 0)],
                                 tempo_bpm=72, time_signatures=[(0, 3, 4)]))
    path = tmp_path / "out.mid"
    write_midi(score, path)
    again = read_midi(path)
    strip = lambda s: [(n.pitch, n.velocity, n.onset_tick, n.duration_tick, n.voice) for n in s.notes]
    assert strip(again) == strip(score)
    assert again.tempos == score.tempos and again.time_signatures == score.time_signatures
    # Voices go to separate tracks and channels.
    midi = score_to_midifile(score)
    channels = [{m.channel for m in t if m.type == "note_on"} for t in midi.tracks[1:]]
    assert channels == [{0}, {1}]
    assert isinstance(mido.MidiFile(path), mido.MidiFile)
