"""The detection chain in row strips, so memory does not grow with the scene.

Used by :func:`changedetect.pipeline.run`. Every stage reads the rows it needs
(a strip plus a halo as wide as the stage's neighbourhood) from the input and
intermediate files, and keeps scene-sized data only as 1-bit masks:

1. co-registration is estimated on the images (or, above
   :data:`COREG_MAX_PIXELS`, on block-averaged copies of them) and the after
   image is warped through the model from its original pixels strip by strip
   into ``after_coregistered.tif``;
2. the radiometric mapping is fitted on the unchanged-pattern pixels of the
   scene's sample bands (:func:`changedetect.tiling.sample_bands`);
3. the no-change statistics of the score are measured on the sample bands of
   the analysed region;
4. the change layers are computed strip by strip and written;
5. the damage mask is thresholded, cleaned and refined strip by strip, with
   whole-object steps done by strip-wise connected components
   (:mod:`changedetect.components`), then measured and polygonized; polygons
   that cross strip borders are joined.

Each pixel's values depend only on the images within the halo and on the scene
statistics, which are computed from rows fixed by the scene, so the outputs do
not depend on the strip size (tested against a single whole-scene strip).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from . import change as change_mod
from . import coregister as coreg
from . import damage as damage_mod
from .components import BitMask, StripLabeler, clean_mask_strips, hysteresis_strips, refine_boundaries_strips
from .errors import CoregistrationWarning, DataError, NoOverlapError
from .grid import Grid
from .tiling import STRIP_PIXELS, block_mean, rows_per_strip, sample_bands, strips

#: Scenes with more pixels than this are co-registered on block-averaged copies
#: (f x f blocks, f the smallest integer that brings them within it); the model
#: is then applied to the full-resolution pixels.
COREG_MAX_PIXELS = 1 << 23

#: With building footprints, an object counts as building damage when at least
#: this share of it lies on footprints (the 30 % rule of object recall); the
#: others are ground changes, written to their own layer.
MIN_BUILDING_SHARE = 0.3

#: SSIM centring constant for images scaled to about [0, 1] (the same for every
#: strip, so every strip gets the values of a whole-scene pass).
SSIM_CENTER = 0.5


def _lum(bands: np.ndarray) -> np.ndarray:
    """Mean of the bands, float32 (as the co-registration and SSIM code compute it)."""
    return bands.mean(axis=0, dtype=np.float32) if bands.shape[0] > 1 else bands[0].astype(np.float32)


def _round(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None


def _mean_over(values: np.ndarray, mask: np.ndarray) -> float | None:
    vals = values[mask & np.isfinite(values)]
    return round(float(vals.mean()), 4) if vals.size else None


# --------------------------------------------------------------------------- co-registration
@dataclass
class Alignment:
    """A fitted co-registration: the model on the reference grid and its report."""

    model: Any
    report: dict[str, Any]
    dtype: str
    nodata: float | None
    scale: float
    factor: int = 1
    tie_points: Any = None
    estimation_grid: Grid | None = None
    #: the aligned after image on the grid (source units, NaN where no data) and
    #: its valid mask, when estimated at full resolution and asked to keep it.
    aligned: tuple[np.ndarray, np.ndarray] | None = None


def estimation_factor(grid: Grid, max_pixels: int = COREG_MAX_PIXELS) -> int:
    """Block size ``f`` of the averaged copy co-registration is estimated on (1: none)."""
    return max(1, math.ceil(math.sqrt(grid.width * grid.height / max_pixels)))


def _decimated(grid: Grid, f: int) -> Grid:
    from affine import Affine

    if f == 1:
        return grid
    return Grid(grid.crs, grid.transform * Affine.scale(f), math.ceil(grid.width / f), math.ceil(grid.height / f))


def _decimated_warp(
    path: Path, grid: Grid, f: int, *, bands: list[int], resampling: str, max_pixels: int,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The raster warped onto ``grid``, averaged over f x f blocks.

    Done strip by strip, so memory stays that of a strip and of the result.
    """
    rows = max(f, (rows_per_strip(grid.width) // f) * f)
    parts, masks = [], []
    dtype = "float32"
    for s in strips(0, grid.height, size=rows, halo=0):
        sgrid = grid.window_grid(s.r0, 0, s.rows, grid.width)
        arr, ok, dtype, _ = io.warp_to_grid(path, sgrid, bands=bands, resampling=resampling,
                                            max_pixels=max_pixels, check=False)
        mean, good = block_mean(arr, ok, f)
        parts.append(mean)
        masks.append(good)
    return np.concatenate(parts, axis=1), np.concatenate(masks, axis=0), dtype


def _stable_area(reg: coreg.Registration, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of the windows of the accepted tie points (content that matches in both dates)."""
    out = np.zeros(shape, bool)
    tp = reg.tie_points
    if tp is None:
        return out
    half = reg.window / 2.0
    for r, c in zip(tp.row[tp.accepted], tp.col[tp.accepted], strict=True):
        r0, c0 = max(int(round(r - half + 0.5)), 0), max(int(round(c - half + 0.5)), 0)
        out[r0 : r0 + reg.window, c0 : c0 + reg.window] = True
    return out


def _ssim_map(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    ssim, _ = change_mod.ssim_components(a, b, valid=valid)
    return ssim


def estimate_alignment(
    before_path: Path,
    after_path: Path,
    *,
    grid: Grid,
    bands: list[int],
    max_shift_px: float,
    upsample: int,
    resampling: str,
    max_pixels: int,
    enabled: bool = True,
    reference: tuple[np.ndarray, np.ndarray] | None = None,
    model: str = "auto",
    tie_window: int | None = None,
    tie_spacing: int | None = None,
    estimation_pixels: int = COREG_MAX_PIXELS,
    keep_aligned: bool = False,
) -> Alignment:
    """Fit the model that aligns the after image onto ``grid`` (the before image's).

    The after image is warped onto the grid (any CRS and pixel size) to measure
    tie points against the before image; a translation, affine or smooth
    displacement-field model is chosen by cross-validation
    (:func:`changedetect.coregister.register`). Grids above
    ``estimation_pixels`` are measured on ``f x f`` block averages of both
    images and the model is rescaled to the full grid (the report gives
    ``estimation_factor``; shifts and residuals are in full-grid pixels).
    With ``keep_aligned`` (and no averaging), the aligned after image made for
    the quality figures is returned too.

    When the model cannot be confirmed, a :class:`CoregistrationWarning` is
    issued, the report says ``reliable: false``, and the safest model (the
    global translation if confirmed, else no correction) is kept.
    """
    f = estimation_factor(grid, estimation_pixels)
    egrid = _decimated(grid, f)
    if reference is not None and f == 1:
        before, bvalid = reference
        lum_b = _lum(before)
    elif f == 1:
        before, bvalid, _ = io.read_grid(before_path, bands=bands, max_pixels=max_pixels)
        lum_b = _lum(before)
        del before
    else:
        raw_b, bvalid, bdtype = _decimated_warp(before_path, grid, f, bands=bands, resampling="nearest",
                                                max_pixels=max_pixels)
        bscale = 255.0 if np.dtype(bdtype) == np.uint8 else io._robust_scale(np.nan_to_num(raw_b), bvalid)
        raw_b = np.nan_to_num(raw_b) / np.float32(bscale)
        raw_b[:, ~bvalid] = 0.0
        lum_b = _lum(raw_b)
        del raw_b
    if not bvalid.any():
        raise DataError(f"{before_path}: has no valid pixel")
    if f == 1:
        raw, avalid, dtype, nodata = io.warp_to_grid(
            after_path, egrid, bands=bands, resampling=resampling, max_pixels=max_pixels
        )
    else:
        io.check_readable(after_path, bands=bands, max_pixels=max_pixels)
        raw, avalid, dtype = _decimated_warp(after_path, grid, f, bands=bands, resampling=resampling,
                                             max_pixels=max_pixels)
        nodata = io.raster_info(after_path, max_pixels=max_pixels).nodata
    if not avalid.any():
        raise DataError(f"{after_path}: has no valid pixel over the before image")
    if not (avalid & bvalid).any():
        raise NoOverlapError(f"{after_path}: no pixel has data in both images")
    scale = 255.0 if np.dtype(dtype) == np.uint8 else io._robust_scale(np.nan_to_num(raw), avalid)
    lum_a = _lum(np.nan_to_num(raw) / np.float32(scale))
    del raw
    res_x, res_y = grid.res
    pixel_m = math.sqrt(res_x * res_y)
    report: dict[str, Any] = {
        "method": "masked coarse-to-fine phase correlation, tie-point model chosen by cross-validation",
        "enabled": enabled,
        "reference_grid": grid.as_dict(),
        "resampling": resampling,
        "max_shift_px": max_shift_px,
    }
    if f > 1:
        report["estimation"] = {
            "factor": f, "grid": egrid.as_dict(),
            "note": f"measured on {f}x{f}-pixel block averages of both images (scene above "
                    f"{estimation_pixels} pixels); shifts and residuals are given in full-grid pixels",
        }
    if not enabled:
        report.update({"shift_px": {"dy": 0.0, "dx": 0.0}, "reliable": None, "model": "none",
                       "position_uncertainty_m": None})
        return Alignment(coreg.GeometricModel.identity(), report, dtype, nodata, scale, f, None, egrid)
    reg = coreg.register(
        lum_b, lum_a, reference_valid=bvalid, moving_valid=avalid, max_shift=max_shift_px / f,
        upsample_factor=upsample, model=model,
        window=None if tie_window is None else max(16, round(tie_window / f)),
        spacing=None if tie_spacing is None else max(8, round(tie_spacing / f)),
    )
    est = reg.shift
    full_model = reg.model if f == 1 else coreg.reframe(reg.model, 1.0 / f, (-(f - 1) / (2 * f),) * 2)
    kept = None
    if f == 1:
        aligned, svalid, _, _ = io.warp_with_model(
            after_path, egrid, reg.model, bands=bands, resampling=resampling, max_pixels=max_pixels, check=False
        )
        lum_new = _lum(np.nan_to_num(aligned) / np.float32(scale))
        kept = (aligned, svalid) if keep_aligned else None
        del aligned
    else:
        # The quality figures of an averaged scene: its averaged after image
        # resampled through the model (not the file again: a third pass over it).
        lum_new, svalid = coreg.apply_model(lum_a, reg.model, valid=avalid)
        lum_new = np.nan_to_num(lum_new)
    centre = ((grid.height - 1) / 2.0, (grid.width - 1) / 2.0)
    dy, dx = (float(v) for v in full_model.displacement(*centre))
    gdy, gdx = float(est.dy) * f, float(est.dx) * f
    common_raw = bvalid & avalid
    common_new = bvalid & svalid
    stable = _stable_area(reg, egrid.shape)
    ssim_raw = _ssim_map(lum_b, lum_a, common_raw)
    ssim_new = _ssim_map(lum_b, lum_new, common_new)
    rmse = reg.rmse * f if math.isfinite(reg.rmse) else float("nan")
    if reg.reliable and math.isfinite(rmse):
        uncertainty_m = rmse * pixel_m
    else:
        # Unconfirmed: a misalignment up to the search range cannot be excluded.
        uncertainty_m = max_shift_px * pixel_m
    details = reg.as_dict(egrid.shape)
    report.update(
        {
            "model": reg.model.kind,
            "parameters": full_model.parameters(grid.shape) if f > 1 else details["parameters"],
            "model_selection": details["candidates"],
            "notes": details["notes"],
            "estimate": est.as_dict(),
            "global_shift_px": {"dy": _round(gdy), "dx": _round(gdx)},
            "global_shift_m": {"north": _round(-gdy * res_y), "east": _round(gdx * res_x)},
            "shift_px": {"dy": round(dy, 4), "dx": round(dx, 4)},
            "shift_m": {"north": round(-dy * res_y, 4), "east": round(dx * res_x, 4)},
            "shift_magnitude_px": round(math.hypot(dy, dx), 4),
            "tie_points": {
                "measured": 0 if reg.tie_points is None else len(reg.tie_points),
                "used": reg.n_used, "rejected": reg.n_rejected,
                "window_px": reg.window * f, "spacing_px": reg.spacing * f,
            },
            "residual_rmse_px": _round(rmse),
            "residual_rmse_m": _round(rmse * pixel_m),
            "fit_rmse_px": _round(reg.fit_rmse * f),
            "model_se_px": _round(reg.model_se * f),
            "residual_structure_p": _round(reg.structure_p),
            "position_uncertainty_m": round(uncertainty_m, 4),
            "reliable": bool(reg.reliable),
            "ssim_before_correction": _mean_over(ssim_raw, common_raw),
            "ssim_after_correction": _mean_over(ssim_new, common_new),
            "ssim_stable_before_correction": _mean_over(ssim_raw, common_raw & stable),
            "ssim_stable_after_correction": _mean_over(ssim_new, common_new & stable),
        }
    )
    if not reg.reliable:
        why = "; ".join(reg.notes) or "the tie points do not confirm it"
        warnings.warn(
            f"{after_path}: co-registration is not reliable ({why}); {reg.model.kind} model applied, "
            f"shift ({dy:.2f}, {dx:.2f}) px at the centre: check the alignment",
            CoregistrationWarning,
            stacklevel=2,
        )
    return Alignment(full_model, report, dtype, nodata, scale, f, reg.tie_points, egrid, kept)


def write_tie_points(path: Path, alignment: Alignment, *, overwrite: bool = False) -> None:
    """tie_points.geojson: one point per tie window, its shift and whether the model used it.

    Positions come from the grid the points were measured on; rows, columns,
    shifts and residuals are given in full-grid pixels.
    """
    import geopandas as gpd
    from shapely.geometry import Point

    tp, f = alignment.tie_points, alignment.factor
    grid = alignment.estimation_grid
    cols = ("row", "col", "dy_px", "dx_px", "peak_ratio", "reliability", "similarity", "residual_px",
            "n_valid", "accepted")
    crs = grid.crs if grid is not None else alignment.report["reference_grid"]["crs"]
    if tp is None or len(tp) == 0:
        gdf = gpd.GeoDataFrame({k: [] for k in cols}, geometry=[], crs=crs)
    else:
        xs, ys = grid.transform * (tp.col + 0.5, tp.row + 0.5)
        ratio = np.asarray(tp.peak_ratio, float)
        nan = np.full(len(tp), np.nan)
        off = (f - 1) / 2.0
        gdf = gpd.GeoDataFrame(
            {
                "row": np.round(tp.row * f + off, 2), "col": np.round(tp.col * f + off, 2),
                "dy_px": np.round(tp.dy * f, 4), "dx_px": np.round(tp.dx * f, 4),
                "peak_ratio": np.round(ratio, 3),
                "reliability": np.round(np.clip(1.0 - 1.0 / np.maximum(ratio, 1e-9), 0.0, 1.0), 4),
                "similarity": np.round(tp.similarity if tp.similarity is not None else nan, 4),
                "residual_px": np.round(tp.residual * f if tp.residual is not None else nan, 4),
                "n_valid": np.asarray(tp.n_valid, int),
                "accepted": np.asarray(tp.accepted, bool),
            },
            geometry=[Point(x, y) for x, y in zip(np.atleast_1d(xs), np.atleast_1d(ys), strict=True)],
            crs=crs,
        )
    io.write_vector(path, gdf, layer="tie_points", overwrite=overwrite)


def write_aligned(
    after_path: Path,
    grid: Grid,
    model: Any,
    path: Path,
    *,
    bands: list[int],
    dtype: str,
    resampling: str,
    max_pixels: int,
    tags: dict[str, Any] | None = None,
    descriptions: list[str] | None = None,
    colorinterp: list[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    background: Any = None,
) -> io.StripWriter:
    """Warp ``bands`` of the after image through ``model`` onto ``grid``, strip by strip, as a COG.

    Values keep the source data type (integers rounded and clipped); pixels
    without data are marked in the internal mask. The strips are fixed by the
    grid's width (not by the caller), so the file is the same whatever else
    changes. The COG is made in the ``background`` executor (``None``: before
    returning); the returned writer's ``readable`` file holds the warped image
    meanwhile, and its ``wait()`` returns the COG's path.
    """
    rows = rows_per_strip(grid.width)
    writer = io.StripWriter(path, grid, count=len(bands), dtype=dtype, mask=True, overwrite=overwrite)
    try:
        for s in strips(0, grid.height, size=rows, halo=0):
            sgrid = grid.window_grid(s.r0, 0, s.rows, grid.width)
            smodel = model if model.kind == "none" and model.field is None else coreg.reframe(model, 1.0, (s.r0, 0))
            arr, valid, _, _ = io.warp_with_model(
                after_path, sgrid, smodel, bands=bands, resampling=resampling, max_pixels=max_pixels, check=False
            )
            arr = np.nan_to_num(arr)
            if np.issubdtype(np.dtype(dtype), np.integer):
                info = np.iinfo(np.dtype(dtype))
                arr = np.clip(np.rint(arr), info.min, info.max)
            writer.write(s.r0, arr.astype(dtype), valid)
            if progress:
                progress("warping the after image", s.rows, grid.height)
        return writer.finish_later(background, tags=tags, descriptions=descriptions, colorinterp=colorinterp)
    except BaseException:
        writer.abort()
        raise


# --------------------------------------------------------------------------- detection
@dataclass
class Region:
    """The analysed rows and columns of the grid (the AOIs' bounding box)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def height(self) -> int:
        return self.r1 - self.r0

    @property
    def width(self) -> int:
        return self.c1 - self.c0


def aoi_region(geoms: list, grid: Grid) -> Region:
    """The bounding box, in grid pixels, of the AOIs (clipped to the grid)."""
    from shapely.ops import unary_union

    left, bottom, right, top = unary_union(geoms).bounds
    inv = ~grid.transform
    xs, ys = [], []
    for x, y in ((left, bottom), (left, top), (right, bottom), (right, top)):
        c, r = inv * (x, y)
        xs.append(c)
        ys.append(r)
    r0 = max(0, int(math.floor(min(ys))))
    r1 = min(grid.height, int(math.ceil(max(ys))))
    c0 = max(0, int(math.floor(min(xs))))
    c1 = min(grid.width, int(math.ceil(max(xs))))
    if r0 >= r1 or c0 >= c1:
        raise NoOverlapError("the AOIs cover no pixel of the before image")
    return Region(r0, r1, c0, c1)


def rasterize(geoms: list, grid: Grid, values: list[int] | None = None) -> np.ndarray:
    from rasterio.features import rasterize as _rasterize

    if not geoms:
        return np.zeros(grid.shape, dtype=np.int32)
    shapes = zip(geoms, values or [1] * len(geoms), strict=True)
    return _rasterize(shapes, out_shape=grid.shape, transform=grid.transform, fill=0, dtype="int32")


def aoi_labels(geoms: list, grid: Grid) -> np.ndarray:
    """``rasterize(geoms, grid, [1, 2, ...])``: each pixel the 1-based number of the
    last AOI whose polygon holds its centre, 0 outside every AOI.

    Only the AOIs that reach ``grid`` are burnt, and when the last of them holds
    the whole of ``grid`` (an AOI-less run analyses the image footprint) the
    answer is filled in without burning.
    """
    from shapely.geometry import box

    area = box(*grid.bounds)
    near = [(i, g) for i, g in enumerate(geoms, start=1) if g.intersects(area)]
    if not near:
        return np.zeros(grid.shape, dtype=np.int32)
    last, geom = near[-1]
    if geom.contains(area):
        return np.full(grid.shape, last, dtype=np.int32)
    return rasterize([g for _, g in near], grid, [i for i, _ in near])


@dataclass
class Detection:
    """What :class:`Detector` found (see :meth:`Detector.run`)."""

    grid: Grid
    damage: Any
    threshold: float
    threshold_info: dict[str, Any]
    fit: Any
    noise: dict[str, Any]
    per_aoi: dict[int, dict[str, float]] = field(default_factory=dict)
    normalisation: Any = None
    buildings: Any = None
    #: with building footprints: the changed objects mostly off every footprint
    ground_changes: Any = None


class Detector:
    """The strip-wise detection chain over one co-registered pair.

    Parameters
    ----------
    before, after : io.RasterReader
        The before image and the co-registered after image (same grid).
    grid : Grid
        Their grid.
    config : PipelineConfig
    strip_pixels : int
        Pixels per strip (core and halo); memory is proportional to it.
    """

    def __init__(self, before: io.RasterReader, after: io.RasterReader, grid: Grid, config: Any,
                 *, strip_pixels: int = STRIP_PIXELS,
                 progress: Callable[[str, int, int], None] | None = None, workers: int | None = None) -> None:
        self.before, self.after, self.grid, self.config = before, after, grid, config
        res = grid.res
        self.pixel_size = math.sqrt(res[0] * res[1])
        self.strip_pixels = int(strip_pixels)
        self.progress = progress
        c = config.change
        self.ssim_sigma_px = max(1.5, c.ssim_sigma_m / self.pixel_size)
        #: strips of the change layers computed at once (at most 2: the memory of one
        #: full strip is shared among them)
        self.workers = max(1, min(2, os.cpu_count() or 1)) if workers is None else max(1, int(workers))

    # -- helpers
    def _tick(self, stage: str, rows: int, total: int) -> None:
        if self.progress:
            self.progress(stage, rows, total)

    def _rows(self, width: int, halo: int) -> int:
        return max(16, self.strip_pixels // max(width, 1) - 2 * halo)

    def _strips(self, bands: list[tuple[int, int]], width: int, halo: int, hi: int) -> Any:
        """The strips of the row ``bands``, sized for :attr:`workers` strips at once."""
        size = max(16, self._rows(width, halo) // self.workers)
        for a, b in bands:
            yield from strips(a, b, size=size, halo=halo, hi=hi)

    def _normaliser(self, norm: Any) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """``norm.apply``, through a lookup table when the after image is 8-bit (same values, faster)."""
        if self.after.dtype != "uint8" or self.after.scale != 255.0:
            return norm.apply
        levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
        lut = norm.apply(np.tile(levels, (norm.bands, 1)))

        def apply(aft: np.ndarray, valid: np.ndarray) -> np.ndarray:
            idx = np.rint(aft * np.float32(255.0)).astype(np.uint8)
            out = np.take_along_axis(lut, idx.reshape(idx.shape[0], -1), axis=1).reshape(aft.shape)
            return np.where(valid, out, aft).astype(np.float32, copy=False)

        return apply

    def _read(self, h0: int, h1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b, bv = self.before.read(h0, h1, c0, c1)
        a, av = self.after.read(h0, h1, c0, c1)
        return b, a, bv & av

    # -- 2. radiometry
    def fit_radiometry(self) -> Any:
        """Fit the radiometric mapping on the unchanged-pattern pixels of the scene's sample bands."""
        from .radiometry import fit_normalisation

        cfg = self.config
        h, w = self.grid.shape
        sigma = max(1.5, cfg.change.ssim_sigma_m / self.pixel_size)
        halo = change_mod.stable_mask_halo(sigma)
        xs, ys, fallback_x, fallback_y = [], [], [], []
        bands = sample_bands(0, h, w)
        total = sum(b - a for a, b in bands)

        def sample(s: Any) -> tuple[np.ndarray, ...]:
            bef, aft, valid = self._read(s.h0, s.h1, 0, w)
            stable = change_mod.stable_mask(bef, aft, valid=valid, sigma=sigma, center=SSIM_CENTER)[s.core]
            core_b, core_a, core_v = bef[:, s.core], aft[:, s.core], valid[s.core]
            return core_a[:, stable], core_b[:, stable], core_a[:, core_v], core_b[:, core_v]

        for s, (x, y, fx, fy) in _ordered(sample, self._strips(bands, w, halo, h), self.workers):
            xs.append(x)
            ys.append(y)
            fallback_x.append(fx)
            fallback_y.append(fy)
            self._tick("fitting radiometry", s.rows, total)
        x, y = np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)
        vx, vy = np.concatenate(fallback_x, axis=1), np.concatenate(fallback_y, axis=1)
        if vx.shape[1] == 0:
            raise NoOverlapError(f"{self.after.path}: no pixel has data in both images")
        # Too few unchanged-pattern pixels: fit on every valid pixel (as radiometry._fit_mask).
        if x.shape[1] < min(100, vx.shape[1]):
            x, y = vx, vy
        norm = fit_normalisation(x, y, method=cfg.radiometry.method)
        return norm, dataclasses.replace(norm.report(vx, vy), n_pixels=int(x.shape[1]))

    # -- 3. statistics
    def statistics(self, region: Region, norm: Any) -> change_mod.SceneStatistics:
        c = self.config.change
        halo = change_mod.change_halo(self.pixel_size, ssim_sigma_m=c.ssim_sigma_m, smooth_m=c.smooth_m)
        cc0, cc1 = max(0, region.c0 - halo), min(self.grid.width, region.c1 + halo)
        cols = slice(region.c0 - cc0, region.c1 - cc0)
        samples = []
        normalise = self._normaliser(norm)
        bands = sample_bands(region.r0, region.r1, region.width)
        total = sum(b - a for a, b in bands)

        def sample(s: Any) -> dict[str, np.ndarray]:
            bef, aft, valid = self._read(s.h0, s.h1, cc0, cc1)
            aft = normalise(aft, valid)
            return change_mod.scene_samples(
                bef, aft, valid=valid, rows=s.core, cols=cols, pixel_size=self.pixel_size,
                ssim_sigma_m=c.ssim_sigma_m, smooth_m=c.smooth_m, center=SSIM_CENTER,
            )

        for s, values in _ordered(sample, self._strips(bands, cc1 - cc0, halo, self.grid.height), self.workers):
            samples.append(values)
            self._tick("no-change statistics", s.rows, total)
        return change_mod.scene_statistics(samples)

    # -- 4-5. layers, threshold, objects
    def run(self, region: Region, aois: Any, staging: Callable[[str], Path], tags: dict[str, Any],
            write_layers: bool = False, buildings: Any = None, background: Any = None) -> Detection:
        cfg = self.config
        c = cfg.change
        grid = self.grid
        out_grid = grid.window_grid(region.r0, region.c0, region.height, region.width)
        norm, fit = self.fit_radiometry()
        stats = self.statistics(region, norm)
        halo = change_mod.change_halo(self.pixel_size, ssim_sigma_m=c.ssim_sigma_m, smooth_m=c.smooth_m,
                                      shadow_min_width_m=c.shadow_min_width_m if c.shadow_relight else 0.0,
                                      shadow_max_shift_m=c.shadow_max_shift_m if c.shadow_relight else 0.0)
        cc0, cc1 = max(0, region.c0 - halo), min(grid.width, region.c1 + halo)
        cols = slice(region.c0 - cc0, region.c1 - cc0)
        geoms = list(aois.geometry)
        n_aoi = len(geoms)
        nan = float("nan")
        names = {
            "difference": "difference magnitude (RMS over bands, before-image units 0-1)",
            "ssim": "local SSIM of luminance",
            "score": "change score 0-1",
        }
        # structure_loss is needed for the objects' statistics; the other terms only when asked for
        terms = ["structure_loss"] + (
            ["difference_evidence", "vegetation", "shadow_change", "coherence_loss"] if write_layers else [])
        writers: dict[str, io.StripWriter] = {}
        for name in [*names, *terms]:
            writers[name] = io.StripWriter(staging(f"{name}.tif"), out_grid, count=1, dtype="float32", nodata=nan)
        try:
            per_aoi = {i: {"analysed": 0, "ssim_sum": 0.0} for i in range(1, n_aoi + 1)}
            lo, hi, n_inside = np.inf, -np.inf, 0
            normalise = self._normaliser(norm)

            layer_names = list(writers)

            def compute(job: tuple[Any, np.ndarray]) -> dict[str, Any]:
                s, aoi = job
                bef, aft, valid = self._read(s.h0, s.h1, cc0, cc1)
                aft = normalise(aft, valid)
                layers = change_mod.change_layers(
                    bef, aft, valid=valid, pixel_size=self.pixel_size, ssim_sigma_m=c.ssim_sigma_m,
                    smooth_m=c.smooth_m, difference_z=c.difference_z, vegetation_z=tuple(c.vegetation_z),
                    structure_weight=c.structure_weight, shadow_damping=c.shadow_damping,
                    shadow_relight=c.shadow_relight, shadow_min_width_m=c.shadow_min_width_m,
                    shadow_max_shift_m=c.shadow_max_shift_m,
                    coherence_weight=c.coherence_weight, coherence_layer=write_layers,
                    statistics=stats, center=SSIM_CENTER,
                )
                inner = (s.core, cols)
                inside = (aoi > 0) & layers.valid[inner]
                out: dict[str, Any] = {
                    name: np.where(inside, getattr(layers, name)[inner], np.float32(nan)).astype(np.float32)
                    for name in layer_names
                }
                sc = layers.score[inner][inside]
                out["range"] = (float(sc.min()), float(sc.max()), sc.size) if sc.size else None
                ss = layers.ssim[inner]
                ok = inside & np.isfinite(ss)
                if n_aoi:
                    out["counts"] = np.bincount(aoi[ok], minlength=n_aoi + 1)
                    out["sums"] = np.bincount(aoi[ok], weights=ss[ok].astype(np.float64), minlength=n_aoi + 1)
                return out

            def jobs() -> Any:
                # AOI masks are burnt here, in the calling thread: rasterio's
                # rasterize uses warnings.catch_warnings, which is not thread-safe.
                for s in self._strips([(region.r0, region.r1)], cc1 - cc0, halo, grid.height):
                    yield s, aoi_labels(geoms, grid.window_grid(s.r0, region.c0, s.rows, region.width))

            # Two strips are computed at once (OpenCV and numpy release the GIL), each
            # half the usual size so memory stays the same; results are taken in
            # row order, so the files do not depend on it. This thread only burns
            # the AOI masks and writes the strips.
            for (s, _), out in _ordered(compute, jobs(), self.workers):
                row = s.r0 - region.r0
                for name, writer in writers.items():
                    writer.write(row, out[name])
                if out["range"] is not None:
                    a, b, n = out["range"]
                    lo, hi, n_inside = min(lo, a), max(hi, b), n_inside + n
                if n_aoi:
                    for i in range(1, n_aoi + 1):
                        per_aoi[i]["analysed"] += int(out["counts"][i])
                        per_aoi[i]["ssim_sum"] += float(out["sums"][i])
                self._tick("change layers", s.rows, region.height)
            if n_inside == 0:
                raise NoOverlapError(f"{cfg.inputs.aois or cfg.inputs.before}: AOIs cover no pixel with data in both images")

            # Each finished layer becomes a COG in ``background`` while the objects are
            # made from its strips (which stay readable until then).
            for name in names:
                if name != "score":
                    writers[name].finish_later(background, tags={**tags, "LAYER": names[name]}, descriptions=[name])
            if write_layers:
                for name in terms:
                    writers[name].finish_later(background, tags={**tags, "LAYER": f"change term: {name}"},
                                               descriptions=[name])
            score_rows = _rows_reader(writers["score"])
            threshold, threshold_info = self._threshold(score_rows, region, lo, hi)
            writers["score"].finish_later(background, tags={**tags, "LAYER": names["score"], "THRESHOLD": threshold},
                                          descriptions=["score"])
            damage_mask = self._mask(score_rows, region, threshold)
            damage, graded, ground = self._objects(damage_mask, writers, region, out_grid, geoms, aois, threshold,
                                                   buildings)
            for name in [*names, *terms]:
                if name in names or write_layers:
                    writers[name].wait()
                else:
                    writers[name].abort()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        return Detection(out_grid, damage, threshold, threshold_info, fit, stats.as_dict(), per_aoi, norm, graded,
                         ground)

    def _threshold(self, score_rows, region: Region, lo: float, hi: float) -> tuple[float, dict[str, Any]]:
        d = self.config.damage
        if d.threshold == "auto":
            if lo == hi:
                otsu = lo
            else:
                from skimage.filters import threshold_otsu

                nbins = 256
                hist = np.zeros(nbins, np.int64)
                edges = None
                for a, b in _chunks(region.height, self.strip_pixels // max(region.width, 1)):
                    sc = score_rows(a, b)
                    v = sc[np.isfinite(sc)]
                    h, edges = np.histogram(v, bins=nbins, range=(lo, hi))
                    hist += h
                centers = (edges[:-1] + edges[1:]) / 2
                otsu = float(threshold_otsu(hist=(hist, centers)))
            threshold = max(otsu, d.min_threshold)
            info = {"method": "otsu", "otsu": round(otsu, 4), "floor": d.min_threshold}
        else:
            threshold = float(d.threshold)
            info = {"method": "given"}
        info["value"] = round(threshold, 4)
        return threshold, info

    def _mask(self, score_rows, region: Region, threshold: float) -> BitMask:
        d = self.config.damage
        h, w = region.height, region.width
        rows = max(16, self.strip_pixels // max(w, 1))
        clean_args = {
            "pixel_size": self.pixel_size, "open_radius_m": d.open_radius_m,
            "close_radius_m": d.close_radius_m, "min_area_m2": d.min_area_m2,
            "max_hole_m2": d.max_hole_m2, "strip_rows": rows,
        }
        m = BitMask(h, w)
        for a, b in _chunks(h, rows):
            m.set(a, np.nan_to_num(score_rows(a, b)) >= threshold)

        def clean(mask: BitMask) -> BitMask:
            out = clean_mask_strips(mask, **clean_args)
            for a, b in _chunks(h, rows):
                out.set(a, out.get(a, b) & np.isfinite(score_rows(a, b)))
            return out

        m = clean(m)
        if d.refine_boundaries:
            m = refine_boundaries_strips(m, score_rows, strip_rows=rows)
            m = clean(m)
        if d.hysteresis < 1.0:
            m = clean(hysteresis_strips(m, score_rows, d.hysteresis * threshold, strip_rows=rows))
        return m

    def _objects(self, mask: BitMask, writers, region: Region, out_grid: Grid, geoms: list, aois: Any,
                 threshold: float, buildings: Any = None) -> tuple[Any, Any]:
        """Damage polygons and (with footprints) the graded buildings, from the final mask."""
        import geopandas as gpd
        from rasterio.features import shapes
        from shapely import affinity
        from shapely.geometry import shape
        from shapely.ops import unary_union

        h, w = region.height, region.width
        rows = max(16, self.strip_pixels // max(w, 1))
        readers = {k: _rows_reader(writers[k]) for k in ("score", "ssim", "difference", "structure_loss")}
        n_aoi = len(geoms)
        labeler = StripLabeler(h, w, connectivity=8)
        parts = _chunks(h, rows)
        acc = None
        if buildings is not None:
            from .buildings import BuildingAccumulator

            acc = BuildingAccumulator(len(buildings))
            footprint_geoms = list(buildings.geometry)
        detected, whole = mask, None
        if acc is not None and self.config.damage.complete_buildings:
            mask, whole = self._complete_buildings(mask, readers["score"], readers["structure_loss"],
                                                   footprint_geoms, out_grid, rows)
        for a, b in parts:
            m = mask.get(a, b)
            sc, ss, df, sl = (readers[k](a, b) for k in ("score", "ssim", "difference", "structure_loss"))
            if acc is not None:
                ids = rasterize(footprint_geoms, out_grid.window_grid(a, 0, b - a, w),
                                list(range(1, len(footprint_geoms) + 1)))
                # buildings are graded from what was detected, before any footprint was completed
                acc.add(ids, damage=detected.get(a, b), score=sc, ssim=ss, structure_loss=sl)
            sums = {"score": sc, "ssim": ss, "difference": df,
                    "loss": (np.nan_to_num(sl) >= 0.5).astype(np.float64)}
            if acc is not None:
                sums["on_building"] = (ids > 0).astype(np.float64)
            if n_aoi:
                sgrid = out_grid.window_grid(a, 0, b - a, w)
                aoi = rasterize(geoms, sgrid, list(range(1, n_aoi + 1)))
                for i in range(1, n_aoi + 1):
                    sums[f"aoi{i}"] = (aoi == i).astype(np.float64)
            labeler.add(m, sums=sums, maxima={"score": np.nan_to_num(sc)})
        comps = labeler.finish()
        reliability = 1.0 if self._reliable in (True, None) else 0.5
        objects = damage_mod.objects_from_stats(
            counts=comps.counts[1:], score_sum=comps.sums["score"][1:], score_max=comps.maxima["score"][1:],
            ssim_sum=comps.sums["ssim"][1:], difference_sum=comps.sums["difference"][1:],
            loss_count=comps.sums["loss"][1:], threshold=threshold, pixel_size=self.pixel_size,
            reliability=reliability,
        )
        pieces: dict[int, list] = {}
        for i, (a, b) in enumerate(parts):
            m = mask.get(a, b)
            if not m.any():
                continue
            lab = labeler.labels(i, m)
            from affine import Affine

            for geom, value in shapes(lab, mask=lab > 0, transform=Affine.translation(0, a), connectivity=4):
                pieces.setdefault(int(value), []).append(shape(geom))
        names = list(aois["name"])
        t = out_grid.transform
        records = []
        for obj in objects:
            k = obj.label
            geom = unary_union(pieces[k]) if len(pieces[k]) > 1 else pieces[k][0]
            # Joined strips leave vertices along straight edges: drop them, and
            # give every geometry one canonical vertex order.
            geom = geom.simplify(0).normalize()
            geom = affinity.affine_transform(geom, [t.a, t.b, t.d, t.e, t.c, t.f])
            counts = [comps.sums[f"aoi{i}"][k] for i in range(1, n_aoi + 1)]
            record = {
                "id": k, "aoi": names[int(np.argmax(counts))] if counts else "",
                "area_m2": obj.area_m2, "score": obj.score, "score_max": obj.score_max,
                "mean_ssim": obj.mean_ssim, "mean_difference": obj.mean_difference,
                "structure_loss_fraction": obj.structure_loss_fraction, "severity": obj.severity,
                "confidence": obj.confidence, **self._uncertainty(obj.area_m2),
            }
            if acc is not None:
                record["building_share"] = round(float(comps.sums["on_building"][k] / comps.counts[k]), 4)
            records.append({**record, "geometry": geom})
        columns = ["id", "aoi", "area_m2", "score", "score_max", "mean_ssim", "mean_difference",
                   "structure_loss_fraction", "severity", "confidence", "position_uncertainty_m",
                   "below_uncertainty"] + (["building_share"] if acc is not None else [])

        def frame(rows: list[dict]) -> Any:
            if not rows:
                return gpd.GeoDataFrame({k: [] for k in columns}, geometry=[], crs=self.grid.crs)
            return gpd.GeoDataFrame(rows, geometry="geometry", crs=self.grid.crs)

        ground = None
        if acc is not None:
            # With building footprints, damage means damage to buildings: a change
            # mostly off every footprint (moved vehicles, market stalls, but also a
            # crater in an open square) goes to its own layer for review.
            ground = frame([r for r in records if r["building_share"] < MIN_BUILDING_SHARE])
            records = [r for r in records if r["building_share"] >= MIN_BUILDING_SHARE]
        damage = frame(records)
        graded = None if acc is None else self._graded(acc, buildings, whole)
        return damage, graded, ground

    def _graded(self, acc: Any, buildings: Any, whole: np.ndarray | None) -> Any:
        """The graded buildings table (:meth:`changedetect.buildings.BuildingAccumulator.assess`)."""
        import geopandas as gpd
        import pandas as pd

        reliability = 1.0 if self._reliable in (True, None) else 0.5
        table = pd.DataFrame(acc.assess(pixel_size=self.pixel_size, reliability=reliability))
        if whole is not None:
            # footprints added whole to the damage layer (damage.complete_buildings)
            table["whole_footprint"] = whole[1:]
        # where each footprint came from: its row in the input file, and its name if any
        keep = [c for c in ("source_index", "name") if c in buildings.columns]
        return gpd.GeoDataFrame(
            pd.concat([buildings[keep].reset_index(drop=True), table], axis=1),
            geometry=list(buildings.geometry), crs=self.grid.crs,
        )

    def _complete_buildings(self, mask: BitMask, score_rows, loss_rows, geoms: list, out_grid: Grid,
                            rows: int) -> tuple[BitMask, np.ndarray]:
        """The mask with the whole footprint of every damaged building a damage object reaches.

        Damage to buildings is assessed building by building (UNOSAT): a building
        whose lost share (as :meth:`changedetect.buildings.BuildingAccumulator.assess`
        grades it: the larger of the shares of its analysed footprint inside
        damage objects and with strong structure loss) is at least
        :data:`changedetect.buildings.COMPLETION_SHARE` (moderate or worse) is
        damaged as a whole. When a damage object (one at least
        :data:`MIN_BUILDING_SHARE` on footprints, as in the damage layer) lies on
        such a building, its whole analysed footprint is added to the mask: a
        roof with holes, soot and debris over part of it is one damaged
        building, not a few specks on an intact roof. Requiring a damage object
        keeps a grade made only of scattered strong-loss pixels (a moved shadow,
        noise) from adding a footprint; ground changes (objects mostly off the
        footprints) complete nothing; buildings too little of which is analysed
        to be graded (``not assessed``) are left as they are.

        Returns the new mask and, per footprint (index 0 unused), whether it was
        added whole.
        """
        from .buildings import COMPLETION_SHARE, MIN_ANALYSED_FRACTION, STRONG_LOSS

        h, w = mask.shape
        parts = _chunks(h, rows)
        n = len(geoms)
        values = list(range(1, n + 1))

        def ids_of(a: int, b: int) -> np.ndarray:
            return rasterize(geoms, out_grid.window_grid(a, 0, b - a, w), values)

        labeler = StripLabeler(h, w, connectivity=8)
        for a, b in parts:
            labeler.add(mask.get(a, b), sums={"on_building": (ids_of(a, b) > 0).astype(np.float64)})
        comps = labeler.finish()
        is_damage = comps.sums["on_building"] >= MIN_BUILDING_SHARE * comps.counts
        is_damage[0] = False
        footprint, analysed, damaged, strong = (np.zeros(n + 1, np.int64) for _ in range(4))
        for i, (a, b) in enumerate(parts):
            ids, ok = ids_of(a, b), np.isfinite(score_rows(a, b))
            in_damage = is_damage[labeler.labels(i, mask.get(a, b))] & ok
            footprint += np.bincount(ids.ravel(), minlength=n + 1)
            analysed += np.bincount(ids[ok], minlength=n + 1)
            damaged += np.bincount(ids[in_damage], minlength=n + 1)
            strong += np.bincount(ids[ok & (np.nan_to_num(loss_rows(a, b)) >= STRONG_LOSS)], minlength=n + 1)
        lost = np.maximum(damaged, strong)
        assessed = (analysed > 0) & (analysed >= MIN_ANALYSED_FRACTION * footprint)
        complete = assessed & (damaged > 0) & (lost >= COMPLETION_SHARE * analysed)
        complete[0] = False
        out = BitMask(h, w)
        for a, b in parts:
            ids, ok = ids_of(a, b), np.isfinite(score_rows(a, b))
            out.set(a, mask.get(a, b) | (complete[ids] & ok))
        return out, complete

    #: set by the pipeline: the co-registration verdict and position uncertainty
    _reliable: bool | None = True
    _uncertainty_m: float | None = None

    def _uncertainty(self, area_m2: float) -> dict[str, Any]:
        return uncertainty_columns(area_m2, self._uncertainty_m)


def uncertainty_columns(area_m2: float, uncertainty_m: float | None) -> dict[str, Any]:
    """``position_uncertainty_m`` of a damage polygon, and ``below_uncertainty``.

    A polygon is below the uncertainty when its area is smaller than the disc of
    radius ``position_uncertainty_m``: its position is then less certain than its
    size. Without co-registration the uncertainty is unknown (NaN, not flagged).
    """
    if uncertainty_m is None or not math.isfinite(float(uncertainty_m)):
        return {"position_uncertainty_m": float("nan"), "below_uncertainty": False}
    u = float(uncertainty_m)
    return {"position_uncertainty_m": round(u, 3), "below_uncertainty": bool(area_m2 < math.pi * u * u)}


def _ordered(func: Callable[[Any], Any], items: Any, workers: int) -> Any:
    """``(item, func(item))`` in order, ``workers`` items computed at a time (threads)."""
    if workers <= 1:
        for item in items:
            yield item, func(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                # in the caller's context (the run's block-row cache is a context variable)
                pending.append((item, pool.submit(contextvars.copy_context().run, func, item)))
                if len(pending) >= workers:
                    first, fut = pending.popleft()
                    yield first, fut.result()
            while pending:
                first, fut = pending.popleft()
                yield first, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, int(size))
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _rows_reader(writer: io.StripWriter) -> Callable[[int, int], np.ndarray]:
    def read(a: int, b: int) -> np.ndarray:
        return writer.read(a, b)[0]

    return read
