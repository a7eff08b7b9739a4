"""Continuation metrics: they separate a collapsed model from real music, and reach the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.evaluation.continuation import (continuation_metrics, distinctness, js_distance, longest_repeat, pitch_class_histogram, prompt_fidelity, seed_spread)
from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.generation.generator import BatchGenerator
from model.sampling.config import SamplingConfig
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, NOTE, SPECIAL_KINDS, TokenKey, special_key
from tests.conftest import run_module
from tests.model_shapes import token_shape

POSITIONS = (0, 12, 24, 36)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Specials, one 4/4 bar, and a quarter note of every pitch 48..83 at every beat."""
    notes = [TokenKey(NOTE, p, 8, c) for p in range(48, 84) for c in POSITIONS]
    return Tokenizer(vocab=[special_key(k) for k in SPECIAL_KINDS] + [TokenKey(BAR, 4, 4, 0)] + notes)


def melody(tokenizer: Tokenizer, pitches: list[int]) -> np.ndarray:
    """A bar line before every four notes, each note on the next beat."""
    bar = tokenizer.index[TokenKey(BAR, 4, 4, 0)]
    ids = []
    for i, p in enumerate(pitches):
        if i % 4 == 0:
            ids.append(bar)
        ids.append(tokenizer.index[TokenKey(NOTE, p, 8, POSITIONS[i % 4])])
    return np.array(ids)


SCALES = [[60, 62, 64, 65, 67, 69, 71], [61, 63, 66, 68, 70], [62, 64, 66, 67, 69, 71, 73],
          [63, 65, 67, 68, 70, 72, 74], [54, 57, 61, 66], [59, 62, 66, 71, 74]]


def pieces(tokenizer: Tokenizer, length: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [melody(tokenizer, list(rng.choice(scale, size=length))) for scale in SCALES]


def test_pitch_class_histogram_counts_notes_only(tokenizer):
    h = pitch_class_histogram(melody(tokenizer, [60, 72, 67, 55]), tokenizer)
    assert h[0] == pytest.approx(0.5) and h[7] == pytest.approx(0.5) and h.sum() == pytest.approx(1)
    assert np.allclose(pitch_class_histogram(np.array([1, 4]), tokenizer), 1 / 12)


def test_js_distance_bounds():
    a, b = np.eye(12)[0], np.eye(12)[1]
    assert js_distance(a, a) == pytest.approx(0) and js_distance(a, b) == pytest.approx(1)


def test_identical_continuations_score_near_zero_and_real_ones_one(tokenizer):
    real = [pitch_class_histogram(p, tokenizer) for p in pieces(tokenizer)]
    collapsed = [real[0]] * len(real)  # the "default amalgam song" whatever the prompt
    assert distinctness(collapsed, real) == pytest.approx(0, abs=1e-9)
    assert distinctness(list(real), real) == pytest.approx(1)
    assert prompt_fidelity(list(real), real) == 1.0
    assert prompt_fidelity(collapsed, real) == pytest.approx(1 / len(real))


def test_seed_spread_and_longest_repeat():
    a = np.arange(10)
    assert seed_spread([a], [a.copy()]) == 0
    assert seed_spread([a], [a + 1]) == 1
    assert longest_repeat(np.array([3, 3, 4, 4, 4, 2])) == 3 and longest_repeat(a) == 1


def test_continuation_metrics_on_a_model(tokenizer):
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(tokenizer.vocab_size), dim=32, decoder_hidden=32,
                                     dropout=0.0, decays="0,8")).eval()
    sequences = [TokenSequence(p, np.full(len(p), 4), np.zeros(len(p), np.int64)) for p in pieces(tokenizer)]
    m = continuation_metrics(BatchGenerator(model, tokenizer), sequences, 4, prompt_tokens=12, tokens=20,
                             sampling=SamplingConfig(key_pull=0.0), progress=False)  # the model alone
    assert m["n"] == 4 and m["real_prompt_fidelity"] >= 0.75  # short excerpts of distinct scales
    assert 0 <= m["prompt_fidelity"] <= 1 and m["distinctness"] >= 0
    # An untrained model's logits are nearly flat: every stream (same seed) draws nearly the same
    # tokens whatever its prompt, and another seed changes nearly every token.
    assert m["distinctness"] < 0.5 and m["seed_spread"] > 0.5
    assert m["real_on_grid"] == 1.0 and m["real_longest_repeat"] == 1
    assert m["real_notes_per_second"] == pytest.approx(2.0)  # one note a beat at 120 bpm
    with pytest.raises(ValueError, match="long enough"):
        continuation_metrics(BatchGenerator(model, tokenizer), sequences, 4, prompt_tokens=40, tokens=20)


def test_evaluate_reports_continuations_in_json(tiny_run):
    midi_dir = json.loads((tiny_run / "latest" / "config.json").read_text())["train"]["midi_dir"]
    result = run_module("model.evaluate", "--checkpoint", str(tiny_run / "best"), "--midi_dir", midi_dir,
                        "--continuations", "3", "--prompt_tokens", "16", "--continuation_tokens", "24",
                        "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["continuations"] == 3 and report["continuation_tokens"] == 24
    # the scored-token count is not overwritten by the continuation length
    assert report["tokens"] > 24 * 3
    for key in ("distinctness", "prompt_fidelity", "seed_spread", "on_grid", "notes_per_second",
                "longest_repeat"):
        assert isinstance(report[key], (int, float)), key
    table = run_module("model.evaluate", "--checkpoint", str(tiny_run / "best"), "--midi_dir", midi_dir,
                       "--continuations", "3", "--prompt_tokens", "16", "--continuation_tokens", "24")
    assert "distinctness" in table.stdout and "seed_spread" in table.stdout
