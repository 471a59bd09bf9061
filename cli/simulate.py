"""``fedcxr simulate``: the same ServerApp and ClientApp on Flower's simulation engine.

This drives Flower's own machinery: it starts a ``flower-superlink --simulation`` (Ray
engine, one virtual SuperNode per site) on free loopback ports, with a private ``FLWR_HOME``
whose connection points at it, its SuperExec (``cli/when_up.py``), and one process that
``flwr run``s this project against it, streams the log and waits for the run's end
(``cli/wait_run.py``): all three start at once, so Flower's imports in the last two overlap
the SuperLink's start. Each runs in a process session of its own, killed at the end, pass
or fail, and every process still carrying the private ``FLWR_HOME`` is killed after them,
so no process or port outlives the command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from cli.ports import free_port, wait_port
from common.config import toml_value
from common.errors import FedcxrError
from common.run_status import STATUS_FILE

PROJECT = Path(__file__).resolve().parents[1]
# What the app is: its pyproject.toml (components, default run config) and its packages.
APP_PARTS = ("pyproject.toml", "common", "client", "server", "cli")


def stage_app(folder: Path) -> Path:
    """The app, copied into ``folder`` for ``flwr run`` to package. ``flwr run PROJECT``
    walks and resolves every file under PROJECT (the .venv's tens of thousands included)
    before its include rules drop them (`time flwr build --app .` shows the cost). The
    copy holds only what the app imports; copying it takes a fraction of a second."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in APP_PARTS:
        src = PROJECT / part
        if src.is_dir():
            shutil.copytree(src, folder / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, folder / part)
    return folder


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """The SuperLink's port open; FedcxrError with its log's last lines when the SuperLink
    exits first or does not open it in ``timeout`` seconds."""
    def alive() -> None:
        if proc.poll() is not None:
            raise FedcxrError(f"flower-superlink exited with code {proc.returncode}")

    try:
        wait_port(port, timeout, what="flower-superlink", check=alive)
    except FedcxrError as exc:
        raise FedcxrError(f"{exc}: {_tail(log)}") from None


def _kill_session(proc: subprocess.Popen, *, grace: float = 10) -> None:
    """SIGTERM to ``proc``'s process session, SIGKILL to what is left after ``grace``
    seconds (none: SIGKILL at once)."""
    if grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the session still alive
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _sweep(home: Path) -> int:
    """Kill any process still carrying this run's private FLWR_HOME (Ray workers, SuperExec
    started in sessions of their own). Returns how many there were."""
    marker = f"FLWR_HOME={home}".encode()
    killed = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0") and int(proc.name) != \
                    os.getpid():
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            continue
    return killed



def _sweep_until_none(home: Path, *, settle: float = 0.1, limit: float = 5.0) -> None:
    """``_sweep`` again every ``settle`` seconds until a sweep finds nothing (a Ray worker
    can still be spawned by a raylet the sweep before had not reached yet), at most
    ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while _sweep(home) and time.monotonic() < deadline:
        time.sleep(settle)


def simulate(cohort: Path, run_config: dict, *, cpus_per_site: int = 1,
             timeout: float = 3600, extra_env: dict | None = None, quiet: bool = False,
             after_start=None) -> int:
    """Run the experiment in simulation; 0 when the run finished as completed."""
    cohort = Path(cohort).resolve()
    if not cohort.is_file():
        raise FedcxrError(f"{cohort}: cohort file not found; run `fedcxr synth` first")
    sites = tomllib.loads(cohort.read_text()).get("site", [])
    if not sites:
        raise FedcxrError(f"{cohort}: lists no [[site]]")
    home = Path(tempfile.mkdtemp(prefix="fedcxr-flwr-home-"))
    ports = {k: free_port() for k in ("http", "health")}
    total_cpus = max(os.cpu_count() or 1, 1)
    (home / "config.toml").write_text("\n".join([
        "[superlink]", 'default = "fedcxr"', "", "[superlink.fedcxr]",
        f'address = "127.0.0.1:{ports["http"]}"', "insecure = true", ""]))
    federation = (f"num-supernodes={len(sites)} client-resources-num-cpus={cpus_per_site} "
                  f"client-resources-num-gpus=0.0 init-args-num-cpus={total_cpus} "
                  "init-args-num-gpus=0")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_DISABLE_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1",
           # Ray starts a worker per CPU for the first driver's default environment; Flower
           # gives its actors an environment of their own (runtime_env, PYTHONPATH), so those
           # workers were never used. Each one's start (Python and Ray, about 0.7 s of CPU)
           # competed with the actors' on the two cores while the sites answer discovery.
           "RAY_prestart_worker_first_driver": "0",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # no GPU: Ray's future default, no warning
           "FEDCXR_SITE_THREADS": str(max(1, cpus_per_site)), **(extra_env or {})}
    # The SuperExec spawns flwr-simulation by name: the venv's bin must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = home / "superlink.log"
    completed = False
    with open(log, "w") as out:
        superlink = subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "process",
             "--host", "127.0.0.1", "--port", str(ports["http"]),
             "--health-server-address", f"127.0.0.1:{ports['health']}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
    waiter = superexec = None
    try:
        # The simulation runs total_cpus / cpus_per_site nodes at once: more messages out at
        # once would only wait, model-sized, in the process that hosts the ServerApp.
        config = {"cohort": str(cohort),
                  "max-in-flight": max(total_cpus // max(cpus_per_site, 1), 1), **run_config}
        config["out-dir"] = str(Path(config.get("out-dir", "runs")).resolve())
        overrides = home / "run-config.toml"
        overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
        # The run's own status file ends the wait as soon as the ServerApp has written its
        # last word (cli/wait_run.py); a resumed run without a run-name has none to name.
        status_file = (Path(config["out-dir"]) / str(config["run-name"]) / STATUS_FILE
                       if config.get("run-name") else None)
        # The waiter submits the run once the SuperLink's port opens (it starts meanwhile).
        waiter = RunWaiter(stage_app(home / "app"), "fedcxr", overrides, env, timeout=timeout,
                           federation_config=federation, show_log=not quiet,
                           status_file=status_file, wait_port=ports["http"])
        # The SuperExec (the simulation's launcher) starts beside the SuperLink, not after
        # it, and asks for work once the run is submitted (its next ask would come a second
        # later): as `--isolation subprocess` would start it (no runtime dependency
        # installation: the app runs in this environment); it ends with the SuperLink.
        with open(home / "superexec.log", "w") as out:
            superexec = subprocess.Popen(
                [sys.executable, "-m", "cli.when_up", str(ports["http"]), "--file",
                 str(waiter.submitted), "flwr.supercore.cli:flower_superexec", "--insecure",
                 "--runtime-api-address", f"127.0.0.1:{ports['http']}",
                 "--parent-pid", str(superlink.pid)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=PROJECT)
        _wait_port(ports["http"], superlink, 60, log)
        if after_start:
            after_start(superlink)
        _, status = waiter.result(watch=((superlink, log, "flower-superlink"),
                                         (superexec, home / "superexec.log", "the SuperExec")))
        waiter = None
        completed = status == "finished:completed"
        return 0 if completed else 1
    finally:
        if waiter is not None:  # the SuperLink did not come up, or this was interrupted
            waiter.stop()
        # A completed run has everything on disk: Flower's own shutdown (the simulation's
        # log flush, Ray's) has nothing left to save, so it is not waited for.
        _kill_session(superlink, grace=0 if completed else 10)
        if superexec is not None:
            _kill_session(superexec, grace=0)
        _sweep_until_none(home)
        shutil.rmtree(home, ignore_errors=True)


class RunWaiter:
    """``flwr run`` the app, follow its log, and wait until the SuperLink says it finished:
    one waiter process (``cli/wait_run.py --submit``) started at once, which submits the
    run with Flower's own ``flwr run`` command as soon as ``wait_port`` (the SuperLink's, when
    given) accepts connections, then prints the run's log and asks for its end. Started
    beside a SuperLink that is still starting, it imports Flower's CLI while that happens.
    ``result()`` waits for it.

    ``flwr run --stream`` can return while the run is still going (when its log stream
    ends), so completion is read from the SuperLink's run status, or sooner from
    ``status_file`` (the run's status.json) once its ServerApp, started after this call,
    wrote it as finished: only for a caller that stops the federation next (Flower is then
    still shutting its simulation down)."""

    def __init__(self, project: Path, connection: str, run_config_file: Path, env: dict, *,
                 timeout: float, federation_config: str | None = None,
                 show_log: bool = True, status_file: Path | None = None,
                 wait_port: int | None = None) -> None:
        self._timeout = timeout
        since = time.time()  # a status file written before this is an earlier run's
        on_disk = ["--status-file", str(status_file), "--since", repr(since)] if status_file \
            else []
        handle, name = tempfile.mkstemp(prefix="fedcxr-run-status-")
        os.close(handle)  # the waiter writes it; one open descriptor per run was left behind
        self._result = Path(name)
        self.submitted = self._result  # non-empty once the run is submitted ("run ID")
        cmd = [sys.executable, "-m", "cli.wait_run", connection, "--submit", str(project),
               "--run-config", str(run_config_file), "--timeout", str(timeout),
               "--result", str(self._result), *on_disk]
        if federation_config:
            cmd += ["--federation-config", federation_config]
        if wait_port is not None:
            cmd += ["--wait-port", str(wait_port)]
        if show_log:
            cmd.append("--stream-log")
        self._proc = subprocess.Popen(
            cmd, env=env, cwd=project, start_new_session=True, text=True,
            stdout=None if show_log else subprocess.DEVNULL,
            stderr=None if show_log else subprocess.PIPE)

    def stop(self) -> None:
        """Stop the waiter (its run goes on; stopping that is the caller's)."""
        _kill_session(self._proc, grace=0)
        self._result.unlink(missing_ok=True)

    def result(self, watch: tuple[tuple[subprocess.Popen, Path, str], ...] = ()
               ) -> tuple[str, str]:
        """(run id, final status such as ``finished:completed``); FedcxrError when no run
        started, it did not finish within the timeout, or a process in ``watch`` (process,
        its log, its name: the SuperLink and SuperExec this run needs) exited first."""
        deadline = time.monotonic() + self._timeout + 60
        err = None
        try:
            while err is None:
                try:
                    _, err = self._proc.communicate(timeout=1.0)
                    err = err or ""
                except subprocess.TimeoutExpired:
                    for proc, log, name in watch:
                        if proc.poll() is not None:
                            raise FedcxrError(f"{name} exited with code {proc.returncode} "
                                              f"before the run ended: {_tail(log)}") from None
                    if time.monotonic() > deadline:
                        err = "the waiter did not return"
        finally:
            _kill_session(self._proc)
            out = self._result.read_text() if self._result.exists() else ""
            self._result.unlink(missing_ok=True)
        why = (err or "see the messages above").strip()[-500:]
        if self._proc.returncode == 2:
            raise FedcxrError(f"the run was not started: {why}")
        run_id = re.search(r"^run (\d+)$", out, re.M)
        found = re.search(r"finished:[a-z]+", out)
        if not found or not run_id:
            raise FedcxrError(f"the run did not finish within {self._timeout:.0f} s ({why})")
        return run_id.group(1), found.group(0)


def submit_and_wait(project: Path, connection: str, run_config_file: Path, env: dict, *,
                    timeout: float, federation_config: str | None = None,
                    show_log: bool = True, status_file: Path | None = None
                    ) -> tuple[str, str]:
    """``RunWaiter``'s run against a SuperLink that is already up: (run id, final status)."""
    return RunWaiter(project, connection, run_config_file, env, timeout=timeout,
                     federation_config=federation_config, show_log=show_log,
                     status_file=status_file).result()


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        for part in item.split():
            key, sep, value = part.partition("=")
            if not sep:
                raise FedcxrError(f"--run-config {part!r}: use key=value")
            try:
                out[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = value
    return out


def run_experiment(cohort: Path, config: dict, *, pooled_reference: bool = False,
                   cpus_per_site: int = 1, quiet: bool = False,
                   say=print) -> Path:
    """One simulated experiment (with the centralised reference trained first when asked);
    returns its run folder. Raises FedcxrError when the run did not complete."""
    import logging

    from common.config import RunConfig, parse

    config = dict(config)
    config.setdefault("run-name", time.strftime("sim-%Y%m%d-%H%M%S"))
    run_dir = Path(config.get("out-dir", "runs")).resolve() / config["run-name"]
    if pooled_reference:
        from cli.reference import train_reference  # imports torch: only when needed

        run = parse(RunConfig, config, what="--run-config")
        logging.getLogger("common.training").setLevel(logging.WARNING)
        say(f"training the centralised reference (simulation only) on the union of the "
            f"training sites' train splits ({run.num_rounds} rounds x {run.local_epochs} "
            f"epoch(s), selection {run.selection})")
        ref = train_reference(cohort, run, run_dir / "centralised-reference.pt",
                              progress=(lambda line: None) if quiet else
                              (lambda line: say(f"  {line}")))
        say(f"  selected round {ref.selected_round} of {run.num_rounds} ({ref.n_train} train "
            f"images, {ref.seconds:.0f} s)")
        config["centralised-reference"] = str(ref.path)
    code = simulate(cohort, config, cpus_per_site=cpus_per_site, quiet=quiet)
    if code != 0:
        raise FedcxrError(f"the run {config['run-name']} did not complete; see the log above")
    return run_dir


def run_replicates(cohort: Path, config: dict, k: int, *, pooled_reference: bool,
                   cpus_per_site: int = 1, quiet: bool = False, say=print) -> Path:
    """K replicates (seeds seed, seed+1, ...) under ``<out-dir>/<run-name>/replicate-<i>``,
    then ``replicates.json`` and ``replicates.html`` beside them."""
    import json

    from common.evaluation.replicates import aggregate, sentence
    from common.evaluation.report import write_replicates

    name = config.get("run-name") or time.strftime("sim-%Y%m%d-%H%M%S")
    root = Path(config.get("out-dir", "runs")).resolve() / name
    base_seed = int(config.get("seed", 0))
    done = []
    for i in range(k):
        seed = base_seed + i
        say(f"replicate {i + 1}/{k} (seed {seed})")
        try:
            run_dir = run_experiment(cohort, {**config, "seed": seed, "out-dir": str(root),
                                              "run-name": f"replicate-{i + 1}"},
                                     pooled_reference=pooled_reference,
                                     cpus_per_site=cpus_per_site, quiet=quiet, say=say)
        except FedcxrError as exc:
            say(f"replicate {i + 1} failed: {exc}; the others go on")
            continue
        done.append((seed, json.loads((run_dir / "results.json").read_text())))
    if not done:
        raise FedcxrError(f"no replicate of {name} completed; see the log above")
    summary = aggregate(done)
    summary["runs"] = [f"replicate-{i + 1}" for i in range(k)]
    json_path, html_path = write_replicates(summary, root)
    say(sentence(summary))
    say(f"replicates: {json_path} ; report section: {html_path}")
    return root


def cmd_simulate(args: argparse.Namespace) -> int:
    from common.config import RunConfig, parse

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")  # run the clean-up in simulate()

    signal.signal(signal.SIGTERM, terminate)
    overrides = parse_overrides(args.run_config)
    parse(RunConfig, overrides, what="--run-config")  # unknown keys fail here, not in Ray
    if "centralised-reference" in overrides:
        raise FedcxrError("--run-config centralised-reference is set by --pooled-reference; "
                          "use that flag")
    if args.replicates < 1:
        raise FedcxrError("--replicates must be at least 1")
    cohort = Path(args.cohort)
    if args.replicates > 1:
        run_replicates(cohort, overrides, args.replicates, pooled_reference=args.pooled_reference,
                       cpus_per_site=args.cpus_per_site)
    else:
        run_dir = run_experiment(cohort, overrides, pooled_reference=args.pooled_reference,
                                 cpus_per_site=args.cpus_per_site)
        print(outcome(run_dir))
    return 0


def outcome(run_dir: Path) -> str:
    """The run's verdict and where its results are, from its results.json: the log stream
    can end before the ServerApp's last lines reach it (the federation is stopped as soon
    as the run's status says finished)."""
    import json

    try:
        results = json.loads((run_dir / "results.json").read_text())
        verdict = results["verdict"]["overall"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"run finished; {run_dir / 'results.json'} unreadable ({exc})"
    return (f"{verdict}\nresults: {run_dir / 'results.json'} ; report: "
            f"{run_dir / 'report.html'}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run the experiment on Flower's simulation engine")
    p.add_argument("--cohort", required=True, help="cohort.toml written by `fedcxr synth`")
    p.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE ...",
                   help="run config overrides, e.g. 'num-rounds=3 image-size=64'")
    p.add_argument("--pooled-reference", action="store_true",
                   help="also train a centralised reference on the union of the training "
                   "sites' train splits (simulation only), compared at the held-out sites")
    p.add_argument("--replicates", type=int, default=1, metavar="K",
                   help="run the experiment K times with seeds seed..seed+K-1 and write "
                   "replicates.json / replicates.html beside the runs")
    p.add_argument("--cpus-per-site", type=int, default=1,
                   help="CPU cores per virtual site (default 1: sites train in parallel)")
    p.set_defaults(func=cmd_simulate)
