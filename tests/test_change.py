import numpy as np
import pytest
from numpy.testing import assert_allclose
from skimage.metrics import structural_similarity

from changedetect import change
from conftest import textured


def test_ssim_matches_skimage():
    a = textured((96, 96), seed=1)
    b = np.clip(a + 0.05 * textured((96, 96), seed=2), 0, 1).astype(np.float32)
    ssim, cs = change.ssim_components(a, b, sigma=1.5)
    _, ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True)
    assert ssim.dtype == np.float32
    assert_allclose(ssim, ref, atol=1e-4)
    assert np.all(cs <= 1 + 1e-6)


def test_ssim_invalid_window_is_nan():
    a = textured((64, 64), seed=3)
    valid = np.ones(a.shape, bool)
    valid[:, :10] = False
    ssim, _ = change.ssim_components(a, a, valid=valid, sigma=1.5)
    assert np.isnan(ssim[:, :10]).all()
    assert np.isnan(ssim[:, 10 + 4]).all()  # window radius 5 touches invalid pixels
    assert_allclose(ssim[:, 20:], 1.0, atol=1e-5)


def test_difference_magnitude_known_answer_and_dtype():
    a = np.zeros((3, 4, 4), np.float32)
    b = a.copy()
    b[0] += 0.3
    b[1] += 0.4
    d = change.difference_magnitude(a, b)
    assert d.dtype == np.float32
    assert_allclose(d, np.sqrt((0.09 + 0.16) / 3), rtol=1e-6)
    assert change.difference_magnitude(a.astype(np.float64), b.astype(np.float64)).dtype == np.float64


def test_shape_mismatch_is_value_error():
    with pytest.raises(ValueError, match="same shape"):
        change.difference_magnitude(np.zeros((3, 4, 4)), np.zeros((3, 4, 5)))


def test_excess_green():
    img = np.zeros((3, 2, 2), np.float32)
    img[1] = 1.0  # pure green
    assert_allclose(change.excess_green(img), 2.0)
    img[:] = 0.5  # grey
    assert_allclose(change.excess_green(img), 0.0)


def _scene_pair():
    before = np.stack([textured((128, 128), seed=s) for s in (4, 5, 6)])
    rng = np.random.default_rng(7)
    after = np.clip(before + rng.normal(0, 0.01, before.shape), 0, 1).astype(np.float32)
    after[:, 40:70, 50:90] = np.stack([textured((30, 40), seed=s, sigma=0.7) for s in (8, 9, 10)])
    return before, after


def test_score_flags_planted_rubble_not_unchanged():
    before, after = _scene_pair()
    layers = change.change_layers(before, after, pixel_size=0.5)
    inside = layers.score[45:65, 55:85]
    outside = layers.score[90:, :]
    assert np.nanmean(inside) > 0.6
    assert np.nanpercentile(outside, 99) < 0.3
    assert layers.score.dtype == np.float32
    assert np.nanmin(layers.score) >= 0
    assert np.nanmax(layers.score) <= 1


def test_score_ignores_colour_only_change():
    before, _ = _scene_pair()
    after = before.copy()
    after[:, 40:70, 50:90] = np.clip(after[:, 40:70, 50:90] * 0.6 + 0.3, 0, 1)  # repainted, same pattern
    layers = change.change_layers(before, after, pixel_size=0.5)
    assert np.nanmean(layers.score[45:65, 55:85]) < 0.3


def test_inputs_not_modified():
    before, after = _scene_pair()
    b0, a0 = before.copy(), after.copy()
    change.change_layers(before, after, pixel_size=0.5)
    assert np.array_equal(before, b0)
    assert np.array_equal(after, a0)


def test_otsu_valid_constant_and_empty():
    assert change.threshold_otsu_valid(np.full((4, 4), 0.2)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no finite"):
        change.threshold_otsu_valid(np.full((4, 4), np.nan))


@pytest.mark.parametrize("mode", ["reflect", "nearest"])
@pytest.mark.parametrize("sigma", [0.6, 1.5, 3.2])
def test_gaussian_equals_scipy(mode, sigma):
    from scipy import ndimage as ndi

    from changedetect.change import gaussian

    a = textured((97, 131)).astype(np.float32)
    np.testing.assert_allclose(gaussian(a, sigma, mode), ndi.gaussian_filter(a, sigma, mode=mode), atol=1e-6)
