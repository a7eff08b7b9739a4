"""Continuation metrics: they separate a collapsed model from real music, and reach the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.evaluation.continuation import (PIECE_FIGURES, continuation_metrics, continue_pieces, decode_after,
                                           distinctness, format_metrics, format_pieces, generate_batch,
                                           js_distance, longest_repeat, piece_figures, pitch_class_histogram,
                                           prompt_fidelity, seed_spread, summarize)
from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.generation.generator import BatchGenerator, StreamStep
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


def untrained(tokenizer: Tokenizer) -> FieldMachine:
    torch.manual_seed(0)
    return FieldMachine(ModelConfig(**token_shape(tokenizer.vocab_size), dim=32, field_layers=2, width=16,
                                    decoder_hidden=32, dropout=0.0, decays="0,8")).eval()


def test_continuation_metrics_on_a_model(tokenizer):
    model = untrained(tokenizer)
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
    # one voice at one loudness, one note at a time
    assert m["real_voices_used"] == 1 and m["real_busiest_voice_share"] == 1 and m["real_velocities_used"] == 1
    assert m["real_notes_per_onset"] == 1 and m["real_notes_per_onset_distribution"]["1"] == 1
    assert m["real_voice_crossing"] == 0 and m["real_key_correlation"] > 0.3  # each piece keeps its scale
    assert m["real_chords_in_one_voice"] == 0  # no chords at all
    for key in MUSIC_KEYS:
        assert isinstance(m[key], (int, float)) and isinstance(m[f"real_{key}"], (int, float)), key
    with pytest.raises(ValueError, match="long enough"):
        continuation_metrics(BatchGenerator(model, tokenizer), sequences, 4, prompt_tokens=40, tokens=20)


MUSIC_KEYS = ("voices_used", "busiest_voice_share", "mean_melodic_move", "step_share", "notes_per_onset",
              "velocities_used", "key_correlation", "voice_crossing", "chords_in_one_voice")


class ChoosingGenerator(BatchGenerator):
    """Reports each step's voice as its token id mod 3 and its velocity level as the id mod 5, so a
    test knows what the generator chose (whatever the model's heads would pick)."""

    def advance(self, *args, **kwargs) -> tuple[list[StreamStep], object, object]:
        results, state, out = super().advance(*args, **kwargs)
        for r in results:
            r.voice, r.velocity = r.token % 3, r.token % 5
        return results, state, out


def test_generated_continuations_keep_the_voices_and_velocities_the_generator_chose(tokenizer):
    sequences = [TokenSequence(p, np.full(len(p), 4), np.zeros(len(p), np.int64)) for p in pieces(tokenizer)]
    generator = ChoosingGenerator(untrained(tokenizer), tokenizer)
    prompts = [TokenSequence(s.ids[:12], s.velocity[:12], s.voice[:12]) for s in sequences[:2]]
    for g in generate_batch(generator, prompts, 20, SamplingConfig(key_pull=0.0), progress=False):
        assert len(g) == 20 and list(g.voice) == list(g.ids % 3) and list(g.velocity) == list(g.ids % 5)
    run = continue_pieces(generator, sequences, 3, prompt_tokens=12, tokens=20,
                          sampling=SamplingConfig(key_pull=0.0), progress=False)
    levels = tokenizer.config.velocity_levels
    for piece in run.pieces:
        played = [t for t in piece.generated.ids.tolist() if tokenizer.vocab[t].kind == NOTE]
        assert [n.voice for n in piece.generated_notes] == [t % 3 for t in played]
        assert [n.velocity for n in piece.generated_notes] == [levels[t % 5] for t in played]


def test_real_continuations_are_decoded_with_their_voices_and_velocities(tokenizer):
    """Notes alternating between two voices and cycling through three loudnesses."""
    sequences = [TokenSequence(p, np.arange(len(p)) % 3 + 2, np.arange(len(p)) % 2) for p in pieces(tokenizer)]
    run = continue_pieces(BatchGenerator(untrained(tokenizer), tokenizer), sequences, 2, prompt_tokens=12,
                          tokens=20, progress=False)
    piece = run.pieces[1]
    assert piece.index == 1 and len(piece.real_notes) == 16  # 20 tokens: 4 bar lines, 16 notes
    assert decode_after(tokenizer, piece.prompt, piece.real) == piece.real_notes
    assert {n.voice for n in piece.real_notes} == {0, 1}
    assert {n.velocity for n in piece.real_notes} == {48, 64, 80}
    assert piece.real_notes[0].onset > piece.prompt_notes[-1].onset  # on the prompt's timeline


def test_each_piece_has_its_own_figures_and_they_average_to_the_summary(tokenizer):
    """Real continuations in one voice for the first piece and alternating two voices for the
    others: the per-piece busiest voice tells them apart, and its mean is the summary's."""
    sequences = [TokenSequence(p, np.full(len(p), 4), np.arange(len(p)) % (1 if i == 0 else 2))
                 for i, p in enumerate(pieces(tokenizer))]
    run = continue_pieces(BatchGenerator(untrained(tokenizer), tokenizer), sequences, 3, prompt_tokens=12,
                          tokens=20, progress=False)
    figures = piece_figures(run)
    assert len(figures) == 3 and all(set(f["real"]) == set(PIECE_FIGURES) for f in figures)
    assert [f["real"]["busiest_voice_share"] for f in figures] == [1.0, 0.5, 0.5]
    summary = summarize(run, tokenizer)
    for side, prefix in (("generated", ""), ("real", "real_")):
        assert np.mean([f[side]["busiest_voice_share"] for f in figures]) == pytest.approx(
            summary[prefix + "busiest_voice_share"])
        assert max(f[side]["longest_repeat"] for f in figures) == summary[prefix + "longest_repeat"]
    table = format_pieces(["first", "second", "third"], figures).splitlines()
    voices = f"{figures[0]['generated']['voices_used']:.2f} / 1.00"  # voices used, generated / real
    assert table[2].split()[:4] == ["first", *voices.split()]
    assert len(table) == 2 + 3


def test_format_metrics_shows_generated_and_real_music_figures(tokenizer):
    m = continuation_metrics(BatchGenerator(untrained(tokenizer), tokenizer),
                             [TokenSequence(p, np.full(len(p), 4), np.zeros(len(p), np.int64))
                              for p in pieces(tokenizer)], 2, prompt_tokens=12, tokens=20, progress=False)
    table = format_metrics(m)
    for key in MUSIC_KEYS:
        row = next(r for r in table.splitlines() if r.startswith(key))
        assert row.split()[1:] == [f"{m[key]:.3f}", f"{m['real_' + key]:.3f}"], row
    assert "real      1:1.00 2:0.00 3:0.00 4:0.00 5+:0.00" in table


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
                "longest_repeat", *MUSIC_KEYS, *(f"real_{k}" for k in MUSIC_KEYS)):
        assert isinstance(report[key], (int, float)), key
    assert set(report["notes_per_onset_distribution"]) == {"1", "2", "3", "4", "5+"}
    # the first three files long enough, in path order, each with its own figures
    assert [p["name"] for p in report["pieces"]] == ["piece00", "piece01", "piece02"]
    assert all(set(p["generated"]) == set(p["real"]) == set(PIECE_FIGURES) for p in report["pieces"])
    table = run_module("model.evaluate", "--checkpoint", str(tiny_run / "best"), "--midi_dir", midi_dir,
                       "--continuations", "3", "--prompt_tokens", "16", "--continuation_tokens", "24",
                       "--per_piece")
    assert "distinctness" in table.stdout and "seed_spread" in table.stdout and "voice_crossing" in table.stdout
    rows = table.stdout.splitlines()
    first = rows.index("per piece, generated / real")
    assert [r.split()[0] for r in rows[first + 2:first + 5]] == ["piece00", "piece01", "piece02"]


def test_per_piece_needs_continuations(tiny_run):
    midi_dir = json.loads((tiny_run / "latest" / "config.json").read_text())["train"]["midi_dir"]
    result = run_module("model.evaluate", "--checkpoint", str(tiny_run / "best"), "--midi_dir", midi_dir,
                        "--per_piece")
    assert result.returncode == 2 and "--continuations" in result.stderr
