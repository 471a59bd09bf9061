"""Model weights <-> Flower records. The only module in ``common`` that imports Flower.

Weights travel packed: every floating-point tensor of the state dict, in state-dict order, in
one flat array (``float``; float16 when ``transport-dtype`` is float16, which halves the
bytes), and every integer buffer (BatchNorm's ``num_batches_tracked``) in another (``int``).
Why not one array per tensor:
Flower moves each array of a record as its own object, one HTTP request each through TLS and
node authentication; a trained DenseNet-121 was 1,215 objects (benchmarks/
federation_overhead.py prints it), and on a busy coordinator those requests, not the bytes,
were the cost. Packed, a model is 10 objects. Both ends build the same DenseNet-121,
so the receiver unpacks against its own state dict (``template``); a size mismatch is an
error that says so. Every strategy here is element-wise (mean, median, trimmed mean, Adam),
so aggregating packed arrays is aggregating the tensors.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord

from common.errors import MessageRejected

if TYPE_CHECKING:
    import torch

FLOAT, INT = "float", "int"
# Integer buffers may arrive averaged (a strategy's mean of step counters); unpack rounds them.
_DTYPES = {FLOAT: ("float32", "float16"), INT: ("int64", "int32", "float32", "float64")}


def _np(value) -> np.ndarray:
    # torch is imported only where tensors exist (a site); the ServerApp holds numpy arrays
    # and never imports it (server.model_files).
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def pack(state: Mapping, dtype: str = "float32") -> OrderedDict[str, np.ndarray]:
    """The state dict as {"float": flat values, "int": flat integer buffers}."""
    arrays = [_np(v) for v in state.values()]
    floats = [a.ravel() for a in arrays if np.issubdtype(a.dtype, np.floating)]
    ints = [a.ravel() for a in arrays if not np.issubdtype(a.dtype, np.floating)]
    out = OrderedDict()
    out[FLOAT] = (np.concatenate(floats) if floats else np.zeros(0)).astype(
        np.float16 if dtype == "float16" else np.float32)
    if ints:
        out[INT] = np.concatenate(ints).astype(np.int64)
    return out


def unpack(packed: Mapping[str, np.ndarray], template: Mapping) -> OrderedDict[str, np.ndarray]:
    """Packed arrays back into a state dict shaped and typed like ``template`` (float values
    as float32, integer buffers rounded back to integers after averaging)."""
    out = OrderedDict()
    offsets = {FLOAT: 0, INT: 0}
    sources = {k: np.asarray(packed[k]).ravel() for k in (FLOAT, INT) if k in packed}
    for key, value in template.items():
        like = _np(value)
        kind = FLOAT if np.issubdtype(like.dtype, np.floating) else INT
        start, size = offsets[kind], like.size
        src = sources.get(kind, np.zeros(0))
        if start + size > src.size:
            raise ValueError(f"the weights received have {src.size} {kind} values, fewer than "
                             f"this node's DenseNet-121 needs at {key!r}: the sender used a "
                             "different model (norm, image channels or label count)")
        part = src[start:start + size]
        out[key] = (part.astype(np.float32) if kind == FLOAT
                    else np.rint(part).astype(like.dtype)).reshape(like.shape)
        offsets[kind] = start + size
    for kind, src in sources.items():
        if offsets[kind] != src.size:
            raise ValueError(f"the weights received have {src.size} {kind} values, this "
                             f"node's DenseNet-121 has {offsets[kind]}: the sender used a "
                             "different model (norm, image channels or label count)")
    return out


def to_record(state: Mapping, dtype: str = "float32") -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in pack(state, dtype).items()))


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def check_record(record: ArrayRecord, template: Mapping) -> None:
    """Weights from the wire, checked against this node's own model before any is loaded:
    only the packed names, their dtypes, exactly the element counts the model needs (from
    the arrays' headers, before their bytes are turned into numbers), all finite."""
    if not isinstance(record, ArrayRecord):
        raise MessageRejected("the weights are not an array record")
    extra = sorted(set(record) - set(_DTYPES))
    if extra or FLOAT not in record:
        raise MessageRejected(f"weights named {sorted(record)[:4]}; this node takes "
                              f"{FLOAT!r} (and {INT!r}) packed arrays only")
    need = {FLOAT: 0, INT: 0}
    for value in template.values():
        like = _np(value)
        need[FLOAT if np.issubdtype(like.dtype, np.floating) else INT] += like.size
    for key, array in record.items():
        if array.dtype not in _DTYPES[key]:
            raise MessageRejected(f"weights {key!r} have dtype {array.dtype!r}; this node takes "
                                  f"{' or '.join(_DTYPES[key])}")
        count = int(np.prod(array.shape)) if array.shape else 1
        if count != need[key]:
            raise MessageRejected(f"weights {key!r} have {count} values; this node's model has "
                                  f"{need[key]} (a different model: norm, image channels or "
                                  "label count)")
    if need[INT] and INT not in record:
        raise MessageRejected(f"weights lack {INT!r} (this node's model has integer buffers)")
    try:
        values = {key: array.numpy() for key, array in record.items()}
    except Exception as exc:  # noqa: BLE001 - bytes that do not fill the declared shape
        raise MessageRejected(f"the weights' bytes do not match their header ({exc})") from exc
    if not all(np.isfinite(v).all() for v in values.values()):
        raise MessageRejected("the weights hold nan or inf values")


def from_record(record: ArrayRecord, template: Mapping) -> OrderedDict[str, torch.Tensor]:
    import torch

    check_record(record, template)
    return OrderedDict((k, torch.from_numpy(v))  # unpack's arrays are fresh copies already
                       for k, v in unpack(record_arrays(record), template).items())
