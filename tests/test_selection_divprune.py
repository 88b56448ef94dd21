"""`selection.max_min_select` equals DivPrune's per-image `max_min_diverse` on every problem of a padded batch,
with a batch-independent op count and no host synchronisation."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from vtprune.methods.divprune import max_min_diverse
from vtprune.core.selection import count_ops, max_min_select


def make_problems(seed: int, problems: int, max_tokens: int = 30, width: int = 8, ties: bool = False):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_tokens + 1, (problems,), generator=generator)
    n = int(lengths.max())
    if ties:  # duplicated features: equal distances everywhere
        palette = torch.randn(4, width, generator=generator)
        features = palette[torch.randint(0, 4, (problems, n), generator=generator)]
    else:
        features = torch.randn(problems, n, width, generator=generator)
    valid = torch.arange(n) < lengths[:, None]
    features = torch.where(valid[:, :, None], features, 0.0)  # padding holds zeros (nan unit vectors)
    counts = torch.stack([torch.randint(1, int(length) + 1, (1,), generator=generator)[0] for length in lengths])
    return features, valid, lengths, counts


def assert_greedy_max_min(features: torch.Tensor, picks: list[int], tolerance: float = 1e-5) -> None:
    """`picks` is a greedy max-min sequence of the rows of `features` (n, d) under 1 - cosine similarity (float64):
    each pick's distance to the chosen set is the largest left, up to `tolerance` (duplicated rows make exact ties,
    which a batched and a per-row computation round differently, so either of the tied rows may come first)."""
    unit = features.double() / features.double().norm(dim=1, keepdim=True)
    distance = 1 - unit @ unit.T
    nearest = torch.topk(distance, min(2, len(features)), dim=0, largest=False).values[-1]
    assert nearest[picks[0]] >= nearest.max() - tolerance
    gap = distance[picks[0]].clone()
    gap[picks[0]] = -1.0
    for pick in picks[1:]:
        assert gap[pick] >= gap.max() - tolerance and gap[pick] > -0.5, (picks, pick)  # -1: chosen before
        gap = torch.minimum(gap, distance[pick])
        gap[pick] = -1.0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), problems=st.integers(1, 6), ties=st.booleans())
def test_max_min_select_equals_per_problem(seed, problems, ties):
    features, valid, lengths, counts = make_problems(seed, problems, ties=ties)
    k = int(counts.max())
    indices, kept = max_min_select(features, valid, k, counts)
    order, order_kept = max_min_select(features, valid, k, counts, ordered=True)
    for p in range(problems):
        count, length = int(counts[p]), int(lengths[p])
        expected = max_min_diverse(features[p, :length], count)
        if ties:  # exact ties: any of the tied rows is a right pick
            assert_greedy_max_min(features[p, :length], order[p, :count].tolist())
            assert_greedy_max_min(features[p, :length], expected.tolist())
            assert indices[p, :count].tolist() == sorted(order[p, :count].tolist())
        else:
            assert order[p, :count].tolist() == expected.tolist()
            assert indices[p, :count].tolist() == sorted(expected.tolist())
        assert kept[p].tolist() == [True] * count + [False] * (k - count) == order_kept[p].tolist()
        assert (indices[p, count:] == features.shape[1]).all()


def test_max_min_select_op_count_is_batch_independent_and_sync_free():
    totals = []
    for problems in (1, 8):
        features, valid, _, counts = make_problems(0, problems, max_tokens=64)
        counter = count_ops(max_min_select, features, valid, 16, counts.clamp(max=16))
        assert counter.syncs == 0, counter.sync_counts
        totals.append(counter.total)
    assert totals[0] == totals[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), problems=st.integers(1, 4), k=st.integers(1, 12), ties=st.booleans())
def test_max_min_select_without_padding_equals_per_problem(seed, problems, k, ties):
    """valid=None (every token real, a host fact that leaves the masks out) and no count: every pick kept."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(problems, 12, 8, generator=generator)
    if ties:
        features = features[:, torch.randint(0, 4, (12,), generator=generator)]
    indices, kept = max_min_select(features, None, k)
    assert kept.all()
    ordered, _ = max_min_select(features, None, k, ordered=True)
    for p in range(problems):
        if ties:  # exact ties: any of the tied rows is a right pick (see `assert_greedy_max_min`)
            assert_greedy_max_min(features[p], ordered[p].tolist())
            assert indices[p].tolist() == sorted(ordered[p].tolist())
        else:
            assert indices[p].tolist() == sorted(max_min_diverse(features[p], k).tolist())
            assert ordered[p].tolist() == max_min_diverse(features[p], k).tolist()
