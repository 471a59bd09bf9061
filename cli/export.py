"""``fedcxr export RUN_DIR --model NAME [--format torchscript|onnx] --out DIR``.

Writes the selected model of one arm as one loadable file with its preprocessing contract,
label order and thresholds (``server.export``), and its model card (``common.model_card``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from common.model_card import model_card, write_model_card
    from server.export import export, read_results, selected_model

    module, meta = selected_model(Path(args.run_dir), args.model)
    path = export(module, meta, args.format, Path(args.out))
    card = model_card(read_results(Path(args.run_dir)), args.model, asdict(meta), args.format,
                      path.name)
    jpath, mpath = write_model_card(card, Path(args.out))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.format}, input "
          f"1 x {meta.image_size} x {meta.image_size}), {mpath.name} and {jpath.name}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a run's selected model as TorchScript or ONNX, with "
                                      "its model card")
    p.add_argument("run_dir", help="the finished run's folder (<out-dir>/<run-name>)")
    p.add_argument("--model", default="federated",
                   help="the arm: federated (default) or single:SITE")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    p.add_argument("--out", required=True, help="folder for the model file and model card")
    p.set_defaults(func=run)
