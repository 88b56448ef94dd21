"""`selection.recycle` equals SparseVLM's per-sample recycling (candidates, `density_peak_clusters`, cluster
means) on every sample of a padded batch, with a batch-independent op count and no host synchronisation."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from vtprune.methods.sparsevlm import RECYCLE_SHARE, density_peak_clusters
from vtprune.core.selection import count_ops, recycle, recycle_sizes
from vtprune.core.stages import member


def reference(raw, kept, features):
    """SparseVLM.select's recycling for one sample: (centre indices, merged means), or None."""
    num_pruned = len(raw) - len(kept)
    if num_pruned == 0:
        return None
    pruned = ~member(torch.arange(len(raw)), kept)
    order = torch.argsort(torch.where(pruned, raw.double(), float("-inf")), descending=True, stable=True)
    candidates = order[: min(num_pruned, int(num_pruned * RECYCLE_SHARE) + 1)]
    values = features[candidates].float()
    centres, assignment = density_peak_clusters(values, len(candidates) // 10 + 1)
    members = torch.zeros(len(candidates), len(centres))
    members.scatter_(1, assignment[:, None], 1.0)
    merged = (members.T @ values) / members.sum(dim=0)[:, None]
    return candidates[centres], merged


def make_batch(seed, batch, lengths, ties, width=6, min_pruned=0):
    generator = torch.Generator().manual_seed(seed)
    size = max(lengths)
    raw = torch.rand(batch, size, generator=generator)
    if ties:
        raw = (raw * 4).floor()
        palette = torch.randn(5, width, generator=generator)
        features = palette[torch.randint(0, 5, (batch, size), generator=generator)]
    else:
        features = torch.randn(batch, size, width, generator=generator)
    kept_sets, pruned = [], torch.zeros(batch, size, dtype=torch.bool)
    for b, length in enumerate(lengths):
        keep = int(torch.randint(1, length - min_pruned + 1, (1,), generator=generator))
        kept_sets.append(torch.randperm(length, generator=generator)[:keep])
        pruned[b, :length] = ~member(torch.arange(length), kept_sets[-1])
    return raw, features, kept_sets, pruned


def check(seed, lengths, ties, min_pruned=0):
    batch = len(lengths)
    raw, features, kept_sets, pruned = make_batch(seed, batch, lengths, ties, min_pruned=min_pruned)
    n, m = recycle_sizes(int(pruned.sum(dim=1).max()))
    if n == 0:
        return
    centres, merged, kept = recycle(raw, pruned, features, n, m)
    for b, length in enumerate(lengths):
        expected = reference(raw[b, :length], kept_sets[b], features[b, :length])
        if expected is None:
            assert not kept[b].any() and (centres[b] == features.shape[1]).all()
            continue
        count = len(expected[0])
        assert kept[b].tolist() == [True] * count + [False] * (m - count)
        assert centres[b, :count].tolist() == expected[0].tolist()
        assert (centres[b, count:] == features.shape[1]).all()
        torch.testing.assert_close(merged[b, :count], expected[1])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 60), min_size=1, max_size=5),
       ties=st.booleans())
def test_recycle_equals_per_sample_below_the_cdist_switch(seed, lengths, ties):
    """Up to 25 candidates (at most 60 tokens) every cdist takes the direct path (exact, ties included)."""
    check(seed, lengths, ties)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(100, 300), min_size=1, max_size=4))
def test_recycle_equals_per_sample_above_the_cdist_switch(seed, lengths):
    """Over 25 candidates in every sample (90+ pruned), every cdist takes the matrix-product path."""
    check(seed, lengths, ties=False, min_pruned=90)


def test_recycle_op_count_is_batch_independent_and_sync_free():
    totals = []
    for batch in (1, 8):
        raw, features, _, pruned = make_batch(0, batch, [200] * batch, ties=False)
        n, m = recycle_sizes(200)  # the same static sizes at both batch sizes
        counter = count_ops(recycle, raw, pruned, features, n, m)
        assert counter.syncs == 0, counter.sync_counts
        totals.append(counter.total)
    assert totals[0] == totals[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 60), min_size=1, max_size=4),
       ties=st.booleans(), same=st.booleans())
def test_recycle_with_host_counts_equals_device_counts(seed, lengths, ties, same):
    """Given each sample's pruned count (a host fact), the same centres and means, the masks left out when every
    sample has as many clusters as the slots."""
    raw, features, _, pruned = make_batch(seed, len(lengths), [lengths[0]] * len(lengths) if same else lengths, ties)
    pruned_counts = pruned.sum(dim=1).tolist()
    n, m = recycle_sizes(max(pruned_counts))
    if n == 0:
        return
    centres, merged, kept = recycle(raw, pruned, features, n, m)
    host_centres, host_merged, host_kept = recycle(raw, pruned, features, n, m, pruned_counts)
    if host_kept is None:  # every sample has m clusters
        assert kept.all()
    else:
        assert torch.equal(host_kept, kept)
    assert torch.equal(host_centres, centres) and torch.equal(host_merged[kept], merged[kept])
