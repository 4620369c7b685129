"""What the benchmarks ran on, for their result files."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def describe(hw: dict[str, Any]) -> str:
    """A result file's `hardware` in words: the GPU, else the CPU and its cores."""
    return hw["gpu"] or f"{hw['cpu']}, {hw['cpu_cores']} cores, no GPU"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
