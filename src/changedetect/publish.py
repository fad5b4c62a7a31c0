"""Everything made for people from a run's files: QGIS styles and project, GeoPackage, report.

:func:`publish_outputs` runs at the end of a run, before the manifest, on the files
the run has written (rasters, ``damage.geojson``, ``aois.geojson``,
``summary.json``, ``coregistration.json``) and the run's inputs. It writes:

``sites.geojson``, ``sites_uncertainty.geojson``
    The reported sites with their verdicts, and their uncertainty circles (when
    the run has a sites file).
``*.qml``
    A QGIS style beside every layer, applied automatically when QGIS loads it.
``project.qgs``
    A QGIS project with the before and after images, the change layers and the
    vectors, styled, in the run's CRS, opening on the areas of interest.
``layers.gpkg``
    Every vector layer in the run's projected CRS (the GeoJSONs are EPSG:4326).
``report.html``
    One self-contained page for editors (see :mod:`changedetect.report`).

Every file is written atomically and deterministically: the same run files and
inputs give byte-identical outputs, so :func:`regenerate` (``changedetect
report``) can rewrite them without breaking ``changedetect verify``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from . import styles as st
from .errors import DataError
from .grid import Grid
from .provenance import MANIFEST_NAME
from .qgsproject import ProjectGroup, ProjectLayer, project_xml

__all__ = ["publish_outputs", "regenerate", "PUBLISHED_NAMES"]

#: Value of every ``last_change`` timestamp in layers.gpkg, fixed so that two runs
#: give identical files (the time of the run is in manifest.json).
GPKG_DATE = "1970-01-01T00:00:00.000Z"

#: Files written by :func:`publish_outputs` (some only when their layer exists).
PUBLISHED_NAMES = (
    "sites.geojson", "sites_uncertainty.geojson", "layers.gpkg",
    "after_coregistered.qml", "difference.qml", "ssim.qml", "score.qml",
    "damage.qml", "aois.qml", "sites.qml", "sites_uncertainty.qml", "tie_points.qml",
    "buildings.qml", "ground_changes.qml", "project.qgs", "report.html", "threshold_sweep.csv", "threshold_sweep.png",
)

#: Input roles, in the order they are listed.
INPUT_ROLES = ("before", "after", "aois", "sites", "truth")

_STAGING = re.compile(r"^\.changedetect-partial-\d+$")
#: GDAL configuration options are process-wide: one GeoPackage write at a time.
_GPKG_LOCK = threading.Lock()
MAX_CHIP_PX = 420
MAX_OVERVIEW_PX = 1000
MAX_STATS_PX = 1024
MAX_CHIPS = 24


# --------------------------------------------------------------------------- small I/O helpers
def _write_text(path: Path, text: str) -> Path:
    with io.atomic_output(path, overwrite=True) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    return path


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: {what} is not valid JSON ({exc})") from exc


def _plain(data: Any) -> Any:
    """The JSON form of ``data`` (sorted keys, plain types), as summary.json holds it."""
    return json.loads(json.dumps(data, sort_keys=True, default=io._json_default))


def _read_layer(path: Path, what: str, crs: str) -> Any:
    """A vector output in ``crs``; an empty GeoDataFrame (with its columns) when it has no feature."""
    import geopandas as gpd
    import pyogrio

    io._check_file(path, what)
    try:
        empty = pyogrio.read_info(path)["features"] == 0
    except Exception as exc:  # noqa: BLE001 - any driver error is a data error here
        raise DataError(f"{path}: {what} could not be read ({io._first_line(exc)})") from exc
    if empty:
        gdf = gpd.read_file(path, engine="pyogrio")
        return gdf.set_crs("EPSG:4326", allow_override=True).to_crs(crs)
    return io.read_vector(path, what=what).to_crs(crs)


@contextlib.contextmanager
def _fixed_ogr_date() -> Iterator[None]:
    """Make GDAL's GeoPackage driver write :data:`GPKG_DATE` instead of the current time.

    Also skips SQLite's fsync calls while the temporary file is written (it is
    renamed into place only once complete).
    """
    import pyogrio

    options = {"OGR_CURRENT_DATE": GPKG_DATE, "OGR_SQLITE_SYNCHRONOUS": "OFF"}
    with _GPKG_LOCK:
        previous = {k: pyogrio.get_gdal_config_option(k) for k in options}
        pyogrio.set_gdal_config_options(options)
        try:
            yield
        finally:
            pyogrio.set_gdal_config_options(previous)


def write_geopackage(path: Path, layers: dict[str, Any], *, styles: dict[str, str] | None = None) -> Path:
    """Write several GeoDataFrames as layers of one GeoPackage, atomically and deterministically.

    ``io.write_vector`` writes one layer per file (each call replaces the file), so
    the layers are written one after the other into a temporary GeoPackage that is
    renamed into place when complete. GDAL's ``last_change`` timestamps are fixed
    to :data:`GPKG_DATE`, and the file follows GeoPackage 1.2 so that older GDAL
    builds (QGIS 3.22 on Debian 12) read it without a warning.

    ``styles`` (layer name -> QML text) are stored in a ``layer_styles`` table, the
    way QGIS saves styles into a GeoPackage, so QGIS applies them when it loads a
    layer of the file.
    """
    import pyogrio

    geometry_types = {"damage": "MultiPolygon", "aois": "MultiPolygon", "sites_uncertainty": "Polygon"}
    with io.atomic_output(path, overwrite=True) as tmp, _fixed_ogr_date():
        first = True
        for name, gdf in layers.items():
            kwargs: dict[str, Any] = {"dataset_options": {"VERSION": "1.2"}} if first else {}
            if len(gdf) == 0:
                kwargs["geometry_type"] = geometry_types.get(name, "Point")
            pyogrio.write_dataframe(gdf, tmp, driver="GPKG", layer=name, **kwargs)
            first = False
        if styles:
            pyogrio.write_dataframe(_layer_styles(styles, layers), tmp, driver="GPKG", layer="layer_styles")
    return path


def _layer_styles(styles: dict[str, str], layers: dict[str, Any]) -> Any:
    """The ``layer_styles`` table QGIS reads default styles from (one default style per layer)."""
    import pandas as pd

    names = [n for n in layers if n in styles]
    when = pd.Timestamp(GPKG_DATE.rstrip("Z"))
    return pd.DataFrame({
        "f_table_catalog": [""] * len(names),
        "f_table_schema": [""] * len(names),
        "f_table_name": names,
        "f_geometry_column": ["geom"] * len(names),
        "styleName": names,
        "styleQML": [styles[n] for n in names],
        "styleSLD": [""] * len(names),
        "useAsDefault": [True] * len(names),
        "description": [f"changedetect style of {n}" for n in names],
        "owner": [""] * len(names),
        "ui": [""] * len(names),
        "update_time": [when] * len(names),
    })


def _final_folder(folder: Path) -> Path:
    """Where the files will live: the output folder, not the run's staging sub-folder."""
    return folder.parent if _STAGING.match(folder.name) else folder


def _source_path(path: Path, final: Path, *, relative: bool) -> str:
    """A layer source for project.qgs: ``./name`` inside the folder, else absolute or relative."""
    target = Path(os.path.abspath(path))
    base = Path(os.path.abspath(final))
    if target.parent == base:
        return f"./{target.name}"
    if relative:
        with contextlib.suppress(ValueError):
            return Path(os.path.relpath(target, base)).as_posix()
    return target.as_posix()


# --------------------------------------------------------------------------- layers
def _sites_layers(path: Path, entries: list[dict[str, Any]], crs: str) -> tuple[Any, Any]:
    """Reported sites (points with their checks) and their uncertainty circles, in ``crs``."""
    import geopandas as gpd
    import pandas as pd

    pts = io.read_vector(path, what="sites file").to_crs(crs)
    pts = pts[pts.geometry.geom_type == "Point"].reset_index(drop=True)
    if len(pts) != len(entries):
        raise DataError(f"{path}: has {len(pts)} point(s) but summary.json checks {len(entries)} site(s)")
    ids = [e.get("nearest_polygon_id") for e in entries]
    table = {
        "name": [str(e["name"]) for e in entries],
        "verdict": [str(e.get("verdict", "")) for e in entries],
        "inside_damage": [bool(e.get("inside_damage", False)) for e in entries],
        "distance_m": [float(e["distance_m"]) if e.get("distance_m") is not None else math.nan for e in entries],
        "uncertainty_m": [float(e["uncertainty_m"]) for e in entries],
        "damaged_area_within_radius_m2": [float(e.get("damaged_area_within_radius_m2") or 0.0) for e in entries],
        "nearest_polygon_id": pd.array([int(i) if i is not None else None for i in ids], dtype="Int64"),
        "nearest_severity": [str(e["nearest_severity"]) if e.get("nearest_severity") else None for e in entries],
    }
    sites = gpd.GeoDataFrame(table, geometry=list(pts.geometry), crs=crs)
    circles = gpd.GeoDataFrame(
        {"name": table["name"], "uncertainty_m": table["uncertainty_m"]},
        geometry=[p.buffer(r, quad_segs=32) for p, r in zip(pts.geometry, table["uncertainty_m"], strict=True)],
        crs=crs,
    )
    return sites, circles


# --------------------------------------------------------------------------- rasters
def _grid_for(bounds: tuple[float, float, float, float], crs: str, res: float, max_px: int) -> Grid:
    """A north-up grid covering ``bounds`` at ``res`` (coarser if it would exceed ``max_px``)."""
    from affine import Affine

    left, bottom, right, top = bounds
    w, h = max(right - left, res), max(top - bottom, res)
    res = max(res, max(w, h) / max_px)
    cols, rows = max(1, math.ceil(w / res - 1e-9)), max(1, math.ceil(h / res - 1e-9))
    return Grid(crs, Affine(res, 0.0, left, 0.0, -res, top), cols, rows)


def _display_bands(info: io.RasterInfo) -> list[int]:
    """Bands drawn as red, green, blue (or one grey band)."""
    if info.count < 3:
        return [1]
    ci = list(info.colorinterp)
    if {"red", "green", "blue"} <= set(ci):
        return [ci.index("red") + 1, ci.index("green") + 1, ci.index("blue") + 1]
    return [1, 2, 3]


def _read(path: Path, grid: Grid, bands: list[int], native_res: float) -> np.ndarray:
    """Bands of ``path`` on ``grid`` (NaN where no data): nearest at native resolution, else bilinear.

    For a coarser grid the file is first averaged over blocks of about the grid's
    pixel size (:func:`changedetect.io.read_averaged`), so a view of a large
    scene reads each pixel once and needs no more memory than the view.
    """
    factor = int(grid.res[0] // native_res)
    if factor >= 2:
        return io.read_averaged(path, grid, bands=bands, factor=factor)
    arr, _, _, _ = io.warp_to_grid(path, grid, bands=bands, resampling="nearest", check=False)
    return arr


def _stretch(arr: np.ndarray, dtype: str) -> list[tuple[float, float]]:
    """Per-band 2-98 % display range of valid pixels (integers for integer data)."""
    ok = np.all(np.isfinite(arr), axis=0)
    out = []
    for band in arr:
        vals = band[ok]
        if vals.size == 0:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = (float(v) for v in np.percentile(vals, [2, 98]))
        if np.issubdtype(np.dtype(dtype), np.integer):
            lo, hi = float(math.floor(lo)), float(math.ceil(hi))
        else:
            lo, hi = float(f"{lo:.6g}"), float(f"{hi:.6g}")
        if hi <= lo:
            hi = lo + 1.0
        out.append((lo, hi))
    return out


def _rgba(arr: np.ndarray, ranges: list[tuple[float, float]]) -> np.ndarray:
    """(bands, rows, cols) -> (rows, cols, 4) display RGBA in [0, 1]; transparent without data."""
    scaled = np.stack([(b - lo) / (hi - lo) for b, (lo, hi) in zip(arr, ranges, strict=True)])
    if scaled.shape[0] == 1:
        scaled = np.repeat(scaled, 3, axis=0)
    ok = np.all(np.isfinite(scaled), axis=0)
    rgb = np.clip(np.nan_to_num(np.moveaxis(scaled, 0, -1)), 0, 1)
    return np.concatenate([rgb, ok[..., None].astype(rgb.dtype)], axis=-1).astype(np.float32)


class _Image:
    """A display view of a raster file: its bands, stretch and QGIS alpha band."""

    def __init__(self, path: Path, bounds: tuple[float, float, float, float], crs: str) -> None:
        self.path = path
        self.info = io.raster_info(path)
        self.bands = _display_bands(self.info)
        self.res = min(self.info.grid.res)
        sample = _read(path, _grid_for(bounds, crs, self.res, MAX_STATS_PX), self.bands, self.res)
        self.ranges = _stretch(sample, self.info.dtype)

    def style(self, *, mask_band: bool) -> st.LayerStyle:
        """QGIS style with this image's stretch.

        ``mask_band``: the file has an internal mask (after_coregistered.tif always
        does), which QGIS shows as an extra alpha band after the data bands. For
        other files only a declared alpha band is used (nodata values QGIS hides
        by itself).
        """
        ci = list(self.info.colorinterp)
        if "alpha" in ci:
            alpha = ci.index("alpha") + 1
        elif mask_band:
            alpha = self.info.count + 1
        else:
            alpha = -1
        if len(self.bands) == 3:
            return st.rgb_style(self.ranges, bands=(self.bands[0], self.bands[1], self.bands[2]), alpha_band=alpha)
        return st.gray_style(self.ranges[0], band=self.bands[0], alpha_band=alpha)

    def display(self, grid: Grid) -> np.ndarray:
        return _rgba(_read(self.path, grid, self.bands, self.res), self.ranges)


def _bounds(gdf: Any) -> tuple[float, float, float, float]:
    left, bottom, right, top = (float(v) for v in gdf.total_bounds)
    return (left, bottom, right, top)


def _pad(bounds: tuple[float, float, float, float], frac: float, minimum: float) -> tuple[float, float, float, float]:
    left, bottom, right, top = bounds
    m = max(frac * max(right - left, top - bottom), minimum)
    return (left - m, bottom - m, right + m, top + m)


# --------------------------------------------------------------------------- report data
def _chips(folder: Path, data_layers: dict[str, Any], summary: dict[str, Any], crs: str, res: float,
           before: _Image | None, after: _Image) -> tuple[list[Any], list[str]]:
    from .report import Chip

    places: list[tuple[str, str, tuple[float, float, float, float], list[tuple[str, str]]]] = []
    notes = []
    aois = data_layers["aois"]
    per_aoi = summary.get("aois") or {}
    for name, geom in list(zip(aois["name"], aois.geometry, strict=True))[:MAX_CHIPS]:
        a = per_aoi.get(str(name), {})
        by_sev = a.get("polygons_by_severity") or {}
        facts = [
            ("damaged", f"{a.get('damaged_area_m2', 0):,.0f} m² of {a.get('area_m2', 0):,.0f} m² "
                        f"({a.get('damaged_percent', 0):.1f} %)"),
            ("polygons", ", ".join(f"{by_sev[k]} {k}" for k in st.SEVERITY_COLOURS if by_sev.get(k)) or "none"),
        ]
        places.append(("aoi", str(name), _pad(tuple(geom.bounds), 0.08, 5.0), facts))
    if len(aois) > MAX_CHIPS:
        notes.append(f"Image panels are shown for the first {MAX_CHIPS} of {len(aois)} areas of interest.")
    sites = data_layers.get("sites")
    if sites is not None:
        for _, row in sites.head(MAX_CHIPS).iterrows():
            r = max(2.0 * float(row["uncertainty_m"]), 30.0)
            x, y = row.geometry.x, row.geometry.y
            dist = row["distance_m"]
            facts = [
                ("verdict", str(row["verdict"])),
                ("distance to nearest damage", "n/a" if dist != dist else f"{dist:,.1f} m"),
                ("damage within the uncertainty radius", f"{row['damaged_area_within_radius_m2']:,.0f} m² "
                                                         f"(radius {row['uncertainty_m']:,.0f} m)"),
            ]
            places.append(("site", str(row["name"]), (x - r, y - r, x + r, y + r), facts))
        if len(sites) > MAX_CHIPS:
            notes.append(f"Image panels are shown for the first {MAX_CHIPS} of {len(sites)} reported sites.")
    chips = []
    for kind, name, bounds, facts in places:
        grid = _grid_for(bounds, crs, res, MAX_CHIP_PX)
        left, top = grid.transform.c, grid.transform.f
        gb = (left, top - grid.height * grid.res[1], left + grid.width * grid.res[0], top)
        layers = {n: _read(folder / f"{n}.tif", grid, [1], res)[0] for n in ("difference", "ssim", "score")}
        chips.append(Chip(
            kind=kind, name=name, bounds=gb,
            before=before.display(grid) if before is not None else None,
            after=after.display(grid),
            difference=layers["difference"], ssim=layers["ssim"], score=layers["score"], facts=facts,
        ))
    return chips, notes


#: Thresholds of the sweep written with every run that has truth labels.
SWEEP_THRESHOLDS = tuple(round(0.02 + 0.01 * i, 2) for i in range(97))


def _sweep(folder: Path, truth_path: Path, crs: str) -> dict[str, Any]:
    """Pixel precision/recall/F1 of ``score >= t`` against the truth, read strip by strip."""
    from rasterio.features import rasterize

    from .report import sweep_counts, sweep_from_counts
    from .tiling import rows_per_strip

    truth = io.read_vector(truth_path, what="truth file").to_crs(crs)
    polys = [g for g in truth.geometry if g.geom_type in ("Polygon", "MultiPolygon")]
    tp = fp = 0
    n_pos = n_neg = 0
    with io.RasterReader(folder / "score.tif", scale=1.0) as src:
        grid = io.raster_info(folder / "score.tif").grid
        height, width = src.shape
        step = rows_per_strip(width)
        for r0 in range(0, height, step):
            r1 = min(height, r0 + step)
            arr, valid = src.read(r0, r1)
            score = np.where(valid, arr[0], np.nan)
            sgrid = grid.window_grid(r0, 0, r1 - r0, width)
            mask = (rasterize([(g, 1) for g in polys], out_shape=sgrid.shape, transform=sgrid.transform, fill=0,
                              dtype="uint8") > 0 if polys else np.zeros(sgrid.shape, bool))
            a, b, p, n = sweep_counts(score, mask, SWEEP_THRESHOLDS)
            tp, fp, n_pos, n_neg = tp + a, fp + b, n_pos + p, n_neg + n
    return sweep_from_counts(SWEEP_THRESHOLDS, tp, fp, n_pos, n_neg)


def _parameters(folder: Path) -> dict[str, Any]:
    tags = io.raster_info(folder / "score.tif").tags
    try:
        return json.loads(tags.get("CHANGEDETECT_PARAMETERS", "{}"))
    except ValueError:
        return {}


# --------------------------------------------------------------------------- main entry
def publish_outputs(
    folder: Path,
    *,
    crs: str,
    summary: dict[str, Any],
    inputs: dict[str, Path],
    final_dir: Path | None = None,
    software: dict[str, str] | None = None,
    input_records: dict[str, dict[str, Any]] | None = None,
    output_names: list[str] | None = None,
    relative_inputs: bool = False,
) -> list[Path]:
    """Write the derived, human-facing outputs into ``folder``; return their paths.

    Parameters
    ----------
    folder : Path
        Folder holding the run's files (the staging folder during a run).
    crs : str
        The run's CRS (the before image's grid).
    summary : dict
        The run summary (as in summary.json).
    inputs : dict of Path
        The run's inputs by role (``before``, ``after``, ``aois``, ``sites``, ``truth``).
    final_dir : Path, optional
        The folder the files end up in, for paths in project.qgs; by default
        ``folder``, or its parent when ``folder`` is a run's staging folder.
    software : dict, optional
        Software versions to list (default: those of this process).
    input_records : dict, optional
        ``{"sha256", "bytes"}`` per input role, to avoid hashing them again.
    output_names : list of str, optional
        Names of every file of the finished folder, listed in the report
        (default: the files in ``folder``, the published ones and the manifest).
    relative_inputs : bool
        Store the before image's path in project.qgs relative to the output
        folder. The default (absolute) keeps project.qgs identical when
        ``verify --rerun`` re-runs into another folder.

    Returns
    -------
    list of Path
        The files written, in the order written.

    Raises
    ------
    DataError
        A run file or an input is missing or unreadable (the message names it).
    """
    from .provenance import software_versions

    folder = Path(folder)
    final = Path(final_dir) if final_dir is not None else _final_folder(folder)
    summary = _plain(summary)
    inputs = {k: Path(v) for k, v in inputs.items() if v is not None}
    written: list[Path] = []

    # vectors, in the run's CRS.
    layers: dict[str, Any] = {
        "damage": _read_layer(folder / "damage.geojson", "damage layer", crs),
        "aois": _read_layer(folder / "aois.geojson", "AOI layer", crs),
    }
    if "sites" in inputs and summary.get("sites") is not None:
        layers["sites"], layers["sites_uncertainty"] = _sites_layers(inputs["sites"], summary["sites"], crs)
        written.append(io.write_vector(folder / "sites.geojson", layers["sites"], overwrite=True, layer="sites"))
        written.append(io.write_vector(folder / "sites_uncertainty.geojson", layers["sites_uncertainty"], overwrite=True,
                                       layer="sites_uncertainty"))
    tie_path = folder / "tie_points.geojson"
    if tie_path.is_file():
        layers["tie_points"] = _read_layer(tie_path, "tie points layer", crs)
    buildings_path = folder / "buildings.geojson"
    if buildings_path.is_file():
        layers["buildings"] = _read_layer(buildings_path, "buildings layer", crs)
    ground_path = folder / "ground_changes.geojson"
    if ground_path.is_file():
        layers["ground_changes"] = _read_layer(ground_path, "ground changes layer", crs)

    # styles beside every layer (and inside the GeoPackage).
    if len(layers["aois"]) == 0:
        raise DataError(f"{folder / 'aois.geojson'}: AOI layer has no area")
    aoi_bounds = _bounds(layers["aois"])
    after = _Image(folder / "after_coregistered.tif", aoi_bounds, crs)
    before = _Image(inputs["before"], aoi_bounds, crs) if "before" in inputs and inputs["before"].is_file() else None
    threshold = (summary.get("threshold") or {}).get("value")
    styles: dict[str, st.LayerStyle] = {
        "after_coregistered": after.style(mask_band=True),
        "difference": st.difference_style(),
        "ssim": st.ssim_style(),
        "score": st.score_style(threshold),
        "damage": st.damage_style(),
        "aois": st.aois_style(),
    }
    if "sites" in layers:
        styles["sites"] = st.sites_style()
        styles["sites_uncertainty"] = st.sites_uncertainty_style()
    if "tie_points" in layers:
        styles["tie_points"] = st.tie_points_style()
    if "buildings" in layers:
        styles["buildings"] = st.buildings_style()
    if "ground_changes" in layers:
        styles["ground_changes"] = st.ground_changes_style()
    qml = {name: st.qml_text(style) for name, style in styles.items()}
    for name, text in qml.items():
        written.append(_write_text(folder / f"{name}.qml", text))
    written.append(write_geopackage(folder / "layers.gpkg", layers, styles={k: v for k, v in qml.items() if k in layers}))

    # the QGIS project.
    written.append(_write_text(folder / "project.qgs", _project(
        summary, crs, layers, styles, inputs, final, before, relative=relative_inputs)))

    # the threshold sweep, when there are reference labels.
    sweep = _sweep(folder, inputs["truth"], crs) if "truth" in inputs else None
    if sweep is not None:
        import base64

        from .report import sweep_figure, sweep_table

        written.append(_write_text(folder / "threshold_sweep.csv", sweep_table(sweep)))
        png = base64.b64decode(sweep_figure(sweep, (summary.get("threshold") or {}).get("value")))
        with io.atomic_output(folder / "threshold_sweep.png", overwrite=True) as tmp:
            tmp.write_bytes(png)
        written.append(folder / "threshold_sweep.png")

    # the report.
    records = input_records or {
        k: {"sha256": io.sha256_file(p), "bytes": p.stat().st_size} for k, p in inputs.items() if p.is_file()
    }
    names = set(output_names) if output_names is not None else {
        p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".aux.xml")
    } | {p.name for p in written} | {"report.html", MANIFEST_NAME}
    written.append(_write_text(folder / "report.html", _report(
        folder, summary, crs, layers, inputs, records, software or software_versions(), sorted(names),
        before, after, sweep)))
    return written


def _project(summary: dict[str, Any], crs: str, layers: dict[str, Any], styles: dict[str, st.LayerStyle],
             inputs: dict[str, Path], final: Path, before: _Image | None, *, relative: bool) -> str:
    def vec(name: str, title: str, geometry: str, *, visible: bool = True) -> ProjectLayer:
        return ProjectLayer(f"changedetect_{name}", title, f"./{name}.geojson", "ogr", "EPSG:4326", styles[name],
                            geometry=geometry, visible=visible)

    def ras(name: str, title: str, *, visible: bool = True) -> ProjectLayer:
        return ProjectLayer(f"changedetect_{name}", title, f"./{name}.tif", "gdal", crs, styles[name], visible=visible)

    assessment = []
    if "sites" in layers:
        assessment += [vec("sites", "reported sites", "Point"), vec("sites_uncertainty", "site uncertainty", "Polygon")]
    assessment += [vec("damage", "damage by severity", "Polygon")]
    if "buildings" in layers:
        assessment.append(vec("buildings", "buildings by damage grade", "Polygon"))
    if "ground_changes" in layers:
        assessment.append(vec("ground_changes", "changes off the building footprints", "Polygon"))
    assessment.append(vec("aois", "areas of interest", "Polygon"))
    if "tie_points" in layers:
        assessment.append(vec("tie_points", "co-registration tie points", "Point", visible=False))
    evidence = [
        ras("score", "change score"),
        ras("difference", "colour difference", visible=False),
        ras("ssim", "structural similarity (SSIM)", visible=False),
    ]
    imagery = [ras("after_coregistered", "after (co-registered)")]
    if "before" in inputs:
        style = before.style(mask_band=False) if before is not None else st.rgb_style([(0, 255)] * 3)
        imagery.append(ProjectLayer("changedetect_before", "before", _source_path(inputs["before"], final, relative=relative),
                                    "gdal", crs, style))
    groups = [
        ProjectGroup("Damage assessment", tuple(assessment)),
        ProjectGroup("Change evidence", tuple(evidence)),
        ProjectGroup("Imagery", tuple(imagery)),
    ]
    extent = _pad(_bounds(layers["aois"]), 0.05, 5.0)
    return project_xml(title=str(summary.get("name", "changedetect")), crs=crs, extent=extent, groups=groups)


def _report(folder: Path, summary: dict[str, Any], crs: str, layers: dict[str, Any], inputs: dict[str, Path],
            records: dict[str, dict[str, Any]], software: dict[str, str], names: list[str],
            before: _Image | None, after: _Image, sweep: dict[str, Any] | None = None) -> str:
    from .report import Overview, ReportData, render_report

    coreg = _read_json(folder / "coregistration.json", "co-registration report")
    res = min(io.raster_info(folder / "score.tif").grid.res)
    chips, notes = _chips(folder, layers, summary, crs, res, before, after)
    if before is None and "before" in inputs:
        notes.append(f"The before image ({inputs['before'].name}) was not found: its panels are left empty.")
    bounds = [_bounds(layers["aois"])]
    if "sites_uncertainty" in layers and len(layers["sites_uncertainty"]):
        bounds.append(_bounds(layers["sites_uncertainty"]))
    b = np.array(bounds)
    ov_bounds = _pad((float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())), 0.05, 10.0)
    grid = _grid_for(ov_bounds, crs, res, MAX_OVERVIEW_PX)
    left, top = grid.transform.c, grid.transform.f
    ov_bounds = (left, top - grid.height * grid.res[1], left + grid.width * grid.res[0], top)
    rgba = after.display(grid)
    grey = np.where(rgba[..., 3] > 0, rgba[..., :3].mean(axis=-1), 1.0)
    ties = layers.get("tie_points")
    if ties is not None and not {"dy_px", "dx_px"} <= set(ties.columns):
        notes.append("tie_points.geojson has no dy_px and dx_px columns: its shifts are not shown.")
        ties = None
    data = ReportData(
        name=str(summary.get("name", "changedetect")),
        crs=crs,
        summary=summary,
        coregistration=coreg,
        parameters=_parameters(folder),
        software=dict(software),
        inputs=[{"role": k, "file": inputs[k].name, **records[k]} for k in INPUT_ROLES if k in inputs and k in records],
        outputs=names,
        damage=layers["damage"],
        aois=layers["aois"],
        sites=layers.get("sites"),
        tie_points=ties,
        chips=chips,
        overview=Overview(bounds=ov_bounds, image=grey),
        sweep=sweep,
        notes=notes,
    )
    return render_report(data)


# --------------------------------------------------------------------------- regeneration
def regenerate(outdir: Path) -> dict[str, Any]:
    """Rewrite the published files of an output folder (``changedetect report``).

    Reads summary.json, coregistration.json and manifest.json, finds the run's
    inputs where the manifest recorded them (they must be unchanged: their
    SHA-256 is checked), and calls :func:`publish_outputs` on the folder.

    Returns
    -------
    dict
        ``written`` (file names), ``identical`` (same bytes as recorded in the
        manifest) and ``differs`` (changed or not in the manifest: ``verify``
        will report them).

    Raises
    ------
    DataError
        Not an output folder, or an input is missing or changed since the run.
    """
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise DataError(f"{outdir}: output folder not found")
    mpath = outdir / MANIFEST_NAME
    manifest = _read_json(mpath, "manifest (not a changedetect output folder, or an incomplete run)")
    summary = _read_json(outdir / "summary.json", "run summary")
    coreg = _read_json(outdir / "coregistration.json", "co-registration report")
    try:
        crs = coreg["reference_grid"]["crs"]
        recorded_inputs = manifest.get("inputs", {})
        records = {r["path"]: r for r in manifest["outputs"]}
    except (KeyError, TypeError) as exc:
        raise DataError(f"{mpath}: manifest is not valid ({exc})") from exc
    config_inputs = (manifest.get("config") or {}).get("inputs") or {}
    inputs: dict[str, Path] = {}
    input_records: dict[str, dict[str, Any]] = {}
    for key in INPUT_ROLES:
        rec = recorded_inputs.get(key)
        if rec is None:
            continue
        path = Path(config_inputs.get(key) or rec.get("path", ""))
        if not path.is_file():
            raise DataError(f"{path}: {key} input recorded in {mpath} not found (the report needs the run's inputs)")
        digest = io.sha256_file(path)
        if digest != rec.get("sha256"):
            raise DataError(f"{path}: {key} input changed since the run (SHA-256 differs from {mpath})")
        inputs[key] = path
        input_records[key] = {"sha256": digest, "bytes": path.stat().st_size}
    written = publish_outputs(
        outdir, crs=crs, summary=summary, inputs=inputs, final_dir=outdir,
        software=manifest.get("software"), input_records=input_records,
        output_names=sorted(set(records) | {MANIFEST_NAME}),
    )
    identical: list[str] = []
    differs: list[str] = []
    for p in written:
        rec = records.get(p.name)
        same = rec is not None and rec.get("bytes") == p.stat().st_size and rec.get("sha256") == io.sha256_file(p)
        (identical if same else differs).append(p.name)
    return {"written": [p.name for p in written], "identical": identical, "differs": differs}
