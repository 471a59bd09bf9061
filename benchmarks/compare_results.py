"""Compare two results.json files value by value (floats to a relative 1e-9), ignoring
provenance: how a refactor is shown to change no result.

    .venv/bin/python benchmarks/compare_results.py BEFORE/results.json AFTER/results.json

Prints the number of differences and the first 30 (path, before vs after).
"""

from __future__ import annotations

import argparse
import json
import math


def differences(a, b, path: str = "") -> list[tuple[str, str]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if not path and key in ("provenance", "schema_version"):
                continue
            if key not in a or key not in b:
                out.append((f"{path}/{key}", "missing on one side"))
            else:
                out += differences(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path, f"length {len(a)} vs {len(b)}")]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else [(path, f"{a} vs {b}")]
    return [] if a == b else [(path, f"{a!r} vs {b!r}")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    args = ap.parse_args()
    with open(args.before) as fa, open(args.after) as fb:
        found = differences(json.load(fa), json.load(fb))
    print(f"{len(found)} differences")
    for where, what in found[:30]:
        print(f"{where}: {what}")


if __name__ == "__main__":
    main()
