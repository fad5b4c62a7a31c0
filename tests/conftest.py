"""Shared fixtures: a CLI runner and small georeferenced rasters built on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.transform import from_origin
from scipy import ndimage as ndi

UTM = "EPSG:32637"
ORIGIN = (277000.0, 4010100.0)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def make_raster(tmp_path: Path):
    """Write ``array`` ((bands, rows, cols) or (rows, cols)) as a GeoTIFF and return its path."""
    counter = {"n": 0}

    def _make(array, *, transform=None, crs=UTM, nodata=None, name=None, res=0.5, tags=None):
        arr = np.asarray(array)
        if arr.ndim == 2:
            arr = arr[np.newaxis]
        counter["n"] += 1
        path = tmp_path / (name or f"raster{counter['n']}.tif")
        transform = transform or from_origin(*ORIGIN, res, res)
        profile = {
            "driver": "GTiff", "width": arr.shape[2], "height": arr.shape[1], "count": arr.shape[0],
            "dtype": arr.dtype.name, "crs": crs, "transform": transform, "nodata": nodata,
        }
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr)
            if tags:
                dst.update_tags(**tags)
        return path

    return _make


def textured(shape, *, seed=2841, sigma=2.0):
    """Band-limited random texture in [0, 1] (like roofs and streets at 0.5 m)."""
    rng = np.random.default_rng(seed)
    base = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    coarse = ndi.gaussian_filter(rng.standard_normal(shape), sigma * 6)
    img = 0.7 * base / base.std() + 0.6 * coarse / coarse.std()
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def rgb_scene(shape=(160, 160), *, seed=2841):
    """A 3-band uint8 textured scene."""
    t = textured(shape, seed=seed)
    bands = [t, 0.9 * t + 0.05, 0.8 * t + 0.1]
    return np.clip(np.stack(bands) * 255, 0, 255).astype(np.uint8)


#: Content displacement (dy, dx) of the ``pair`` fixture's after image, in pixels.
PAIR_SHIFT = (3.4, -5.7)


@pytest.fixture
def pair(make_raster):
    """A 160 px textured scene and a shifted, re-coloured copy with a planted 10 x 10 m change.

    The change covers rows 70:90 and columns 80:100 of the before image (0.5 m pixels).
    """
    before = rgb_scene((200, 200), seed=11)
    after = np.stack([ndi.shift(b.astype(np.float32), PAIR_SHIFT, order=3, mode="nearest") for b in before])
    after = np.clip(after * 1.15 + 8, 0, 255)
    rng = np.random.default_rng(5)
    rubble = ndi.gaussian_filter(rng.random((3, 20, 20)), (0, 0.6, 0.6)) * 255
    r0, c0 = 90 + round(PAIR_SHIFT[0]), 100 + round(PAIR_SHIFT[1])
    after[:, r0 : r0 + 20, c0 : c0 + 20] = rubble
    b = make_raster(before[:, 20:180, 20:180], name="before.tif")
    a = make_raster(after.astype(np.uint8)[:, 20:180, 20:180], name="after.tif")
    return b, a
