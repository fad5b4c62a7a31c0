"""End-to-end co-registration: model chosen and applied once, tie points, refusal."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import rasterio
from scipy import ndimage as ndi

from changedetect import coregister as cr
from changedetect import io
from changedetect import streaming
from changedetect import pipeline as pl
from changedetect.errors import CoregistrationWarning
from conftest import textured

N = 256


def warped_rgb(disp, *, seed=2841, n=N):
    """A textured RGB scene and a copy whose content is displaced by ``disp``."""
    big = textured((n + 64, n + 64), seed=seed, sigma=1.5)
    r, c = np.mgrid[0:n, 0:n].astype(np.float64)
    qr, qc = r.copy(), c.copy()
    for _ in range(5):
        dy, dx = disp(qr, qc)
        qr, qc = r - dy, c - dx
    moved = ndi.map_coordinates(big, [qr + 32, qc + 32], order=3, mode="reflect")
    before = big[32 : 32 + n, 32 : 32 + n]

    def rgb(t):
        return np.clip(np.stack([t, 0.9 * t + 0.05, 0.8 * t + 0.1]) * 255, 0, 255).astype(np.uint8)

    return rgb(before), rgb(moved)


def rotation(deg, n=N):
    t = math.radians(deg)
    centre = (n - 1) / 2.0

    def disp(r, c):
        rr, cc = r - centre, c - centre
        return (math.cos(t) - 1) * rr + math.sin(t) * cc + 1.2, -math.sin(t) * rr + (math.cos(t) - 1) * cc - 0.8

    return disp


def residual_px(before, after, valid, disp=None):
    """Largest offset left in 64 px windows (phase correlation, independent of the method)."""
    from skimage.registration import phase_cross_correlation

    a = before.mean(0).astype(np.float64)
    b = np.nan_to_num(after).mean(0).astype(np.float64)
    worst = 0.0
    for r in range(32, a.shape[0] - 96 + 1, 64):
        for c in range(32, a.shape[1] - 96 + 1, 64):
            sl = (slice(r, r + 64), slice(c, c + 64))
            assert valid[sl].all()
            shift, *_ = phase_cross_correlation(a[sl], b[sl], upsample_factor=50, normalization=None)
            worst = max(worst, float(np.hypot(*shift)))
    return worst


def run_pair(make_raster, before, after, tmp_path, **kwargs):
    b = make_raster(before, name="before.tif")
    a = make_raster(after, name="after.tif")
    grid = io.raster_info(b).grid
    ties = tmp_path / "tie_points.geojson"
    out, valid, report, _ = pl.coregister_pair(
        b, a, grid=grid, bands=[1, 2, 3], max_shift_px=16, upsample=20, resampling="cubic",
        max_pixels=io.DEFAULT_MAX_PIXELS, tie_points_path=ties, **kwargs,
    )
    return out, valid, report, ties


def test_affine_model_chosen_and_applied_once(make_raster, tmp_path, monkeypatch):
    before, after = warped_rgb(rotation(0.8))
    calls = {"model": 0}
    real = io.warp_with_model

    def counting(*args, **kwargs):
        calls["model"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "warp_with_model", counting)
    out, valid, report, ties = run_pair(make_raster, before, after, tmp_path, tie_window=64)
    assert calls["model"] == 1  # one resampling of the original after pixels
    assert report["model"] == "affine"
    assert report["reliable"] is True
    assert abs(report["parameters"]["rotation_deg"]) == pytest.approx(0.8, abs=0.03)
    assert report["tie_points"]["used"] >= 8
    assert report["residual_rmse_px"] < 0.2
    assert report["position_uncertainty_m"] == pytest.approx(report["residual_rmse_px"] * 0.5, abs=1e-3)
    assert report["ssim_stable_after_correction"] > report["ssim_stable_before_correction"]
    assert residual_px(before, out, valid) < 0.15
    json.dumps(report, allow_nan=False)
    import geopandas as gpd

    gdf = gpd.read_file(ties)
    assert gdf.crs.to_epsg() == 4326
    assert {"dy_px", "dx_px", "peak_ratio", "reliability", "accepted", "residual_px"} <= set(gdf.columns)
    assert int(gdf["accepted"].sum()) == report["tie_points"]["used"]


def test_local_field_model_applied(make_raster, tmp_path):
    n = 320

    def disp(r, c):
        return 1.5 + 1.5 * np.sin(2 * np.pi * c / 600.0) * np.cos(np.pi * r / 600.0), -2.0 + 1.5 * np.cos(
            2 * np.pi * r / 600.0
        ) * np.sin(np.pi * c / 600.0)

    before, after = warped_rgb(disp, n=n)
    out, valid, report, _ = run_pair(make_raster, before, after, tmp_path, tie_window=64, tie_spacing=40)
    assert report["model"] == "field"
    assert report["reliable"] is True
    assert residual_px(before, out, valid) < 0.3


def test_field_warp_matches_linear_warp_across_crs(make_raster, tmp_path):
    """The per-pixel (field) path and GDAL's affine path give the same pixels."""
    before, after = warped_rgb(lambda r, c: (np.full_like(r, 2.3), np.full_like(c, -1.4)))
    b = make_raster(before, name="b.tif")
    a = make_raster(after, name="a.tif")
    # the after image delivered in EPSG:4326
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(a) as src:
        t, w, h = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        arr = np.zeros((3, h, w), np.uint8)
        reproject(src.read(), arr, src_transform=src.transform, src_crs=src.crs, dst_transform=t,
                  dst_crs="EPSG:4326", resampling=Resampling.cubic)
    a4326 = tmp_path / "a4326.tif"
    with rasterio.open(a4326, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=t, nodata=0) as dst:
        dst.write(np.maximum(arr, 1))
    grid = io.raster_info(b).grid
    lin = cr.GeometricModel("affine", np.array([[1.0, 0.002, 2.3], [-0.001, 1.0, -1.4]]))

    class Zero:
        smoothing = 0.0

        def __call__(self, rows, cols):
            return np.zeros((np.size(rows), 2))

    field = cr.GeometricModel("field", lin.matrix, Zero())  # type: ignore[arg-type]
    x1, v1, *_ = io.warp_with_model(a4326, grid, lin, resampling="bilinear")
    x2, v2, *_ = io.warp_with_model(a4326, grid, field, resampling="bilinear")
    both = v1 & v2
    assert both.mean() > 0.8
    diff = np.abs(x1 - x2)[:, both]
    assert float(np.median(diff)) < 0.5
    assert float(np.percentile(diff, 99)) < 3.0


def test_refusal_warns_and_reports_unreliable(make_raster, tmp_path):
    before, _ = warped_rgb(lambda r, c: (r * 0, c * 0), seed=1)
    other, _ = warped_rgb(lambda r, c: (r * 0, c * 0), seed=2)
    with pytest.warns(CoregistrationWarning, match="not reliable"):
        out, valid, report, ties = run_pair(make_raster, before, other, tmp_path, tie_window=64)
    assert report["reliable"] is False
    assert report["model"] == "none"
    assert report["shift_px"] == {"dy": 0.0, "dx": 0.0}
    assert report["notes"]
    assert report["position_uncertainty_m"] == pytest.approx(16 * 0.5)
    assert ties.exists()


def test_uncertainty_columns():
    cols = streaming.uncertainty_columns(10.0, 2.0)
    assert cols == {"position_uncertainty_m": 2.0, "below_uncertainty": True}
    assert streaming.uncertainty_columns(100.0, 2.0)["below_uncertainty"] is False
    assert math.isnan(streaming.uncertainty_columns(5.0, None)["position_uncertainty_m"])


def test_detect_writes_tie_points_and_uncertainty(runner, pair, tmp_path):
    import geopandas as gpd

    from changedetect.cli.main import cli

    before, after = pair
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out)])
    assert res.exit_code == 0, res.output
    ties = gpd.read_file(out / "tie_points.geojson")
    assert len(ties) > 0
    assert ties.crs.to_epsg() == 4326
    reg = json.loads((out / "coregistration.json").read_text())
    for key in ("model", "global_shift_px", "global_shift_m", "tie_points", "residual_rmse_px",
                "ssim_stable_before_correction", "ssim_stable_after_correction", "reliable"):
        assert key in reg
    dmg = gpd.read_file(out / "damage.geojson")
    assert {"position_uncertainty_m", "below_uncertainty"} <= set(dmg.columns)
    assert dmg["position_uncertainty_m"].iloc[0] == pytest.approx(reg["position_uncertainty_m"], abs=1e-3)


def test_model_can_be_capped_from_the_pipeline(runner, pair, tmp_path):
    import json

    from changedetect.cli.main import cli

    before, after = pair
    out = tmp_path / "out"
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out), "--set", "coregister.model=translation"])
    assert res.exit_code == 0, res.output
    reg = json.loads((out / "coregistration.json").read_text())
    assert reg["model"] in ("translation", "none")
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(tmp_path / "o2"), "--set", "coregister.model=spline"])
    assert res.exit_code == 2
    assert "coregister.model" in res.stderr
