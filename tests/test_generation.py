"""Batched generation: many streams stepped together keep to the grammar and reproduce per seed;
each note's voice and velocity are drawn for that note."""

from __future__ import annotations

import numpy as np
import torch

from model.checkpoint.format import load_model
from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.generation.generator import BatchGenerator
from model.sampling.batch import SamplingBatch
from model.sampling.config import SamplingConfig
from model.tokenizer.stream import chord_rows, register_rows
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import BAR, NOTE, SPECIAL_KINDS, TokenKey, special_key
from tests.model_shapes import token_shape

def test_generated_streams_move_forward_through_their_bars(bar_tokenizer):
    """An untrained model draws tokens almost at random; the grammar still holds in every stream."""
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(bar_tokenizer.vocab_size), dim=32, field_layers=2, width=16,
                                     decoder_hidden=32, dropout=0.0))
    generator = BatchGenerator(model, bar_tokenizer)
    state, out, decoders = generator.prime_many([None] * 4)
    configs = [SamplingConfig(temperature=2.0, top_k=0, top_p=1.0, seed=s) for s in range(4)]
    onsets = [[] for _ in range(4)]
    for step in range(300):
        results, state, out = generator.advance(state, out, decoders, configs, [step] * 4)
        for i, r in enumerate(results):
            if r.note is not None:
                onsets[i].append((r.note.onset, r.note.bar, r.note.position))
    for stream in onsets:
        assert stream and [o for o, _, _ in stream] == sorted(o for o, _, _ in stream)
        chord_sizes = np.unique([o for o, _, _ in stream], return_counts=True)[1]
        assert chord_sizes.max() <= bar_tokenizer.config.max_voices
    assert max(d.bar for d in decoders) >= 3  # bars end and new ones begin


# ----------------------------------------------------------------------------- voice and velocity
def trained_generator(served_checkpoint):
    model, tokenizer, _ = load_model(served_checkpoint)
    return BatchGenerator(model, tokenizer)


def note_tokens(tokenizer, pitch: int) -> list[int]:
    return [i for i, key in enumerate(tokenizer.vocab) if key.kind == NOTE and key.a == pitch]


def two_voice_prompt(tokenizer: Tokenizer):
    """Two bars in the tiny corpus's texture: an upper line in voice 0 and a bass in voice 1."""
    from tests.midi_builders import build_midi

    notes = [(b * 0.5, 0.5, 55 + (0, 4, 7, 12)[b % 4], 80, 0) for b in range(16)]
    notes += [(b * 2.0, 2.0, 43 + (0, 5)[b % 2], 60, 1) for b in range(4)]
    return tokenizer.from_midi(build_midi(notes))


def test_voice_depends_on_the_chosen_note(served_checkpoint):
    """The tiny corpus has an upper voice (0, pitches 55..69) and a bass (1, pitches 43..50): from
    the same decoder state, two bars into such a piece (both voices in the register), the note head
    gives the upper pitch to voice 0 and the bass pitch to 1."""
    generator = trained_generator(served_checkpoint)
    _, out, decoder = generator.prime(two_voice_prompt(generator.tokenizer))
    upper, bass = note_tokens(generator.tokenizer, 62)[0], note_tokens(generator.tokenizer, 43)[0]
    tokens = torch.tensor([upper, bass])
    register = torch.from_numpy(register_rows([decoder, decoder]))
    chords = torch.from_numpy(chord_rows([decoder, decoder], tokens.tolist()))
    voice, velocity = generator.model.note_logits(out.hidden.expand(2, -1), tokens, register, chords)
    p = voice.softmax(-1)
    # The upper pitch goes to the upper voice; the bass pitch makes the bass voice far likelier. (Its
    # argmax need not flip: in this corpus the first note of every onset is the upper voice's, and
    # that order is all a tiny model needs to fit its training notes.)
    assert p[0].argmax() == 0 and p[1, 1] > 100 * p[0, 1], p[:, :2]
    assert velocity.softmax(-1).sub(velocity.softmax(-1)[0]).abs().max() > 0  # velocity reads the note too


def test_generated_notes_take_the_voice_of_their_range(served_checkpoint):
    """Not the busiest voice for every note (argmax would give voice 0, which has 4x the notes)."""
    generator = trained_generator(served_checkpoint)
    state, out, decoders = generator.prime_many([None] * 4)
    configs = [SamplingConfig(seed=s, key_pull=0.0) for s in range(4)]
    notes = []
    for step in range(160):
        results, state, out = generator.advance(state, out, decoders, configs, [step] * 4)
        notes += [r.note for r in results if r.note is not None]
    upper = [n.voice for n in notes if n.pitch >= 55]
    bass = [n.voice for n in notes if n.pitch <= 50]
    assert upper and bass, "the tiny model plays both registers"
    assert sum(v == 0 for v in upper) >= 0.9 * len(upper)
    assert sum(v == 1 for v in bass) >= 0.9 * len(bass)


def test_voice_and_velocity_follow_the_stream_seed():
    """Voice and velocity are drawn with the stream's (seed, step): the same seed replays them,
    another seed draws others (an untrained model, so the distributions are wide)."""
    tokenizer = Tokenizer(vocab=[special_key(k) for k in SPECIAL_KINDS] + [TokenKey(BAR, 4, 4, 0)]
                          + [TokenKey(NOTE, 60, 5, 0)])
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(tokenizer.vocab_size), dim=32, field_layers=2, width=16,
                                     decoder_hidden=32, dropout=0.0))
    model.set_vocabulary(tokenizer.vocab)
    generator = BatchGenerator(model, tokenizer)
    _, out, decoder = generator.prime(None)
    note = torch.full((1,), tokenizer.vocab_size - 1)

    def draws(seed: int) -> list[tuple[int, int]]:
        parts = []
        for step in range(64):
            batch = SamplingBatch.from_configs([SamplingConfig(seed=seed, temperature=1.0, top_p=1.0)], [step])
            voice, velocity = generator.note_parts(note, out, [decoder], batch)
            parts.append((int(voice), int(velocity)))
        return parts

    first, again, other = draws(3), draws(3), draws(4)
    assert first == again
    assert first != other
    assert len({v for v, _ in first}) > 1 and len({v for _, v in first}) > 1  # drawn, not argmax
