"""The centralised reference arm (simulation only; impossible in a real federation).

One model trained on the union of the training sites' train splits, outside Flower, as if a
single hospital held every training site's images. It answers a question the federated arm
cannot answer by itself: does pooling the training sites help on the held-out sites at all?
If the centralised model does not beat the single-site models there, a federated "win" is not
expected either, whatever the federation does.

It is held to the federated arm's protocol:
- the same budget: each round it trains ``local-epochs`` epochs over the union, so it sees as
  many images as the federated arm (every site trains ``local-epochs`` epochs on its split);
- the same start: ``torch.manual_seed(seed)`` then ``build_model`` (the federated arm's
  initial weights) and the same training-order seeds policy (``arm_seed``);
- the same selection rule (``selection``): its best round on the pooled validation splits of
  the training sites, or its last round.
Held-out sites contribute nothing: only training sites' ``train`` (and, for selection,
``val``) splits are read, through the very ``Site.splits`` the ClientApp uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from client.node import Site, open_site
from common.config import RunConfig
from common.data import CachedImages
from common.model import build_model, save_checkpoint
from common.seeds import arm_seed
from common.training import TrainConfig, local_train, validate
from server.state import CENTRALISED, CENTRALISED_LABEL

log = logging.getLogger(__name__)

ARM = CENTRALISED
KIND = "centralised-reference"
LABEL = CENTRALISED_LABEL


class PooledImages(ConcatDataset):
    """The union of several sites' splits, with the labels ``local_train`` weighs by."""

    def __init__(self, parts: list[CachedImages]) -> None:
        super().__init__(parts)
        self.parts = parts

    def labels(self) -> np.ndarray:
        return np.concatenate([p.labels() for p in self.parts])


def training_sites(cohort_file: Path, run: RunConfig) -> list[Site]:
    """The cohort's training sites, opened as the simulation's virtual nodes open them."""
    cohort = tomllib.loads(Path(cohort_file).read_text())
    sites = []
    for i, entry in enumerate(cohort["site"]):
        if entry.get("role") == "train":
            sites.append(open_site({"partition-id": i, "num-partitions": len(cohort["site"])},
                                   run))
    return sites


def pooled_splits(sites: list[Site], run: RunConfig) -> dict[str, PooledImages]:
    """``train`` and ``val``: the union of the training sites' own splits (held-out sites and
    every ``test`` split are never touched)."""
    splits = [s.splits(run) for s in sites]
    return {name: PooledImages([sp[name] for sp in splits]) for name in ("train", "val")}


@dataclass
class ReferenceResult:
    path: Path
    selected_round: int
    history: list[dict]
    n_train: int
    n_val: int
    seconds: float


def train_reference(cohort_file: Path, run: RunConfig, out: Path, *,
                    progress: Callable[[str], None] | None = None) -> ReferenceResult:
    """Train the centralised reference and save the selected round's weights at ``out``
    (fedcxr model format, with its history in ``<out>.json``)."""
    start = time.perf_counter()
    run = dataclasses.replace(run, cohort=str(Path(cohort_file).resolve()))
    sites = training_sites(cohort_file, run)
    if not sites:
        raise ValueError(f"{cohort_file}: no training site to pool")
    data = pooled_splits(sites, run)
    torch.manual_seed(run.seed)  # the federated arm's initial weights (server prepare_arms)
    model = build_model(norm=run.norm, init_weights=run.init_weights or None)
    best = (-np.inf, 0, None)
    history = []
    for rnd in range(1, run.num_rounds + 1):
        tc = TrainConfig(epochs=run.local_epochs, batch_size=run.batch_size, lr=run.lr,
                         seed=arm_seed(run.seed, rnd, ARM))
        result = local_train(model, data["train"], tc)
        val = validate(model, data["val"])
        mean = val.mean_auc if val.mean_auc is not None else float("nan")
        history.append({"round": rnd, "loss": result.loss, "examples": result.examples,
                        "val_mean_auc": val.mean_auc})
        if progress:
            progress(f"centralised reference round {rnd}/{run.num_rounds}: "
                     f"{result.examples} images, loss {result.loss:.4f}, val AUC {mean:.3f}")
        if run.selection == "last" or (np.isfinite(mean) and mean > best[0]):
            best = (mean, rnd, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if best[2] is not None:
        model.load_state_dict(best[2])
    out = Path(out)
    save_checkpoint(model, out, image_size=run.image_size, kind=KIND,
                    selected_round=best[1], sites=[s.name for s in sites])
    record = {"kind": KIND, "label": LABEL, "selection": run.selection,
              "best_round": best[1], "history": history,
              "sites": [s.name for s in sites], "n_train": len(data["train"]),
              "n_val": len(data["val"]), "seconds": round(time.perf_counter() - start, 1)}
    Path(f"{out}.json").write_text(json.dumps(record, indent=2))
    return ReferenceResult(out, best[1], history, len(data["train"]), len(data["val"]),
                           time.perf_counter() - start)
