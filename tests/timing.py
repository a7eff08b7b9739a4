"""Timing figures the tests measure but never assert.

How late a note reaches a MIDI port or how much headroom a stream keeps depends on the machine and
on whatever else runs on it, so a test that measures one asserts only what a user notices (every
note arrives, in order, silenced at the end) and hands the figures to the ``timing_report`` fixture
(``tests/conftest.py``). That writes them with a description of the machine to
``tests/artifacts/<name>.json`` (git-ignored) and lists them at the end of the pytest run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def machine() -> dict:
    """What the figures were measured on: CPU model and vector extensions, cores, load average."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and model is None:
                model = value
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the platform module's description is what there is
        pass
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    return {"cpu_model": model or platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "avx512": bool(avx512), "avx512_flags": avx512, "avx2": "avx2" in flags,
            "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "platform": platform.platform()}


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
