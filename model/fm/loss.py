"""The training loss: next-token cross-entropy plus the note head's voice and velocity losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.fm.state import FMOutput
from model.tokenizer.dna import TOKEN_FLOATS

NOTE_LOSS_WEIGHT = 0.1  # weight of the voice and velocity losses beside the token loss


def sequence_loss(model: nn.Module, out: FMOutput, targets: Tensor, velocity: Tensor, voice: Tensor,
                  mask: Tensor, is_note: Tensor, dna: Tensor, chords: Tensor | None = None) -> dict[str, Tensor]:
    """Mean next-token cross-entropy over ``mask``; velocity and voice losses over next notes.

    All targets (B, T) are already shifted (target t is token t+1). The note head is
    teacher-forced: ``model.note_logits`` reads each next note's true token, as generation feeds
    it the sampled one, with the voice register of the inputs' ``dna`` (B, T, DNA_FLOATS) and ``chords``
    (B, T, REGISTER_VOICES), the voices already playing where each target starts (needed by a
    model with ``chord_voices``). Returns the token loss (``token``, nats per token), the head losses and
    their weighted sum (``total``) for backprop.
    """
    sums = sequence_loss_sums(model, out, targets, velocity, voice, mask, is_note, dna, chords)
    return mean_losses(sums, sums["tokens"], sums["notes"])


def sequence_loss_sums(model: nn.Module, out: FMOutput, targets: Tensor, velocity: Tensor, voice: Tensor,
                       mask: Tensor, is_note: Tensor, dna: Tensor, chords: Tensor | None = None) -> dict[str, Tensor]:
    """The sums behind :func:`sequence_loss`: ``token``, ``velocity`` and ``voice`` (summed NLL, nats)
    and the counts they are over, ``tokens`` (real targets) and ``notes`` (real note targets).

    Sums add up across the shards of a batch (data-parallel training divides them by the whole
    batch's counts). The note head runs even when there is no note (on an empty selection, adding
    0), so every parameter is in the graph of every batch, as DDP requires.
    """
    # ignore_index rather than a boolean gather: no copy of the (B*T, V) logits.
    token = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                            targets.masked_fill(~mask, -100).reshape(-1), ignore_index=-100,
                            reduction="sum")
    notes = (mask & is_note).reshape(-1)
    hidden = out.hidden.reshape(-1, out.hidden.shape[-1])[notes]
    register = dna[..., TOKEN_FLOATS:].reshape(-1, dna.shape[-1] - TOKEN_FLOATS)[notes]
    playing = None if chords is None else chords.reshape(-1, chords.shape[-1])[notes]
    voice_logits, velocity_logits = model.note_logits(hidden, targets.reshape(-1)[notes], register, playing)
    vel = F.cross_entropy(velocity_logits.float(), velocity.reshape(-1)[notes], reduction="sum")
    voi = F.cross_entropy(voice_logits.float(), voice.reshape(-1)[notes], reduction="sum")
    return {"token": token, "velocity": vel, "voice": voi, "tokens": mask.sum(), "notes": notes.sum()}


def mean_losses(sums: dict[str, Tensor], tokens: Tensor, notes: Tensor) -> dict[str, Tensor]:
    """:func:`sequence_loss_sums` as means over ``tokens`` targets and ``notes`` note targets (a
    head loss is 0 where there is no note): ``token``, ``velocity``, ``voice`` and their weighted sum
    ``total`` for backprop."""
    token = sums["token"] / tokens
    vel, voi = (sums[k] / notes.clamp(min=1) for k in ("velocity", "voice"))
    return {"token": token, "velocity": vel, "voice": voi,
            "total": token + NOTE_LOSS_WEIGHT * (vel + voi)}
