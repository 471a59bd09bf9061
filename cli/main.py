"""The ``fedcxr`` console entry point.

Each subcommand imports its implementation lazily, so ``fedcxr site check`` starts fast and
works without Flower or torch being imported. Exit codes: 0 done; 1 done, but nothing usable
(see the problems listed); 2 a user error (FedcxrError or a bad argument: one line, no
traceback); 3 the tool itself failed (a bug: the traceback is printed to report it); 4 an
alert fired (``site monitor``); 130 interrupted (what ``site prepare`` had decoded is kept).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from cli.args import int_in as _int_in
from cli.args import positive as _positive
from cli.args import uncertain as _uncertain
from common.errors import FedcxrError

EXIT_NOTHING_USABLE, EXIT_USER_ERROR, EXIT_TOOL_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 130


def _site_source(args: argparse.Namespace):
    from common.site import SiteSource

    return SiteSource(
        data_dir=Path(args.data_dir),
        manifest=Path(args.manifest) if args.manifest else None,
        format=args.format,
        uncertain=args.uncertain,
        allow_outside=args.allow_outside,
        max_image_mb=args.max_image_mb,
        annotations=tuple(Path(p) for p in (args.readers, args.boxes) if p),
    )


def _imaging(args: argparse.Namespace, size: int):
    from common.imaging import ImagingOptions

    return ImagingOptions(size=size, min_side=args.min_side,
                          include_laterals=args.include_laterals,
                          max_image_mb=args.max_image_mb)


def cmd_site_check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from common.site import check, render_check, write_check

    report = check(_site_source(args), _imaging(args, 64))
    console = Console()
    render_check(report, console)
    path = write_check(report, Path(args.out))
    console.print(f"wrote {path}")
    if report["usable_images"] == 0:
        print(f"error: {args.data_dir}: no usable images; see the problems above", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    return 0


def cmd_site_prepare(args: argparse.Namespace) -> int:
    import json

    from common.site import run_prepare

    cache, summary = run_prepare(_site_source(args), _imaging(args, args.image_size),
                                 Path(args.cache) if args.cache else None, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    if len(cache.index) == 0:
        print(f"error: {args.data_dir}: no usable images were cached", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    return 0


def _add_site_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="the site's data folder (images + manifest)")
    p.add_argument("--manifest", help="manifest CSV (default: the one recognised CSV in DATA_DIR)")
    p.add_argument("--format", help="manifest format (default: detected from the columns)")
    p.add_argument("--readers", help="reader annotations CSV (VinDr-CXR per-reader rows, Google "
                   "expert labels; default: any such file beside the manifest)")
    p.add_argument("--boxes", help="box annotations CSV (NIH BBox_List, RSNA, VinDr; default: "
                   "any such file beside the manifest)")
    p.add_argument("--uncertain", default="ignore", type=_uncertain,
                   help="CheXpert -1 policy: ignore|zeros|ones, per label as Edema=ones,...")
    p.add_argument("--min-side", type=_int_in(1, 100_000), default=64,
                   help="reject images smaller than this")
    p.add_argument("--include-laterals", action="store_true", help="keep lateral views")
    p.add_argument("--allow-outside", action="store_true",
                   help="let manifest paths lead outside DATA_DIR (../, absolute, symlinks)")
    p.add_argument("--max-image-mb", type=_positive, default=64.0,
                   help="pixel budget: refuse files whose header declares more raw pixel "
                        "MiB than this, before decoding (default 64)")


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
    p.add_argument("--image-size", type=_int_in(16, 1024), default=224,
                   help="side of the cached square images, 16-1024 (default 224)")
    p.add_argument("--cache", help="cache folder (default: DATA_DIR/.fedcxr/cache-SIZE)")
    p.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8")
    p.set_defaults(func=cmd_site_prepare)
    from cli.governance import register_site
    from cli.monitor import register_monitor

    register_site(site)
    register_monitor(site)

    for register in _registrars():
        register(sub)
    return parser


def _registrars():
    """Subcommands defined next to their implementations."""
    from importlib import import_module

    for module in ("cli.synth", "cli.demo", "cli.evaluate",
                   "cli.train_local", "cli.simulate", "cli.status", "cli.export"):
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
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print(str(exc) or "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: say so, with what is needed to fix it
        traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (a fedcxr bug, not your data: "
              "please report it with the traceback above)", file=sys.stderr)
        return EXIT_TOOL_FAILED


if __name__ == "__main__":
    sys.exit(main())
