"""Timing figures the tests measure but never assert.

How late a note reaches a MIDI port or how much headroom a stream keeps depends on the machine and
on whatever else runs on it, so a test that measures one asserts only what a user notices (every
note arrives, in order, silenced at the end) and hands the figures to the ``timing_report`` fixture
(``tests/conftest.py``). That writes them with a description of the machine to
``tests/artifacts/<name>.json`` (git-ignored) and lists them at the end of the pytest run.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from model.runtime.machine import describe

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def machine() -> dict:
    """What the figures were measured on (:func:`model.runtime.machine.describe`)."""
    return describe()


def spread(values: list[float]) -> dict:
    """p50, p99 and max of ``values`` (the p99 is the value below which 99 % of them lie)."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max": ordered[-1]}


def write_figures(name: str, test: str, summary: str, figures: dict) -> Path:
    """``tests/artifacts/<name>.json``: the test, a one-line summary, the figures and the machine."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.json"
    record = {"test": test, "summary": summary, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **figures,
              "machine": machine()}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
