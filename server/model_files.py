"""Building, reading and writing model files for the ServerApp, in a child process.

The ServerApp only moves weights (numpy arrays) between sites and a strategy; it never runs
a model. Importing torch and torchvision to build the initial DenseNet-121 would hold their
resident memory in its process for the whole run and cost seconds before discovery
(``benchmarks/peers.py`` prints each process's peak RSS and when the ServerApp's main ran).
So the three things that need torch run here, in a short-lived
``python -m server.model_files`` child that exchanges plain ``.npz`` files:

- ``initial``: the arms' starting weights (seeded; optionally from ``init-weights``). It
  starts before discovery and is collected after it, so it costs no wall time;
- ``read``: a model file on the coordinator's disk (centralised reference, extra models):
  its weights and norm;
- ``write``: the selected models as fedcxr checkpoints (the tracker's artifacts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common.errors import FedcxrError
from server.weight_files import StoredWeights, Weights, load

# The child runs with the same interpreter and finds the same packages as this process.
_ROOT = str(Path(__file__).resolve().parents[1])
_NORM = "__norm__"  # key of the norm in a `read` npz


def _child(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "server.model_files", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no message"])[-1]
        raise FedcxrError(f"{what}: {last}")


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


class InitialWeights:
    """The arms' starting weights, built in a child process started on entering the ``with``
    block and read by ``result()``: seeded by the run's seed exactly as
    ``torch.manual_seed(seed)`` then ``build_model`` in this process would be. Leaving the
    block stops a child whose weights were not collected (a run that failed before
    training). ``needed=False`` (a resumed run) starts nothing."""

    def __init__(self, seed: int, norm: str, init_weights: str | None, *,
                 needed: bool = True) -> None:
        self._args = ("initial", "--seed", str(seed), "--norm", norm,
                      "--init-weights", init_weights or "")
        self._needed = needed
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> InitialWeights:
        if self._needed:
            self._dir = tempfile.TemporaryDirectory(prefix="fedcxr-initial-")
            self._out = Path(self._dir.name) / "initial.npz"
            self._proc = _child(*self._args, "--out", str(self._out))
        return self

    def result(self) -> dict[str, np.ndarray]:
        if self._proc is None:
            raise RuntimeError("InitialWeights.result() outside its with block")
        _finish(self._proc, "building the initial model")
        return _load(self._out)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            if self._proc.returncode is None:  # not collected: the run failed before training
                self._proc.kill()
                self._proc.communicate()
            self._dir.cleanup()
            self._proc = None


def read(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """A model file's weights (state-dict order) and norm (``common.model.load_checkpoint``:
    fedcxr checkpoints, or torchvision-style state dicts)."""
    with tempfile.TemporaryDirectory(prefix="fedcxr-read-") as tmp:
        out = Path(tmp) / "weights.npz"
        _finish(_child("read", "--path", str(path), "--out", str(out)), f"model file {path}")
        weights = _load(out)
    norm = str(weights.pop(_NORM))
    return weights, norm


def write(models: dict[str, tuple[StoredWeights | Weights, dict]], norm: str,
          folder: Path) -> dict[str, Path]:
    """Each model (weights, checkpoint extras) as a fedcxr checkpoint ``<folder>/<name>.pt``
    (``common.model.save_checkpoint``); a stored model is read when its turn comes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, jobs = {}, []
    with tempfile.TemporaryDirectory(prefix="fedcxr-write-") as tmp:
        for k, (name, (weights, extra)) in enumerate(models.items()):
            src = Path(tmp) / f"{k}.npz"
            np.savez(src, **load(weights))
            paths[name] = folder / f"{name.replace(':', '_')}.pt"
            jobs.append({"weights": str(src), "out": str(paths[name]), "extra": extra})
        spec = Path(tmp) / "jobs.json"
        spec.write_text(json.dumps({"norm": norm, "jobs": jobs}))
        _finish(_child("write", "--jobs", str(spec)), "writing the selected models")
    return paths


# ------------------------------------------------------------------ the child process


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m server.model_files")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("initial")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--norm", required=True)
    p.add_argument("--init-weights", default="")
    p.add_argument("--out", required=True)
    p = sub.add_parser("read")
    p.add_argument("--path", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("write")
    p.add_argument("--jobs", required=True)
    args = ap.parse_args(argv)

    import torch

    from common.model import build_model, load_checkpoint, save_checkpoint

    try:
        if args.cmd == "initial":
            torch.manual_seed(args.seed)
            model = build_model(norm=args.norm, init_weights=args.init_weights or None)
            np.savez(args.out, **_state(model))
        elif args.cmd == "read":
            model = load_checkpoint(Path(args.path))
            np.savez(args.out, **_state(model), **{_NORM: np.array(model.norm)})
        else:
            spec = json.loads(Path(args.jobs).read_text())
            for job in spec["jobs"]:
                model = build_model(norm=spec["norm"])
                model.load_state_dict({k: torch.from_numpy(v)
                                       for k, v in _load(Path(job["weights"])).items()})
                save_checkpoint(model, Path(job["out"]), **job["extra"])
    except FedcxrError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
