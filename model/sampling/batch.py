"""The sampling settings of a batch of streams as ``(B,)`` tensors (:class:`SamplingBatch`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.sampling.config import SamplingConfig, is_int


@dataclass
class SamplingBatch:
    """Per-stream sampling settings as ``(B,)`` tensors on the logits' device.

    ``temperature``, ``top_p``, ``min_p``, ``key_pull``: float32; ``top_k``, ``seed``, ``step``: int64.
    ``step`` is the stream's counter (e.g. its position): the stream's random number at a step is
    a pure function of ``(seed, step)``. Build it with :meth:`from_configs`, which validates every
    value through :class:`SamplingConfig`; the constructor checks only shapes, dtypes and devices.
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    min_p: Tensor
    seed: Tensor
    step: Tensor
    key_pull: Tensor | None = None  # None: zeros (no pull)

    def __post_init__(self) -> None:
        if self.key_pull is None:
            self.key_pull = torch.zeros_like(self.temperature)
        kinds = {"temperature": torch.float32, "top_k": torch.int64, "top_p": torch.float32,
                 "min_p": torch.float32, "seed": torch.int64, "step": torch.int64, "key_pull": torch.float32}
        size, device = self.temperature.shape, self.temperature.device
        for name, dtype in kinds.items():
            value = getattr(self, name)
            if value.dtype != dtype or value.dim() != 1:
                raise ValueError(f"SamplingBatch.{name} must be a 1-D {dtype} tensor, "
                                 f"got {value.dtype} of shape {tuple(value.shape)}")
            if value.shape != size or value.device != device:
                raise ValueError(f"SamplingBatch.{name} has shape {tuple(value.shape)} on "
                                 f"{value.device}; temperature has {tuple(size)} on {device}")

    @classmethod
    def from_configs(cls, configs: Sequence[SamplingConfig], steps: Sequence[int],
                     device: torch.device | str | None = None) -> "SamplingBatch":
        """One row per stream: ``configs[i]`` at step ``steps[i]`` (an integer >= 0)."""
        if len(configs) != len(steps):
            raise ValueError(f"{len(configs)} configs but {len(steps)} steps: one of each per stream")
        for i, step in enumerate(steps):
            if not is_int(step) or not 0 <= step < 2**63:
                raise ValueError(f"steps[{i}] must be an integer in [0, 2**63), got {step!r}")
        for i, config in enumerate(configs):
            if not isinstance(config, SamplingConfig):
                raise TypeError(f"configs[{i}] must be a SamplingConfig, got {type(config).__name__}")

        def column(name: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([getattr(c, name) for c in configs], dtype=dtype, device=device)

        return cls(temperature=column("temperature", torch.float32),
                   top_k=column("top_k", torch.int64),
                   top_p=column("top_p", torch.float32),
                   min_p=column("min_p", torch.float32),
                   seed=column("seed", torch.int64),
                   step=torch.tensor([int(s) for s in steps], dtype=torch.int64, device=device),
                   key_pull=column("key_pull", torch.float32))

    def __len__(self) -> int:
        return self.temperature.shape[0]

    def to(self, device: torch.device | str) -> "SamplingBatch":
        return SamplingBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

