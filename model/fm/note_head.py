"""The note head: a note's voice and velocity, chosen *for the note that was chosen*.

The next-token head picks the note (pitch, duration, position); only then does this head, given
the decoder's state and that note's token, give the distribution of its voice and velocity:

    z        = GELU(Linear(width, E)(h) + P[pitch] + Q[duration] + R[position])
    voice    = Linear(E, max_voices)(z)
    velocity = Linear(E, velocity_levels)(z)

Trained teacher-forced on the true next token, and at generation fed the sampled one
(:meth:`model.generation.generator.BatchGenerator.advance`), which then *samples* both with the
stream's own random numbers and temperature. A head that never saw the note (the earlier design)
can only say which voice is most common; this one says which voice plays *this* pitch now: the
soprano's G, not the bass's.

With the voice register (``ModelConfig.voice_register``), each voice's logit also gets a term
from where that voice stands (:mod:`model.tokenizer.voice_register`) and how far the chosen note
lies from its latest note, the same small network for every voice (:class:`LineBias`):

    voice[v] += g(seen_v, held_v, resting_v, motion_v, d_v, |d_v|, d_v * motion_v),  d_v = (pitch - pitch_v) / 12

so a note goes to the free voice it continues by step, not to the most common voice.

With the chord term (``ModelConfig.chord_voices``), each voice's logit also gets a term from
whether that voice already plays at the chosen note's onset (:class:`ChordBias`):

    voice[v] += c(struck_v, seen_v, free, struck / seen)

where ``struck_v`` is 1 when voice v's latest note starts where the chosen note starts
(:func:`model.tokenizer.voice_register.chord_voices`), ``free`` is 1 when some voice that has
played is not struck there, and ``struck / seen`` the share of the voices heard so far that are.
Without it, nothing in the head tells the second note of a chord that the voice it would join
has just struck: a generated texture then piles its chords into one voice (measured on the
held-out continuations, ``chords_in_one_voice``: 0.64 of the generated chords, against 0.10 in
Bach's, none at all in 14 of the 20 pieces), the voices it leaves fall silent, and the register
shows one line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fm.factored_head import PART_SIZES, part_tables
from model.tokenizer.vocabulary import NOTE
from model.tokenizer.voice_register import CENTRE_PITCH, REGISTER_VOICES, VOICE_FEATURES, VOICE_FLOATS

NOTE_HEAD_WIDTH = 128
LINE_FEATURES = 7
LINE_HIDDEN = 32
CHORD_FEATURES = 4
CHORD_HIDDEN = 16


class LineBias(nn.Module):
    """Per voice, a logit from the voice register's row and the chosen note's distance to it
    (the module docstring's ``g``); starts at zero, so a model given it learns from where it was."""

    def __init__(self, max_voices: int) -> None:
        super().__init__()
        self.max_voices = max_voices
        # No output bias: one number added to every voice's logit changes nothing (and, with no
        # gradient but rounding noise, Adam would only walk it at random).
        self.net = nn.Sequential(nn.Linear(LINE_FEATURES, LINE_HIDDEN), nn.GELU(), nn.Linear(LINE_HIDDEN, 1, bias=False))
        nn.init.zeros_(self.net[2].weight)

    def forward(self, register: Tensor, pitch: Tensor) -> Tensor:
        """``register`` (…, REGISTER_FLOATS) and the chosen pitch (…) -> (…, max_voices) logits."""
        rows = register[..., :VOICE_FLOATS].float().unflatten(-1, (REGISTER_VOICES, VOICE_FEATURES))
        seen, held, resting, last, motion = rows.unbind(-1)
        gap = (pitch.float().unsqueeze(-1) - (last * 24 + CENTRE_PITCH)) / 12 * seen
        features = torch.stack((seen, held, resting, motion, gap, gap.abs(), gap * motion), dim=-1)
        bias = self.net(features.to(self.net[0].weight.dtype)).squeeze(-1)  # (…, REGISTER_VOICES)
        return _pad_voices(bias, self.max_voices)


def _pad_voices(bias: Tensor, max_voices: int) -> Tensor:
    """Per-register-voice logits ``(…, REGISTER_VOICES)`` cut or zero-padded to ``max_voices``."""
    if max_voices <= REGISTER_VOICES:
        return bias[..., :max_voices]
    return F.pad(bias, (0, max_voices - REGISTER_VOICES))  # voices past the register: no term


class ChordBias(nn.Module):
    """Per voice, a logit from whether it already plays at the chosen note's onset (the module
    docstring's ``c``); starts at zero, so a model given it learns from where it was."""

    def __init__(self, max_voices: int) -> None:
        super().__init__()
        self.max_voices = max_voices
        self.net = nn.Sequential(nn.Linear(CHORD_FEATURES, CHORD_HIDDEN), nn.GELU(),
                                 nn.Linear(CHORD_HIDDEN, 1, bias=False))
        nn.init.zeros_(self.net[2].weight)

    def forward(self, register: Tensor, struck: Tensor) -> Tensor:
        """``register`` (…, REGISTER_FLOATS) and ``struck`` (…, REGISTER_VOICES) -> (…, max_voices)."""
        seen = register[..., :VOICE_FLOATS].float().unflatten(-1, (REGISTER_VOICES, VOICE_FEATURES))[..., 0]
        struck = struck.float()
        free = ((seen > 0) & (struck == 0)).any(dim=-1, keepdim=True).float().expand_as(seen)
        share = (struck.sum(dim=-1, keepdim=True) / seen.sum(dim=-1, keepdim=True).clamp_min(1)).expand_as(seen)
        features = torch.stack((struck, seen, free, share), dim=-1)
        bias = self.net(features.to(self.net[0].weight.dtype)).squeeze(-1)
        return _pad_voices(bias, self.max_voices)


class NoteHead(nn.Module):
    def __init__(self, width: int, max_voices: int, velocity_levels: int,
                 embedding: int = NOTE_HEAD_WIDTH, voice_register: bool = False,
                 chord_voices: bool = False) -> None:
        super().__init__()
        self.tables = part_tables(embedding)
        self.state = nn.Linear(width, embedding)
        self.voice = nn.Linear(embedding, max_voices)
        self.velocity = nn.Linear(embedding, velocity_levels)
        self.lines = LineBias(max_voices) if voice_register else None
        self.chords = ChordBias(max_voices) if chord_voices else None

    def forward(self, hidden: Tensor, parts: Tensor, register: Tensor | None = None,
                chords: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``hidden`` (…, width), the token's part rows (…, 3), with the voice register the
        register's features before the note (…, REGISTER_FLOATS) and with the chord term the voices
        already playing where the note starts (…, REGISTER_VOICES) -> voice and velocity logits."""
        z = self.state(hidden)
        for i, table in enumerate(self.tables):
            z = z + table(parts[..., i]).to(z.dtype)
        z = F.gelu(z)
        voice = self.voice(z)
        if self.lines is not None:
            if register is None:
                raise ValueError("this note head reads the voice register: pass the register's features")
            pitch = parts[..., 0] - NOTE * PART_SIZES[0] - 1  # the NOTE key's pitch (its ``a``)
            voice = voice + self.lines(register, pitch).to(voice.dtype)
        if self.chords is not None:
            if chords is None:
                raise ValueError("this note head reads the voices playing at the note's onset: pass chords")
            voice = voice + self.chords(register, chords).to(voice.dtype)
        return voice, self.velocity(z)
