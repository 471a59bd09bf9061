"""Process-wide settings for running DenseNet-121 on CPUs, applied on import of
``common.model``, before any kernel is built.

**Kernel caches.** oneDNN's convolution kernels are compiled per input shape and kept in two
LRU caches of 1024 entries (oneDNN's primitive cache and PyTorch's ideep cache in front of
it). One batch size of DenseNet-121 fills several hundred entries (120 convolutions; forward,
input and weight gradients), so two or three batch sizes evict each other. DP-SGD's Poisson
batches change size every step: with the default caches nearly every step recompiled its
kernels (the DP rows of ``benchmarks/train_throughput.py``, README Benchmarks, before and
after). ``KERNEL_CACHE_ENTRIES`` keeps the few dozen sizes a run meets; memory grows only with
the sizes met. Both caches read their size when the first kernel is built; an operator's own
setting wins.
"""

from __future__ import annotations

import os

KERNEL_CACHE_ENTRIES = "16384"
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def apply() -> None:
    for name in KERNEL_CACHES:
        os.environ.setdefault(name, KERNEL_CACHE_ENTRIES)
