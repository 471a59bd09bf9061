"""NVIDIA FLARE beside fedcxr in ``benchmarks/peers.py``: its PyTorch FedAvg recipe with a
Client API site script, run in its simulator, and the same site script's loop with no
framework (issue #20).

NVFlare is not a dependency of fedcxr: it runs from a side environment the caller names
(``--nvflare-python``, a Python with ``nvflare``, ``torch`` and ``numpy``), with this
repository on ``PYTHONPATH`` so that the model is fedcxr's own DenseNet-121
(``common.model`` needs only torch). The sites' training and validation splits are
exported once as arrays (``export_sites``), so the side environment needs none of fedcxr's
data stack; the site script trains one epoch (Adam, masked BCE, batch 16) and validates, as
the plain Flower app's ``local_train`` / ``validate`` do.

    /tmp/nvflare-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 nvflare==2.9.0
    .venv/bin/python benchmarks/peers.py --nvflare-python /tmp/nvflare-venv/bin/python
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SITE_SCRIPT = '''\
"""An NVFlare Client API site: FedAvg's train task on one site's exported arrays; with
--direct-rounds, the same work for every site with no framework."""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from common.model import build_model


def load(data, site):
    z = np.load(f"{data}/{site}.npz")
    return [torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_val", "y_val")]


def masked_bce(logits, y):
    mask = ~torch.isnan(y)
    return F.binary_cross_entropy_with_logits(logits[mask], y[mask])


def train(model, x, y, batch, seed):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for idx in order.split(batch):
        opt.zero_grad()
        masked_bce(model(x[idx]), y[idx]).backward()
        opt.step()


def validate(model, x, y, batch=64):
    model.eval()
    with torch.no_grad():
        total = sum(float(masked_bce(model(x[i:i + batch]), y[i:i + batch])) * len(x[i:i + batch])
                    for i in range(0, len(x), batch))
    return total / max(len(x), 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--direct-rounds", type=int, default=0)
    p.add_argument("--sites", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.direct_rounds:
        data = [load(a.data, f"site-{k + 1}") for k in range(a.sites)]
        start = time.perf_counter()
        for rnd in range(1, a.direct_rounds + 1):
            for xt, yt, xv, yv in data:
                model = build_model()
                train(model, xt, yt, a.batch, rnd)
                validate(model, xv, yv)
        print(f"direct seconds {time.perf_counter() - start:.3f}")
        return
    import nvflare.client as flare

    flare.init()
    xt, yt, xv, yv = load(a.data, flare.get_site_name())
    model = build_model()
    while flare.is_running():
        got = flare.receive()
        model.load_state_dict({k: torch.as_tensor(v) for k, v in got.params.items()})
        train(model, xt, yt, a.batch, got.current_round or 0)
        loss = validate(model, xv, yv)
        flare.send(flare.FLModel(params=model.state_dict(), metrics={"accuracy": -loss},
                                 meta={"NUM_STEPS_CURRENT_ROUND": len(xt)}))


if __name__ == "__main__":
    main()
'''

JOB_SCRIPT = '''\
"""NVFlare's PyTorch FedAvg recipe in its simulator, sites running the Client API script."""
import argparse
from pathlib import Path

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe import SimEnv

from common.model import build_model

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, required=True)
p.add_argument("--sites", type=int, required=True)
p.add_argument("--data", required=True)
p.add_argument("--workspace", required=True)
p.add_argument("--threads", type=int, required=True)
a = p.parse_args()
recipe = FedAvgRecipe(name="peer", model=build_model(), min_clients=a.sites, num_rounds=a.rounds,
                      train_script=str(Path(__file__).with_name("nvflare_site.py")),
                      train_args=f"--data {a.data} --batch 16 --threads 1")
recipe.execute(SimEnv(num_clients=a.sites, num_threads=a.threads, workspace_root=a.workspace))
print("nvflare job done", flush=True)
'''

# Process roles for peers.Peaks (the worker pattern first: it contains the simulator's).
ROLES = (("simulator.simulator_worker", "NVFlare site worker"),
         ("nvflare.private.fed.app.simulator.simulator", "NVFlare simulator (server side)"),
         ("nvflare_job.py", "NVFlare job script"))


def probe(python: str | None) -> tuple[str | None, str]:
    """(why NVFlare cannot run from ``python``, or None; its version), in one child."""
    if not python:
        return "pass --nvflare-python PATH (a Python with nvflare and torch) to compare it", ""
    if not Path(python).is_file():
        return f"--nvflare-python {python}: no such file", ""
    done = subprocess.run([python, "-c", "import nvflare, torch; print(nvflare.__version__)"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return (f"--nvflare-python {python} cannot import nvflare and torch: "
                f"{(done.stderr.strip().splitlines() or ['?'])[-1]}"), ""
    return None, done.stdout.strip()


def export_sites(splits: list[dict], folder: Path) -> Path:
    """``site-<k>.npz`` (images as float32 N x 1 x S x S in [0, 1], labels with NaN) of each
    training site's train and val splits, and the two scripts beside them."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for k, split in enumerate(splits, start=1):
        arrays = {}
        for part in ("train", "val"):
            ds = split[part]
            images = np.asarray(ds.cache.images[ds.rows], dtype=np.float32) / float(ds.cache.scale)
            arrays[f"x_{part}"] = images[:, None]
            arrays[f"y_{part}"] = ds.labels().astype(np.float32)
        np.savez(data / f"site-{k}.npz", **arrays)
    (folder / "nvflare_site.py").write_text(SITE_SCRIPT)
    (folder / "nvflare_job.py").write_text(JOB_SCRIPT)
    return data


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def direct(python: str, folder: Path, rounds: int, sites: int) -> float:
    """The site script's work for every site and round, no framework, two torch threads
    (as peers.py's own direct loops)."""
    done = subprocess.run(
        [python, str(folder / "nvflare_site.py"), "--data", str(folder / "data"),
         "--direct-rounds", str(rounds), "--sites", str(sites), "--threads", "2"],
        capture_output=True, text=True, env=_env(), cwd=folder)
    if done.returncode != 0:
        raise SystemExit(f"NVFlare direct loop failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split("direct seconds")[-1])


STALL_S = 120  # a simulator whose log has not grown for this long is stuck
# ... and one still running after this long is stuck too: a 5-round run takes 1-2 minutes
# here, and a hung simulator can keep logging (session 18: its site reconnected to the
# server every few seconds, "evicted for exceeding limit 1", for minutes).
LIMIT_S = 300
ATTEMPTS = 2


def _run_watched(cmd: list[str], log: Path, cwd: Path, workspace: Path) -> int | None:
    """Run ``cmd`` (its output to ``log``); its return code, or None when neither ``log``
    nor the ``log.txt`` files under its ``workspace`` grew for ``STALL_S`` or it ran past
    ``LIMIT_S`` (its whole process group is then killed). NVFlare 2.9.0's simulator once
    hung after the server asked the sites to end the run, with nothing in any log for five
    minutes (session 17's first comparison, at its fourth NVFlare run), and once with its
    site reconnecting over and over (session 18's, at its fifth)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                cwd=cwd, start_new_session=True)
        size, changed = 0, time.monotonic()
        started = changed
        while True:
            try:
                return proc.wait(timeout=1)  # at once when it ends: its wall time is measured
            except subprocess.TimeoutExpired:
                pass
            grown = sum(f.stat().st_size for f in workspace.rglob("log.txt")) + \
                log.stat().st_size
            now = time.monotonic()
            if grown != size:
                size, changed = grown, now
            if now - changed > STALL_S or now - started > LIMIT_S:
                os.killpg(proc.pid, 9)
                proc.wait()
                return None


def simulate(python: str, folder: Path, rounds: int, sites: int, threads: int,
             peaks: Callable) -> tuple[float, object]:
    """Wall time and ``peaks`` (a ``peers.Peaks``) of one simulator run: ``threads`` sites
    at a time, one torch thread each (fedcxr's and plain Flower's actors: one CPU each). A
    run that stalls (``_run_watched``) is killed and run again, once; its time and peaks
    are not counted."""
    for attempt in range(1, ATTEMPTS + 1):
        workspace = folder / f"workspace-{time.monotonic_ns()}"
        log = folder / f"{workspace.name}.log"
        with peaks() as pk:
            start = time.perf_counter()
            code = _run_watched(
                [python, str(folder / "nvflare_job.py"), "--rounds", str(rounds), "--sites",
                 str(sites), "--data", str(folder / "data"), "--workspace", str(workspace),
                 "--threads", str(threads)], log, folder, workspace)
            total = time.perf_counter() - start
        if code is not None:
            break
        print(f"NVFlare's simulator stalled (no log output for {STALL_S} s, or still running "
              f"after {LIMIT_S} s; attempt {attempt} of {ATTEMPTS}); its process group was "
              "killed", flush=True)
    else:
        raise SystemExit(f"NVFlare's simulator stalled {ATTEMPTS} times; see {log}")
    text = log.read_text()
    if code != 0 or "Finished FedAvg" not in text or f"Round {rounds - 1} started" not in text:
        raise SystemExit(f"NVFlare run failed (rc {code}); see {log}")
    return total, pk
