"""Does the synthetic cohort carry the signal it should?

Trains a small CNN briefly on each training site and reports, per label, the internal AUC
(the site's own held-out patients) and the AUC at every other site. Run twice: without a
shortcut, and with a burned-in token tracking Effusion at site1 only. The cohort should show
(a) learnable findings: internal AUC well above 0.5 for the visible labels, and (b) with the
shortcut, a drop for site1's Effusion model on sites without the token.

    .venv/bin/python benchmarks/synth_signal.py [--images 500 --size 64 --epochs 8]
"""

from __future__ import annotations

import argparse
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.data import CachedImages, augment_batch, make_loader, split_datasets
from common.evaluation.delong import NotEstimable, auc_ci
from common.labels import LABELS
from common.site import SiteSource, ensure_cache
from common.synth import SynthOptions, generate
from common.training import masked_bce, pos_weight_from

SHOWN = ("Cardiomegaly", "Effusion", "Pneumothorax", "Edema", "Atelectasis", "Mass",
         "Consolidation")


def small_cnn() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(LABELS)))


def train(ds: CachedImages, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    pw = pos_weight_from(ds.labels())
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for x, y in make_loader(ds, 32, shuffle=True):
            opt.zero_grad()
            masked_bce(model(augment_batch(x, g)), y, pw).backward()
            opt.step()
    return model.eval()


def aucs(model: nn.Module, ds: CachedImages) -> dict[str, float | None]:
    with torch.no_grad():
        scores = torch.cat([model(x) for x, _ in make_loader(ds, 128, shuffle=False)]).numpy()
    out = {}
    for k, label in enumerate(LABELS):
        try:
            out[label] = auc_ci(ds.labels()[:, k], scores[:, k]).auc
        except NotEstimable:
            out[label] = None
    return out


def experiment(root: Path, shortcut: str | None, args) -> None:
    generate(root, SynthOptions(images_per_site=args.images, size=args.size * 2, seed=1,
                                shortcut=shortcut))
    sites = tomllib.loads((root / "cohort.toml").read_text())["site"]
    data = {s["name"]: ensure_cache(SiteSource(root / s["path"]), args.size) for s in sites}
    print(f"\n== shortcut: {shortcut or 'none'} ==")
    print(f"{'trained at':<10} {'label':<14} {'internal':>8} " +
          " ".join(f"{n:>7}" for n in data))
    for s in sites:
        if s["role"] != "train":
            continue
        splits = split_datasets(data[s["name"]])
        model = train(splits["train"], args.epochs)
        internal = aucs(model, splits["test"])
        external = {n: aucs(model, CachedImages(c)) for n, c in data.items() if n != s["name"]}
        for label in SHOWN:
            if internal[label] is None:
                continue
            cells = " ".join(
                f"{external[n][label]:7.3f}" if n in external and external[n][label] is not None
                else f"{'-' if n == s['name'] else 'n/e':>7}" for n in data)
            print(f"{s['name']:<10} {label:<14} {internal[label]:8.3f} {cells}")
        known = [v for v in internal.values() if v is not None]
        print(f"{s['name']:<10} {'mean (all)':<14} {np.mean(known):8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        experiment(Path(tmp) / "plain", None, args)
        experiment(Path(tmp) / "shortcut", "site1:Effusion", args)


if __name__ == "__main__":
    main()
