"""The factored next-token head (``ModelConfig.head = "factored"``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FactoredHead(nn.Module):
    """Logits ``h @ W.T + b`` with ``W[token] = P[kind, a] + Q[kind, b] + R[kind, c]``.

    (a, b, c) are the token key's fields (:class:`model.tokenizer.vocabulary.TokenKey`: pitch, duration
    index, position for a NOTE; numerator, denominator for a BAR; -1 where unused), clamped to
    the table sizes. ``parts`` (V, 3) is a saved buffer of row indices.
    """

    SIZES = (130, 33, 257)  # a + 1, b + 1, c + 1 are clamped to [0, size)
    KINDS = 7

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(self.KINDS * n, width) for n in self.SIZES)
        for table in self.tables:
            nn.init.normal_(table.weight, std=width ** -0.5)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.register_buffer("parts", torch.zeros(vocab_size, 3, dtype=torch.int64))

    def set_vocabulary(self, vocab) -> None:
        if len(vocab) != self.parts.shape[0]:
            raise ValueError(f"vocabulary of {len(vocab)} tokens for a head of {self.parts.shape[0]}")
        rows = [[key.kind * n + min(max(value + 1, 0), n - 1)
                 for value, n in zip((key.a, key.b, key.c), self.SIZES)] for key in vocab]
        self.parts.copy_(torch.tensor(rows, dtype=torch.int64))

    def weight(self) -> Tensor:
        return sum(table(self.parts[:, i]) for i, table in enumerate(self.tables))

    def forward(self, h: Tensor) -> Tensor:
        # h @ (P + Q + R).T = h @ P.T + h @ Q.T + h @ R.T: three products with the small tables
        # (7 * 420 rows in all), then a gather to the V tokens, instead of one with V rows.
        if torch.is_grad_enabled():
            logits = self.bias.to(h.dtype)
            for i, table in enumerate(self.tables):
                logits = logits + torch.index_select(F.linear(h, table.weight), -1, self.parts[:, i])
            return logits
        # Inference: gather whole rows of the transposed products (V, N) rather than columns of
        # (N, V) -- 6x faster on CPU for a batch of 128 streams. Same sums, same order.
        flat = h.reshape(-1, h.shape[-1])
        logits_t = self.bias.to(h.dtype).unsqueeze(1)
        for i, table in enumerate(self.tables):
            logits_t = logits_t + torch.index_select(F.linear(table.weight, flat), 0, self.parts[:, i])
        return logits_t.t().contiguous().reshape(*h.shape[:-1], -1)
