import dataclasses

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


# --------------------------------------------------------------------------- texture/edge term
def _stripes(shape=(64, 64), period=8, contrast=0.4):
    cols = np.arange(shape[1])
    row = 0.5 + 0.5 * contrast * np.sign(np.sin(2 * np.pi * cols / period))
    return np.broadcast_to(row, shape).astype(np.float32).copy()


def _rubble(shape=(64, 64), seed=0, contrast=0.4):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    blobs = ndi.gaussian_filter(rng.random(shape), 1.0)
    blobs = (blobs - blobs.mean()) / blobs.std()
    return (0.5 + 0.5 * contrast * np.clip(blobs, -1, 1)).astype(np.float32)


def test_orientation_coherence_known_answers():
    core = (slice(16, 48), slice(16, 48))
    stripes = change.orientation_coherence(_stripes(), derivative_sigma=0.75, integration_sigma=2.0)
    rubble = change.orientation_coherence(_rubble(), derivative_sigma=0.75, integration_sigma=2.0)
    flat = change.orientation_coherence(np.full((64, 64), 0.5, np.float32), derivative_sigma=0.75,
                                        integration_sigma=2.0)
    assert stripes.dtype == np.float32
    assert np.all((stripes >= 0) & (stripes < 1))
    assert stripes[core].min() > 0.9  # one gradient direction: (l1 - 0) / (l1 + eps)
    strong = change.orientation_coherence(_stripes(contrast=1.0), derivative_sigma=0.75, integration_sigma=2.0)
    assert strong[core].min() > 0.98  # the more contrast, the less eps counts
    assert rubble[core].mean() < 0.4  # gradients in every direction
    assert_allclose(flat, 0.0)  # no gradient: not coherent
    # a straight edge of too little contrast for SSIM's texture scale is not coherent either
    faint = change.orientation_coherence(_stripes(contrast=0.01), derivative_sigma=0.75, integration_sigma=2.0)
    assert faint[core].max() < 0.1


def test_coherence_change_sign_reach_and_invalid():
    before, after = _stripes(), _rubble()
    kw = {"derivative_sigma": 0.75, "integration_sigma": 2.0}
    drop = change.coherence_change(before, after, valid=np.ones(before.shape, bool), **kw)
    assert drop[16:48, 16:48].mean() > 0.5  # straight edges broke up
    gain = change.coherence_change(after, before, valid=np.ones(before.shape, bool), **kw)
    assert gain[16:48, 16:48].mean() < -0.5
    same = change.coherence_change(before, before, valid=np.ones(before.shape, bool), **kw)
    assert_allclose(same, 0.0)
    valid = np.ones(before.shape, bool)
    valid[:, :8] = False
    out = change.coherence_change(before, after, valid=valid, **kw)
    reach = change.coherence_reach(0.75, 2.0)
    assert np.isnan(out[:, : 8 + reach]).all()
    assert np.isfinite(out[:, 8 + reach :]).all()
    # the reach is honest: changing a pixel further away changes nothing
    a2 = after.copy()
    a2[:, 40] = 0.0
    moved = change.coherence_change(before, a2, valid=np.ones(before.shape, bool), **kw)
    far = np.abs(np.arange(64) - 40) > reach
    np.testing.assert_array_equal(moved[:, far], drop[:, far])


def test_coherence_weight_fuses_the_term_and_zero_leaves_the_score():
    before = np.stack([_stripes((96, 96))] * 3)
    after = before.copy()
    after[:, 30:66, 30:66] = np.stack([_rubble((36, 36), seed=s) for s in (1, 2, 3)])
    plain = change.change_layers(before, after, pixel_size=0.5)
    off = change.change_layers(before, after, pixel_size=0.5, coherence_weight=0.0, coherence_layer=False)
    on = change.change_layers(before, after, pixel_size=0.5, coherence_weight=1.0)
    np.testing.assert_array_equal(plain.score, off.score)
    assert np.nanmax(off.coherence_loss) == 0  # not computed
    inside = (slice(36, 60), slice(36, 60))
    assert np.nanmean(plain.coherence_loss[inside]) > 0.5  # layer written even at weight 0
    assert np.nanmin(on.coherence_loss) >= 0
    assert np.nanmax(on.coherence_loss) <= 1
    # structure evidence 1 - (1 - s)(1 - c): never below the plain score, higher inside
    assert np.all(on.score[np.isfinite(on.score)] >= plain.score[np.isfinite(plain.score)] - 1e-6)
    assert np.nanmean(on.score[inside]) > np.nanmean(plain.score[inside])
    assert set(plain.as_terms()) == {"difference_evidence", "structure_loss", "vegetation", "shadow_change",
                                     "coherence_loss"}


# --------------------------------------------------------------------------- moved shadows
def test_shadow_ratio_known_answer():
    values = np.concatenate([np.full(100, 0.1), np.full(300, 0.5), [np.nan]]).astype(np.float32)
    assert change.shadow_ratio(values, 0.3) == pytest.approx(0.2)
    assert change.shadow_ratio(values, 0.0) == 1.0  # no threshold
    assert change.shadow_ratio(np.full(100, 0.5, np.float32), 0.3) == 1.0  # no shadow


def _ground(shape=(80, 120), seed=3):
    return np.clip(0.55 + 0.5 * (_rubble(shape, seed=seed, contrast=0.3) - 0.5), 0, 1)


def test_relight_moved_shadows_relights_only_wide_real_shadows_that_moved():
    k = 0.3
    ground = _ground()
    before, after = ground.copy(), ground.copy()
    before[10:70, 20:40] *= k  # the shadow of a wall on the first date...
    after[10:70, 22:42] *= k  # ...has moved 2 px with the sun on the second
    before[10:50, 60:75] *= k  # the shadow of a tree torn away: gone on the second date
    after[60:62, 90:92] *= k  # a 1 m dark fragment of rubble: too small to be a cast shadow
    dark_roof = np.s_[20:40, 80:110]
    before[dark_roof] = after[dark_roof] = 0.2  # a dark roof, below the threshold on both dates
    after[dark_roof] = 0.17
    valid = np.ones(ground.shape, bool)
    lb, la, relit = change.relight_moved_shadows(before, after, valid=valid, thresholds=(0.3, 0.3),
                                                 ratios=(k, k), min_width_px=4, max_shift_px=2)
    assert relit[12:68, 20:22].all()  # in shadow on the first date only
    assert relit[12:68, 40:42].all()  # in shadow on the second date only
    assert not relit[12:68, 23:39].any()  # in shadow on both dates: left as it is
    assert not relit[10:50, 60:75].any()  # no shadow nearby on the other date: its caster is gone
    assert not relit[60:62, 90:92].any()  # a fragment narrower than min_width
    assert not relit[dark_roof].any()  # dark on both dates
    moved = np.zeros(relit.shape, bool)
    moved[:, [20, 21, 40, 41]] = True
    assert not relit[~moved].any()  # nowhere else
    assert_allclose(lb[12:68, 20:22], ground[12:68, 20:22], rtol=1e-5)  # relit: sunlit again
    assert_allclose(la[12:68, 40:42], ground[12:68, 40:42], rtol=1e-5)
    np.testing.assert_array_equal(lb[10:50, 60:75], before[10:50, 60:75])
    np.testing.assert_array_equal(la[60:62, 90:92], after[60:62, 90:92])
    # the structure loss of the moved shadow's edges is gone after relighting
    _, cs_plain = change.ssim_components(before, after, sigma=1.5)
    _, cs_relit = change.ssim_components(lb, la, sigma=1.5)
    for band in (np.s_[15:65, 18:24], np.s_[15:65, 38:44]):  # around both edges of the shadow
        assert np.mean(1 - cs_plain[band]) > 0.3
        assert np.mean(1 - cs_relit[band]) < 0.5 * np.mean(1 - cs_plain[band])
    # a larger shift allowed reaches the tree's shadow from the wall's (18 px away): relit
    _, _, far = change.relight_moved_shadows(before, after, valid=valid, thresholds=(0.3, 0.3),
                                             ratios=(k, k), min_width_px=4, max_shift_px=20)
    assert far[10:50, 60:75].any()


def test_shadow_relight_reach_covers_opening_and_shift():
    assert change.shadow_relight_reach(0.5, 2.0) == 4
    assert change.shadow_relight_reach(0.5, 2.0, 1.0) == 6
    assert change.shadow_relight_reach(0.5, 0.0, 0.0) == 0
    assert change.shadow_relight_reach(2.0, 2.0, 1.0) == 1  # at least the neighbouring pixels


def test_relight_at_coarse_pixels_takes_the_neighbouring_pixels():
    """At 2 m pixels a 1 m shift is sub-pixel: the edge pixels next to the other date's shadow are relit."""
    k = 0.3
    ground = _ground()
    before, after = ground.copy(), ground.copy()
    before[10:70, 20:40] *= k
    after[10:70, 21:41] *= k  # moved one pixel
    valid = np.ones(ground.shape, bool)
    kwargs = dict(valid=valid, thresholds=(0.3, 0.3), ratios=(k, k), min_width_px=1.0)
    _, _, relit = change.relight_moved_shadows(before, after, max_shift_px=0.5, **kwargs)
    assert relit[:, 20].sum() == relit[:, 40].sum() == 60
    assert relit.sum() == 120
    _, _, none = change.relight_moved_shadows(before, after, max_shift_px=0.0, **kwargs)
    assert not none.any()


def test_shadow_relight_lowers_a_moved_shadow_not_rubble_nor_a_vanished_shadow():
    k = 0.3
    ground = np.stack([_ground()] * 3)
    before, after = ground.copy(), ground.copy()
    before[:, 10:70, 20:40] *= k
    after[:, 10:70, 22:42] *= k  # moved 1 m with the sun
    before[:, 10:50, 60:75] *= k  # vanished with its caster
    after[:, 20:60, 85:115] = np.stack([_rubble((40, 30), seed=s) for s in (5, 6, 7)])  # rubble
    valid = np.ones(before.shape[1:], bool)
    stats = change.scene_statistics(change.scene_samples(before, after, valid=valid, pixel_size=0.5))
    # this ground is clipped, so Otsu's shadow threshold falls at the top of the shadows' values
    # and splits them; the relighting, not the threshold, is tested here
    stats = dataclasses.replace(stats, shadow=(0.3, 0.3))
    plain = change.change_layers(before, after, pixel_size=0.5, statistics=stats, shadow_relight=False)
    relit = change.change_layers(before, after, pixel_size=0.5, statistics=stats, shadow_relight=True,
                                 shadow_max_shift_m=1.0)
    edges = np.s_[15:65, 36:46]  # where the shadow moved in
    vanished = np.s_[15:45, 58:77]
    rubble = np.s_[25:55, 90:110]
    assert np.nanmean(relit.score[edges]) < 0.5 * np.nanmean(plain.score[edges])
    # SSIM centres the relit images on their own mean: the same up to float rounding
    assert_allclose(relit.score[vanished], plain.score[vanished], atol=1e-5)
    assert np.nanmean(relit.score[rubble]) == pytest.approx(np.nanmean(plain.score[rubble]), abs=0.02)
    np.testing.assert_array_equal(relit.ssim, plain.ssim)  # the SSIM layer is of the plain luminance
