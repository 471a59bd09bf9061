"""Shared fixtures: a small synthetic cohort made once per session, and DICOM builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.synth import SynthOptions, generate
from common.synth.profiles import HELD_OUT_ACQUISITIONS, TRAIN_ACQUISITIONS
from common.synth.writers import DicomFacts, write_dicom

DATA = Path(__file__).resolve().parent / "data"  # test data with its source (README)


def all_lists(obj):
    """Every list inside a JSON-like value (for audits: no list as long as a site's images)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from all_lists(v)
    elif isinstance(obj, list):
        yield obj
        for v in obj:
            yield from all_lists(v)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """3 training + 2 held-out sites, 40 images each at 64 px, 3 readers, a shortcut."""
    out = tmp_path_factory.mktemp("cohort")
    generate(out, SynthOptions(images_per_site=40, size=64, seed=7, readers=3,
                               shortcut="site1"))
    return out


def dicom_facts(i: int = 0, **kw) -> DicomFacts:
    base = dict(patient_id=f"P{i:04d}", study_uid=f"1.2.3.{i}.1", series_uid=f"1.2.3.{i}.2",
                sop_uid=f"1.2.3.{i}.3", sex="F", age_years=45, view="PA",
                study_date="20240101", accession=f"A{i}")
    base.update(kw)
    return DicomFacts(**base)


def write_test_dicom(path: Path, img: np.ndarray | None = None, *, held_out: bool = False,
                     i: int = 0, **kw) -> Path:
    """A real DICOM written by the project's synth writer (MONOCHROME1 when held_out)."""
    if img is None:
        rng = np.random.default_rng(i)
        img = rng.uniform(0.2, 0.8, (96, 96)).astype(np.float32)
    acq = HELD_OUT_ACQUISITIONS[0] if held_out else TRAIN_ACQUISITIONS[2]
    write_dicom(path, img, dicom_facts(i, **kw), acq)
    return path


@pytest.fixture()
def task_identity():
    """Messages built outside a Flower runtime need a run and task id."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


EXIT_GRACE_S = 300  # after the last test, how long the interpreter may take to exit


def pytest_unconfigure(config):
    """A suite that passes but never exits (a thread the interpreter's exit joins, stuck on
    a dead worker's pipe) ran into CI's time limit once. If this process is still alive
    ``EXIT_GRACE_S`` after the last test, print every thread's stack and exit with 1: a
    failure that names its cause, in minutes rather than at the limit."""
    import faulthandler
    import sys
    import threading

    left = [t.name for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if left:
        print(f"\nthreads the interpreter's exit will wait for: {', '.join(left)}",
              file=sys.stderr)
    faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True)
