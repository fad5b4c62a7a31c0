import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage as ndi
from skimage.metrics import structural_similarity

from changedetect import change
from changedetect.fastssim import _center, ssim_components_fast, ssim_kernel
from conftest import textured

C1, C2 = 0.01**2, 0.03**2


def _reference(
    before,
    after,
    *,
    window="gaussian",
    sigma=1.5,
    win_size=7,
    data_range=1.0,
    sample_cov=None,
):
    """The scikit-image definition in float64 with scipy filters (any image size)."""
    x, y = before.astype(np.float64), after.astype(np.float64)
    if window == "gaussian":
        size = 2 * int(3.5 * sigma + 0.5) + 1

        def filt(a):
            return ndi.gaussian_filter(a, sigma, truncate=3.5, mode="reflect")
    else:
        size = win_size

        def filt(a):
            return ndi.uniform_filter(a, size=win_size, mode="reflect")

    sample_cov = window == "uniform" if sample_cov is None else sample_cov
    norm = size * size / (size * size - 1) if sample_cov else 1.0
    ux, uy = filt(x), filt(y)
    vx = norm * (filt(x * x) - ux * ux)
    vy = norm * (filt(y * y) - uy * uy)
    vxy = norm * (filt(x * y) - ux * uy)
    c1, c2 = C1 * data_range**2, C2 * data_range**2
    cs = (2 * vxy + c2) / (vx + vy + c2)
    return (2 * ux * uy + c1) / (ux * ux + uy * uy + c1) * cs, cs


def _pair(kind, shape, seed=2841):
    rng = np.random.default_rng(seed)
    if kind == "random":
        a = rng.random(shape, dtype=np.float32)
        b = (0.6 * a + 0.4 * rng.random(shape, dtype=np.float32)).astype(np.float32)
    elif kind == "textured":
        a = textured(shape, seed=seed)
        b = np.clip(a + 0.1 * textured(shape, seed=seed + 1) - 0.05, 0, 1).astype(
            np.float32
        )
        b[: shape[0] // 3, : shape[1] // 3] = textured(
            (shape[0] // 3, shape[1] // 3), seed=seed + 2
        )
    else:  # near-flat and bright: float32 cancellation in E[x²] - E[x]² is worst here
        a = (0.95 + 1e-3 * rng.standard_normal(shape)).astype(np.float32)
        b = (0.95 + 1e-3 * rng.standard_normal(shape)).astype(np.float32)
    return a, b


@pytest.mark.parametrize("kind", ["random", "textured"])
@pytest.mark.parametrize("shape", [(11, 11), (64, 64), (37, 101), (129, 47)])
def test_gaussian_matches_skimage(kind, shape):
    a, b = _pair(kind, shape)
    ssim, cs = ssim_components_fast(a, b)
    assert ssim.dtype == cs.dtype == np.float32
    kw = {
        "gaussian_weights": True,
        "sigma": 1.5,
        "use_sample_covariance": False,
        "data_range": 1.0,
        "full": True,
    }
    _, ref64 = structural_similarity(a.astype(np.float64), b.astype(np.float64), **kw)
    _, ref32 = structural_similarity(a, b, **kw)
    assert_allclose(ssim, ref64, rtol=0, atol=1e-4)
    assert_allclose(cs, _reference(a, b)[1], rtol=0, atol=1e-4)
    # skimage's own float32 result is further from the exact (float64) value than
    # ours: ~1e-4 on the smooth texture, where E[x²] - E[x]² cancels.
    err, err_skimage32 = np.abs(ssim - ref64).max(), np.abs(ref32 - ref64).max()
    assert err <= err_skimage32 + 1e-6


@pytest.mark.parametrize("kind", ["random", "textured"])
@pytest.mark.parametrize(
    ("shape", "win_size"), [((64, 64), 7), ((37, 101), 3), ((50, 23), 11)]
)
def test_uniform_matches_skimage(kind, shape, win_size):
    a, b = _pair(kind, shape)
    ssim, cs = ssim_components_fast(a, b, window="uniform", win_size=win_size)
    _, ref = structural_similarity(
        a.astype(np.float64),
        b.astype(np.float64),
        win_size=win_size,
        data_range=1.0,
        full=True,
    )
    assert_allclose(ssim, ref, rtol=0, atol=1e-4)
    assert_allclose(
        cs, _reference(a, b, window="uniform", win_size=win_size)[1], rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("sigma", [0.8, 2.5])
def test_other_sigma_and_data_range(sigma):
    a, b = _pair("textured", (80, 70))
    a8, b8 = np.round(a * 255).astype(np.float32), np.round(b * 255).astype(np.float32)
    ssim, _ = ssim_components_fast(a8, b8, sigma=sigma, data_range=255)
    _, ref = structural_similarity(
        a8.astype(np.float64),
        b8.astype(np.float64),
        gaussian_weights=True,
        sigma=sigma,
        use_sample_covariance=False,
        data_range=255,
        full=True,
    )
    assert_allclose(ssim, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("window", ["gaussian", "uniform"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (2, 3), (5, 5), (3, 17)])
def test_tiny_images_match_the_definition(window, shape):
    # scikit-image refuses images smaller than the window; the definition (scipy's
    # reflected filters) still holds, and so must we.
    a, b = _pair("random", shape)
    ssim, cs = ssim_components_fast(a, b, window=window)
    ref_ssim, ref_cs = _reference(a, b, window=window)
    assert ssim.shape == shape
    assert_allclose(ssim, ref_ssim, rtol=0, atol=1e-5)
    assert_allclose(cs, ref_cs, rtol=0, atol=1e-5)


def test_flat_bright_area_stays_accurate():
    # skimage's own float32 result is ~3e-4 off the exact value here; the common
    # shift before the second moments keeps ours well inside 1e-4.
    a, b = _pair("flat", (96, 96))
    ssim, cs = ssim_components_fast(a, b)
    ref_ssim, ref_cs = _reference(a, b)
    assert_allclose(ssim, ref_ssim, rtol=0, atol=1e-4)
    assert_allclose(cs, ref_cs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("window", ["gaussian", "uniform"])
@pytest.mark.parametrize("masked", [False, True])
def test_strips_and_threads_equal_whole_array(window, masked):
    a, b = _pair("textured", (61, 45))
    valid = None
    if masked:
        valid = np.ones(a.shape, bool)
        valid[20:23, 5:9] = False
        valid[-1, -1] = False
    whole = ssim_components_fast(
        a, b, valid=valid, window=window, strip_rows=a.shape[0], workers=1
    )
    for rows in (1, 2, 3, 7, 16):
        for workers in (1, 2, 3):
            parts = ssim_components_fast(
                a, b, valid=valid, window=window, strip_rows=rows, workers=workers
            )
            assert_array_equal(parts[0], whole[0])
            assert_array_equal(parts[1], whole[1])


def test_default_strips_on_a_wide_image_equal_whole_array():
    a, b = _pair("random", (70, 8192))  # default strips: 32 rows
    whole = ssim_components_fast(a, b, strip_rows=70, workers=1)
    parts = ssim_components_fast(a, b)
    assert_array_equal(parts[0], whole[0])
    assert_array_equal(parts[1], whole[1])


@pytest.mark.parametrize("window", ["gaussian", "uniform"])
def test_valid_mask_like_change_module(window):
    a, b = _pair("textured", (64, 72))
    valid = np.ones(a.shape, bool)
    valid[:, :10] = False
    valid[40:44, 50:53] = False
    a_nan = np.where(valid, a, np.nan).astype(np.float32)  # nodata as NaN must not leak
    ssim, cs = ssim_components_fast(a_nan, b, valid=valid, window=window)
    radius = 5 if window == "gaussian" else 3
    inner = ndi.binary_erosion(
        valid, structure=np.ones((3, 3), bool), iterations=radius, border_value=1
    )
    assert_array_equal(np.isfinite(ssim), inner)
    assert_array_equal(np.isfinite(cs), inner)
    if window == "gaussian":
        ref_ssim, ref_cs = change.ssim_components(
            a.astype(np.float64), b.astype(np.float64), valid=valid, sigma=1.5
        )
        assert_allclose(ssim, ref_ssim, rtol=0, atol=1e-4)
        assert_allclose(cs, ref_cs, rtol=0, atol=1e-4)
    else:
        ref_ssim, _ = _reference(
            np.where(valid, a, 0), np.where(valid, b, 0), window="uniform"
        )
        assert_allclose(ssim[inner], ref_ssim[inner], rtol=0, atol=1e-4)


def test_all_valid_mask_equals_no_mask():
    a, b = _pair("random", (40, 40))
    assert_array_equal(
        ssim_components_fast(a, b, valid=np.ones(a.shape, bool))[0],
        ssim_components_fast(a, b)[0],
    )


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.float16, np.float32),
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.uint8, np.float64),
    ],
)
def test_dtypes(dtype, expected):
    a, b = _pair("textured", (48, 48))
    scale = 255 if dtype == np.uint8 else 1
    a, b = (a * scale).astype(dtype), (b * scale).astype(dtype)
    ssim, cs = ssim_components_fast(a, b, data_range=scale)
    assert ssim.dtype == cs.dtype == expected
    ref, _ = _reference(a, b, data_range=scale)
    assert_allclose(ssim, ref, rtol=0, atol=1e-4 if expected == np.float32 else 1e-10)


def test_identical_images_give_one():
    a, _ = _pair("textured", (50, 50))
    ssim, cs = ssim_components_fast(a, a)
    assert_allclose(ssim, 1, atol=1e-5)
    assert_allclose(cs, 1, atol=1e-5)


def test_inputs_not_modified():
    a, b = _pair("random", (40, 33))
    valid = np.ones(a.shape, bool)
    valid[3, 4] = False
    copies = a.copy(), b.copy(), valid.copy()
    ssim_components_fast(a, b, valid=valid, strip_rows=5, workers=2)
    assert_array_equal(a, copies[0])
    assert_array_equal(b, copies[1])
    assert_array_equal(valid, copies[2])


def test_kernel_is_scipys():
    k = ssim_kernel(sigma=1.5)
    impulse = np.zeros(31)
    impulse[15] = 1
    assert_allclose(
        k, ndi.gaussian_filter1d(impulse, 1.5, truncate=3.5)[10:21], atol=1e-15
    )
    assert_allclose(ssim_kernel("uniform", win_size=7), np.full(7, 1 / 7))


def test_center_ignores_invalid_and_nonfinite():
    a = np.full((10, 10), 0.2, np.float32)
    b = np.full((10, 10), 0.4, np.float32)
    a[0, 0] = np.nan
    valid = np.ones((10, 10), bool)
    valid[5:] = False
    b[5:] = 100
    assert _center(a, b, valid) == pytest.approx(0.3)
    assert _center(a, b, np.zeros((10, 10), bool)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": "box"}, "window"),
        ({"window": "uniform", "win_size": 6}, "win_size"),
        ({"window": "uniform", "win_size": 1}, "sample covariance"),
        ({"sigma": 0}, "sigma"),
        ({"truncate": -1}, "truncate"),
        ({"data_range": 0}, "data_range"),
        ({"valid": np.ones((3, 3), bool)}, "valid"),
    ],
)
def test_bad_parameters(kwargs, match):
    a = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match=match):
        ssim_components_fast(a, a, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ssim_components_fast(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="2-D"):
        ssim_components_fast(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)))


def test_explicit_center_makes_overlapping_crops_identical():
    a, b = _pair("textured", (90, 60))
    whole = ssim_components_fast(a, b, center=0.4)[0]
    crop = ssim_components_fast(a[30:90], b[30:90], center=0.4)[0]
    assert_array_equal(crop[5:], whole[35:])  # beyond the window radius of the crop's edge
    other = ssim_components_fast(a, b, center=0.9)[0]
    assert_allclose(other, whole, rtol=0, atol=1e-4)
