"""Hostile input at the site: peak memory of `site check` on decompression bombs, and the
happy path's speed before and after the hostile-input guards, measured in one run.

(a) Bombs: a 12000 x 12000 and a 30000 x 30000 deflated DICOM (a few hundred KB to 2 MB on
disk) and a 12000 x 12000 zero PNG, each beside two good images, each checked by its own
`fedcxr site check` process; prints the peak RSS of that process (target: under 1 GiB) and
the problem code each bomb got.

(b) Happy path: `site check` and `site prepare` (64 px) on the same synthetic DICOM site, with
this tree and with a git revision from before the guards (default: the parent of the commit
that added them), interleaved, best of N; prints images/s, CPU ms per image and the ratios.

(c) Each guard's own cost per file, timed alone, against decoding the file: on a shared
machine (b) moves by +-10% between runs, (c) says what the guards can possibly cost.

    .venv/bin/python benchmarks/hostile_input.py [--images 200] [--tries 3] [--before REV]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_hostile_input import canonical_site, deflated_bomb  # noqa: E402

TIMED = """
import resource, sys, time
from pathlib import Path
from common.imaging import ImagingOptions
from common.site import SiteSource, check, run_prepare
site, cache, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
opts = ImagingOptions(size=64)

def cpu():
    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))

start, cpu0 = time.perf_counter(), cpu()
if what == "check":
    n = check(SiteSource(site), opts)["usable_images"]
else:
    n = run_prepare(SiteSource(site), opts, cache)[1]["decoded"]
print(n / (time.perf_counter() - start), 1000 * (cpu() - cpu0) / n)
"""


PEAK = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_of(cmd: list[str]) -> float:
    """Run ``cmd`` under a fresh parent; the peak RSS (GiB) of the largest of its processes
    (the parent's RUSAGE_CHILDREN counts that run alone)."""
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip()) / 2**20


def bombs(root: Path) -> None:
    from PIL import Image

    print("(a) site check on decompression bombs (each in its own process, measured alone)")
    print(f"{'bomb':<34} {'on disk':>10} {'declares':>10} {'peak RSS':>10}  code")
    cases = []
    for side in (12000, 30000):
        d = root / f"dcm{side}"
        cases.append((f"deflated DICOM {side} x {side}", deflated_bomb(d / "bomb.dcm", side),
                      side * side * 2, d))
    d = root / "png12000"
    d.mkdir(parents=True)
    Image.new("L", (12000, 12000)).save(d / "bomb.png")
    cases.append(("zero PNG 12000 x 12000", d / "bomb.png", 12000 * 12000, d))
    d = root / "baseline"
    d.mkdir()
    (d / "none").write_bytes(b"")
    cases.insert(0, ("no bomb (baseline: 2 good images)", d / "none", 0, d))
    for name, path, declared, d in cases:
        canonical_site(d, [path.name] if declared else [])
        gib = peak_rss_of([sys.executable, "-m", "cli.main", "site", "check", str(d),
                                "--out", str(d / "out")])
        report = (d / "out" / "check.json").read_text()
        code = "too_large" if "too_large" in report else "-" if not declared else "?"
        print(f"{name:<34} {path.stat().st_size / 2**20:>8.2f}MB {declared / 2**30:>8.2f}GB "
              f"{gib:>8.2f}GB  {code}")


def happy_path(root: Path, images: int, tries: int, before: str) -> None:
    from common.synth import SynthOptions, generate

    generate(root / "cohort", SynthOptions(sites=2, held_out=1, images_per_site=images,
                                           size=512))
    site = root / "cohort" / "site2"  # held-out: DICOM, MONOCHROME1
    old = root / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(old), before], cwd=ROOT,
                   check=True, capture_output=True)
    try:
        trees = {"before": old, "after": ROOT}
        best: dict[tuple[str, str], float] = {}
        cpu: dict[tuple[str, str], float] = {}
        for k in range(tries):
            for what in ("check", "prepare"):
                for label, tree in trees.items():
                    cache = root / f"cache-{label}-{what}-{k}"
                    out = subprocess.run(
                        [sys.executable, "-c", TIMED, str(site), str(cache), what],
                        cwd=tree, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(tree)}, check=True)
                    rate, ms = map(float, out.stdout.strip().splitlines()[-1].split())
                    best[label, what] = max(best.get((label, what), 0.0), rate)
                    cpu[label, what] = min(cpu.get((label, what), float("inf")), ms)
        print(f"\n(b) happy path, {images} DICOMs at 64 px, best of {tries} "
              f"(before = {before}), load {os.getloadavg()[0]:.2f}")
        print("wall: images/s (best); CPU: ms of CPU per image, all processes (least: the "
              "steadier figure on a shared machine)")
        print(f"{'step':<10} {'before img/s':>13} {'after img/s':>12} {'after/before':>13} "
              f"{'before CPU ms':>14} {'after CPU ms':>13} {'after/before':>13}")
        for what in ("check", "prepare"):
            b, a = best["before", what], best["after", what]
            cb, ca = cpu["before", what], cpu["after", what]
            print(f"{what:<10} {b:>13.1f} {a:>12.1f} {a / b:>12.2f}x {cb:>14.2f} {ca:>13.2f} "
                  f"{ca / cb:>12.2f}x")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT,
                       capture_output=True)


def guard_costs(root: Path) -> None:
    """(c) What each guard adds per file, timed alone (CPU, least of 5) on the same DICOMs,
    against decoding them: the whole-run ratios above move by more than this between runs
    on a shared machine, these do not."""
    import time

    import numpy as np
    import pydicom

    from common.cache import content_hash
    from common.imaging import (
        ImagingOptions,
        _check_deflated,
        _int_field,
        _is_blank,
        decode,
        regular_file,
    )
    from common.site import SiteSource

    options = ImagingOptions(size=64)
    paths = [Path(p) for p in SiteSource(root / "cohort" / "site2").read().rows["path"]]
    ds = pydicom.dcmread(paths[0])
    image = ds.pixel_array.astype(np.float32)

    def cost(fn) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for path in paths:
                fn(path)
            best = min(best, (time.process_time() - start) / len(paths) * 1000)
        return best

    base = cost(lambda p: decode(p, options))
    steps = {
        "regular file (stat)": cost(regular_file),
        "deflate pre-check": cost(lambda p: _check_deflated(p, options)),
        "header whole numbers": cost(lambda _: [_int_field(ds, k, 1) for k in (
            "NumberOfFrames", "SamplesPerPixel", "Rows", "Columns", "BitsAllocated")]),
        "blank check": cost(lambda _: _is_blank(image)),
        "content hash (XXH3-128)": cost(lambda p: content_hash(str(p))),
    }
    print(f"\n(c) the guards' own cost per file, vs decode() at {base:.2f} ms CPU (which "
          "includes them)")
    for name, ms in steps.items():
        print(f"{name:<26} {ms:>7.3f} ms  {ms / base:>6.1%}")
    total = sum(steps.values())
    print(f"{'all of them':<26} {total:>7.3f} ms  {total / base:>6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--before", default="682ccd8",
                    help="git revision without the guards (default: before issue #18)")
    ap.add_argument("--skip-bombs", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_bombs:
            bombs(Path(tmp) / "bombs")
        happy_path(Path(tmp), args.images, args.tries, args.before)
        guard_costs(Path(tmp))


if __name__ == "__main__":
    main()
