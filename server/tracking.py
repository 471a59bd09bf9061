"""Experiment tracking in MLflow: the coordinator's dashboard of every run.

One MLflow run per fedcxr run, in experiment ``fedcxr``: the run config as params; per round
and arm the loss, validation AUC, ε, sites trained and validated, and the round's seconds
(MLflow steps are rounds); ε per site; at the end results.json, report.html, metrics.csv,
status.json and every arm's selected model (a fedcxr checkpoint) as artifacts, and the H1
verdict and the primary endpoint as tags and metrics.

Default store: SQLite at ``<out-dir>/mlflow.db`` with artifacts under ``<out-dir>/mlartifacts``
(no server needed; ``mlflow ui --backend-store-uri sqlite:///<out-dir>/mlflow.db``); run config
``tracking-uri`` names another (an ``http://`` MLflow server) or ``off``. Tracking never fails a
run: the first error is logged once and tracking stops for that run.
"""

from __future__ import annotations

import logging
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("flwr")

EXPERIMENT = "fedcxr"
OFF = "off"


def default_uri(out_dir: Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def metric_key(*parts: str) -> str:
    """An MLflow metric name from parts (arm ``single:site1`` -> ``single_site1``): MLflow
    allows letters, digits, ``_ - . / space`` only."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", p) for p in parts)


class Tracker:
    """A best-effort MLflow run. Every method is a no-op once tracking is off or broken."""

    def __init__(self, uri: str, out_dir: Path) -> None:
        self.uri = uri or default_uri(out_dir)
        self.out_dir = Path(out_dir)
        self.client = None
        self.run_id: str | None = None
        self.logged_rows: set[tuple[int, str]] = set()

    @property
    def on(self) -> bool:
        return self.run_id is not None

    @property
    def stores_here(self) -> bool:
        """Whether the run's artifacts (the selected models among them) go to this machine's
        disk: a local store; an MLflow server keeps its own."""
        return self.on and not self.uri.startswith(("http://", "https://"))

    def _guard(self, what: str, fn, *args, **kwargs):
        if self.client is None and what != "start":
            return None
        try:
            with warnings.catch_warnings():  # MLflow's own deprecations are not the run's
                warnings.simplefilter("ignore", DeprecationWarning)
                return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the experiment
            log.warning("tracking: %s failed (%s: %s); the run goes on without MLflow "
                        "tracking (store %s)", what, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "", self.uri)
            self.client, self.run_id = None, None
            return None

    def start(self, run_name: str, params: dict, logged: set[tuple[int, str]] | None = None
              ) -> None:
        """Open the run's MLflow run; a resumed run (``logged``: the (round, arm) rows its
        checkpoint says were logged before the crash) continues its own."""
        if self.uri == OFF:
            return
        self.logged_rows = set(logged or ())
        self._guard("start", self._start, run_name, params, logged is not None)

    def _start(self, run_name: str, params: dict, resumed: bool) -> None:
        for name in ("mlflow", "alembic"):  # schema-migration chatter in the run's log
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.uri.startswith(("http://", "https://")):
            # One quick look first: MLflow's client retries an unreachable server with
            # backoff for minutes, and the run must not wait on its dashboard.
            import httpx

            httpx.get(self.uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        from mlflow.tracking import MlflowClient

        artifacts = (self.out_dir / "mlartifacts").resolve().as_uri()
        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            EXPERIMENT, artifact_location=artifacts if self.uri.startswith("sqlite") else None)
        found = client.search_runs([exp_id], f"tags.`fedcxr.run_name` = '{run_name}'",
                                   max_results=1) if resumed else []
        if found:  # a resumed run continues its MLflow run
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(exp_id, run_name=run_name,
                                    tags={"fedcxr.run_name": run_name})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100])
        self.client = client
        log.info("tracking: MLflow run %s in %s", self.run_id, self.uri)

    def rounds(self, history, epsilon: dict[str, float]) -> None:
        """Log the history rows not logged yet (each arm's row of each round)."""
        self._guard("logging a round", self._rounds, history, epsilon)

    def _rounds(self, history, epsilon: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now, metrics = int(time.time() * 1000), []
        fresh = [h for h in history if (h.round, h.arm) not in self.logged_rows]
        for h in fresh:
            values = {"loss": h.loss, "val_auc": h.val_auc, "epsilon": h.epsilon,
                      "sites_trained": h.sites_trained, "sites_validated": h.sites_validated,
                      "round_seconds": h.seconds}
            metrics += [Metric(metric_key(h.arm, k), float(v), now, h.round)
                        for k, v in values.items() if v is not None]
        if fresh:
            last = max(h.round for h in fresh)
            metrics += [Metric(metric_key("epsilon_site", s), float(e), now, last)
                        for s, e in sorted(epsilon.items())]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])
        self.logged_rows |= {(h.round, h.arm) for h in fresh}

    def finish(self, results: dict, run_dir: Path,
               models: Callable[[Path], dict[str, Path]] | None = None) -> None:
        """The verdict, the outputs, and the models ``models(folder)`` writes into a
        temporary folder (called only while tracking is on)."""
        self._guard("logging the results", self._finish, results, Path(run_dir), models)

    def _finish(self, results: dict, run_dir: Path,
                models: Callable[[Path], dict[str, Path]] | None) -> None:
        c = self.client
        verdict = results.get("verdict", {})
        c.set_tag(self.run_id, "h1.verdict", verdict.get("status", "none"))
        c.set_tag(self.run_id, "h1.overall", str(verdict.get("overall", ""))[:5000])
        protocol = results.get("protocol", {})
        c.set_tag(self.run_id, "primary_endpoint",
                  f"{protocol.get('primary_metric')} over "
                  f"{','.join(protocol.get('primary_labels') or [])}")
        for row in results.get("primary_auc", []):
            if row.get("macro_auc") is not None:
                c.log_metric(self.run_id, metric_key("external_macro_auc", row["model"],
                                                     row["site"]), float(row["macro_auc"]))
        for row in verdict.get("primary", []):
            if row.get("diff") is not None:
                c.log_metric(self.run_id, metric_key("primary_diff", row["model_b"],
                                                     row["site"]), float(row["diff"]))
        for name in ("results.json", "report.html", "metrics.csv", "status.json"):
            if (run_dir / name).is_file():
                c.log_artifact(self.run_id, str(run_dir / name))
        if models is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for path in models(Path(tmp)).values():
                    c.log_artifact(self.run_id, str(path), artifact_path="models")
        c.set_terminated(self.run_id, "FINISHED")

    def failed(self) -> None:
        if self.client is not None:
            self._guard("marking the run failed", self.client.set_terminated, self.run_id,
                        "FAILED")
