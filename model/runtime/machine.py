"""What a figure was measured on: CPU model and vector extensions, cores, load average.

Speed figures from different machines do not compare (AVX-512 with bf16 against AVX2 only, say), so
every benchmark and timing report prints :func:`describe` with its figures.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> dict:
    """The CPU model, its AVX-512 flags, whether it has AVX2, the core count, the load average."""
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
            "amx_bf16": "amx_bf16" in flags,
            "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "platform": platform.platform()}


def line() -> str:
    """:func:`describe` on one line."""
    d = describe()
    vector = [name for name in ("avx2", "amx_bf16") if d[name]] + [f for f in d["avx512_flags"]
                                                                   if f in ("avx512f", "avx512_bf16")]
    load = d["load_average_1_5_15_min"]
    return (f"{d['cpu_model']}, {d['cpus']} CPUs, flags {','.join(sorted(vector)) or '-'}"
            + (f", load {load[0]:.2f}" if load else ""))
