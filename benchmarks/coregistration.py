"""Co-registration benchmark: known-answer cases from real imagery, side by side.

Cases are built from real images (the CC0 Landsat scene ``RGB.byte.tif`` and the
Joplin 2011 pre tile, crops of both): the "after" image is the "before" crop
warped by a known geometry (translation 0.3-60 px, rotation 0.2-1 deg, scale
0.5 %, a smooth local distortion, another CRS and pixel size) and perturbed
(gain/gamma, noise, blur, a no-data border, a pasted changed patch covering
20 % of the scene); pairs with no shared content must be reported unreliable.
The real Joplin pair (pre tile against each post tile) is run as delivered.

Residual misalignment of the OUTPUT is measured independently of every method:
windowed phase correlation (scikit-image, 64 px windows 16 px from the border, no phase
normalisation, Hann taper, 1/100 px) of the output against the truth-aligned
image (the same radiometric perturbation applied to the before crop), over
windows outside the changed patch; a case's residual is the median over its
windows.

The real Joplin pair (pre tile against each post tile) has no known answer and
almost everything in it changed, so its residual is measured three ways on the
gradient magnitude of the band mean (Gaussian derivatives, sigma 1 px: edges
whatever their contrast, which differs between the sensors), with normalised
cross-correlation over integer shifts of +/-6 px and a quadratic fit of the
3 x 3 neighbourhood of the peak (sub-pixel):

- check windows: 48 px squares on ground-level features that are unchanged
  between the dates (street and sidewalk junctions, parking-lot markings and
  curbs, pool decks, the edge of a concrete apron), listed in ``benchmarks/joplin_checks.geojson``.
  They were proposed by correlation on the delivered pair and each was kept
  only after looking at both dates: no roof (tall things lean differently in the
  two views), tree, debris or vehicle dominates any of them. A check counts
  when its peak reaches a correlation of 0.2 and stands 5 % above any other
  shift 3 px or more away; the residual is the median length over the checks;
- stable windows: every 64 px window (32 px apart) where the dates still
  correlate (peak correlation >= 0.3, 15 % above any other shift 3 px or more away,
  two-dimensional peak): the median length and the count;
- ensemble: the correlation surfaces of all 64 px windows averaged (ensemble
  correlation: changed windows add noise, not a peak), whose peak is the
  systematic residual, with a bootstrap standard error over the windows.

The pair as delivered (georeferencing only) is measured the same way, and the
earlier measure (128 px band-passed windows kept where the peak correlation
reaches 0.3; only 3 windows per tile) is kept for comparison as ``legacy``.

Methods: changedetect (``pipeline.coregister_pair``: model chosen by the data,
one resampling), scikit-image ``phase_cross_correlation`` alone (whole image,
translation), and AROSICS ``COREG`` (global) and ``COREG_LOCAL`` when it is
importable (skipped otherwise; it is not a project dependency).

Usage::

    python benchmarks/coregistration.py DATA_DIR [--out benchmarks/results] [--quick] [--no-arosics]
        [--only {cases,joplin,speed}]

``--only`` runs one part (the known-answer cases, the real Joplin pair, or the 4096² speed case) and
writes ``coregistration_<part>.json`` / ``.md`` instead of the full results.

DATA_DIR holds ``landsat-rgb-cc0/`` and ``joplin-2011/`` (default: $CHANGEDETECT_DATA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin
from scipy import ndimage as ndi

from changedetect import io
from changedetect.grid import Grid
from changedetect.pipeline import coregister_pair

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "joplin_checks.geojson"
LANDSAT = "landsat-rgb-cc0/RGB.byte.tif"
JOPLIN_PRE = "joplin-2011/pre/tile_337-10160.tif"
JOPLIN_POSTS = ("joplin-2011/post/tile_31500-5137.tif", "joplin-2011/post/tile_31500-6161.tif")
CROP = 512
WINDOW = 64
BORDER = 16

try:  # benchmark-only comparison; never a project dependency
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from arosics import COREG, COREG_LOCAL  # type: ignore[import-not-found]
    HAVE_AROSICS = True
except Exception:  # noqa: BLE001 - any import problem means "skip AROSICS"
    HAVE_AROSICS = False


# --------------------------------------------------------------------------- scenes
def read_rgb(path: Path) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    with rasterio.open(path) as src:
        data = src.read().astype(np.float32)
        valid = src.read_masks(1) > 0
        return data, valid, src.transform, src.crs


def crop_of(data: np.ndarray, valid: np.ndarray, size: int, margin: int) -> tuple[int, int]:
    """Top-left of a ``size`` crop fully valid with ``margin`` around it (closest to the centre)."""
    rows, cols = valid.shape
    ok = ndi.binary_erosion(valid, iterations=margin, border_value=0)
    cr, cc = (rows - size) // 2, (cols - size) // 2
    best, pos = None, (cr, cc)
    for r in range(0, rows - size + 1, 16):
        for c in range(0, cols - size + 1, 16):
            corners = ok[r, c] and ok[r + size - 1, c] and ok[r, c + size - 1] and ok[r + size - 1, c + size - 1]
            if corners and ok[r : r + size, c : c + size].all():
                d = (r - cr) ** 2 + (c - cc) ** 2
                if best is None or d < best:
                    best, pos = d, (r, c)
    return pos


def content_map(kind: str, param: float, size: int, rng: np.random.Generator):
    """Content displacement d(r, c) of a case: moving[p + d(p)] ~= reference[p]."""
    centre = (size - 1) / 2.0
    if kind == "translation":
        ang = rng.uniform(0, 2 * np.pi)
        dy, dx = param * math.sin(ang), param * math.cos(ang)
        return lambda r, c: (np.full_like(r, dy), np.full_like(c, dx))
    if kind == "rotation":
        t = math.radians(param)
        def f(r, c):
            rr, cc = r - centre, c - centre
            return (math.cos(t) - 1) * rr + math.sin(t) * cc + 1.3, -math.sin(t) * rr + (math.cos(t) - 1) * cc - 0.7
        return f
    if kind == "scale":
        s = param
        return lambda r, c: ((s - 1) * (r - centre) + 0.4, (s - 1) * (c - centre) - 0.9)
    if kind == "local":
        amp = param
        ph = rng.uniform(0, 2 * np.pi, 2)
        lam = size * 2.0
        return lambda r, c: (2.0 + amp * np.sin(2 * np.pi * c / lam + ph[0]) * np.cos(np.pi * r / lam),
                             -1.0 + amp * np.cos(2 * np.pi * r / lam + ph[1]) * np.sin(np.pi * c / lam))
    raise ValueError(kind)


def warp_content(src: np.ndarray, r0: int, c0: int, size: int, disp) -> np.ndarray:
    """The after crop: at p it shows the source content at q with q + d(q) = p (fixed point)."""
    r, c = np.mgrid[0:size, 0:size].astype(np.float64)
    qr, qc = r.copy(), c.copy()
    for _ in range(6):
        dy, dx = disp(qr, qc)
        qr, qc = r - dy, c - dx
    return np.stack([ndi.map_coordinates(b, [qr + r0, qc + c0], order=3, mode="reflect") for b in src])


def perturb(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    out = img.astype(np.float32)
    if kind in ("radiometry", "all"):
        unit = np.clip(out / 255.0, 0, 1)
        out = 230.0 * unit**0.7 + 15.0
    if kind in ("blur", "all"):
        out = np.stack([ndi.gaussian_filter(b, 1.0) for b in out])
    if kind in ("noise", "all"):
        out = out + rng.normal(0, 6.0, out.shape).astype(np.float32)
    return np.clip(out, 0, 255)


def write(path: Path, arr: np.ndarray, transform, crs, valid: np.ndarray | None = None) -> Path:
    profile = {"driver": "GTiff", "width": arr.shape[2], "height": arr.shape[1], "count": arr.shape[0],
               "dtype": "uint8", "crs": crs, "transform": transform}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        if valid is not None:
            dst.write_mask(np.where(valid, 255, 0).astype(np.uint8))
    return path


# --------------------------------------------------------------------------- residual
def _dog(lum: np.ndarray) -> np.ndarray:
    return ndi.gaussian_filter(lum, 1.0) - ndi.gaussian_filter(lum, 4.0)


def residual(output: np.ndarray, ok: np.ndarray, truth: np.ndarray, exclude: np.ndarray | None,
             min_corr: float | None = None, window: int = WINDOW) -> dict[str, Any]:
    """Windowed phase correlation of ``output`` against ``truth`` (independent of every method).

    With ``min_corr``, only windows whose correlation peak reaches it count (the
    parts of a real pair that still look alike: roads, surviving structures).
    """
    from skimage.registration import phase_cross_correlation

    a = _dog(truth.mean(0))
    b = _dog(np.nan_to_num(output).mean(0))
    hann = np.outer(np.hanning(window), np.hanning(window))
    mags = []
    rows, cols = ok.shape
    step = window if min_corr is None else window // 2
    for r in range(BORDER, rows - window - BORDER + 1, step):
        for c in range(BORDER, cols - window - BORDER + 1, step):
            sl = (slice(r, r + window), slice(c, c + window))
            if not ok[sl].all() or (exclude is not None and exclude[sl].any()):
                continue
            if a[sl].std() < 1e-3:
                continue
            shift, err, _ = phase_cross_correlation(a[sl] * hann, b[sl] * hann, upsample_factor=100,
                                                    normalization=None)
            # err = 1 - peak^2 / (energies): the squared correlation at the peak is 1 - err.
            if min_corr is not None and math.sqrt(max(1.0 - float(err), 0.0)) < min_corr:
                continue
            mags.append(float(np.hypot(*shift)))
    if not mags:
        return {"median_px": None, "p90_px": None, "windows": 0}
    return {"median_px": float(np.median(mags)), "p90_px": float(np.percentile(mags, 90)), "windows": len(mags)}


# --------------------------------------------------------------------------- residual, real pair
#: Real pair: search range (px), check-window and stable-window settings.
REAL_SEARCH = 6
REAL_WINDOW = 64
REAL_STEP = 32


def _gradmag(lum: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gradient magnitude (Gaussian derivatives): edges whatever their contrast."""
    lum = lum.astype(np.float64)
    return np.hypot(ndi.gaussian_filter(lum, sigma, order=(1, 0)), ndi.gaussian_filter(lum, sigma, order=(0, 1)))


def _ncc_shifts(a: np.ndarray, b: np.ndarray, radius: int) -> np.ndarray:
    """NCC of window ``a`` (n x m) with ``b`` (n + 2R, m + 2R) at every integer shift.

    ``out[R + sy, R + sx]`` compares ``a`` with ``b[R + sy :, R + sx :]``, i.e. the
    content of ``b`` displaced by ``(sy, sx)``: the convention of ``changedetect``
    (``moving[r + dy, c + dx] ~= reference[r, c]``).
    """
    from scipy import fft as sfft

    n, m = a.shape
    a0 = a - a.mean()
    norm_a = math.sqrt(float((a0 * a0).sum()))
    size = (sfft.next_fast_len(b.shape[0], real=True), sfft.next_fast_len(b.shape[1], real=True))
    k = 2 * radius + 1
    spec_b = sfft.rfft2(np.stack([b, b * b]), s=size, axes=(-2, -1))
    num = sfft.irfft2(np.conj(sfft.rfft2(a0, s=size)) * spec_b[0], s=size)[:k, :k]
    box = np.conj(sfft.rfft2(np.ones_like(a0), s=size))
    s1, s2 = sfft.irfft2(box * spec_b, s=size, axes=(-2, -1))[:, :k, :k]
    var_b = np.maximum(s2 - s1 * s1 / (n * m), 1e-12)
    return num / (norm_a * np.sqrt(var_b) + 1e-12)


def _peak(surface: np.ndarray) -> dict[str, float] | None:
    """Sub-pixel peak of an NCC surface: quadratic fit of the 3 x 3 around its maximum.

    Returns the shift, the peak value, ``ratio`` (peak over the highest value 3 px
    or more away) and ``isotropy`` (smaller over larger curvature: near 0 on the
    ridge of a straight edge, whose position along the edge is not defined), or
    None when the maximum is on the border or the fit is not a peak.
    """
    radius = surface.shape[0] // 2
    iy, ix = np.unravel_index(int(np.argmax(surface)), surface.shape)
    if not (0 < iy < 2 * radius and 0 < ix < 2 * radius):
        return None
    patch = surface[iy - 1 : iy + 2, ix - 1 : ix + 2].ravel()
    y, x = (v.ravel() for v in np.mgrid[-1:2, -1:2])
    design = np.column_stack([np.ones(9), y, x, y * y, x * x, x * y])
    c, *_ = np.linalg.lstsq(design, patch, rcond=None)
    hess = np.array([[2 * c[3], c[5]], [c[5], 2 * c[4]]])
    eig = np.linalg.eigvalsh(hess)
    if not (eig < 0).all():
        return None
    off = -np.linalg.solve(hess, c[1:3])
    if np.abs(off).max() > 1.0:
        return None
    top = float(surface[iy, ix])
    rest = surface.copy()
    rest[max(iy - 2, 0) : iy + 3, max(ix - 2, 0) : ix + 3] = -np.inf
    second = float(rest.max())
    return {"dy": float(iy - radius + off[0]), "dx": float(ix - radius + off[1]), "corr": top,
            "ratio": top / second if second > 0 else math.inf, "isotropy": float(eig.max() / eig.min())}


def _real_features(output: np.ndarray, ok: np.ndarray, ref_lum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient magnitudes of the reference and of the output, and where both are trustworthy."""
    out_lum = np.nan_to_num(output).mean(0)
    fill = float(out_lum[ok].mean()) if ok.any() else 0.0
    good = ndi.binary_erosion(ok, iterations=4, border_value=0)
    return _gradmag(ref_lum), _gradmag(np.where(ok, out_lum, fill)), good


def load_checks(path: Path, grid: Grid, post: str) -> list[dict[str, Any]]:
    """Check windows of ``post`` (file stem) as reference-pixel squares: centre row, col and side."""
    from rasterio.warp import transform as warp_points

    doc = json.loads(Path(path).read_text())
    inverse = ~grid.transform
    out = []
    for feat in doc["features"]:
        props = feat["properties"]
        if props.get("post") != post:
            continue
        ring = feat["geometry"]["coordinates"][0][:-1]
        xs, ys = warp_points("EPSG:4326", grid.crs, [p[0] for p in ring], [p[1] for p in ring])
        cols, rows = zip(*(inverse * (x, y) for x, y in zip(xs, ys, strict=True)), strict=True)
        side = int(round(math.sqrt(abs(0.5 * sum(cols[i] * rows[i - 1] - cols[i - 1] * rows[i]
                                                     for i in range(len(cols)))))))
        # Pixel-edge coordinates: the centre pixel is the mean minus half a pixel.
        out.append({"id": props.get("id"), "feature": props.get("feature"), "side": side,
                    "row": float(np.mean(rows)) - 0.5, "col": float(np.mean(cols)) - 0.5})
    return out


def check_residual(output: np.ndarray, ok: np.ndarray, ref_lum: np.ndarray,
                   checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Residual at the check windows (ground-level features unchanged between the dates)."""
    a, b, good = _real_features(output, ok, ref_lum)
    rad = REAL_SEARCH
    per: list[dict[str, Any]] = []
    for chk in checks:
        side = chk["side"]
        r0, c0 = int(round(chk["row"] - (side - 1) / 2)), int(round(chk["col"] - (side - 1) / 2))
        entry: dict[str, Any] = {"id": chk["id"], "row": r0 + (side - 1) / 2, "col": c0 + (side - 1) / 2}
        sl = (slice(r0 - rad, r0 + side + rad), slice(c0 - rad, c0 + side + rad))
        if r0 - rad < 0 or c0 - rad < 0 or not good[sl].all() or good[sl].shape != (side + 2 * rad,) * 2:
            entry["matched"] = False
            entry["why"] = "no data"
            per.append(entry)
            continue
        pk = _peak(_ncc_shifts(a[r0 : r0 + side, c0 : c0 + side], b[sl], rad))
        # The checks were chosen as two-dimensional features: no isotropy test,
        # which would let a check drop in and out between outputs.
        matched = pk is not None and pk["corr"] >= 0.2 and pk["ratio"] >= 1.05
        entry["matched"] = bool(matched)
        if pk is not None:
            entry.update({k: round(v, 3) for k, v in pk.items()})
        per.append(entry)
    mags = [math.hypot(e["dy"], e["dx"]) for e in per if e["matched"]]
    out: dict[str, Any] = {"checks": len(per), "matched": len(mags)}
    if mags:
        dys = [e["dy"] for e in per if e["matched"]]
        dxs = [e["dx"] for e in per if e["matched"]]
        out.update({"median_px": float(np.median(mags)), "max_px": float(np.max(mags)),
                    "median_dy": float(np.median(dys)), "median_dx": float(np.median(dxs))})
    out["per_check"] = per
    return out


def _real_windows(good: np.ndarray):
    rad, win = REAL_SEARCH, REAL_WINDOW
    rows, cols = good.shape
    for r in range(rad, rows - win - rad + 1, REAL_STEP):
        for c in range(rad, cols - win - rad + 1, REAL_STEP):
            if good[r - rad : r + win + rad, c - rad : c + win + rad].all():
                yield r, c


def stable_residual(output: np.ndarray, ok: np.ndarray, ref_lum: np.ndarray) -> dict[str, Any]:
    """Residual over the 64 px windows where the dates still correlate, and an ensemble estimate."""
    a, b, good = _real_features(output, ok, ref_lum)
    rad, win = REAL_SEARCH, REAL_WINDOW
    kept, surfaces = [], []
    for r, c in _real_windows(good):
        ref_win = a[r : r + win, c : c + win]
        if ref_win.std() < 1e-6:
            continue
        surf = _ncc_shifts(ref_win, b[r - rad : r + win + rad, c - rad : c + win + rad], rad)
        surfaces.append(surf)
        pk = _peak(surf)
        if pk is not None and pk["corr"] >= 0.3 and pk["ratio"] >= 1.15 and pk["isotropy"] >= 0.2:
            kept.append((pk["dy"], pk["dx"]))
    out: dict[str, Any] = {"tested": len(surfaces), "windows": len(kept)}
    if kept:
        arr = np.array(kept)
        mags = np.hypot(arr[:, 0], arr[:, 1])
        out.update({"median_px": float(np.median(mags)), "p90_px": float(np.percentile(mags, 90)),
                    "median_dy": float(np.median(arr[:, 0])), "median_dx": float(np.median(arr[:, 1]))})
    if surfaces:
        stack = np.array(surfaces)
        pk = _peak(stack.mean(0))
        if pk is not None:
            rng = np.random.default_rng(1)
            boot = [q for q in (_peak(stack[rng.integers(0, len(stack), len(stack))].mean(0)) for _ in range(200))
                    if q is not None]
            out["ensemble"] = {"dy": pk["dy"], "dx": pk["dx"], "magnitude_px": math.hypot(pk["dy"], pk["dx"]),
                               "corr": pk["corr"], "windows": len(surfaces),
                               "se_dy": float(np.std([q["dy"] for q in boot])),
                               "se_dx": float(np.std([q["dx"] for q in boot]))}
    return out


def real_residual(output: np.ndarray, ok: np.ndarray, ref: np.ndarray, checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Every residual measure of the real pair (see the module docstring)."""
    ref_lum = ref.mean(0) * 255.0
    return {"checks": check_residual(output, ok, ref_lum, checks), "stable": stable_residual(output, ok, ref_lum),
            "legacy": residual(output, ok, ref * 255.0, None, min_corr=0.3, window=128)}


# --------------------------------------------------------------------------- methods
def run_ours(before: Path, after: Path, grid: Grid) -> tuple[np.ndarray, np.ndarray, dict[str, Any], float]:
    ref, rvalid, _ = io.read_grid(before)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, ok, report, _ = coregister_pair(before, after, grid=grid, bands=[1, 2, 3], max_shift_px=64,
                                             upsample=20, resampling="cubic", max_pixels=io.DEFAULT_MAX_PIXELS,
                                             reference=(ref, rvalid))
    return out, ok, report, time.perf_counter() - t


def run_skimage(before: Path, after: Path, grid: Grid) -> tuple[np.ndarray, np.ndarray, dict[str, Any], float]:
    from skimage.registration import phase_cross_correlation

    ref, rvalid, _ = io.read_grid(before)
    t = time.perf_counter()
    raw, avalid, _, _ = io.warp_to_grid(after, grid)
    masks = {} if (rvalid.all() and avalid.all()) else {"reference_mask": rvalid, "moving_mask": avalid}
    shift, *_ = phase_cross_correlation(ref.mean(0), np.nan_to_num(raw).mean(0) / 255.0, upsample_factor=20,
                                        **masks)
    dy, dx = -float(shift[0]), -float(shift[1])
    if not (math.isfinite(dy) and math.isfinite(dx)):
        dy = dx = 0.0
    out, ok, _, _ = io.warp_to_grid(after, grid.shifted(dy, dx))
    return out, ok, {"shift_px": {"dy": dy, "dx": dx}, "reliable": None}, time.perf_counter() - t


def run_arosics(before: Path, after: Path, grid: Grid, local: bool, tmp: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], float] | None:
    if not HAVE_AROSICS:
        return None
    out_path = tmp / f"arosics_{'local' if local else 'global'}_{after.stem}.tif"
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if local:
                cr = COREG_LOCAL(str(before), str(after), grid_res=64, window_size=(128, 128), max_shift=64,
                                 path_out=str(out_path), fmt_out="GTIFF", q=True, align_grids=True,
                                 match_gsd=True, CPUs=2)
            else:
                cr = COREG(str(before), str(after), path_out=str(out_path), fmt_out="GTIFF", q=True,
                           max_shift=64, align_grids=True, match_gsd=True, CPUs=2)
            cr.correct_shifts()
            reliable = bool(getattr(cr, "success", True))
    except Exception as exc:  # noqa: BLE001 - AROSICS failures are results too
        return np.full((3, grid.height, grid.width), np.nan, np.float32), np.zeros(grid.shape, bool), \
            {"error": _no_paths(str(exc).splitlines()[0])[:120], "reliable": False}, time.perf_counter() - t
    elapsed = time.perf_counter() - t
    if not out_path.exists():
        return np.full((3, grid.height, grid.width), np.nan, np.float32), np.zeros(grid.shape, bool), \
            {"error": "no output", "reliable": False}, elapsed
    out, ok, _, _ = io.warp_to_grid(out_path, grid, resampling="nearest")
    return out, ok, {"reliable": reliable}, elapsed


def _no_paths(text: str) -> str:
    """A message with every file path reduced to its file name (results never name local folders)."""
    import re

    return re.sub(r"(?:/[^\s'\"/]+)+", lambda m: Path(m.group(0)).name, text)


# --------------------------------------------------------------------------- cases
def build_cases(data_dir: Path, quick: bool) -> list[dict[str, Any]]:
    cases = []
    for scene in ("landsat", "joplin"):
        path = data_dir / (LANDSAT if scene == "landsat" else JOPLIN_PRE)
        data, valid, transform, crs = read_rgb(path)
        size = CROP if scene == "joplin" else 448
        r0, c0 = crop_of(data, valid, size, 80)
        specs = [("translation", v, "none") for v in (0.3, 2.7, 7.4, 23.6, 60.0)]
        specs += [("rotation", v, "none") for v in (0.2, 0.5, 1.0)]
        specs += [("scale", 1.005, "none"), ("local", 3.0, "none")]
        specs += [("translation", 4.3, p) for p in ("radiometry", "noise", "blur", "all", "nodata", "patch",
                                                     "crs")]
        specs += [("unrelated", 0.0, "none")]
        if quick:
            specs = specs[::3]
        for kind, param, pert in specs:
            cases.append({"scene": scene, "path": path, "data": data, "transform": transform, "crs": crs,
                          "r0": r0, "c0": c0, "size": size, "kind": kind, "param": param, "perturb": pert})
    return cases


def make_pair(case: dict[str, Any], tmp: Path, rng: np.random.Generator):
    data, size, r0, c0 = case["data"], case["size"], case["r0"], case["c0"]
    t = case["transform"]
    grid_t = t * rasterio.Affine.translation(c0, r0)
    before = data[:, r0 : r0 + size, c0 : c0 + size]
    name = f"{case['scene']}_{case['kind']}_{case['param']}_{case['perturb']}"
    bpath = write(tmp / f"{name}_before.tif", before, grid_t, case["crs"])
    grid = Grid(case["crs"].to_string(), grid_t, size, size)
    pert = case["perturb"]
    exclude = None
    if case["kind"] == "unrelated":
        # Another part of the scene (or of the other scene): no shared content.
        rows, cols = data.shape[1:]
        other = np.rot90(data, 2, axes=(1, 2))[:, r0 : r0 + size, c0 : c0 + size]
        after = perturb(other, "radiometry", rng)
        return bpath, write(tmp / f"{name}_after.tif", after, grid_t, case["crs"]), grid, None, None
    disp = content_map(case["kind"], case["param"], size, rng)
    after = warp_content(data, r0, c0, size, disp)
    truth = perturb(before, pert if pert in ("radiometry", "noise", "blur", "all") else "none", rng)
    after = perturb(after, pert if pert in ("radiometry", "noise", "blur", "all") else "none", rng)
    avalid = None
    if pert == "nodata":
        avalid = np.ones((size, size), bool)
        avalid[:, : size // 6] = False
        avalid[: size // 8, :] = False
        after[:, ~avalid] = 0
    if pert == "patch":
        side = int(math.sqrt(0.2) * size)
        pr, pc = size // 5, size // 3
        donor = np.rot90(data, 2, axes=(1, 2))
        after[:, pr : pr + side, pc : pc + side] = donor[:, r0 + pr : r0 + pr + side, c0 + pc : c0 + pc + side]
        exclude = np.zeros((size, size), bool)
        exclude[pr : pr + side, pc : pc + side] = True
    apath = write(tmp / f"{name}_after.tif", after, grid_t, case["crs"], valid=avalid)
    if pert == "crs":
        # The after image delivered in EPSG:4326 at a different pixel size.
        from rasterio.warp import Resampling, calculate_default_transform, reproject

        with rasterio.open(apath) as src:
            dst_t, w, h = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height,
                                                      *src.bounds, resolution=None)
            # 0.8 x the pixel size in degrees: finer than the before grid
            dst_t = rasterio.Affine(dst_t.a * 0.8, 0, dst_t.c, 0, dst_t.e * 0.8, dst_t.f)
            w, h = int(w / 0.8) + 1, int(h / 0.8) + 1
            arr = np.zeros((3, h, w), np.float32)
            for i in range(3):
                reproject(src.read(i + 1).astype(np.float32), arr[i], src_transform=src.transform, src_crs=src.crs,
                          dst_transform=dst_t, dst_crs="EPSG:4326", resampling=Resampling.cubic)
        cpath = tmp / f"{name}_after4326.tif"
        profile = {"driver": "GTiff", "width": w, "height": h, "count": 3, "dtype": "uint8", "crs": "EPSG:4326",
                   "transform": dst_t, "nodata": 0}
        with rasterio.open(cpath, "w", **profile) as dst:
            dst.write(np.clip(np.rint(arr), 1, 255).astype(np.uint8))
        apath = cpath
    return bpath, apath, grid, truth, exclude


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", nargs="?", default=os.environ.get("CHANGEDETECT_DATA"))
    ap.add_argument("--data", dest="data_opt", help="DATA_DIR, as an option (as in the other benchmarks)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-arosics", action="store_true")
    ap.add_argument("--only", choices=("cases", "joplin", "speed"),
                    help="run one part only (known-answer cases, the real Joplin pair, or the 4096² speed "
                         "case); writes coregistration_<part>.json/.md")
    args = ap.parse_args()
    args.data_dir = args.data_opt or args.data_dir
    if not args.data_dir:
        ap.error("DATA_DIR is required (or set CHANGEDETECT_DATA)")
    data_dir = Path(args.data_dir)
    use_arosics = HAVE_AROSICS and not args.no_arosics
    methods = ["changedetect", "skimage"] + (["arosics_global", "arosics_local"] if use_arosics else [])
    rng = np.random.default_rng(2841)
    results: list[dict[str, Any]] = []
    real: list[dict[str, Any]] = []
    harem = None
    with tempfile.TemporaryDirectory(prefix="cd-coreg-bench-") as tmpd:
        tmp = Path(tmpd)
        for case in build_cases(data_dir, args.quick) if args.only in (None, "cases") else []:
            bpath, apath, grid, truth, exclude = make_pair(case, tmp, rng)
            label = f"{case['scene']} {case['kind']} {case['param']:g} {case['perturb']}"
            row: dict[str, Any] = {"case": label, "scene": case["scene"], "kind": case["kind"],
                                   "param": case["param"], "perturb": case["perturb"], "methods": {}}
            for m in methods:
                if m == "changedetect":
                    res = run_ours(bpath, apath, grid)
                elif m == "skimage":
                    res = run_skimage(bpath, apath, grid)
                else:
                    res = run_arosics(bpath, apath, grid, m == "arosics_local", tmp)
                if res is None:
                    continue
                out, ok, rep, secs = res
                entry: dict[str, Any] = {"seconds": round(secs, 3), "reliable": rep.get("reliable")}
                if m == "changedetect":
                    entry.update({"model": rep.get("model"), "residual_rmse_px": rep.get("residual_rmse_px"),
                                  "tie_points": rep.get("tie_points"), "notes": rep.get("notes")})
                if "error" in rep:
                    entry["error"] = rep["error"]
                if truth is not None:
                    entry.update(residual(out, ok, truth, exclude))
                row["methods"][m] = entry
            results.append(row)
            print(label, {m: (e.get("median_px"), e.get("reliable"), e.get("model")) for m, e in row["methods"].items()},
                  flush=True)
        if args.only in (None, "joplin"):
            real = joplin_real(data_dir, methods, tmp)
        if args.only is None:
            harem = harem_sample(methods, tmp)
    speed = speed_test(use_arosics) if args.only in (None, "speed") else None
    summary = summarise(results, methods) if results else {}
    payload = {"cases": results, "joplin_real": real, "harem": harem, "speed": speed, "summary": summary,
               "arosics": "installed" if use_arosics else "not importable: skipped"}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "coregistration" if args.only is None else f"coregistration_{args.only}"
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(payload, methods))
    print(json.dumps(summary, indent=2))


def joplin_real(data_dir: Path, methods: list[str], tmp: Path) -> list[dict[str, Any]]:
    pre = data_dir / JOPLIN_PRE
    grid = io.raster_info(pre).grid
    ref, rvalid, _ = io.read_grid(pre)
    rows = []
    for post in JOPLIN_POSTS:
        apath = data_dir / post
        checks = load_checks(CHECKS, grid, Path(post).stem)
        row: dict[str, Any] = {"case": f"real Joplin pair, post {Path(post).stem}", "methods": {}}
        for m in methods:
            if m == "changedetect":
                res = run_ours(pre, apath, grid)
            elif m == "skimage":
                res = run_skimage(pre, apath, grid)
            else:
                res = run_arosics(pre, apath, grid, m == "arosics_local", tmp)
            if res is None:
                continue
            out, ok, rep, secs = res
            entry = {"seconds": round(secs, 3), "reliable": rep.get("reliable")}
            if m == "changedetect":
                entry.update({"model": rep.get("model"), "shift_px": rep.get("shift_px"),
                              "residual_rmse_px": rep.get("residual_rmse_px"), "tie_points": rep.get("tie_points"),
                              "notes": rep.get("notes")})
            entry.update(real_residual(out, ok & rvalid, ref, checks))
            row["methods"][m] = entry
        raw, rok, _, _ = io.warp_to_grid(apath, grid)
        row["methods"]["as delivered"] = real_residual(raw, rok & rvalid, ref, checks)
        rows.append(row)
        print(row["case"], {m: (_real_cell(e, "checks"), _real_cell(e, "stable"), _real_cell(e, "ensemble"),
                                _real_cell(e, "legacy")) for m, e in row["methods"].items()}, flush=True)
    return rows


def _real_cell(entry: dict[str, Any], measure: str) -> str:
    """One residual of the real pair as ``value (count)``."""
    if measure == "checks":
        e = entry.get("checks", {})
        return f"{_fmt(e.get('median_px'))} ({e.get('matched', 0)}/{e.get('checks', 0)})"
    if measure == "ensemble":
        e = entry.get("stable", {}).get("ensemble")
        if not e:
            return "-"
        se = math.hypot(e["se_dy"], e["se_dx"])
        return f"{_fmt(e['magnitude_px'])} ± {_fmt(se, 2)} ({e['windows']})"
    e = entry.get(measure, {})
    return f"{_fmt(e.get('median_px'))} ({e.get('windows', 0)})"


#: The shipped synthetic sample's known misregistration (imagery/harem/README.md), used
#: here only to score the result: the after content is displaced by (+3.6, -5.3) px.
HAREM_SHIFT = (3.6, -5.3)


def harem_sample(methods: list[str], tmp: Path) -> dict[str, Any] | None:
    """Estimated shift on the shipped Harem sample against its documented displacement."""
    root = Path(__file__).resolve().parents[1] / "imagery" / "harem"
    before, after = root / "before.tif", root / "after.tif"
    if not before.exists():
        return None
    grid = io.raster_info(before).grid
    out: dict[str, Any] = {"truth_px": list(HAREM_SHIFT), "methods": {}}
    for m in methods:
        if m == "changedetect":
            _, _, rep, secs = run_ours(before, after, grid)
            dy, dx = rep["shift_px"]["dy"], rep["shift_px"]["dx"]
            extra = {"model": rep.get("model"), "shadows_masked": rep["estimate"].get("shadows_masked")}
        elif m == "skimage":
            _, _, rep, secs = run_skimage(before, after, grid)
            dy, dx = rep["shift_px"]["dy"], rep["shift_px"]["dx"]
            extra = {}
        else:
            continue
        out["methods"][m] = {"dy": round(dy, 4), "dx": round(dx, 4), "seconds": round(secs, 2),
                             "error_px": round(math.hypot(dy - HAREM_SHIFT[0], dx - HAREM_SHIFT[1]), 4), **extra}
    print("harem", out, flush=True)
    return out


def speed_test(use_arosics: bool) -> dict[str, Any]:
    """A 4096 x 4096 pair (local model), changedetect vs AROSICS COREG_LOCAL."""
    from changedetect.coregister import register

    rng = np.random.default_rng(7)
    n = 4096
    base = ndi.gaussian_filter(rng.standard_normal((n + 64, n + 64)).astype(np.float32), 2.0)
    ref = base[32 : 32 + n, 32 : 32 + n]
    r, c = np.mgrid[0:n, 0:n].astype(np.float32)
    dy = 3.3 + 2.0 * np.sin(2 * np.pi * c / 3000.0)
    dx = -4.1 + 2.0 * np.cos(2 * np.pi * r / 3000.0)
    mov = ndi.map_coordinates(base, [r + 32 - dy, c + 32 - dx], order=1)
    del r, c, dy, dx
    t = time.perf_counter()
    reg = register(ref, mov, max_shift=64)
    ours = time.perf_counter() - t
    # Applying the model: one resampling of a 3-band uint8 file of the same size.
    with tempfile.TemporaryDirectory() as tmpd:
        tr = from_origin(500000, 4000000, 0.5, 0.5)
        path = Path(tmpd) / "after3.tif"
        band = np.clip(mov * 400 + 128, 0, 255).astype(np.uint8)
        with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=3, dtype="uint8",
                           crs="EPSG:32637", transform=tr, tiled=True) as dst:
            dst.write(np.stack([band] * 3))
        del band
        t = time.perf_counter()
        io.warp_with_model(path, Grid("EPSG:32637", tr, n, n), reg.model)
        apply_s = time.perf_counter() - t
    out: dict[str, Any] = {"pixels": f"{n} x {n}", "changedetect_estimate_seconds": round(ours, 2),
                           "changedetect_apply_seconds_3_bands": round(apply_s, 2),
                           "changedetect_seconds": round(ours + apply_s, 2),
                           "changedetect_model": reg.model.kind, "cores": os.cpu_count(),
                           "load_average_1min": round(os.getloadavg()[0], 2)}
    if use_arosics:
        with tempfile.TemporaryDirectory() as tmpd:
            tr = from_origin(500000, 4000000, 1.0, 1.0)
            p1 = Path(tmpd) / "ref.tif"
            p2 = Path(tmpd) / "mov.tif"
            for p, a in ((p1, ref), (p2, mov)):
                with rasterio.open(p, "w", driver="GTiff", width=n, height=n, count=1, dtype="float32",
                                   crs="EPSG:32615", transform=tr) as dst:
                    dst.write(a[None])
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cr = COREG_LOCAL(str(p1), str(p2), grid_res=256, window_size=(256, 256), max_shift=64,
                                 path_out=str(Path(tmpd) / "o.tif"), fmt_out="GTIFF", q=True, CPUs=2)
                cr.correct_shifts()
            ar = time.perf_counter() - t
        out["arosics_local_seconds"] = round(ar, 2)
        out["ratio_arosics_over_changedetect"] = round(ar / (ours + apply_s), 2)
    print(out, flush=True)
    return out


def summarise(results: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in methods:
        res, flagged, n_unrel, ok_cases, n_cases = [], 0, 0, 0, 0
        for row in results:
            e = row["methods"].get(m)
            if e is None:
                continue
            if row["kind"] == "unrelated":
                n_unrel += 1
                flagged += e.get("reliable") is False
                continue
            n_cases += 1
            v = e.get("median_px")
            v = float("inf") if v is None else v
            res.append(v)
            limit = 0.5 if row["kind"] in ("rotation", "local") else 0.2
            ok_cases += v < limit
        arr = np.array(res)
        out[m] = {
            "cases": n_cases,
            "median_residual_px": float(np.median(arr)) if arr.size else None,
            "share_under_limit": ok_cases / n_cases if n_cases else None,
            "unrelated_flagged": f"{flagged}/{n_unrel}",
        }
    return out


def real_markdown(rows: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """The tables of the real Joplin pair."""
    names = ["as delivered", *methods]
    lines = ["", "## Real Joplin pair (pre UTM 15N 0.6 m, post EPSG:4326 6e-6 deg)", "",
             "Residual (px) of each output against the pre tile, on the gradient magnitude (see the docstring): "
             "**checks**: median length over the check windows of `joplin_checks.geojson` (ground-level "
             "features unchanged between the dates; matched / listed); **stable**: median over the 64 px "
             "windows where the dates still correlate (windows kept); **ensemble**: length of the peak of the "
             "averaged correlation of all 64 px windows ± its bootstrap standard error (windows); "
             "**legacy**: the earlier measure, 128 px band-passed windows with peak correlation >= 0.3 "
             "(windows kept).", ""]
    for measure in ("checks", "stable", "ensemble", "legacy"):
        lines += [f"| {measure} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for row in rows:
            cells = [_real_cell(row["methods"].get(m, {}), measure) for m in names]
            lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| pair | changedetect model | shift at centre (dy, dx px) | reliable | held-out residual (px) "
              "| tie points used / measured | checks: median dy, dx as delivered -> changedetect |",
              "|---|---|---|---|---|---|---|"]
    for row in rows:
        ours = row["methods"].get("changedetect", {})
        raw = row["methods"].get("as delivered", {})
        sh = ours.get("shift_px") or {}
        tp = ours.get("tie_points") or {}
        c0, c1 = raw.get("checks", {}), ours.get("checks", {})
        lines.append(
            f"| {row['case']} | {ours.get('model')} | {_fmt(sh.get('dy'), 2)}, {_fmt(sh.get('dx'), 2)} "
            f"| {ours.get('reliable')} | {_fmt(ours.get('residual_rmse_px'), 2)} "
            f"| {tp.get('used')} / {tp.get('measured')} "
            f"| {_fmt(c0.get('median_dy'), 2)}, {_fmt(c0.get('median_dx'), 2)} -> "
            f"{_fmt(c1.get('median_dy'), 2)}, {_fmt(c1.get('median_dx'), 2)} |")
    return lines


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def markdown(payload: dict[str, Any], methods: list[str]) -> str:
    lines = ["# Co-registration benchmark", "",
             "Generated by `benchmarks/coregistration.py` (see its docstring for how cases and residuals are made).",
             f"AROSICS: {payload['arosics']}.", "",
             "Residual: median over 64 px windows of the phase-correlation offset of the output against the "
             "truth-aligned image (px); `unrel.` cases must be flagged unreliable (`False`).", "",
             ]
    if payload["cases"]:
        lines += ["## Summary", "",
                  "| method | cases | median residual (px) | share under limit (0.2 px; 0.5 px rotation/local) | no-shared-content flagged |",
                  "|---|---|---|---|---|"]
        for m, s in payload["summary"].items():
            lines.append(f"| {m} | {s['cases']} | {_fmt(s['median_residual_px'], 4)} | {_fmt(s['share_under_limit'], 3)} | {s['unrelated_flagged']} |")
        lines += ["", "## Cases", "", "| case | " + " | ".join(methods) + " | changedetect model |",
                  "|---|" + "---|" * (len(methods) + 1)]
    for row in payload["cases"]:
        cells = []
        for m in methods:
            e = row["methods"].get(m, {})
            if row["kind"] == "unrelated":
                cells.append(f"reliable={e.get('reliable')}")
            else:
                cells.append(_fmt(e.get("median_px")) + (" (err)" if "error" in e else ""))
        model = row["methods"].get("changedetect", {}).get("model")
        lines.append(f"| {row['case']} | " + " | ".join(cells) + f" | {model} |")
    if payload.get("joplin_real"):
        lines += real_markdown(payload["joplin_real"], methods)
    hm = payload.get("harem")
    if hm:
        lines += ["", "## Harem sample (synthetic 0.5 m urban pair, sun-dependent cast shadows)", "",
                  f"Documented displacement {hm['truth_px']} px.", "", "| method | dy | dx | error (px) |",
                  "|---|---|---|---|"]
        for m, e in hm["methods"].items():
            lines.append(f"| {m} | {e['dy']:.3f} | {e['dx']:.3f} | {e['error_px']:.3f} |")
    sp = payload["speed"]
    if sp:
        lines += ["", "## Speed (4096 x 4096, local model)", "", "```", json.dumps(sp, indent=2), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
