"""The Field Machine (see :mod:`model.fm` for the architecture): a parallel ``forward`` for
training and a batched O(1) ``step`` for generation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.fm.config import ModelConfig, parse_decays
from model.fm.factored_head import FactoredHead, token_part_rows
from model.fm.field import FieldCode
from model.fm.field_layer import FieldLayer
from model.fm.lookup import DNALookup
from model.fm.note_head import NoteHead
from model.fm.state import FieldState, FMOutput
from model.tokenizer.dna import TOKEN_FLOATS
from model.tokenizer.voice_register import KEY_FLOATS, VOICE_FLOATS


class FieldMachine(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.code = FieldCode(c.field_floats, c.position_base, parse_decays(c.decays))
        stream = c.width if c.field_layers else c.dim  # what a token's DNA is projected to
        self.voice_embedding = nn.Embedding(c.voice_slots, c.voice_embedding)
        self.project = nn.Linear(c.dna_width, stream)
        self.lookup = DNALookup(stream) if c.dna_lookup else None
        # The register's voices and its key profile, each projected on its own; both start silent,
        # so a model given the register later (model.train --init_from) begins as it was.
        # (one bias between them: the register's)
        self.register = nn.Linear(VOICE_FLOATS, stream) if c.voice_register else None
        self.key_profile = nn.Linear(KEY_FLOATS, stream, bias=False) if c.voice_register else None
        for part in (self.register, self.key_profile):
            if part is not None:
                nn.init.zeros_(part.weight)
        if self.register is not None:
            nn.init.zeros_(self.register.bias)
        if c.field_layers:
            self.layers = nn.ModuleList(FieldLayer(c.width, c.field_floats, c.decoder_hidden, c.dropout, c.field_layers,
                                                   c.learn_decays, c.gated, c.conv) for _ in range(c.field_layers))
            self.norm = nn.RMSNorm(c.width)
        else:
            width = c.dim * (2 if c.direct else 1)
            layers: list[nn.Module] = []
            for _ in range(c.decoder_layers):
                layers += [nn.Linear(width, c.decoder_hidden), nn.GELU(), nn.Dropout(c.dropout)]
                width = c.decoder_hidden
            self.decoder = nn.Sequential(*layers)
            self.field_dropout = nn.Dropout(c.field_dropout)
        self.token_head = (FactoredHead(c.vocab_size, c.hidden_width) if c.head == "factored"
                           else nn.Linear(c.hidden_width, c.vocab_size))
        self.note_head = NoteHead(c.hidden_width, c.max_voices, c.velocity_levels,
                                  voice_register=c.voice_register, chord_voices=c.chord_voices)
        # Token -> rows of the part tables, shared by the factored head and the note head.
        self.register_buffer("token_parts", torch.zeros(c.vocab_size, 3, dtype=torch.int64))

    # ----------------------------------------------------------------- pieces
    def position_code(self, positions: Tensor) -> Tensor:
        """(…, F) float32 position code of one field at integer positions (…)."""
        return self.code.position_code(positions)

    def embed(self, dna: Tensor, voice_slots: Tensor) -> Tensor:
        """Project DNA (…, DNA_FLOATS) and voice slots (…) to the stream's width: the token's own
        columns with its voice embedding, plus (``voice_register``) the voice register's."""
        own = dna[..., :TOKEN_FLOATS]
        features = torch.cat((own.to(self.project.weight.dtype), self.voice_embedding(voice_slots)), dim=-1)
        x = self.project(features)
        if self.lookup is not None:
            x = x + self.lookup(own).to(x.dtype)
        if self.register is not None:
            voices, key = dna[..., TOKEN_FLOATS:TOKEN_FLOATS + VOICE_FLOATS], dna[..., TOKEN_FLOATS + VOICE_FLOATS:]
            x = x + self.register(voices.to(self.register.weight.dtype)).to(x.dtype)
            x = x + self.key_profile(key.to(self.key_profile.weight.dtype)).to(x.dtype)
        return x

    def readout(self, field: Tensor, positions: Tensor, current: Tensor,
                sin_cos: tuple[Tensor, Tensor]) -> Tensor:
        """The one-field decoder's input from the field (…, D) float32 at positions (…) or (T,)."""
        if self.config.readout == "demod":
            field = self.code.demodulate(field, positions, sin_cos)
        x = self.field_dropout(field.to(self.project.weight.dtype))
        if self.config.direct:
            x = torch.cat((x, current.to(x.dtype)), dim=-1)
        return x

    def heads(self, hidden: Tensor) -> FMOutput:
        logits = (self.token_head(hidden, self.token_parts) if isinstance(self.token_head, FactoredHead)
                  else self.token_head(hidden))
        return FMOutput(logits, hidden)

    def note_logits(self, hidden: Tensor, tokens: Tensor, register: Tensor | None = None,
                    chords: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Voice and velocity logits of the note ``tokens`` (…) chosen after ``hidden`` (…, width),
        with the voice register's features there (…, REGISTER_FLOATS): the DNA columns past
        ``TOKEN_FLOATS`` of the token read last (needed when ``voice_register`` is on), and the
        voices already playing where the note starts (…, REGISTER_VOICES) (needed when
        ``chord_voices`` is on: :func:`model.tokenizer.stream.chord_rows`)."""
        return self.note_head(hidden, self.token_parts[tokens], register, chords)

    def split_field(self, field: Tensor) -> tuple[Tensor, ...]:
        """A stream's state (…, state_floats) as the states of its layers."""
        return field.split(self.config.layer_state_floats, dim=-1)

    # ----------------------------------------------------------------- training
    def forward(self, dna: Tensor, voice_slots: Tensor, *, start: FieldState | None = None,
                return_state: bool = False, lengths: Tensor | None = None
                ) -> FMOutput | tuple[FMOutput, FieldState]:
        """Parallel pass over (B, T) sequences.

        ``dna`` (B, T, DNA_FLOATS), ``voice_slots`` (B, T). Each row starts at position 0 with an empty
        field, or continues from ``start`` (its field and positions), so a long sequence can be
        processed in chunks with the same result. Sequences of different lengths are padded on
        the right: padding only adds to the field after a sequence's last real token, so it never
        reaches a real position (mask it out of the loss). Output at t predicts token t+1.
        With ``return_state``, also the :class:`FieldState` after the last position of each row, or
        after its first ``lengths`` (B,) positions where given (rows of different lengths read together).
        """
        batch, length = voice_slots.shape
        x = self.embed(dna, voice_slots)  # (B, T, width or D)
        positions = torch.arange(length, device=voice_slots.device)  # (T,), broadcast over B
        if start is not None:
            positions = start.position.unsqueeze(1) + positions  # (B, T)
        sin_cos = self.code.sin_cos(positions)
        last = None if lengths is None else lengths - 1
        if self.config.field_layers:
            starts = self.split_field(start.field) if start is not None else (None,) * len(self.layers)
            ends = []
            for layer, begin in zip(self.layers, starts):
                x, end = layer(x, positions, sin_cos, self.code, begin, last)
                ends.append(end)
            hidden, end_field = self.norm(x.to(self.norm.weight.dtype)), torch.cat(ends, dim=-1)
        else:
            coded = x.float() * self.code.position_code(positions, sin_cos)
            field = self.code.accumulate(coded, None if start is None else start.field)
            rows = torch.arange(batch, device=field.device)
            hidden = self.decoder(self.readout(field, positions, x, sin_cos))
            end_field = field[:, -1] if last is None else field[rows, last]
        out = self.heads(hidden)
        if not return_state:
            return out
        read = length if lengths is None else lengths
        end = start.position + read if start is not None else torch.zeros(
            batch, dtype=torch.int64, device=end_field.device) + read
        return out, FieldState(end_field.contiguous(), end)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def step(self, state: FieldState, dna: Tensor, voice_slots: Tensor) -> tuple[FMOutput, FieldState]:
        """Advance B streams by one token each, in O(1).

        ``state``: field (B, D) and position (B,) — streams may be at different positions.
        ``dna`` (B, DNA_FLOATS) and ``voice_slots`` (B,) describe each stream's new token, which takes
        position ``state.position``. Returns the outputs (B, V) predicting each stream's next token
        and the new state (the input state is not modified).
        """
        x = self.embed(dna, voice_slots)  # (B, width or D)
        sin_cos = self.code.sin_cos(state.position)
        if self.config.field_layers:
            fields = []
            for layer, field in zip(self.layers, self.split_field(state.field)):
                x, field = layer.step(x, state.position, sin_cos, self.code, field)
                fields.append(field)
            hidden, new_field = self.norm(x.to(self.norm.weight.dtype)), torch.cat(fields, dim=-1)
        else:
            coded = x.float() * self.code.position_code(state.position, sin_cos)
            new_field = self.code.advance(coded, state.field)
            hidden = self.decoder(self.readout(new_field, state.position, x, sin_cos))
        return self.heads(hidden), FieldState(new_field, state.position + 1)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_vocabulary(self, vocab) -> None:
        """The token -> parts table the factored head and the note head read."""
        if len(vocab) != self.token_parts.shape[0]:
            raise ValueError(f"vocabulary of {len(vocab)} tokens for a model of {self.token_parts.shape[0]}")
        self.token_parts.copy_(token_part_rows(vocab))
