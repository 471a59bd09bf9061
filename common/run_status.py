"""A run's live status (``<run dir>/status.json``): the coordinator's view while it runs.

The ServerApp rewrites it atomically at every phase and round; ``fedcxr status RUN_DIR``
reads it. It holds only what the coordinator already has (phase, round, sites answered per
arm, failures, ε per site as the sites reported it), so it adds nothing to what leaves a
hospital. One dataclass for the writer and the reader.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.atomic import atomic_path
from common.errors import FedcxrError

STATUS_FILE = "status.json"
# The ServerApp's last log line before it writes status.json as finished: a follower of the
# run's log stream (cli/wait_run.py) waits for it before the federation is stopped.
LAST_LOG_LINE = "tracking done"

# The experiment protocol's phases, in order (server/app.py ``main``).
PHASES = ("discovery", "training", "selection", "validation", "report", "finished")


@dataclass
class ArmRound:
    """One arm's latest round: how many sites trained it and validated it."""

    round: int
    sites_trained: int
    sites_validated: int


@dataclass
class RunStatus:
    run_name: str
    run_dir: str
    started_at: float
    num_rounds: int
    phase: str = "discovery"
    state: str = "running"  # running, finished, failed
    round: int = 0
    updated_at: float = 0.0
    sites: dict[str, str] = field(default_factory=dict)  # site -> role
    # site -> Flower node id: `flwr supernode list` shows ids only
    node_ids: dict[str, int] = field(default_factory=dict)
    arms: dict[str, ArmRound] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)  # round, arm, site, reason
    epsilon: dict[str, float] = field(default_factory=dict)
    error: str = ""

    def enter(self, phase: str) -> None:
        """The run moved on to ``phase`` (one of PHASES)."""
        assert phase in PHASES, phase
        self.phase = phase
        if phase == "finished":
            self.state = "finished"
        self.write()

    def write(self) -> Path:
        self.updated_at = time.time()
        path = Path(self.run_dir) / STATUS_FILE
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        return path

    @contextmanager
    def tracking(self) -> Iterator[RunStatus]:
        """Mark the run failed (with the error's one line) if the block raises."""
        self.write()
        try:
            yield self
        except BaseException as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            with contextlib.suppress(OSError):
                self.write()
            raise

    @classmethod
    def read(cls, run_dir: Path) -> RunStatus:
        path = Path(run_dir) / STATUS_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FedcxrError(f"{path}: no such file; give a run folder (<out-dir>/<run-name>, "
                              "printed by the run as 'fedcxr: run NAME -> FOLDER')") from None
        except (OSError, ValueError) as exc:
            raise FedcxrError(f"{path}: unreadable ({exc}); the run rewrites it at its next "
                              "phase or round") from None
        try:
            raw["arms"] = {k: ArmRound(**v) for k, v in raw.get("arms", {}).items()}
            return cls(**raw)
        except (TypeError, AttributeError) as exc:
            raise FedcxrError(f"{path}: not a fedcxr status file ({exc})") from None
