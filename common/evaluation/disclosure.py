"""Small-cell control for the counts a site releases exactly (no noise): no released count
or rate rests on fewer than ``min-cell`` images (node config, default 10).

Validation ROC counts are cumulative counts on a 1001-point threshold grid; on a split of a
few images each step of them is one image's score and label. ``merge_roc_cells`` keeps the
grid but merges adjacent score bins, from the top, until every released bin holds at least
``min_cell`` images: the cumulative counts then change only at the merged bins' lower edges
(coarser operating points; the totals, and so the pooled counts' meaning, are unchanged). A
split with fewer than ``min_cell`` known images releases no counts for that label (zeros, as
an unannotated label does) and no AUC.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MIN_CELL = 10


def merge_roc_cells(pos_ge: np.ndarray, neg_ge: np.ndarray, min_cell: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (pos_ge, neg_ge) whose every released bin has >= ``min_cell`` images."""
    pos_ge, neg_ge = np.asarray(pos_ge, dtype=np.int64), np.asarray(neg_ge, dtype=np.int64)
    total = int(pos_ge[0] + neg_ge[0])
    if total < min_cell:
        return np.zeros_like(pos_ge), np.zeros_like(neg_ge)
    both = pos_ge + neg_ge
    edges = []  # grid indices where a released bin starts (its lower edge), top down
    top = len(both)  # the current bin is [k, top)
    for k in range(len(both) - 1, -1, -1):
        above = both[top] if top < len(both) else 0
        if both[k] - above >= min_cell:
            edges.append(k)
            top = k
    if not edges or edges[-1] != 0:
        # the lowest images do not fill a bin on their own: they join the bin above
        if edges:
            edges[-1] = 0
        else:
            edges = [0]
    keep = np.zeros(len(both), dtype=bool)
    keep[edges] = True
    # cumulative counts at each grid point = counts at the nearest released edge at or above
    idx = np.where(keep, np.arange(len(both)), len(both))
    nearest = np.minimum.accumulate(idx[::-1])[::-1]
    pos_ext, neg_ext = np.append(pos_ge, 0), np.append(neg_ge, 0)
    return pos_ext[nearest], neg_ext[nearest]


def released_bins(pos_ge: np.ndarray, neg_ge: np.ndarray) -> list[int]:
    """Images in each released bin (for checks): the non-zero steps of the counts."""
    both = np.append(np.asarray(pos_ge) + np.asarray(neg_ge), 0)
    steps = both[:-1] - both[1:]
    return [int(s) for s in steps if s]
