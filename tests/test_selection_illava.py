"""`selection.illava_merge` equals iLLaVA's per-sample language-model stage (the loop body of `ILLaVA.select`,
transcribed below) on every sample of a padded batch; its op count is batch independent and sync free."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from vtprune.core.selection import count_ops, illava_merge
from vtprune.core.stages import rank_order


def reference(scores, values, keep, padding, share):
    """ILLaVA.select for one sample: (sorted kept indices, their values)."""
    ranks = torch.arange(len(scores))
    order = rank_order(scores, padding, share)
    if len(ranks) == keep:
        return torch.sort(ranks).values, values
    group = order[keep - 1:]
    weights = torch.arange(1, len(group) + 1, dtype=torch.float32)
    if padding is not None:
        weights = torch.where(padding[group], 0.0, weights).index_fill_(0, torch.zeros(1, dtype=torch.long), 1.0)
    destination = (weights[:, None] * values[group].float()).sum(dim=0) / weights.sum()
    kept_order = order[:keep]
    kept = ranks[kept_order]
    sort = torch.argsort(kept)
    new_values = values[kept_order].clone()
    new_values[-1] = destination.to(values.dtype)
    return kept[sort], new_values[sort]


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), ties=st.booleans(), padded=st.booleans())
def test_illava_merge_equals_per_sample(seed, batch, ties, padded):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (batch,), generator=generator)
    size = int(lengths.max())
    valid = torch.arange(size) < lengths[:, None]
    keeps = [int(torch.randint(1, int(n) + 1, (1,), generator=generator)) for n in lengths]
    scores = torch.rand(batch, size, generator=generator)
    scores = (scores * 3).floor() if ties else scores
    values = torch.randn(batch, size, 5, generator=generator)
    padding = (torch.rand(batch, size, generator=generator) < 0.3) & valid if padded else None
    if padded:
        padding[0] = valid[0]  # a sample with no content
    share = torch.rand(batch, size, generator=generator) if padded else None
    max_keep = max(keeps)
    indices, kept, new_values = illava_merge(scores, valid, values, torch.tensor(keeps), max_keep, padding, share)
    for b, (length, keep) in enumerate(zip(lengths.tolist(), keeps)):
        expected_indices, expected_values = reference(
            scores[b, :length], values[b, :length], keep, None if padding is None else padding[b, :length],
            None if share is None else share[b, :length])
        assert indices[b, :keep].tolist() == expected_indices.tolist()
        assert kept[b].tolist() == [True] * keep + [False] * (max_keep - keep)
        assert (indices[b, keep:] == size).all()
        torch.testing.assert_close(new_values[b, :keep], expected_values)


def test_illava_op_count_is_batch_independent_and_sync_free():
    totals = []
    for batch in (1, 8):
        generator = torch.Generator().manual_seed(0)
        scores, values = torch.rand(batch, 576, generator=generator), torch.randn(batch, 576, 32, generator=generator)
        counter = count_ops(illava_merge, scores, torch.ones(batch, 576, dtype=torch.bool), values, 128, 128)
        assert counter.syncs == 0, counter.sync_counts
        totals.append(counter.total)
    assert totals[0] == totals[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), keep=st.integers(1, 20), ties=st.booleans())
def test_full_rows_with_one_keep_equal_the_masked_form(seed, batch, keep, ties):
    """valid=None and an int keep (host facts, no padding): what the all-True mask and the per-row keeps give."""
    generator = torch.Generator().manual_seed(seed)
    scores, values = torch.rand(batch, 20, generator=generator), torch.randn(batch, 20, 6, generator=generator)
    if ties:
        scores = (scores * 3).floor()
    expected = illava_merge(scores, torch.ones(batch, 20, dtype=torch.bool), values, torch.full((batch,), keep), keep)
    for got, want in zip(illava_merge(scores, None, values, keep, keep), expected):
        assert torch.equal(got, want)
