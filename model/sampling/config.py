"""A stream's sampling settings (:class:`SamplingConfig`) and their ranges: the one source of the
defaults, the limits and the error messages, for the CLIs (flags), the wire protocol and the engine."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields

SEED_LIMIT = 2**63  # seeds live in an int64 tensor
# Lower ends sampling really handles: float32 logits / 0.01 stay finite, top_p * mass stays > 0.
MIN_TEMPERATURE = 0.01
MIN_TOP_P = 0.001


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """The values a setting may take: ``low``..``high``, each end open or closed."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    note: str = ""  # what a special value means, e.g. "0 = off"

    def contains(self, value: object) -> bool:
        if not (is_int(value) if self.integer else is_real(value)):
            return False
        if not self.integer and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """``"a number in (0, 10]"``, ``"an integer in [0, 2**63)"``."""
        high = "2**63" if self.high == SEED_LIMIT else f"{self.high:g}"
        interval = f"{'(' if self.low_open else '['}{self.low:g}, {high}{')' if self.high_open else ']'}"  # noqa: E501
        return (f"{'an integer' if self.integer else 'a number'} in {interval}"
                + (f" ({self.note})" if self.note else ""))

    def check(self, name: str, value: object) -> None:
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")


def _setting(default, help_text: str, allowed: Range):
    return field(default=default, metadata={"help": f"{help_text} {allowed.describe()}.", "range": allowed})


@dataclass(frozen=True)
class SamplingConfig:
    """How one stream samples. The single source of truth for the sampling defaults and ranges
    (``metadata["range"]`` of each field, also in :data:`SETTING_RANGES`)."""

    temperature: float = _setting(0.85, "Softmax temperature; lower is sharper:", Range(MIN_TEMPERATURE, 10))
    top_k: int = _setting(50, "Keep the k most likely tokens:", Range(0, 100_000, integer=True, note="0 = off"))
    top_p: float = _setting(0.95, "Nucleus: keep the smallest set of top tokens with this much probability:",
                            Range(MIN_TOP_P, 1, note="1 = off"))
    min_p: float = _setting(0.0, "Drop tokens less likely than min_p times the top token:",
                            Range(0, 1, high_open=True, note="0 = off"))
    seed: int = _setting(0, "Seed of the stream's counter-based random numbers:",
                         Range(0, SEED_LIMIT, high_open=True, integer=True))
    key_pull: float = _setting(1.5, "How strongly notes lean toward the prompt and the notes played in: "
                               "half toward their pitch classes, half toward their key "
                               "(see model/generation/key_pull.py):",
                               Range(0, 10, note="0 = off"))

    def __post_init__(self) -> None:
        for f in fields(self):
            f.metadata["range"].check(f.name, getattr(self, f.name))


SETTING_RANGES: dict[str, Range] = {f.name: f.metadata["range"] for f in fields(SamplingConfig)}

