"""Calibration, bias metrics and plots: known trends are recovered, profiles round-trip, plots are drawn."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import build_model, inputs_for, make_image, prompt
from PIL import Image

from vtprune import Debias, FastV
from vtprune.adapters.base import VisualSegment
from vtprune.apps.analysis import bias_report
from vtprune.apps.datasets import load_jsonl
from vtprune.apps.calibration import calibrate, keep_frequency, mean_score_curve, profile_from_records
from vtprune.debias.fit import fit_robust, relative_positions
from vtprune.debias.profiles import load_profile
from vtprune.apps.runner import ScoreRecord, run_examples

GRID = (12, 12)
L = GRID[0] * GRID[1]


def synthetic_record(rng, mu, sigma, keep=20, pad_rows=0, spikes=5, noise=0.2):
    """Scores mu*exp(sigma*i/L) with multiplicative noise, a few large spikes (relevant tokens), and
    `pad_rows` top and bottom rows of padding whose scores are inflated 8x (an attention sink)."""
    x = relative_positions(L)
    raw = mu * np.exp(sigma * x) * np.exp(rng.normal(0, noise, L))
    raw[rng.choice(L, spikes, replace=False)] *= 20
    padding = np.zeros(L, dtype=bool)
    if pad_rows:
        padding[: pad_rows * GRID[1]] = padding[-pad_rows * GRID[1] :] = True
        raw[padding] *= 8
    kept_raw = np.sort(np.argsort(-raw)[:keep])
    trend = np.exp(sigma * x)
    debiased = np.where(padding, 0.0, raw / trend)
    kept = np.sort(np.argsort(-np.where(padding, -np.inf, debiased))[:keep])
    return ScoreRecord(raw=raw.astype(np.float32), debiased=debiased.astype(np.float32), padding=padding, kept=kept,
                       kept_raw=kept_raw, keep=keep, segments=[VisualSegment(0, L, GRID, 0)])


@pytest.mark.parametrize("sigma", [0.0, 0.8, 1.5, -0.5])
def test_calibration_recovers_sigma_despite_spikes_and_padding(sigma):
    rng = np.random.default_rng(0)
    records = [synthetic_record(rng, mu=0.003, sigma=sigma, pad_rows=int(rng.integers(0, 4))) for _ in range(200)]
    profile, curve, fit = profile_from_records(records, name="t", method="fastv", layer=2, query="last", model_name="m")
    assert abs(fit.sigma - sigma) < 0.08
    assert profile.sigma == pytest.approx(fit.sigma) and profile.length == L and profile.kind == "exp"
    assert fit.r2 > 0.5 or abs(sigma) < 0.8  # shallow trends are small next to the planted spikes
    # the per-image normalisation removes mu: the fitted mean curve averages ~1 over x
    assert abs(np.nanmean(curve.values) - 1.0) < 0.15


def test_including_padding_would_bend_the_trend():
    """Padding rows at both ends inflate the ends of the curve: the fit must not see them."""
    rng = np.random.default_rng(1)
    records = [synthetic_record(rng, mu=1.0, sigma=1.0, pad_rows=3) for _ in range(100)]
    blind = [ScoreRecord(r.raw, None, None, r.kept, r.kept_raw, r.keep, r.segments) for r in records]
    assert abs(mean_score_curve(records).fit().sigma - 1.0) < 0.1
    assert abs(mean_score_curve(blind).fit().sigma - 1.0) > 0.1


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.0])
def test_auto_fit_recovers_sigma_from_one_request(sigma):
    rng = np.random.default_rng(2)
    estimates = []
    for _ in range(20):
        record = synthetic_record(rng, mu=0.01, sigma=sigma, spikes=8, noise=0.3)
        estimates.append(fit_robust(record.raw, relative_positions(L)).sigma)
    assert abs(np.median(estimates) - sigma) < 0.15


def test_auto_debias_flattens_the_trend():
    rng = np.random.default_rng(3)
    record = synthetic_record(rng, mu=0.01, sigma=2.0, spikes=0, noise=0.1)
    debias = Debias(profile="auto", padding=False)
    out = debias.apply(torch.tensor(record.raw), torch.arange(L), record.segments, None).numpy()
    assert abs(fit_robust(out, relative_positions(L)).sigma) < 0.1


def test_curve_profile_and_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    records = [synthetic_record(rng, mu=1.0, sigma=1.2, pad_rows=2) for _ in range(100)]
    profile, curve, fit = profile_from_records(records, name="c", method="fastv", layer=2, query="last",
                                               model_name="m", curve=True, extra={"samples_note": 1})
    assert profile.kind == "curve" and len(profile.curve) == L and min(profile.curve) > 0
    # the smoothed curve follows the exponential trend
    x = relative_positions(L)
    ratio = np.asarray(profile.curve) / fit(x)
    assert np.all(np.abs(np.log(ratio)) < 0.35)
    loaded = load_profile(profile.save(tmp_path / "p.json"))
    assert loaded == profile
    assert loaded.extra["r2"] == pytest.approx(fit.r2) and loaded.extra["samples"] == 100
    torch.testing.assert_close(Debias(profile=str(tmp_path / "p.json"), padding=False).trend(records[0].segments),
                               torch.tensor(profile.curve, dtype=torch.float32))


def test_bias_report_before_after():
    rng = np.random.default_rng(5)
    positional = bias_report([synthetic_record(rng, mu=1.0, sigma=1.5, keep=30) for _ in range(150)])
    assert abs(positional.sigma_attn.before - 1.5) < 0.1 and abs(positional.sigma_attn.after) < 0.1
    assert positional.sigma_freq.before > positional.sigma_attn.before  # top-k sharpens the bias
    assert abs(positional.sigma_freq.after) < positional.sigma_freq.before / 3
    records = [synthetic_record(rng, mu=1.0, sigma=1.5, pad_rows=2, keep=30) for _ in range(150)]
    report = bias_report(records)
    assert report.padding_kept_share.before > 0.2 and report.padding_kept_share.after == 0.0
    assert report.padding_score_share.before > 0.3 and report.padding_score_share.after == 0.0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["grid"] == [12, 12] and len(data["curves"]["freq_after"]) == L


def test_keep_frequency_counts_real_tokens_only():
    rng = np.random.default_rng(6)
    records = [synthetic_record(rng, mu=1.0, sigma=0.0, pad_rows=2) for _ in range(10)]
    freq = keep_frequency(records, "kept")
    assert np.isnan(freq.values[: 2 * GRID[1]]).all() and (freq.count[2 * GRID[1] : -2 * GRID[1]] == 10).all()


def test_plots_are_drawn(tmp_path, processor):
    from vtprune.adapters.llava import LlavaAdapter
    from vtprune.apps.plots import plot_keep_frequency, plot_score_heatmap, plot_score_vs_position, plot_selection

    rng = np.random.default_rng(7)
    records = [synthetic_record(rng, mu=1.0, sigma=1.0, pad_rows=1) for _ in range(50)]
    report = bias_report(records)
    geometry = LlavaAdapter(build_model(processor)).image_geometry(processor)
    paths = [
        plot_score_vs_position(report.curves, report.fits, tmp_path / "a.png"),
        plot_score_heatmap(report.curves["score_before"], tmp_path / "b.png"),
        plot_keep_frequency(report.curves["freq_before"], report.curves["freq_after"], tmp_path / "c.png"),
        plot_selection(make_image(120, 60), geometry, (6, 6), [("a", [0, 7, 20]), ("b", [14, 15])],
                       np.arange(36) < 6, tmp_path / "d.png", "title"),
    ]
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels.std() > 10  # not a blank canvas


def test_calibrate_a_model_end_to_end(tmp_path, processor, model):
    from vtprune.apps.datasets import Example

    examples = [Example(make_image(40 + 17 * i, 90, seed=i), "what is the colour of the circle ?") for i in range(6)]
    state = tmp_path / "state.json"
    result = calibrate(model, processor, examples, FastV(layer=2), batch_size=4, state_path=state)
    assert len(result.records) == 6 and result.profile.length == 36 and np.isfinite(result.profile.sigma)
    assert result.profile.extra["data_fingerprint"] and result.profile.query == "last"
    # resume: a saved state for the same data is reused, and gives the same profile
    seen = []
    again = calibrate(model, processor, examples, FastV(layer=2), batch_size=4, state_path=state, progress=seen.append)
    assert seen == [6] and again.profile.sigma == pytest.approx(result.profile.sigma)
    # ... but never for other weights: the same command on another model starts over
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.language_model.layers[0].self_attn.k_proj.weight.mul_(3.0)
    seen = []
    fresh = calibrate(other, processor, examples, FastV(layer=2), batch_size=4, state_path=state, progress=seen.append)
    assert seen == [4, 2]  # progress per batch of 4: nothing was resumed
    assert not np.allclose(fresh.records[0].raw, result.records[0].raw)
    # the raw scores the calibration saw are the press's own first-stage scores
    inputs = inputs_for(processor, [examples[0].image], [prompt(examples[0].question)])
    press = FastV(keep=4, layer=2)
    with torch.no_grad(), press(model):
        model(**inputs)
    np.testing.assert_allclose(result.records[0].raw, press.last_selection[0].scores[0].numpy(), atol=1e-6)


def test_calibrating_random_is_an_error(processor, model):
    from vtprune import Random
    from vtprune.apps.datasets import Example

    with pytest.raises(ValueError, match="no positional trend"):
        calibrate(model, processor, [Example(make_image(50, 50), "x")], Random())


def test_runner_answers_and_records(processor, model):
    from vtprune.apps.datasets import Example

    examples = [Example(make_image(60, 90, seed=i), "what is the colour ?") for i in range(3)]
    press = FastV(keep=0.5, layer=2, debias=Debias(padding=True))
    result = run_examples(model, processor, examples, press, max_new_tokens=2, batch_size=2)
    assert len(result.answers) == 3 and all(isinstance(a, str) for a in result.answers)
    assert len(result.records) == 3
    record = result.records[0]
    assert record.keep == 18 and len(record.kept_raw) == 18 and not record.padding[record.kept].any()


# --- data loading errors -------------------------------------------------------------------------------
def write_data(tmp_path, rows, images=()):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for name, content in images:
        if content is None:
            make_image(30, 20).save(folder / name)
        else:
            (folder / name).write_bytes(content)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path, folder


def test_empty_data(tmp_path):
    path, folder = write_data(tmp_path, [])
    with pytest.raises(ValueError, match="holds no examples"):
        load_jsonl(path, folder)


def test_missing_images_name_the_folder(tmp_path):
    path, folder = write_data(tmp_path, [{"image": "a.png", "text": "q"}, {"image": "b.png", "text": "q"}],
                              [("a.png", None)])
    with pytest.raises(ValueError, match="1 of 2 images are missing from .*images.*b.png"):
        load_jsonl(path, folder)


def test_unreadable_images_are_skipped_with_a_count(tmp_path):
    rows = [{"image": f"{n}.png", "text": "q"} for n in "abc"]
    path, folder = write_data(tmp_path, rows, [("a.png", None), ("b.png", b"not an image"), ("c.png", None)])
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        examples, report = load_jsonl(path, folder)
    assert len(examples) == 2 and len(report.unreadable) == 1 and "b.png" in report.unreadable[0][0]


def test_more_samples_than_data(tmp_path):
    path, folder = write_data(tmp_path, [{"image": "a.png", "text": "q"}], [("a.png", None)])
    with pytest.raises(ValueError, match="asked for 5 samples but .* holds only 1"):
        load_jsonl(path, folder, samples=5)


def test_bad_rows(tmp_path):
    path, folder = write_data(tmp_path, [{"img": "a.png"}])
    with pytest.raises(ValueError, match='needs "image"'):
        load_jsonl(path, folder)


def test_device_robust_fit_matches_the_numpy_fit():
    """Debias(profile="auto") fits on the scores' device (batched, no host sync); same sigma as fit_robust."""
    from vtprune.debias.fit import fit_robust, robust_sigma

    rng = np.random.default_rng(3)
    ys, xs, uses, expected = [], [], [], []
    for _ in range(30):
        length = 144
        x = np.arange(length) / length
        y = 0.01 * np.exp(rng.normal(0, 1.5) * x) * np.exp(rng.normal(0, 0.3, length))
        y[rng.integers(0, length, 5)] *= 20  # a few relevant tokens far above the trend
        use = rng.random(length) > 0.2
        ys.append(y), xs.append(x), uses.append(use)
        expected.append(fit_robust(y[use], x[use]).sigma)
    batched = robust_sigma(torch.tensor(np.array(ys)), torch.tensor(np.array(xs)), torch.tensor(np.array(uses)))
    np.testing.assert_allclose(batched.numpy(), expected, atol=1e-5)
    single = robust_sigma(torch.tensor(ys[0]), torch.tensor(xs[0]), torch.tensor(uses[0]))
    assert abs(float(single) - expected[0]) < 1e-5
    assert float(robust_sigma(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5]), torch.tensor([True, False]))) == 0.0


# SparseVLM's mean first-stage score per position on the testbed (64 images): Gauss-Newton from the
# log-linear start once diverged on it (sigma -2e5, R^2 < 0); the fit must never end worse than its start.
SPIKY_CURVE = np.array([
    np.nan, 0.57, 0.151, 0.106, 0.083, 0.101, 0.12, 0.128, 0.11, 0.084, 0.17, np.nan, 0.203, 0.267, 0.183, 0.166,
    0.164, 0.227, 0.289, 0.232, 0.152, 0.132, 0.2, 0.152, 0.102, 0.149, 0.145, 0.145, 0.122, 0.141, 0.1,
    0.134, 0.192, 0.121, 0.107, 0.094, 0.096, 0.346, 0.638, 0.439, 0.275, 0.13, 0.117, 0.222, 0.096, 0.111,
    0.174, 0.131, 0.121, 0.259, 0.412, 0.422, 0.621, 0.214, 0.278, 0.541, 0.702, 0.626, 0.433, 0.377, 0.245,
    0.379, 0.563, 0.567, 0.638, 0.242, 0.283, 0.279, 0.288, 0.284, 0.247, 0.307, 0.309, 0.271, 0.429, 0.735,
    1.105, 0.813, 0.648, 0.668, 0.448, 0.469, 0.636, 0.387, 0.368, 1.001, 1.36, 2.504, 3.453, 1.849, 1.802,
    3.399, 3.118, 2.555, 2.821, 1.933, 1.058, 2.791, 2.511, 2.357, 2.323, 0.985, 0.782, 1.471, 2.239, 1.925,
    2.181, 1.578, 0.68, 1.738, 1.325, 2.145, 2.231, 1.405, 2.154, 3.996, 4.126, 5.013, 4.27, 1.135, 0.121,
    0.171, 1.052, 2.65, 3.538, 1.027, 1.615, 2.489, 1.457, 0.514, 0.319, 0.331, np.nan, 0.442, 0.822, 1.041,
    0.96, 0.799, 0.762, 0.929, 0.936, 0.824, 0.609, np.nan
])


def test_exponential_fit_does_not_diverge_on_a_spiky_curve():
    from vtprune.debias.fit import fit_exponential

    nan = np.isnan(SPIKY_CURVE)
    x = np.arange(144)[~nan] / 144
    fit = fit_exponential(SPIKY_CURVE[~nan], x)
    assert 1.0 < fit.sigma < 3.0 and fit.r2 > 0.2
