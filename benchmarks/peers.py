"""fedcxr beside a minimal Flower app and the direct loop, measured in one run (issue #20).

    .venv/bin/python benchmarks/peers.py [--tries 4 --rounds 2 --more-rounds 6 --images 80]

Workload: a synthetic cohort of 3 training sites + 1 held-out site, N images each at 32 px,
DenseNet-121, 1 local epoch. Three systems, interleaved try by try (best of N):

- **direct**: the client-side work with no framework, in this process: fedcxr's (two arms
  and validation per site and round) and the plain app's (one arm, then validation);
- **plain Flower**: a minimal Flower 1.41 Message-API app (``flwr.serverapp.strategy.FedAvg``,
  a ClientApp whose train / evaluate handlers call the same ``local_train`` / ``validate``),
  run exactly as fedcxr is: ``flwr run`` against a ``flower-superlink --simulation``;
- **fedcxr**: ``fedcxr simulate`` on the same cohort.

Each system runs R and R' rounds. Per-round cost is the totals' difference over R' - R;
fixed cost is T(R) - R x per-round. Both are printed a second way, from each system's own
clock, which needs no second run: per round, the median of the middle rounds (neither the
first, whose site processes start cold, nor the last) of every R'-round run, fedcxr's from
its log and the plain app's from ``FedAvg``'s ``evaluate_fn``, called after every round;
fixed cost, T(R) - R x that. On a host whose speed moves between two runs the totals'
difference moves with it (in session 23's run it made fedcxr's round 5.2 s, its log 8.1-8.4
s). The part of the fixed cost outside each ServerApp's main (the
wall time before the main began and after it returned; fedcxr's from its status.json) with,
for fedcxr, discovery's first reply (it waits for Ray and the site processes) is Flower's
start-up and teardown. A sampler thread records the peak RSS of every process a
run starts (SuperLink, SuperExec, the simulation process that hosts the ServerApp, Ray's
actors and daemons). fedcxr's own log gives its breakdown (discovery, rounds, thresholds,
internal and external validation, report; fedcxr runs with tracking-uri=off, as the plain app
tracks nothing). The ServerApp builds its initial model in a short-lived child
(``server.model_files``): its peak is its own row.

- **NVFlare** (with ``--nvflare-python``, a side environment; skipped with a message
  otherwise): its PyTorch FedAvg recipe and a Client API site script in its simulator, two
  sites at a time, and that script's own direct loop, on the same sites' splits and model
  (``benchmarks/nvflare_peer.py``).

Scratch (the cohort, every run's folder: about 1 GB a call) goes to one temporary folder,
removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import nvflare_peer  # benchmarks/, beside this script
import torch
from host import machine

from common.data import split_datasets
from common.model import build_model
from common.site import SiteSource, ensure_cache
from common.synth import SynthOptions, generate
from common.training import TrainConfig, local_train, validate

ROOT = Path(__file__).resolve().parents[1]

PEER_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "peerapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "peerapp:server"
clientapp = "peerapp:client"

[tool.flwr.app.config]
num-rounds = 2
image-size = 32
batch-size = 16
sites = 3
cohort = ""
timing = ""
"""

# A Flower app as its documentation writes one: FedAvg over the training sites, each site
# trains the global model one epoch and validates it. Only the workload is fedcxr's.
PEER_APP = '''\
import os
import time
import tomllib
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

server = ServerApp()
client = ClientApp()


def _site(context: Context):
    from common.data import split_datasets
    from common.site import SiteSource, ensure_cache

    cohort = Path(context.run_config["cohort"])
    sites = [s for s in tomllib.loads(cohort.read_text())["site"] if s["role"] == "train"]
    s = sites[int(context.node_config["partition-id"]) % len(sites)]
    size = int(context.run_config["image-size"])
    cache = ensure_cache(SiteSource(cohort.parent / s["path"]), size)
    return split_datasets(cache)


@client.train()
def train(msg: Message, context: Context) -> Message:
    from common.model import build_model
    from common.training import TrainConfig, local_train

    split = _site(context)
    model = build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    batch = int(context.run_config["batch-size"])
    local_train(model, split["train"], TrainConfig(batch_size=batch))
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "metrics": MetricRecord({"num-examples": len(split["train"])})}),
                   reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from common.model import build_model
    from common.training import validate

    split = _site(context)
    model = build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    auc = validate(model, split["val"]).mean_auc
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(split["val"]),
                                                        "auc": float(auc or 0.0)})}),
                   reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    from common.model import build_model

    began, main_at = time.perf_counter(), time.time()
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    age = float(Path("/proc/uptime").read_text().split()[0]) - int(stat[19]) / os.sysconf(
        "SC_CLK_TCK")
    n = int(context.run_config["sites"])
    strategy = FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    ends = []  # FedAvg calls evaluate_fn before round 1 and after each round

    def round_ended(server_round, arrays):
        ends.append(time.time())

    strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model().state_dict()),
                   num_rounds=int(context.run_config["num-rounds"]), evaluate_fn=round_ended)
    rounds = [round(b - a, 3) for a, b in zip(ends, ends[1:])]
    Path(context.run_config["timing"]).write_text(
        f'{{"age": {age:.2f}, "main_at": {main_at:.3f}, "end_at": {time.time():.3f}, '
        f'"rounds": {rounds}}}')
    print(f"peer: ServerApp main returned after {time.perf_counter() - began:.1f} s", flush=True)
'''


@dataclass
class Peaks:
    """Peak RSS (bytes) of each process a run started, by role."""

    by_role: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    @staticmethod
    def role(cmd: str) -> str | None:
        for pattern, name in (*nvflare_peer.ROLES, ("flower-superlink", "superlink"),
                              ("flower-superexec", "superexec"),
                              ("flwr-simulation", "simulation (ServerApp)"),
                              ("flwr-serverapp", "ServerApp"), ("ray::", "Ray actor"),
                              ("raylet", "Ray daemons"), ("gcs_server", "Ray daemons"),
                              ("cli.main simulate", "fedcxr simulate"),
                              ("server.model_files", "ServerApp's model-files child"),
                              ("flwr ", "flwr CLI")):
            if pattern in cmd:
                return name
        return None

    def sample(self, before: set[str]) -> None:
        """Every 0.2 s, each process that was not there before: its VmHWM (the kernel's own
        peak RSS of the process, so nothing between samples is missed)."""
        while not self._stop.is_set():
            for proc in Path("/proc").glob("[0-9]*"):
                if proc.name in before:
                    continue
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    role = self.role(cmd)
                    if role is None:
                        continue
                    status = (proc / "status").read_text()
                except OSError:
                    continue
                found = re.search(r"VmHWM:\s+(\d+) kB", status)
                if found:
                    rss = int(found.group(1)) * 1024
                    self.by_role[role] = max(self.by_role.get(role, 0), rss)
            time.sleep(0.2)

    def __enter__(self) -> Peaks:
        before = {p.name for p in Path("/proc").glob("[0-9]*")}
        self.thread = threading.Thread(target=self.sample, args=(before,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def train_sites(cohort: Path) -> list[dict]:
    return [s for s in tomllib.loads((cohort / "cohort.toml").read_text())["site"]
            if s["role"] == "train"]


def direct(cohort: Path, rounds: int, size: int, arms: int) -> float:
    """The client-side work with no framework: ``arms`` local trainings and a validation per
    site and round, then a validation of the global model per site."""
    data = [split_datasets(ensure_cache(SiteSource(cohort / s["path"]), size))
            for s in train_sites(cohort)]
    start = time.perf_counter()
    for rnd in range(1, rounds + 1):
        for split in data:
            for _ in range(arms):
                m = build_model()
                local_train(m, split["train"], TrainConfig(batch_size=16, seed=rnd))
                validate(m, split["val"])
        for split in data:
            validate(build_model(), split["val"])
    return time.perf_counter() - start


def _flower_env(home: Path) -> dict:
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_DISABLE_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def plain_flower(cohort: Path, rounds: int, size: int, sites: int, work: Path
                 ) -> tuple[float, Peaks, dict]:
    """The minimal Flower app, through the same SuperLink machinery as fedcxr simulate. Wall
    time, peaks, and its timing: how long after its process started the ServerApp's main
    ran (``age``), wall seconds before that main began and after it returned, and each
    round's wall seconds (its own clock). Its project and Flower home live under ``work``."""
    from cli.simulate import free_port, submit_and_wait

    project = Path(tempfile.mkdtemp(prefix="peerapp-", dir=work))
    (project / "pyproject.toml").write_text(PEER_PYPROJECT)
    (project / "peerapp.py").write_text(PEER_APP)
    home = Path(tempfile.mkdtemp(prefix="peer-flwr-home-", dir=work))
    port, health = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n")
    env = _flower_env(home)
    config = home / "run-config.toml"
    config.write_text(f'num-rounds = {rounds}\nimage-size = {size}\nbatch-size = 16\n'
                      f'sites = {sites}\ncohort = "{cohort / "cohort.toml"}"\n'
                      f'timing = "{home / "main-timing.json"}"\n')
    federation = (f"num-supernodes={sites} client-resources-num-cpus=1 "
                  f"client-resources-num-gpus=0.0 init-args-num-cpus={os.cpu_count() or 1} "
                  "init-args-num-gpus=0")
    log = home / "superlink.log"
    with Peaks() as peaks:
        start, began = time.perf_counter(), time.time()
        link = subprocess.Popen(
            [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
             "--isolation", "subprocess", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port),
             "--health-server-address", f"127.0.0.1:{health}"],
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=home)
        try:
            _wait(port)
            _, status = submit_and_wait(project, "local", config, env, timeout=1800,
                                        federation_config=federation, show_log=False)
        finally:
            os.killpg(link.pid, 15)
            link.wait(30)
        total, ended = time.perf_counter() - start, time.time()
    if status != "finished:completed":
        raise SystemExit(f"plain Flower run ended {status}; see {log}")
    timing = json.loads((home / "main-timing.json").read_text())
    shutil.rmtree(project, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    return total, peaks, {"age": timing["age"], "before main": timing["main_at"] - began,
                          "after main": ended - timing["end_at"], "rounds": timing["rounds"]}


def _wait(port: int, timeout: float = 60) -> None:
    import socket

    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"the SuperLink did not open port {port}")


# Each phase's end in fedcxr's own log: "(<s> s into the run; ServerApp RSS <x> GiB, peak
# <y> GiB)".
_AT = (r"[(;] ?([\d.]+) s into the run(?:; ServerApp RSS ([\d.]+) GiB(?: \(([\d.]+) shared\))?"
       r", peak ([\d.]+) GiB)?")
PHASES = (("discovery and role probe", r"protocol: .*" + _AT),
          ("training rounds", r"training done: .*" + _AT),
          ("thresholds fixed", r"thresholds fixed .*" + _AT),
          ("internal and external validation", r"validation done .*" + _AT),
          ("verdict and report", r"report\.html written " + _AT),
          ("tracking", r"tracking done " + _AT))


def fedcxr(cohort: Path, rounds: int, size: int, out: Path, extra: str = ""
           ) -> tuple[float, Peaks, dict, dict]:
    """``fedcxr simulate`` in a child process (its log parsed for the breakdown; its
    status.json gives the wall clock at the ServerApp's start and end)."""
    name = f"r{rounds}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "cli.main", "simulate", "--cohort", str(cohort / "cohort.toml"),
           "--run-config", f"num-rounds={rounds} image-size={size} batch-size=16 "
           f"out-dir={out} run-name={name} tracking-uri=off {extra}"]
    with Peaks() as peaks:
        start, began = time.perf_counter(), time.time()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        total, ended = time.perf_counter() - start, time.time()
    if done.returncode != 0:
        raise SystemExit(f"fedcxr simulate failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    text = done.stdout + done.stderr
    marks, memory = {}, {}
    status = json.loads((out / name / "status.json").read_text())
    marks["before main"] = status["started_at"] - began
    marks["after main"] = ended - status["updated_at"]  # its last write: "finished"
    found = re.search(r"ServerApp main ([\d.]+) s after its process started", text)
    if found:
        marks["main after process start"] = float(found.group(1))
    found = re.search(r"discover: .* the first ([\d.]+) s", text)
    if found:  # asked at once: about as far into the run
        marks["first reply to discovery"] = float(found.group(1))
    # Its own per-round wall time (first message to checkpoint written), round 1 included.
    rounds = [float(x) for x in re.findall(r"round \d+: federated .*?; ([\d.]+) s \(replies",
                                           text)]
    for name, pattern in PHASES:
        found = re.search(pattern, text)
        if found:
            marks[name] = float(found.group(1))
            if found.group(2):
                memory[name] = (float(found.group(2)), float(found.group(3) or 0),
                                float(found.group(4)))
    return total, peaks, marks, memory, rounds


def middle(rounds: list[float]) -> list[float]:
    """A run's rounds without its first (cold site processes) and its last (fedcxr loads its
    analysis there): the rounds a longer run adds. A 2-round run has none; its second
    stands in (``--more-rounds 2``, as in the 20-site run)."""
    return rounds[1:-1] if len(rounds) > 2 else rounds[1:]


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--more-rounds", type=int, default=6)
    p.add_argument("--images", type=int, default=80)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--sites", type=int, default=3, help="training sites (one more is held out)")
    p.add_argument("--unwindowed", action="store_true",
                   help="also one fedcxr run of --rounds with max-in-flight=0 (every message "
                        "out at once, fedcxr simulate's default before issue #20): its peaks")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch folder (cohort, runs); it is removed by default")
    p.add_argument("--nvflare-python", default=os.environ.get("FEDCXR_NVFLARE_PYTHON"),
                   help="a Python with nvflare and torch (a side venv): adds NVFlare's "
                        "simulator to the comparison (default: $FEDCXR_NVFLARE_PYTHON)")
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    try:
        compare(args, work)
    finally:
        if args.keep:
            print(f"kept: {work} (the cohort, each run's folder)")
        else:  # each fedcxr run's models and checkpoints: about 1 GB a call
            shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace, work: Path) -> None:
    """The runs, interleaved try by try, and the table (scratch files under ``work``)."""
    cohort = work / "cohort"
    generate(cohort, SynthOptions(sites=args.sites + 1, held_out=1, images_per_site=args.images,
                                  size=64, seed=1))
    caches = [ensure_cache(SiteSource(cohort / s["path"]), args.size)
              for s in train_sites(cohort)]
    nv_python = args.nvflare_python
    skipped, nv_version = nvflare_peer.probe(nv_python)
    if skipped is None:
        nv_folder = work / "nvflare"
        nvflare_peer.export_sites([split_datasets(c) for c in caches], nv_folder)
    best: dict[tuple[str, int], float] = {}
    systems = ["fedcxr", "plain Flower"] + (["NVFlare"] if skipped is None else [])
    peaks: dict[str, dict[str, int]] = {name: {} for name in systems}
    marks: dict[str, float] = {}
    memory: dict[str, tuple[float, float, float]] = {}  # phase -> (RSS, shared, peak) GiB
    # Each system's own round times (its log or its ServerApp's clock): the middle rounds of
    # every R'-round run, whose median is the per-round cost that needs no second run.
    logged: dict[str, list[float]] = {}
    ages: dict[str, list[float]] = {}  # ServerApp main, s after the simulation process began
    # Wall seconds of a run before its ServerApp's main began / after it returned, by system.
    outside: dict[tuple[str, str], list[float]] = {}
    loads = []

    def keep(key, value):
        best[key] = min(best.get(key, float("inf")), value)

    for t in range(args.tries):
        for r in (args.rounds, args.more_rounds):
            loads.append(os.getloadavg()[0])
            keep(("direct (2 arms)", r), direct(cohort, r, args.size, arms=2))
            keep(("direct (1 arm)", r), direct(cohort, r, args.size, arms=1))
            total, pk, timing = plain_flower(cohort, r, args.size, args.sites, work)
            if r == args.more_rounds:
                logged.setdefault("plain Flower", []).extend(middle(timing["rounds"]))
            ages.setdefault("plain Flower", []).append(timing["age"])
            for k in ("before main", "after main"):
                outside.setdefault(("plain Flower", k), []).append(timing[k])
            keep(("plain Flower", r), total)
            for k, v in pk.by_role.items():
                peaks["plain Flower"][k] = max(peaks["plain Flower"].get(k, 0), v)
            if skipped is None:
                keep(("direct (NVFlare loop)", r),
                     nvflare_peer.direct(nv_python, nv_folder, r, args.sites))
                total, pk = nvflare_peer.simulate(nv_python, nv_folder, r, args.sites,
                                                  min(args.sites, os.cpu_count() or 1), Peaks)
                keep(("NVFlare", r), total)
                for k, v in pk.by_role.items():
                    peaks["NVFlare"][k] = max(peaks["NVFlare"].get(k, 0), v)
            total, pk, mk, mem, own_rounds = fedcxr(cohort, r, args.size, work / "runs")
            if r == args.more_rounds:
                logged.setdefault("fedcxr", []).extend(middle(own_rounds))
            if "main after process start" in mk:
                ages.setdefault("fedcxr", []).append(mk["main after process start"])
            for k in ("before main", "after main"):
                outside.setdefault(("fedcxr", k), []).append(mk[k])
            keep(("fedcxr", r), total)
            for k, v in pk.by_role.items():
                peaks["fedcxr"][k] = max(peaks["fedcxr"].get(k, 0), v)
            if r == args.rounds and (not marks or total <= best[("fedcxr", r)]):
                marks, memory = mk, mem
            print(f"try {t + 1}/{args.tries}, {r} rounds done (load {loads[-1]:.2f})",
                  flush=True)
    span = args.more_rounds - args.rounds
    unwindowed = fedcxr(cohort, args.rounds, args.size, work / "runs",
                        "max-in-flight=0")[1].by_role if args.unwindowed else {}

    def per_round(name: str) -> float:
        return (best[(name, args.more_rounds)] - best[(name, args.rounds)]) / span

    own = {"fedcxr": "direct (2 arms)", "plain Flower": "direct (1 arm)",
           "NVFlare": "direct (NVFlare loop)"}
    print(f"\n{args.sites} training sites (+1 held out) x {args.images} images at {args.size} px, "
          f"DenseNet-121, {args.rounds} and {args.more_rounds} rounds, best of {args.tries} "
          f"interleaved tries; {machine()}, load average {min(loads):.2f}-{max(loads):.2f}")

    def row(figure: str, cells: list[str]) -> None:
        print(f"{figure:<52}" + "".join(f"{c:>16}" for c in cells))

    row("figure", [f"NVFlare {nv_version}" if n == "NVFlare" else n for n in systems])
    row("per-round cost vs its own direct loop",
        [f"{per_round(n) / per_round(own[n]):.2f}x" for n in systems])
    row("fixed cost of a run",
        [f"{best[(n, args.rounds)] - args.rounds * per_round(n):.1f}s" for n in systems])
    row("per round", [f"{per_round(n):.1f}s" for n in systems])
    for role in sorted({r for n in systems for r in peaks[n]}):
        row("peak RSS: " + role, [gib(peaks[n][role]) if role in peaks[n] else "-"
                                  for n in systems])
    for role, peak in sorted(unwindowed.items()):
        row("peak RSS: " + role + ", max-in-flight=0", [gib(peak)] + ["-"] * (len(systems) - 1))
    if ages:
        row("ServerApp main, s after its process began (min)",
            [f"{min(ages[n]):.1f}s" if n in ages else "-" for n in systems])
    # Flower's own share of a run's fixed cost: everything outside the ServerApp's main.
    row("wall before the ServerApp's main (min)",
        [f"{min(outside[(n, 'before main')]):.1f}s" if (n, "before main") in outside else "-"
         for n in systems])
    row("wall after the ServerApp's main returned (min)",
        [f"{min(outside[(n, 'after main')]):.1f}s" if (n, "after main") in outside else "-"
         for n in systems])
    if logged:
        own = {n: statistics.median(logged[n]) for n in systems if logged.get(n)}
        row("per round, its own clock (median, middle rounds)",
            [f"{own[n]:.1f}s" if n in own else "-" for n in systems])
        row("fixed cost of a run, from its own rounds",
            [f"{best[(n, args.rounds)] - args.rounds * own[n]:.1f}s" if n in own else "-"
             for n in systems])
    if skipped is not None:
        print(f"NVFlare: skipped ({skipped})")
    if marks:
        print(f"\nfedcxr breakdown of its best {args.rounds}-round run (its own log: phase ends, s "
              "into the ServerApp's run; its status.json: when the ServerApp's main began and "
              "ended)")
        before = "before the ServerApp's main"
        print(f"  {before:<48}{'':>8}  ({marks['before main']:.1f}: CLI, SuperLink, app "
              "install, simulation process start)")
        last = 0.0
        for name, at in marks.items():
            if name in ("main after process start", "before main", "after main"):
                continue
            if name == "first reply to discovery":
                name += " (Ray and the site processes start)"
            rss = (f"   ServerApp RSS {memory[name][0]:.2f} GiB ({memory[name][1]:.2f} "
                   f"shared), peak {memory[name][2]:.2f}" if name in memory else "")
            print(f"  {name:<48}{at:>8.1f}  (+{at - last:.1f}){rss}")
            last = at
        after = "after the ServerApp's main"
        print(f"  {after:<48}{'':>8}  ({marks['after main']:.1f}: Ray and simulation "
              "shutdown, run status, CLI clean-up)")
        whole = best[("fedcxr", args.rounds)]
        flower = marks["before main"] + marks["after main"] + marks.get(
            "first reply to discovery", 0.0)
        print(f"  {'whole run (wall, this script)':<48}{whole:>8.1f}  (Flower's start-up and "
              f"teardown, before and after the main and until the first reply: {flower:.1f})")


if __name__ == "__main__":
    main()
