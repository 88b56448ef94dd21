"""Positional corrections beyond the exponential (`vtprune.debias.corrections`): tempered, curve and row x column
profiles, and the per-request row rank and row mean normalisations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vtprune.adapters.base import VisualSegment
from vtprune.debias import Debias
from vtprune.debias.corrections import (fit_alpha, keep_flatness, row_flatness, row_mean, row_rank, rowcol_trend,
                                        top_k_real)
from vtprune.debias.profiles import Profile, load_profile
from vtprune.apps.runner import ScoreRecord
from vtprune.core.selection.opcount import count_ops

ROWS, COLS = 6, 8
LENGTH = ROWS * COLS


def one_axis(batch: int, rows: int = ROWS, cols: int = COLS):
    """The arguments of `row_rank`/`row_mean` for `batch` samples of one rows x cols image, every token present."""
    length = rows * cols
    return dict(present=torch.ones(batch, length, dtype=torch.bool), ranks=torch.arange(length).expand(batch, length),
                axis_start=torch.zeros(batch, 1, dtype=torch.long), axis_length=torch.full((batch, 1), length),
                axis_columns=torch.full((batch, 1), cols))


def row_trend(rows: int = ROWS, cols: int = COLS, sigma: float = 3.0) -> torch.Tensor:
    """(rows * cols,) exp(sigma * row / rows): a trend that grows from the top row to the bottom row."""
    return torch.exp(sigma * torch.arange(rows).repeat_interleave(cols) / rows)


@pytest.mark.parametrize("correct", [row_rank, row_mean])
def test_row_corrections_remove_a_row_trend(correct):
    content = torch.rand(COLS, generator=torch.Generator().manual_seed(0)).repeat(ROWS)[None]  # same in every row
    out = correct(content * row_trend(), **one_axis(1))
    assert out.shape == (1, LENGTH) and out.dtype == torch.float32
    rows = out.view(ROWS, COLS)
    torch.testing.assert_close(rows, rows[:1].expand(ROWS, COLS), atol=2e-3, rtol=1e-4)  # the tie term only


def test_row_rank_is_the_quantile_within_the_row():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 10.0, 30.0, 20.0, 40.0]])
    out = row_rank(scores, **one_axis(1, rows=2, cols=4))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.25, 0.75, 0.5, 0.25, 0.75, 0.5, 1.0]]), atol=2e-3, rtol=0)
    assert out[0, 7] > out[0, 0]  # ties between rows go to the higher score


def test_padding_takes_no_quantile_and_absent_tokens_are_ignored():
    scores = torch.tensor([[9.0, 1.0, 3.0, 2.0, 10.0, 30.0, 20.0, 40.0]])
    args = one_axis(1, rows=2, cols=4)
    padding = torch.tensor([[True, False, False, False, False, False, False, False]])
    out = row_rank(scores, **args, padding=padding)
    assert out[0, 0] < 0.01  # padding ranks after every real token
    torch.testing.assert_close(out[0, 1:4], torch.tensor([1 / 3, 1.0, 2 / 3]), atol=2e-3, rtol=0)
    mean = row_mean(scores, **args, padding=padding)
    torch.testing.assert_close(mean[0, 1:4], torch.tensor([0.5, 1.5, 1.0]))  # the row's real mean is 2


@pytest.mark.parametrize("correct", [row_rank, row_mean])
def test_batch_equals_singles_and_op_count_is_batch_independent(correct):
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(5, LENGTH, generator=generator)
    padding = torch.rand(5, LENGTH, generator=generator) < 0.2
    batched = correct(scores, **one_axis(5), padding=padding)
    for b in range(5):
        torch.testing.assert_close(batched[b : b + 1], correct(scores[b : b + 1], **one_axis(1), padding=padding[b : b + 1]))
    counts = []
    for batch in (1, 8):
        counter = count_ops(correct, torch.rand(batch, LENGTH), **one_axis(batch))
        assert counter.syncs == 0, counter.sync_counts
        counts.append(counter.total)
    assert counts[0] == counts[1]


def test_debias_rowrank_through_apply_batch_with_two_images():
    segments = [[VisualSegment(offset=0, length=LENGTH, grid=(ROWS, COLS), image_index=0),
                 VisualSegment(offset=LENGTH, length=LENGTH, grid=(ROWS, COLS), image_index=1)]]
    scores = torch.cat([row_trend(), 5 * row_trend()])[None] * torch.rand(1, 2 * LENGTH)
    ranks = torch.arange(2 * LENGTH)[None]
    present = torch.ones(1, 2 * LENGTH, dtype=torch.bool)
    out = Debias(profile="rowrank", padding=False).apply_batch(scores, ranks, present, segments)
    assert out.shape == (1, 2 * LENGTH)
    for image in range(2):  # every row of each image holds the quantiles 1/COLS .. 1 once
        quantiles = torch.sort(out[0, image * LENGTH : (image + 1) * LENGTH].view(ROWS, COLS), dim=1).values
        torch.testing.assert_close(quantiles, (torch.arange(1, COLS + 1) / COLS).expand(ROWS, COLS), atol=2e-3, rtol=0)
    assert Debias(profile="rowmean").describe() == "positional rowmean, padding on"


def test_tempered_profile_is_the_power_of_the_exponential():
    full = Profile(name="t/full", kind="exp", length=LENGTH, sigma=4.0, mu=0.2)
    tempered = Profile(name="t/half", kind="exp", length=LENGTH, sigma=4.0, mu=0.2, alpha=0.5)
    torch.testing.assert_close(tempered.trend(LENGTH), full.trend(LENGTH).sqrt())
    assert Profile(name="t/off", kind="exp", length=LENGTH, sigma=4.0, alpha=0).trend(LENGTH).eq(1).all()


def test_profiles_round_trip_with_kind_and_alpha(tmp_path):
    values = tuple(float(v) for v in row_trend())
    for profile in (Profile(name="t/tempered", kind="exp", length=LENGTH, sigma=2.0, alpha=0.35),
                    Profile(name="t/rowcol", kind="rowcol", length=LENGTH, curve=values, alpha=0.5),
                    Profile(name="t/curve", kind="curve", length=LENGTH, curve=values)):
        path = profile.save(tmp_path / f"{profile.kind}.json")
        loaded = load_profile(path)
        assert loaded == profile and json.loads(path.read_text())["kind"] == profile.kind
        torch.testing.assert_close(loaded.trend(LENGTH), profile.trend(LENGTH))
    old = {"format": "vtprune-profile/1", "name": "t/old", "kind": "exp", "length": 144, "sigma": 1.5}
    assert Profile.from_dict(old).alpha == 1.0  # profiles written before tempering load unchanged


@pytest.mark.parametrize("bad, message", [
    (dict(kind="exp", sigma=1.0, alpha=-0.5), "alpha=-0.5 must be a number in [0, 4]"),
    (dict(kind="exp", sigma=1.0, alpha=True), "alpha=True"),
    (dict(kind="rowcol"), "a rowcol profile needs 48 values"),
    (dict(kind="grid", sigma=1.0), "kind must be 'exp', 'curve' or 'rowcol'"),
])
def test_bad_profiles_are_one_line_errors(bad, message):
    with pytest.raises(ValueError) as error:
        Profile(name="t/bad", length=LENGTH, **bad)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_per_request_correction_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown profile 'rowranks'") as error:
        Debias(profile="rowranks")
    assert "\n" not in str(error.value)


def records_with_trend(sigma: float, images: int = 200, seed: int = 0) -> list[ScoreRecord]:
    """Images whose scores are noise times a row trend exp(sigma * row / rows); no padding."""
    generator = np.random.default_rng(seed)
    trend = row_trend(sigma=sigma).double().numpy()
    segment = VisualSegment(offset=0, length=LENGTH, grid=(ROWS, COLS), image_index=0)
    out = []
    for _ in range(images):
        raw = generator.lognormal(0.0, 0.5, LENGTH) * trend
        out.append(ScoreRecord(raw=raw, debiased=None, padding=np.zeros(LENGTH, dtype=bool), kept=np.arange(4),
                               kept_raw=np.arange(4), keep=4, segments=[segment]))
    return out


def test_fit_alpha_removes_a_known_trend_and_leaves_none_alone():
    trend = row_trend(sigma=3.0).double().numpy()
    alpha, measured = fit_alpha(records_with_trend(3.0), trend)
    assert 0.8 <= alpha <= 1.2 and measured[alpha] < measured[0.0] / 10
    alpha, _ = fit_alpha(records_with_trend(0.0), trend)
    assert alpha <= 0.2
    assert keep_flatness(records_with_trend(3.0), trend) < keep_flatness(records_with_trend(3.0), None)


def test_rowcol_trend_recovers_a_separable_trend():
    records = records_with_trend(2.0, images=400)
    row, col, grid = rowcol_trend(records)
    assert grid == (ROWS, COLS) and row.shape == (ROWS,) and col.shape == (COLS,)
    expected = np.exp(2.0 * np.arange(ROWS) / ROWS)
    np.testing.assert_allclose(row / row[0], expected, rtol=0.1)
    np.testing.assert_allclose(col, 1.0, atol=0.1)


def test_top_k_real_never_keeps_padding_and_flatness_is_zero_for_equal_rows():
    scores = np.arange(LENGTH, dtype=float)[None].repeat(2, 0)
    real = np.ones_like(scores, dtype=bool)
    real[:, :COLS] = False  # the top row is padding
    kept = top_k_real(scores, real, 0.25)
    assert kept.sum(1).tolist() == [12, 12] and not kept[:, :COLS].any()
    every_row = np.tile(np.arange(COLS) < 2, ROWS)[None]  # two tokens of every row
    assert row_flatness(every_row, np.ones_like(every_row), (ROWS, COLS)) == 0
