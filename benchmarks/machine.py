"""What the benchmarks ran on, for their result files."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def describe(hw: dict[str, Any]) -> str:
    """A result file's `hardware` in words: the GPU, else the CPU and its cores."""
    return hw["gpu"] or f"{hw['cpu']}, {hw['cpu_cores']} cores, no GPU"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows) and the vector
    instructions torch's kernels use on it, e.g. "AMD EPYC (AVX512)": machines of one
    name differ there (an AMD EPYC with AVX2 only trained the demo's student at 400 images/s
    where one with AVX512 trained it at about 1,000), and so do the ratios some benchmarks
    measure."""
    name = platform.processor()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({cpu_capability()})"


def cpu_capability() -> str:
    """The widest vector instructions torch's CPU kernels use here: AVX512, AVX2, ..."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
