"""Federation overhead: Flower simulation vs the same local training without Flower, bytes
per client per round (fp32 vs fp16 transport), and server memory for aggregation.

    .venv/bin/python benchmarks/federation_overhead.py [--rounds 2 --more-rounds 6 --images 80]

Workload: synthetic cohort of 3 training + 1 held-out site, N images each, 32 px, DenseNet-121,
both arms (federated + single-site) every round, 1 local epoch. "Direct" runs exactly the
client-side work of the protocol (two local_train + validation per site per round, then one
validation of the global model per site) in one process with no Flower at all.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from cli.simulate import simulate
from common.data import split_datasets
from common.model import build_model
from common.records import pack, to_record
from common.site import SiteSource, ensure_cache
from common.synth import SynthOptions, generate
from common.training import TrainConfig, local_train, validate


def direct(cohort: Path, rounds: int, size: int) -> tuple[float, list[float]]:
    import tomllib

    sites = [s for s in tomllib.loads((cohort / "cohort.toml").read_text())["site"]
             if s["role"] == "train"]
    data = [split_datasets(ensure_cache(SiteSource(cohort / s["path"]), size)) for s in sites]
    start = time.perf_counter()
    torch.set_num_threads(2)
    per_round = []
    for rnd in range(1, rounds + 1):
        began = time.perf_counter()
        for split in data:
            for _arm in ("federated", "single"):
                m = build_model()
                local_train(m, split["train"], TrainConfig(batch_size=16, seed=rnd))
                validate(m, split["val"])
        for split in data:
            validate(build_model(), split["val"])
        per_round.append(time.perf_counter() - began)
    return time.perf_counter() - start, per_round


def round_seconds(run_dir: Path) -> list[float]:
    """The ServerApp's own wall time of each round (first message to checkpoint written)."""
    import json

    results = json.loads((run_dir / "results.json").read_text())
    fed = next(a for a in results["arms"] if a["name"] == "federated")
    return [h["seconds"] for h in fed["history"]]


def aggregation_memory(k: int, strategy_name: str) -> float:
    """Peak MiB allocated (tracemalloc) by the server's round path for k training sites:
    each reply arrives (as ``stream_replies`` hands them over, one at a time), is checked,
    measured and spilled by ``UpdateStore``, then screening and the strategy's aggregation.
    The global model (held by the server anyway) is allocated before tracing starts."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg, FedMedian
    from flwr.supercore.task_identity import TaskIdentity

    from server.updates import UpdateStore

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    state = build_model().state_dict()
    ref = pack(state)
    strategy = {"fedavg": FedAvg, "fedmedian": FedMedian}[strategy_name](min_available_nodes=1)
    with tempfile.TemporaryDirectory() as tmp:
        gc.collect()
        tracemalloc.start()
        store = UpdateStore(Path(tmp) / "round", ref, round=1, sites={})
        for i in range(k):
            msg = Message(RecordDict({"arrays": to_record(state),
                                      "metrics": MetricRecord({"num-examples": 10})}),
                          dst_node_id=0, message_type="train")
            msg.metadata.__dict__["_src_node_id"] = i
            store.add(msg)
            del msg
        store.screen(10.0)
        new = store.aggregate(strategy)
        assert new is not None and {k2: v.shape for k2, v in new.items()} == {
            k2: v.shape for k2, v in ref.items()}
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        store.close()
    return peak / 2**20


def objects_per_model() -> tuple[int, int]:
    """Flower objects (one HTTP request each in deployment) in one trained-looking
    DenseNet-121: one array per tensor vs the packed record fedcxr sends."""
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    torch.manual_seed(0)
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v
             for k, v in build_model().state_dict().items()}  # distinct, like after training
    per_tensor = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    return (len(get_all_nested_objects(per_tensor)),
            len(get_all_nested_objects(to_record(state))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--more-rounds", type=int, default=6,
                    help="a second, longer run: the difference is the cost per round")
    ap.add_argument("--images", type=int, default=80)
    args = ap.parse_args()
    state = build_model().state_dict()
    b32, b16 = to_record(state).count_bytes(), to_record(state, "float16").count_bytes()
    print(f"bytes per client per round per arm: fp32 {b32 / 2**20:.1f} MiB, fp16 "
          f"{b16 / 2**20:.1f} MiB ({b16 / b32:.2f}x); each training site receives and sends "
          "two models per round (both arms)")
    per_tensor, packed = objects_per_model()
    print(f"Flower objects per model: one array per tensor {per_tensor}, packed {packed}")
    model_mib = b32 / 2**20
    for name in ("fedavg", "fedmedian"):
        peaks = {k: aggregation_memory(k, name) for k in (3, 10, 20)}
        print(f"server round peak ({name}, replies streamed + spilled): " + ", ".join(
            f"{k} sites {p:.0f} MiB ({p / model_mib:.1f} model sizes)" for k, p in peaks.items())
            + f"; 20 vs 3 sites {peaks[20] / peaks[3]:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "c", SynthOptions(sites=4, held_out=1, images_per_site=args.images,
                                         size=64, seed=1))
        for s in ("site1", "site2", "site3", "site4"):
            ensure_cache(SiteSource(tmp / "c" / s), 32)
        flower, plain, flower_rounds, plain_rounds = {}, {}, {}, {}
        for rounds in sorted({args.rounds, args.more_rounds}):
            start = time.perf_counter()
            code = simulate(tmp / "c" / "cohort.toml",
                            {"num-rounds": rounds, "image-size": 32,
                             "out-dir": str(tmp / "runs"), "run-name": f"r{rounds}"},
                            quiet=True)
            flower[rounds] = time.perf_counter() - start
            assert code == 0
            flower_rounds[rounds] = round_seconds(tmp / "runs" / f"r{rounds}")
            plain[rounds], plain_rounds[rounds] = direct(tmp / "c", rounds, 32)
            print(f"{rounds} rounds, 3 training sites x {args.images} images at 32 px: Flower "
                  f"simulation {flower[rounds]:.1f} s (start-up, discovery, thresholds, "
                  f"external validation and report included) vs direct {plain[rounds]:.1f} s "
                  f"-> {flower[rounds] / plain[rounds]:.2f}x")
    a, b = sorted(flower)
    if a != b:
        per_flower = (flower[b] - flower[a]) / (b - a)
        per_plain = (plain[b] - plain[a]) / (b - a)
        print(f"each further round, from the two runs' totals: Flower {per_flower:.1f} s vs "
              f"direct {per_plain:.1f} s -> {per_flower / per_plain:.2f}x; fixed cost of a run "
              f"{flower[a] - a * per_flower:.1f} s")
    # Rounds 2.. of the longer run, timed inside each: the ServerApp's round (train exchange
    # with validation of the previous global model, screening, aggregation, checkpoint) vs
    # the same client work done directly. Round 1 has no previous global model to validate.
    fr, pr = flower_rounds[b][1:], plain_rounds[b][1:]
    if fr:
        f_mean, p_mean = float(np.mean(fr)), float(np.mean(pr))
        print(f"rounds 2-{b}, each timed inside its run: Flower {f_mean:.2f} s per round "
              f"(server's own clock: {', '.join(f'{s:.1f}' for s in fr)}) vs direct "
              f"{p_mean:.2f} s -> {f_mean / p_mean:.2f}x (target <= 1.10x)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
