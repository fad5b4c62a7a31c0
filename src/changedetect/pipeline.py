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

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, io
from . import streaming
from .config import PipelineConfig
from .errors import ChangeDetectWarning, ConfigError, DataError, NoOverlapError
from .grid import Grid
from .provenance import MANIFEST_NAME, build_manifest, command_line, utc_now
from .tiling import STRIP_PIXELS

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
    gdf = gdf.assign(name=gdf["name"].astype(str))
    wanted = config.inputs.aoi_names
    if wanted is not None:
        missing = [n for n in wanted if n not in set(gdf["name"])]
        if missing:
            raise ConfigError(f"{path}: no AOI named {', '.join(repr(n) for n in missing)} (inputs.aoi_names)")
        gdf = gdf[gdf["name"].isin(wanted)]
    gdf = gdf.assign(geometry=gdf.geometry.intersection(footprint))
    gdf = gdf[~gdf.geometry.is_empty & (gdf.geometry.area > 0)]
    if len(gdf) == 0:
        raise NoOverlapError(f"{path}: no AOI overlaps the area covered by both images")
    return gdf[["name", "geometry"]].reset_index(drop=True)


def _read_buildings(path: Path, grid: Grid, region: Any) -> Any:
    """Building footprints over the analysed region, in the grid's CRS (ids are their order in the file)."""
    from shapely.geometry import box

    gdf = io.read_vector(path, what="building footprints").to_crs(grid.crs)
    gdf = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if len(gdf) == 0:
        raise DataError(f"{path}: building footprints file has no polygon")
    area = box(*grid.window_grid(region.r0, region.c0, region.height, region.width).bounds)
    gdf = gdf.assign(source_index=np.arange(len(gdf)))
    return gdf[gdf.geometry.intersects(area)].reset_index(drop=True)


def _building_summary(buildings: Any) -> dict[str, Any]:
    from .buildings import GRADES

    counts = buildings["grade"].value_counts()
    out = {"count": len(buildings), "by_grade": {g: int(counts.get(g, 0)) for g in GRADES}}
    if "whole_footprint" in buildings.columns:
        out["whole_footprints_in_damage"] = int(buildings["whole_footprint"].sum())
    return out


def _rasterize(geoms: list, grid: Grid, values: list[int] | None = None) -> np.ndarray:
    from rasterio.features import rasterize

    if not geoms:
        return np.zeros(grid.shape, dtype=np.int32)
    shapes = zip(geoms, values or [1] * len(geoms), strict=True)
    return rasterize(shapes, out_shape=grid.shape, transform=grid.transform, fill=0, dtype="int32")


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
    estimation_pixels: int = streaming.COREG_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], tuple[str, float | None]]:
    """Warp the after image onto ``grid`` through a fitted co-registration model, in memory.

    :func:`changedetect.streaming.estimate_alignment`, then one resampling of the
    after image *from its original pixels* through the model. ``model`` caps
    the richest model allowed; ``tie_window`` / ``tie_spacing`` override the
    tie-point grid. With ``tie_points_path``, the tie points are written there
    (GeoJSON, EPSG:4326).

    Returns the corrected after image (``apply_bands``, default ``bands``) in
    source units (NaN where no data), its valid mask, the co-registration
    report, and the source (dtype, nodata). For scenes of any size, the
    pipeline writes the aligned image strip by strip instead
    (:func:`changedetect.streaming.write_aligned`).
    """
    align = streaming.estimate_alignment(
        before_path, after_path, grid=grid, bands=bands, max_shift_px=max_shift_px, upsample=upsample,
        resampling=resampling, max_pixels=max_pixels, enabled=enabled, reference=reference, model=model,
        tie_window=tie_window, tie_spacing=tie_spacing, estimation_pixels=estimation_pixels,
        keep_aligned=apply_bands is None or list(apply_bands) == list(bands),
    )
    if tie_points_path is not None:
        streaming.write_tie_points(tie_points_path, align)
    if align.aligned is not None:
        aligned, svalid = align.aligned
        return aligned, svalid, align.report, (align.dtype, align.nodata)
    aligned, svalid, _, _ = io.warp_with_model(
        after_path, grid, align.model, bands=apply_bands or bands, resampling=resampling,
        max_pixels=max_pixels, check=False,
    )
    return aligned, svalid, align.report, (align.dtype, align.nodata)


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
def run(
    config: PipelineConfig,
    *,
    outdir: Path | None = None,
    overwrite: bool = False,
    write_layers: bool = False,
    strip_pixels: int = STRIP_PIXELS,
    progress: Any = None,
) -> RunResult:
    """Run the whole chain for one pair and write every output (see module docstring).

    ``write_layers`` also writes each term of the change score as a COG
    (``structure_loss``, ``difference_evidence``, ``vegetation``,
    ``shadow_change``, ``coherence_loss``). ``strip_pixels`` sizes the strips the scene is processed
    in (memory grows with it; the outputs do not depend on it). ``progress``,
    if given, is called as ``progress(stage, rows_done, rows_total)`` during the
    long steps.
    """
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

    cfg_r = config.coregister
    with io.gdal_env(), io.OutputFolder(outdir, overwrite=overwrite) as out, _background() as background:
        # 1-2. co-register; the after image is warped once, strip by strip, into
        # after_coregistered.tif, which every later step reads.
        align = streaming.estimate_alignment(
            inputs.before, inputs.after, grid=ref_grid, bands=bands, max_shift_px=cfg_r.max_shift_px,
            upsample=cfg_r.upsample, resampling=cfg_r.resampling, max_pixels=limit, enabled=cfg_r.enabled,
            model=cfg_r.model, tie_window=cfg_r.tie_window, tie_spacing=cfg_r.tie_spacing,
        )
        report = align.report
        streaming.write_tie_points(out.file("tie_points.geojson"), align)
        tags = {"CHANGEDETECT_VERSION": __version__, "CHANGEDETECT_PARAMETERS": config.parameters()}
        # The COG is made in the background; the detection reads the warped strips.
        aligned = streaming.write_aligned(
            inputs.after, ref_grid, align.model, out.file("after_coregistered.tif"), bands=bands,
            dtype=align.dtype, resampling=cfg_r.resampling, max_pixels=limit,
            tags={**tags, "LAYER": "after image co-registered onto the before grid"},
            colorinterp=_colorinterp(ainfo, bands), progress=progress, background=background,
        )

        # AOIs, clipped to the area with data in both images.
        r0, c0, h, w = window
        footprint = box(*ref_grid.window_grid(r0, c0, h, w).bounds)
        aois = _read_aois(config, ref_grid, footprint)
        region = streaming.aoi_region(list(aois.geometry), ref_grid)

        # 3-5. radiometry, change layers, threshold, objects (strip by strip).
        with io.RasterReader(inputs.before, bands=bands, max_pixels=limit) as rb, \
                io.RasterReader(aligned.readable, scale=align.scale) as ra:
            detector = streaming.Detector(rb, ra, ref_grid, config, strip_pixels=strip_pixels,
                                          progress=progress)
            detector._reliable = report.get("reliable")
            detector._uncertainty_m = report.get("position_uncertainty_m")
            footprints = _read_buildings(inputs.buildings, ref_grid, region) if inputs.buildings else None
            det = detector.run(region, aois, out.file, tags,
                               write_layers=write_layers or config.output.write_layers, buildings=footprints,
                               background=background)
            damage = det.damage
            io.write_vector(out.file("damage.geojson"), damage, layer="damage")
            io.write_vector(out.file("aois.geojson"), aois, layer="aois")
            if det.buildings is not None:
                io.write_vector(out.file("buildings.geojson"), det.buildings, layer="buildings")
                io.write_vector(out.file("ground_changes.geojson"), det.ground_changes, layer="ground_changes")

            summary = _summary(config, aois, damage, det.per_aoi, pixel_size, det.threshold_info, report,
                               det.fit, det.noise)
            if det.buildings is not None:
                summary["buildings"] = _building_summary(det.buildings)
                summary["ground_change_count"] = len(det.ground_changes)
            if inputs.sites is not None:
                sites = io.read_vector(inputs.sites, what="sites file").to_crs(ref_grid.crs)
                sites = sites[sites.geometry.geom_type == "Point"]
                summary["sites"] = _site_checks(sites, damage, config.damage.site_radius_m)
            if inputs.truth is not None:
                truth = io.read_vector(inputs.truth, what="truth file").to_crs(ref_grid.crs)
                summary["evaluation"] = evaluate_polygons(damage, truth)
                if det.buildings is not None and "severity" in truth.columns:
                    from .evaluate import building_agreement, building_truth

                    reference = building_truth(list(det.buildings.geometry), list(truth.geometry),
                                               list(truth["severity"]))
                    summary["evaluation"]["buildings"] = building_agreement(list(det.buildings["grade"]), reference)
            io.write_json(out.file("coregistration.json"), report)
            io.write_json(out.file("summary.json"), summary)
        # the quicklook reads the finished COGs' overviews
        aligned_path = aligned.wait()
        with io.RasterReader(inputs.before, bands=bands, max_pixels=limit) as rb, \
                io.RasterReader(aligned_path, scale=align.scale) as ra:
            _write_quicklook(out.file("quicklook.png"), rb, ra, out.file("score.tif"), det, aois, region,
                             title=f"{config.name}: {len(damage)} damage polygon(s)")

        # styled layers, QGIS project, GeoPackage and report, made from the files above.
        from .publish import publish_outputs

        publish_outputs(
            out.staging, crs=ref_grid.crs, summary=summary,
            inputs={k: getattr(inputs, k) for k in ("before", "after", "aois", "sites", "truth", "buildings") if getattr(inputs, k)},
        )

        # manifest last.
        outputs = [io.file_record(p, relative_to=out.staging) for p in out.staged()]
        input_records = {
            key: {**io.file_record(getattr(inputs, key)), "path": str(Path(getattr(inputs, key)).resolve())}
            for key in ("before", "after", "aois", "sites", "truth", "buildings") if getattr(inputs, key) is not None
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


@contextlib.contextmanager
def _background() -> Iterator[ThreadPoolExecutor]:
    """One thread that makes the COGs while the run goes on (their compression is
    multi-threaded, and the mask clean-up and objects that run meanwhile are not).
    On the way out, also on an error or an interrupt, it ends the COG it is making
    and drops the queued ones, before the output folder is committed or removed."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cog")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def _summary(config, aois, damage, per_aoi_stats, pixel_size, threshold_info, report, fit, noise) -> dict[str, Any]:
    px_area = pixel_size * pixel_size
    per_aoi = {}
    for i, name in enumerate(aois["name"], start=1):
        area = float(aois.geometry.iloc[i - 1].area)
        d = damage[damage["aoi"] == name] if len(damage) else damage
        damaged = float(d["area_m2"].sum()) if len(d) else 0.0
        stats = per_aoi_stats.get(i, {"analysed": 0, "ssim_sum": 0.0})
        n = stats["analysed"]
        by_sev = {s: int((d["severity"] == s).sum()) for s in SEVERITY_ORDER} if len(d) else dict.fromkeys(SEVERITY_ORDER, 0)
        per_aoi[name] = {
            "area_m2": round(area, 2),
            "analysed_area_m2": round(float(n) * px_area, 2),
            "damaged_area_m2": round(damaged, 2),
            "damaged_percent": round(100 * damaged / area, 3) if area > 0 else 0.0,
            "polygon_count": len(d),
            "polygons_by_severity": by_sev,
            "mean_ssim": round(stats["ssim_sum"] / n, 4) if n else None,
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


#: The quicklook is drawn from at most this many pixels per side (block averages above).
QUICKLOOK_MAX_SIDE = 1024


def _write_quicklook(path: Path, rb: io.RasterReader, ra: io.RasterReader, score_path: Path, det: Any,
                     aois: Any, region: Any, *, title: str) -> None:
    """quicklook.png of the analysed region (block averages when large).

    The co-registered after image and the score are COGs by now, so their
    averages come from their overviews; the before image is read once.
    """
    from .quicklook import quicklook

    f = max(1, math.ceil(max(region.height, region.width) / QUICKLOOK_MAX_SIDE))
    qgrid = streaming._decimated(det.grid, f)

    def averaged(reader: io.RasterReader, r0: int = region.r0, c0: int = region.c0) -> tuple[np.ndarray, np.ndarray]:
        if f == 1:
            arr, ok = reader.read_raw(r0, r0 + region.height, c0, c0 + region.width)
        else:
            arr = io.read_averaged(reader.path, qgrid, bands=reader.indexes, factor=f)
            ok = np.all(np.isfinite(arr), axis=0)
        return np.nan_to_num(arr) / np.float32(reader.scale), ok

    before, bvalid = averaged(rb)
    after, avalid = averaged(ra)
    after = det.normalisation.apply(after, bvalid & avalid)
    with io.RasterReader(score_path, scale=1.0) as rs:
        score, svalid = averaged(rs, 0, 0)  # the score covers the region only
        score = np.where(svalid, score, np.nan)
    quicklook(path, before=before, after=after, score=score[0], threshold=det.threshold, grid=det.grid,
              damage=det.damage, aois=aois, title=title)


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
    with io.gdal_env():
        align = streaming.estimate_alignment(
            reference, target, grid=rinfo.grid, bands=common, max_shift_px=max_shift_px, upsample=upsample,
            resampling=resampling, max_pixels=max_pixels, model=model,
        )
        report = align.report
        report["reference"] = {**io.file_record(reference), "path": str(reference)}
        report["target"] = {**io.file_record(target), "path": str(target)}
        descriptions = [d or f"band {i}" for i, d in enumerate(tinfo.descriptions, start=1)]
        all_bands = list(range(1, tinfo.count + 1))
        # the aligned image is written strip by strip: any size in bounded memory
        streaming.write_aligned(
            target, rinfo.grid, align.model, out, bands=all_bands, dtype=align.dtype, resampling=resampling,
            max_pixels=max_pixels, descriptions=descriptions, colorinterp=_colorinterp(tinfo, all_bands),
            tags={"CHANGEDETECT_VERSION": __version__, "COREGISTRATION_SHIFT_PX": report["shift_px"]},
            overwrite=overwrite,
        ).wait()
        streaming.write_tie_points(ties_path, align, overwrite=overwrite)
    io.write_json(report_path, report, overwrite=overwrite)
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
