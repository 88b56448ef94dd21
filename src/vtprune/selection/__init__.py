"""Batched selection algorithms: pure tensor functions over a padded batch, no loop over samples, images,
clusters or greedy steps, no host synchronisation; their op counts do not depend on the batch size.

Conventions: inputs padded to (B, V, ...) with valid (B, V) bool; index outputs (B, k) long, sorted ascending
where a set is returned, with the invalid slots documented per function.

| function | signature -> result |
|---|---|
| `debias.fit.auto_trend` | (scores (B,R), valid (B,R), ranks (B,R), axis_start (B,A), axis_length (B,A), padding=None, delta=1.0, iterations=20) -> trend (B,R) float32 |
| `max_min_select` (DivPrune) | (features (P,n,D), valid (P,n), k: int, count (P,)=None, ordered=False) -> indices (P,k) long, kept (P,k) bool |

`opcount.OpCounter` / `opcount.count_ops` count the aten ops a call dispatches (and the sync-type ones).
"""

from ..debias.fit import auto_trend
from .divprune import max_min_select
from .opcount import OpCounter, count_ops

__all__ = ["OpCounter", "auto_trend", "count_ops", "max_min_select"]
