"""``fedcxr demo``: the whole pipeline on a synthetic cohort, on one machine.

Writes a small cohort (unless one is already there), then runs the hospital-side site check
and cache preparation for every site, exactly as hospital IT would.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

PRESETS = {
    "quick": {"images_per_site": 120, "size": 64, "image_size": 64},
    "full": {"images_per_site": 500, "size": 256, "image_size": 224},
}


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from client.site import SiteSource, check, run_prepare, write_check
    from common.imaging import ImagingOptions
    from common.synth import SynthOptions, generate

    console = Console()
    preset = PRESETS[args.preset]
    cohort_dir = Path(args.cohort)
    cohort_file = cohort_dir / "cohort.toml"
    if not cohort_file.exists():
        console.print(f"[bold]1/2[/] writing a synthetic cohort to {cohort_dir}")
        generate(cohort_dir, SynthOptions(images_per_site=preset["images_per_site"],
                                          size=preset["size"], seed=args.seed,
                                          shortcut="site1", readers=3))
    else:
        console.print(f"[bold]1/2[/] using the cohort in {cohort_dir}")
    cohort = tomllib.loads(cohort_file.read_text())
    console.print("[bold]2/2[/] site check and cache preparation at every site")
    summary = {}
    for site in cohort["site"]:
        source = SiteSource(data_dir=cohort_dir / site["path"],
                            manifest=cohort_dir / site["path"] / site["manifest"],
                            format=site["format"], site=site["name"])
        report = check(source, ImagingOptions(size=preset["image_size"]))
        write_check(report, cohort_dir / site["path"])
        cache, prep = run_prepare(source, ImagingOptions(size=preset["image_size"]), None)
        summary[site["name"]] = {"role": site["role"], "usable": report["usable_images"],
                                 "cached": prep["images"], "problems": len(report["problems"])}
        console.print(f"  {site['name']:<8} {site['role']:<9} usable {report['usable_images']:>4}"
                      f"  cached {prep['images']:>4} at {preset['image_size']} px")
    console.print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic cohort -> site check/prepare (-> federation)")
    p.add_argument("--cohort", default="demo-cohort", help="cohort folder (default demo-cohort)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
