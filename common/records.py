"""Model weights <-> Flower records. The only module in ``common`` that imports Flower.

Weights travel as an ``ArrayRecord`` of the state dict, optionally in float16
(``transport-dtype``) which halves the bytes; they are cast back to float32 on arrival.
Integer buffers (BatchNorm's ``num_batches_tracked``) always travel as they are.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord


def to_record(state: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    arrays = OrderedDict()
    for key, value in state.items():
        arr = value.detach().cpu().numpy()
        if dtype == "float16" and arr.dtype == np.float32:
            arr = arr.astype(np.float16)
        arrays[key] = arr
    from flwr.app import Array

    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))


def from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    out = OrderedDict()
    for key, arr in record.items():
        a = arr.numpy()
        if a.dtype == np.float16:
            a = a.astype(np.float32)
        out[key] = torch.from_numpy(np.ascontiguousarray(a))
    return out

