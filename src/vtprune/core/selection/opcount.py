"""Counting the aten ops a piece of code dispatches: a machine-independent measure of its overhead.

with OpCounter() as ops:
    run()
ops.total, ops.syncs  # all ops, and those that force a host synchronisation
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ops that read a device value back to the host (item/tolist/int(), data-dependent shapes)
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::is_nonzero",
        "aten::masked_select",
        "aten::unique",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::item",
        "aten::nonzero_static",
        "aten::equal",
    }
)


def _is_sync(func, args) -> bool:
    name = func._overloadpacket._qualified_op_name
    if name in SYNC_OPS:
        return True
    if name == "aten::repeat_interleave":  # with a tensor of repeats its output size is data-dependent
        return isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor))
    if name in ("aten::index", "aten::index_put", "aten::index_put_"):  # boolean-mask indexing
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
    return False


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops by name (`counts`), in total (`total`) and the sync-type ones (`syncs`).

    count_tolist: also count `Tensor.tolist()` as a sync (`sync_counts["tolist"]`): it reads a CPU tensor without
    dispatching an op, but synchronises on a GPU."""

    def __init__(self, count_tolist: bool = False) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.sync_counts: Counter = Counter()
        self.count_tolist = count_tolist
        self._tolist = None

    def __enter__(self):
        if self.count_tolist:
            self._tolist, counter, original = torch.Tensor.tolist, self, torch.Tensor.tolist

            def tolist(tensor):
                counter.sync_counts["tolist"] += 1
                return original(tensor)

            torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        if self._tolist is not None:
            torch.Tensor.tolist, self._tolist = self._tolist, None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket._qualified_op_name
        self.counts[name] += 1
        if _is_sync(func, args):
            self.sync_counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_counts.values())


def count_ops(fn, *args, **kwargs) -> OpCounter:
    """Run fn(*args, **kwargs) under an `OpCounter` and return the counter."""
    with OpCounter() as counter:
        fn(*args, **kwargs)
    return counter
