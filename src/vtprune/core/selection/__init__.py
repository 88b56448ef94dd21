"""Batched selection algorithms: pure tensor functions over a padded batch, no loop over samples, images,
clusters or greedy steps, no host synchronisation; their op counts do not depend on the batch size.

Conventions: inputs padded to (B, V, ...) with valid (B, V) bool; index outputs (B, k) long, sorted ascending
where a set is returned, with the invalid slots documented per function. Host facts save ops: most functions
take valid=None where every slot is real and an int where every row has the same count (then no mask is built).

| function | signature -> result |
|---|---|
| `debias.fit.auto_trend` | (scores (B,R), valid (B,R), ranks (B,R), axis_start (B,A), axis_length (B,A), padding=None, delta=1.0, iterations=20) -> trend (B,R) float32 |
| `max_min_select` (DivPrune) | (features (P,n,D), valid (P,n) or None, k: int, count (P,)=None, ordered=False) -> indices (P,k) long, kept (P,k) bool |
| `recycle` (SparseVLM) | (raw (B,V), pruned (B,V), features (B,V,D), n: int, m: int, pruned_counts=None (host list)) -> centres (B,m) long, merged (B,m,D), kept (B,m) bool (None: all, from pruned_counts); static n, m from `recycle_sizes(max pruned)` |
| `dart_select` (DART) | (units (B,N,D), norms (B,N), prompt_positions (B,N), visual_slots (B,R), visual_valid (B,R) or None, text_slots (B,T), text_valid (B,T) or None, claims: int or (B,), pivot_image=4, pivot_text=4, pivot_order="official") -> kept (B,R) bool |
| `dart_claims`, `top_pivots`, `python_set_order` (DART) | its parts: the claims loop over the pivots, the pivots, CPython's set order of (B,<=8) keys |
| `visionzip_select` (VisionZip) | (scores (P,L), valid (P,L) or None, keys (P,L,d), features (P,L,D), patches: int or (P,), contextual: int or (P,), max_patches: int, max_contextual: int, padding=None, padding_fraction=None) -> dominant (P,Kd), dominant_ok, targets (P,Kc), merged (P,Kc,D), targets_ok |
| `information`, `borda`, `carve_merge` (TokenCarve) | valid (B,R) or None; information(states (B,R,D), valid) -> (B,R); borda(attention (B,R), information (B,R), valid, av_weight=0.5) -> fused (B,R); carve_merge(fused (B,R), states (B,R,D), valid, keep: int or (B,), max_keep: int) -> indices (B,K), kept (B,K), values (B,K,D) float32 |
| `illava_merge` (iLLaVA) | (scores (B,R), valid (B,R) or None, values (B,R,D), keep: int or (B,), max_keep: int, padding=None, padding_fraction=None) -> indices (B,K), kept (B,K), new values (B,K,D) |
| `rank_order` (shared rule) | (scores (B,R), valid (B,R) or None, padding=None, padding_fraction=None) -> order (B,R) best first, padding then invalid last |
| `pack_rows` | (fields [(values (P,k,...), fill)], counts [P] host, row [P] host, rows) -> packed [(rows, width, ...)], totals [rows]: each problem's first counts[p] entries placed in its row after the earlier problems' |
| `mask_to_indices` | (mask (B,R), k: int) -> indices (B,k) ascending (R when fewer), kept (B,k) |
| `density_peak_clusters` (SparseVLM) | (features (P,n,C), valid (P,n) or None, m: int, clusters (P,) or int, rows (P,1)=None) -> centres (P,m), centre_ok (P,m) or None (every slot real), assignment (P,n) |
| `recycle_counts`, `merge_candidates` (SparseVLM) | recycle's parts: (pruned_counts host list) -> candidates, clusters (int or (B,)); (values (B,n,D) best first, candidates, clusters, n, m, rows=None) -> centres (B,m) into n, merged (B,m,D), kept (B,m) or None |

`opcount.OpCounter` / `opcount.count_ops` count the aten ops a call dispatches (and the sync-type ones).
"""

from ...debias.fit import auto_trend
from .common import mask_to_indices, pack_rows, rank_order
from .dart import dart_claims, dart_select, python_set_order, top_pivots
from .divprune import max_min_select
from .illava import illava_merge
from .opcount import OpCounter, count_ops
from .sparsevlm import density_peak_clusters, merge_candidates, recycle, recycle_counts, recycle_sizes
from .tokencarve import borda, carve_merge, information
from .visionzip import visionzip_select

__all__ = [
    "OpCounter",
    "auto_trend",
    "borda",
    "carve_merge",
    "count_ops",
    "illava_merge",
    "information",
    "dart_claims",
    "dart_select",
    "python_set_order",
    "top_pivots",
    "density_peak_clusters",
    "mask_to_indices",
    "max_min_select",
    "merge_candidates",
    "pack_rows",
    "rank_order",
    "recycle",
    "recycle_counts",
    "recycle_sizes",
    "visionzip_select",
]
