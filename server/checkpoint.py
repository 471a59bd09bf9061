"""Atomic save / resume of the whole server state after every round.

A checkpoint holds the round just finished, every arm's weights and selected model so far,
the strategy's state (e.g. FedAdam moments), per-round history, rejections and failures, and
the RNG states. It is written to a temporary file and renamed, so a crash leaves either the
previous checkpoint or the new one, never half of one. Client-side training is seeded by
(seed, round, arm), so resuming from round r reproduces an uninterrupted run exactly.

The file is a pickle, not ``torch.save``: the ServerApp holds weights as numpy arrays and
never imports torch (see ``server.model_files``). Format 3 names each model by its file in
``checkpoints/weights/`` (``server.weight_files``: written once, when the model arrived),
so a round's checkpoint is small and writes no model again; the files a pruned checkpoint
alone named are deleted with it. Checkpoints of format 2 (models as arrays in the pickle)
and 1 (``torch.save``) still resume.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.errors import FedcxrError
from server.state import RunState
from server.weight_files import FOLDER, WeightFiles, rebase

FORMAT = "fedcxr-server-checkpoint/3"
ARRAYS_FORMAT = "fedcxr-server-checkpoint/2"  # models as arrays in the pickle; read, not written
TORCH_FORMAT = "fedcxr-server-checkpoint/1"  # torch.save of tensors; read, not written


def weight_files(run_dir: Path) -> WeightFiles:
    """The folder of a run's model files, beside its checkpoints."""
    return WeightFiles(Path(run_dir) / "checkpoints" / FOLDER)


def _convert(obj, kind: type, fn):
    """``obj`` with every ``kind`` inside its plain dicts and lists replaced by ``fn(it)``
    (a format-1 checkpoint's tensors back to arrays)."""
    if isinstance(obj, kind):
        return fn(obj)
    if type(obj) is dict:
        return {k: _convert(v, kind, fn) for k, v in obj.items()}
    if type(obj) is list:
        return [_convert(v, kind, fn) for v in obj]
    return obj


def save(run_name: str, config: dict, state: RunState, run_dir: Path, round: int,
         keep: str = "all", best_round: int | None = None) -> Path:
    """Checkpoint ``state`` after ``round`` (``round-NNN.pt`` and ``latest.pt``), then drop
    the round files ``keep`` does not name (``prune``) and the model files that neither
    ``state`` nor a kept round file names (``keep="all"`` drops nothing)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "run_name": run_name, "config": config,
               "state": state.to_checkpoint(),
               "rng": {"numpy": np.random.get_state(), "python": random.getstate()}}
    path = ckpt_dir / f"round-{round:03d}.pt"
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=5)
    latest = ckpt_dir / "latest.pt.tmp"
    latest.unlink(missing_ok=True)
    os.link(path, latest)  # the same bytes, no second write
    os.replace(latest, ckpt_dir / "latest.pt")
    prune(ckpt_dir, keep, {round} | ({best_round} if best_round else set()))
    if keep != "all":  # the model files only pruned checkpoints (or none) named
        named = state.stored()
        for kept in sorted(set(ckpt_dir.glob("round-*.pt")) - {path}):  # `path` is `state`
            with open(kept, "rb") as f:
                named += RunState.from_checkpoint(pickle.load(f)["state"]).stored()
        weight_files(run_dir).collect(named)
    return path


def prune(ckpt_dir: Path, keep: str, rounds: set[int]) -> list[Path]:
    """Delete every ``round-NNN.pt`` but the last round's and, under ``last,best``, the round
    of the federated arm's selected model (``rounds``); ``all`` keeps every file. Each file
    holds the whole state (every arm's weights and every selected model), so ``latest.pt``
    alone resumes a run; the kept round files are for looking back."""
    if keep == "all":
        return []
    last = max(rounds)
    wanted = {last} | (rounds if keep == "last,best" else set())
    gone = []
    for path in sorted(ckpt_dir.glob("round-*.pt")):
        stem = path.stem.removeprefix("round-")
        if stem.isdigit() and int(stem) not in wanted and int(stem) < last:
            path.unlink(missing_ok=True)
            gone.append(path)
    return gone


def resolve(spec: str, out_dir: str | Path = "runs") -> Path:
    """The checkpoint ``resume-from`` names: a checkpoint file or a run folder, as given or,
    when relative and not there, under ``out_dir`` (where runs land: ``resume-from="crash"``
    finds ``<out-dir>/crash``; the ServerApp's working directory is the SuperLink's, not the
    coordinator's)."""
    path = Path(spec)
    if not path.is_absolute() and not path.exists() and (Path(out_dir) / path).exists():
        path = Path(out_dir) / path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "latest.pt", path / "latest.pt"):
            if candidate.is_file():
                return candidate
    if not path.is_file():
        raise FedcxrError(f"resume-from={spec}: no checkpoint there (looked in "
                          f"{Path(spec).resolve()} and {(Path(out_dir) / spec).resolve()}); "
                          "give a run folder or a checkpoints/round-NNN.pt file")
    return path


def load(spec: str, out_dir: str | Path = "runs") -> dict:
    path = resolve(spec, out_dir)
    if zipfile.is_zipfile(path):  # format 1, written by torch.save
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("format") == TORCH_FORMAT:
            state["state"] = _convert(state["state"], torch.Tensor, torch.Tensor.numpy)
    else:
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise FedcxrError(f"{path}: not a fedcxr server checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, ARRAYS_FORMAT,
                                                                  TORCH_FORMAT):
        raise FedcxrError(f"{path}: not a fedcxr server checkpoint")
    state["state"] = st = RunState.from_checkpoint(state["state"])
    folder = path.parent / FOLDER  # the files where this checkpoint is (a moved run folder)
    st.map_models(lambda _, w: rebase(w, folder))
    rng = state.pop("rng")
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    state["path"] = str(path)
    return state
