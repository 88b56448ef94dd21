"""`selection.dart_select` equals DART's per-sample selection (the loop body of `DART.select`, transcribed below)
on every sample of a padded batch; `python_set_order` equals CPython's set order; op counts are batch
independent and sync free."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from vtprune.core.selection import count_ops, dart_select, python_set_order


def reference(units, norms, prompt, visual, text, claims, pivot_order, pivot_image=4, pivot_text=4):
    """DART.select for one sample (methods/dart.py, from `image_pivots = ...` to `kept.append`)."""
    image_pivots = visual[torch.topk(norms[visual], min(pivot_image, len(visual))).indices]
    text_pivots = text[torch.topk(norms[text], min(pivot_text, len(text))).indices]
    pivots = torch.cat([image_pivots, text_pivots])
    if pivot_order == "official":
        positions = prompt[pivots].tolist()
        order = [positions.index(p) for p in set(positions)]
        pivots = pivots[torch.tensor(order)]
    unit = units
    is_pivot = (visual[:, None] == image_pivots[None, :]).any(dim=1)
    available = ~is_pivot
    claims = min(claims, len(visual))
    chosen = is_pivot.clone()
    for pivot in pivots:
        similarity = unit[visual] @ unit[pivot]
        key = torch.where(available, -similarity, float("-inf"))
        picked = torch.argsort(key, descending=True, stable=True)[:claims]
        claimed = torch.zeros_like(chosen).scatter_(0, picked, key[picked] > float("-inf"))
        chosen |= claimed
        available &= ~claimed
    return chosen


def make_batch(seed, batch, ties, width=5, sizes=None):
    """Random samples (lists) and the padded batch; sizes=(visual, text) fixes every sample's counts."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(batch):
        num_visual = int(torch.randint(1, 40, (1,), generator=generator)) if sizes is None else sizes[0]
        num_text = int(torch.randint(1, 9, (1,), generator=generator)) if sizes is None else sizes[1]
        size = num_visual + num_text + int(torch.randint(0, 4, (1,), generator=generator))
        if ties:  # duplicated states with at most 2 non-zero entries: equal similarities that no summation order
            # changes (with dense vectors the per-sample matrix-vector product itself gives duplicates different
            # values, so its "ties" are rounding noise)
            palette = torch.eye(width)[:3] + torch.eye(width)[torch.randint(0, width, (3,), generator=generator)]
            palette = torch.nn.functional.normalize(palette, dim=-1)
            units = palette[torch.randint(0, 3, (size,), generator=generator)]
        else:
            units = torch.nn.functional.normalize(torch.randn(size, width, generator=generator), dim=-1)
        norms = torch.randperm(size, generator=generator).float()  # distinct: topk's CPU tie order is unspecified
        slots = torch.randperm(size, generator=generator)
        visual, text = torch.sort(slots[:num_visual]).values, torch.sort(slots[num_visual: num_visual + num_text]).values
        prompt = torch.randperm(700, generator=generator)[:size]  # distinct prompt positions
        claims = int(torch.randint(0, 12, (1,), generator=generator))
        samples.append((units, norms, prompt, visual, text, claims))
    size = max(len(s[0]) for s in samples)
    num_visual, num_text = max(len(s[3]) for s in samples), max(len(s[4]) for s in samples)
    padded = {
        "units": torch.zeros(batch, size, width), "norms": torch.zeros(batch, size),
        "prompt_positions": torch.zeros(batch, size, dtype=torch.long),
        "visual_slots": torch.zeros(batch, num_visual, dtype=torch.long),
        "visual_valid": torch.zeros(batch, num_visual, dtype=torch.bool),
        "text_slots": torch.zeros(batch, num_text, dtype=torch.long),
        "text_valid": torch.zeros(batch, num_text, dtype=torch.bool),
        "claims": torch.tensor([s[5] for s in samples]),
    }
    for b, (units, norms, prompt, visual, text, _) in enumerate(samples):
        padded["units"][b, : len(units)] = units
        padded["norms"][b, : len(norms)] = norms
        padded["prompt_positions"][b, : len(prompt)] = prompt
        padded["visual_slots"][b, : len(visual)], padded["visual_valid"][b, : len(visual)] = visual, True
        padded["text_slots"][b, : len(text)], padded["text_valid"][b, : len(text)] = text, True
    return samples, padded


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), ties=st.booleans(),
       pivot_order=st.sampled_from(["official", "ranked"]))
def test_dart_select_equals_per_sample(seed, batch, ties, pivot_order):
    samples, padded = make_batch(seed, batch, ties)
    kept = dart_select(**padded, pivot_order=pivot_order)
    for b, sample in enumerate(samples):
        expected = reference(*sample, pivot_order)
        assert kept[b, : len(expected)].tolist() == expected.tolist()
        assert not kept[b, len(expected):].any()


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.tuples(st.integers(0, 2**31 - 1), st.booleans()), min_size=8, max_size=8,
                              unique_by=lambda item: item[0]), min_size=1, max_size=4),
       width=st.integers(1, 8))
def test_python_set_order_equals_cpython(rows, width):
    keys = torch.tensor([[key for key, _ in row[:width]] for row in rows])
    valid = torch.tensor([[ok for _, ok in row[:width]] for row in rows])
    order = python_set_order(keys, valid)
    for b, row in enumerate(rows):
        row = row[:width]
        present = [key for key, ok in row if ok]
        expected = [present.index(key) for key in set(present)]
        valid_slots = [i for i, (_, ok) in enumerate(row) if ok]
        expected = [valid_slots[i] for i in expected] + [i for i, (_, ok) in enumerate(row) if not ok]
        assert order[b].tolist() == expected


def test_dart_op_count_is_batch_independent_and_sync_free():
    for pivot_order in ("official", "ranked"):
        totals = []
        for batch in (1, 8):
            _, padded = make_batch(3, batch, ties=False, sizes=(64, 8))
            counter = count_ops(dart_select, **padded, pivot_order=pivot_order)
            assert counter.syncs == 0, counter.sync_counts
            totals.append(counter.total)
        assert totals[0] == totals[1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), ties=st.booleans(),
       pivot_order=st.sampled_from(["official", "ranked"]), pivots=st.sampled_from([(4, 4), (2, 2), (3, 2)]))
def test_dart_select_without_masks_equals_with_them(seed, batch, ties, pivot_order, pivots):
    """Every slot real (masks None) and one claim count for all (an int), host facts that leave the masks out:
    what the all-True masks and the per-sample counts give."""
    _, padded = make_batch(seed, batch, ties, sizes=(30, 6))
    padded["claims"] = padded["claims"][:1].expand(batch).clone()
    expected = dart_select(**padded, pivot_order=pivot_order, pivot_image=pivots[0], pivot_text=pivots[1])
    padded.update(visual_valid=None, text_valid=None, claims=int(padded["claims"][0]))
    kept = dart_select(**padded, pivot_order=pivot_order, pivot_image=pivots[0], pivot_text=pivots[1])
    assert torch.equal(kept, expected)


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.lists(st.integers(0, 2**31 - 1), min_size=8, max_size=8, unique=True), min_size=1, max_size=4),
       width=st.integers(1, 8))
def test_python_set_order_without_a_mask_equals_cpython(keys, width):
    rows = [row[:width] for row in keys]
    order = python_set_order(torch.tensor(rows), None)
    for b, row in enumerate(rows):
        assert order[b].tolist() == [row.index(key) for key in set(row)]
