"""Thin I/O layer: the only module that opens raster and vector files.

Everything here turns a file problem into a :class:`~changedetect.errors.DataError`
whose message names the file, and writes every output under a temporary name in
its final folder, renaming it only when it is complete.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.warp import reproject

from .errors import DataError, OutputExistsError
from .grid import Grid

log = logging.getLogger(__name__)

#: Refuse rasters above this many pixels per band before reading anything
#: (a decompression-bomb guard); override with ``max_pixels``.
DEFAULT_MAX_PIXELS = 1_000_000_000

COG_OPTIONS: dict[str, Any] = {
    "compress": "DEFLATE",
    # level 1: about half the time of the default level 6 for 3 % larger files
    # (float32 score of a 8192² scene: 3.0 s vs 5.5 s, 179 vs 174 MB)
    "level": 1,
    # compress tiles on every core (the file is the same as with one thread)
    "num_threads": "ALL_CPUS",
    "blocksize": 256,
    "overview_resampling": "average",
    "bigtiff": "IF_SAFER",
}


# --------------------------------------------------------------------------- rasters
@dataclass(frozen=True)
class RasterInfo:
    """What a raster file declares, read without loading its pixels."""

    path: Path
    grid: Grid
    count: int
    dtype: str
    nodata: float | None
    tags: dict[str, str] = field(default_factory=dict)
    descriptions: tuple[str | None, ...] = ()
    colorinterp: tuple[str, ...] = ()

    @property
    def acquisition_date(self) -> str | None:
        """An acquisition date from the file's tags, when it declares one."""
        for key in ("ACQUISITION_DATE", "acquisition_date", "TIFFTAG_DATETIME", "DATE"):
            if self.tags.get(key):
                return self.tags[key]
        return None


def _check_file(path: Path, what: str = "file") -> None:
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a {what}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: {what} is empty")


@contextlib.contextmanager
def open_raster(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open a georeferenced raster for reading, with clear errors.

    Raises
    ------
    DataError
        Missing, empty, unreadable, not georeferenced, or above ``max_pixels``.
    """
    path = Path(path)
    _check_file(path, "raster")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioIOError as exc:
        raise DataError(f"{path}: not a readable raster ({_gdal_detail(exc, path)})") from exc
    with src:
        if src.crs is None or src.transform.is_identity:
            raise DataError(f"{path}: raster has no georeferencing (CRS and transform needed)")
        if src.width * src.height > max_pixels:
            raise DataError(
                f"{path}: raster is {src.width} x {src.height} px, above the limit of "
                f"{max_pixels} px per band (raise limits.max_pixels to allow it)"
            )
        if not src.transform.is_rectilinear:
            raise DataError(f"{path}: rotated rasters are not supported")
        yield src


def raster_info(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> RasterInfo:
    """Read a raster's grid, band count, dtype, nodata and tags (no pixels)."""
    with open_raster(path, max_pixels=max_pixels) as src:
        return RasterInfo(
            path=Path(path),
            grid=Grid(src.crs.to_string(), src.transform, src.width, src.height),
            count=src.count,
            dtype=src.dtypes[0],
            nodata=src.nodata,
            tags=dict(src.tags()),
            descriptions=tuple(src.descriptions),
            colorinterp=tuple(ci.name for ci in src.colorinterp),
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _gdal_detail(exc: BaseException, path: Path) -> str:
    """GDAL's message about ``path`` without the path repeated or driver-prefix advice."""
    text = _first_line(exc).split("; It might help to specify the correct driver")[0]
    text = text.replace(f"'{path}' ", "").replace(str(path), path.name)
    return text.removeprefix(f"{path.name}: ")


def _root_cause(exc: BaseException) -> str:
    """The innermost message of an exception chain (GDAL's own words, e.g. a decoding error)."""
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return _first_line(exc)


def _unreadable(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path}: cannot read pixels, the file is truncated or corrupt ({_root_cause(exc)})")


def _read_window(src: Any, path: Path, indexes: list[int], win: Any) -> tuple[np.ndarray, np.ndarray]:
    """Bands of a window as float32 and its valid mask (every band's mask, finite); DataError on a read error.

    Inside :func:`gdal_env` the window is cut from decoded block rows kept by
    :class:`_BlockRows` (same values, each tile decoded once per sequential pass).
    """
    cache = _BLOCK_ROWS.get()
    if cache is not None:
        with cache.lock:
            rows = cache.rows_for(src, path, indexes)
            if rows is not None:
                return rows.read(win)
    try:
        data = src.read(indexes, window=win, out_dtype="float32")
        masks = src.read_masks(indexes, window=win)
    except RasterioError as exc:
        raise _unreadable(path, exc) from exc
    return data, np.all(masks > 0, axis=0) & np.all(np.isfinite(data), axis=0)


class _BlockRows:
    """Recently decoded full-width block rows of one band set of one file.

    GDAL decodes every tile a window touches on each read (its block cache does
    not spare it for multi-band pixel-interleaved GeoTIFFs), so strips read with
    halos decode most tiles two or three times: an 8192² 3-band file read in
    256-row strips with 32-row halos took 2.6 s against 0.7 s for reads aligned
    on its 512-row tiles. Here reads are aligned on ``unit`` rows (whole block
    rows, at least 256) and the last few units are kept, so a sequential pass
    decodes each tile once. Values are those of a direct read.
    """

    def __init__(self, src: Any, path: Path, indexes: list[int], keep: int) -> None:
        # ``src``: a dataset of its own (the callers' are opened and closed per call)
        self.src, self.path, self.indexes, self.keep = src, path, indexes, keep
        bh = max(1, src.block_shapes[indexes[0] - 1][0])
        self.unit = bh * max(1, math.ceil(256 / bh))
        flags = [src.mask_flag_enums[i - 1] for i in indexes]
        self.all_valid = all([f.name for f in fl] == ["all_valid"] for fl in flags)
        self.floating = np.issubdtype(np.dtype(src.dtypes[indexes[0] - 1]), np.floating)
        self.units: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def _unit(self, u: int) -> tuple[np.ndarray, np.ndarray | None]:
        got = self.units.pop(u, None)
        if got is None:
            from rasterio.windows import Window

            r0 = u * self.unit
            win = Window(0, r0, self.src.width, min(self.unit, self.src.height - r0))
            try:
                data = self.src.read(self.indexes, window=win)
                masks = None if self.all_valid else np.all(self.src.read_masks(self.indexes, window=win) > 0, axis=0)
            except RasterioError as exc:
                raise _unreadable(self.path, exc) from exc
            got = (data, masks)
            while len(self.units) >= self.keep:
                self.units.pop(next(iter(self.units)))
        self.units[u] = got  # most recently used last
        return got

    def read(self, win: Any) -> tuple[np.ndarray, np.ndarray]:
        r0, c0 = int(win.row_off), int(win.col_off)
        r1, c1 = r0 + int(win.height), c0 + int(win.width)
        data = np.empty((len(self.indexes), r1 - r0, c1 - c0), np.float32)
        valid = np.ones((r1 - r0, c1 - c0), bool)
        for u in range(r0 // self.unit, -(-r1 // self.unit) if r1 > r0 else 0):
            block, mask = self._unit(u)
            a, b = max(r0, u * self.unit), min(r1, (u + 1) * self.unit)
            part = slice(a - u * self.unit, b - u * self.unit)
            data[:, a - r0 : b - r0] = block[:, part, c0:c1]
            if mask is not None:
                valid[a - r0 : b - r0] = mask[part, c0:c1]
        if self.floating:
            valid &= np.all(np.isfinite(data), axis=0)
        return data, valid


class _BlockRowCache:
    """The :class:`_BlockRows` of the files read during a run, within a memory budget."""

    def __init__(self, budget: int = 128 << 20, files: int = 4) -> None:
        self.budget, self.files = budget, files
        self.entries: dict[tuple[Any, ...], _BlockRows | None] = {}
        self.lock = threading.RLock()

    def rows_for(self, src: Any, path: Path, indexes: list[int]) -> _BlockRows | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size, tuple(indexes))
        with self.lock:
            if key in self.entries:
                return self.entries[key]
            unit = _BlockRows(src, path, indexes, keep=1).unit
            unit_bytes = unit * src.width * len(indexes) * np.dtype(src.dtypes[indexes[0] - 1]).itemsize
            keep = min(4, int(self.budget // self.files // max(unit_bytes, 1)))
            rows = None
            if keep >= 2:  # else too wide for the budget: windows are read directly
                # (no warnings.catch_warnings here: it is not thread-safe, and the
                # caller has opened the file already, so it is georeferenced)
                rows = _BlockRows(rasterio.open(path), path, indexes, keep=keep)
            while len(self.entries) >= self.files:
                old = self.entries.pop(next(iter(self.entries)))
                if old is not None:
                    old.src.close()
            self.entries[key] = rows
            return rows

    def close(self) -> None:
        with self.lock:
            for rows in self.entries.values():
                if rows is not None:
                    rows.src.close()
            self.entries.clear()


#: The block-row cache of the current run (set by :func:`gdal_env`).
_BLOCK_ROWS: contextvars.ContextVar[_BlockRowCache | None] = contextvars.ContextVar("block_rows", default=None)


def _check_readable(src: Any, path: Path, indexes: list[int], *, chunk_pixels: int = 1 << 22) -> None:
    """Decode every pixel of ``indexes`` once, in row chunks, raising DataError on a read error.

    GDAL's multi-threaded warper only prints read errors (from its worker threads) and
    leaves the affected pixels empty, so a truncated or corrupt file would silently
    look like nodata; reading it here first turns that into a clear error.
    """
    from rasterio.windows import Window

    block_h = max(1, src.block_shapes[0][0])
    step = max(block_h, (max(1, chunk_pixels // max(1, src.width)) // block_h) * block_h)
    per_dataset_mask = any(
        "per_dataset" in {f.name for f in flags} for flags in src.mask_flag_enums
    )
    try:
        for row in range(0, src.height, step):
            win = Window(0, row, src.width, min(step, src.height - row))
            src.read(indexes, window=win)
            if per_dataset_mask:
                src.read_masks(indexes[0], window=win)
    except RasterioError as exc:
        raise _unreadable(path, exc) from exc


def _scale_for(dtype: str) -> float | None:
    """Fixed scale to [0, 1] for 8-bit data; None means scale by the data."""
    return 255.0 if np.dtype(dtype) == np.uint8 else None


def _robust_scale(array: np.ndarray, valid: np.ndarray) -> float:
    values = array[:, valid]
    if values.size == 0:
        return 1.0
    hi = float(np.percentile(values, 99.9))
    return hi if hi > 0 else 1.0


def read_grid(
    path: str | os.PathLike,
    *,
    bands: list[int] | None = None,
    window: tuple[int, int, int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Read bands of a raster on its own grid as float32 scaled to about [0, 1].

    Parameters
    ----------
    path : path-like
        The raster.
    bands : list of int, optional
        1-based band indexes; all bands by default.
    window : (row_off, col_off, height, width), optional
        Read only this window.
    scale : float, optional
        Divide by this; by default 255 for 8-bit data and the 99.9th percentile of
        the valid pixels otherwise.

    Returns
    -------
    array : (bands, rows, cols) float32 ndarray
        Scaled pixel values, 0 where invalid.
    valid : (rows, cols) bool ndarray
        True where every band holds data (mask, nodata and NaN respected).
    scale : float
        The divisor used.
    """
    path = Path(path)
    with open_raster(path, max_pixels=max_pixels) as src:
        indexes = _check_bands(path, src.count, bands)
        win = None
        if window is not None:
            from rasterio.windows import Window

            win = Window(window[1], window[0], window[3], window[2])
        try:
            data = src.read(indexes, window=win, out_dtype="float32")
            masks = src.read_masks(indexes, window=win)
        except RasterioError as exc:
            raise _unreadable(path, exc) from exc
        valid = np.all(masks > 0, axis=0) & np.all(np.isfinite(data), axis=0)
        if scale is None:
            scale = _scale_for(src.dtypes[0]) or _robust_scale(data, valid)
    data /= np.float32(scale)
    data[:, ~valid] = 0.0
    return data, valid, float(scale)


def _check_bands(path: Path, count: int, bands: list[int] | None) -> list[int]:
    if bands is None:
        return list(range(1, count + 1))
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise DataError(f"{path}: has {count} band(s), band(s) {bad} requested")
    return list(bands)


_RESAMPLING = {
    "nearest": Resampling.nearest,
    "bilinear": Resampling.bilinear,
    "cubic": Resampling.cubic,
    "cubic_spline": Resampling.cubic_spline,
    "lanczos": Resampling.lanczos,
    "average": Resampling.average,
}


def warp_to_grid(
    path: str | os.PathLike,
    grid: Grid,
    *,
    bands: list[int] | None = None,
    resampling: str = "cubic",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_threads: int = 2,
    check: bool = True,
) -> tuple[np.ndarray, np.ndarray, str, float | None]:
    """Resample bands of a raster onto ``grid`` in one warp from the file's pixels.

    A shift found by co-registration is applied by passing ``grid.shifted(dy, dx)``:
    output pixel ``(r, c)`` then holds the source content at ``(r + dy, c + dx)`` of
    the reference grid, so the content is corrected in the same single resampling.

    Returns
    -------
    array : (bands, rows, cols) float32 ndarray
        Values in the source's units (not scaled), NaN where there is no data.
    valid : (rows, cols) bool ndarray
    dtype : str
        The source data type.
    nodata : float or None
        The source nodata value.
    """
    path = Path(path)
    with open_raster(path, max_pixels=max_pixels) as src:
        indexes = _check_bands(path, src.count, bands)
        if check:
            _check_readable(src, path, indexes)
        if _translation_only(src, grid) and resampling in _TAPS:
            out, valid = _warp_translate(src, path, indexes, grid, resampling)
            return out, valid, src.dtypes[0], src.nodata
        out = np.full((len(indexes), grid.height, grid.width), np.nan, dtype=np.float32)
        try:
            for i, bidx in enumerate(indexes):
                reproject(
                    rasterio.band(src, bidx),
                    out[i],
                    dst_transform=grid.transform,
                    dst_crs=grid.crs,
                    dst_nodata=np.nan,
                    resampling=_RESAMPLING[resampling],
                    num_threads=num_threads,
                    init_dest_nodata=True,
                )
        except RasterioError as exc:
            raise DataError(f"{path}: cannot warp onto the reference grid ({_root_cause(exc)})") from exc
        valid = np.all(np.isfinite(out), axis=0)
        return out, valid, src.dtypes[0], src.nodata


def _keys(t: float, a: float = -0.5) -> np.ndarray:
    """Weights of the 4 taps (-1, 0, 1, 2) of Keys' cubic convolution at fraction ``t`` (GDAL's cubic)."""
    d = np.abs(np.array([1 + t, t, 1 - t, 2 - t]))
    w = np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                 np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))
    return w / w.sum()


#: 4-tap weights (taps -1, 0, 1, 2) of each resampling that :func:`_warp_translate` serves.
_TAPS = {
    "cubic": _keys,
    "bilinear": lambda t: np.array([0.0, 1 - t, t, 0.0]),
    "nearest": lambda t: np.array([0.0, 1.0, 0.0, 0.0]) if t < 0.5 else np.array([0.0, 0.0, 1.0, 0.0]),
}


def _translation_only(src: Any, grid: Grid) -> bool:
    """True when the output grid is the source grid shifted (same CRS, pixel size and axes)."""
    try:
        same = src.crs is not None and src.crs == rasterio.crs.CRS.from_user_input(grid.crs)
    except Exception:  # noqa: BLE001 - an unparsable CRS goes the GDAL way
        return False
    a = ~src.transform * grid.transform
    return same and abs(a.a - 1) < 1e-9 and abs(a.e - 1) < 1e-9 and abs(a.b) < 1e-12 and abs(a.d) < 1e-12


def _warp_translate(src: Any, path: Path, indexes: list[int], grid: Grid, resampling: str,
                    rows_per_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Resample onto a shifted copy of the source grid: one separable 4-tap filter per band.

    The same kernels as GDAL (cubic: Keys, a = -0.5; bilinear; nearest), applied
    by OpenCV's separable filter on the source window of each row block: many
    times faster than GDAL's general warper, and as accurate. An output pixel is
    valid when every source pixel under its taps is.
    """
    import cv2
    from rasterio.windows import Window

    a = ~src.transform * grid.transform
    # source pixel-centre coordinate of output pixel centre (r, c): (r + dy, c + dx)
    dx, dy = a.c, a.f
    ix, iy = int(np.floor(dx)), int(np.floor(dy))
    kx = _TAPS[resampling](dx - ix).astype(np.float32)
    ky = _TAPS[resampling](dy - iy).astype(np.float32)
    rows, cols = grid.height, grid.width
    out = np.full((len(indexes), rows, cols), np.nan, np.float32)
    valid = np.zeros((rows, cols), bool)
    x0 = ix - 1
    for r0 in range(0, rows, rows_per_block):
        r1 = min(rows, r0 + rows_per_block)
        y0 = r0 + iy - 1
        h, w = r1 - r0 + 3, cols + 3
        # the part of the window inside the source
        sy0, sy1 = max(y0, 0), min(y0 + h, src.height)
        sx0, sx1 = max(x0, 0), min(x0 + w, src.width)
        if sy0 >= sy1 or sx0 >= sx1:
            continue
        data, ok = _read_window(src, path, indexes, Window(sx0, sy0, sx1 - sx0, sy1 - sy0))
        pad = ((sy0 - y0, y0 + h - sy1), (sx0 - x0, x0 + w - sx1))
        okp = np.pad(ok, pad, mode="constant", constant_values=False)
        need = np.ones((4, 4), np.uint8)
        need[:, kx == 0] = 0
        need[ky == 0, :] = 0
        good = cv2.erode(okp.view(np.uint8), need, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT,
                         borderValue=0)[: r1 - r0, :cols].view(bool)
        for i, band in enumerate(data):
            if not ok.all():
                band = np.where(ok, band, np.float32(band[ok].mean()) if ok.any() else np.float32(0))
            bp = np.pad(band, pad, mode="edge")
            res = cv2.sepFilter2D(bp, -1, kx, ky, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
            out[i, r0:r1] = np.where(good, res[: r1 - r0, :cols], np.float32(np.nan))
        valid[r0:r1] = good
    return out, valid


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    ``path`` is left as it was.

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists (use --overwrite to replace it)")
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, Path(str(tmp) + ".aux.xml")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def write_cog(
    path: str | os.PathLike,
    array: np.ndarray,
    grid: Grid,
    *,
    nodata: float | None = None,
    valid: np.ndarray | None = None,
    tags: dict[str, Any] | None = None,
    descriptions: list[str] | None = None,
    overwrite: bool = False,
    predictor: int | None = None,
    colorinterp: list[str] | None = None,
) -> Path:
    """Write a Cloud-Optimized GeoTIFF atomically.

    Parameters
    ----------
    array : (bands, rows, cols) or (rows, cols) ndarray
    grid : Grid
        Must match the array's shape.
    nodata : float, optional
        Nodata value (``nan`` is allowed for float data).
    valid : (rows, cols) bool ndarray, optional
        Written as an internal per-dataset mask instead of a nodata value (used for
        integer data where every value may be real data).
    colorinterp : list of str, optional
        Colour interpretation per band (``["red", "green", "blue"]``), so viewers
        show an RGB image as such.
    """
    path = Path(path)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.shape[1:] != grid.shape:
        raise ValueError(f"array shape {array.shape[1:]} does not match grid {grid.shape}")
    if predictor is None:
        predictor = 3 if np.issubdtype(array.dtype, np.floating) else 2
    profile = {
        "driver": "COG",
        "width": grid.width,
        "height": grid.height,
        "count": array.shape[0],
        "dtype": array.dtype.name,
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": nodata,
        "predictor": predictor,
        **COG_OPTIONS,
    }
    with atomic_output(path, overwrite=overwrite) as tmp:
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array)
            if valid is not None:
                dst.write_mask(np.where(valid, 255, 0).astype(np.uint8))
            if tags:
                dst.update_tags(**{k: _tag_text(v) for k, v in tags.items()})
            for i, desc in enumerate(descriptions or [], start=1):
                dst.set_band_description(i, desc)
            if colorinterp:
                from rasterio.enums import ColorInterp

                dst.colorinterp = [ColorInterp[c] for c in colorinterp]
    return path


def _tag_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """Write JSON atomically (sorted keys, 2-space indent, trailing newline)."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n"
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    return str(obj)


def write_vector(
    path: str | os.PathLike,
    gdf: Any,
    *,
    overwrite: bool = False,
    layer: str | None = None,
) -> Path:
    """Write a GeoDataFrame atomically as GeoJSON (RFC 7946, EPSG:4326) or GeoPackage."""
    import pyogrio

    path = Path(path)
    suffix = path.suffix.lower()
    with atomic_output(path, overwrite=overwrite) as tmp:
        if suffix in (".geojson", ".json"):
            out = gdf.to_crs("EPSG:4326") if gdf.crs is not None else gdf
            pyogrio.write_dataframe(
                out, tmp, driver="GeoJSON", layer=layer or path.stem,
                layer_options={"RFC7946": "YES", "COORDINATE_PRECISION": "8", "WRITE_NAME": "NO"},
            )
        elif suffix == ".gpkg":
            pyogrio.write_dataframe(gdf, tmp, driver="GPKG", layer=layer or path.stem)
        else:
            raise ValueError(f"unsupported vector format: {path.suffix}")
    return path


def read_vector(path: str | os.PathLike, *, what: str = "vector file") -> Any:
    """Read a GeoJSON / GeoPackage / any OGR vector into a GeoDataFrame.

    Invalid (e.g. self-intersecting) polygons are repaired with a warning.
    """
    import geopandas as gpd
    import pyogrio.errors

    path = Path(path)
    _check_file(path, what)
    try:
        gdf = gpd.read_file(path, engine="pyogrio")
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, ValueError) as exc:
        raise DataError(f"{path}: {what} could not be read ({_gdal_detail(exc, path)})") from exc
    if gdf.crs is None:
        if path.suffix.lower() in (".geojson", ".json"):
            gdf = gdf.set_crs("EPSG:4326")
        else:
            raise DataError(f"{path}: {what} has no CRS")
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    if len(gdf) == 0:
        raise DataError(f"{path}: {what} has no geometries")
    invalid = ~gdf.geometry.is_valid
    if invalid.any():
        from .errors import ChangeDetectWarning

        warnings.warn(
            f"{path}: {int(invalid.sum())} invalid geometry(ies) repaired (make_valid)",
            ChangeDetectWarning,
            stacklevel=2,
        )
        gdf = gdf.copy()
        gdf.loc[invalid, "geometry"] = gdf.geometry[invalid].make_valid()
    return gdf


# --------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike, *, relative_to: Path | None = None) -> dict[str, Any]:
    """``{"path", "sha256", "bytes"}`` for the manifest."""
    path = Path(path)
    shown = path
    if relative_to is not None:
        with contextlib.suppress(ValueError):
            shown = path.resolve().relative_to(relative_to.resolve())
    return {"path": shown.as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


# --------------------------------------------------------------------------- output folder
@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them as usual.

    Only in the main thread (the only one where Python handles signals); elsewhere
    the block runs unprotected.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:
            previous[sig] = signal.signal(sig, lambda n, _frame: received.append(n))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


class OutputFolder:
    """Stage every output of a run in a hidden folder; move them into place at the end.

    Use as a context manager. Files are written under ``staging`` and moved into the
    output folder by :meth:`commit` (the manifest last). If the block raises (an
    error, Ctrl-C, SIGTERM turned into an exception), the staging folder is removed
    and the output folder is left exactly as it was (and removed again, with any
    parent folders, if the run created them), so an interrupted run leaves no
    partial file.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"{self.path}: output exists and is not a folder")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"{self.path}: output folder exists and is not empty (use --overwrite to replace its outputs)"
            )
        self.created = not self.path.exists()
        # Every folder this run creates (the output folder and missing parents),
        # deepest first, so that abort() can remove exactly those.
        self._made: list[Path] = []
        parent = self.path
        while not parent.exists() and parent != parent.parent:
            self._made.append(parent)
            parent = parent.parent
        self.staging = self.path / f".changedetect-partial-{os.getpid()}"
        self._committed = False
        self._staging_made = False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir()
            self._staging_made = True
        except FileExistsError as exc:
            # Left by a run that was killed outright (SIGKILL, power cut) and whose
            # process id is ours now: never adopt its files, never delete them.
            self.abort()
            raise DataError(
                f"{self.staging}: staging folder of an earlier, killed run exists; check it and remove it"
            ) from exc
        except OSError as exc:
            self.abort()
            raise DataError(f"{self.path}: cannot write to output folder ({exc.strerror or exc})") from exc
        except BaseException:  # Ctrl-C / SIGTERM before the with-block is set up
            self.abort()
            raise

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._committed:
            self.abort()

    def file(self, name: str) -> Path:
        """Where to write output ``name`` while the run is in progress."""
        return self.staging / name

    def staged(self) -> list[Path]:
        """Staged files, sorted by name."""
        return sorted(p for p in self.staging.iterdir() if p.is_file())

    def commit(self, last: str | None = None) -> list[Path]:
        """Move every staged file into the output folder, ``last`` at the very end.

        Ctrl-C or SIGTERM during the move is delivered once every file is in place,
        so an interruption never leaves old and new outputs mixed.
        """
        files = self.staged()
        files.sort(key=lambda p: p.name == last)
        moved = []
        with _signals_deferred():
            if last is not None and any(p.name == last for p in files):
                # An old manifest must not outlive a half-replaced folder: drop it first,
                # so a failed commit reads as an incomplete run, never as a valid one.
                with contextlib.suppress(FileNotFoundError):
                    (self.path / last).unlink()
            for src in files:
                dst = self.path / src.name
                os.replace(src, dst)
                moved.append(dst)
            self.staging.rmdir()
            self._committed = True
        return moved

    def abort(self) -> None:
        """Remove the staging folder (and the folders this run created, if empty)."""
        import shutil

        if self._committed:
            return
        if self._staging_made:
            shutil.rmtree(self.staging, ignore_errors=True)
        for folder in self._made:
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break


# --------------------------------------------------------------------------- model warps
def warp_with_model(
    path: str | os.PathLike,
    grid: Grid,
    model: Any,
    *,
    bands: list[int] | None = None,
    resampling: str = "cubic",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_threads: int = 2,
    node_spacing: int = 16,
    check: bool = True,
) -> tuple[np.ndarray, np.ndarray, str, float | None]:
    """Resample bands of a raster onto ``grid`` through a co-registration model, once.

    ``model`` maps reference pixel coordinates to where their content lies
    (:class:`changedetect.coregister.GeometricModel`): output pixel ``(r, c)``
    holds the source content at reference-grid coordinates
    ``model.source_coordinates(r, c)``. The source file's own pixels are
    sampled once, whatever its CRS and pixel size.

    A linear model (identity, translation, affine) is folded into the
    destination transform of a single GDAL warp, as :func:`warp_to_grid` does
    for a shift. A displacement field is applied by computing the source pixel
    of every output pixel (exactly on a node grid every ``node_spacing``
    pixels, through the model and the CRS transformation, bilinearly in
    between, as GDAL's approximate transformer does) and sampling the original
    pixels there, as :func:`scipy.ndimage.map_coordinates` does with mirror
    boundaries (cubic B-spline for ``cubic``/``cubic_spline``/``lanczos``,
    linear for ``bilinear``, nearest) but in float32 and several times faster
    (:class:`_TapSampler`); a source finer than the grid is low-passed first
    (Gaussian of ``(s - 1) / 2`` source pixels for a scale ratio ``s`` above
    1.2) against aliasing. Bands and row blocks are processed in
    ``num_threads`` threads.

    ``check=False`` skips decoding the whole source once first to catch read
    errors (:func:`check_readable`), for callers that warp a file in many
    windows and checked it once.

    Returns
    -------
    As :func:`warp_to_grid`.
    """
    from affine import Affine

    if getattr(model, "is_linear", True):
        m = np.asarray(model.matrix, np.float64)
        # Pixel-corner coordinates (u = col + 0.5, v = row + 0.5) of the
        # destination mapped onto the reference grid's.
        # r' = m00 r + m01 c + m02, c' = m10 r + m11 c + m12, with r = v - 0.5.
        a, b = m[1, 1], m[1, 0]
        d, e = m[0, 1], m[0, 0]
        c0 = m[1, 2] + 0.5 - 0.5 * (a + b)
        f0 = m[0, 2] + 0.5 - 0.5 * (d + e)
        pixel = Affine(a, b, c0, d, e, f0)
        dst = Grid(grid.crs, grid.transform * pixel, grid.width, grid.height)
        return warp_to_grid(
            path, dst, bands=bands, resampling=resampling, max_pixels=max_pixels,
            num_threads=num_threads, check=check,
        )
    return _warp_field(path, grid, model, bands, resampling, max_pixels, node_spacing, num_threads, check)


def _warp_field(
    path: str | os.PathLike, grid: Grid, model: Any, bands: list[int] | None,
    resampling: str, max_pixels: int, node_spacing: int, num_threads: int = 2, check: bool = True,
) -> tuple[np.ndarray, np.ndarray, str, float | None]:
    from rasterio.warp import transform as transform_points
    from rasterio.windows import Window
    from scipy import ndimage as ndi

    path = Path(path)
    rows, cols = grid.height, grid.width
    nr = np.unique(np.r_[np.arange(0, rows, node_spacing), rows - 1]).astype(np.float64)
    nc = np.unique(np.r_[np.arange(0, cols, node_spacing), cols - 1]).astype(np.float64)
    rr, cc = np.meshgrid(nr, nc, indexing="ij")
    sr, sc = model.source_coordinates(rr, cc)
    xs, ys = grid.transform * (sc + 0.5, sr + 0.5)
    with open_raster(path, max_pixels=max_pixels) as src:
        indexes = _check_bands(path, src.count, bands)
        if check:
            _check_readable(src, path, indexes)
        if src.crs != rasterio.crs.CRS.from_user_input(grid.crs):
            xs, ys = transform_points(grid.crs, src.crs, xs.ravel(), ys.ravel())
            xs = np.asarray(xs).reshape(rr.shape)
            ys = np.asarray(ys).reshape(rr.shape)
        inv = ~src.transform
        u, v = inv * (xs, ys)
        node_c, node_r = np.asarray(u) - 0.5, np.asarray(v) - 0.5
        # Scale ratio (source pixels per output pixel) from the node grid.
        step = max(float(nr[1] - nr[0]) if nr.size > 1 else 1.0, 1.0)
        span = np.hypot(np.diff(node_r, axis=0), np.diff(node_c, axis=0)) / step if nr.size > 1 else np.ones(1)
        ratio = float(np.median(span)) if span.size else 1.0
        # The cubic B-spline prefilter reaches _BSPLINE_REACH source pixels and
        # the cubic 2 more (the anti-alias Gaussian 2 (ratio - 1)): with this
        # margin (and a few pixels to spare) the coefficients inside the window
        # are those of the whole image, so a warp done in strips equals one
        # done at once.
        margin = 20 + int(math.ceil(2 * max(ratio, 1.0)))
        r0 = max(int(math.floor(np.nanmin(node_r))) - margin, 0)
        c0 = max(int(math.floor(np.nanmin(node_c))) - margin, 0)
        r1 = min(int(math.ceil(np.nanmax(node_r))) + margin + 1, src.height)
        c1 = min(int(math.ceil(np.nanmax(node_c))) + margin + 1, src.width)
        out = np.full((len(indexes), rows, cols), np.nan, dtype=np.float32)
        if r0 >= r1 or c0 >= c1:
            return out, np.zeros((rows, cols), bool), src.dtypes[0], src.nodata
        data, valid_src = _read_window(src, path, indexes, Window(c0, r0, c1 - c0, r1 - r0))
        dtype, nodata = src.dtypes[0], src.nodata
    order = {"nearest": 0, "bilinear": 1}.get(resampling, 3)
    # Below a tenth of a pixel the low-pass changes nothing worth its cost.
    sigma = (ratio - 1.0) / 2.0 if order > 0 and ratio > 1.2 else 0.0

    # No-data pixels take the value of the nearest valid pixel: the spline
    # coefficients of valid pixels near them then depend only on pixels nearby,
    # not on the window (a window mean would make strips differ from one pass).
    nearest = None
    if not valid_src.all() and valid_src.any():
        nearest = ndi.distance_transform_edt(~valid_src, return_distances=False, return_indices=True)

    def prefilter(band: np.ndarray) -> tuple[np.ndarray, int]:
        b = band
        if nearest is not None:
            b = band[nearest[0], nearest[1]]
        elif not valid_src.all():
            b = np.zeros_like(band)
        if sigma > 0:
            b = ndi.gaussian_filter(b, sigma)
        return _padded_coefficients(b, 2, order)

    from concurrent.futures import ThreadPoolExecutor

    # Padded by 2: every tap of a point inside the window, to half a pixel beyond its edge.
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        coefs, pads = zip(*pool.map(prefilter, data), strict=True)
    del data
    sampler = _TapSampler(list(coefs), pads[0], order, None if valid_src.all() else valid_src)
    h, w = r1 - r0, c1 - c0
    # Full-resolution source coordinates (in the window), bilinear between the
    # nodes, separable: rows (on the node columns), then columns.
    fr = np.interp(np.arange(rows), nr, np.arange(nr.size))
    fc = np.interp(np.arange(cols), nc, np.arange(nc.size))
    i0 = np.minimum(np.floor(fr).astype(int), max(nr.size - 2, 0))
    wr = (fr - i0)[:, None]
    j0 = np.minimum(np.floor(fc).astype(int), max(nc.size - 2, 0))
    wc = fc - j0
    i1 = np.minimum(i0 + 1, nr.size - 1)
    node_r, node_c = node_r - r0, node_c - c0
    valid = np.empty((rows, cols), bool)
    chunk = max(1, _SAMPLER_CHUNK // max(cols, 1))
    work = threading.local()

    def full(node: np.ndarray, a: int, b: int, ws: _Workspace, name: str) -> np.ndarray:
        part = node[i0[a:b]] * (1.0 - wr[a:b]) + node[i1[a:b]] * wr[a:b]
        step = np.diff(part, axis=1, append=part[:, -1:])
        res = ws.get(name, np.float64, (b - a) * cols).reshape(b - a, cols)
        tmp = ws.get("full", np.float64, (b - a) * cols).reshape(b - a, cols)
        np.take(step, j0, axis=1, out=res)
        res *= wc
        res += np.take(part, j0, axis=1, out=tmp)
        return res.reshape(-1)

    def block(a: int) -> None:
        b = min(rows, a + chunk)
        if not hasattr(work, "ws"):
            work.ws = _Workspace()
        ws = work.ws
        pr, pc = full(node_r, a, b, ws, "pr"), full(node_c, a, b, ws, "pc")
        ok = valid[a:b].reshape(-1)
        inside = ws.get("inside", np.bool_, ok.size)
        np.greater_equal(pr, -0.5, out=ok)
        ok &= np.less_equal(pr, h - 0.5, out=inside)
        ok &= np.greater_equal(pc, -0.5, out=inside)
        ok &= np.less_equal(pc, w - 0.5, out=inside)
        sampler.sample(pr, pc, ok, [out[i, a:b].reshape(-1) for i in range(len(coefs))], ws)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        list(pool.map(block, range(0, rows, chunk)))
    return out, valid, dtype, nodata


#: Cubic B-spline prefilter (interpolating coefficients, as scipy's
#: ``spline_filter`` with mirror boundaries) as a separable FIR: the exact
#: inverse filter has the taps sqrt(3) z^|k|, z = sqrt(3) - 2; cut at |k| <= 12
#: (|z|^13 < 4e-8) the coefficients differ from scipy's recursive filter by
#: < 2e-4 on 0-255 data (float32 rounding dominates), and OpenCV applies it
#: four times faster (4096 x 4096 float32, one core: 0.12 s against 0.50 s).
_BSPLINE_REACH = 12
_BSPLINE_FIR = (math.sqrt(3.0) * (math.sqrt(3.0) - 2.0) ** np.abs(np.arange(-_BSPLINE_REACH, _BSPLINE_REACH + 1))
                ).astype(np.float32)
#: Output points per block of the sampler (a thread's unit of work): fewer
#: make numpy's per-call overhead count, more leave the caches.
_SAMPLER_CHUNK = 1 << 16


def _padded_coefficients(band: np.ndarray, pad: int, order: int) -> tuple[np.ndarray, int]:
    """Coefficients of ``band`` for interpolation of ``order``, mirrored at least ``pad`` pixels beyond each edge.

    Order 3: the cubic B-spline coefficients of :func:`scipy.ndimage.spline_filter`
    (mode "mirror"), to ~1e-6 relative in float32; below: the pixels. Returns
    the float32 array and the padding it has on each side: for order 3 the
    FIR runs on pixels mirrored ``pad + _BSPLINE_REACH`` pixels out, which
    makes the coefficients of the inner ``pad`` those of the mirrored image,
    and the outer ones are left in place rather than copied away.
    """
    import cv2

    b = np.ascontiguousarray(band, dtype=np.float32)
    if order < 2:
        return cv2.copyMakeBorder(b, pad, pad, pad, pad, cv2.BORDER_REFLECT_101), pad
    p = pad + _BSPLINE_REACH
    mirrored = cv2.copyMakeBorder(b, p, p, p, p, cv2.BORDER_REFLECT_101)
    return cv2.sepFilter2D(mirrored, cv2.CV_32F, _BSPLINE_FIR, _BSPLINE_FIR, borderType=cv2.BORDER_REFLECT_101), p


def _cubic_bspline_weights(t: np.ndarray, ws: _Workspace, name: str) -> tuple[np.ndarray, ...]:
    """Weights of taps -1, 0, 1, 2 of the cubic B-spline at fractions ``t`` in [0, 1] (float32, in ``ws``)."""
    n = t.size
    s, t2, s2 = (ws.get(name + part, np.float32, n) for part in ("s", "t2", "s2"))
    w = [ws.get(f"{name}w{i}", np.float32, n) for i in range(4)]
    np.subtract(1.0, t, out=s)
    np.multiply(t, t, out=t2)
    np.multiply(s, s, out=s2)
    # (1 - t)^3 / 6, 2/3 - t^2 (1 - t/2), the same in s = 1 - t, t^3 / 6
    for wi, a, a2, scale in ((w[0], s, s2, 1.0 / 6.0), (w[3], t, t2, 1.0 / 6.0)):
        np.multiply(a2, a, out=wi)
        wi *= scale
    for wi, a, a2 in ((w[1], t, t2), (w[2], s, s2)):
        np.multiply(a, -0.5, out=wi)
        wi += 1.0
        wi *= a2
        np.subtract(2.0 / 3.0, wi, out=wi)
    return tuple(w)


class _Workspace:
    """Work arrays of one thread, reused from block to block.

    A fresh numpy temporary of 256 KiB or more comes from ``mmap`` and costs
    its page faults on first touch: ~3 ns per element, ten times the
    arithmetic done on it (measured: the 12 operations of the cubic weights on
    65536 points took 15 ns per point with temporaries, 1.5 ns in place).
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, dtype: Any, n: int) -> np.ndarray:
        """A flat array of ``n`` elements of ``dtype`` named ``name`` (contents undefined)."""
        a = self._arrays.get(name)
        if a is None or a.size < n or a.dtype != dtype:
            a = self._arrays[name] = np.empty(n, dtype)
        return a[:n]


# Why this sampler (measured on one core, 4096 x 4096 float32 bands, coherent
# coordinates of a smooth field; ns per output point for 3 bands):
#   scipy map_coordinates, order 3   284  (95 a band, mostly per-point overhead:
#                                          order 1 still costs 38 a band)
#   _TapSampler, order 3              76  (22 a band + 9 shared: weights and
#                                          gather index computed once, 16 np.take
#                                          gathers and 35 float32 operations a band,
#                                          all in reused work arrays)
#   OpenCV remap, INTER_CUBIC         15  but it rounds positions to 1/32 px and
#                                          uses Keys a = -0.75: twice the residual of
#                                          the co-registration benchmark
#   numba kernel (same arithmetic)    27  but 1.6 s to compile at the first call
#                                          and a new dependency
# Gathering two taps at once (int64 items of a shifted copy) was slower: the
# arithmetic on interleaved arrays costs more than the gathers it saves. With
# the prefilter as an FIR (0.12 s a band against scipy's 0.50 s) the apply of
# the benchmark's 4096 x 4096 3-band field takes under a third of the CPU time
# it took (2.8 s against 8.9 s), for the same pixels to < 2e-4.
class _TapSampler:
    """Samples mirror-padded images (B-spline coefficients, or pixels) at many points, all bands at once.

    ``ndi.map_coordinates(..., prefilter=False, mode="mirror")`` of order 3, 1
    or 0, in float32, with the work of a point shared by the bands: its tap
    weights and gather index are computed once; each band's taps are gathered
    with ``np.take`` from shifted views of the flat padded array and summed
    row by row.
    """

    def __init__(self, padded: list[np.ndarray], pad: int, order: int, support: np.ndarray | None) -> None:
        self.order = order
        self.width = padded[0].shape[1]
        self.ntap = {0: 1, 1: 2, 3: 4}[order]
        # padded row/column of the first tap of the point whose floor is pixel (0, 0)
        self.first = float(pad - 1 if order == 3 else pad)
        self.flats = [a.ravel() for a in padded]
        # flat offset of tap (k, j) from the first tap
        self.offsets = [[k * self.width + j for j in range(self.ntap)] for k in range(self.ntap)]
        # the valid mask, zero outside the window: as map_coordinates(order=1, mode="constant", cval=0)
        self.support = None if support is None else np.pad(support.astype(np.float32), 1).ravel()
        self.swidth = 0 if support is None else support.shape[1] + 2

    def sample(self, pr: np.ndarray, pc: np.ndarray, ok: np.ndarray, outs: list[np.ndarray],
               ws: _Workspace | None = None) -> None:
        """Values at window coordinates ``(pr, pc)`` into ``outs`` (one flat float32 per band), NaN where not ``ok``.

        ``ok`` must be False wherever a point lies more than half a pixel
        outside the window (or is NaN); it is updated in place: with nodata,
        points whose bilinear neighbourhood is not all valid are refused too.
        ``ws`` holds the work arrays (a thread's own).
        """
        ws = ws or _Workspace()
        base, ty, tx = self._locate(pr, pc, ok, ws)
        refused = None if ok.all() else ~ok
        n = base.size
        if self.order == 3:
            wy, wx = _cubic_bspline_weights(ty, ws, "y"), _cubic_bspline_weights(tx, ws, "x")
        elif self.order == 1:
            wy = (np.subtract(1.0, ty, out=ws.get("y0", np.float32, n)), ty)
            wx = (np.subtract(1.0, tx, out=ws.get("x0", np.float32, n)), tx)
        tap = ws.get("tap", np.float32, n)
        row = ws.get("row", np.float32, n)
        for flat, dst in zip(self.flats, outs, strict=True):
            if self.order == 0:
                np.take(flat, base, mode="clip", out=dst)
            for k, offs in enumerate(self.offsets if self.order else []):
                np.take(flat[offs[0]:], base, mode="clip", out=row)
                row *= wx[0]
                for j in range(1, self.ntap):
                    np.take(flat[offs[j]:], base, mode="clip", out=tap)
                    tap *= wx[j]
                    row += tap
                if k == 0:
                    np.multiply(row, wy[0], out=dst)
                else:
                    row *= wy[k]
                    dst += row
            if refused is not None:
                np.copyto(dst, np.float32(np.nan), where=refused)

    def _locate(self, pr: np.ndarray, pc: np.ndarray, ok: np.ndarray,
                ws: _Workspace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat index of each point's first tap and its fractions (float32) below it; nodata check into ``ok``."""
        n = pr.size
        if not ok.all():  # refused points (NaN ones too) sampled at (0, 0)
            notok = np.logical_not(ok, out=ws.get("notok", np.bool_, n))
            pr0, pc0 = ws.get("pr0", np.float64, n), ws.get("pc0", np.float64, n)
            for src, dst in ((pr, pr0), (pc, pc0)):
                np.copyto(dst, src)
                np.copyto(dst, 0.0, where=notok)
            pr, pc = pr0, pc0
        iy, ix = np.floor(pr, out=ws.get("iy", np.float64, n)), np.floor(pc, out=ws.get("ix", np.float64, n))
        ty = np.subtract(pr, iy, out=ws.get("ty", np.float32, n))
        tx = np.subtract(pc, ix, out=ws.get("tx", np.float32, n))
        if self.support is not None:
            self._check_support(iy, ix, ty, tx, ok, ws)
        if self.order == 0:
            # as scipy: a coordinate below 0 mirrored, then rounded (the pixel
            # after the last one is mirrored by the padding)
            for a, f in ((pr, iy), (pc, ix)):
                np.abs(a, out=f)
                f += 0.5
                np.floor(f, out=f)
        # never negative for a point inside the padded window
        iy += self.first
        iy *= self.width
        iy += ix
        iy += self.first
        base = ws.get("base", np.intp, n)
        np.copyto(base, iy, casting="unsafe")
        return base, ty, tx

    def _check_support(self, iy: np.ndarray, ix: np.ndarray, ty: np.ndarray, tx: np.ndarray, ok: np.ndarray,
                       ws: _Workspace) -> None:
        """Refuse (in ``ok``) points where the bilinear interpolation of the valid mask is below 1 - 1e-4."""
        sup, sw, n = self.support, self.swidth, iy.size
        assert sup is not None
        f = np.add(iy, 1.0, out=ws.get("sf", np.float64, n))
        f *= sw
        f += ix
        f += 1.0
        sb = ws.get("sb", np.intp, n)
        np.copyto(sb, f, casting="unsafe")
        a, b, acc = (ws.get(name, np.float32, n) for name in ("sa", "sb1", "sacc"))
        for k, weight in ((0, np.subtract(1.0, ty, out=ws.get("sw", np.float32, n))), (1, ty)):
            np.take(sup[k * sw:], sb, mode="clip", out=a)
            np.take(sup[k * sw + 1:], sb, mode="clip", out=b)
            b -= a
            b *= tx
            a += b  # a + (b - a) tx
            a *= weight
            if k == 0:
                acc[:] = a
            else:
                acc += a
        ok &= acc >= 1.0 - 1e-4


def check_readable(path: str | os.PathLike, *, bands: list[int] | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Decode every pixel of ``bands`` once; DataError naming the file on a read error."""
    path = Path(path)
    with open_raster(path, max_pixels=max_pixels) as src:
        _check_readable(src, path, _check_bands(path, src.count, bands))


@contextlib.contextmanager
def gdal_env(cache_mb: int = 256) -> Iterator[None]:
    """Settings of a run: GDAL's block cache bounded (its default is 5 % of RAM), internal masks,
    and windows read through recently decoded block rows (:class:`_BlockRows`)."""
    cache = _BlockRowCache()
    token = _BLOCK_ROWS.set(cache)
    try:
        with rasterio.Env(GDAL_CACHEMAX=cache_mb, GDAL_TIFF_INTERNAL_MASK=True):
            yield
    finally:
        _BLOCK_ROWS.reset(token)
        cache.close()


class RasterReader:
    """Windows of an open raster as float32 scaled to about [0, 1] (see :func:`read_grid`).

    Use as a context manager; ``scale`` as in :func:`read_grid` (by default 255
    for 8-bit data, else the 99.9th percentile of a decimated read).
    """

    def __init__(self, path: str | os.PathLike, *, bands: list[int] | None = None,
                 scale: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()
        self._src = self._stack.enter_context(open_raster(self.path, max_pixels=max_pixels))
        self.indexes = _check_bands(self.path, self._src.count, bands)
        if scale is None:
            scale = _scale_for(self._src.dtypes[0])
        if scale is None:
            from rasterio.windows import Window

            from .tiling import sample_bands

            parts, masks = [], []
            for r0, r1 in sample_bands(0, self._src.height, self._src.width, max_pixels=1 << 22):
                data, valid = self._read(Window(0, r0, self._src.width, r1 - r0))
                parts.append(data[:, valid])
                masks.append(np.ones(int(valid.sum()), bool))
            scale = _robust_scale(np.concatenate(parts, axis=1), np.concatenate(masks))
        self.scale = float(scale)

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    @property
    def shape(self) -> tuple[int, int]:
        return self._src.height, self._src.width

    @property
    def dtype(self) -> str:
        return self._src.dtypes[0]

    def _read(self, win: Any) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:  # a dataset is read by one thread at a time
            return _read_window(self._src, self.path, self.indexes, win)

    def read(self, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[r0, r1)``, columns ``[c0, c1)``: scaled bands (0 where invalid) and the valid mask."""
        from rasterio.windows import Window

        c1 = self._src.width if c1 is None else c1
        data, valid = self._read(Window(c0, r0, c1 - c0, r1 - r0))
        data /= np.float32(self.scale)
        data[:, ~valid] = 0.0
        return data, valid

    def read_raw(self, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`read` but unscaled, NaN where invalid."""
        from rasterio.windows import Window

        c1 = self._src.width if c1 is None else c1
        data, valid = self._read(Window(c0, r0, c1 - c0, r1 - r0))
        data[:, ~valid] = np.nan
        return data, valid


def cog_overview_factors(width: int, height: int, blocksize: int) -> list[int]:
    """The overview factors GDAL's COG driver makes for a ``width`` x ``height`` raster:
    2, 4, 8, ... until both sides, divided by the factor (rounded down), fit in
    one ``blocksize`` tile.

    Examples
    --------
    >>> cog_overview_factors(8192, 8192, 256)
    [2, 4, 8, 16, 32]
    >>> cog_overview_factors(513, 200, 256)
    [2]
    >>> cog_overview_factors(256, 100, 256)
    []
    """
    factors: list[int] = []
    while (width >> len(factors)) > blocksize or (height >> len(factors)) > blocksize:
        factors.append(2 ** (len(factors) + 1))
    return factors


class StripWriter:
    """A raster written in row strips, then turned into a COG (:func:`write_cog`'s format).

    The strips go to a hidden tiled GeoTIFF next to ``path``; :meth:`finish`
    copies it to ``path`` as a Cloud-Optimized GeoTIFF (atomically) and deletes
    it; :meth:`abort` deletes it. Rows are held back until they fill whole rows
    of tiles, so that no tile is written twice (a tile written in parts is
    written, evicted, read back and written again).
    """

    #: rows (and columns) of one tile of the hidden GeoTIFF
    BLOCK = 256

    def __init__(self, path: str | os.PathLike, grid: Grid, *, count: int, dtype: str,
                 nodata: float | None = None, mask: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise OutputExistsError(f"{self.path}: exists (use --overwrite to replace it)")
        self.grid, self.count, self.dtype, self.nodata, self.mask = grid, count, dtype, nodata, mask
        self.overwrite = overwrite
        self.tmp = self.path.with_name(f".{self.path.name}.strips.tif")
        profile = {
            "driver": "GTiff", "width": grid.width, "height": grid.height, "count": count, "dtype": dtype,
            "crs": grid.crs, "transform": grid.transform, "nodata": nodata, "tiled": True,
            "blockxsize": self.BLOCK, "blockysize": self.BLOCK, "bigtiff": "IF_SAFER",
        }
        self._dst = rasterio.open(self.tmp, "w+", **profile)
        # rows [_r0, _r0 + rows held) not yet written: (array, valid) pieces
        self._r0 = 0
        self._held: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._closed = False
        self._reader: Any = None
        self._future: Any = None

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` written so far, ``(count, rows, cols)``."""
        from rasterio.windows import Window

        if self._closed:
            if self._reader is None:
                self._reader = rasterio.open(self.tmp)
            src = self._reader
        else:
            self._flush(everything=True)
            src = self._dst
        return src.read(window=Window(0, r0, self.grid.width, r1 - r0))

    def write(self, r0: int, array: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write rows from ``r0`` (``(count, rows, cols)`` or 2-D ``array``)."""
        if array.ndim == 2:
            array = array[np.newaxis]
        array = array.astype(self.dtype, copy=False)
        if self._held and r0 != self._r0 + self._held_rows():
            self._flush(everything=True)
        if not self._held:
            self._r0 = r0
        self._held.append((array, valid))
        self._flush(everything=r0 + array.shape[1] >= self.grid.height)

    def _held_rows(self) -> int:
        return sum(a.shape[1] for a, _ in self._held)

    def _flush(self, *, everything: bool) -> None:
        """Write the held rows that fill whole rows of tiles (all of them if ``everything``)."""
        if not self._held:
            return
        end = self._r0 + self._held_rows()
        cut = end if everything else (end // self.BLOCK) * self.BLOCK
        if cut <= self._r0:
            return
        array = np.concatenate([a for a, _ in self._held], axis=1) if len(self._held) > 1 else self._held[0][0]
        valid = None
        if self.mask:
            valid = np.concatenate([np.ones(a.shape[1:], bool) if v is None else v for a, v in self._held])
        n = cut - self._r0
        self._write(self._r0, array[:, :n], None if valid is None else valid[:n])
        self._held = [] if n == array.shape[1] else [(array[:, n:], None if valid is None else valid[n:])]
        self._r0 = cut

    def _write(self, r0: int, array: np.ndarray, valid: np.ndarray | None) -> None:
        from rasterio.windows import Window

        win = Window(0, r0, self.grid.width, array.shape[1])
        self._dst.write(array, window=win)
        if self.mask:
            self._dst.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=win)

    def close_strips(self, *, tags: dict[str, Any] | None = None, descriptions: list[str] | None = None,
                     colorinterp: list[str] | None = None) -> None:
        """Write the held rows, the metadata and the overviews, and close the strips
        file. It can still be read (:meth:`read`, or :attr:`readable`) until the COG
        is made."""
        if self._closed:
            return
        self._flush(everything=True)
        if tags:
            self._dst.update_tags(**{k: _tag_text(v) for k, v in tags.items()})
        for i, desc in enumerate(descriptions or [], start=1):
            self._dst.set_band_description(i, desc)
        if colorinterp:
            from rasterio.enums import ColorInterp

            self._dst.colorinterp = [ColorInterp[c] for c in colorinterp]
        # Overviews built here, on the uncompressed strips, are taken over by the COG
        # driver as they are, in about 60 % of the time it takes to build them in its
        # compressed temporary file. Same levels and values; where a side does not
        # divide by a factor, a level's size is rounded up (gdaladdo's rule) where the
        # COG driver rounds down, so the file is byte for byte the driver's own only
        # when the sides divide by the largest factor.
        levels = cog_overview_factors(self.grid.width, self.grid.height, COG_OPTIONS["blocksize"])
        if levels:
            from rasterio.enums import Resampling

            self._dst.build_overviews(levels, Resampling[COG_OPTIONS["overview_resampling"]])
        self._dst.close()
        self._closed = True

    @property
    def readable(self) -> Path:
        """The file holding the rows now: the strips until the COG is made, then the COG."""
        return self.tmp if self.tmp.exists() else self.path

    def finish(self, *, tags: dict[str, Any] | None = None, descriptions: list[str] | None = None,
               colorinterp: list[str] | None = None, predictor: int | None = None) -> Path:
        """Close the strips and write ``path`` as a COG; returns ``path``."""
        return self.finish_later(None, tags=tags, descriptions=descriptions, colorinterp=colorinterp,
                                 predictor=predictor).wait()

    def finish_later(self, executor: Any, *, tags: dict[str, Any] | None = None,
                     descriptions: list[str] | None = None, colorinterp: list[str] | None = None,
                     predictor: int | None = None) -> StripWriter:
        """Close the strips now and make the COG in ``executor`` (a
        ``concurrent.futures`` executor; ``None``: now). The strips stay readable
        until :meth:`wait`, which returns ``path`` once the COG is complete."""
        try:
            self.close_strips(tags=tags, descriptions=descriptions, colorinterp=colorinterp)
            if executor is None:
                self._make_cog(predictor)
            else:
                self._future = executor.submit(self._make_cog, predictor)
        except BaseException:
            self._cleanup()
            raise
        return self

    def wait(self) -> Path:
        """Wait for the COG started by :meth:`finish_later`, delete the strips; returns ``path``."""
        try:
            if self._future is not None:
                self._future.result()
        finally:
            self._future = None
            self._cleanup()
        return self.path

    def _make_cog(self, predictor: int | None) -> None:
        if predictor is None:
            predictor = 3 if np.issubdtype(np.dtype(self.dtype), np.floating) else 2
        # the settings of io.gdal_env that matter here, in whichever thread this runs
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), atomic_output(self.path, overwrite=self.overwrite) as tmp:
            rasterio.shutil.copy(self.tmp, tmp, driver="COG", predictor=predictor, **COG_OPTIONS)

    def _cleanup(self) -> None:
        self._held = []
        if self._future is not None:
            # the COG is being made from the strips: let it end first
            if not self._future.cancel():
                with contextlib.suppress(BaseException):
                    self._future.result()
            self._future = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if not self._dst.closed:
            self._dst.close()
        self._closed = True
        for p in (self.tmp, self.tmp.with_name(self.tmp.name + ".msk")):
            p.unlink(missing_ok=True)

    def abort(self) -> None:
        """Discard everything written."""
        self._cleanup()


def read_averaged(path: str | os.PathLike, grid: Grid, *, bands: list[int] | None = None, factor: int = 2,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bands of a raster on a coarse ``grid``: block means of ``factor`` x ``factor`` pixels, then a warp.

    The part of the file under ``grid`` is read in row strips and averaged
    (valid pixels only), and the small result is warped onto ``grid``
    (bilinear, GDAL). Values in source units, NaN where there is no data.
    """
    import math

    from rasterio.warp import transform_bounds
    from rasterio.windows import Window, from_bounds as window_from_bounds

    from .tiling import block_mean

    path = Path(path)
    with open_raster(path, max_pixels=max_pixels) as src:
        indexes = _check_bands(path, src.count, bands)
        left, bottom, right, top = transform_bounds(grid.crs, src.crs, *grid.bounds, densify_pts=21)
        win = window_from_bounds(left, bottom, right, top, src.transform)
        c0 = max(int(math.floor(win.col_off)) - factor, 0)
        r0 = max(int(math.floor(win.row_off)) - factor, 0)
        c1 = min(int(math.ceil(win.col_off + win.width)) + factor, src.width)
        r1 = min(int(math.ceil(win.row_off + win.height)) + factor, src.height)
        out = np.full((len(indexes), grid.height, grid.width), np.nan, np.float32)
        if c0 >= c1 or r0 >= r1:
            return out
        ovr = [f for f in src.overviews(indexes[0]) if f <= factor]
        if ovr:
            # a pyramid level of the file (a COG's overview): GDAL reads it instead of every pixel
            level = max(ovr)
            shape = (len(indexes), max(1, (r1 - r0) // level), max(1, (c1 - c0) // level))
            win = Window(c0, r0, shape[2] * level, shape[1] * level)
            try:
                data = src.read(indexes, window=win, out_shape=shape, out_dtype="float32",
                                resampling=Resampling.average)
                masks = src.read_masks(indexes, window=win, out_shape=shape)
            except RasterioError as exc:
                raise _unreadable(path, exc) from exc
            ok = np.all(masks > 0, axis=0) & np.all(np.isfinite(data), axis=0)
            small = np.where(ok, data, np.float32(np.nan))
            factor = level
        else:
            step = max(factor, ((1 << 21) // max(c1 - c0, 1)) // factor * factor)
            parts = []
            for a in range(r0, r1, step):
                b = min(r1, a + step)
                data, ok = _read_window(src, path, indexes, Window(c0, a, c1 - c0, b - a))
                parts.append(block_mean(data, ok, factor, all_valid=False)[0])
            small = np.concatenate(parts, axis=1)
        t = src.transform * rasterio.Affine.translation(c0, r0) * rasterio.Affine.scale(factor)
        for i in range(small.shape[0]):
            reproject(small[i], out[i], src_transform=t, src_crs=src.crs, src_nodata=np.nan,
                      dst_transform=grid.transform, dst_crs=grid.crs, dst_nodata=np.nan,
                      resampling=Resampling.bilinear)
        return out
