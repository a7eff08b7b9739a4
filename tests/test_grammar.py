"""The token grammar kept while sampling: time never goes back in a bar, bars end, chords stay playable."""

from __future__ import annotations

import numpy as np
import torch

from model.generation.grammar import MAX_UNISON, GrammarMask
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


def test_a_pitch_starts_at_most_max_unison_times_at_one_onset(bar_tokenizer):
    grammar = GrammarMask(bar_tokenizer, torch.device("cpu"))
    decoder = StreamDecoder(bar_tokenizer)
    note = lambda p, c: bar_tokenizer.index[TokenKey(NOTE, p, 5, c)]
    decoder.push(bar_tokenizer.index[TokenKey(BAR, 4, 4, 0)])
    for _ in range(MAX_UNISON - 1):
        decoder.push(note(60, 12))
    assert note(60, 12) in allowed(grammar, decoder)  # two parts in unison
    decoder.push(note(60, 12))
    ok = allowed(grammar, decoder)
    assert note(60, 12) not in ok  # one copy more
    assert note(62, 12) in ok and note(55, 12) in ok  # other pitches of the chord
    assert note(60, 18) in ok  # the same pitch at the next onset
    other = StreamDecoder(bar_tokenizer)  # a stream beside it, in the same place, is its own
    other.push(bar_tokenizer.index[TokenKey(BAR, 4, 4, 0)])
    other.push(note(64, 12))
    both = grammar([decoder, other]).numpy()
    assert both[0, note(60, 12)] and not both[1, note(60, 12)]
    decoder.push(note(64, 18))  # the next onset starts afresh
    assert note(60, 18) in allowed(grammar, decoder)
    for _ in range(MAX_UNISON):
        decoder.push(note(60, 18))
    decoder.push(bar_tokenizer.index[TokenKey(BAR, 4, 4, 0)])  # a bar line ends the onset too
    assert decoder.notes_at_cursor == 0 and note(60, 0) in allowed(grammar, decoder)


def test_an_answer_is_a_note_that_starts_by_its_limit(bar_tokenizer):
    grammar = GrammarMask(bar_tokenizer, torch.device("cpu"))
    decoder = StreamDecoder(bar_tokenizer)
    decoder.push(bar_tokenizer.index[TokenKey(BAR, 4, 4, 0)])
    decoder.push(bar_tokenizer.index[TokenKey(NOTE, 60, 5, 12)])  # a played note at position 12
    late = grammar.answer([decoder, decoder], [18, None])
    hurried = set(np.nonzero(~(late[0] | grammar([decoder])[0]).numpy())[0].tolist())
    note = lambda p, c: bar_tokenizer.index[TokenKey(NOTE, p, 5, c)]
    assert note(64, 12) in hurried and note(64, 18) in hurried  # a chord with it, or the next eighth
    assert note(64, 24) not in hurried  # later than the limit
    assert bar_tokenizer.index[TokenKey(REST, -1, 5, 18)] not in hurried  # a note, not a rest
    assert bar_tokenizer.index[TokenKey(BAR, 4, 4, 0)] not in hurried
    assert not late[1].any()  # a stream without a limit is left alone
    assert grammar.answer([decoder], [None]) is None
    assert not grammar.answer([decoder], [6])[0].any()  # the cursor is past the limit: nothing to hurry


def test_an_answer_the_grammar_leaves_no_note_for_falls_back_to_the_grammar(bar_tokenizer):
    """``answer_logits`` keeps a stream's logits when the answer mask would leave it nothing."""
    from model.generation.generator import BatchGenerator

    grammar = GrammarMask(bar_tokenizer, torch.device("cpu"))
    decoder = StreamDecoder(bar_tokenizer)
    decoder.push(bar_tokenizer.index[TokenKey(BAR, 4, 4, 0)])
    decoder.push(bar_tokenizer.index[TokenKey(NOTE, 60, 5, 12)])
    holder = type("Holder", (), {"grammar": grammar})()
    logits = torch.zeros((2, bar_tokenizer.vocab_size)).masked_fill(grammar([decoder, decoder]), float("-inf"))
    logits[:, :len(SPECIAL_KINDS)] = float("-inf")  # never sampled (the generator bans them)
    logits[1, [bar_tokenizer.index[TokenKey(NOTE, p, 5, c)] for p in range(55, 80) for c in (12, 18)]] = float("-inf")
    out = BatchGenerator.answer_logits(holder, logits.clone(), [decoder, decoder], [18, 18])
    assert torch.isinf(out[0]).any() and torch.isfinite(out[0]).sum() == 2 * 25  # only the hurried notes
    assert torch.equal(out[1], logits[1])  # no hurried note left: unchanged
