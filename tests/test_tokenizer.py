"""The tokenizer as a user meets it: what a MIDI file turns into and what comes back."""

from __future__ import annotations

import math
import subprocess
import sys

import mido
import numpy as np
import pytest

from model.midi.read import read_midi
from model.midi.score import MidiReadError
from model.timebase import TICKS_PER_BEAT
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.dna import DNA_FLOATS
from model.tokenizer.stream import StreamDecoder
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, NOTE, REST, TokenKey, TokenizerConfig, TokenizerError
from tests.midi_builders import build_midi


def fitted(*midis: bytes) -> Tokenizer:
    tokenizer = Tokenizer()
    return tokenizer.fit(tokenizer.events(read_midi(m)) for m in midis)


def stream(tokenizer: Tokenizer, midi: bytes) -> list[str]:
    """The token stream of a file as readable strings."""
    return [str(tokenizer.vocab[t]) for t in tokenizer.encode(read_midi(midi)).ids]


def decoded_notes(tokenizer: Tokenizer, midi: bytes) -> list[tuple[float, int, int, float]]:
    """(onset beat, pitch, voice, duration beats) of decode(encode(file))."""
    score = tokenizer.decode(tokenizer.encode(read_midi(midi)))
    return sorted((n.onset_beat, n.pitch, n.voice, n.duration_beat) for n in score.notes)


def note_keys(tokens: list[str]) -> list[str]:
    return [t for t in tokens if t.startswith(("NOTE", "BAR", "REST"))]


# ---------------------------------------------------------------- meters and positions
def test_three_four_positions_by_hand():
    # Bar 1: quarter notes on beats 1, 2, 3; bar 2: a half note on beat 2.
    midi = build_midi([(0, 1, 60), (1, 1, 62), (2, 1, 64), (4, 2, 65)],
                      time_signatures=[(0, 3, 4)])
    tok = fitted(midi)
    assert note_keys(stream(tok, midi)) == [
        "BAR_3/4", "NOTE_60_d8_p0", "NOTE_62_d8_p12", "NOTE_64_d8_p24",
        "BAR_3/4", "REST_d8_p0", "NOTE_65_d10_p12",
    ]
    assert decoded_notes(tok, midi) == [(0, 60, 0, 1), (1, 62, 0, 1), (2, 64, 0, 1), (4, 65, 0, 2)]
    # Beat 2 of a 3/4 bar is a third of the way round the beat circle.
    sequence = tok.encode(read_midi(midi))
    floats, _ = tok.dna(sequence)
    second = [i for i, t in enumerate(sequence.ids) if str(tok.vocab[t]) == "NOTE_62_d8_p12"][0]
    angle = math.atan2(floats[second, 4], floats[second, 5])
    assert angle == pytest.approx(2 * math.pi / 3)


def test_six_eight_positions_by_hand():
    # 6/8: a bar is three quarter notes long; dotted quarters fall on positions 0 and 18.
    midi = build_midi([(0, 1.5, 67), (1.5, 1.5, 69), (3, 0.5, 71), (3.5, 0.5, 72), (4, 0.5, 74)],
                      time_signatures=[(0, 6, 8)])
    tok = fitted(midi)
    assert note_keys(stream(tok, midi)) == [
        "BAR_6/8", "NOTE_67_d9_p0", "NOTE_69_d9_p18",
        "BAR_6/8", "NOTE_71_d5_p0", "NOTE_72_d5_p6", "NOTE_74_d5_p12",
    ]
    assert [n[0] for n in decoded_notes(tok, midi)] == [0, 1.5, 3, 3.5, 4]
    written = tok.decode(tok.encode(read_midi(midi)))
    assert [(s.numerator, s.denominator) for s in written.time_signatures] == [(6, 8)]


def test_meter_change_and_pickup_bar():
    # A one-beat pickup (1/4), two bars of 4/4, then two bars of 3/4.
    notes = [(0, 1, 55), (1, 4, 60), (5, 4, 62), (9, 3, 64), (12, 3, 65)]
    midi = build_midi(notes, time_signatures=[(0, 1, 4), (1, 4, 4), (9, 3, 4)])
    tok = fitted(midi)
    bars = [t for t in stream(tok, midi) if t.startswith("BAR")]
    assert bars == ["BAR_1/4", "BAR_4/4", "BAR_4/4", "BAR_3/4", "BAR_3/4"]
    assert [(n[0], n[1]) for n in decoded_notes(tok, midi)] == [(b, p) for b, _, p in notes]
    written = tok.decode(tok.encode(read_midi(midi)))
    assert [(s.tick / TICKS_PER_BEAT, s.numerator, s.denominator) for s in written.time_signatures] == [
        (0, 1, 4), (1, 4, 4), (9, 3, 4)]


def test_missing_time_signature_means_four_four():
    midi = build_midi([(0, 1, 60), (4, 1, 62)], time_signatures=[])
    tok = fitted(midi)
    assert note_keys(stream(tok, midi))[:2] == ["BAR_4/4", "NOTE_60_d8_p0"]


# ---------------------------------------------------------------- chords, holds, silence
def test_chord_shares_one_position_and_comes_back():
    midi = build_midi([(0, 2, 60, 80, 2), (0, 2, 64, 80, 1), (0, 2, 67, 80, 0), (2, 2, 65, 80, 0)])
    tok = fitted(midi)
    tokens = note_keys(stream(tok, midi))
    # Voices in order, each chord note at position 0.
    assert tokens[:4] == ["BAR_4/4", "NOTE_67_d10_p0", "NOTE_64_d10_p0", "NOTE_60_d10_p0"]
    assert decoded_notes(tok, midi) == [(0, 60, 2, 2), (0, 64, 1, 2), (0, 67, 0, 2), (2, 65, 0, 2)]


def test_note_held_across_bars_then_new_onset():
    # A note held for three and a half bars (14 beats, longer than the grid's 8: snapped to 8),
    # then a new onset on beat 3 of bar 4. Bars with no onset still get their BAR token, and
    # no REST: the held note sounds all along.
    midi = build_midi([(0, 14, 48), (14, 1, 60)])
    tok = fitted(midi)
    tokens = note_keys(stream(tok, midi))
    assert tokens == ["BAR_4/4", "NOTE_48_d14_p0", "BAR_4/4", "BAR_4/4", "BAR_4/4", "NOTE_60_d8_p24"]
    assert [(n[0], n[1]) for n in decoded_notes(tok, midi)] == [(0, 48), (14, 60)]


def test_rest_marks_real_silence_only():
    legato = build_midi([(0, 1, 60), (1, 1, 62), (2, 1, 64), (3, 1, 65)])
    assert not any(t.startswith("REST") for t in stream(fitted(legato), legato))
    # Overlapping voices: a gap between onsets in one voice is not silence.
    covered = build_midi([(0, 4, 48, 80, 1), (0, 0.5, 60), (2, 1, 62)])
    assert not any(t.startswith("REST") for t in stream(fitted(covered), covered))
    # Staccato quarters: half a beat of silence after each note.
    detached = build_midi([(0, 0.5, 60), (1, 0.5, 62), (2, 0.5, 64)])
    tokens = note_keys(stream(fitted(detached), detached))
    assert tokens == ["BAR_4/4", "NOTE_60_d5_p0", "REST_d5_p6", "NOTE_62_d5_p12",
                      "REST_d5_p18", "NOTE_64_d5_p24"]


def test_rest_is_cut_at_bar_lines_and_leading_silence_kept():
    midi = build_midi([(6, 1, 60)])  # silence for a bar and a half first
    tokens = note_keys(stream(fitted(midi), midi))
    assert tokens == ["BAR_4/4", "REST_d12_p0", "BAR_4/4", "REST_d10_p0", "NOTE_60_d8_p24"]
    assert decoded_notes(fitted(midi), midi)[0][0] == 6


def test_off_grid_onsets_snap_to_the_nearest_step():
    # 1/80 beat late (a performed file): onset comes back on the grid, duration snapped.
    midi = build_midi([(0.0125, 0.95, 60), (1.0125, 0.45, 62)], ticks_per_beat=480)
    assert [(n[0], n[3]) for n in decoded_notes(fitted(midi), midi)] == [(0, 1), (1, 0.5)]


def test_velocity_kept_to_nearest_level_and_voices_kept():
    midi = build_midi([(0, 1, 60, 100, 0), (0, 1, 48, 30, 1), (1, 1, 62, 127, 0)])
    tok = fitted(midi)
    score = tok.decode(tok.encode(read_midi(midi)))
    assert sorted((n.pitch, n.velocity, n.voice) for n in score.notes) == [
        (48, 32, 1), (60, 96, 0), (62, 127, 0)]


def test_type0_file_voices_come_from_channels():
    midi = build_midi([(0, 1, 72, 80, 0), (0, 1, 48, 80, 3)], midi_type=0)
    assert decoded_notes(fitted(midi), midi) == [(0, 48, 1, 1), (0, 72, 0, 1)]


# ---------------------------------------------------------------- vocabulary and DNA
def test_unseen_note_uses_nearest_duration_else_unknown():
    train = build_midi([(0, 1, 60), (1, 1, 62)])
    tok = fitted(train)
    other = tok.encode(read_midi(build_midi([(0, 0.75, 60), (1, 1, 63)])))
    assert [str(tok.vocab[t]) for t in other.ids[2:4]] == ["NOTE_60_d8_p0", "<UNK>"]
    assert (other.approximated, other.unknown) == (1, 1)


def test_save_load_gives_identical_encodings(tmp_path):
    midis = [build_midi([(0, 1, 60), (1, 0.5, 62), (1.5, 0.5, 64)], time_signatures=[(0, 3, 4)]),
             build_midi([(0, 2, 55, 50, 1), (0, 1, 67), (1, 1, 69)])]
    tok = fitted(*midis)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.config == tok.config and loaded.vocab == tok.vocab
    for midi in midis:
        a, b = tok.encode(read_midi(midi)), loaded.encode(read_midi(midi))
        assert np.array_equal(a.ids, b.ids)
        assert np.array_equal(a.velocity, b.velocity) and np.array_equal(a.voice, b.voice)
        for x, y in zip(tok.dna(a), loaded.dna(b)):
            assert np.array_equal(x, y)


def test_settings_round_trip_through_json(tmp_path):
    config = TokenizerConfig(grid_per_beat=24, durations=("1/4", "1/2", "1"),
                             velocity_levels=(40, 80, 120), max_voices=8)
    path = tmp_path / "tokenizer.json"
    Tokenizer(config).save(path)
    assert Tokenizer.load(path).config == config


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a tokenizer JSON file"),
    ('{"format": 1, "config": {}}', "missing 'vocab'"),
    ('{"format": 99, "config": {}, "vocab": []}', "format 99"),
    ('{"format": 1, "config": {"grid": 3}, "vocab": []}', "unknown tokenizer settings"),
    ('{"format": 1, "config": {}, "vocab": ["<PAD>", "<BOS>", "<EOS>", "<UNK>", "NOTE_x"]}',
     "not a token"),
], ids=["not-json", "no-vocab", "wrong-format", "unknown-setting", "bad-token"])
def test_bad_tokenizer_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=message) as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)


def test_dna_fields():
    midi = build_midi([(0, 1, 60, 64, 0), (1, 0.5, 71, 127, 1)])
    tok = fitted(midi)
    seq = tok.encode(read_midi(midi))
    floats, slots = tok.dna(seq)
    assert floats.shape == (len(seq), DNA_FLOATS) and floats.dtype == np.float32
    kinds = tok.kinds(seq.ids)
    c4, b4 = np.flatnonzero(kinds == NOTE)
    assert floats[c4, :2] == pytest.approx([0.0, 1.0], abs=1e-6)  # pitch class C
    assert floats[b4, :2] == pytest.approx([math.sin(2 * math.pi * 11 / 12),
                                            math.cos(2 * math.pi * 11 / 12)], abs=1e-6)
    assert floats[b4, 2] > floats[c4, 2] - 1e-6  # same octave number (5)
    assert floats[c4, 3] > floats[b4, 3]  # a quarter is longer than an eighth
    assert floats[c4, 6] == pytest.approx(64 / 127) and floats[b4, 6] == pytest.approx(1.0)
    assert list(slots[[c4, b4]]) == [0, 1]
    # Non-note tokens have slots of their own, after the note voices.
    assert set(slots[kinds != NOTE]) <= set(range(tok.config.max_voices, tok.config.voice_slots))
    assert slots[kinds == BAR][0] != slots[0]  # BAR and BOS differ


def test_token_keys_print_and_parse():
    for key in [TokenKey(NOTE, 60, 3, 12), TokenKey(REST, -1, 2, 0), TokenKey(BAR, 6, 8, 0)]:
        assert TokenKey.parse(str(key)) == key


def test_decoder_rejects_ids_outside_vocabulary():
    tok = Tokenizer()
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode(TokenSequence(np.array([1, 999]), np.zeros(2, int), np.zeros(2, int)))


# ---------------------------------------------------------------- bad files
def test_file_with_no_notes_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.mid"
    path.write_bytes(build_midi([]))
    with pytest.raises(MidiReadError, match="empty.mid: the file holds no notes"):
        read_midi(path)


def test_file_that_is_not_midi_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.mid"
    path.write_text("these are not notes\n")
    with pytest.raises(MidiReadError, match="notes.mid: not a readable MIDI file"):
        read_midi(path)


# ---------------------------------------------------------------- command line
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.tokenizer", *args],
                          capture_output=True, text=True, timeout=120)


def test_roundtrip_command_writes_playable_midi(tmp_path):
    source = tmp_path / "in.mid"
    source.write_bytes(build_midi([(0, 1, 60), (1, 1, 64), (2, 2, 67)], tempo_bpm=90,
                                  time_signatures=[(0, 3, 4)]))
    out = tmp_path / "out.mid"
    result = run_cli("roundtrip", str(source), str(out))
    assert result.returncode == 0, result.stderr
    assert "3 notes" in result.stdout and "kept 100.00%" in result.stdout
    midi = mido.MidiFile(out)
    assert sum(m.type == "note_on" for t in midi.tracks for m in t) == 3
    metas = {m.type: m for t in midi.tracks for m in t if m.is_meta}
    assert metas["set_tempo"].tempo == mido.bpm2tempo(90)
    assert (metas["time_signature"].numerator, metas["time_signature"].denominator) == (3, 4)


def test_stats_command_prints_a_table_per_folder(tmp_path):
    for folder, pitch in [("chorales", 60), ("fugues", 62)]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.mid").write_bytes(build_midi([(0, 1, pitch), (1.01, 1, pitch + 2)]))
    (tmp_path / "fugues" / "broken.mid").write_bytes(b"MThd garbage")
    result = run_cli("stats", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("chorales") and "100.00%" in line for line in lines)
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert total.split()[1:3] == ["2", "4"]  # files, notes
    assert "skipped fugues/broken.mid" in result.stdout


def test_roundtrip_command_reports_a_bad_file(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"\x00" * 40)
    result = run_cli("roundtrip", str(bad), str(tmp_path / "out.mid"))
    assert result.returncode == 2
    assert "bad.mid" in result.stderr and "Traceback" not in result.stderr


def test_played_notes_join_a_stream_after_its_latest_onset():
    # eighth notes cycling 60, 61, 62, 63: pitch 61 only ever sits at positions 6 and 30 of a bar
    tok = fitted(build_midi([(b * 0.5, 0.5, 60 + (b % 4), 80, 0) for b in range(32)]))
    d = tok.snap_duration(0.5)
    decoder = StreamDecoder(tok)
    for key in ("<BOS>", "BAR_4/4", f"NOTE_60_d{d}_p0"):
        decoder.push(tok.index[TokenKey.parse(key)], 3, 0)
    grid = tok.config.grid_per_beat
    # (onset in grid steps, pitch, duration in beats, velocity, voice): one in the past (moves up to
    # the cursor, then to the next 8th where the vocabulary has it), one in the next bar at a 16th
    # the vocabulary lacks for that pitch, one in the bar after
    played = decoder.encode_notes([(-5, 61, 0.5, 90, 0), (4 * grid + 6, 62, 0.5, 90, 0),
                                   (8 * grid + 17, 63, 0.5, 90, 0)])
    keys = [str(tok.vocab[t]) for t in played.ids]
    assert keys == [f"NOTE_61_d{d}_p6", "BAR_4/4", f"NOTE_62_d{d}_p12", "BAR_4/4", f"NOTE_63_d{d}_p18"]
    assert played.unknown == 0 and list(played.velocity) == [tok.velocity_level(90), 0, tok.velocity_level(90), 0,
                                                             tok.velocity_level(90)]
    assert decoder.bar == 2 and decoder.cursor == 8 * grid + 18
    unknown = decoder.encode_notes([(decoder.cursor, 20, 0.5, 90, 0)])  # a pitch never seen
    assert len(unknown) == 0 and unknown.unknown == 1


def test_transposition_moves_notes_only_and_stays_in_midi_range():
    midi = build_midi([(0, 1, 60, 80, 0), (1, 1, 64, 80, 1), (2, 1, 125, 80, 0)])
    events = Tokenizer().events(read_midi(midi))
    up = events.transposed(2)
    notes = events.kind == NOTE
    assert (up.a[notes] == events.a[notes] + 2).all()
    assert (up.a[~notes] == events.a[~notes]).all() and (up.c == events.c).all()
    assert events.transposed(3) is None  # 125 + 3 leaves 0-127
    shifts = events.transpositions(3)
    assert shifts[0] is events and len(shifts) == 1 + 3 + 2  # -3..-1, +1, +2
