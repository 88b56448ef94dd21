"""`selection.information`, `borda` and `carve_merge` equal TokenCarve's per-sample `information`, `_borda` and
candidates + `_merge` on every sample of a padded batch; op counts are batch independent and sync free."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from vtprune.methods.tokencarve import TokenCarve
from vtprune.core.selection import borda, carve_merge, count_ops, information


def make_batch(seed, batch, ties, width=6, max_tokens=40):
    """Per-sample lengths and keeps, and padded (B, R) scores, (B, R, D) states, valid."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_tokens + 1, (batch,), generator=generator)
    size = int(lengths.max())
    valid = torch.arange(size) < lengths[:, None]
    keeps = [int(torch.randint(1, int(n) + 1, (1,), generator=generator)) for n in lengths]
    scores = torch.rand(batch, size, generator=generator)
    if ties:  # tied scores; duplicated states with at most 2 non-zero entries: exact, order-free similarities
        scores = (scores * 3).floor()
        palette = torch.eye(width)[:4] + torch.eye(width)[torch.randint(0, width, (4,), generator=generator)]
        states = palette[torch.randint(0, 4, (batch, size), generator=generator)]
    else:
        states = torch.randn(batch, size, width, generator=generator)
    return lengths.tolist(), keeps, scores, torch.where(valid[:, :, None], states, 0.0), valid


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), ties=st.booleans())
def test_borda_and_information_equal_per_sample(seed, batch, ties):
    lengths, _, attention, _, valid = make_batch(seed, batch, ties)
    # random states: the information score of duplicated states is rounding noise (degenerate eigenvectors)
    states = torch.where(valid[:, :, None], torch.randn(batch, attention.shape[1], 6), 0.0)
    other = attention.roll(1, dims=1) if ties else torch.rand(attention.shape)  # a second ranking, tied or not
    info = information(states, valid)
    fused = borda(attention, other, valid, av_weight=0.3)
    press = TokenCarve(av_weight=0.3)
    for b, length in enumerate(lengths):
        expected = TokenCarve.information(states[b, :length])
        torch.testing.assert_close(info[b, :length], expected, rtol=1e-5, atol=1e-5)
        assert fused[b, :length].tolist() == press._borda(attention[b, :length], other[b, :length]).tolist()
        assert (fused[b, length:] == 0).all() and (info[b, length:] == 0).all()


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), ties=st.booleans())
def test_carve_merge_equals_per_sample(seed, batch, ties):
    lengths, keeps, fused, states, valid = make_batch(seed, batch, ties)
    max_keep = max(keeps)
    indices, kept, values = carve_merge(fused, states, valid, torch.tensor(keeps), max_keep)
    for b, (length, keep) in enumerate(zip(lengths, keeps)):
        count = min(length, max(keep, int(keep / 2 * 3)))  # TokenCarve.select
        if count < 2:  # TokenCarve._merge fails there (max over an empty A); carve_merge keeps the token
            assert indices[b, :1].tolist() == [int(torch.argmax(fused[b, :length]))] and kept[b, 0]
            continue
        candidates = torch.argsort(fused[b, :length], descending=True, stable=True)[:count]
        expected = TokenCarve._merge(states[b, :length], torch.arange(length), candidates, keep, torch.float32)
        assert len(expected.ranks) == keep
        assert indices[b, :keep].tolist() == expected.ranks.tolist()
        assert kept[b].tolist() == [True] * keep + [False] * (max_keep - keep)
        assert (indices[b, keep:] == fused.shape[1]).all()
        torch.testing.assert_close(values[b, :keep], expected.values)


def test_tokencarve_op_count_is_batch_independent_and_sync_free():
    totals = []
    for batch in (1, 8):
        generator = torch.Generator().manual_seed(0)
        attention, states = torch.rand(batch, 200, generator=generator), torch.randn(batch, 200, 32, generator=generator)
        valid = torch.ones(batch, 200, dtype=torch.bool)
        with_ops = count_ops(lambda: carve_merge(borda(attention, information(states, valid), valid), states, valid,
                                                 64, 64))
        assert with_ops.syncs == 0, with_ops.sync_counts
        totals.append(with_ops.total)
    assert totals[0] == totals[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), keep=st.integers(1, 24), ties=st.booleans())
def test_full_rows_given_as_none_equal_the_masks(seed, batch, keep, ties):
    """valid=None (every slot holds a token) and an int keep (every row alike), host facts that leave masks
    out, give what the all-True mask and the per-row tensor give."""
    generator = torch.Generator().manual_seed(seed)
    attention, states = torch.rand(batch, 30, generator=generator), torch.randn(batch, 30, 6, generator=generator)
    if ties:
        attention = (attention * 3).floor()
    valid = torch.ones(batch, 30, dtype=torch.bool)
    info = information(states, None)
    assert torch.equal(info, information(states, valid))
    fused = borda(attention, info, None, av_weight=0.3)
    assert torch.equal(fused, borda(attention, info, valid, av_weight=0.3))
    expected = carve_merge(fused, states, valid, torch.full((batch,), keep), keep)
    for given_keep in (keep, torch.full((batch,), keep)):
        for got, want in zip(carve_merge(fused, states, None, given_keep, keep), expected):
            assert torch.equal(got, want)
