import numpy as np
import pytest
from numpy.testing import assert_allclose

from changedetect import radiometry
from conftest import textured


def _pair():
    ref = np.stack([textured((64, 64), seed=s) for s in (1, 2, 3)])
    gains = np.array([1.3, 0.8, 1.1], np.float32)[:, None, None]
    img = (ref * gains + 0.05) ** 1.0
    return ref, img.astype(np.float32)


def test_histogram_matching_recovers_linear_change():
    ref, img = _pair()
    out, fit = radiometry.match_histograms(img, ref)
    assert out.dtype == np.float32
    assert_allclose(out, ref, atol=0.02)
    assert all(a < b for a, b in zip(fit.rmse_after, fit.rmse_before, strict=True))


def test_histogram_matching_respects_valid_and_leaves_input():
    ref, img = _pair()
    valid = np.ones(ref.shape[1:], bool)
    valid[:10] = False
    img[:, :10] = 99.0
    before = img.copy()
    out, _ = radiometry.match_histograms(img, ref, valid=valid)
    assert np.all(out[:, :10] == 99.0)  # invalid pixels unchanged
    assert out[:, 10:].max() <= ref.max() + 1e-6
    assert np.array_equal(img, before)


def test_linear_normalize_robust_to_changed_pixels():
    ref, img = _pair()
    img[:, :20, :20] = 0.95  # 10 % changed pixels
    out, fit = radiometry.linear_normalize(img, ref)
    assert_allclose(fit.gain, [1 / 1.3, 1 / 0.8, 1 / 1.1], rtol=0.02)
    assert_allclose(out[:, 30:, 30:], ref[:, 30:, 30:], atol=0.01)


def test_errors():
    ref, img = _pair()
    with pytest.raises(ValueError, match="same shape"):
        radiometry.match_histograms(img[:, :10], ref)
    with pytest.raises(ValueError, match="method"):
        radiometry.normalize(img, ref, method="magic")


# --------------------------------------------------------------------------- fit / apply on samples
GAIN = np.array([1.25, 0.8, 1.1])
OFFSET = np.array([0.05, -0.02, 0.1])


def _planted(shape=(128, 128), noise=0.002):
    """image = GAIN * reference + OFFSET + noise, with a 25 % block of unrelated values."""
    ref = np.stack([textured(shape, seed=s) for s in (11, 12, 13)]).astype(np.float64)
    rng = np.random.default_rng(2841)
    img = GAIN[:, None, None] * ref + OFFSET[:, None, None] + noise * rng.standard_normal(ref.shape)
    changed = np.zeros(shape, bool)
    changed[: shape[0] // 2, shape[1] // 2 :] = True
    img[:, changed] = rng.uniform(0, 1.2, (3, int(changed.sum())))
    return ref, img, changed


def test_irmad_recovers_planted_gain_and_offset():
    ref, img, changed = _planted()
    x, y = img.reshape(3, -1), ref.reshape(3, -1)
    norm = radiometry.fit_normalisation(x, y, method="irmad")
    # The fit maps the image onto the reference: the inverse of the planted line.
    assert_allclose(norm.gain, 1 / GAIN, atol=2e-3)
    assert_allclose(norm.offset, -OFFSET / GAIN, atol=2e-3)
    extra = norm.extra
    assert extra["converged"] is True
    assert 2 <= extra["iterations"] < 30
    assert extra["regression"] == "orthogonal"
    assert extra["notes"] == []
    assert extra["n_invariant"] == norm.n_pixels >= 100
    assert all(0.999 < r <= 1 for r in extra["canonical_correlations"])
    assert 0 < extra["no_change_weight_share"] < 0.75  # a quarter changed
    keep = ~changed.ravel()
    rep = norm.report(x[:, keep], y[:, keep])
    assert rep.method == "irmad"
    assert all(r < 0.005 for r in rep.rmse_after)
    assert all(a < b for a, b in zip(rep.rmse_after, rep.rmse_before, strict=True))
    d = rep.as_dict()
    assert d["extra"]["converged"] is True
    json_keys = {"method", "gain", "offset", "r2", "rmse_before", "rmse_after", "n_pixels", "extra"}
    assert set(d) == json_keys


def test_irmad_flags_changed_pixels_and_is_deterministic():
    ref, img, changed = _planted()
    x, y = img.reshape(3, -1), ref.reshape(3, -1)
    res = radiometry.irmad(x, y)
    w = res.no_change.reshape(changed.shape)
    assert res.converged
    assert np.all(w[changed] < 0.01)
    assert np.mean(w[~changed] > 0.05) > 0.6
    assert np.all((res.no_change >= 0) & (res.no_change <= 1))
    assert res.mad.shape == x.shape
    again = radiometry.irmad(x.copy(), y.copy())
    assert np.array_equal(res.no_change, again.no_change)
    assert res.correlations == again.correlations
    n1 = radiometry.fit_normalisation(x, y, method="irmad")
    n2 = radiometry.fit_normalisation(x, y, method="irmad")
    assert n1.gain == n2.gain
    assert n1.offset == n2.offset
    assert n1.extra == n2.extra


def test_irmad_falls_back_to_linear_with_few_invariant_pixels():
    ref, img, _ = _planted((20, 20))
    x, y = img.reshape(3, -1), ref.reshape(3, -1)
    norm = radiometry.fit_normalisation(x, y, method="irmad")
    assert norm.extra["regression"] == "linear (fallback)"
    assert any("fewer than 100" in note for note in norm.extra["notes"])
    lin = radiometry.fit_normalisation(x, y, method="linear")
    assert norm.gain == lin.gain
    assert norm.offset == lin.offset
    # max_iter=1: the plain MAD, reported as not converged
    one = radiometry.fit_normalisation(x, y, method="irmad", max_iter=1, min_invariant=2)
    assert one.extra["converged"] is False
    assert one.extra["iterations"] == 1
    assert any("did not converge" in note for note in one.extra["notes"])


def test_normalize_irmad_whole_image():
    ref, img, changed = _planted()
    img = img.astype(np.float32)
    valid = np.ones(changed.shape, bool)
    valid[-5:] = False
    img[:, -5:] = 7.0
    before = img.copy()
    out, fit = radiometry.normalize(img, ref, method="irmad", valid=valid)
    assert out.dtype == np.float32
    assert np.all(out[:, -5:] == 7.0)
    assert np.array_equal(img, before)
    keep = valid & ~changed
    assert_allclose(out[:, keep], ref[:, keep], atol=0.01)
    assert fit.as_dict()["extra"]["converged"] is True
    assert_allclose(fit.gain, 1 / GAIN, atol=2e-3)


WINDOWS = [
    (slice(0, 64), slice(0, 64)),
    (slice(13, 57), slice(40, 41)),
    (slice(63, 64), slice(0, 64)),
    (slice(5, 6), slice(7, 8)),
]


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("histogram", {}),
        ("histogram", {"max_knots": 64, "thin_above": 100}),  # thinned knots
        ("linear", {}),
        ("irmad", {"min_invariant": 10}),
        ("none", {}),
    ],
)
def test_apply_on_a_window_equals_whole_image(method, opts):
    ref, img, changed = _planted((64, 64))
    img = img.astype(np.float32)
    rng = np.random.default_rng(7)
    pick = rng.random(changed.shape) < 0.4
    norm = radiometry.fit_normalisation(img[:, pick], ref[:, pick], method=method, **opts)
    valid = rng.random(changed.shape) > 0.1
    whole = norm.apply(img, valid)
    whole_all = norm.apply(img)
    assert whole.dtype == np.float32
    assert whole.shape == img.shape
    assert np.array_equal(whole[:, ~valid], img[:, ~valid])
    assert np.array_equal(whole[:, valid], whole_all[:, valid])
    for sl in WINDOWS:
        assert np.array_equal(norm.apply(img[:, sl[0], sl[1]], valid[sl]), whole[:, sl[0], sl[1]])
        assert np.array_equal(norm.apply(img[:, sl[0], sl[1]]), whole_all[:, sl[0], sl[1]])
    # samples (bands, n) map like the pixels they came from
    assert np.array_equal(norm.apply(img[:, valid]), whole[:, valid])


def test_fit_apply_reproduces_whole_image_functions():
    ref, img = _pair()
    rng = np.random.default_rng(3)
    valid = rng.random(ref.shape[1:]) > 0.2
    fit = rng.random(ref.shape[1:]) > 0.5
    chosen = fit & valid
    out, rep = radiometry.match_histograms(img, ref, valid=valid, fit=fit)
    norm = radiometry.fit_normalisation(img[:, chosen], ref[:, chosen], method="histogram")
    assert np.array_equal(norm.apply(img, valid), out)  # few distinct values: never thinned
    assert rep.n_pixels == norm.n_pixels == chosen.sum()
    assert "extra" not in rep.as_dict()
    out, rep = radiometry.linear_normalize(img, ref, valid=valid, fit=fit)
    norm = radiometry.fit_normalisation(img[:, chosen], ref[:, chosen], method="linear")
    assert np.array_equal(norm.apply(img, valid), out)
    assert_allclose(rep.gain, norm.gain, atol=1e-6)
    assert rep.n_pixels == norm.n_pixels
    # existing report keys are unchanged
    assert set(rep.as_dict()) == {"method", "gain", "offset", "r2", "rmse_before", "rmse_after", "n_pixels"}


def test_histogram_knots_thinned_only_for_many_distinct_values():
    rng = np.random.default_rng(11)
    n = 70_000
    x = rng.gamma(2.0, 0.1, (2, n))
    y = np.sqrt(x)
    x[1] = np.round(x[1], 2)  # few distinct values: kept exactly
    thin = radiometry.fit_normalisation(x, y, method="histogram")
    exact = radiometry.fit_normalisation(x, y, method="histogram", max_knots=None)
    assert exact.knots[0].size == n
    assert 1000 < thin.knots[0].size <= 4096
    assert thin.knots[0][0] == x[0].min()
    assert thin.knots[0][-1] == x[0].max()
    assert np.array_equal(thin.knots[1], exact.knots[1])
    assert np.array_equal(thin.mapped[1], exact.mapped[1])
    probe = np.vstack([np.linspace(-0.1, 2.0, 5000)] * 2)
    assert np.abs(thin.apply(probe) - exact.apply(probe)).max() < 1e-3 * np.ptp(y)
    legacy = radiometry._match_cumulative_cdf(x[0], y[0], probe[0])
    assert np.array_equal(legacy.astype(np.float32), exact.apply(probe)[0])


def test_orthogonal_regression_and_none():
    x = np.linspace(0, 1, 50)
    gain, offset, degenerate = radiometry._orthogonal_regression(x, 2 * x + 1)
    assert_allclose((gain, offset), (2, 1), atol=1e-12)
    assert not degenerate
    gain, offset, degenerate = radiometry._orthogonal_regression(np.ones(50), x)
    assert degenerate
    assert gain == 1.0
    x2 = np.stack([x, x])
    norm = radiometry.fit_normalisation(x2, x2 + 1, method="none")
    assert np.array_equal(norm.apply(x2), x2.astype(np.float32))
    rep = norm.report(x2, x2 + 1)
    assert rep.rmse_after == rep.rmse_before == (1.0, 1.0)


def test_sample_validation_errors():
    rng = np.random.default_rng(0)
    x = rng.random((3, 200))
    with pytest.raises(ValueError, match="same shape"):
        radiometry.fit_normalisation(x, x[:, :100])
    with pytest.raises(ValueError, match=r"\(bands, n\)"):
        radiometry.fit_normalisation(x[0], x[0])
    with pytest.raises(ValueError, match="method"):
        radiometry.fit_normalisation(x, x, method="magic")
    with pytest.raises(ValueError, match="unknown option"):
        radiometry.fit_normalisation(x, x, method="linear", max_knots=3)
    with pytest.raises(ValueError, match="unknown option"):
        radiometry.normalize(x.reshape(3, 10, 20), x.reshape(3, 10, 20), method="histogram", tol=1)
    with pytest.raises(ValueError, match="at least 8 samples"):
        radiometry.fit_normalisation(x[:, :7], x[:, :7], method="irmad")
    with pytest.raises(ValueError, match="at least 2 samples"):
        radiometry.fit_normalisation(x[:, :1], x[:, :1], method="linear")
    with pytest.raises(ValueError, match="no samples"):
        radiometry.fit_normalisation(x[:, :0], x[:, :0])
    bad = x.copy()
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        radiometry.fit_normalisation(bad, x, method="irmad")
    with pytest.raises(ValueError, match="max_iter"):
        radiometry.irmad(x, x, max_iter=0)
    with pytest.raises(ValueError, match="invariant_probability"):
        radiometry.fit_normalisation(x, x, method="irmad", invariant_probability=1.5)
    with pytest.raises(ValueError, match="max_knots"):
        radiometry.fit_normalisation(x, x, method="histogram", max_knots=3)
    norm = radiometry.fit_normalisation(x, x, method="linear")
    with pytest.raises(ValueError, match="bands"):
        norm.apply(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="valid must have shape"):
        norm.apply(np.zeros((3, 4, 4)), np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="3 bands"):
        norm.report(x[:2], x[:2])
