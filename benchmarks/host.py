"""The machine a benchmark ran on, in one line: CPU model, cores and load.

Why: kernel timings on this shared host differ from session to session. The per-image
gradients of DenseNet-121's 3x3 convolutions at 4x4 positions took 670 us unfolded against
780-870 us with a grouped weight-gradient kernel in one session's profile (noted in
``common.dp_grad_sample``) and 1412 against 527 us in a scratch microbenchmark of session 22,
on an AMD EPYC without AVX-512 (no script here prints either). Which CPU a README figure
came from was not recorded before; the issue #20 benchmarks (``train_throughput.py``,
``dp_step_ab.py``, ``peers.py``) now name it, so a figure is compared with one from the
same CPU.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The first ``model name`` of ``cpuinfo`` (Linux), else what ``platform`` reports."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(cpuinfo: Path = CPUINFO) -> str:
    """``<CPU model>, <n> cores``."""
    return f"{cpu_model(cpuinfo)}, {os.cpu_count()} cores"


def describe(cpuinfo: Path = CPUINFO) -> str:
    """``machine()``, then ``load <1-min load average>`` (a script that samples the load
    through its run prints its range instead)."""
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return machine(cpuinfo) + load
