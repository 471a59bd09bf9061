"""The ``fedcxr`` console entry point.

Each subcommand imports its implementation lazily, so ``fedcxr site check`` starts fast and
works without Flower or torch being imported. Errors a user can cause (FedcxrError) print one
line and exit 2; nothing here prints a traceback for them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import FedcxrError


def _site_source(args: argparse.Namespace):
    from common.site import SiteSource

    return SiteSource(
        data_dir=Path(args.data_dir),
        manifest=Path(args.manifest) if args.manifest else None,
        format=args.format,
        uncertain=args.uncertain,
    )


def cmd_site_check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from common.imaging import ImagingOptions
    from common.site import check, render_check, write_check

    options = ImagingOptions(size=64, min_side=args.min_side,
                             include_laterals=args.include_laterals)
    report = check(_site_source(args), options)
    console = Console()
    render_check(report, console)
    path = write_check(report, Path(args.out))
    console.print(f"wrote {path}")
    if report["usable_images"] == 0:
        print(f"error: {args.data_dir}: no usable images; see the problems above", file=sys.stderr)
        return 1
    return 0


def cmd_site_prepare(args: argparse.Namespace) -> int:
    import json

    from common.imaging import ImagingOptions
    from common.site import run_prepare

    options = ImagingOptions(size=args.image_size, min_side=args.min_side,
                             include_laterals=args.include_laterals)
    cache, summary = run_prepare(_site_source(args), options,
                                 Path(args.cache) if args.cache else None, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    if len(cache.index) == 0:
        print(f"error: {args.data_dir}: no usable images were cached", file=sys.stderr)
        return 1
    return 0


def _add_site_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="the site's data folder (images + manifest)")
    p.add_argument("--manifest", help="manifest CSV (default: the one recognised CSV in DATA_DIR)")
    p.add_argument("--format", help="manifest format (default: detected from the columns)")
    p.add_argument("--uncertain", default="ignore",
                   help="CheXpert -1 policy: ignore|zeros|ones, per label as Edema=ones,...")
    p.add_argument("--min-side", type=int, default=64, help="reject images smaller than this")
    p.add_argument("--include-laterals", action="store_true", help="keep lateral views")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcxr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    site = sub.add_parser("site", help="hospital-side data tools").add_subparsers(
        dest="site_command", required=True
    )
    p = site.add_parser("check", help="validate a site's images and manifest")
    _add_site_args(p)
    p.add_argument("--out", default=".", help="folder for check.json (default: .)")
    p.set_defaults(func=cmd_site_check)
    p = site.add_parser("prepare", help="decode images once into the training cache")
    _add_site_args(p)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cache", help="cache folder (default: DATA_DIR/.fedcxr/cache-SIZE)")
    p.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8")
    p.set_defaults(func=cmd_site_prepare)
    from cli.governance import register_site

    register_site(site)

    for register in _registrars():
        register(sub)
    return parser


def _registrars():
    """Subcommands defined next to their implementations."""
    from importlib import import_module

    for module in ("cli.synth", "cli.demo", "cli.evaluate",
                   "cli.train_local", "cli.simulate"):
        try:
            yield import_module(module).register
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedcxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
