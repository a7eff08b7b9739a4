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
        if self.max_voices <= REGISTER_VOICES:
            return bias[..., : self.max_voices]
        return F.pad(bias, (0, self.max_voices - REGISTER_VOICES))  # voices past the register: no term


class NoteHead(nn.Module):
    def __init__(self, width: int, max_voices: int, velocity_levels: int,
                 embedding: int = NOTE_HEAD_WIDTH, voice_register: bool = False) -> None:
        super().__init__()
        self.tables = part_tables(embedding)
        self.state = nn.Linear(width, embedding)
        self.voice = nn.Linear(embedding, max_voices)
        self.velocity = nn.Linear(embedding, velocity_levels)
        self.lines = LineBias(max_voices) if voice_register else None

    def forward(self, hidden: Tensor, parts: Tensor, register: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``hidden`` (…, width), the token's part rows (…, 3) and, with the voice register, the
        register's features before the note (…, REGISTER_FLOATS) -> voice and velocity logits."""
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
        return voice, self.velocity(z)
