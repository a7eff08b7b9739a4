"""The training loss: next-token cross-entropy plus the velocity and voice heads' losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from model.fm.state import FMOutput


def sequence_loss(out: FMOutput, targets: Tensor, velocity: Tensor, voice: Tensor,
                  mask: Tensor, is_note: Tensor) -> dict[str, Tensor]:
    """Mean next-token cross-entropy over ``mask``; velocity and voice losses over next notes.

    All targets (B, T) are already shifted (target t is token t+1). Returns the token loss
    (``token``, nats per token), the head losses and their sum (``total``) for backprop.
    """
    # ignore_index rather than a boolean gather: no copy of the (B*T, V) logits.
    token = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                            targets.masked_fill(~mask, -100).reshape(-1), ignore_index=-100)
    notes = (mask & is_note).reshape(-1)
    if notes.any():
        vel = F.cross_entropy(out.velocity.reshape(-1, out.velocity.shape[-1])[notes].float(),
                              velocity.reshape(-1)[notes])
        voi = F.cross_entropy(out.voice.reshape(-1, out.voice.shape[-1])[notes].float(),
                              voice.reshape(-1)[notes])
    else:
        vel = voi = token.new_zeros(())
    return {"token": token, "velocity": vel, "voice": voi, "total": token + 0.1 * (vel + voi)}
