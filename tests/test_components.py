"""Strip-wise connected components and mask clean-up equal their whole-array versions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from changedetect import damage
from changedetect.components import (
    BitMask, StripLabeler, clean_mask_strips, hysteresis_strips, refine_boundaries_strips,
)


def _blobs(seed: int, shape=(157, 93), density=0.45, sigma=1.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1 - density)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("rows", [1, 7, 32, 200])
def test_strip_labels_equal_scipy(connectivity, rows):
    mask = _blobs(connectivity * 100 + rows)
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    expected, n = ndi.label(mask, structure=structure)
    values = np.random.default_rng(1).random(mask.shape)
    lab = StripLabeler(*mask.shape, connectivity=connectivity)
    starts = list(range(0, mask.shape[0], rows))
    for a in starts:
        lab.add(mask[a : a + rows], sums={"v": values[a : a + rows]}, maxima={"v": values[a : a + rows]})
    comps = lab.finish()
    got = np.concatenate([lab.labels(i, mask[a : a + rows]) for i, a in enumerate(starts)])
    assert comps.n == n
    np.testing.assert_array_equal(got, expected)
    idx = np.arange(1, n + 1)
    np.testing.assert_array_equal(comps.counts[1:], np.bincount(expected.ravel())[1:])
    np.testing.assert_allclose(comps.sums["v"][1:], ndi.sum(values, expected, idx), rtol=1e-12)
    np.testing.assert_array_equal(comps.maxima["v"][1:], ndi.maximum(values, expected, idx))
    border = np.zeros(n + 1, bool)
    for edge in (expected[0], expected[-1], expected[:, 0], expected[:, -1]):
        border[edge] = True
    np.testing.assert_array_equal(comps.touches_border[1:], border[1:])


def test_strips_must_cover_the_image():
    lab = StripLabeler(10, 5)
    lab.add(np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="4 of 10 rows"):
        lab.finish()
    with pytest.raises(ValueError, match="5 columns"):
        StripLabeler(10, 5).add(np.ones((4, 6), bool))


def test_bitmask_round_trip():
    mask = _blobs(3, shape=(20, 13))
    bm = BitMask.from_array(mask)
    np.testing.assert_array_equal(bm.get(0, 20), mask)
    np.testing.assert_array_equal(bm.get(5, 9), mask[5:9])
    assert bm.count() == mask.sum()


@pytest.mark.parametrize("rows", [3, 16, 64, 400])
def test_clean_mask_strips_equals_whole(rows):
    mask = _blobs(7, shape=(230, 170), density=0.5, sigma=1.2)
    args = {"pixel_size": 0.5, "open_radius_m": 1.0, "close_radius_m": 1.0, "min_area_m2": 6.0, "max_hole_m2": 3.0}
    expected = damage.clean_mask(mask, **args)
    got = clean_mask_strips(BitMask.from_array(mask), strip_rows=rows, **args)
    np.testing.assert_array_equal(got.get(0, mask.shape[0]), expected)


@pytest.mark.parametrize("rows", [5, 50, 400])
def test_refine_boundaries_strips_equals_whole(rows):
    mask = _blobs(11, shape=(180, 120), density=0.4)
    score = np.random.default_rng(2).random(mask.shape).astype(np.float32)
    score[::17] = np.nan
    expected = damage.refine_boundaries(mask, score)
    got = refine_boundaries_strips(BitMask.from_array(mask), lambda a, b: score[a:b], strip_rows=rows)
    np.testing.assert_array_equal(got.get(0, mask.shape[0]), expected)


@pytest.mark.parametrize("rows", [4, 33, 400])
def test_hysteresis_strips_equals_whole(rows):
    score = ndi.gaussian_filter(np.random.default_rng(4).random((190, 110)), 2.0).astype(np.float32)
    score = (score - score.min()) / (score.max() - score.min())
    score[::23] = np.nan
    seeds = damage.clean_mask(np.nan_to_num(score) >= 0.7, pixel_size=0.5, open_radius_m=0, close_radius_m=0,
                              min_area_m2=0, max_hole_m2=0)
    expected = damage.hysteresis(seeds, score, 0.45)
    assert expected.sum() > seeds.sum() > 0
    got = hysteresis_strips(BitMask.from_array(seeds), lambda a, b: score[a:b], 0.45, strip_rows=rows)
    np.testing.assert_array_equal(got.get(0, score.shape[0]), expected)
