"""The token grammar kept while sampling: time never goes back in a bar, bars end, chords stay playable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.generation.grammar import GrammarMask
from model.tokenizer.stream import StreamDecoder
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, NOTE, REST, SPECIAL_KINDS, TokenKey, special_key

POSITIONS = tuple(range(0, 48, 6))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Specials, 4/4 and 3/4 bars, rests, and eighth notes of pitches 55..79 at every eighth."""
    notes = [TokenKey(NOTE, p, 5, c) for p in range(55, 80) for c in POSITIONS]
    rests = [TokenKey(REST, -1, 5, c) for c in POSITIONS]
    bars = [TokenKey(BAR, 4, 4, 0), TokenKey(BAR, 3, 4, 0)]
    return Tokenizer(vocab=[special_key(k) for k in SPECIAL_KINDS] + bars + rests + notes)


def allowed(mask: GrammarMask, decoder: StreamDecoder) -> set:
    return set(np.nonzero(~mask([decoder])[0].numpy())[0].tolist())


def test_notes_cannot_go_back_in_the_bar_or_past_its_end(tokenizer):
    generator = GrammarMask(tokenizer, torch.device("cpu"))
    decoder = StreamDecoder(tokenizer)
    kinds = tokenizer.kinds(np.array(sorted(allowed(generator, decoder))))
    assert set(kinds.tolist()) == {BAR} | set(SPECIAL_KINDS)  # the first bar opens before any note
    decoder.push(tokenizer.index[TokenKey(BAR, 3, 4, 0)])
    decoder.push(tokenizer.index[TokenKey(NOTE, 60, 5, 12)])
    ok = allowed(generator, decoder)
    note = lambda p, c: tokenizer.index[TokenKey(NOTE, p, 5, c)]
    assert note(64, 12) in ok and note(64, 30) in ok  # a chord, and later in the 3/4 bar
    assert note(64, 6) not in ok and note(64, 36) not in ok and note(64, 42) not in ok  # back; past 36
    assert tokenizer.index[TokenKey(REST, -1, 5, 6)] not in ok
    assert tokenizer.index[TokenKey(BAR, 4, 4, 0)] in ok and tokenizer.index[TokenKey(BAR, 3, 4, 0)] in ok


def test_a_chord_holds_at_most_max_voices_notes(tokenizer):
    generator = GrammarMask(tokenizer, torch.device("cpu"))
    decoder = StreamDecoder(tokenizer)
    decoder.push(tokenizer.index[TokenKey(BAR, 4, 4, 0)])
    for pitch in range(55, 55 + tokenizer.config.max_voices - 1):
        decoder.push(tokenizer.index[TokenKey(NOTE, pitch, 5, 18)])
    assert tokenizer.index[TokenKey(NOTE, 79, 5, 18)] in allowed(generator, decoder)
    decoder.push(tokenizer.index[TokenKey(NOTE, 78, 5, 18)])  # the 16th note at position 18
    ok = allowed(generator, decoder)
    assert tokenizer.index[TokenKey(NOTE, 79, 5, 18)] not in ok
    assert tokenizer.index[TokenKey(NOTE, 79, 5, 24)] in ok
