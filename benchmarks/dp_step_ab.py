"""A DP (bk) training step of this checkout's ``common/dp_grad_sample.py`` against another
revision's, in one process, the two taking turns.

Why: on this shared host the speed of whole training calls swings by a fifth within the hour
(``train_throughput.py`` printed bk at 0.60-0.79x of the non-DP loop across nine runs of one
session), so a change of a few percent in the DP step shows only when both versions run side
by side. Each version is loaded from its own source file (the other revision's through
``git show``) and registers its own norm functions before each of its steps; both train the
same DenseNet-121 (GroupNorm) on the same fixed batch, with the same noise generator seed.
Each takes a turn of ``--per-turn`` steps (the first of each turn, and the first turn, not
counted; the noise drawn ahead is waited for at the end of a turn, so neither pays for the
other's thread). Printed: median ms per part of a step (forward, backward with the norm
functions, clipped sum, optimizer with noise), the totals' ratio, and the largest difference
between the two models' weights afterwards (same steps, so it should be rounding only).

One process is also its limit: a version that starts threads of its own slows the other's
steps too. Session 22 ran the norm functions on a worker thread; here the worker's OpenMP
team beside the training thread's (more spinning threads than cores) made the base's step
1448 ms (about 700 alone) and printed the change 0.70x, while whole ``local_train`` calls
timed in separate processes showed it slower. Judge such a change by separate processes
(``train_throughput.py``) as well.

    .venv/bin/python benchmarks/dp_step_ab.py --base 3452565 --size 64 --turns 10
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from host import describe  # noqa: E402  (benchmarks/, beside this script)

from common import cpu_runtime  # noqa: E402,F401  (the project's CPU thread settings)
from common.model import build_model  # noqa: E402
from common.training import masked_bce  # noqa: E402

MODULE = "common/dp_grad_sample.py"
PARTS = ("forward", "backward + norm functions", "clipped sum", "optimizer (+ noise)")


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def private_model(dp, x: torch.Tensor, y: torch.Tensor):
    dp.register()
    torch.manual_seed(0)
    model = build_model(norm="group")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=len(x))
    net, opt, _, _ = dp.BookkeepingPrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ghost",
        noise_generator=torch.Generator().manual_seed(0))
    net.train()
    return net, opt


def step(dp, net, opt, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    dp.register()  # this version's norm functions (Opacus keeps one registry)
    xb = x.clone().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    per_image = masked_bce(net(xb), y, per_image=True)
    t1 = time.perf_counter()
    dp.norms_backward(per_image, xb)
    t2 = time.perf_counter()
    dp.clipped_sum(net)
    t3 = time.perf_counter()
    opt.step()
    t4 = time.perf_counter()
    return [1000 * (b - a) for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare this checkout with")
    ap.add_argument("--size", type=int, default=64, help="image size (px)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--per-turn", type=int, default=4)
    args = ap.parse_args()
    try:
        source = subprocess.run(["git", "show", f"{args.base}:{MODULE}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"error: git show {args.base}:{MODULE}: {exc.stderr.strip()}") from None
    x = torch.rand(args.batch, 1, args.size, args.size)
    y = (torch.rand(args.batch, 14) < 0.2).float()
    with tempfile.TemporaryDirectory() as tmp:
        base_file = Path(tmp) / "dp_grad_sample_base.py"
        base_file.write_text(source)
        versions = {args.base: load("dp_base", base_file),
                    "this checkout": load("dp_this", ROOT / MODULE)}
        loops = {name: (dp, *private_model(dp, x, y)) for name, dp in versions.items()}
        rows: dict[str, list[list[float]]] = {name: [] for name in loops}
        names = list(loops)
        for turn in range(args.turns + 1):
            for name in names[turn % 2:] + names[:turn % 2]:  # who goes first alternates
                dp, net, opt = loops[name]
                for k in range(args.per_turn):
                    parts = step(dp, net, opt, x, y)
                    if turn and k:
                        rows[name].append(parts)
                noise = getattr(opt, "_noise", None)
                if noise is not None and noise._thread is not None:
                    noise._thread.join()
    print(f"DP bk step, DenseNet-121 (GroupNorm), {args.size} px, batch {args.batch}, "
          f"{len(rows[names[0]])} steps each, taking turns; median ms ({describe()})")
    totals = {}
    for name, steps in rows.items():
        medians = [statistics.median(s[i] for s in steps) for i in range(len(PARTS))]
        totals[name] = statistics.median(sum(s) for s in steps)
        shown = ", ".join(f"{p} {m:.1f}" for p, m in zip(PARTS, medians, strict=True))
        print(f"  {name:>14}: {shown}; total {totals[name]:.1f}")
    base, this = totals[args.base], totals["this checkout"]
    print(f"  this checkout's step takes {this / base:.3f}x the time of {args.base}'s")
    drift = max(float((a - b).detach().abs().max()) for a, b in zip(
        loops[names[0]][1].parameters(), loops[names[1]][1].parameters(), strict=True))
    print(f"  largest weight difference after the same steps: {drift:.2e}")


if __name__ == "__main__":
    main()
