"""The benchmarks' own helpers (``benchmarks/``: scripts, not part of the package)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _host():
    spec = importlib.util.spec_from_file_location("benchmarks_host", BENCHMARKS / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_machine_line_names_the_first_cpu_model_or_falls_back(tmp_path):
    """A figure is only comparable with one from the same CPU: the line names the first
    ``model name`` of /proc/cpuinfo (x86: one block per core), whitespace collapsed; a
    cpuinfo without one (ARM: ``CPU implementer``) or no cpuinfo at all gives what
    ``platform`` reports, never an empty name."""
    host = _host()
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  7B13\n"
                   "flags\t\t: fpu avx2\n\nprocessor\t: 1\nmodel name\t: Other CPU\n")
    assert host.cpu_model(x86) == "AMD EPYC 7B13"
    assert host.machine(x86) == f"AMD EPYC 7B13, {os.cpu_count()} cores"
    assert host.describe(x86).startswith(host.machine(x86) + ", load ")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nmodel name\t:\n")
    for info in (arm, tmp_path / "missing"):
        name = host.cpu_model(info)
        assert name and name not in ("AMD EPYC 7B13", "Other CPU")
