"""Figures a listener would notice in a continuation: voices, melodic lines, chords, dynamics, key.

Pitch-class histograms and rhythm counts miss what a listener hears first: a four-part chorale
continued as one voice leaping about, stacked clusters, one loudness throughout, a drift out of
the prompt's key, inner voices crossing the soprano. Each function here measures one of these on
the notes of one continuation (:class:`model.tokenizer.stream.DecodedNote`, onsets and durations
in internal steps), and :func:`music_figures` gathers them over a set of pieces, computed the same
way for generated and real continuations.

* ``voices_used``: distinct voices among the notes (mean over pieces); a chorale has 4.
* ``busiest_voice_share``: share of the notes in the most used voice (mean over pieces); 0.25 when
  four voices share the work evenly, 1.0 when one voice plays everything.
* ``mean_melodic_move``: the mean absolute interval, in semitones, between consecutive notes of
  each voice's line (its top note per onset), pooled over every voice and piece.
* ``step_share``: share of those moves of at most 2 semitones (steps, not leaps).
* ``notes_per_onset``: mean number of notes starting together, pooled over every onset, and
  ``notes_per_onset_distribution``: the share of onsets with 1, 2, 3, 4 and 5 or more notes.
* ``velocities_used``: distinct velocities among the notes (mean over pieces); 1 is a flat,
  mechanical loudness.
* ``key_correlation``: Pearson correlation between the prompt's key profile (Krumhansl-Schmuckler
  estimate) and the continuation's duration-weighted pitch-class profile (mean over pieces); near
  1 when the continuation stays in the prompt's key.
* ``voice_crossing``: share of the onsets where two voices both start a note with their pitches
  in the opposite order to their mean pitches over the continuation, pooled over voice pairs and
  pieces; 0 when the voices keep their registers (or never start notes together).
* ``chords_in_one_voice``: share of the onsets of two or more notes where one voice starts two or
  more of them, pooled over pieces; near 0 in a piece written in parts (each part one note at a
  time), 1 in a keyboard piece written as one track. Where a piece in parts is continued with it
  near 1, its voices have merged: a DAW that gives each voice its own channel hears one part.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from model.keys import estimate_key, key_profiles, pearson
from model.tokenizer.stream import DecodedNote

STEP = 2  # the largest move, in semitones, that counts as a step
ONSET_SIZES = ("1", "2", "3", "4", "5+")  # the buckets of notes_per_onset_distribution

# ----------------------------------------------------------------------------- voices
def voices_used(notes: Sequence[DecodedNote]) -> int:
    """Distinct voices among ``notes``: a chorale continued as one line uses 1."""
    return len({n.voice for n in notes})


def busiest_voice_share(notes: Sequence[DecodedNote]) -> float:
    """Share of ``notes`` in the most used voice (0 when there are none): 1.0 when one voice plays
    everything, 1/k when k voices share the notes evenly."""
    if not notes:
        return 0.0
    return max(Counter(n.voice for n in notes).values()) / len(notes)


def voice_lines(notes: Sequence[DecodedNote]) -> dict[int, list[tuple[int, int]]]:
    """Each voice's melodic line: ``(onset, pitch)`` of its highest note at every onset where it
    starts one, in onset order."""
    top: dict[int, dict[int, int]] = defaultdict(dict)
    for n in notes:
        at = top[n.voice]
        at[n.onset] = max(at.get(n.onset, n.pitch), n.pitch)
    return {voice: sorted(at.items()) for voice, at in top.items()}


# ----------------------------------------------------------------------------- melodic lines
def melodic_moves(notes: Sequence[DecodedNote]) -> list[int]:
    """Absolute intervals (semitones) between consecutive notes of every voice's line
    (:func:`voice_lines`), only between notes of ``notes``: a smooth line moves by 1-2, a line
    jumping by octaves by 12."""
    return [abs(b - a) for line in voice_lines(notes).values()
            for (_, a), (_, b) in itertools.pairwise(line)]


def step_share(moves: Sequence[int]) -> float:
    """Share of melodic ``moves`` of at most :data:`STEP` semitones (0 when there are none)."""
    return sum(m <= STEP for m in moves) / len(moves) if moves else 0.0


# ----------------------------------------------------------------------------- chords
def notes_per_onset(notes: Sequence[DecodedNote]) -> list[int]:
    """How many notes start together, for every onset where one starts (all voices together): a
    four-part chorale is mostly 4, a single line 1, stacked clusters 6 or more."""
    return list(Counter(n.onset for n in notes).values())


def onset_size_distribution(sizes: Sequence[int]) -> dict[str, float]:
    """Share of onsets with 1, 2, 3, 4 and 5 or more notes (keys :data:`ONSET_SIZES`; all 0 when
    there are no onsets)."""
    buckets = Counter(ONSET_SIZES[min(s, len(ONSET_SIZES)) - 1] for s in sizes)
    return {key: buckets[key] / len(sizes) if sizes else 0.0 for key in ONSET_SIZES}


# ----------------------------------------------------------------------------- dynamics
def velocities_used(notes: Sequence[DecodedNote]) -> int:
    """Distinct velocities among ``notes``: 1 is one loudness throughout."""
    return len({n.velocity for n in notes})


# ----------------------------------------------------------------------------- key
def pitch_class_profile(notes: Sequence[DecodedNote]) -> np.ndarray:
    """``(12,)`` total duration (internal steps) of the notes of each pitch class, C first."""
    profile = np.zeros(12)
    for n in notes:
        profile[n.pitch % 12] += n.duration
    return profile


def key_correlation(prompt: Sequence[DecodedNote], continuation: Sequence[DecodedNote]) -> float:
    """Pearson correlation between the prompt's key (:func:`estimate_key`) profile and the
    continuation's pitch-class profile: high when the continuation stays in the prompt's key, low
    for chromatic clusters or a modulation away. 0 when either has no notes."""
    if not prompt or not continuation:
        return 0.0
    key = key_profiles()[estimate_key(pitch_class_profile(prompt))]
    return pearson(key, pitch_class_profile(continuation))


# ----------------------------------------------------------------------------- voice crossing
def voice_crossings(notes: Sequence[DecodedNote]) -> tuple[int, int]:
    """``(crossed, shared)`` over every pair of voices: ``shared`` counts the onsets where both
    voices start a note, ``crossed`` those of them where the pair's pitches (each voice's top note
    there) are in the opposite order to the voices' mean pitches over ``notes``. A pair with equal
    mean pitches has no order and is left out; unisons are not crossings."""
    means: dict[int, list[int]] = defaultdict(list)
    for n in notes:
        means[n.voice].append(n.pitch)
    mean = {voice: float(np.mean(pitches)) for voice, pitches in means.items()}
    lines = {voice: dict(line) for voice, line in voice_lines(notes).items()}
    crossed = shared = 0
    for low, high in itertools.combinations(sorted(lines), 2):
        if mean[low] == mean[high]:
            continue
        if mean[low] > mean[high]:
            low, high = high, low
        together = lines[low].keys() & lines[high].keys()
        shared += len(together)
        crossed += sum(lines[low][t] > lines[high][t] for t in together)
    return crossed, shared


# ----------------------------------------------------------------------------- chords in one voice
def chords_in_one_voice(notes: Sequence[DecodedNote]) -> tuple[int, int]:
    """``(merged, chords)``: ``chords`` counts the onsets where two or more notes start, ``merged``
    those of them where one voice starts two or more notes."""
    at: dict[int, list[int]] = defaultdict(list)
    for n in notes:
        at[n.onset].append(n.voice)
    chords = [voices for voices in at.values() if len(voices) > 1]
    return sum(len(set(voices)) < len(voices) for voices in chords), len(chords)


# ----------------------------------------------------------------------------- over pieces
def music_figures(prompts: Sequence[Sequence[DecodedNote]],
                  continuations: Sequence[Sequence[DecodedNote]]) -> dict:
    """The figures of the module docstring for continuations (one list of notes per piece) of
    ``prompts``: per-piece figures averaged over pieces, moves, onsets and voice pairs pooled."""
    moves = [m for notes in continuations for m in melodic_moves(notes)]
    sizes = [s for notes in continuations for s in notes_per_onset(notes)]
    crossings = [voice_crossings(notes) for notes in continuations]
    crossed, shared = sum(c for c, _ in crossings), sum(s for _, s in crossings)
    merged = [chords_in_one_voice(notes) for notes in continuations]
    in_one, chords = sum(m for m, _ in merged), sum(c for _, c in merged)
    mean = lambda values: float(np.mean(values)) if len(values) else 0.0
    return {
        "voices_used": mean([voices_used(n) for n in continuations]),
        "busiest_voice_share": mean([busiest_voice_share(n) for n in continuations]),
        "mean_melodic_move": mean(moves),
        "step_share": step_share(moves),
        "notes_per_onset": mean(sizes),
        "notes_per_onset_distribution": onset_size_distribution(sizes),
        "velocities_used": mean([velocities_used(n) for n in continuations]),
        "key_correlation": mean([key_correlation(p, c) for p, c in zip(prompts, continuations)]),
        "voice_crossing": crossed / shared if shared else 0.0,
        "chords_in_one_voice": in_one / chords if chords else 0.0,
    }
