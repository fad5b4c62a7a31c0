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
