"""`debias.fit.auto_trend` (the batched "auto" fit) equals `Debias._auto_trends` sample by sample, with a
batch-independent op count and no host synchronisation."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from vtprune.adapters.base import VisualSegment
from vtprune.debias import Debias
from vtprune.debias.fit import auto_trend
from vtprune.core.selection.opcount import count_ops


def make_batch(seed: int, batch: int, max_axes: int = 3, max_length: int = 24, ties: bool = False):
    """Per-sample lists (scores, ranks, axes, padding) of a random batch (a random subset of each sample's visual
    tokens present, as after a cut) and the same batch padded to tensors."""
    generator = torch.Generator().manual_seed(seed)

    def randint(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    scores, ranks, axes, padding = [], [], [], []
    for _ in range(batch):
        lengths = [randint(1, max_length) for _ in range(randint(1, max_axes))]
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
        axes.append([VisualSegment(offset=s, length=n, grid=(1, n), image_index=0) for s, n in zip(starts, lengths)])
        total = sum(lengths)
        present = torch.sort(torch.randperm(total, generator=generator)[: randint(1, total)]).values
        count = len(present)
        trend = torch.exp(torch.rand(1, generator=generator) * 3 * present.double() / total)
        noise = torch.rand(count, generator=generator, dtype=torch.float64)
        values = (torch.randint(0, 3, (count,), generator=generator).double() if ties else noise) * trend
        values = torch.where(torch.rand(count, generator=generator) < 0.05, -values, values)  # some unusable points
        scores.append(values.float())
        ranks.append(present)
        padding.append(torch.rand(count, generator=generator) < 0.2 if randint(0, 1) else None)
    width = max(len(r) for r in ranks)
    num_axes = max(len(a) for a in axes)
    padded = {
        "scores": torch.zeros(batch, width), "valid": torch.zeros(batch, width, dtype=torch.bool),
        "ranks": torch.zeros(batch, width, dtype=torch.long), "padding": torch.zeros(batch, width, dtype=torch.bool),
        "axis_start": torch.zeros(batch, num_axes, dtype=torch.long),
        "axis_length": torch.zeros(batch, num_axes, dtype=torch.long),
    }
    for b in range(batch):
        count = len(ranks[b])
        padded["scores"][b, :count] = scores[b]
        padded["valid"][b, :count] = True
        padded["ranks"][b, :count] = ranks[b]
        padded["ranks"][b, count:] = 10_000 + b  # garbage in invalid slots must not matter
        if padding[b] is not None:
            padded["padding"][b, :count] = padding[b]
        padded["axis_start"][b, : len(axes[b])] = torch.tensor([a.offset for a in axes[b]])
        padded["axis_length"][b, : len(axes[b])] = torch.tensor([a.length for a in axes[b]])
    return (scores, ranks, axes, padding), padded


def check_equal(seed, batch, **kwargs):
    (scores, ranks, axes, padding), padded = make_batch(seed, batch, **kwargs)
    expected = Debias._auto_trends([s.float() for s in scores], ranks, axes, padding)
    trend = auto_trend(**padded)
    for b, reference in enumerate(expected):
        count = len(reference)
        torch.testing.assert_close(trend[b, :count], reference, rtol=1e-5, atol=1e-6)
        assert (trend[b, count:] == 1).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), ties=st.booleans())
def test_auto_trend_equals_per_sample_fit(seed, batch, ties):
    check_equal(seed, batch, ties=ties)


def test_auto_trend_long_axes():
    check_equal(0, 3, max_axes=2, max_length=600)


def test_auto_trend_op_count_is_batch_independent_and_sync_free():
    counts = []
    for batch in (1, 8):
        _, padded = make_batch(1, batch, max_axes=2, max_length=300)
        counter = count_ops(auto_trend, **padded)
        assert counter.syncs == 0, counter.sync_counts
        counts.append(counter.total)
    assert counts[0] == counts[1]
