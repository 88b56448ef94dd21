"""`selection.visionzip_select` equals VisionZip's per-image selection and merging (the loop body of
`VisionZip.select`, transcribed below), and `selection.rank_order` equals `stages.rank_order`, row by row of a
padded batch; op counts are batch independent and sync free."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from vtprune.core.selection import count_ops, mask_to_indices, rank_order, visionzip_select
from vtprune.core.stages import rank_order as rank_order_one


def reference(scores, padding, share, keys, image, patches, contextual):
    """VisionZip.select for one image (first = 0: keys and image hold the patches only)."""
    length = len(scores)
    order = rank_order_one(scores, padding, share)
    dominant = torch.sort(order[:patches]).values
    if not contextual:
        return dominant, None, None
    rest = torch.ones(length, dtype=torch.bool).index_fill_(0, dominant, False)
    candidates = torch.sort(torch.where(rest, torch.arange(length), length)).values[: length - patches]
    step = max(1, len(candidates) // contextual)
    targets = candidates[torch.arange(0, len(candidates), step)[:contextual]]
    unit = torch.nn.functional.normalize(keys[candidates].float(), dim=-1)
    target_unit = torch.nn.functional.normalize(keys[targets].float(), dim=-1)
    assignment = (unit @ target_unit.T).argmax(dim=1)
    is_target = (candidates[:, None] == targets[None, :]).any(dim=1)
    members = torch.zeros(len(candidates), len(targets))
    members.scatter_(1, assignment[:, None], 1.0)
    members = members * (~is_target)[:, None].float()
    values = image[candidates].float()
    merged = image[targets].float() + (members.T @ values) / members.sum(dim=0).clamp(min=1)[:, None]
    return dominant, targets, merged.to(image.dtype)


def make_images(seed, count, ties, padded_rows, width=6):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 50, (count,), generator=generator).tolist()
    size = max(lengths)
    scores = torch.rand(count, size, generator=generator)
    if ties:
        scores = (scores * 3).floor()
    keys = torch.randn(count, size, width, generator=generator)
    features = torch.randn(count, size, width + 1, generator=generator)
    valid = torch.arange(size) < torch.tensor(lengths)[:, None]
    padding = (torch.rand(count, size, generator=generator) < 0.3) & valid if padded_rows else None
    if padded_rows:
        padding[0] = valid[0]  # an image with no content
    share = torch.rand(count, size, generator=generator) if padded_rows else None
    if share is not None and ties:
        share = (share * 2).floor() / 2
    patches = [int(torch.randint(1, n + 1, (1,), generator=generator)) for n in lengths]
    contextual = [int(torch.randint(0, n - p + 1, (1,), generator=generator)) for n, p in zip(lengths, patches)]
    return lengths, scores, valid, padding, share, keys, features, patches, contextual


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 6), ties=st.booleans(), padded_rows=st.booleans())
def test_rank_order_equals_per_row(seed, count, ties, padded_rows):
    lengths, scores, valid, padding, share, *_ = make_images(seed, count, ties, padded_rows)
    order = rank_order(scores, valid, padding, share)
    for p, length in enumerate(lengths):
        expected = rank_order_one(scores[p, :length], None if padding is None else padding[p, :length],
                                  None if share is None else share[p, :length])
        assert order[p, :length].tolist() == expected.tolist()
        assert sorted(order[p, length:].tolist()) == list(range(length, scores.shape[1]))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 6), ties=st.booleans(), padded_rows=st.booleans())
def test_visionzip_select_equals_per_image(seed, count, ties, padded_rows):
    lengths, scores, valid, padding, share, keys, features, patches, contextual = make_images(seed, count, ties, padded_rows)
    max_patches, max_contextual = max(patches), max(max(contextual), 1)
    dominant, dominant_ok, targets, merged, targets_ok = visionzip_select(
        scores, valid, keys, features, torch.tensor(patches), torch.tensor(contextual), max_patches, max_contextual,
        padding, share)
    for p, length in enumerate(lengths):
        size = scores.shape[1]
        expected_dominant, expected_targets, expected_merged = reference(
            scores[p, :length], None if padding is None else padding[p, :length],
            None if share is None else share[p, :length], keys[p, :length], features[p, :length], patches[p],
            contextual[p])
        assert dominant[p, : patches[p]].tolist() == expected_dominant.tolist()
        assert dominant_ok[p].tolist() == [True] * patches[p] + [False] * (max_patches - patches[p])
        assert (dominant[p, patches[p]:] == size).all()
        assert targets_ok[p].tolist() == [True] * contextual[p] + [False] * (max_contextual - contextual[p])
        if expected_targets is not None:
            assert targets[p, : contextual[p]].tolist() == expected_targets.tolist()
            torch.testing.assert_close(merged[p, : contextual[p]], expected_merged)


def test_mask_to_indices():
    mask = torch.tensor([[True, False, True, True], [False, False, False, True]])
    indices, kept = mask_to_indices(mask, 3)
    assert indices.tolist() == [[0, 2, 3], [3, 4, 4]] and kept.tolist() == [[True] * 3, [True, False, False]]


def test_visionzip_op_count_is_batch_independent_and_sync_free():
    totals = []
    for count in (1, 8):
        generator = torch.Generator().manual_seed(0)
        scores, keys = torch.rand(count, 576, generator=generator), torch.randn(count, 576, 16, generator=generator)
        features, valid = torch.randn(count, 576, 32, generator=generator), torch.ones(count, 576, dtype=torch.bool)
        counter = count_ops(visionzip_select, scores, valid, keys, features, 107, 20, 107, 20)
        assert counter.syncs == 0, counter.sync_counts
        totals.append(counter.total)
    assert totals[0] == totals[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 4), patches=st.integers(1, 20),
       contextual=st.integers(1, 8), ties=st.booleans())
def test_visionzip_select_without_masks_equals_with_them(seed, count, patches, contextual, ties):
    """valid=None (every patch real) and int counts equal to the slots (host facts that leave the masks out):
    what the all-True mask and the per-image counts give."""
    generator = torch.Generator().manual_seed(seed)
    scores, keys = torch.rand(count, 36, generator=generator), torch.randn(count, 36, 8, generator=generator)
    if ties:
        scores = (scores * 3).floor()
    features, valid = torch.randn(count, 36, 5, generator=generator), torch.ones(count, 36, dtype=torch.bool)
    expected = visionzip_select(scores, valid, keys, features, torch.full((count,), patches),
                                torch.full((count,), contextual), patches, contextual)
    for got, want in zip(visionzip_select(scores, None, keys, features, patches, contextual, patches, contextual), expected):
        assert torch.equal(got, want)
