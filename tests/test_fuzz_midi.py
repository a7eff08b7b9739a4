"""Whatever the bytes, the MIDI reader and the tokenizer read them or refuse them cleanly and quickly.

Hypothesis draws inputs from the fuzzer's generator (:mod:`tests.fuzz_midi`: mutated files,
random event streams, random bytes) and raw byte strings, for a bounded number of examples; the
hostile fixtures are files that once crashed or stalled the reader. The long run is
``python -m tests.fuzz_midi --fuzz 100000``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.midi.limits import ReadLimits
from model.midi.read import read_midi
from model.midi.score import MidiReadError
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import TokenizerError
from tests.fuzz_midi import HOSTILE, SEEDS, classify, make_input, mutate
from tests.hostile_midi import hostile_files

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.integers(min_value=0, max_value=10**9))
def test_generated_inputs_are_read_or_refused(index: int) -> None:
    outcome, detail = classify(make_input(index, seed=11))
    assert outcome in ("read", "refused"), detail


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    outcome, detail = classify(data)
    assert outcome in ("read", "refused"), detail


@FUZZ
@given(st.sampled_from(SEEDS), st.randoms(use_true_random=False))
def test_mutated_files_are_read_or_refused(seed_file: bytes, rng) -> None:
    outcome, detail = classify(mutate(seed_file, rng))
    assert outcome in ("read", "refused"), detail


def test_the_hostile_fixtures_are_the_ones_the_generator_writes():
    assert {p.name: p.read_bytes() for p in HOSTILE.iterdir()} == hostile_files()


@pytest.mark.parametrize("path", sorted(HOSTILE.iterdir()), ids=lambda p: p.stem)
def test_a_hostile_file_is_read_or_refused_in_a_moment(path: Path) -> None:
    began = time.perf_counter()
    outcome, detail = classify(path.read_bytes())
    assert outcome in ("read", "refused"), detail
    assert time.perf_counter() - began < 30  # a stall, not a speed figure: the limits stop it first


@pytest.mark.parametrize("name, message", [
    ("huge_delta.mid", "length in beats 349,525 is over the limit of 100,000 (max_beats)"),
    ("late_note.mid", "over the limit of 100,000 (max_beats)"),
    ("many_tracks.mid", "more than 1,024 tracks (the limit, max_tracks)"),
    ("zero_division.mid", "0 ticks per beat"),
    ("truncated_header.mid", "MIDI header truncated"),
])
def test_a_refusal_names_the_file_and_what_was_over(name: str, message: str) -> None:
    with pytest.raises(MidiReadError, match="prompt.mid: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        read_midi((HOSTILE / name).read_bytes(), name="prompt.mid")


def test_limits_are_checked_before_tokenizing():
    score = read_midi(SEEDS[1], name="forty.mid")  # 40 notes over 20 beats
    tokenizer = Tokenizer()
    with pytest.raises(TokenizerError, match="forty.mid: note count 40 is over the limit of 10"):
        tokenizer.events(score, ReadLimits(max_notes=10))
    with pytest.raises(TokenizerError, match="token count .* over the limit of 30"):
        tokenizer.events(score, ReadLimits(max_tokens=30))
    with pytest.raises(MidiReadError, match="length in beats 20 is over the limit of 8"):
        read_midi(SEEDS[1], name="forty.mid", limits=ReadLimits(max_beats=8))
    assert len(tokenizer.events(score)) > 40


def test_ignored_tempos_and_meters_are_reported():
    zero = read_midi(hostile_files()["zero_tempo.mid"])
    assert zero.tempos[0].bpm == 120 and any("tempo changes of 0" in p for p in zero.problems)
    odd = read_midi(hostile_files()["huge_denominator.mid"])
    assert any("time signatures with a 0 numerator or a denominator" in p for p in odd.problems)
