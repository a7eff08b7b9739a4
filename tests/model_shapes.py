"""Model table sizes for tests: the default tokenizer's (:class:`model.tokenizer.vocabulary.TokenShape`)."""

from __future__ import annotations

from dataclasses import asdict

from model.tokenizer.tokenizer import Tokenizer


def token_shape(vocab_size: int) -> dict[str, int]:
    """``ModelConfig`` / ``TransformerConfig`` keyword arguments for the default tokenizer's voice and
    velocity tables with ``vocab_size`` tokens."""
    return asdict(Tokenizer().shape) | {"vocab_size": vocab_size}
