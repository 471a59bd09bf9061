"""``fedcxr train-local``: train one site alone (the baseline arm, and for debugging)."""

from __future__ import annotations

import argparse
import json
import logging
import uuid
from pathlib import Path

from cli.args import IMAGE_SIZES, int_in
from common.config import DEFAULT_MAX_EPSILON
from common.errors import FedcxrError
from common.privacy import PRIVACY_UNITS


def cmd_train_local(args: argparse.Namespace) -> int:
    from common.config import norm_for
    from common.data import split_datasets
    from common.model import build_model, save_checkpoint
    from common.privacy import DPConfig, PrivacyLedger, default_ledger_path
    from common.progress import progress_bar
    from common.releases import released_counts
    from common.site import SiteSource, ensure_cache
    from common.training import DPPlan, TrainConfig, dp_dataset, local_train, validate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from common.model import resolve_device

    device = resolve_device(args.device)  # before any work: a wrong device is one line
    site = Path(args.site)
    source = SiteSource(site, Path(args.manifest) if args.manifest else None, args.format)
    cache = ensure_cache(source, args.image_size, Path(args.cache) if args.cache else None)
    splits = split_datasets(cache, seed=args.seed)
    if len(splits["train"]) == 0:
        raise FedcxrError(f"{site}: no training images after the split; check the manifest")
    dp = None
    if args.dp:
        ledger_path = Path(args.ledger) if args.ledger else default_ledger_path(site)
        config = DPConfig(target_epsilon=args.target_epsilon, max_epsilon=args.max_epsilon,
                          delta=args.delta, max_grad_norm=args.max_grad_norm,
                          accountant=args.accountant, grad_sample_mode=args.grad_sample_mode)
        ledger = PrivacyLedger(ledger_path, site=site.name, accountant=args.accountant)
        n_units = len(dp_dataset(splits["train"], args.privacy_unit))
        # class weights from one noised release of the label counts, in the same ledger
        counts = released_counts(
            splits["train"], privacy_unit=args.privacy_unit, ledger=ledger,
            store=ledger_path.parent / "releases" / f"label-counts-local-{uuid.uuid4().hex}.json",
            delta=config.delta_for(n_units), max_epsilon=config.max_epsilon,
            noise_multiplier=args.count_noise_multiplier, run_id="train-local", n_units=n_units)
        dp = DPPlan(config, ledger, run_id="train-local", arm="local",
                    privacy_unit=args.privacy_unit,
                    pos_weight=counts.pos_weight(TrainConfig().pos_weight_cap))
    model = build_model(norm=norm_for(args.dp), init_weights=args.init_weights)
    if args.dp:
        print("DP on: the model uses GroupNorm (BatchNorm cannot give per-sample gradients)")
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, proximal_mu=0.0, device=device)
    with progress_bar(f"training {site.name}") as update:
        result = local_train(model, splits["train"], tc, dp=dp, progress=update)
    val = validate(model, splits["val"], device=device)
    out = Path(args.out)
    save_checkpoint(model, out / "model.pt", image_size=args.image_size, site=site.name)
    metrics = {"site": site.name, "examples": result.examples, "steps": result.steps,
               "epoch_losses": result.epoch_losses, "val_auc": val.auc,
               "mean_val_auc": val.mean_auc, "n_val": val.n, "seconds": result.seconds,
               "epsilon": result.epsilon, "delta": result.delta,
               "noise_multiplier": result.noise_multiplier}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    mean = f"{val.mean_auc:.3f}" if val.mean_auc is not None else "n/a"
    eps = f", ε {result.epsilon:.3f}" if result.epsilon is not None else ""
    print(f"trained {result.steps} steps on {result.examples} images; mean val AUC {mean}{eps}; "
          f"wrote {out / 'model.pt'} and {out / 'metrics.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-local", help="train one site alone (baseline / debugging)")
    p.add_argument("--site", required=True, help="a site data folder")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--image-size", type=int_in(*IMAGE_SIZES), default=224)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-weights", help="local DenseNet-121 weights (torchvision format)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--manifest")
    p.add_argument("--format")
    p.add_argument("--cache")
    p.add_argument("--dp", action="store_true", help="DP-SGD with the site's privacy ledger")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--max-epsilon", type=float, default=DEFAULT_MAX_EPSILON,
                   help="the site's total budget (default %(default)s, as a node's)")
    p.add_argument("--delta", type=float, help="default min(1/(10 n), 1e-5)")
    p.add_argument("--count-noise-multiplier", type=float, default=10.0,
                   help="noise of the one release of label counts that sets the class weights "
                   "under DP (L2 sensitivity sqrt(14); in the ledger)")
    p.add_argument("--privacy-unit", choices=PRIVACY_UNITS, default="patient",
                   help="what DP protects: a patient (all its images; default) or an image")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument("--grad-sample-mode", choices=("bk", "ghost", "hooks"), default="bk",
                   help="how per-image clipping is computed (same result, speed differs): bk "
                   "(ghost norms + book-keeping, one backward), ghost (Opacus ghost clipping, two "
                   "backwards), hooks (Opacus per-sample gradients)")
    p.add_argument("--ledger", help="ledger file (default SITE/.fedcxr/ledger.jsonl, the same "
                   "file a node on this data folder uses)")
    p.set_defaults(func=cmd_train_local)
