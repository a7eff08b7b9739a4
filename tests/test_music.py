"""Music figures: hand-built textures whose voices, lines, chords, dynamics and key are known."""

from __future__ import annotations

import pytest

from model.evaluation.music import (chords_in_one_voice, estimate_key, key_correlation, melodic_moves, music_figures,
                                    onset_size_distribution, pitch_class_profile, voice_crossings,
                                    voices_used)
from model.tokenizer.stream import DecodedNote

BEAT = 24  # internal steps a beat at the default resolution


def note(beat: float, pitch: int, voice: int = 0, velocity: int = 80, beats: float = 1) -> DecodedNote:
    return DecodedNote(round(beat * BEAT), round(beats * BEAT), pitch, velocity, voice, 0, 0)


def line(pitches: list[int], voice: int = 0, velocity: int = 80) -> list[DecodedNote]:
    """One note a beat."""
    return [note(i, p, voice, velocity) for i, p in enumerate(pitches)]


STEPS = [0, 2, 4, 5, 4, 2, 0, -1, 0, 2]  # a line moving by step


def chorale() -> list[DecodedNote]:
    """Four voices, each stepping in its own range (soprano, alto, tenor, bass), all on every beat."""
    return [n for voice, base in enumerate((72, 64, 57, 48)) for n in line([base + s for s in STEPS], voice)]


def octave_leaps() -> list[DecodedNote]:
    """One voice jumping by octaves."""
    return line([48, 60, 72, 60, 48, 60, 72, 60])


def swapped_registers() -> list[DecodedNote]:
    """Two voices that trade registers for the last 2 of 8 beats."""
    upper, lower = [72] * 6 + [55] * 2, [55] * 6 + [72] * 2
    return line(upper, 0) + line(lower, 1)


C_MAJOR = [60, 62, 64, 65, 67, 69, 71, 72]


@pytest.mark.parametrize("notes, expected", [
    (chorale(), dict(voices_used=4, busiest_voice_share=0.25, step_share=1.0, voice_crossing=0.0,
                     notes_per_onset=4.0)),
    (octave_leaps(), dict(voices_used=1, busiest_voice_share=1.0, mean_melodic_move=12.0, step_share=0.0,
                          voice_crossing=0.0, notes_per_onset=1.0)),
    (swapped_registers(), dict(voices_used=2, busiest_voice_share=0.5, voice_crossing=2 / 8,
                               notes_per_onset=2.0)),
], ids=["four voices stepping", "one voice leaping by octaves", "two voices swapping registers"])
def test_textures(notes, expected):
    figures = music_figures([notes], [notes])
    assert {k: figures[k] for k in expected} == pytest.approx(expected)


def test_a_chorale_moves_by_small_steps_and_sounds_four_notes_together():
    figures = music_figures([chorale()], [chorale()])
    assert 1 <= figures["mean_melodic_move"] <= 2
    assert figures["notes_per_onset_distribution"] == {"1": 0.0, "2": 0.0, "3": 0.0, "4": 1.0, "5+": 0.0}


def test_a_voice_line_follows_its_top_note():
    """A chord C-E in one voice, then F: the line moves E -> F, one semitone."""
    assert melodic_moves([note(0, 60), note(0, 64), note(1, 65)]) == [1]
    assert melodic_moves([note(0, 60, voice=0), note(1, 72, voice=1)]) == []  # one note per voice


def test_onset_sizes_are_bucketed_up_to_five_or_more():
    assert onset_size_distribution([1, 2, 2, 7]) == {"1": 0.25, "2": 0.5, "3": 0.0, "4": 0.0, "5+": 0.25}
    assert onset_size_distribution([]) == {"1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0, "5+": 0.0}


def test_velocities_and_voices_are_counted_per_piece_and_averaged():
    flat = line(C_MAJOR, velocity=80)
    shaded = line(C_MAJOR[:4], velocity=60) + line(C_MAJOR[4:], voice=1, velocity=100)
    figures = music_figures([flat, flat], [flat, shaded])
    assert figures["velocities_used"] == 1.5 and figures["voices_used"] == 1.5
    assert voices_used(shaded) == 2


def test_voices_keeping_their_registers_never_cross():
    assert voice_crossings(line([72] * 8, 0) + line([55] * 8, 1)) == (0, 8)
    assert voice_crossings(swapped_registers()) == (2, 8)
    # voices that never start a note together have nothing to cross
    assert music_figures([[]], [line([72, 74], 0) + [note(0.5, 60, 1)]])["voice_crossing"] == 0.0


@pytest.mark.parametrize("tonic, minor, row", [(0, False, 0), (7, False, 7), (9, True, 21)],
                         ids=["C major", "G major", "A minor"])
def test_key_finding_names_the_scale_played(tonic, minor, row):
    steps = [0, 2, 3, 5, 7, 8, 10, 12] if minor else [0, 2, 4, 5, 7, 9, 11, 12]
    # the tonic and fifth held longest, as a cadence would
    notes = line([60 + tonic + s for s in steps]) + [note(8, 60 + tonic, beats=4), note(12, 67 + tonic, beats=2)]
    assert estimate_key(pitch_class_profile(notes)) == row


def test_a_continuation_in_the_prompts_key_correlates_and_a_cluster_does_not():
    prompt = line(C_MAJOR * 2)
    in_key = line(C_MAJOR[::-1] + C_MAJOR)
    cluster = [note(b, p) for b in range(8) for p in range(60, 66)]  # C to F chromatic, stacked
    assert key_correlation(prompt, in_key) > 0.7
    assert key_correlation(prompt, cluster) < 0.5
    assert key_correlation(prompt, []) == 0.0 and key_correlation([], in_key) == 0.0


def test_chords_piled_into_one_voice_are_counted():
    """Four parts on every beat: no chord in one voice; the same notes all given to voice 0 (a
    texture whose voices merged): every chord is; a single line has no chords at all."""
    merged = [note(n.onset / BEAT, n.pitch, 0) for n in chorale()]
    assert chords_in_one_voice(chorale()) == (0, 10)
    assert chords_in_one_voice(merged) == (10, 10)
    assert chords_in_one_voice(line([60, 62, 64])) == (0, 0)
    half = chorale()[:20] + [note(n.onset / BEAT, n.pitch, 1) for n in chorale()[20:]]  # alto = tenor = bass
    assert music_figures([[]], [half])["chords_in_one_voice"] == 1.0
    assert music_figures([[]], [chorale()])["chords_in_one_voice"] == 0.0


def test_no_notes_gives_zeros():
    figures = music_figures([[]], [[]])
    assert figures["notes_per_onset_distribution"] == onset_size_distribution([])
    assert all(v == 0 for k, v in figures.items() if k != "notes_per_onset_distribution")
