"""One round's federated updates: screened and aggregated without holding them all in memory.

The moment a training reply is pulled, ``UpdateStore.add`` checks its arrays are finite,
measures its update norm against the global model, and writes the arrays to a scratch file
on the coordinator's disk; the message is then dropped. When the round's replies are in,
``screen`` applies the leave-one-out median norm rule (it needs every norm, which is why
updates are kept on disk rather than folded into a running sum), and ``aggregate`` runs the
Flower strategy over the accepted updates one group of flat slices at a time (every
strategy here is coordinate-wise or a weighted mean, so slicing changes no result),
reading them back memory-mapped. Server memory is the global model plus one group of each
accepted update (``budget_bytes`` in all): it grows with the model, not with sites x model.

Which Flower code aggregates: FedMedian and FedTrimmedAvg are coordinate-wise, so each key
group goes through the strategy itself. FedAvg, FedProx and FedAdam start from the weighted
mean of the updates: each key group goes through Flower's FedAvg, and the strategy's own
``aggregate_train`` then receives that mean as one reply carrying the total example count,
which for FedAdam applies its server-side Adam step exactly as it would on all replies.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Strategy
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from server.strategy import is_client_dp, quiet_flower

log = logging.getLogger("flwr")

ALIGN = 64


@dataclass
class Rejection:
    round: int
    node: int
    site: str
    reason: str


@dataclass
class SpilledUpdate:
    """An accepted-so-far update: where its arrays are on disk and what it weighs."""

    node: int
    site: str
    norm: float
    examples: float
    path: Path
    layout: dict[str, tuple[int, str, tuple[int, ...]]]  # key -> (offset, dtype, shape)
    norm_bit: int | None = None  # client-side adaptive clipping: 1 if the update's norm was
    # within the clipping norm (Flower's mod reports it; MetricRecord holds no booleans)

    def pieces(self, group: list[tuple[str, int, int]]) -> dict[str, np.ndarray]:
        """Flat slices of this update's arrays, read memory-mapped, named ``key@first``."""
        out = {}
        for key, start, stop in group:
            offset, dt, shape = self.layout[key]
            size = int(np.prod(shape, dtype=np.int64))
            mm = np.memmap(self.path, dtype=np.dtype(dt), mode="r", offset=offset,
                           shape=(size,)) if size else np.zeros(0, np.dtype(dt))
            out[f"{key}@{start}"] = mm[start:stop]
        return out


def whole_arrays(update: SpilledUpdate) -> dict[str, np.ndarray]:
    """Every array of one spilled update, whole (for strategies that need each update)."""
    group = [(k, 0, int(np.prod(shape, dtype=np.int64)))
             for k, (_, _, shape) in update.layout.items()]
    return {k: a.reshape(update.layout[k][2])
            for (k, _, _), a in zip(group, update.pieces(group).values(), strict=True)}


def _reply(arrays: dict[str, np.ndarray], examples: float, node: int,
           norm_bit: int | None = None) -> Message:
    metrics = {"num-examples": examples}
    if norm_bit is not None:
        metrics[KEY_NORM_BIT] = norm_bit
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(np.array(v, order="C"))
                                                     for k, v in arrays.items()}),
                              "metrics": MetricRecord(metrics)}),
                  dst_node_id=0, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node  # the site the update came from
    return msg


class UpdateStore:
    """A round's federated updates, on disk under ``directory`` until ``close``."""

    def __init__(self, directory: Path, reference: dict[str, np.ndarray], *, round: int,
                 sites: dict[int, str]) -> None:
        self.directory = Path(directory)
        shutil.rmtree(self.directory, ignore_errors=True)  # a crashed round's leftovers
        self.directory.mkdir(parents=True)
        self.reference = reference
        self.round = round
        self.sites = sites
        self.updates: list[SpilledUpdate] = []
        self.rejected: list[Rejection] = []

    def _reject(self, node: int, reason: str) -> None:
        r = Rejection(self.round, node, self.sites.get(node, "?"), reason)
        self.rejected.append(r)
        log.warning("round %d: rejected update from node %d (%s): %s", r.round, r.node, r.site,
                    r.reason)

    def add(self, msg: Message) -> None:
        """Check, measure and spill one reply's arrays (fp16 transport is undone here)."""
        node = msg.metadata.src_node_id
        path = self.directory / f"node-{node}.bin"
        layout: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        sq = 0.0
        offset = 0
        with open(path, "wb") as fh:
            for key, arr in msg.content["arrays"].items():
                a = arr.numpy()
                if a.dtype == np.float16:
                    a = a.astype(np.float32)
                if np.issubdtype(a.dtype, np.floating):
                    if not np.isfinite(a).all():
                        fh.close()
                        path.unlink()
                        self._reject(node, "non-finite values")
                        return
                    if key in self.reference:
                        sq += float(((a - self.reference[key]) ** 2).sum())
                pad = -offset % ALIGN
                fh.write(b"\0" * pad)
                offset += pad
                layout[key] = (offset, a.dtype.str, a.shape)
                data = a.tobytes()  # C order, whatever a's layout
                fh.write(data)
                offset += len(data)
        metrics = msg.content["metrics"]
        examples = float(metrics["num-examples"])
        bit = int(metrics[KEY_NORM_BIT]) if KEY_NORM_BIT in metrics else None
        self.updates.append(SpilledUpdate(node, self.sites.get(node, "?"), float(np.sqrt(sq)),
                                          examples, path, layout, bit))

    def screen(self, factor: float) -> list[SpilledUpdate]:
        """Drop updates whose norm is over ``factor`` x the median of the others' norms
        (leave-one-out, so two sites suffice to catch one scaled update)."""
        kept = []
        for i, u in enumerate(self.updates):
            others = [v.norm for j, v in enumerate(self.updates) if j != i]
            if others and u.norm > factor * max(float(np.median(others)), 1e-12):
                self._reject(u.node, f"update norm {u.norm:.3g} is over {factor:g}x the "
                                     f"others' median {float(np.median(others)):.3g}")
                u.path.unlink(missing_ok=True)
                continue
            kept.append(u)
        self.updates = kept
        return kept

    def _groups(self, budget_bytes: int) -> list[list[tuple[str, int, int]]]:
        """Pieces (key, first, last flat element) such that one group of every accepted
        update fits ``budget_bytes``; a tensor bigger than its share is cut into slices."""
        share = max(budget_bytes // len(self.updates), 1)
        groups: list[list[tuple[str, int, int]]] = [[]]
        used = 0
        for key, (_, dt, shape) in self.updates[0].layout.items():
            size, item = int(np.prod(shape, dtype=np.int64)), np.dtype(dt).itemsize
            start = 0
            while True:
                room = (share - used) // item
                if room <= 0 and groups[-1]:
                    groups.append([])
                    used = 0
                    continue
                stop = min(size, start + max(room, 1))
                groups[-1].append((key, start, stop))
                used += (stop - start) * item
                start = stop
                if start >= size:
                    break
        return groups

    def aggregate(self, strategy: Strategy, budget_bytes: int | None = None
                  ) -> dict[str, np.ndarray] | None:
        """The strategy's new global model from the accepted updates, or None if none."""
        if not self.updates:
            return None
        if is_client_dp(strategy):
            # Flower's client-level DP wrappers clip each site's update against the model
            # sent, so they need every update whole (sites x model in memory, this mode
            # only). Each site weighs the same: the noise is calibrated to one site's
            # clipped update, which an example-weighted mean would not bound.
            replies = [_reply(whole_arrays(u), 1.0, u.node, u.norm_bit) for u in self.updates]
            with quiet_flower():
                arrays, _ = strategy.aggregate_train(self.round, replies)
            return None if arrays is None else {k: v.numpy() for k, v in arrays.items()}
        layout = self.updates[0].layout
        if budget_bytes is None:  # one model's worth across all accepted updates
            budget_bytes = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
                               for _, d, s in layout.values())
        coordinate_wise = type(strategy) in (FedMedian, FedTrimmedAvg)
        combiner = strategy if coordinate_wise else FedAvg(min_available_nodes=1,
                                                            min_train_nodes=1)
        flat: dict[str, list[np.ndarray]] = {k: [] for k in layout}
        with quiet_flower():
            for group in self._groups(budget_bytes):
                replies = [_reply(u.pieces(group), u.examples, u.node) for u in self.updates]
                arrays, _ = combiner.aggregate_train(self.round, replies)
                del replies
                if arrays is None:
                    return None
                for key, start, _stop in group:
                    flat[key].append(arrays[f"{key}@{start}"].numpy())
        out = {k: np.concatenate(v).reshape(layout[k][2]) for k, v in flat.items()}
        if coordinate_wise:
            return out
        total = sum(u.examples for u in self.updates)
        with quiet_flower():  # Flower would log "Received 1 results": the mean, not the sites
            arrays, _ = strategy.aggregate_train(self.round, [_reply(out, total, 0)])
        return None if arrays is None else {k: v.numpy() for k, v in arrays.items()}

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        with suppress(OSError):  # the parent too, once no round is left in it
            self.directory.parent.rmdir()
