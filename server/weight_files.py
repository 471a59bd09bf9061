"""Every model the ServerApp keeps, one file each on the coordinator's disk, read when needed.

The run state holds a model per arm (the federated arm and one single-site arm per training
site) and each arm's selected model. Held in memory, that state grew with the sites: at 20
sites, 21 DenseNet-121s of 28 MB each, twice over once an arm's selected round falls behind
its current one, and every round's checkpoint wrote all of them again
(``benchmarks/peers.py --sites 20`` prints the ServerApp's peak RSS). Here each model is
written once, when it arrives, to ``<run>/checkpoints/weights/``, and the state keeps a
``StoredWeights`` (its file) instead: a message that carries a model reads it when the
message is built and drops it once sent, so the server holds the models being sent, not
every model of the run. A selected model is the same file as the arm's round it came from
(no copy), and a checkpoint names the files instead of repeating their bytes.

Files are never changed once written (a model of a round has one name), so a checkpoint
stays valid for as long as its files are kept; ``collect`` deletes the files that neither
the state nor any kept checkpoint names.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import DiskFull, atomic_path
from common.errors import FedcxrError
from common.file_names import safe_name

Weights = dict[str, np.ndarray]
FOLDER = "weights"  # under the run's checkpoints/


@dataclass(frozen=True)
class StoredWeights:
    """One model's weights (a state dict of numpy arrays) in one file of the coordinator's
    disk, written by ``WeightFiles.put`` and never changed."""

    path: Path

    def load(self) -> Weights:
        """The weights, read now (the caller drops them when done)."""
        try:
            with open(self.path, "rb") as f:
                weights = pickle.load(f)
        except FileNotFoundError:
            raise FedcxrError(f"{self.path}: a model file the run's state names is gone; "
                              "restore it (or resume from a checkpoint whose files are all "
                              "there)") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise FedcxrError(f"{self.path}: not a fedcxr model file ({exc})") from None
        if not isinstance(weights, dict):
            raise FedcxrError(f"{self.path}: not a fedcxr model file")
        return weights


def load(weights: Weights | StoredWeights) -> Weights:
    """The arrays of ``weights``, read from disk when they are stored (a checkpoint of
    format 2 or earlier holds them in memory)."""
    return weights.load() if isinstance(weights, StoredWeights) else weights


class WeightFiles:
    """The folder of a run's model files."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def put(self, name: str, weights: Weights) -> StoredWeights:
        """Write ``weights`` as ``<name>.pkl`` (atomically, synced to disk before a
        checkpoint can name it) and return its handle. ``name`` is unique to the model: an
        arm and the round its weights came from."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{safe_name(name)}.pkl"  # an arm's name holds a site's
        with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
            pickle.dump({k: np.asarray(v) for k, v in weights.items()}, f, protocol=5)
        return StoredWeights(path.resolve())

    def adopt(self, weights: StoredWeights) -> StoredWeights:
        """A stored model of another folder (a run resumed into another out-dir) as a file
        of this one, hard-linked where the disk allows (else copied), so that this run's
        checkpoints name only files of their own folder."""
        path = Path(weights.path)
        if path.parent == self.folder.resolve():
            return weights
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / path.name
        if not (target.exists() and os.path.samefile(path, target)):
            with atomic_path(target, fsync=True) as tmp:
                tmp.unlink(missing_ok=True)
                try:
                    os.link(path, tmp)
                except OSError:  # another disk
                    shutil.copyfile(path, tmp)
        return StoredWeights(target.resolve())

    def collect(self, named: Iterable[StoredWeights]) -> list[Path]:
        """Delete every model file of this folder that ``named`` does not name (the models
        of checkpoints that were pruned); returns what was deleted."""
        keep = {Path(w.path).name for w in named}
        gone = []
        for path in sorted(self.folder.glob("*.pkl")):
            if path.name not in keep:
                path.unlink(missing_ok=True)
                gone.append(path)
        return gone


def space_needed(model_bytes: int, arms: int, rounds_left: int, keep: str) -> tuple[int, int]:
    """Bytes of new model files a run's remaining rounds hold on disk at once: (at least, at
    most). Each round writes a file per arm. ``keep=all`` keeps them all. Pruned, the files
    left after a round are each arm's current and selected model plus, in the kept round
    file of the federated arm's best round, each arm's current and selected model of that
    round: at most four an arm, and a fifth while the next round's are written before the
    checkpoint prunes (``tests/test_federation.py`` counts them over random runs)."""
    least = arms * model_bytes if rounds_left else 0
    most = (rounds_left if keep == "all" else min(rounds_left, 5)) * arms * model_bytes
    return least, most


def check_space(folder: Path, model_bytes: int, arms: int, rounds_left: int, keep: str,
                extra_copies: int = 0) -> str | None:
    """Refuse, before a round is trained, a run whose model files cannot fit on the disk of
    ``folder`` (one line: what it needs, what is free, what to do); a warning (returned) when
    only the worst case does not fit. ``extra_copies``: models written once at the end (the
    tracker's copies of the selected models)."""
    least, most = space_needed(model_bytes, arms, rounds_left, keep)
    least, most = least + extra_copies * model_bytes, most + extra_copies * model_bytes
    free = shutil.disk_usage(folder).free
    gib = 2 ** 30
    sizes = (f"{arms} arm(s) x {model_bytes / 2**20:.0f} MB a model, {rounds_left} round(s) "
             f"left, keep-checkpoints={keep}")
    if least > free:
        raise DiskFull(f"{folder}: the run's model files need at least {least / gib:.2f} GiB "
                       f"({sizes}) and {free / gib:.2f} GiB are free; free space, or set "
                       "out-dir to a larger disk")
    if most > free:
        return (f"{folder}: the run's model files may need up to {most / gib:.2f} GiB "
                f"({sizes}) and {free / gib:.2f} GiB are free: it may stop for want of space "
                "(a later resume-from continues it)")
    return None


def shape_template(weights: Weights) -> Weights:
    """``weights``' keys, shapes and dtypes with no values (each array one element seen
    through zero strides): what ``common.records.unpack`` needs to shape a model that
    arrived, without keeping a model in memory to do it."""
    return {k: np.broadcast_to(np.zeros((), np.asarray(v).dtype), np.shape(v))
            for k, v in weights.items()}


def rebase(weights: StoredWeights | Weights, folder: Path) -> StoredWeights | Weights:
    """A stored model whose file is not where the checkpoint says but is in ``folder`` (the
    checkpoint's own weights folder: a run folder that was moved or copied)."""
    if not isinstance(weights, StoredWeights) or Path(weights.path).exists():
        return weights
    moved = Path(folder) / Path(weights.path).name
    return StoredWeights(moved.resolve()) if moved.exists() else weights
