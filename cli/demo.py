"""``fedcxr demo``: the whole experiment on a synthetic cohort, on one machine.

1. writes a synthetic 5-site cohort (3 training, 2 held-out; a shortcut at site1) unless one
   is there; 2. runs the hospital-side site check and cache preparation at every site, as
   hospital IT would; 3. runs the H1 experiment on Flower's simulation engine; 4. prints where
   the report is.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

from common.errors import FedcxrError

PRESETS = {
    # 2 CPU cores, well inside 15 minutes
    "quick": {"images_per_site": 300, "size": 128,
              "run": {"image-size": 64, "num-rounds": 6, "local-epochs": 1, "batch-size": 16,
                      "shift": True}},
    # a GPU machine
    "full": {"images_per_site": 500, "size": 256,
             "run": {"image-size": 224, "num-rounds": 10, "local-epochs": 1, "batch-size": 32,
                     "shift": True}},
}


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cli.simulate import simulate
    from common.imaging import ImagingOptions
    from common.site import SiteSource, check, run_prepare, write_check
    from common.synth import SynthOptions, generate

    console = Console()
    start = time.perf_counter()
    preset = PRESETS[args.preset]
    size = preset["run"]["image-size"]
    cohort_dir = Path(args.cohort)
    cohort_file = cohort_dir / "cohort.toml"
    if not cohort_file.exists():
        console.print(f"[bold]1/3[/] writing a synthetic cohort to {cohort_dir}")
        generate(cohort_dir, SynthOptions(images_per_site=preset["images_per_site"],
                                          size=preset["size"], seed=args.seed,
                                          shortcut="site1", readers=3))
    else:
        console.print(f"[bold]1/3[/] using the cohort in {cohort_dir}")
    cohort = tomllib.loads(cohort_file.read_text())
    console.print("[bold]2/3[/] site check and cache preparation at every site")
    for site in cohort["site"]:
        source = SiteSource(data_dir=cohort_dir / site["path"],
                            manifest=cohort_dir / site["path"] / site["manifest"],
                            format=site["format"], site=site["name"])
        report = check(source, ImagingOptions(size=size))
        write_check(report, cohort_dir / site["path"])
        _, prep = run_prepare(source, ImagingOptions(size=size), None)
        console.print(f"  {site['name']:<6} {site['role']:<9} {site['format']:<10} usable "
                      f"{report['usable_images']:>4}, cached {prep['images']:>4} at {size} px, "
                      f"problems: {len(report['problems'])}")
    run_name = args.run_name or time.strftime("demo-%Y%m%d-%H%M%S")
    console.print(f"[bold]3/3[/] federated training + external validation ({args.preset} "
                  f"preset) on Flower's simulation engine")
    config = {**preset["run"], "seed": args.seed, "out-dir": str(Path(args.out_dir).resolve()),
              "run-name": run_name}
    code = simulate(cohort_file, config)
    if code != 0:
        raise FedcxrError(f"the simulation failed (flwr run exit {code}); see the log above")
    run_dir = Path(args.out_dir) / run_name
    import json

    verdict = json.loads((run_dir / "results.json").read_text())["verdict"]["overall"]
    console.print(f"\n[bold]{verdict}[/]")
    console.print(f"report: {(run_dir / 'report.html').resolve()}")
    console.print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic cohort -> site check/prepare -> federation -> "
                       "report, on one machine")
    p.add_argument("--cohort", default="demo-cohort", help="cohort folder (default demo-cohort)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: 64 px, CPU (default); full: 224 px, for a GPU machine")
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--run-name", default="")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
