"""The token grammar kept while sampling: time never goes back in a bar, bars end, chords stay playable."""

from __future__ import annotations

import numpy as np
import torch

from model.generation.grammar import GrammarMask
from model.tokenizer.stream import StreamDecoder
from model.tokenizer.vocabulary import BAR, NOTE, REST, SPECIAL_KINDS, TokenKey

def allowed(mask: GrammarMask, decoder: StreamDecoder) -> set:
    return set(np.nonzero(~mask([decoder])[0].numpy())[0].tolist())


def test_notes_cannot_go_back_in_the_bar_or_past_its_end(bar_tokenizer):
    generator = GrammarMask(bar_tokenizer, torch.device("cpu"))
    decoder = StreamDecoder(bar_tokenizer)
    kinds = bar_tokenizer.kinds(np.array(sorted(allowed(generator, decoder))))
    assert set(kinds.tolist()) == {BAR} | set(SPECIAL_KINDS)  # the first bar opens before any note
    decoder.push(bar_tokenizer.index[TokenKey(BAR, 3, 4, 0)])
    decoder.push(bar_tokenizer.index[TokenKey(NOTE, 60, 5, 12)])
    ok = allowed(generator, decoder)
    note = lambda p, c: bar_tokenizer.index[TokenKey(NOTE, p, 5, c)]
    assert note(64, 12) in ok and note(64, 30) in ok  # a chord, and later in the 3/4 bar
    assert note(64, 6) not in ok and note(64, 36) not in ok and note(64, 42) not in ok  # back; past 36
    assert bar_tokenizer.index[TokenKey(REST, -1, 5, 6)] not in ok
    assert bar_tokenizer.index[TokenKey(BAR, 4, 4, 0)] in ok and bar_tokenizer.index[TokenKey(BAR, 3, 4, 0)] in ok


def test_a_chord_holds_at_most_max_voices_notes(bar_tokenizer):
    generator = GrammarMask(bar_tokenizer, torch.device("cpu"))
    decoder = StreamDecoder(bar_tokenizer)
    decoder.push(bar_tokenizer.index[TokenKey(BAR, 4, 4, 0)])
    for pitch in range(55, 55 + bar_tokenizer.config.max_voices - 1):
        decoder.push(bar_tokenizer.index[TokenKey(NOTE, pitch, 5, 18)])
    assert bar_tokenizer.index[TokenKey(NOTE, 79, 5, 18)] in allowed(generator, decoder)
    decoder.push(bar_tokenizer.index[TokenKey(NOTE, 78, 5, 18)])  # the 16th note at position 18
    ok = allowed(generator, decoder)
    assert bar_tokenizer.index[TokenKey(NOTE, 79, 5, 18)] not in ok
    assert bar_tokenizer.index[TokenKey(NOTE, 79, 5, 24)] in ok
