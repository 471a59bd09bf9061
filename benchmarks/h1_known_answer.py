"""Calibrate fedcxr against cohorts whose answer is known: each scenario of
``fedcxr synth --scenario`` is written, prepared at every site, and run as the full simulated
experiment (centralised reference on) with K replicates; then one table and one line per
scenario saying whether fedcxr's verdict matched the truth.

    .venv/bin/python benchmarks/h1_known_answer.py                   # all three, 2 replicates
    .venv/bin/python benchmarks/h1_known_answer.py --scenario shift --replicates 3

Truth per scenario (``common.synth.scenarios``): ``shift`` must be "supported";
``big-site`` must not be "supported"; ``null-shift`` makes no H1 claim, and matches when
every arm's internal-to-external drop of the primary macro-AUC has a 95% CI containing 0.
The demo's settings are the defaults (``cli.demo.PRESETS["quick"]``); about 6-8 minutes per
replicate on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.demo import PRESETS, matches_truth, prepare_sites  # noqa: E402
from cli.simulate import run_replicates  # noqa: E402
from common.synth import SynthOptions, generate  # noqa: E402
from common.synth.scenarios import SCENARIOS  # noqa: E402

NEGLIGIBLE = 0.05  # |drop| that counts as none where a CI cannot be formed


def no_shift_holds(run_dir: Path) -> bool:
    """Every arm's primary internal-to-external drop has a 95% CI containing 0. Where no CI
    can be formed (a training site's small test split ranks perfectly: AUC 1, variance 0),
    the drop must be below NEGLIGIBLE in absolute value instead."""
    results = json.loads((run_dir / "results.json").read_text())
    rows = [d for d in results["internal_external"] if d["label"].startswith("primary")]
    return bool(rows) and all(
        d["drop_low"] <= 0 <= d["drop_high"] if d.get("drop_low") is not None
        else abs(d["drop"]) < NEGLIGIBLE for d in rows)


def arm_means(run_dir: Path) -> dict[str, float]:
    """Mean external primary macro-AUC of each model over the held-out sites."""
    results = json.loads((run_dir / "results.json").read_text())
    acc: dict[str, list[float]] = {}
    for r in results["primary_auc"]:
        acc.setdefault(r["model"], []).append(r["macro_auc"])
    return {m: sum(v) / len(v) for m, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="default: all three")
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    ap.add_argument("--out", default="runs/known-answer")
    ap.add_argument("--reuse", action="store_true",
                    help="summarise a scenario's finished replicates instead of running again")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    out = Path(args.out).resolve()
    lines, table = [], []
    for name in args.scenario or list(SCENARIOS):
        start = time.perf_counter()
        cohort_dir = out / f"cohort-{name}"
        if not (cohort_dir / "cohort.toml").exists():
            generate(cohort_dir, SynthOptions(images_per_site=preset["images_per_site"],
                                              size=preset["size"], scenario=name))
        cohort = tomllib.loads((cohort_dir / "cohort.toml").read_text())
        prepare_sites(cohort_dir, cohort, preset["run"]["image-size"], say=lambda *_: None)
        config = {**preset["run"], "out-dir": str(out), "run-name": name,
                  "primary-labels": ",".join(cohort["primary-labels"])}
        root = out / name
        if not (args.reuse and (root / "replicates.json").exists()):
            root = run_replicates(cohort_dir / "cohort.toml", config, args.replicates,
                                  pooled_reference=True, quiet=True, say=lambda *_: None)
        summary = json.loads((root / "replicates.json").read_text())
        runs = [root / r for r in summary["runs"] if (root / r / "results.json").exists()]
        statuses = [r["status"] for r in summary["replicates"]]
        expected = cohort["expected-verdict"]
        if expected == "no shift":
            ok = [no_shift_holds(r) for r in runs]
        else:
            ok = [matches_truth(expected, s) for s in statuses]
        m = summary["mean_primary_diff"] or {}
        means = [arm_means(r) for r in runs]
        singles = [max(v for k, v in mm.items() if k.startswith("single:")) for mm in means]
        table.append([
            name, expected, " ".join(statuses),
            f"{m.get('mean_diff', float('nan')):+.3f}",
            (f"{m['t_low']:+.3f}..{m['t_high']:+.3f}" if m.get("t_low") is not None else "-"),
            f"{sum(x.get('centralised', float('nan')) for x in means) / len(means):.3f}",
            f"{sum(x['federated'] for x in means) / len(means):.3f}",
            f"{sum(singles) / len(singles):.3f}",
            f"{time.perf_counter() - start:.0f}"])
        said = "matched" if all(ok) else "DID NOT match"
        lines.append(f"{name}: truth {expected!r}; fedcxr {said} the truth in {sum(ok)} of "
                     f"{len(ok)} replicates")
    headers = ["scenario", "truth", "verdict per replicate", "mean diff", "t-interval",
               "centralised", "federated", "best single", "seconds"]
    widths = [max(len(str(r[i])) for r in [headers, *table]) for i in range(len(headers))]
    for row in [headers, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print("(mean diff: federated minus single-site macro-AUC, averaged over the primary "
          "comparisons; AUC columns: mean external macro-AUC over held-out sites and replicates)")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
