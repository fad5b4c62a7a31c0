"""The detection pipeline: I/O plus the numeric core, no command-line concerns.

``run(config)`` takes a validated :class:`~changedetect.config.PipelineConfig` and
writes every output into a staged output folder (see :class:`changedetect.io.OutputFolder`):

1. read the before image (the reference grid) and warp the after image onto it;
2. fit a co-registration model (global shift, then tie points; translation,
   affine or smooth field chosen by cross-validation) and warp the after image
   again *from its original pixels* through it (one resampling only);
3. normalise the after image's radiometry to the before image, fitted on pixels
   whose local pattern did not change;
4. compute difference, SSIM and the change score over the areas of interest;
5. threshold, clean and polygonize the damage, grade each polygon, check the
   reported sites, and evaluate against reference labels when given;
6. write rasters (COG), vectors (GeoJSON EPSG:4326), reports and the manifest.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, io
from . import change as change_mod
from . import coregister as coreg
from . import damage as damage_mod
from .config import PipelineConfig
from .errors import ChangeDetectWarning, ConfigError, CoregistrationWarning, DataError, NoOverlapError
from .grid import Grid
from .provenance import MANIFEST_NAME, build_manifest, command_line, utc_now
from .radiometry import normalize

log = logging.getLogger(__name__)

SEVERITY_ORDER = {"destroyed": 0, "severe": 1, "moderate": 2, "possible": 3}


@dataclass(frozen=True)
class RunResult:
    """What a run produced."""

    outdir: Path
    outputs: list[Path]
    summary: dict[str, Any]


# --------------------------------------------------------------------------- helpers
def _select_bands(config: PipelineConfig, before: io.RasterInfo, after: io.RasterInfo) -> list[int]:
    bands = config.inputs.bands
    if bands is not None:
        for info in (before, after):
            bad = [b for b in bands if b > info.count]
            if bad:
                raise ConfigError(f"{info.path}: has {info.count} band(s), inputs.bands asks for {bad}")
        return list(bands)
    n = min(before.count, after.count)
    if before.count != after.count:
        warnings.warn(
            f"band counts differ ({before.path.name}: {before.count}, {after.path.name}: {after.count}): "
            f"using the first {n} band(s); set inputs.bands to choose",
            ChangeDetectWarning,
            stacklevel=2,
        )
    return list(range(1, n + 1))


def _overlap_window(before: io.RasterInfo, after: io.RasterInfo) -> tuple[int, int, int, int]:
    """Window (row_off, col_off, height, width) of the before grid covered by the after image."""
    from rasterio.warp import transform_bounds
    from rasterio.windows import from_bounds

    g = before.grid
    a = transform_bounds(after.grid.crs, g.crs, *after.grid.bounds, densify_pts=21)
    b = g.bounds
    left, bottom, right, top = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    if left >= right or bottom >= top:
        raise NoOverlapError(f"{after.path}: does not overlap the before image {before.path.name}")
    win = from_bounds(left, bottom, right, top, transform=g.transform)
    row0 = max(0, math.floor(win.row_off + 1e-6))
    col0 = max(0, math.floor(win.col_off + 1e-6))
    row1 = min(g.height, math.ceil(win.row_off + win.height - 1e-6))
    col1 = min(g.width, math.ceil(win.col_off + win.width - 1e-6))
    if row1 - row0 < 8 or col1 - col0 < 8:
        raise NoOverlapError(f"{after.path}: overlaps the before image by less than 8 x 8 pixels")
    return row0, col0, row1 - row0, col1 - col0


def _read_aois(config: PipelineConfig, grid: Grid, footprint: Any) -> Any:
    """AOIs in the grid CRS clipped to the data footprint; the footprint when none given."""
    import geopandas as gpd

    path = config.inputs.aois
    if path is None:
        return gpd.GeoDataFrame({"name": ["overlap"]}, geometry=[footprint], crs=grid.crs)
    gdf = io.read_vector(path, what="AOI file").to_crs(grid.crs)
    gdf = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if len(gdf) == 0:
        raise DataError(f"{path}: AOI file has no polygon")
    if "name" not in gdf.columns:
        gdf = gdf.assign(name=[f"aoi{i + 1}" for i in range(len(gdf))])
    gdf = gdf.assign(name=gdf["name"].astype(str), geometry=gdf.geometry.intersection(footprint))
    gdf = gdf[~gdf.geometry.is_empty & (gdf.geometry.area > 0)]
    if len(gdf) == 0:
        raise NoOverlapError(f"{path}: no AOI overlaps the area covered by both images")
    return gdf[["name", "geometry"]].reset_index(drop=True)


def _rasterize(geoms: list, grid: Grid, values: list[int] | None = None) -> np.ndarray:
    from rasterio.features import rasterize

    if not geoms:
        return np.zeros(grid.shape, dtype=np.int32)
    shapes = zip(geoms, values or [1] * len(geoms), strict=True)
    return rasterize(shapes, out_shape=grid.shape, transform=grid.transform, fill=0, dtype="int32")


def _luminance_ssim(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    ssim, _ = change_mod.ssim_components(change_mod.luminance(a), change_mod.luminance(b), valid=valid)
    vals = ssim[np.isfinite(ssim)]
    return round(float(vals.mean()), 4) if vals.size else float("nan")


# --------------------------------------------------------------------------- steps
def coregister_pair(
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
    tie_points_path: Path | None = None,
    apply_bands: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], tuple[str, float | None]]:
    """Warp the after image onto ``grid`` through a fitted co-registration model.

    The after image is first warped onto ``grid`` (any CRS and pixel size) to
    measure tie points against the before image; a translation, affine or smooth
    displacement-field model is chosen by cross-validation
    (:func:`changedetect.coregister.register`) and the after image is then
    resampled once more *from its original pixels* through that model (one
    resampling in the product). ``model`` caps the richest model allowed;
    ``tie_window`` / ``tie_spacing`` override the tie-point grid.

    When the model cannot be confirmed, a :class:`CoregistrationWarning` is issued,
    the report says ``reliable: false``, and the safest model (the global
    translation if confirmed, else no correction) is applied.

    With ``tie_points_path``, the tie points are written there (GeoJSON,
    EPSG:4326). Returns the corrected after image (``apply_bands``, default
    ``bands``) in source units (NaN where no data), its valid mask, the
    co-registration report, and the source (dtype, nodata).
    """
    if reference is None:
        before, bvalid, _ = io.read_grid(before_path, bands=bands, max_pixels=max_pixels)
    else:
        before, bvalid = reference
    raw, avalid, dtype, nodata = io.warp_to_grid(
        after_path, grid, bands=bands, resampling=resampling, max_pixels=max_pixels
    )
    if not avalid.any():
        raise DataError(f"{after_path}: has no valid pixel over the before image")
    if not (avalid & bvalid).any():
        raise NoOverlapError(f"{after_path}: no pixel has data in both images")
    scale = 255.0 if np.dtype(dtype) == np.uint8 else io._robust_scale(np.nan_to_num(raw), avalid)
    res_x, res_y = grid.res
    pixel_m = math.sqrt(res_x * res_y)
    report: dict[str, Any] = {
        "method": "masked coarse-to-fine phase correlation, tie-point model chosen by cross-validation",
        "enabled": enabled,
        "reference_grid": grid.as_dict(),
        "resampling": resampling,
        "max_shift_px": max_shift_px,
    }
    if not enabled:
        report.update({"shift_px": {"dy": 0.0, "dx": 0.0}, "reliable": None, "model": "none",
                       "position_uncertainty_m": None})
        if tie_points_path is not None:
            _write_tie_points(tie_points_path, None, grid)
        if apply_bands is not None and list(apply_bands) != list(bands):
            raw, avalid, _, _ = io.warp_to_grid(
                after_path, grid, bands=apply_bands, resampling=resampling, max_pixels=max_pixels
            )
        return raw, avalid, report, (dtype, nodata)
    moving = np.nan_to_num(raw) / np.float32(scale)
    reg = coreg.register(
        before, moving, reference_valid=bvalid, moving_valid=avalid, max_shift=max_shift_px,
        upsample_factor=upsample, model=model, window=tie_window, spacing=tie_spacing,
    )
    est = reg.shift
    aligned, svalid, _, _ = io.warp_with_model(
        after_path, grid, reg.model, bands=bands, resampling=resampling, max_pixels=max_pixels
    )
    centre = ((grid.height - 1) / 2.0, (grid.width - 1) / 2.0)
    dy, dx = (float(v) for v in reg.model.displacement(*centre))
    gdy, gdx = float(est.dy), float(est.dx)
    common_raw = bvalid & avalid
    common_new = bvalid & svalid
    stable = _stable_area(reg, grid.shape)
    ssim_raw = _ssim_map(before, moving, common_raw)
    ssim_new = _ssim_map(before, np.nan_to_num(aligned) / np.float32(scale), common_new)
    rmse = reg.rmse if math.isfinite(reg.rmse) else float("nan")
    if reg.reliable and math.isfinite(rmse):
        uncertainty_m = rmse * pixel_m
    else:
        # Unconfirmed: a misalignment up to the search range cannot be excluded.
        uncertainty_m = max_shift_px * pixel_m
    details = reg.as_dict(grid.shape)
    report.update(
        {
            "model": reg.model.kind,
            "parameters": details["parameters"],
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
                "window_px": reg.window, "spacing_px": reg.spacing,
            },
            "residual_rmse_px": _round(rmse),
            "residual_rmse_m": _round(rmse * pixel_m),
            "fit_rmse_px": _round(reg.fit_rmse),
            "position_uncertainty_m": round(uncertainty_m, 4),
            "reliable": bool(reg.reliable),
            "ssim_before_correction": _mean_over(ssim_raw, common_raw),
            "ssim_after_correction": _mean_over(ssim_new, common_new),
            "ssim_stable_before_correction": _mean_over(ssim_raw, common_raw & stable),
            "ssim_stable_after_correction": _mean_over(ssim_new, common_new & stable),
        }
    )
    if tie_points_path is not None:
        _write_tie_points(tie_points_path, reg.tie_points, grid)
    if apply_bands is not None and list(apply_bands) != list(bands):
        aligned, svalid, _, _ = io.warp_with_model(
            after_path, grid, reg.model, bands=apply_bands, resampling=resampling, max_pixels=max_pixels
        )
    if not reg.reliable:
        why = "; ".join(reg.notes) or "the tie points do not confirm it"
        warnings.warn(
            f"{after_path}: co-registration is not reliable ({why}); {reg.model.kind} model applied, "
            f"shift ({dy:.2f}, {dx:.2f}) px at the centre: check the alignment",
            CoregistrationWarning,
            stacklevel=2,
        )
    return aligned, svalid, report, (dtype, nodata)


def _uncertainty_columns(area_m2: float, uncertainty_m: float | None) -> dict[str, Any]:
    """``position_uncertainty_m`` of a damage polygon, and ``below_uncertainty``.

    A polygon is below the uncertainty when its area is smaller than the disc of
    radius ``position_uncertainty_m``: its position is then less certain than its
    size. Without co-registration the uncertainty is unknown (NaN, not flagged).
    """
    if uncertainty_m is None or not math.isfinite(float(uncertainty_m)):
        return {"position_uncertainty_m": float("nan"), "below_uncertainty": False}
    u = float(uncertainty_m)
    return {"position_uncertainty_m": round(u, 3), "below_uncertainty": bool(area_m2 < math.pi * u * u)}


def _round(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None


def _ssim_map(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    ssim, _ = change_mod.ssim_components(change_mod.luminance(a), change_mod.luminance(b), valid=valid)
    return ssim


def _mean_over(values: np.ndarray, mask: np.ndarray) -> float | None:
    vals = values[mask & np.isfinite(values)]
    return round(float(vals.mean()), 4) if vals.size else None


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


def _write_tie_points(path: Path, tp: coreg.TiePoints | None, grid: Grid) -> None:
    """tie_points.geojson: one point per tie window, its shift and whether the model used it."""
    import geopandas as gpd
    from shapely.geometry import Point

    cols = ("row", "col", "dy_px", "dx_px", "peak_ratio", "reliability", "similarity", "residual_px",
            "n_valid", "accepted")
    if tp is None or len(tp) == 0:
        gdf = gpd.GeoDataFrame({k: [] for k in cols}, geometry=[], crs=grid.crs)
    else:
        xs, ys = grid.transform * (tp.col + 0.5, tp.row + 0.5)
        ratio = np.asarray(tp.peak_ratio, float)
        nan = np.full(len(tp), np.nan)
        gdf = gpd.GeoDataFrame(
            {
                "row": np.round(tp.row, 2), "col": np.round(tp.col, 2),
                "dy_px": np.round(tp.dy, 4), "dx_px": np.round(tp.dx, 4),
                "peak_ratio": np.round(ratio, 3),
                "reliability": np.round(np.clip(1.0 - 1.0 / np.maximum(ratio, 1e-9), 0.0, 1.0), 4),
                "similarity": np.round(tp.similarity if tp.similarity is not None else nan, 4),
                "residual_px": np.round(tp.residual if tp.residual is not None else nan, 4),
                "n_valid": np.asarray(tp.n_valid, int),
                "accepted": np.asarray(tp.accepted, bool),
            },
            geometry=[Point(x, y) for x, y in zip(np.atleast_1d(xs), np.atleast_1d(ys), strict=True)],
            crs=grid.crs,
        )
    io.write_vector(path, gdf, layer="tie_points")


def _site_checks(sites: Any, damage: Any, default_radius: float) -> list[dict[str, Any]]:
    out = []
    union = damage.geometry.union_all() if len(damage) else None
    for i, row in sites.reset_index(drop=True).iterrows():
        pt = row.geometry
        radius = float(row["uncertainty_m"]) if "uncertainty_m" in sites.columns and row["uncertainty_m"] == row["uncertainty_m"] else default_radius
        name = str(row["name"]) if "name" in sites.columns else f"site{i + 1}"
        entry: dict[str, Any] = {"name": name, "uncertainty_m": radius}
        if union is None:
            entry.update({"inside_damage": False, "nearest_polygon_id": None, "distance_m": None,
                          "damaged_area_within_radius_m2": 0.0, "verdict": "damage not found"})
        else:
            dists = damage.geometry.distance(pt)
            j = int(dists.values.argmin())
            within = union.intersection(pt.buffer(radius, 64)).area
            entry.update(
                {
                    "inside_damage": bool(union.covers(pt)),
                    "nearest_polygon_id": int(damage.iloc[j]["id"]),
                    "nearest_severity": str(damage.iloc[j]["severity"]),
                    "distance_m": round(float(dists.iloc[j]), 2),
                    "damaged_area_within_radius_m2": round(float(within), 2),
                    "verdict": "damage found" if within > 0 else "damage not found",
                }
            )
        out.append(entry)
    pts = list(sites.geometry)
    for i, entry in enumerate(out):
        entry["distance_to_other_sites_m"] = {
            out[j]["name"]: round(float(pts[i].distance(pts[j])), 2) for j in range(len(pts)) if j != i
        }
    return out


def evaluate_polygons(damage: Any, truth: Any) -> dict[str, Any]:
    """Area-exact metrics and object recall of ``damage`` against ``truth`` (same metric CRS)."""
    from .evaluate import area_metrics, object_recall

    metrics = area_metrics(list(damage.geometry), list(truth.geometry))
    classes = [str(s) for s in truth["severity"]] if "severity" in truth.columns else None
    objects = object_recall(list(truth.geometry), list(damage.geometry), classes=classes)
    out = metrics.as_dict()
    out["objects"] = {k: v for k, v in objects.items() if k != "coverage"}
    return out


# --------------------------------------------------------------------------- run
def run(config: PipelineConfig, *, outdir: Path | None = None, overwrite: bool = False) -> RunResult:
    """Run the whole chain for one pair and write every output (see module docstring)."""
    import geopandas as gpd
    from shapely.geometry import box

    started = utc_now()
    outdir = outdir or config.output.dir
    if outdir is None:
        raise ConfigError("no output folder: give --out or set output.dir in the pipeline file")
    inputs = config.inputs
    limit = config.limits.max_pixels
    binfo = io.raster_info(inputs.before, max_pixels=limit)
    ainfo = io.raster_info(inputs.after, max_pixels=limit)
    bands = _select_bands(config, binfo, ainfo)
    window = _overlap_window(binfo, ainfo)
    ref_grid = binfo.grid
    res = ref_grid.res
    if abs(res[0] - res[1]) > 1e-3 * max(res):
        log.warning("non-square pixels (%s); areas use their product", res)
    from pyproj import CRS

    if not CRS.from_user_input(ref_grid.crs).is_projected:
        raise DataError(f"{inputs.before}: the before image must be in a projected CRS (metres); reproject it first")
    pixel_size = math.sqrt(res[0] * res[1])

    with io.OutputFolder(outdir, overwrite=overwrite) as out:
        # 1-2. read, co-register on the full before grid (the after_coregistered product).
        before_full, bvalid_full, bscale = io.read_grid(inputs.before, bands=bands, max_pixels=limit)
        if not bvalid_full.any():
            raise DataError(f"{inputs.before}: has no valid pixel")
        after_full, avalid_full, report, (adtype, anodata) = coregister_pair(
            inputs.before, inputs.after, grid=ref_grid, bands=bands,
            max_shift_px=config.coregister.max_shift_px, upsample=config.coregister.upsample,
            resampling=config.coregister.resampling, max_pixels=limit,
            enabled=config.coregister.enabled, reference=(before_full, bvalid_full),
            model=config.coregister.model, tie_window=config.coregister.tie_window,
            tie_spacing=config.coregister.tie_spacing,
            tie_points_path=out.file("tie_points.geojson"),
        )
        _write_after(out.file("after_coregistered.tif"), after_full, avalid_full, ref_grid, adtype, config,
                     colorinterp=_colorinterp(ainfo, bands))
        ascale = 255.0 if np.dtype(adtype) == np.uint8 else io._robust_scale(np.nan_to_num(after_full), avalid_full)
        after_full = np.nan_to_num(after_full) / np.float32(ascale)
        valid_full = bvalid_full & avalid_full

        # 3. radiometry over the whole common area.
        # fitted on pixels whose local pattern did not change (see change.stable_mask).
        stable = change_mod.stable_mask(
            before_full, after_full, valid=valid_full, sigma=max(1.5, config.change.ssim_sigma_m / pixel_size)
        )
        after_norm, fit = normalize(
            after_full, before_full, method=config.radiometry.method, valid=valid_full, fit=stable
        )
        del stable
        del after_full

        # footprint of common data, AOIs.
        r0, c0, h, w = window
        footprint = box(*ref_grid.window_grid(r0, c0, h, w).bounds)
        aois = _read_aois(config, ref_grid, footprint)
        aoi_raster = _rasterize(list(aois.geometry), ref_grid, list(range(1, len(aois) + 1)))
        in_aoi = (aoi_raster > 0) & valid_full
        if not in_aoi.any():
            raise NoOverlapError(f"{inputs.aois}: AOIs cover no pixel with data in both images")
        rows = np.flatnonzero(in_aoi.any(axis=1))
        cols = np.flatnonzero(in_aoi.any(axis=0))
        halo = int(math.ceil(4 * max(config.change.smooth_m, config.change.ssim_sigma_m) / pixel_size)) + 8
        wr0, wr1 = max(0, rows[0] - halo), min(ref_grid.height, rows[-1] + 1 + halo)
        wc0, wc1 = max(0, cols[0] - halo), min(ref_grid.width, cols[-1] + 1 + halo)
        sl = (slice(wr0, wr1), slice(wc0, wc1))
        # output rasters cover the AOIs' bounding box only.
        or0, or1, oc0, oc1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        out_grid = ref_grid.window_grid(or0, oc0, or1 - or0, oc1 - oc0)
        inner = (slice(or0 - wr0, or1 - wr0), slice(oc0 - wc0, oc1 - wc0))

        # 4. change layers over the AOI window (with a halo for the filters).
        cfg_c = config.change
        layers = change_mod.change_layers(
            before_full[:, sl[0], sl[1]], after_norm[:, sl[0], sl[1]], valid=valid_full[sl],
            pixel_size=pixel_size, ssim_sigma_m=cfg_c.ssim_sigma_m, smooth_m=cfg_c.smooth_m,
            difference_z=cfg_c.difference_z, vegetation_z=tuple(cfg_c.vegetation_z),
            structure_weight=cfg_c.structure_weight, shadow_damping=cfg_c.shadow_damping,
        )
        aoi_win = aoi_raster[or0:or1, oc0:oc1]
        inside = (aoi_win > 0) & layers.valid[inner]

        def crop(a: np.ndarray) -> np.ndarray:
            return np.where(inside, a[inner], np.nan).astype(np.float32)

        score = crop(layers.score)
        ssim = crop(layers.ssim)
        diff = crop(layers.difference)
        sloss = crop(layers.structure_loss)

        # 5. threshold, clean, polygons.
        cfg_d = config.damage
        if cfg_d.threshold == "auto":
            otsu = change_mod.threshold_otsu_valid(score, inside)
            threshold = max(otsu, cfg_d.min_threshold)
            threshold_info = {"method": "otsu", "otsu": round(otsu, 4), "floor": cfg_d.min_threshold}
        else:
            threshold = float(cfg_d.threshold)
            threshold_info = {"method": "given"}
        threshold_info["value"] = round(threshold, 4)
        clean_args = {
            "pixel_size": pixel_size, "open_radius_m": cfg_d.open_radius_m,
            "close_radius_m": cfg_d.close_radius_m, "min_area_m2": cfg_d.min_area_m2,
            "max_hole_m2": cfg_d.max_hole_m2,
        }
        mask = damage_mod.clean_mask(np.nan_to_num(score) >= threshold, **clean_args) & inside
        if cfg_d.refine_boundaries:
            mask = damage_mod.refine_boundaries(mask, score)
            mask = damage_mod.clean_mask(mask, **clean_args) & inside
        reliability = 1.0 if report.get("reliable") in (True, None) else 0.5
        labels, objects = damage_mod.damage_objects(
            mask, score=score, ssim=ssim, difference=diff, structure_loss=sloss,
            threshold=threshold, pixel_size=pixel_size, reliability=reliability,
        )
        # AOI of each object: the AOI holding most of its pixels.
        aoi_names = list(aois["name"])
        attrs = []
        for obj in objects:
            sel = labels == obj.label
            counts = np.bincount(aoi_win[sel], minlength=len(aoi_names) + 1)[1:]
            attrs.append({
                "id": obj.label, "aoi": aoi_names[int(counts.argmax())], "area_m2": obj.area_m2,
                "score": obj.score, "score_max": obj.score_max, "mean_ssim": obj.mean_ssim,
                "mean_difference": obj.mean_difference,
                "structure_loss_fraction": obj.structure_loss_fraction,
                "severity": obj.severity, "confidence": obj.confidence,
                **_uncertainty_columns(obj.area_m2, report.get("position_uncertainty_m")),
            })
        from .polygonize import polygonize_labels

        damage = polygonize_labels(labels, out_grid.transform, ref_grid.crs, attributes=attrs)
        if len(damage) == 0:
            damage = gpd.GeoDataFrame(
                {k: [] for k in ("id", "aoi", "area_m2", "score", "score_max", "mean_ssim", "mean_difference",
                                 "structure_loss_fraction", "severity", "confidence",
                                 "position_uncertainty_m", "below_uncertainty")},
                geometry=[], crs=ref_grid.crs,
            )

        # 6. outputs.
        tags = {"CHANGEDETECT_VERSION": __version__, "CHANGEDETECT_PARAMETERS": config.parameters()}
        nan = float("nan")
        io.write_cog(out.file("difference.tif"), diff, out_grid, nodata=nan, tags={**tags, "LAYER": "difference magnitude (RMS over bands, before-image units 0-1)"}, descriptions=["difference"])
        io.write_cog(out.file("ssim.tif"), ssim, out_grid, nodata=nan, tags={**tags, "LAYER": "local SSIM of luminance"}, descriptions=["ssim"])
        io.write_cog(out.file("score.tif"), score, out_grid, nodata=nan, tags={**tags, "LAYER": "change score 0-1", "THRESHOLD": threshold}, descriptions=["score"])
        io.write_vector(out.file("damage.geojson"), damage, layer="damage")
        io.write_vector(out.file("aois.geojson"), aois, layer="aois")

        summary = _summary(config, aois, damage, aoi_win, ssim, pixel_size, threshold_info, report, fit, layers.noise)
        if inputs.sites is not None:
            sites = io.read_vector(inputs.sites, what="sites file").to_crs(ref_grid.crs)
            sites = sites[sites.geometry.geom_type == "Point"]
            summary["sites"] = _site_checks(sites, damage, cfg_d.site_radius_m)
        if inputs.truth is not None:
            truth = io.read_vector(inputs.truth, what="truth file").to_crs(ref_grid.crs)
            summary["evaluation"] = evaluate_polygons(damage, truth)
        io.write_json(out.file("coregistration.json"), report)
        io.write_json(out.file("summary.json"), summary)

        from .quicklook import quicklook

        quicklook(
            out.file("quicklook.png"),
            before=before_full[:, or0:or1, oc0:oc1], after=after_norm[:, or0:or1, oc0:oc1],
            score=score, threshold=threshold, grid=out_grid, damage=damage, aois=aois,
            title=f"{config.name}: {len(damage)} damage polygon(s)",
        )

        # styled layers, QGIS project, GeoPackage and report, made from the files above.
        from .publish import publish_outputs

        publish_outputs(
            out.staging, crs=ref_grid.crs, summary=summary,
            inputs={k: getattr(inputs, k) for k in ("before", "after", "aois", "sites", "truth") if getattr(inputs, k)},
        )

        # manifest last.
        outputs = [io.file_record(p, relative_to=out.staging) for p in out.staged()]
        input_records = {
            key: {**io.file_record(getattr(inputs, key)), "path": str(Path(getattr(inputs, key)).resolve())}
            for key in ("before", "after", "aois", "sites", "truth") if getattr(inputs, key) is not None
        }
        dates = config.dates.model_dump(mode="json")
        dates.setdefault("before", None)
        dates["before_from_file"] = binfo.acquisition_date
        dates["after_from_file"] = ainfo.acquisition_date
        manifest = build_manifest(
            inputs=input_records, outputs=outputs, parameters=config.parameters(), dates=dates,
            started=started, finished=utc_now(), command=command_line(),
        )
        manifest["config"] = _resolved_config(config)
        io.write_json(out.file(MANIFEST_NAME), manifest)
        written = out.commit(last=MANIFEST_NAME)
    return RunResult(outdir=Path(outdir), outputs=written, summary=summary)


def _resolved_config(config: PipelineConfig) -> dict[str, Any]:
    """The configuration with absolute input paths, enough to re-run (``verify --rerun``)."""
    data = config.model_dump(mode="json", exclude={"output"})
    for key, value in data["inputs"].items():
        if isinstance(value, str):
            data["inputs"][key] = str(Path(value).resolve())
    return data


def verify(outdir: Path, *, rerun: bool = False, ignore_sidecars: bool = True) -> dict[str, Any]:
    """Check an output folder against its manifest (and optionally re-run it).

    Returns a report with ``ok`` and lists of ``changed``, ``missing``, ``extra``
    outputs, ``inputs_changed`` / ``inputs_missing``, and, with ``rerun``, the
    outputs whose re-computed hash differs (``rerun_differs``).
    """
    import json
    import tempfile

    from .config import config_from_dict

    outdir = Path(outdir)
    mpath = outdir / MANIFEST_NAME
    if not outdir.is_dir():
        raise DataError(f"{outdir}: output folder not found")
    if not mpath.is_file():
        raise DataError(f"{mpath}: manifest not found (not a changedetect output folder, or an incomplete run)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        records = {r["path"]: r for r in manifest["outputs"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{mpath}: manifest is not valid ({exc})") from exc
    changed, missing = [], []
    for name, rec in sorted(records.items()):
        path = outdir / name
        if not path.is_file():
            missing.append(name)
        elif path.stat().st_size != rec.get("bytes") or io.sha256_file(path) != rec.get("sha256"):
            changed.append(name)
    ignored = []
    extra = []
    for p in sorted(outdir.rglob("*")):
        if not p.is_file():
            continue
        name = p.relative_to(outdir).as_posix()
        if name == MANIFEST_NAME or name in records:
            continue
        if ignore_sidecars and name.endswith(".aux.xml"):
            ignored.append(name)
        else:
            extra.append(name)
    inputs_changed, inputs_missing = [], []
    for key, rec in sorted(manifest.get("inputs", {}).items()):
        path = Path(rec.get("path", ""))
        if not path.is_file():
            inputs_missing.append(key)
        elif io.sha256_file(path) != rec.get("sha256"):
            inputs_changed.append(key)
    report: dict[str, Any] = {
        "outdir": str(outdir),
        "checked": len(records),
        "changed": changed,
        "missing": missing,
        "extra": extra,
        "ignored_sidecars": ignored,
        "inputs_changed": inputs_changed,
        "inputs_missing": inputs_missing,
    }
    if rerun:
        if "config" not in manifest:
            raise DataError(f"{mpath}: manifest has no recorded configuration to re-run")
        if inputs_missing or inputs_changed:
            raise DataError(f"{mpath}: cannot re-run: input(s) {', '.join(inputs_missing + inputs_changed)} missing or changed")
        config = config_from_dict(manifest["config"], source=str(mpath))
        with tempfile.TemporaryDirectory(prefix="changedetect-rerun-") as tmp:
            result = run(config, outdir=Path(tmp) / outdir.name)
            fresh = {p.name: io.sha256_file(p) for p in result.outputs if p.name != MANIFEST_NAME}
        report["rerun_differs"] = sorted(
            n for n in set(records) | set(fresh) if records.get(n, {}).get("sha256") != fresh.get(n)
        )
    report["ok"] = not (changed or missing or extra or inputs_changed or report.get("rerun_differs"))
    return report


def _colorinterp(info: io.RasterInfo, bands: list[int]) -> list[str] | None:
    """Colour interpretation of the selected bands; RGB for 3+ band images that declare none."""
    names = [info.colorinterp[b - 1] for b in bands] if info.colorinterp else []
    if len(bands) >= 3 and not {"red", "green", "blue"} <= set(names):
        names = ["red", "green", "blue"] + ["undefined"] * (len(bands) - 3)
    return names or None


def _write_after(
    path: Path, arr: np.ndarray, valid: np.ndarray, grid: Grid, dtype: str, config: PipelineConfig,
    *, colorinterp: list[str] | None = None,
) -> None:
    """after_coregistered.tif: the after image's bands on the before grid, source dtype."""
    out = np.nan_to_num(arr)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(np.dtype(dtype))
        out = np.clip(np.rint(out), info.min, info.max)
    io.write_cog(
        path, out.astype(dtype), grid, nodata=None, valid=valid, colorinterp=colorinterp,
        tags={"CHANGEDETECT_VERSION": __version__, "CHANGEDETECT_PARAMETERS": config.parameters(),
              "LAYER": "after image co-registered onto the before grid"},
    )


def _summary(config, aois, damage, aoi_win, ssim, pixel_size, threshold_info, report, fit, noise) -> dict[str, Any]:
    px_area = pixel_size * pixel_size
    per_aoi = {}
    for i, name in enumerate(aois["name"], start=1):
        sel = aoi_win == i
        area = float(aois.geometry.iloc[i - 1].area)
        d = damage[damage["aoi"] == name] if len(damage) else damage
        damaged = float(d["area_m2"].sum()) if len(d) else 0.0
        vals = ssim[sel & np.isfinite(ssim)]
        by_sev = {s: int((d["severity"] == s).sum()) for s in SEVERITY_ORDER} if len(d) else dict.fromkeys(SEVERITY_ORDER, 0)
        per_aoi[name] = {
            "area_m2": round(area, 2),
            "analysed_area_m2": round(float(np.count_nonzero(sel & np.isfinite(ssim))) * px_area, 2),
            "damaged_area_m2": round(damaged, 2),
            "damaged_percent": round(100 * damaged / area, 3) if area > 0 else 0.0,
            "polygon_count": len(d),
            "polygons_by_severity": by_sev,
            "mean_ssim": round(float(vals.mean()), 4) if vals.size else None,
        }
    dates = config.dates
    window_text = None
    if dates.before and dates.after:
        window_text = (
            f"Damage mapped here is consistent with any event between {dates.before.isoformat()} and "
            f"{dates.after.isoformat()} (the image dates); it does not date the event"
            + (f" (reported incident: {dates.incident.isoformat()})." if dates.incident else ".")
        )
    return {
        "name": config.name,
        "changedetect_version": __version__,
        "pixel_size_m": round(pixel_size, 6),
        "threshold": threshold_info,
        "coregistration": {k: report.get(k) for k in ("shift_px", "shift_m", "reliable", "ssim_before_correction", "ssim_after_correction")},
        "radiometry": fit.as_dict(),
        "noise": noise,
        "aois": per_aoi,
        "polygon_count": len(damage),
        "damaged_area_m2": round(float(damage["area_m2"].sum()) if len(damage) else 0.0, 2),
        "date_window": window_text,
    }


# --------------------------------------------------------------------------- other commands
def coregister_files(
    reference: Path,
    target: Path,
    out: Path,
    *,
    overwrite: bool = False,
    max_shift_px: float = 64.0,
    upsample: int = 20,
    resampling: str = "cubic",
    max_pixels: int = io.DEFAULT_MAX_PIXELS,
    model: str = "auto",
) -> dict[str, Any]:
    """Write every band of ``target`` aligned onto ``reference``'s exact grid.

    Also writes the co-registration report (``OUT.coregistration.json``) and the
    tie points (``OUT.tie_points.geojson``) beside it. The model is estimated on
    the bands both images have in common and applied to every band in one
    resampling from the target's original pixels.
    """
    out = Path(out)
    report_path = out.with_name(out.stem + ".coregistration.json")
    ties_path = out.with_name(out.stem + ".tie_points.geojson")
    for p in (out, report_path, ties_path):
        if p.exists() and not overwrite:
            raise io.OutputExistsError(f"{p}: exists (use --overwrite to replace it)")
    rinfo = io.raster_info(reference, max_pixels=max_pixels)
    tinfo = io.raster_info(target, max_pixels=max_pixels)
    _overlap_window(rinfo, tinfo)
    common = list(range(1, min(rinfo.count, tinfo.count) + 1))
    before, bvalid, _ = io.read_grid(reference, bands=common, max_pixels=max_pixels)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="changedetect-ties-") as tmp:
        tmp_ties = Path(tmp) / "tie_points.geojson"
        aligned, valid, report, (dtype, _) = coregister_pair(
            reference, target, grid=rinfo.grid, bands=common, max_shift_px=max_shift_px,
            upsample=upsample, resampling=resampling, max_pixels=max_pixels, reference=(before, bvalid),
            model=model, tie_points_path=tmp_ties, apply_bands=list(range(1, tinfo.count + 1)),
        )
        ties_bytes = tmp_ties.read_bytes()
    allbands = aligned
    arr = np.nan_to_num(allbands)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(np.dtype(dtype))
        arr = np.clip(np.rint(arr), info.min, info.max)
    report["reference"] = {**io.file_record(reference), "path": str(reference)}
    report["target"] = {**io.file_record(target), "path": str(target)}
    descriptions = [d or f"band {i}" for i, d in enumerate(tinfo.descriptions, start=1)]
    io.write_cog(
        out, arr.astype(dtype), rinfo.grid, valid=valid, overwrite=overwrite, descriptions=descriptions,
        colorinterp=_colorinterp(tinfo, list(range(1, tinfo.count + 1))),
        tags={"CHANGEDETECT_VERSION": __version__, "COREGISTRATION_SHIFT_PX": report["shift_px"]},
    )
    io.write_json(report_path, report, overwrite=overwrite)
    with io.atomic_output(ties_path, overwrite=overwrite) as tmp_path:
        tmp_path.write_bytes(ties_bytes)
    return report


def evaluate_files(
    damage_path: Path,
    truth_path: Path,
    *,
    grid_path: Path | None = None,
    min_cover: float = 0.3,
) -> dict[str, Any]:
    """Compare a damage map with reference polygons.

    Without a grid, areas are exact, in the local UTM zone of the truth. With
    ``grid_path`` (a raster), both layers are rasterized on its grid (pixel centres)
    and counted in pixels; object recall is computed on the polygons either way.
    """
    from .evaluate import object_recall, pixel_metrics

    damage = io.read_vector(damage_path, what="damage file") if _has_features(damage_path) else None
    truth = io.read_vector(truth_path, what="truth file")
    if grid_path is not None:
        crs = io.raster_info(grid_path).grid.crs
    else:
        crs = truth.estimate_utm_crs()
    truth = truth.to_crs(crs)
    if damage is None:
        import geopandas as gpd

        damage = gpd.GeoDataFrame(geometry=[], crs=crs)
    damage = damage.to_crs(crs)
    if grid_path is not None:
        grid = io.raster_info(grid_path).grid
        metrics = pixel_metrics(
            _rasterize(list(damage.geometry), grid) > 0, _rasterize(list(truth.geometry), grid) > 0
        ).as_dict()
        classes = [str(s) for s in truth["severity"]] if "severity" in truth.columns else None
        objects = object_recall(list(truth.geometry), list(damage.geometry), classes=classes, min_cover=min_cover)
        metrics["objects"] = {k: v for k, v in objects.items() if k != "coverage"}
        metrics["grid"] = str(grid_path)
    else:
        metrics = evaluate_polygons(damage, truth)
        metrics["crs"] = str(crs)
    metrics["damage"] = str(damage_path)
    metrics["truth"] = str(truth_path)
    return metrics


def _has_features(path: Path) -> bool:
    """False for a readable vector file with zero features (an empty damage map is valid)."""
    import pyogrio

    io._check_file(Path(path), "damage file")
    try:
        return pyogrio.read_info(path)["features"] != 0
    except Exception as exc:  # noqa: BLE001 - any driver error is a data error here
        raise DataError(f"{path}: damage file could not be read ({io._first_line(exc)})") from exc
