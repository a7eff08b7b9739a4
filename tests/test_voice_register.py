"""The voice register: each voice's latest note, read beside every token, the same in training and
in generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.fm.config import ModelConfig
from model.fm.machine import FieldMachine
from model.generation.generator import BatchGenerator, StreamStep
from model.midi.read import read_midi
from model.tokenizer.dna import TOKEN_FLOATS
from model.tokenizer.stream import StreamDecoder, chord_rows, register_rows
from model.tokenizer.tokenizer import Tokenizer
from model.tokenizer.vocabulary import NOTE, TokenizerError
from model.tokenizer.voice_register import REGISTER_VOICES, VOICE_FEATURES, VOICE_FLOATS, VoiceRegister
from tests.midi_builders import build_midi
from tests.model_shapes import token_shape

# soprano: C5 for a beat, then D5 for a beat; bass: C3 held two beats
SOPRANO_AND_BASS = [(0, 1, 72, 80, 0), (1, 1, 74, 80, 0), (0, 2, 48, 80, 1)]


def tokenized(notes):
    midi = build_midi(notes)
    tokenizer = Tokenizer()
    tokenizer.fit([tokenizer.events(read_midi(midi))])
    return tokenizer, tokenizer.encode(read_midi(midi))


def voice_rows(floats: np.ndarray) -> np.ndarray:
    """(T, REGISTER_VOICES, VOICE_FEATURES): the register columns of DNA, voice by voice."""
    return floats[:, TOKEN_FLOATS:TOKEN_FLOATS + VOICE_FLOATS].reshape(len(floats), REGISTER_VOICES, VOICE_FEATURES)


def test_register_says_where_each_voice_stands():
    tokenizer, seq = tokenized(SOPRANO_AND_BASS)
    floats, _ = tokenizer.dna(seq)
    notes = np.flatnonzero(tokenizer.kinds(seq.ids) == NOTE)
    pitches = [tokenizer.vocab[t].a for t in seq.ids[notes]]
    d5 = notes[pitches.index(74)]
    rows = voice_rows(floats)[d5]  # after D5 at beat 1
    soprano, bass = rows[seq.voice[d5]], rows[1 - seq.voice[d5]]
    # seen, held (log2(1 + beats) / 3), resting, pitch ((p - 60) / 24), motion (semitones / 12)
    assert soprano == pytest.approx([1, 1 / 3, 0, 14 / 24, 2 / 12])
    assert bass == pytest.approx([1, 1 / 3, 0, -12 / 24, 0])
    assert not rows[2:].any(), "voices that never played stay empty"
    key = floats[d5, TOKEN_FLOATS + VOICE_FLOATS:]
    assert key.sum() == pytest.approx(2) and np.count_nonzero(key) == 2  # C and D so far
    first = voice_rows(floats)[notes[0]]
    assert first[seq.voice[notes[0]], 4] == 0, "a voice's first note has no motion"


def test_a_silent_voice_reads_as_resting():
    tokenizer, seq = tokenized([(0, 1, 72, 80, 0), (3, 1, 74, 80, 0), (0, 1, 48, 80, 1)])
    floats, _ = tokenizer.dna(seq)
    last_note = np.flatnonzero(tokenizer.kinds(seq.ids) == NOTE)[-1]
    rows = voice_rows(floats)[last_note]  # at beat 3 the bass has been silent for two beats
    bass = rows[1 - seq.voice[last_note]]
    assert bass[1] == 0 and bass[2] == pytest.approx(np.log2(3) / 4)


def test_a_chord_in_one_voice_keeps_its_top_note():
    register = VoiceRegister()
    register.note(0, 60, 0, 24)
    register.note(0, 67, 24, 48)
    register.note(0, 64, 24, 48)  # same onset, lower: the line's note is still 67
    assert register.pitch[0] == 67 and register.previous[0] == 60


def test_generation_builds_the_dna_training_reads():
    """Token by token, the generator's DNA (decoder register after each push) equals the DNA
    :meth:`Tokenizer.dna` builds for the whole sequence: the model reads the same inputs."""
    tokenizer, seq = tokenized(SOPRANO_AND_BASS + [(2, 1, 76, 80, 0), (2, 1, 50, 100, 1)])
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(tokenizer.vocab_size), dim=16, field_layers=2, width=8,
                                     decoder_hidden=8))
    model.set_vocabulary(tokenizer.vocab)
    generator = BatchGenerator(model, tokenizer)
    decoder = StreamDecoder(tokenizer)
    rows = []
    for token, velocity, voice in zip(seq.ids.tolist(), seq.velocity.tolist(), seq.voice.tolist()):
        step = StreamStep(token, velocity, voice, decoder.push(token, velocity, voice))
        rows.append(generator.step_inputs([step], [decoder])[1][0])
    floats, _ = tokenizer.dna(seq)
    np.testing.assert_allclose(np.stack(rows), floats, atol=1e-6)


def test_the_register_travels_with_the_decoder_state():
    tokenizer, seq = tokenized(SOPRANO_AND_BASS)
    decoder = StreamDecoder(tokenizer)
    decoder.contexts(seq)
    again = StreamDecoder.from_state(tokenizer, decoder.state())
    np.testing.assert_array_equal(register_rows([again]), register_rows([decoder]))
    twin = decoder.copy()
    twin.register.note(3, 40, 999, 1000)
    assert decoder.register.pitch[3] == -1, "a copy's register is its own"
    broken = decoder.state()
    broken["register"]["pitch"] = [1, 2]
    with pytest.raises(TokenizerError, match="register pitch"):
        StreamDecoder.from_state(tokenizer, broken)


def small_model_and_note():
    """A small untrained model on :data:`SOPRANO_AND_BASS`'s vocabulary and that piece's first note token."""
    tokenizer, seq = tokenized(SOPRANO_AND_BASS)
    torch.manual_seed(0)
    model = FieldMachine(ModelConfig(**token_shape(tokenizer.vocab_size), dim=16, field_layers=2, width=8,
                                     decoder_hidden=8, dropout=0.0))
    model.set_vocabulary(tokenizer.vocab)
    return tokenizer, model, torch.tensor([int(seq.ids[np.flatnonzero(tokenizer.kinds(seq.ids) == NOTE)[0]])])


def fit_voices(model, parameters, note, register, playing, voices: list[int]) -> torch.Tensor:
    """Two rows, the same zero hidden state and ``note``, their own ``register`` and ``playing``
    rows: check that the untrained head gives both the same voice logits, fit ``parameters`` so
    that row i's voice is ``voices[i]``, and return the voice logits after."""
    hidden = torch.zeros(2, model.config.hidden_width)
    before, _ = model.note_logits(hidden, note.expand(2), register, playing)
    torch.testing.assert_close(before[0], before[1])  # a new term starts at zero: as the model was
    optimizer = torch.optim.Adam(parameters, lr=3e-2)
    for _ in range(100):
        voice, _ = model.note_logits(hidden, note.expand(2), register, playing)
        loss = torch.nn.functional.cross_entropy(voice, torch.tensor(voices))
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    return model.note_logits(hidden, note.expand(2), register, playing)[0]


def test_the_note_head_reads_the_register():
    """The same hidden state and chosen note, two registers (the note continues voice 0 by step, or
    voice 1): once trained, the voice distribution follows the register; a zero-initialised head
    starts the same for both (a model given the register starts as it was)."""
    tokenizer, model, note = small_model_and_note()
    pitch = tokenizer.vocab[int(note)].a
    near = [VoiceRegister(), VoiceRegister()]
    near[0].note(0, pitch + 1, 0, 24), near[0].note(1, pitch - 20, 0, 24)
    near[1].note(0, pitch + 20, 0, 24), near[1].note(1, pitch - 1, 0, 24)
    register = torch.from_numpy(np.stack([r.features(24, tokenizer.config.resolution) for r in near]))
    playing = torch.zeros(2, REGISTER_VOICES)  # no voice plays where the note starts
    # the voice that is a step away is the one that plays the note
    after = fit_voices(model, model.note_head.parameters(), note, register, playing, [0, 1])
    assert after[0].argmax() == 0 and after[1].argmax() == 1
    with pytest.raises(ValueError, match="voice register"):
        model.note_logits(torch.zeros(2, model.config.hidden_width), note.expand(2))


def test_the_note_head_reads_the_voices_already_playing():
    """The same hidden state, chosen note and register (two voices, equally far from the note), and
    voice 0 or voice 1 already striking where the note starts: once trained, the note goes to the
    other voice; a zero-initialised chord term starts the same for both."""
    tokenizer, model, note = small_model_and_note()
    pitch = tokenizer.vocab[int(note)].a
    both = VoiceRegister()
    both.note(0, pitch + 3, 0, 24), both.note(1, pitch - 3, 0, 24)
    register = torch.from_numpy(np.stack([both.features(0, tokenizer.config.resolution)] * 2))
    playing = torch.zeros(2, REGISTER_VOICES)
    playing[0, 0] = playing[1, 1] = 1
    after = fit_voices(model, model.note_head.chords.parameters(), note, register, playing, [1, 0])
    assert after[0].argmax() == 1 and after[1].argmax() == 0
    with pytest.raises(ValueError, match="playing at the note's onset"):
        model.note_logits(torch.zeros(2, model.config.hidden_width), note.expand(2), register)


def test_training_and_generation_see_the_same_voices_playing():
    """Per token, the voices already striking where it starts: one pass over a file (training)
    equals asking a decoder before each token (generation); in a chord, the second note sees the
    first one's voice."""
    tokenizer, seq = tokenized(SOPRANO_AND_BASS + [(1, 1, 67, 80, 2)])
    _, _, chords = tokenizer.dna_and_chords(seq)
    decoder = StreamDecoder(tokenizer)
    rows = []
    for token, velocity, voice in zip(seq.ids.tolist(), seq.velocity.tolist(), seq.voice.tolist()):
        rows.append(chord_rows([decoder], [token])[0])
        decoder.push(token, velocity, voice)
    np.testing.assert_array_equal(np.stack(rows), chords)
    notes = [i for i, t in enumerate(seq.ids.tolist()) if tokenizer.vocab[t].kind == NOTE]
    assert chords[notes[0]].sum() == 0, "the first note of the piece joins no chord"
    second_at_zero = [i for i in notes[1:] if chords[i].any()]
    assert second_at_zero and all(chords[i].sum() >= 1 for i in second_at_zero)
    assert chords[[i for i in range(len(seq)) if i not in notes]].sum() == 0, "only notes join chords"
