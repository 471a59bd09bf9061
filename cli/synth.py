"""``fedcxr synth OUT_DIR``: write a synthetic multi-site cohort."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.errors import FedcxrError


def _label_noise(specs: list[str]) -> dict[str, float]:
    out = {}
    for spec in specs:
        site, sep, frac = spec.partition("=")
        try:
            out[site] = float(frac)
        except ValueError:
            sep = ""
        if not sep or not 0 <= out.get(site, -1) <= 1:
            raise FedcxrError(f"--label-noise {spec!r}: use SITE=FRACTION, e.g. site2=0.2")
    return out


def cmd_synth(args: argparse.Namespace) -> int:
    from common.progress import progress_bar
    from common.synth import SynthOptions, generate

    opts = SynthOptions(
        sites=args.sites, held_out=args.held_out, images_per_site=args.images_per_site,
        size=args.size, seed=args.seed, shortcut=args.shortcut, readers=args.readers,
        label_noise=_label_noise(args.label_noise), laterals=args.laterals, enrich=args.enrich,
        scenario=args.scenario or "",
    )
    if args.size < 32:
        raise FedcxrError("--size must be at least 32 px")
    start = time.perf_counter()
    try:
        with progress_bar("rendering") as update:
            cohort = generate(Path(args.out_dir), opts, progress=update)
    except ValueError as exc:
        raise FedcxrError(str(exc)) from exc
    import tomllib

    written = tomllib.loads(cohort.read_text())
    total = sum(site["images"] for site in written["site"])
    print(f"wrote {total} images in {time.perf_counter() - start:.1f} s; cohort file: {cohort}")
    if opts.scenario:
        print(f"scenario {opts.scenario}: {written['truth']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from common.synth.scenarios import SCENARIOS

    p = sub.add_parser("synth", help="write a synthetic multi-site CXR cohort")
    p.add_argument("out_dir")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--held-out", type=int, default=2)
    p.add_argument("--images-per-site", type=int, default=500)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortcut", help="SITE[:LABEL]: a burned-in token tracks LABEL "
                   "(default Effusion) at SITE only")
    p.add_argument("--readers", type=int, default=0,
                   help="simulated radiologists at held-out sites, written as a VinDr-CXR "
                   "annotations_readers.csv (every site also gets its drawn lesions and "
                   "markers in NIH BBox_List format)")
    p.add_argument("--label-noise", action="append", default=[], metavar="SITE=FRACTION",
                   help="the site's labeller misses this fraction of positives")
    p.add_argument("--laterals", action="store_true", help="also write lateral views")
    p.add_argument("--scenario", choices=sorted(SCENARIOS),
                   help="a cohort with a known answer (its truth is written to cohort.toml): "
                   + "; ".join(f"{s.name}: {s.expected}" for s in SCENARIOS.values()))
    p.add_argument("--enrich", type=float, default=2.0,
                   help="multiply published prevalences (default 2, capped at 0.6)")
    p.set_defaults(func=cmd_synth)
