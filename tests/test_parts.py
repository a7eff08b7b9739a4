"""Parts while sampling: a chord's next note goes to a voice after the chord's voices so far, a new
part enters when every part heard strikes, and a stream that writes its chords in one voice keeps
doing so (model/generation/parts.py), with the decoder's chord habit that decides it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
import model.generation.generator as generator_module
from model.generation.generator import BatchGenerator
from model.generation.parts import NEW_VOICES_UP_TO, free_voices, keep_to_parts
from model.midi.read import read_midi
from model.sampling.config import SamplingConfig
from model.tokenizer.sequences import TokenSequence
from model.tokenizer.stream import StreamDecoder
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, NOTE, TokenizerError, TokenKey
from tests.midi_builders import build_midi
from tests.model_shapes import token_shape

MAX_VOICES = 16
# Every pitch from C3 to E5 on every eighth of a 4/4 bar, so any prompt below has its tokens.
EVERYWHERE = [(b * 0.5, 0.5, p, 80, 0) for b in range(8) for p in range(48, 77)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer()
    tok.fit([tok.events(read_midi(build_midi(EVERYWHERE)))])
    return tok


def note(tok: Tokenizer, pitch: int, eighth: int) -> int:
    return tok.index[TokenKey(NOTE, pitch, tok.config.duration_beats.index(0.5), eighth * 6)]


def decoder_after(tok: Tokenizer, notes: list[tuple[int, int, int]]) -> StreamDecoder:
    """A decoder that read one 4/4 bar and then ``notes``: (eighth of the bar, pitch, voice), in order."""
    decoder = StreamDecoder(tok)
    decoder.push(tok.index[TokenKey(BAR, 4, 4, 0)])
    for eighth, pitch, voice in notes:
        decoder.push(note(tok, pitch, eighth), 3, voice)
    return decoder


def open_voices(tok: Tokenizer, decoder: StreamDecoder, token: int) -> set[int] | None:
    allowed = free_voices([decoder], [token], MAX_VOICES)
    return None if allowed is None else set(np.flatnonzero(allowed[0]).tolist())


def test_a_chord_s_next_note_goes_to_a_heard_voice_after_the_chord_s_voices(tokenizer):
    # soprano and bass together, then the soprano alone on the next eighth
    decoder = decoder_after(tokenizer, [(0, 72, 0), (0, 48, 1), (1, 74, 0)])
    assert open_voices(tokenizer, decoder, note(tokenizer, 50, 1)) == {1}
    assert open_voices(tokenizer, decoder, note(tokenizer, 50, 2)) is None  # a later onset: any voice
    inner = decoder_after(tokenizer, [(0, 72, 0), (0, 64, 1), (0, 55, 2), (0, 48, 3), (1, 60, 2)])
    assert open_voices(tokenizer, inner, note(tokenizer, 50, 1)) == {3}  # the tenor struck: the bass

    assert open_voices(tokenizer, decoder, tokenizer.index[TokenKey(BAR, 4, 4, 0)]) is None  # no note


def test_a_new_part_enters_when_every_part_heard_strikes(tokenizer):
    decoder = decoder_after(tokenizer, [(0, 72, 0), (1, 74, 0)])  # one voice so far: a fugue's subject
    assert open_voices(tokenizer, decoder, note(tokenizer, 55, 1)) == set(range(1, MAX_VOICES))
    decoder.push(note(tokenizer, 55, 1), 3, 5)  # it entered as voice 5
    assert open_voices(tokenizer, decoder, note(tokenizer, 60, 1)) == set(range(MAX_VOICES)) - {0, 5}


def test_past_four_parts_a_chord_s_note_joins_the_voice_just_above_it(tokenizer):
    four = [(0, 72 - 5 * v, v) for v in range(NEW_VOICES_UP_TO)]  # 72, 67, 62, 57
    decoder = decoder_after(tokenizer, four)
    assert open_voices(tokenizer, decoder, note(tokenizer, 50, 0)) == {3}  # under the bass: the bass
    assert open_voices(tokenizer, decoder, note(tokenizer, 60, 0)) == {2}  # between tenor and bass
    assert open_voices(tokenizer, decoder, note(tokenizer, 76, 0)) is None  # above the soprano: any


def test_a_stream_that_writes_its_chords_in_one_voice_keeps_them_there(tokenizer):
    """A keyboard piece written as one track: its chords sit in voice 0, so voice 0 stays open."""
    chords = [(eighth, pitch + 2 * eighth, 0) for eighth in range(3) for pitch in (55, 59, 62)]
    decoder = decoder_after(tokenizer, chords)
    assert decoder.chords_in_one_voice == 1.0
    assert open_voices(tokenizer, decoder, note(tokenizer, 48, 2)) is None
    parts = decoder_after(tokenizer, [(eighth, pitch + 2 * eighth, v) for eighth in range(3)
                                      for v, pitch in enumerate((62, 59, 55))])
    assert parts.chords_in_one_voice == 0.0
    assert open_voices(tokenizer, parts, note(tokenizer, 48, 2)) == set(range(3, MAX_VOICES))
    assert decoder_after(tokenizer, [(0, 60, 0)]).chords_in_one_voice is None  # no chord yet


def test_a_voice_the_stream_never_plays_stays_out():
    free = np.zeros((2, 4), dtype=bool)
    free[:, 1] = True  # only voice 1 is free at both streams' onsets
    banned = np.zeros((2, 4), dtype=bool)
    banned[0, 1] = True  # ... but stream 0 never plays voice 1 (the player's part)
    banned[1, 3] = True
    masked = keep_to_parts(banned, free)
    assert masked[0].tolist() == [False, True, False, False]  # together they leave nothing: banned only
    assert masked[1].tolist() == [True, False, True, True]
    assert keep_to_parts(banned, None) is banned and keep_to_parts(None, None) is None
    assert keep_to_parts(None, free).tolist() == (~free).tolist()


def test_the_chord_habit_travels_with_the_decoder_state(tokenizer):
    decoder = decoder_after(tokenizer, [(0, 55, 0), (0, 59, 0), (0, 62, 1), (1, 60, 0), (1, 60, 1)])
    again = StreamDecoder.from_state(tokenizer, decoder.state())
    assert (again.chord_notes, again.chord_notes_in_one_voice) == (decoder.chord_notes,
                                                                   decoder.chord_notes_in_one_voice)
    assert again.pitches_at_cursor == decoder.pitches_at_cursor == (60, 60)
    older = decoder.state()
    del older["chord_habit"], older["pitches_at_cursor"]  # saved before they existed
    old = StreamDecoder.from_state(tokenizer, older)
    assert old.chords_in_one_voice is None and old.pitches_at_cursor == ()
    for key, bad in (("chord_habit", [1.0, 2.0]), ("chord_habit", [-1.0, 0.0]), ("chord_habit", "x"),
                     ("pitches_at_cursor", [200]), ("pitches_at_cursor", 5)):
        broken = decoder.state()
        broken[key] = bad
        with pytest.raises(TokenizerError, match="malformed stream decoder state"):
            StreamDecoder.from_state(tokenizer, broken)


def broken_rules(tokenizer, model, steps: int = 120, streams: int = 4) -> tuple[int, int]:
    """Continue a two-voice prompt in ``streams`` streams; per generated note, check its voice
    against :func:`free_voices` of its stream's decoder just before it: ``(notes whose choice the
    rules narrowed, notes whose voice broke them)``."""
    generator = BatchGenerator(model, tokenizer)
    ids = [tokenizer.index[TokenKey(BAR, 4, 4, 0)], note(tokenizer, 72, 0), note(tokenizer, 48, 0),
           note(tokenizer, 74, 1), note(tokenizer, 50, 1)]
    voices = [0, 0, 1, 0, 1]  # soprano and bass, twice
    sequence = TokenSequence(np.array(ids), np.full(len(ids), 3), np.array(voices))
    state, out, decoders = generator.prime_many([sequence] * streams)
    configs = [SamplingConfig(seed=s, key_pull=0.0, temperature=1.0) for s in range(streams)]
    narrowed = broken = 0
    for step in range(steps):
        before = [d.copy() for d in decoders]
        results, state, out = generator.advance(state, out, decoders, configs, [step] * streams)
        for decoder, r in zip(before, results):
            allowed = free_voices([decoder], [r.token], MAX_VOICES)
            if r.note is not None and allowed is not None:
                narrowed += 1
                broken += not allowed[0, r.voice]
    return narrowed, broken


def test_every_generated_note_keeps_to_the_parts(tokenizer, monkeypatch):
    """An untrained model, whose note head knows nothing, continuing a two-voice prompt with many
    chords: every note's voice is one the rules allowed where it was drawn. Without the rules (the
    note head alone) the same run breaks them: the check can fail."""
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(tokenizer.vocab_size), dim=32, field_layers=2, width=16,
                                     decoder_hidden=32, dropout=0.0))
    model.set_vocabulary(tokenizer.vocab)
    narrowed, broken = broken_rules(tokenizer, model)
    assert narrowed >= 20, "the untrained model writes chords, so the rules had work to do"
    assert broken == 0
    monkeypatch.setattr(generator_module, "free_voices", lambda *args: None)
    assert broken_rules(tokenizer, model)[1] > 0
