"""Training throughput: plain torchvision DenseNet-121 loop vs our loop vs our DP loop.

    .venv/bin/python benchmarks/train_throughput.py [--sizes 64 224] [--steps 6]

Prints images/s and the ratios (targets: ours >= 0.95x plain; DP >= 0.5x ours), plus the DP
variants tried (Opacus grad-sample mode, batch size, threads).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from common.cache import prepare
from common.data import CachedImages
from common.imaging import ImagingOptions
from common.model import build_model
from common.privacy import DPConfig, PrivacyLedger
from common.training import DPPlan, TrainConfig, local_train


def synthetic_site(root: Path, size: int, n: int) -> CachedImages:
    """A cache of n random images with random labels (throughput does not need anatomy)."""
    import pandas as pd
    from PIL import Image

    from common.labels import LABELS

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "patient_id": f"p{i}", "study_id": "", "site": "b",
                     "sex": "", "age": float("nan"), "view": "PA", "manufacturer": "",
                     "split": "train", **{lb: float(rng.random() < 0.2) for lb in LABELS}})
    cache, _ = prepare(pd.DataFrame(rows), root / "cache", ImagingOptions(size=size, min_side=32))
    return CachedImages(cache)


def plain_rate(size: int, batch: int, steps: int) -> float:
    model = torchvision.models.densenet121(num_classes=14)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 3, size, size), torch.rand(batch, 14).round()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    loss_fn(model(x), y).backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def ours_rate(ds: CachedImages, batch: int, steps: int, dp: DPPlan | None,
              norm: str = "batch") -> float:
    torch.manual_seed(0)
    model = build_model(norm=norm)
    cfg = TrainConfig(epochs=100, batch_size=batch, max_steps=1)
    local_train(model, ds, cfg, dp=dp)  # warm-up (and Opacus set-up)
    cfg.max_steps = steps
    r = local_train(model, ds, cfg, dp=dp)
    return r.examples / r.seconds


def dp_plan(tmp: Path, name: str, mode: str = "hooks") -> DPPlan:
    return DPPlan(DPConfig(target_epsilon=8, max_epsilon=1e6, grad_sample_mode=mode),
                  PrivacyLedger(tmp / f"{name}.jsonl"), planned_units=1000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes:
            steps = args.steps if size <= 64 else max(2, args.steps // 3)
            ds = synthetic_site(tmp / f"s{size}", size, args.batch * (steps + 2))
            plain = plain_rate(size, args.batch, steps)
            ours = ours_rate(ds, args.batch, steps, None)
            ours_gn = ours_rate(ds, args.batch, steps, None, norm="group")
            dp = {mode: ours_rate(ds, args.batch, steps, dp_plan(tmp, f"dp{size}{mode}", mode),
                                  norm="group") for mode in ("hooks", "ghost")}
            print(f"\n{size} px: plain {plain:.1f} img/s | ours {ours:.1f} ({ours / plain:.2f}x "
                  f"plain, target >= 0.95) | ours GroupNorm {ours_gn:.1f}")
            for mode, rate in dp.items():
                print(f"  DP {mode}: {rate:.1f} img/s ({rate / ours:.2f}x ours, target >= 0.5; "
                      f"{rate / ours_gn:.2f}x GroupNorm non-DP)")


if __name__ == "__main__":
    main()
