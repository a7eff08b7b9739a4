"""Key pull: notes lean toward the pitch classes a stream heard, bars and rests keep their share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.evaluation.continuation import continuation_metrics
from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.generation.generator import BatchGenerator
from model.generation.key_pull import (heard_counts, note_pitch_classes, pitch_class_matrix, pull_toward_heard,
                                       toward_key)
from model.keys import estimate_key, key_profiles
from model.sampling.config import SamplingConfig
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, NOTE, REST, SPECIAL_KINDS, TokenKey, special_key
from tests.model_shapes import token_shape

POSITIONS = (0, 12, 24, 36)
SCALES = [[60, 62, 64, 65, 67, 69, 71], [61, 63, 66, 68, 70], [62, 64, 66, 67, 69, 71, 73],
          [63, 65, 67, 68, 70, 72, 74], [54, 57, 61, 66], [59, 62, 66, 71, 74]]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Specials, one 4/4 bar, a rest, and a quarter note of every pitch 48..83 at every beat."""
    notes = [TokenKey(NOTE, p, 8, c) for p in range(48, 84) for c in POSITIONS]
    return Tokenizer(vocab=[special_key(k) for k in SPECIAL_KINDS] + [TokenKey(BAR, 4, 4, 0),
                                                                       TokenKey(REST, 8, 0, 0)] + notes)


def note(tokenizer: Tokenizer, pitch: int, beat: int = 0) -> int:
    return tokenizer.index[TokenKey(NOTE, pitch, 8, POSITIONS[beat % 4])]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def test_pitch_classes_and_heard_counts(tokenizer):
    classes = note_pitch_classes(tokenizer)
    assert classes[note(tokenizer, 61)] == 1 and classes[note(tokenizer, 72, 2)] == 0
    assert (classes[: len(SPECIAL_KINDS) + 2] == -1).all()  # specials, bar, rest
    ids = [tokenizer.index[TokenKey(BAR, 4, 4, 0)], note(tokenizer, 60), note(tokenizer, 72, 1), note(tokenizer, 67, 2)]
    assert heard_counts(np.array(ids), classes).tolist() == [2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    matrix = pitch_class_matrix(classes)
    assert matrix.shape == (tokenizer.vocab_size, 12) and matrix.sum().item() == (classes >= 0).sum()
    assert matrix[note(tokenizer, 61), 1] == 1


def test_nothing_heard_or_no_pull_leaves_the_distribution_alone(tokenizer):
    classes = pitch_class_matrix(note_pitch_classes(tokenizer))
    logits = torch.randn(3, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    heard = torch.zeros(3, 12)
    heard[2, 0] = 5.0
    strength = torch.tensor([2.0, 0.0, 0.0])  # row 0 heard nothing, rows 1-2 do not pull
    pulled = pull_toward_heard(logits, heard, strength, classes)
    assert torch.allclose(probabilities(pulled), probabilities(logits), atol=1e-6)


def test_the_pull_favours_heard_pitch_classes_and_keeps_bars_and_rests(tokenizer):
    pitch_classes = torch.tensor(note_pitch_classes(tokenizer))
    classes = pitch_class_matrix(note_pitch_classes(tokenizer))
    is_note = pitch_classes >= 0
    logits = torch.randn(1, tokenizer.vocab_size, generator=torch.Generator().manual_seed(1))
    logits[0, tokenizer.index[TokenKey(REST, 8, 0, 0)]] = -math.inf  # masked stays masked
    heard = torch.zeros(1, 12)
    heard[0, [0, 4, 7]] = 20.0  # a C major triad, 60 notes
    pulled = pull_toward_heard(logits, heard, torch.tensor([1.5]), classes)
    before, after = probabilities(logits)[0], probabilities(pulled)[0]
    in_triad = is_note & torch.isin(pitch_classes, torch.tensor([0, 4, 7]))
    assert after[in_triad].sum() > 0.8 > before[in_triad].sum()
    assert after[is_note].sum() == pytest.approx(before[is_note].sum().item(), abs=1e-5)  # rhythm kept
    assert torch.allclose(after[~is_note], before[~is_note], atol=1e-6)
    assert math.isinf(pulled[0, tokenizer.index[TokenKey(REST, 8, 0, 0)]].item())


def test_one_played_note_pulls_gently(tokenizer):
    """PRIOR_NOTES: after one C (half of it read as C, half as its key's profile), C gains
    ((0.5 + 0.5 k_C + 1) / (0.5 k_D + 1)) ** 1.5 against D, k the key's profile as shares."""
    classes = pitch_class_matrix(note_pitch_classes(tokenizer))
    logits = torch.zeros(1, tokenizer.vocab_size)
    heard = torch.zeros(1, 12)
    heard[0, 0] = 1.0
    after = probabilities(pull_toward_heard(logits, heard, torch.tensor([1.5]), classes))[0]
    key = key_profiles()[estimate_key(heard[0].numpy())]
    share = key / key.sum()
    ratio = after[note(tokenizer, 60)] / after[note(tokenizer, 62)]
    assert ratio.item() == pytest.approx(((0.5 + 0.5 * share[0] + 1) / (0.5 * share[2] + 1)) ** 1.5, rel=1e-4)
    assert 1.2 < ratio.item() < 2 ** 1.5  # gentler than a pull toward the one note alone


def test_the_pull_leans_toward_the_key_not_only_the_notes_heard(tokenizer):
    """A prompt of G and D only: the pull favours the rest of G major (B, E, A, C, F#) over the
    notes outside it (C#, F, G#), which a pull toward the heard notes alone would weigh alike."""
    pitch_classes = torch.tensor(note_pitch_classes(tokenizer))
    classes = pitch_class_matrix(note_pitch_classes(tokenizer))
    heard = torch.zeros(1, 12)
    heard[0, 7], heard[0, 2] = 30.0, 20.0
    assert estimate_key(heard[0].numpy()) == 7  # G major
    leaning = toward_key(heard)[0]
    assert leaning.sum().item() == pytest.approx(50.0)
    after = probabilities(pull_toward_heard(torch.zeros(1, tokenizer.vocab_size), heard, torch.tensor([1.5]),
                                            classes))[0]
    mass = lambda pcs: after[torch.isin(pitch_classes, torch.tensor(pcs))].sum() / len(pcs)
    assert mass([7, 2]) > mass([11, 4, 9, 0, 6]) > 1.3 * mass([1, 5, 8])
    assert torch.equal(toward_key(torch.zeros(2, 12)), torch.zeros(2, 12))  # nothing heard: nothing to lean on


def test_continuations_follow_their_prompts_with_the_pull(tokenizer):
    """An untrained model ignores its prompt; the pull alone brings each continuation back to it."""
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(tokenizer.vocab_size), dim=32, field_layers=2, width=16,
                                     decoder_hidden=32, dropout=0.0, decays="0,8")).eval()
    rng = np.random.default_rng(0)
    sequences = []
    for scale in SCALES:
        ids = np.array([note(tokenizer, int(p), i) for i, p in enumerate(rng.choice(scale, size=60))])
        sequences.append(TokenSequence(ids, np.full(len(ids), 4), np.zeros(len(ids), np.int64)))
    generator = BatchGenerator(model, tokenizer)
    off = continuation_metrics(generator, sequences, 6, prompt_tokens=24, tokens=32,
                               sampling=SamplingConfig(key_pull=0.0), progress=False)
    on = continuation_metrics(generator, sequences, 6, prompt_tokens=24, tokens=32,
                              sampling=SamplingConfig(key_pull=3.0), progress=False)
    assert off["prompt_fidelity"] <= 0.5
    assert on["prompt_fidelity"] >= 0.8 and on["sampling"]["key_pull"] == 3.0
