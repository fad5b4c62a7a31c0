"""Applying a displacement-field model: the fast sampler against scipy, known answers, strips."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from changedetect import coregister as cr
from changedetect import io
from changedetect.grid import Grid
from conftest import rgb_scene


class Wave:
    """A smooth displacement residual (rows, cols) -> (n, 2), like a fitted thin-plate field."""

    smoothing = 0.0
    _rbf = None  # what coregister.reframe carries over

    def __init__(self, amp: float = 1.5, period: float = 400.0) -> None:
        self.amp, self.period = amp, period

    def __call__(self, rows, cols):
        r, c = np.ravel(rows), np.ravel(cols)
        k = 2 * np.pi / self.period
        return np.column_stack([self.amp * np.sin(k * c) + 0.4 * np.cos(k * r),
                                -self.amp * np.cos(k * r) + 0.3 * np.sin(k * c)])


def field_model(dy=2.3, dx=-1.6, **kw) -> cr.GeometricModel:
    return cr.GeometricModel("field", np.array([[1.0, 0.0, dy], [0.0, 1.0, dx]]), Wave(**kw))


def grid_of(path) -> Grid:
    return io.raster_info(path).grid


@pytest.mark.parametrize("shape", [(1, 9), (2, 5), (5, 5), (13, 40), (64, 48)])
def test_bspline_coefficients_match_scipy(shape):
    rng = np.random.default_rng(sum(shape))
    band = (rng.random(shape) * 255).astype(np.float32)
    coef, pad = io._padded_coefficients(band, 2, 3)
    assert coef.shape == (shape[0] + 2 * pad, shape[1] + 2 * pad)
    ref = ndi.spline_filter(band.astype(np.float64), order=3, mode="mirror")
    # the inner 2 pixels of padding are the mirrored coefficients
    want = ref
    for axis, n in enumerate(shape):
        widths = [(0, 0), (0, 0)]
        widths[axis] = (2, 2)
        want = np.pad(want, widths, mode="reflect" if n > 1 else "edge")
    got = coef[pad - 2 : coef.shape[0] - pad + 2, pad - 2 : coef.shape[1] - pad + 2]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_tap_sampler_matches_map_coordinates(order):
    rng = np.random.default_rng(order)
    h, w = 37, 53
    coef = [(rng.random((h, w)) * 200 - 50).astype(np.float32) for _ in range(2)]
    padded = [io._padded_coefficients(c, 2, 1)[0] for c in coef]  # mirrored, no prefilter
    # points anywhere in the window, to half a pixel beyond its edges
    pr = rng.uniform(-0.5, h - 0.5, 5000)
    pc = rng.uniform(-0.5, w - 0.5, 5000)
    pr[:4], pc[:4] = [-0.5, h - 0.5, 0.0, h - 1.0], [w - 0.5, -0.5, 0.0, w - 1.0]
    ok = np.ones(pr.size, bool)
    ok[7] = False
    outs = [np.empty(pr.size, np.float32) for _ in coef]
    io._TapSampler(padded, 2, order, None).sample(pr, pc, ok, outs)
    for c, got in zip(coef, outs, strict=True):
        want = ndi.map_coordinates(c.astype(np.float64), [pr, pc], order=order, mode="mirror", prefilter=False)
        assert np.isnan(got[7])
        np.testing.assert_allclose(np.delete(got, 7), np.delete(want, 7), rtol=0, atol=1e-3)


def scipy_field_warp(image, valid, rows, cols, order):
    """The straightforward way (scipy's spline filter and map_coordinates per band), as a reference."""
    # no-data takes the value of the nearest valid pixel (as the warp does)
    idx = ndi.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    fill = [b[idx[0], idx[1]] for b in image]
    h, w = valid.shape
    ok = (rows >= -0.5) & (rows <= h - 0.5) & (cols >= -0.5) & (cols <= w - 0.5)
    if not valid.all():
        support = ndi.map_coordinates(valid.astype(np.float64), [rows, cols], order=1, mode="constant", cval=0.0)
        ok &= support >= 1 - 1e-4
    out = []
    for b in fill:
        coef = ndi.spline_filter(b.astype(np.float64), order=3, mode="mirror") if order == 3 else b
        vals = ndi.map_coordinates(coef, [rows, cols], order=order, mode="mirror", prefilter=False)
        out.append(np.where(ok, vals, np.nan))
    return np.stack(out), ok


@pytest.mark.parametrize(("resampling", "order"), [("cubic", 3), ("bilinear", 1), ("nearest", 0)])
@pytest.mark.parametrize("with_nodata", [False, True])
def test_field_warp_equals_scipy_reference(make_raster, resampling, order, with_nodata):
    image = rgb_scene((90, 110), seed=4).astype(np.float32)
    valid = np.ones((90, 110), bool)
    if with_nodata:
        valid[:, :12] = False  # a no-data stripe and a hole
        valid[40:52, 60:75] = False
        image[:, ~valid] = 0
    path = make_raster(image, nodata=0 if with_nodata else None)
    if with_nodata:  # no pixel of the scene itself is 0
        assert (image[:, valid] > 0).all()
    model = field_model(amp=2.0, period=150.0)
    grid = grid_of(path)
    # nodes on every pixel: the reference uses the model's own coordinates
    got, ok, *_ = io.warp_with_model(path, grid, model, resampling=resampling, node_spacing=1)
    rr, cc = np.mgrid[0:90, 0:110].astype(np.float64)
    rows, cols = model.source_coordinates(rr, cc)
    want, want_ok = scipy_field_warp(image, valid, rows, cols, order)
    assert (ok != want_ok).sum() <= 2  # a point right on the support threshold may go either way
    both = ok & want_ok
    assert both.mean() > (0.7 if with_nodata else 0.95)
    np.testing.assert_allclose(got[:, both], want[:, both], rtol=0, atol=2e-3)
    assert np.isnan(got[:, ~ok]).all()


def test_field_warp_recovers_a_planted_smooth_shift(make_raster):
    """The after image is a smooth pattern seen through a smooth field: the warp gives it back."""
    n = 160
    model = field_model(dy=1.7, dx=-2.4, amp=1.8, period=500.0)

    def pattern(r, c):
        return 120 + 50 * np.sin(2 * np.pi * (r / 23.0 + c / 37.0)) + 30 * np.cos(2 * np.pi * (c / 19.0 - r / 41.0))

    rr, cc = np.mgrid[0:n, 0:n].astype(np.float64)
    after = pattern(rr, cc).astype(np.float32)
    path = make_raster(np.stack([after, 255 - after]))
    sr, sc = model.source_coordinates(rr, cc)
    want = pattern(sr, sc)

    def errors(**kw):
        out, valid, *_ = io.warp_with_model(path, grid_of(path), model, **kw)
        inner = valid.copy()
        inner[:8], inner[-8:], inner[:, :8], inner[:, -8:] = False, False, False, False
        assert inner.sum() > 0.8 * n * n
        np.testing.assert_allclose(out[1][inner], 255 - out[0][inner], atol=1e-3)
        err = np.abs(out[0] - want)[inner]
        return float(np.median(err)), float(err.max())

    # the interpolator alone (nodes on every pixel): the pattern spans 160 levels
    med, worst = errors(node_spacing=1)
    assert med < 0.002
    assert worst < 0.05
    assert errors(node_spacing=1, resampling="bilinear")[0] > 50 * med
    # the default node grid adds the bilinear approximation of the field between its nodes
    med, worst = errors()
    assert med < 0.08
    assert worst < 0.4


@pytest.mark.parametrize("with_nodata", [False, True])
def test_field_warp_in_strips_equals_one_pass(make_raster, with_nodata):
    """Row windows of the grid (nodes on the same rows) give the pixels of one warp of the whole grid."""
    image = rgb_scene((150, 120), seed=8)
    if with_nodata:  # a no-data corner and a hole: their fill must not depend on the window
        image[:, :30, :25] = 0
        image[:, 90:100, 50:70] = 0
        image[:, image.min(axis=0) == 0] = 0
    path = make_raster(image, nodata=0 if with_nodata else None)
    grid = grid_of(path)
    model = field_model(amp=2.5, period=200.0)
    whole, whole_ok, *_ = io.warp_with_model(path, grid, model)
    # [0, 65) ends on node row 64; [64, 150) starts on it and ends on the last row, as the whole grid
    for r0, r1 in ((0, 65), (64, 150), (32, 150)):
        sgrid = grid.window_grid(r0, 0, r1 - r0, grid.width)
        part, ok, *_ = io.warp_with_model(path, sgrid, cr.reframe(model, 1.0, (r0, 0)))
        np.testing.assert_array_equal(ok, whole_ok[r0:r1])
        np.testing.assert_allclose(part, whole[:, r0:r1], rtol=0, atol=1e-3)


def test_bands_are_sampled_independently(make_raster):
    image = rgb_scene((70, 80), seed=3)
    path = make_raster(image)
    model = field_model()
    allb, ok, *_ = io.warp_with_model(path, grid_of(path), model)
    one, ok1, *_ = io.warp_with_model(path, grid_of(path), model, bands=[2])
    np.testing.assert_array_equal(ok, ok1)
    np.testing.assert_array_equal(allb[1], one[0])
