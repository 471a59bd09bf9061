"""Data layer throughput: first-time DICOM decoding and the cached loader, vs the trainer.

Prints images/s for (a) `prepare` decoding DICOMs into the cache on all cores, (b) iterating
the cached DataLoader with augmentation, and (c) a plain DenseNet-121 training step on the same
batches, at 64 and 224 px. Target: the loader feeds >= 20x what the trainer consumes.

    .venv/bin/python benchmarks/data_throughput.py [--images 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import plain_rate  # the same plain DenseNet-121 loop (benchmarks/)

from common.data import CachedImages, augment_batch, make_loader
from common.imaging import ImagingOptions
from common.site import SiteSource, run_prepare
from common.synth import SynthOptions, generate


def loader_rate(cache, batch: int = 32) -> float:
    ds = CachedImages(cache)
    g = torch.Generator().manual_seed(0)
    start, n = time.perf_counter(), 0
    for _ in range(3):
        for x, _y in make_loader(ds, batch, shuffle=True):
            augment_batch(x, g)
            n += len(x)
    return n / (time.perf_counter() - start)




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, SynthOptions(sites=2, held_out=1, images_per_site=args.images, size=512))
        site = SiteSource(root / "site2")  # held-out: DICOM, MONOCHROME1, 10-bit
        print(f"{'size':>5} {'decode img/s':>13} {'loader img/s':>13} {'trainer img/s':>14} "
              f"{'loader/trainer':>15}")
        for size in (64, 224):
            start = time.perf_counter()
            cache, summary = run_prepare(site, ImagingOptions(size=size), root / f"c{size}")
            decode = summary["decoded"] / (time.perf_counter() - start)
            load = loader_rate(cache)
            train = plain_rate(size, batch=16, steps=3)
            print(f"{size:>5} {decode:>13.0f} {load:>13.0f} {train:>14.1f} {load / train:>14.0f}x")


if __name__ == "__main__":
    main()
