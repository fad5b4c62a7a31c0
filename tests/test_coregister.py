"""Known-answer tests of the global co-registration (changedetect.coregister).

Sign convention under test: ``moving[r + dy, c + dx] ~= reference[r, c]``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import data as skdata

from changedetect import coregister as cr
from changedetect.coregister import (
    ShiftEstimate,
    TiePoints,
    apply_shift,
    estimate_shift,
    estimate_shift_tiles,
    prepare,
)

# ---------------------------------------------------------------------------
# Synthetic imagery
# ---------------------------------------------------------------------------


def _texture_spectrum(n: int, seed: int) -> np.ndarray:
    """Spectrum of a periodic, band-limited random texture (fine + coarse scales)."""
    rng = np.random.default_rng(seed)
    spec = np.fft.fft2(rng.standard_normal((n, n)))
    f2 = np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None, :] ** 2
    gain = np.exp(-2 * (np.pi * 1.5) ** 2 * f2) + 3 * np.exp(
        -2 * (np.pi * 9.0) ** 2 * f2
    )
    return spec * gain


def texture(n: int, seed: int) -> np.ndarray:
    """A band-limited random texture, float64, std about 1."""
    img = np.fft.ifft2(_texture_spectrum(n, seed)).real
    return img / img.std()


def shifted_pair(
    n: int, shift: tuple[float, float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(reference, moving) with moving[r + dy, c + dx] == reference[r, c] exactly.

    The texture is periodic and band-limited, so the Fourier shift is an exact
    translation; both images are cropped from its interior.
    """
    margin = int(math.ceil(max(abs(s) for s in shift))) + 8
    size = n + 2 * margin
    spec = _texture_spectrum(size, seed)
    scale = np.fft.ifft2(spec).real.std()
    ref = np.fft.ifft2(spec).real / scale
    mov = np.fft.ifft2(ndi.fourier_shift(spec, shift)).real / scale
    inner = slice(margin, margin + n)
    return ref[inner, inner].astype(np.float32), mov[inner, inner].astype(np.float32)


def spline_pair(
    image: np.ndarray, shift: tuple[float, float], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a real image and a cubic-spline shifted copy of it (same crop)."""
    image = np.asarray(image, np.float64)
    moved = ndi.shift(image, shift, order=3, mode="reflect")
    r0 = (image.shape[0] - n) // 2
    c0 = (image.shape[1] - n) // 2
    return image[r0 : r0 + n, c0 : c0 + n], moved[r0 : r0 + n, c0 : c0 + n]


def assert_shift(est: ShiftEstimate, shift: tuple[float, float], atol: float) -> None:
    err = max(abs(est.dy - shift[0]), abs(est.dx - shift[1]))
    assert err < atol, f"error {err:.4f} px for {shift}: {est}"


@pytest.fixture(scope="module")
def pair_384() -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    shift = (7.4, -3.7)
    ref, mov = shifted_pair(384, shift, seed=3)
    return ref, mov, shift


@pytest.fixture(scope="module")
def unrelated_256() -> tuple[np.ndarray, np.ndarray]:
    return texture(256, 100).astype(np.float32), texture(256, 200).astype(np.float32)


# ---------------------------------------------------------------------------
# Known shifts
# ---------------------------------------------------------------------------

SHIFTS = [(0.3, -0.3), (7.4, -3.7), (-40.25, 25.6), (60.0, -59.35)]


@pytest.mark.parametrize("shift", SHIFTS, ids=["0.3px", "7.4px", "40px", "60px"])
@pytest.mark.parametrize("mode", ["default", "global", "tiles"])
def test_known_shift_textured(shift: tuple[float, float], mode: str) -> None:
    ref, mov = shifted_pair(256, shift, seed=1)
    if mode == "tiles":
        est = estimate_shift_tiles(ref, mov, max_shift=64, tile=128)
        assert est.method == "tiles"
    else:
        est = estimate_shift(ref, mov, max_shift=64, consensus=mode == "default")
    assert_shift(est, shift, atol=0.05)
    assert est.reliable
    assert est.peak_ratio > 2.0
    assert est.n_valid > 0


def test_sign_convention_integer_crop() -> None:
    big = texture(320, 7)
    dy, dx = 3, -5
    ref = big[40:296, 40:296]
    mov = big[40 - dy : 296 - dy, 40 - dx : 296 - dx]
    # moving[r + dy, c + dx] == reference[r, c]
    np.testing.assert_array_equal(mov[10 + dy, 20 + dx], ref[10, 20])
    est = estimate_shift(ref, mov, max_shift=16)
    assert_shift(est, (dy, dx), atol=0.01)
    assert est.shift == (est.dy, est.dx)


def test_camera_subpixel() -> None:
    shift = (5.3, -2.6)
    ref, mov = spline_pair(skdata.camera(), shift, 384)
    est = estimate_shift(ref, mov, max_shift=16)
    assert_shift(est, shift, atol=0.05)
    assert est.reliable


def test_rgb_uint8_bands() -> None:
    shift = (-2.45, 6.8)
    rgb = np.moveaxis(skdata.astronaut(), -1, 0).astype(np.float64)
    pairs = [spline_pair(band, shift, 384) for band in rgb]
    ref = np.stack([p[0] for p in pairs]).round().clip(0, 255).astype(np.uint8)
    mov = np.stack([p[1] for p in pairs]).round().clip(0, 255).astype(np.uint8)
    est = estimate_shift(ref, mov, max_shift=16)
    assert_shift(est, shift, atol=0.05)
    assert est.reliable


def test_max_shift_zero_still_subpixel() -> None:
    shift = (0.4, -0.35)
    ref, mov = shifted_pair(192, shift, seed=4)
    est = estimate_shift(ref, mov, max_shift=0)
    assert_shift(est, shift, atol=0.05)


def test_small_image() -> None:
    shift = (1.6, -2.2)
    ref, mov = shifted_pair(64, shift, seed=5)
    est = estimate_shift(ref, mov, max_shift=8)
    assert est.method == "global"
    assert_shift(est, shift, atol=0.05)


# ---------------------------------------------------------------------------
# Radiometric differences, no-data, dtypes
# ---------------------------------------------------------------------------


def test_gain_gamma_noise_blur(
    pair_384: tuple[np.ndarray, np.ndarray, tuple[float, float]],
) -> None:
    ref, mov, shift = pair_384
    rng = np.random.default_rng(11)
    unit = (mov - mov.min()) / np.ptp(mov)
    other = 180.0 * unit**0.6 + 40.0  # gain, offset and gamma
    other = ndi.gaussian_filter(other, 1.0)  # blur
    other = other + rng.normal(0.0, 0.15 * other.std(), other.shape)  # noise
    est = estimate_shift(ref, other.astype(np.float32))
    assert_shift(est, shift, atol=0.05)
    assert est.reliable


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.uint16, np.int16, np.float16, np.float32, np.float64]
)
def test_input_dtypes(dtype: type) -> None:
    shift = (2.3, -4.6)
    ref, mov = shifted_pair(192, shift, seed=6)
    if np.issubdtype(dtype, np.integer):
        scale = 30.0 if dtype is np.uint8 else 1000.0
        offset = (
            128.0 if dtype is np.uint8 else (30000.0 if dtype is np.uint16 else 0.0)
        )
        ref = np.round(ref * scale + offset).astype(dtype)
        mov = np.round(mov * scale + offset).astype(dtype)
    else:
        ref, mov = ref.astype(dtype), mov.astype(dtype)
    est = estimate_shift(ref, mov, max_shift=16)
    assert_shift(est, shift, atol=0.05)


def test_nodata_masks() -> None:
    shift = (4.6, -7.3)
    ref, mov = shifted_pair(256, shift, seed=8)
    rows, cols = np.indices(ref.shape)
    ref_valid = rows + cols > 100  # no-data triangle in the top-left corner
    mov_valid = cols < 210  # no-data stripe on the right
    results = []
    for fill in (0.0, 1.0e4):
        r = np.where(ref_valid, ref, fill).astype(np.float32)
        m = np.where(mov_valid, mov, -fill).astype(np.float32)
        est = estimate_shift(
            r, m, reference_valid=ref_valid, moving_valid=mov_valid, max_shift=16
        )
        assert_shift(est, shift, atol=0.05)
        results.append((est.dy, est.dx))
    # The value under the mask must not matter at all.
    assert results[0] == pytest.approx(results[1], abs=1e-6)


def test_nan_counts_as_nodata() -> None:
    shift = (-3.2, 2.7)
    ref, mov = shifted_pair(256, shift, seed=9)
    mov = mov.copy()
    mov[:, :40] = np.nan
    est = estimate_shift(ref, mov, max_shift=16)
    assert_shift(est, shift, atol=0.05)
    valid = np.isfinite(mov)
    est2 = estimate_shift(
        ref, np.nan_to_num(mov, nan=500.0), moving_valid=valid, max_shift=16
    )
    assert (est.dy, est.dx) == pytest.approx((est2.dy, est2.dx), abs=1e-6)


def test_three_d_valid_mask() -> None:
    shift = (1.25, 3.5)
    ref, mov = shifted_pair(192, shift, seed=10)
    stack = np.stack([mov, mov * 2.0])
    valid = np.ones(stack.shape, bool)
    valid[1, :, :30] = False  # a pixel is valid only if valid in every band
    est = estimate_shift(ref, stack, moving_valid=valid, max_shift=16)
    assert_shift(est, shift, atol=0.05)


# ---------------------------------------------------------------------------
# Robustness: changed scenes, unrelated images
# ---------------------------------------------------------------------------


def _paste_changed_patch(mov: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    other = texture(mov.shape[0], seed).astype(np.float32)
    side = int(round(mov.shape[0] * math.sqrt(fraction)))
    out = mov.copy()
    out[40 : 40 + side, 60 : 60 + side] = other[40 : 40 + side, 60 : 60 + side]
    return out


@pytest.mark.parametrize("fraction", [0.3, 0.4])
def test_changed_patch_default(
    pair_384: tuple[np.ndarray, np.ndarray, tuple[float, float]], fraction: float
) -> None:
    ref, mov, shift = pair_384
    changed = _paste_changed_patch(mov, fraction, seed=99)
    est = estimate_shift(ref, changed)
    assert_shift(est, shift, atol=0.05)
    assert est.reliable


def test_changed_patch_tiles(
    pair_384: tuple[np.ndarray, np.ndarray, tuple[float, float]],
) -> None:
    ref, mov, shift = pair_384
    changed = _paste_changed_patch(mov, 0.4, seed=98)
    est = estimate_shift_tiles(ref, changed, tile=128)
    assert_shift(est, shift, atol=0.05)
    assert est.reliable
    assert est.method == "tiles"
    assert est.n_inliers >= 5
    assert est.rmse < 0.1


def test_mostly_changed_scene_tiles(
    pair_384: tuple[np.ndarray, np.ndarray, tuple[float, float]],
) -> None:
    # 80 % of the scene replaced: whole-image correlation has no usable peak,
    # the windows that still see the old content agree.
    ref, mov, shift = pair_384
    changed = _paste_changed_patch(mov, 0.8, seed=97)
    est = estimate_shift_tiles(ref, changed, tile=128)
    assert est.reliable
    assert_shift(est, shift, atol=0.1)
    ties = est.tie_points
    assert ties is not None
    assert int(ties.accepted.sum()) == est.n_inliers < len(ties)


def test_unrelated_images_unreliable(
    unrelated_256: tuple[np.ndarray, np.ndarray],
) -> None:
    a, b = unrelated_256
    for est in (
        estimate_shift(a, b, tile=96),
        estimate_shift(a, b, consensus=False),
        estimate_shift_tiles(a, b, tile=64),
    ):
        assert not est.reliable
        assert est.peak_ratio < 1.5 or est.method == "tiles"


def test_flat_image_gives_nan() -> None:
    flat = np.full((96, 96), 7.0, np.float32)
    est = estimate_shift(flat, flat.copy(), max_shift=8)
    assert math.isnan(est.dy)
    assert math.isnan(est.dx)
    assert not est.reliable
    assert est.method == "none"
    assert est.as_dict()["dy"] is None


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def test_tie_points_and_json(
    pair_384: tuple[np.ndarray, np.ndarray, tuple[float, float]],
) -> None:
    ref, mov, shift = pair_384
    est = estimate_shift_tiles(ref, mov, tile=128)
    ties = est.tie_points
    assert isinstance(ties, TiePoints)
    assert len(ties) == 9
    for name in ("row", "col", "dy", "dx", "peak_ratio", "n_valid", "accepted"):
        assert getattr(ties, name).shape == (9,)
    assert ties.accepted.dtype == bool
    assert est.n_inliers == int(ties.accepted.sum()) == 9
    np.testing.assert_allclose(ties.dy[ties.accepted], shift[0], atol=0.05)
    np.testing.assert_allclose(ties.dx[ties.accepted], shift[1], atol=0.05)
    assert ties.row.min() == pytest.approx(63.5)
    assert ties.row.max() == pytest.approx(319.5)
    report = est.as_dict(tie_points=True)
    text = json.dumps(report, allow_nan=False)
    back = json.loads(text)
    assert back["method"] == "tiles"
    assert back["reliable"] is True
    assert len(back["tie_points"]["dy"]) == 9
    assert set(est.as_dict()) == {
        "dy",
        "dx",
        "peak_ratio",
        "n_valid",
        "reliable",
        "method",
        "n_inliers",
        "n_outliers",
        "rmse",
        "shadows_masked",
    }


def test_global_estimate_json_has_no_nan() -> None:
    ref, mov = shifted_pair(128, (1.5, 2.5), seed=2)
    est = estimate_shift(ref, mov, consensus=False, max_shift=8)
    assert est.method == "global"
    assert est.tie_points is None
    report = est.as_dict(tie_points=True)
    assert report["rmse"] is None
    assert report["tie_points"] is None
    json.dumps(report, allow_nan=False)
    assert isinstance(report["dy"], float)
    assert isinstance(report["n_valid"], int)


def test_estimate_is_frozen() -> None:
    ref, mov = shifted_pair(64, (1.5, 2.5), seed=2)
    est = estimate_shift(ref, mov, max_shift=4)
    with pytest.raises(AttributeError):
        est.dy = 0.0  # type: ignore[misc]


def test_inputs_not_modified() -> None:
    ref, mov = shifted_pair(192, (2.5, 1.5), seed=12)
    mov = mov.copy()
    mov[:10] = np.nan
    ref_valid = np.ones(ref.shape, bool)
    ref_valid[-12:] = False
    copies = [a.copy() for a in (ref, mov, ref_valid)]
    estimate_shift(ref, mov, reference_valid=ref_valid, max_shift=8, tile=64)
    estimate_shift_tiles(ref, mov, reference_valid=ref_valid, max_shift=8, tile=64)
    prepare(mov, valid=np.isfinite(mov))
    apply_shift(mov, (1.5, -0.5), valid=np.isfinite(mov))
    for before, after in zip(copies, (ref, mov, ref_valid), strict=True):
        np.testing.assert_array_equal(before, after)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_shift": -1}, "max_shift"),
        ({"max_shift": float("nan")}, "max_shift"),
        ({"upsample_factor": 0}, "upsample_factor"),
        ({"upsample_factor": 2.5}, "upsample_factor"),
        ({"sigma_low": 3.0, "sigma_high": 2.0}, "sigma_high"),
        ({"sigma_low": 0.0}, "sigma_low"),
        ({"tile": 32}, "tile"),
        ({"step": 0}, "step"),
        ({"min_inliers": 0}, "min_inliers"),
        ({"min_peak_ratio": -1.0}, "min_peak_ratio"),
        ({"reference_valid": np.ones((10, 10), bool)}, "reference_valid"),
        ({"moving_valid": np.zeros((64, 64), bool)}, "moving_valid"),
    ],
)
def test_invalid_settings(kwargs: dict, match: str) -> None:
    img = texture(64, 1)
    with pytest.raises(ValueError, match=match):
        estimate_shift(img, img, **kwargs)


def test_invalid_images() -> None:
    img = texture(64, 1)
    with pytest.raises(ValueError, match="same"):
        estimate_shift(img, img[:60])
    with pytest.raises(ValueError, match="reference"):
        estimate_shift(img[0], img)
    with pytest.raises(ValueError, match="moving"):
        estimate_shift(img, img[None, None])
    with pytest.raises(ValueError, match="moving"):
        estimate_shift(img, img.astype(complex))
    with pytest.raises(ValueError, match="16 x 16"):
        estimate_shift(img[:8, :8], img[:8, :8])
    with pytest.raises(ValueError, match="tile"):
        estimate_shift_tiles(img, img, tile=16)


# ---------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------


def test_prepare_outputs_and_masks() -> None:
    img = texture(128, 2).astype(np.float32) * 20 + 100
    img[:, 96:] = 100.0  # a flat, texture-less strip
    valid = np.ones(img.shape, bool)
    valid[:32, :32] = False
    feature, weight = prepare(img, valid=valid)
    assert feature.dtype == np.float32
    assert weight.dtype == np.float32
    assert feature.shape == weight.shape == img.shape
    assert np.isfinite(feature).all()
    assert set(np.unique(weight)) <= {0.0, 1.0}
    assert not weight[~valid].any()
    assert not feature[~valid].any()
    # The no-data edge is eroded: pixels right next to it carry no weight.
    assert not weight[32:34, :30].any()
    assert not weight[:30, 32:34].any()
    # Flat areas carry no weight (away from the textured edge).
    assert not weight[:, 110:].any()
    assert weight[40:90, 40:90].mean() > 0.9


def test_prepare_nodata_does_not_bleed() -> None:
    img = texture(128, 3).astype(np.float32)
    valid = np.ones(img.shape, bool)
    valid[50:70, 50:70] = False
    a = np.where(valid, img, 0.0).astype(np.float32)
    b = np.where(valid, img, 1.0e6).astype(np.float32)
    fa, wa = prepare(a, valid=valid)
    fb, wb = prepare(b, valid=valid)
    np.testing.assert_allclose(fa, fb, atol=1e-4)
    np.testing.assert_array_equal(wa, wb)


def test_prepare_bands_and_dtype() -> None:
    img = np.stack([texture(64, 4), texture(64, 5)])
    feature, weight = prepare((img * 40 + 120).astype(np.uint8))
    assert feature.shape == (64, 64)
    assert feature.dtype == np.float32
    assert weight.any()
    with pytest.raises(ValueError, match="valid"):
        prepare(img, valid=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="texture_threshold"):
        prepare(img, texture_threshold=-0.1)


# ---------------------------------------------------------------------------
# apply_shift
# ---------------------------------------------------------------------------


def test_apply_shift_integer_sign() -> None:
    img = np.arange(100.0).reshape(10, 10)
    out, ok = apply_shift(img, (2.0, -1.0))
    # out[r, c] == img[r + 2, c - 1]
    assert out[3, 4] == img[5, 3]
    assert ok[:8, 1:].all()
    assert not ok[8:].any()
    assert not ok[:, 0].any()
    assert np.isnan(out[~ok]).all()


def test_apply_shift_aligns_estimate(
    pair_384: tuple[np.ndarray, np.ndarray, tuple[float, float]],
) -> None:
    ref, mov, _ = pair_384
    est = estimate_shift(ref, mov, consensus=False)
    aligned, ok = apply_shift(mov, est.shift, order=3)
    assert aligned.dtype == np.float32
    assert ok.mean() > 0.95
    inner = ok.copy()
    inner[:16], inner[-16:], inner[:, :16], inner[:, -16:] = False, False, False, False
    residual = (aligned - ref)[inner]
    assert np.sqrt(np.mean(residual**2)) < 0.01 * ref.std() + 1e-3


def test_apply_shift_dtypes_and_masks() -> None:
    img = (np.arange(3 * 20 * 20) % 251).reshape(3, 20, 20).astype(np.uint8)
    valid = np.ones((20, 20), bool)
    valid[5, 5] = False
    out, ok = apply_shift(img, (0.5, 0.0), valid=valid, fill_value=-1.0)
    assert out.shape == img.shape
    assert out.dtype == np.float64
    assert not ok[4, 5]
    assert not ok[5, 5]
    assert ok[6, 5]
    assert (out[:, ~ok] == -1.0).all()
    out16, _ = apply_shift(img[0].astype(np.float16), (0.0, 0.0))
    assert out16.dtype == np.float32
    with pytest.raises(ValueError, match="shift"):
        apply_shift(img, (np.nan, 0.0))
    with pytest.raises(ValueError, match="order"):
        apply_shift(img, (0.0, 0.0), order=6)
    with pytest.raises(ValueError, match="valid"):
        apply_shift(img, (0.0, 0.0), valid=np.ones((3, 3), bool))


# ---------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------


def test_upsampled_dft_matches_inverse_fft() -> None:
    rng = np.random.default_rng(13)
    a, b = rng.standard_normal((2, 24, 30))
    spec = np.conj(np.fft.rfft2(a)) * np.fft.rfft2(b)
    full = np.fft.irfft2(spec, s=a.shape)
    out = cr._upsampled_dft(spec, 30, (0.0, 0.0), 1, 5)
    expected = full[np.ix_(np.arange(-2, 3) % 24, np.arange(-2, 3) % 30)]
    np.testing.assert_allclose(out / (24 * 30), expected, atol=1e-10)
    # Odd number of columns: no Nyquist column.
    a, b = rng.standard_normal((2, 16, 15))
    spec = np.conj(np.fft.rfft2(a)) * np.fft.rfft2(b)
    out = cr._upsampled_dft(spec, 15, (1.0, -2.0), 1, 1)
    assert out[0, 0] / (16 * 15) == pytest.approx(
        np.fft.irfft2(spec, s=(16, 15))[1, -2]
    )


def test_ncc_surface_matches_brute_force() -> None:
    rng = np.random.default_rng(14)
    f = rng.standard_normal((12, 10))
    g = rng.standard_normal((16, 14))
    wf = (rng.random(f.shape) > 0.2).astype(np.float32)
    wg = (rng.random(g.shape) > 0.2).astype(np.float32)
    surface = cr._ncc_surface(f, wf, g, wg, 1.0)
    for sy in range(-2, 3):
        for sx in range(-2, 3):
            gs = g[2 + sy : 14 + sy, 2 + sx : 12 + sx]
            ws = wf * wg[2 + sy : 14 + sy, 2 + sx : 12 + sx]
            m = ws > 0
            expected = np.corrcoef(f[m], gs[m])[0, 1]
            assert surface[2 + sy, 2 + sx] == pytest.approx(expected, abs=1e-4)


def test_peak_ratio() -> None:
    surface = np.full((11, 11), 0.1)
    surface[5, 5] = 0.8
    surface[4, 5] = 0.7  # inside the exclusion zone
    surface[0, 10] = 0.2
    assert cr._peak_ratio(surface, (5, 5)) == pytest.approx(4.0)
    assert cr._peak_ratio(-surface, (5, 5)) == 0.0
    lone = np.full((11, 11), -np.inf)
    lone[5, 5] = 0.5
    assert cr._peak_ratio(lone, (5, 5)) == 1000.0


def test_consensus_rejects_outliers() -> None:
    rng = np.random.default_rng(15)
    dy = np.r_[3.0 + rng.normal(0, 0.05, 8), 20.0, -31.0, 3.8, 12.0, 12.4]
    dx = np.r_[-1.0 + rng.normal(0, 0.05, 8), 5.0, 40.0, -1.9, -7.0, -7.3]
    usable = np.ones(dy.size, bool)
    usable[9] = False
    cy, cx, inliers, rmse, rival = cr._consensus(dy, dx, usable)
    assert inliers[:8].all()
    assert not inliers[8:].any()
    assert cy == pytest.approx(dy[:8].mean())
    assert cx == pytest.approx(dx[:8].mean())
    assert rmse < 0.15
    assert rival == 2
    empty = cr._consensus(dy, dx, np.zeros(dy.size, bool))
    assert math.isnan(empty[0])
    assert not empty[2].any()


def test_downsample_masks_blocks() -> None:
    lum = np.arange(16, dtype=np.float32).reshape(4, 4)
    mask = np.ones((4, 4), bool)
    mask[0, 0] = False
    out, valid = cr._downsample(lum, mask)
    assert out.shape == (2, 2)
    assert valid.tolist() == [[False, True], [True, True]]
    assert out[1, 1] == pytest.approx(lum[2:, 2:].mean())


def test_taper_is_flat_in_the_middle() -> None:
    taper = cr._taper1d(64, 0.25)
    assert taper[8:56] == pytest.approx(1.0)
    assert taper[0] < 0.05
    assert taper[-1] < 0.05
    np.testing.assert_allclose(taper, taper[::-1])


# ---------------------------------------------------------------------------
# Geometric models (register): translation, affine, field, refusal
# ---------------------------------------------------------------------------


def warped_pair(n: int, disp, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(reference, moving) with moving[p + d(p)] ~= reference[p] for a displacement d."""
    big = texture(n + 64, seed)
    ref = big[32 : 32 + n, 32 : 32 + n].astype(np.float32)
    r, c = np.mgrid[0:n, 0:n].astype(np.float64)
    qr, qc = r.copy(), c.copy()
    for _ in range(5):  # invert p = q + d(q)
        dy, dx = disp(qr, qc)
        qr, qc = r - dy, c - dx
    mov = ndi.map_coordinates(big, [qr + 32, qc + 32], order=3, mode="reflect")
    return ref, mov.astype(np.float32)


def max_model_error(reg: cr.Registration, disp, n: int, margin: int = 48) -> float:
    r, c = np.mgrid[margin : n - margin : 16, margin : n - margin : 16].astype(np.float64)
    dy, dx = reg.model.displacement(r, c)
    ty, tx = disp(r, c)
    return float(np.hypot(dy - ty, dx - tx).max())


def test_register_translation_known_answer() -> None:
    def disp(r, c):
        return np.full_like(r, 4.3), np.full_like(c, -2.6)

    ref, mov = warped_pair(320, disp)
    reg = cr.register(ref, mov, max_shift=16, window=64)
    assert reg.model.kind == "translation"
    assert reg.reliable
    assert max_model_error(reg, disp, 320) < 0.05
    assert reg.rmse < 0.1
    assert reg.n_used >= 16
    assert reg.candidates["affine"]["supported"]


def test_register_affine_rotation_known_answer() -> None:
    t = math.radians(0.8)
    centre = 159.5

    def disp(r, c):
        rr, cc = r - centre, c - centre
        return (math.cos(t) - 1) * rr + math.sin(t) * cc + 1.5, -math.sin(t) * rr + (
            math.cos(t) - 1
        ) * cc - 2.0

    ref, mov = warped_pair(320, disp)
    reg = cr.register(ref, mov, max_shift=16, window=64)
    assert reg.model.kind == "affine"
    assert reg.reliable
    assert max_model_error(reg, disp, 320) < 0.1
    assert abs(reg.model.parameters((320, 320))["rotation_deg"]) == pytest.approx(0.8, abs=0.02)
    # the translation-only cap falls back and says so
    capped = cr.register(ref, mov, max_shift=16, window=64, model="translation")
    assert capped.model.kind == "translation"


def test_register_local_field_known_answer() -> None:
    n = 384

    def disp(r, c):
        return 2.0 + 1.5 * np.sin(2 * np.pi * c / 700.0) * np.cos(np.pi * r / 700.0), -1.0 + 1.5 * np.cos(
            2 * np.pi * r / 700.0
        ) * np.sin(np.pi * c / 700.0)

    ref, mov = warped_pair(n, disp)
    reg = cr.register(ref, mov, max_shift=16, window=64, spacing=48)
    assert reg.model.kind == "field"
    assert reg.reliable
    assert not reg.model.is_linear
    assert max_model_error(reg, disp, n) < 0.25
    assert reg.candidates["field"]["cv_rmse_px"] < reg.candidates["affine"]["cv_rmse_px"]
    # applied in memory, the field brings the moving image back onto the reference
    aligned, ok = cr.apply_model(mov, reg.model)
    inner = ok.copy()
    inner[:48], inner[-48:], inner[:, :48], inner[:, -48:] = False, False, False, False
    before = np.abs(mov - ref)[inner].mean()
    after = np.abs(aligned - ref)[inner].mean()
    assert after < 0.05 * before


def test_register_refuses_unrelated_images() -> None:
    a = texture(320, 11).astype(np.float32)
    b = texture(320, 12).astype(np.float32)
    reg = cr.register(a, b, max_shift=32, window=64)
    assert not reg.reliable
    assert reg.model.kind == "none"
    assert reg.notes
    d = reg.as_dict((320, 320))
    assert d["reliable"] is False
    json.dumps(d, allow_nan=False)


def test_register_changed_patch_ignored() -> None:
    def disp(r, c):
        return np.full_like(r, -3.4), np.full_like(c, 5.2)

    ref, mov = warped_pair(320, disp)
    mov = mov.copy()
    mov[40:180, 60:200] = texture(140, 99)[:, :140]
    reg = cr.register(ref, mov, max_shift=16, window=64)
    assert reg.reliable
    assert max_model_error(reg, disp, 320) < 0.05
    assert reg.n_rejected >= 3


def test_model_selection_needs_significance() -> None:
    rng = np.random.default_rng(2841)
    simple = rng.normal(1.0, 0.1, 40) ** 2
    assert not cr._richer_is_better(simple * 0.97, simple)
    assert cr._richer_is_better(simple * 0.5, simple)
    assert cr._wilcoxon_greater(np.zeros(10)) == 1.0


def test_dark_threshold_bimodal_only() -> None:
    rng = np.random.default_rng(2841)
    unimodal = rng.normal(0.5, 0.1, (128, 128)).astype(np.float32)
    mask = np.ones_like(unimodal, bool)
    assert cr._dark_threshold(unimodal, mask) is None
    bimodal = unimodal + 0.0
    bimodal[:40] = rng.normal(0.1, 0.03, (40, 128))
    t = cr._dark_threshold(bimodal, mask)
    assert t is not None
    assert 0.15 < t < 0.45
    # a dark majority is not a shadow class
    assert cr._dark_threshold(1.0 - bimodal, mask) is None


def test_spline_crop_matches_ndimage_shift() -> None:
    g = texture(72, 3).astype(np.float32)
    coef = ndi.spline_filter(g, order=3, mode="mirror", output=np.float32)
    got = cr._spline_crop(coef, 0.37, -1.62, 4, 64, 64)
    want = ndi.shift(g, (-0.37, 1.62), order=3, mode="nearest")[4:68, 4:68]
    np.testing.assert_allclose(got[6:-6, 6:-6], want[6:-6, 6:-6], atol=1e-4)


def test_geometric_model_source_coordinates() -> None:
    m = cr.GeometricModel.translation(1.5, -2.0)
    r, c = m.source_coordinates(np.array([0.0, 10.0]), np.array([5.0, 5.0]))
    np.testing.assert_allclose(r, [1.5, 11.5])
    np.testing.assert_allclose(c, [3.0, 3.0])
    assert cr.GeometricModel.identity().parameters((10, 10))["shift_at_centre_px"] == {"dy": 0.0, "dx": 0.0}


def test_apply_model_matches_apply_shift_and_follows_a_field():
    """apply_model resamples through any model: a translation as apply_shift does, an affine exactly."""
    from changedetect.coregister import GeometricModel, apply_model, apply_shift

    rng = np.random.default_rng(3)
    img = ndi.gaussian_filter(rng.standard_normal((96, 80)), 3.0).astype(np.float32)
    out, ok = apply_model(img, GeometricModel.translation(2.25, -1.5), order=3)
    ref, rok = apply_shift(img, (2.25, -1.5), order=3)
    np.testing.assert_array_equal(ok, rok)
    np.testing.assert_allclose(out[ok], ref[ok], atol=1e-5)
    # an affine model: linear content is reproduced exactly wherever valid
    rr, cc = np.mgrid[0:96, 0:80].astype(np.float32)
    ramp = 0.5 * rr + 0.25 * cc
    m = GeometricModel("affine", np.array([[1.01, 0.002, 1.3], [-0.003, 0.99, -2.1]]))
    out, ok = apply_model(ramp, m, order=1)
    sr, sc = m.source_coordinates(rr, cc)
    assert ok.mean() > 0.8
    np.testing.assert_allclose(out[ok], (0.5 * sr + 0.25 * sc)[ok], atol=1e-3)
    # invalid source pixels make the outputs that touch them invalid
    valid = np.ones_like(img, bool)
    valid[40:50, 30:40] = False
    _, ok = apply_model(img, GeometricModel.translation(0.5, 0.5), valid=valid, order=3)
    assert not ok[40:49, 30:39].any() and ok[60:90, 50:70].all()


# ---------------------------------------------------------------------------
# Partial coverage: windows over the pixels valid in both images
# ---------------------------------------------------------------------------


def test_overlap_bbox_and_area_boxes() -> None:
    ref_ok = np.ones((200, 300), bool)
    mov_ok = np.zeros((200, 300), bool)
    mov_ok[120:190, 40:260] = True
    assert cr._overlap_bbox(ref_ok, mov_ok) == (120, 40, 70, 220)
    assert cr._overlap_bbox(ref_ok, np.zeros_like(mov_ok)) is None
    # A 64 px grid over that box: every window inside it, side by side.
    boxes = cr._area_boxes((120, 40, 70, 220), (200, 300), 64, 64, 100)
    assert len(boxes) == 3
    for r0, c0, h, w in boxes:
        assert (h, w) == (64, 64)
        assert r0 >= 120
        assert r0 + h <= 190
        assert c0 >= 40
        assert c0 + w <= 260
    # A box narrower than a window is widened around its centre, inside the grid.
    (r0, c0, h, w), = cr._area_boxes((180, 10, 20, 30), (200, 300), 64, 64, 100)
    assert (r0, c0, h, w) == (136, 0, 64, 64)


def test_register_partial_coverage_known_answer() -> None:
    # The after image covers only the bottom 40 % of the before grid (like a
    # post-event tile cut from another mosaic): every tie window lies where
    # both images have data, and the shift is found.
    n = 512
    shift = (3.4, -2.2)
    ref, mov = shifted_pair(n, shift, seed=21)
    mov_ok = np.zeros((n, n), bool)
    mov_ok[300:, 20:] = True
    mov = np.where(mov_ok, mov, 0.0).astype(np.float32)
    reg = cr.register(ref, mov, moving_valid=mov_ok, max_shift=32)
    assert reg.reliable
    tp = reg.tie_points
    half = reg.window / 2.0
    assert (tp.row - half >= 300 - 0.5).all()
    assert (tp.col - half >= 20 - 0.5).all()
    dy, dx = reg.model.displacement(400.0, 256.0)
    assert abs(dy - shift[0]) < 0.05
    assert abs(dx - shift[1]) < 0.05
    est = estimate_shift(ref, mov, moving_valid=mov_ok, max_shift=32)
    assert est.reliable
    assert_shift(est, shift, 0.05)


# ---------------------------------------------------------------------------
# Noisy tie points: reliability from the model's precision and spatial structure
# ---------------------------------------------------------------------------


def test_structure_p_noise_vs_smooth_misfit() -> None:
    rng = np.random.default_rng(2841)
    r, c = (v.ravel().astype(np.float64) for v in np.mgrid[0:512:64, 0:512:64])
    noise = rng.normal(0.0, 1.0, (2, r.size))
    assert cr._structure_p(r, c, *noise) > 0.05
    # A rotation the model misses: neighbours are off in the same direction.
    t = 0.004
    ey, ex = t * (c - 256.0), -t * (r - 256.0)
    assert cr._structure_p(r, c, ey + 0.2 * noise[0], ex + 0.2 * noise[1]) < 0.01
    # Deterministic, and undefined for fewer than 6 points.
    assert cr._structure_p(r, c, *noise) == cr._structure_p(r, c, *noise)
    assert math.isnan(cr._structure_p(r[:5], c[:5], ey[:5], ex[:5]))


def _blockwise_pair(n: int, block: int, base: tuple[float, float], sigma: float, seed: int):
    """A translation plus an independent offset per ``block`` px block (like objects that lean)."""
    offsets = np.random.default_rng(seed).normal(0.0, sigma, (n // block, n // block, 2))

    def disp(r, c):
        i = np.clip((r // block).astype(int), 0, n // block - 1)
        j = np.clip((c // block).astype(int), 0, n // block - 1)
        return base[0] + offsets[i, j, 0], base[1] + offsets[i, j, 1]

    ref, mov = warped_pair(n, disp, seed=7)
    return ref, mov, offsets.reshape(-1, 2).mean(axis=0)


def test_register_noisy_tie_points_are_averaged_out() -> None:
    # Every 64 px block moved by its own random offset (sd 1 px per axis):
    # single tie points scatter by more than 1 px, but without spatial
    # structure; their mean pins the translation down.
    base = (2.3, -1.7)
    ref, mov, mean_offset = _blockwise_pair(512, 64, base, 1.0, seed=1)
    reg = cr.register(ref, mov, max_shift=16, window=64)
    assert reg.model.kind == "translation"
    assert 1.0 < reg.rmse <= 2.0
    assert reg.reliable
    assert reg.model_se < 0.3
    assert reg.structure_p >= 0.05
    assert any("tie-point noise" in note for note in reg.notes)
    truth = np.asarray(base) + mean_offset
    assert np.hypot(*(np.asarray(reg.model.displacement(255.5, 255.5)) - truth)) < 0.4
    d = reg.as_dict((512, 512))
    assert d["model_se_px"] == pytest.approx(reg.model_se)
    json.dumps(d, allow_nan=False)


def test_register_structured_misfit_stays_unreliable() -> None:
    # A 0.5 degree rotation that the translation-only cap cannot model: the
    # residuals are as large as tie-point noise, but neighbours agree, so the
    # translation is not passed off as reliable.
    n = 512
    t = math.radians(0.5)
    centre = (n - 1) / 2.0

    def disp(r, c):
        rr, cc = r - centre, c - centre
        return (math.cos(t) - 1) * rr + math.sin(t) * cc + 1.5, -math.sin(t) * rr + (
            math.cos(t) - 1
        ) * cc - 2.0

    ref, mov = warped_pair(n, disp, seed=7)
    reg = cr.register(ref, mov, max_shift=16, window=64, model="translation")
    assert reg.model.kind == "translation"
    assert 1.0 < reg.rmse <= 2.0
    assert reg.structure_p < 0.05
    assert not reg.reliable
    assert any("spatial structure" in note for note in reg.notes)
