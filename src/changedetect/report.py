"""report.html: one self-contained page that explains a run to people who never open a GIS.

Everything the page shows comes in a :class:`ReportData` (assembled from the run's
files by :mod:`changedetect.publish`); this module only draws and writes HTML:
matplotlib figures (Agg, no pyplot state) embedded as base64 PNG, tables and plain
words. No external URL, font or script is referenced, and nothing depends on the
clock, so the same data gives a byte-identical page.
"""

from __future__ import annotations

import base64
import html
import io as _io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .styles import (
    AOI_COLOUR,
    DIFFERENCE_RANGE,
    SEVERITY_COLOURS,
    SEVERITY_LABELS,
    SEVERITY_OUTLINES,
    SITE_COLOUR,
    SSIM_RANGE,
    TIE_ACCEPTED_COLOUR,
    TIE_REJECTED_COLOUR,
    RampItem,
    difference_ramp,
    score_ramp,
    ssim_ramp,
)

__all__ = [
    "Chip", "Overview", "ReportData", "render_report", "sweep_counts", "sweep_from_counts", "sweep_figure",
    "sweep_table", "threshold_sweep",
]

#: At most this many rows in the damage polygon table (all are in damage.geojson).
MAX_POLYGON_ROWS = 40
DPI = 100


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Chip:
    """Image panels of one place: an area of interest or a reported site.

    Parameters
    ----------
    kind : {"aoi", "site"}
    name : str
    bounds : (left, bottom, right, top)
        Extent of every array, in the run's CRS.
    before, after : (rows, cols, 4) float ndarray or None
        Display RGBA in [0, 1] (alpha 0 where there is no data).
    difference, ssim, score : (rows, cols) float ndarray
        Change layers, NaN where not computed (outside the areas of interest).
    facts : list of (label, value)
        Shown in a small table beside the panels.
    """

    kind: str
    name: str
    bounds: tuple[float, float, float, float]
    before: np.ndarray | None
    after: np.ndarray | None
    difference: np.ndarray
    ssim: np.ndarray
    score: np.ndarray
    facts: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Overview:
    """Background of the damage map: a grey display image over ``bounds``."""

    bounds: tuple[float, float, float, float]
    image: np.ndarray | None


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows (see :func:`render_report`).

    Vectors are GeoDataFrames in the run's CRS (metres); ``sites`` and
    ``tie_points`` are None when the run has none.
    """

    name: str
    crs: str
    summary: dict[str, Any]
    coregistration: dict[str, Any]
    parameters: dict[str, Any]
    software: dict[str, str]
    inputs: list[dict[str, Any]]
    outputs: list[str]
    damage: Any
    aois: Any
    sites: Any | None
    tie_points: Any | None
    chips: list[Chip]
    overview: Overview
    sweep: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @cached_property
    def vectors(self) -> _Vectors:
        """The vectors prepared for drawing (computed once)."""
        return _Vectors.of(self)


# --------------------------------------------------------------------------- numbers
def threshold_sweep(score: np.ndarray, truth: np.ndarray, thresholds: Sequence[float]) -> dict[str, Any]:
    """Pixel precision, recall and F1 of ``score >= t`` against a truth mask, per threshold.

    Parameters
    ----------
    score : (rows, cols) float ndarray
        Change score; NaN pixels are left out.
    truth : (rows, cols) bool ndarray
        True inside reference damage.
    thresholds : sequence of float

    Returns
    -------
    dict
        ``thresholds``, ``precision``, ``recall``, ``f1`` (lists), ``truth_pixels``,
        ``pixels`` and the ``best`` threshold by F1 (``{"threshold", "f1"}``).
        Precision is 1 when nothing is flagged, recall is 1 when there is no truth.

    Examples
    --------
    >>> s = np.array([[0.1, 0.9], [0.8, 0.2]]); t = np.array([[False, True], [False, False]])
    >>> threshold_sweep(s, t, [0.5])["precision"]
    [0.5]
    """
    tp, fp, n_pos, n_neg = sweep_counts(score, truth, thresholds)
    return sweep_from_counts(thresholds, tp, fp, n_pos, n_neg)


def sweep_counts(
    score: np.ndarray, truth: np.ndarray, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pixels with ``score >= t`` inside (tp) and outside (fp) the truth, per threshold.

    Counts add up over parts of an image, so a sweep can be made strip by strip
    (:func:`sweep_from_counts` turns the sums into the sweep). NaN pixels are
    left out. Returns ``(tp, fp, truth_pixels, other_pixels)``.
    """
    if score.shape != truth.shape:
        raise ValueError(f"score and truth must have the same shape, got {score.shape} and {truth.shape}")
    ok = np.isfinite(score)
    pos = np.sort(score[ok & truth])
    neg = np.sort(score[ok & ~truth])
    ts = [float(t) for t in thresholds]
    tp = pos.size - np.searchsorted(pos, ts, side="left")
    fp = neg.size - np.searchsorted(neg, ts, side="left")
    return tp.astype(np.int64), fp.astype(np.int64), int(pos.size), int(neg.size)


def sweep_from_counts(
    thresholds: Sequence[float], tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int
) -> dict[str, Any]:
    """The sweep of :func:`threshold_sweep` from (summed) :func:`sweep_counts`."""
    ts = [float(t) for t in thresholds]
    tp, fp = np.asarray(tp), np.asarray(fp)
    fn = n_pos - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
        recall = np.where(n_pos > 0, tp / max(n_pos, 1), 1.0) * np.ones(len(ts))
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1)) if len(ts) else 0
    return {
        "thresholds": [round(t, 4) for t in ts],
        "precision": [round(float(v), 4) for v in precision],
        "recall": [round(float(v), 4) for v in recall],
        "f1": [round(float(v), 4) for v in f1],
        "truth_pixels": int(n_pos),
        "pixels": int(n_pos + n_neg),
        "false_negative_pixels_at_best": int(fn[best]) if len(ts) else 0,
        "best": {"threshold": round(ts[best], 4), "f1": round(float(f1[best]), 4)} if len(ts) else None,
    }


def sweep_table(sweep: dict[str, Any]) -> str:
    """The sweep as CSV text: threshold, precision, recall, f1 (one row per threshold)."""
    lines = ["threshold,precision,recall,f1"]
    for row in zip(sweep["thresholds"], sweep["precision"], sweep["recall"], sweep["f1"], strict=True):
        lines.append(",".join(f"{v:.4f}" for v in row))
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:,.{digits}f}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip() if unit else text


def _area(m2: Any) -> str:
    if m2 is None:
        return "n/a"
    m2 = float(m2)
    if m2 >= 1e5:
        return f"{m2 / 1e4:,.1f} ha"
    return f"{m2:,.0f} m²"


# --------------------------------------------------------------------------- figures
def _figure(width: float, height: float) -> Any:
    """A bare Agg figure (no pyplot state; axes are placed by hand, which is fast)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    fig.patch.set_facecolor("white")
    return fig


def _png(fig: Any) -> str:
    """Base64 PNG of a figure (no software/date metadata: deterministic)."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _cmap(items: Sequence[RampItem], name: str) -> Any:
    """A matplotlib colormap with the same stops (and transparency) as the QGIS style."""
    from matplotlib.colors import LinearSegmentedColormap, to_rgb

    lo, hi = items[0][0], items[-1][0]
    stops = [((v - lo) / (hi - lo), (*to_rgb(c), a / 255)) for v, c, a, _ in items]
    cmap = LinearSegmentedColormap.from_list(name, stops, N=512)
    return cmap.with_extremes(bad=(1, 1, 1, 0), under=stops[0][1], over=stops[-1][1])


@dataclass(frozen=True)
class _Rings:
    """Rings of polygons as coordinate arrays with their bounding boxes, for fast drawing."""

    rings: list[np.ndarray]
    exteriors: list[np.ndarray]
    boxes: np.ndarray  # (n, 4) left, bottom, right, top of each ring
    ext_boxes: np.ndarray

    @classmethod
    def of(cls, geoms: Any) -> _Rings:
        rings, exteriors = [], []
        for g in geoms:
            for poly in getattr(g, "geoms", [g]):
                if poly.is_empty or not hasattr(poly, "exterior"):
                    continue
                ext = np.asarray(poly.exterior.coords)[:, :2]
                exteriors.append(ext)
                rings.append(ext)
                rings.extend(np.asarray(r.coords)[:, :2] for r in poly.interiors)

        def boxes(rs: list[np.ndarray]) -> np.ndarray:
            if not rs:
                return np.zeros((0, 4))
            return np.array([[r[:, 0].min(), r[:, 1].min(), r[:, 0].max(), r[:, 1].max()] for r in rs])

        return cls(rings, exteriors, boxes(rings), boxes(exteriors))

    def within(self, bounds: Sequence[float], *, exterior: bool = False) -> list[np.ndarray]:
        rs, bx = (self.exteriors, self.ext_boxes) if exterior else (self.rings, self.boxes)
        if not rs:
            return []
        left, bottom, right, top = bounds
        keep = (bx[:, 0] <= right) & (bx[:, 2] >= left) & (bx[:, 1] <= top) & (bx[:, 3] >= bottom)
        return [r for r, k in zip(rs, keep, strict=True) if k]


@dataclass(frozen=True)
class _Vectors:
    """The report's vectors prepared once for every map: damage by severity, AOIs, sites."""

    damage: dict[str, _Rings]
    aois: _Rings
    sites: list[tuple[float, float, float, str]]

    @classmethod
    def of(cls, data: ReportData) -> _Vectors:
        damage = {}
        if data.damage is not None and len(data.damage):
            for sev in SEVERITY_COLOURS:
                damage[sev] = _Rings.of(data.damage.geometry[data.damage["severity"] == sev])
        sites = []
        if data.sites is not None:
            sites = [(float(g.x), float(g.y), float(r), str(n))
                     for g, r, n in zip(data.sites.geometry, data.sites["uncertainty_m"], data.sites["name"], strict=True)]
        return cls(damage, _Rings.of(data.aois.geometry), sites)


def _draw_vectors(ax: Any, data: ReportData, bounds: Sequence[float], *, fill: bool = False,
                  site_labels: bool = False, lw: float = 1.3, outline: str | None = None) -> None:
    """Damage (by severity, or all in ``outline`` colour), AOIs and sites on a map axes."""
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.patches import Circle

    vec = data.vectors
    for sev, rings in vec.damage.items():
        lines = rings.within(bounds)
        if not lines:
            continue
        if fill:
            polys = rings.within(bounds, exterior=True)
            ax.add_collection(PolyCollection(polys, facecolors=SEVERITY_COLOURS[sev], edgecolors="none", alpha=0.75, zorder=3))
        colour = outline or (SEVERITY_OUTLINES[sev] if fill else SEVERITY_COLOURS[sev])
        ax.add_collection(LineCollection(lines, colors=colour, linewidths=lw * (0.6 if fill else 1), zorder=4))
    ax.add_collection(LineCollection(vec.aois.within(bounds), colors=AOI_COLOUR, linewidths=1.2, linestyles=(0, (5, 3)), zorder=5))
    left, bottom, right, top = bounds
    for x, y, r, name in vec.sites:
        if x + r < left or x - r > right or y + r < bottom or y - r > top:
            continue
        ax.add_patch(Circle((x, y), r, fill=False, ec=SITE_COLOUR, lw=1.3, ls=(0, (4, 3)), zorder=6))
        ax.plot([x], [y], marker="*", ms=13, mfc=SITE_COLOUR, mec="white", mew=0.8, zorder=7)
        if site_labels:
            ax.annotate(name, (x, y), xytext=(8, 8), textcoords="offset points", fontsize=8.5,
                        color="#5c0032", weight="bold", zorder=8,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})


def _nice_length(span: float) -> float:
    target = span / 5
    if target <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(target))
    return next((m * mag for m in (5, 2, 1) if m * mag <= target), mag)


def _scalebar(ax: Any, bounds: Sequence[float], *, north: bool = False) -> None:
    """A scale bar (lower left, on a white box) and optionally a north arrow (upper right)."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    left, bottom, right, top = bounds
    w, h = right - left, top - bottom
    length = _nice_length(w)
    label = f"{length:g} m" if length < 1000 else f"{length / 1000:g} km"
    bar = AnchoredSizeBar(ax.transData, length, label, loc="lower left", pad=0.3, borderpad=0.5, sep=3,
                          frameon=True, size_vertical=h / 150, color="black", fontproperties=FontProperties(size=8))
    bar.patch.set_alpha(0.8)
    bar.patch.set_edgecolor("none")
    bar.set_zorder(9)
    ax.add_artist(bar)
    if north:
        xn, yn = right - 0.05 * w, top - 0.14 * h
        ax.annotate("N", xy=(xn, yn + 0.09 * h), xytext=(xn, yn), ha="center", va="center", fontsize=10, weight="bold",
                    arrowprops={"arrowstyle": "-|>", "color": "black", "lw": 1.5}, zorder=9,
                    bbox={"boxstyle": "circle,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})


def _setup_axes(ax: Any, bounds: Sequence[float], title: str | None = None) -> None:
    left, bottom, right, top = bounds
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#999999")
    if title:
        ax.set_title(title, fontsize=10)


def _extent(bounds: Sequence[float]) -> tuple[float, float, float, float]:
    left, bottom, right, top = bounds
    return (left, right, bottom, top)


def chip_figure(chip: Chip, data: ReportData, threshold: float | None) -> str:
    """Five panels (before, after, difference, SSIM, score) with the vectors on each."""
    left, bottom, right, top = chip.bounds
    aspect = min(max((top - bottom) / max(right - left, 1e-9), 0.5), 1.6)
    pw, gap, title_h, bar_h, margin = 2.6, 0.12, 0.32, 0.55, 0.08
    ph = pw * aspect
    width = 5 * pw + 4 * gap + 2 * margin
    height = ph + title_h + bar_h + margin
    fig = _figure(width, height)
    axes = []
    for i in range(5):
        x0 = (margin + i * (pw + gap)) / width
        axes.append(fig.add_axes((x0, bar_h / height, pw / width, ph / height)))
    titles = ["Before", "After (co-registered)", "Colour difference", "Structural similarity (SSIM)", "Change score"]
    for ax, image, title in zip(axes[:2], (chip.before, chip.after), titles[:2], strict=True):
        if image is not None:
            ax.imshow(image, extent=_extent(chip.bounds), interpolation="antialiased", zorder=1)
        else:
            ax.text(0.5, 0.5, "image not available", transform=ax.transAxes, ha="center", va="center", color="#777777")
        _setup_axes(ax, chip.bounds, title)
    layers = [
        (chip.difference, difference_ramp(), DIFFERENCE_RANGE, "difference", "0 = same colour"),
        (chip.ssim, ssim_ramp(), SSIM_RANGE, "ssim", "red = structure lost"),
        (chip.score, score_ramp(threshold), (0.0, 1.0), "score",
         f"flagged from {threshold:.2f}" if threshold is not None else ""),
    ]
    for i, (ax, (arr, ramp, (vmin, vmax), name, hint), title) in enumerate(zip(axes[2:], layers, titles[2:], strict=True)):
        im = ax.imshow(np.ma.masked_invalid(arr), extent=_extent(chip.bounds), cmap=_cmap(ramp, name), vmin=vmin, vmax=vmax,
                       interpolation="nearest", zorder=1)
        _setup_axes(ax, chip.bounds, title)
        ax.set_facecolor("#f2f2f2")
        x0 = (margin + (i + 2) * (pw + gap) + 0.1 * pw) / width
        cax = fig.add_axes((x0, 0.36 / height, 0.8 * pw / width, 0.09 / height))
        cb = fig.colorbar(im, cax=cax, orientation="horizontal")
        cb.ax.tick_params(labelsize=7, length=2, pad=1)
        cb.set_ticks([vmin, (vmin + vmax) / 2, vmax])
        cax.set_title(hint, fontsize=7, pad=2)
    # severity colours on the imagery; one contrasting colour on the change layers.
    for ax, outline in zip(axes, (None, None, "#ffffff", "#000000", "#000000"), strict=True):
        _draw_vectors(ax, data, chip.bounds, lw=1.0, outline=outline)
    _scalebar(axes[0], chip.bounds)
    return _png(fig)


def overview_figure(data: ReportData) -> str:
    """All damage polygons by severity over a faded grey image, AOIs and sites."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ov = data.overview
    left, bottom, right, top = ov.bounds
    aspect = min(max((top - bottom) / max(right - left, 1e-9), 0.4), 1.4)
    width, legend_h = 9.0, 0.7
    height = width * aspect + legend_h
    fig = _figure(width, height)
    ax = fig.add_axes((0.005, legend_h / height, 0.99, (height - legend_h - 0.05) / height))
    if ov.image is not None:
        ax.imshow(ov.image, extent=_extent(ov.bounds), cmap="gray", vmin=0, vmax=1, alpha=0.55, interpolation="antialiased", zorder=1)
    _setup_axes(ax, ov.bounds)
    _draw_vectors(ax, data, ov.bounds, fill=True, site_labels=True)
    _scalebar(ax, ov.bounds, north=True)
    counts = data.damage["severity"].value_counts().to_dict() if len(data.damage) else {}
    handles: list[Any] = [Patch(fc=SEVERITY_COLOURS[s], ec=SEVERITY_OUTLINES[s], label=f"{SEVERITY_LABELS[s]} ({counts.get(s, 0)})")
                          for s in SEVERITY_COLOURS]
    handles.append(Line2D([], [], color=AOI_COLOUR, ls=(0, (5, 3)), lw=1.5, label="Area of interest"))
    if data.sites is not None and len(data.sites):
        handles.append(Line2D([], [], color=SITE_COLOUR, marker="*", ms=12, ls=(0, (4, 3)), lw=1.2,
                              mec="white", label="Reported site and its uncertainty"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return _png(fig)


def sweep_figure(sweep: dict[str, Any], threshold: float | None) -> str:
    """Precision, recall and F1 against the score threshold."""
    fig = _figure(8, 4.2)
    ax = fig.add_axes((0.08, 0.13, 0.9, 0.83))
    t = sweep["thresholds"]
    ax.plot(t, sweep["precision"], color="#1a5fb4", lw=2, label="precision (flagged pixels that are damage)")
    ax.plot(t, sweep["recall"], color="#e66100", lw=2, label="recall (damage pixels that are flagged)")
    ax.plot(t, sweep["f1"], color="#000000", lw=2.2, label="F1 (balance of the two)")
    if threshold is not None:
        ax.axvline(threshold, color="#a50f15", ls="--", lw=1.5, label=f"threshold used: {threshold:.2f}")
    best = sweep.get("best")
    if best:
        ax.plot([best["threshold"]], [best["f1"]], "o", color="#000000", ms=7,
                label=f"best F1 {best['f1']:.2f} at {best['threshold']:.2f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("score threshold")
    ax.set_ylabel("pixel fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def tie_points_figure(data: ReportData) -> str:
    """Tie-point shift arrows on the map, and how far each point lies from the fitted model.

    The residuals are the ``residual_px`` column (distance from the model that
    was applied, so rotations and local distortions do not look like errors);
    without it, the 2-D residuals from the shift at the centre.
    """
    tp = data.tie_points
    if tp is None:
        raise ValueError("the report data has no tie points")
    shift = data.coregistration.get("shift_px") or {"dy": 0.0, "dx": 0.0}
    gdy, gdx = float(shift.get("dy", 0.0)), float(shift.get("dx", 0.0))
    dy = tp["dy_px"].astype(float).to_numpy()
    dx = tp["dx_px"].astype(float).to_numpy()
    acc = _accepted(tp)
    x = tp.geometry.x.to_numpy()
    y = tp.geometry.y.to_numpy()
    fig = _figure(12, 5.2)
    ax1 = fig.add_axes((0.01, 0.04, 0.55, 0.88))
    ax2 = fig.add_axes((0.64, 0.12, 0.34, 0.8))
    for sel, colour, label in ((acc, TIE_ACCEPTED_COLOUR, "accepted"), (~acc, TIE_REJECTED_COLOUR, "rejected")):
        if sel.any():
            ax1.quiver(x[sel], y[sel], dx[sel], -dy[sel], color=colour, angles="xy", scale_units="inches",
                       scale=max(float(np.hypot(dx, dy).max()), 1e-6) / 0.5, width=0.004, label=f"{label} ({int(sel.sum())})")
    from matplotlib.collections import LineCollection

    ax1.add_collection(LineCollection(data.vectors.aois.rings, colors=AOI_COLOUR, linewidths=1.0, linestyles=(0, (5, 3))))
    ax1.set_aspect("equal")
    ax1.set_xticks([])
    ax1.set_yticks([])
    ax1.set_title("Shift found at each tie point (arrows, not to map scale)", fontsize=10)
    ax1.legend(fontsize=8, loc="best")
    resid = tp["residual_px"].astype(float).to_numpy() if "residual_px" in tp.columns else None
    if resid is not None and np.isfinite(resid).any():
        # How far each tie point lies from the model that was applied (translation,
        # affine or field): the misalignment left where the point was measured.
        finite = np.isfinite(resid)
        top = max(1.5, float(np.nanpercentile(resid[finite], 98)) * 1.1)
        bins = np.linspace(0, top, 31)
        for sel, colour, label in ((acc, TIE_ACCEPTED_COLOUR, "accepted"), (~acc, TIE_REJECTED_COLOUR, "rejected")):
            vals = np.clip(resid[sel & finite], 0, top)
            if vals.size:
                ax2.hist(vals, bins=bins, color=colour, alpha=0.75, label=f"{label} ({vals.size})")
        for r in (0.5, 1.0):
            ax2.axvline(r, color="#999999", lw=0.8, ls="--")
        ax2.set_xlabel("distance from the fitted model, px")
        ax2.set_ylabel("tie points")
        ax2.set_title(f"Residuals from the {data.coregistration.get('model', 'fitted')} model "
                      "(dashed: 0.5 and 1 px)", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        return _png(fig)
    rdx, rdy = dx - gdx, dy - gdy
    for sel, colour in ((acc, TIE_ACCEPTED_COLOUR), (~acc, TIE_REJECTED_COLOUR)):
        ax2.scatter(rdx[sel], rdy[sel], s=22, color=colour, alpha=0.85, edgecolors="none")
    lim = max(1.0, float(np.nanmax(np.abs(np.concatenate([rdx, rdy])))) * 1.15) if len(rdx) else 1.0
    for r in (0.5, 1.0):
        ax2.add_patch(_circle(r))
    ax2.axhline(0, color="#999999", lw=0.8)
    ax2.axvline(0, color="#999999", lw=0.8)
    ax2.set_xlim(-lim, lim)
    ax2.set_ylim(lim, -lim)
    ax2.set_aspect("equal")
    ax2.set_xlabel("residual east-west, px (columns)")
    ax2.set_ylabel("residual north-south, px (rows, down = south)")
    ax2.set_title("Residuals from the global shift (circles: 0.5 and 1 px)", fontsize=10)
    ax2.grid(alpha=0.3)
    return _png(fig)


def _circle(r: float) -> Any:
    from matplotlib.patches import Circle

    return Circle((0, 0), r, fill=False, ec="#777777", ls=":", lw=1)


def _accepted(tp: Any) -> np.ndarray:
    if "accepted" not in tp.columns:
        return np.ones(len(tp), bool)
    vals = tp["accepted"]
    return np.array([bool(v) and str(v).strip().lower() not in ("false", "0", "no") for v in vals], dtype=bool)


# --------------------------------------------------------------------------- HTML
CSS = """
:root { --ink:#1d2329; --muted:#5b6670; --line:#d9dee3; --soft:#f5f7f9; --accent:#a50f15; }
* { box-sizing: border-box; }
body { margin:0; background:#eef1f4; color:var(--ink);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; background: white; padding: 28px 40px 48px;
  box-shadow: 0 0 24px rgba(0,0,0,.06); }
header h1 { font-size: 28px; margin: 0 0 4px; letter-spacing: -.01em; }
header .sub { color: var(--muted); margin: 0 0 18px; }
h2 { font-size: 21px; margin: 36px 0 10px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 17px; margin: 24px 0 8px; }
p { margin: 8px 0; max-width: 80ch; }
.caveat { border-left: 5px solid #e0a100; background: #fff8e1; padding: 10px 16px; margin: 14px 0; }
.warn { border-left: 5px solid var(--accent); background: #fdecea; padding: 10px 16px; margin: 14px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { flex: 1 1 110px; background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .v { font-size: 22px; font-weight: 650; white-space: nowrap; }
.card .k { color: var(--muted); font-size: 13px; }
.sev { display:inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
nav { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 8px 16px; }
nav ol { margin: 4px 0; padding-left: 22px; columns: 2; }
nav a { color: #1a5fb4; text-decoration: none; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 12px 5px 0; text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
table.kv th { width: 330px; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
.mono { word-break: break-all; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; max-width: 100ch; }
.chip { margin: 18px 0 30px; }
.verdict-found { color: #a50f15; font-weight: 600; }
.verdict-not { color: #1a5fb4; font-weight: 600; }
footer { color: var(--muted); font-size: 13px; margin-top: 40px; border-top: 1px solid var(--line); padding-top: 10px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = (), cls: str = "") -> str:
    num = set(numeric)
    head = "".join(f'<th class="n">{_e(h)}</th>' if i in num else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    cls_attr = f' class="{cls}"' if cls else ""
    return f"<table{cls_attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _img(b64: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _sev_badge(sev: str) -> str:
    colour = SEVERITY_COLOURS.get(sev, "#999999")
    return f'<span class="sev" style="background:{colour}"></span>{_e(sev)}'


def _verdict(text: str) -> str:
    cls = "verdict-found" if text == "damage found" else "verdict-not"
    return f'<span class="{cls}">{_e(text)}</span>'


def _threshold(summary: dict[str, Any]) -> float | None:
    value = (summary.get("threshold") or {}).get("value")
    return float(value) if value is not None else None


def _section_glance(data: ReportData) -> str:
    s = data.summary
    by_sev = dict.fromkeys(SEVERITY_COLOURS, 0)
    for a in (s.get("aois") or {}).values():
        for k, v in (a.get("polygons_by_severity") or {}).items():
            by_sev[k] = by_sev.get(k, 0) + int(v)
    co = s.get("coregistration") or {}
    cards = [
        (_fmt(s.get("polygon_count", len(data.damage))), "damage polygons"),
        (_area(s.get("damaged_area_m2")), "damaged area"),
    ]
    cards += [(_fmt(by_sev.get(k, 0)), f'<span class="sev" style="background:{SEVERITY_COLOURS[k]}"></span>{_e(SEVERITY_LABELS[k].lower())}')
              for k in SEVERITY_COLOURS]
    reliable = co.get("reliable")
    cards.append(("yes" if reliable else ("not checked" if reliable is None else "NO"), "images aligned reliably"))
    html_cards = "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>' for v, k in cards)
    out = [f'<div class="cards">{html_cards}</div>']
    sites = s.get("sites") or []
    if sites:
        items = "".join(f"<li><b>{_e(x['name'])}</b>: {_verdict(x['verdict'])}</li>" for x in sites)
        out.append(f"<p>Reported sites:</p><ul>{items}</ul>")
    if reliable is False:
        out.append('<div class="warn"><b>Co-registration could not be confirmed.</b> The before and after images may be '
                   "misaligned; part of the change shown may come from misalignment. See "
                   '<a href="#coregistration">Image alignment</a>.</div>')
    return "".join(out)


def _section_aois(data: ReportData, threshold: float | None) -> str:
    s = data.summary.get("aois") or {}
    rows = []
    for name in data.aois["name"]:
        a = s.get(name, {})
        sev = a.get("polygons_by_severity") or {}
        rows.append([
            _e(name), _area(a.get("area_m2")), _area(a.get("analysed_area_m2")), _area(a.get("damaged_area_m2")),
            _fmt(a.get("damaged_percent"), 1, "%"), _fmt(a.get("polygon_count")),
            " · ".join(f"{_fmt(sev.get(k, 0))} {k}" for k in SEVERITY_COLOURS), _fmt(a.get("mean_ssim"), 3),
        ])
    out = [_table(["area of interest", "area", "analysed", "damaged", "damaged share", "polygons", "by severity", "mean SSIM"],
                  rows, numeric=(1, 2, 3, 4, 5, 7))]
    out.append(_panels_help(threshold))
    for chip in (c for c in data.chips if c.kind == "aoi"):
        out.append(_chip_html(chip, data, threshold))
    return "".join(out)


def _panels_help(threshold: float | None) -> str:
    t = f"{threshold:.2f}" if threshold is not None else "the threshold"
    return (
        "<p>Each row of panels shows the same place: the <b>before</b> and <b>after</b> images (the after image moved onto "
        "the before image's pixels), the <b>colour difference</b> between them (dark = same colour, bright = very "
        "different), the <b>structural similarity</b> (blue = the pattern of roofs and streets is unchanged, red = it was "
        f"lost), and the <b>change score</b> that combines both (grey below {t}, yellow to dark red where flagged as "
        "change). Damage outlines are drawn in their severity colour on the images and in black or white on the change "
        "layers; areas of interest are dashed in blue, reported sites shown as a star with their uncertainty circle.</p>"
    )


def _chip_html(chip: Chip, data: ReportData, threshold: float | None) -> str:
    label = "Area of interest" if chip.kind == "aoi" else "Reported site"
    facts = _kv(chip.facts) if chip.facts else ""
    return (f'<div class="chip"><h3>{label}: {_e(chip.name)}</h3>{facts}'
            f"{_img(chip_figure(chip, data, threshold), f'{label} {chip.name}')}</div>")


def _section_sites(data: ReportData, threshold: float | None) -> str:
    sites = data.summary.get("sites") or []
    rows = []
    for x in sites:
        near = x.get("nearest_polygon_id")
        rows.append([
            _e(x["name"]), _verdict(x["verdict"]), _fmt(x.get("inside_damage")),
            _fmt(x.get("distance_m"), 1, "m"), _fmt(x.get("uncertainty_m"), 0, "m"),
            _area(x.get("damaged_area_within_radius_m2")),
            f"#{near} ({_e(x.get('nearest_severity', ''))})" if near is not None else "none",
        ])
    out = [
        "<p>Each reported location is checked against the damage map: <i>damage found</i> means that damage polygons lie "
        "within the location's uncertainty radius.</p>",
        _table(["site", "verdict", "inside a polygon", "distance to nearest polygon", "uncertainty radius",
                "damage within radius", "nearest polygon"], rows, numeric=(3, 4, 5)),
    ]
    out += [_chip_html(c, data, threshold) for c in data.chips if c.kind == "site"]
    return "".join(out)


def _section_polygons(data: ReportData) -> str:
    d = data.damage
    if len(d) == 0:
        return "<p>No damage polygon was found.</p>"
    order = {s: i for i, s in enumerate(SEVERITY_COLOURS)}
    rows_df = d.assign(_o=d["severity"].map(order).fillna(9)).sort_values(["_o", "area_m2", "id"], ascending=[True, False, True])
    rows = [
        [_fmt(int(r["id"])), _e(r["aoi"]), _sev_badge(str(r["severity"])), _fmt(float(r["confidence"]), 2),
         _area(float(r["area_m2"])), _fmt(float(r["score"]), 2), _fmt(float(r["mean_ssim"]), 2),
         _fmt(float(r["structure_loss_fraction"]), 2)]
        for _, r in rows_df.head(MAX_POLYGON_ROWS).iterrows()
    ]
    more = ""
    if len(d) > MAX_POLYGON_ROWS:
        more = f"<p>The {MAX_POLYGON_ROWS} most severe and largest of {len(d)} polygons are listed; all are in <code>damage.geojson</code>.</p>"
    return (
        "<p>Severity follows the UNOSAT convention from the share of the polygon whose structure was lost "
        "(destroyed ≥ 60 %, severe ≥ 40 %, moderate ≥ 20 %, otherwise possible). Confidence (0–1) combines how far "
        "the score is above the threshold, the structure loss and whether the images were aligned reliably.</p>"
        + _table(["id", "area of interest", "severity", "confidence", "area", "mean score", "mean SSIM", "structure lost"],
                 rows, numeric=(0, 3, 4, 5, 6, 7))
        + more
    )


def _section_accuracy(data: ReportData, threshold: float | None) -> str:
    ev = data.summary.get("evaluation")
    out = []
    if ev:
        out.append("<p>The damage polygons were compared with the reference (truth) polygons given for this run, by exact area:</p>")
        rows = [
            ("precision (share of mapped damage that is real)", _fmt(ev.get("precision"), 3)),
            ("recall (share of real damage that was mapped)", _fmt(ev.get("recall"), 3)),
            ("F1 (balance of the two)", _fmt(ev.get("f1"), 3)),
            ("IoU (overlap / union)", _fmt(ev.get("iou"), 3)),
            ("correctly mapped area", _area(ev.get("tp_m2"))),
            ("mapped but not in the reference", _area(ev.get("fp_m2"))),
            ("in the reference but not mapped", _area(ev.get("fn_m2"))),
        ]
        obj = ev.get("objects") or {}
        if obj:
            rows.append((f"reference objects found (≥ {100 * float(obj.get('min_cover', 0.3)):.0f} % covered)",
                         f"{_fmt(obj.get('found'))} of {_fmt(obj.get('total'))}"))
            for cls, v in (obj.get("by_class") or {}).items():
                rows.append((f"  {cls}", f"{_fmt(v.get('found'))} of {_fmt(v.get('total'))}"))
        out.append(_kv(rows))
    if data.sweep:
        sw = data.sweep
        best = sw.get("best") or {}
        out.append(
            "<h3>Threshold sweep</h3><p>How the choice of threshold trades false alarms against missed damage: every "
            "score pixel at or above the threshold counts as damage and is compared with the reference, pixel by "
            f"pixel ({_fmt(sw['pixels'])} pixels inside the areas of interest, {_fmt(sw['truth_pixels'])} of them "
            "reference damage). This uses the raw score, before the clean-up and grading that make the polygons, "
            "so it differs slightly from the polygon figures above.</p>"
        )
        out.append(_img(sweep_figure(sw, threshold), "threshold sweep",
                        f"Threshold used {threshold:.2f}; best pixel F1 {best.get('f1', 0):.2f} at {best.get('threshold', 0):.2f}."
                        if threshold is not None and best else ""))
    return "".join(out)


def _offset_text(px: dict[str, Any], m: dict[str, Any]) -> str:
    """``"3.90 px (1.95 m) south, 5.38 px (2.69 m) west"`` from shift_px / shift_m."""
    if not px:
        return "n/a"
    dy, dx = float(px.get("dy", 0.0)), float(px.get("dx", 0.0))
    north, east = m.get("north"), m.get("east")
    ns = f"{abs(dy):.2f} px" + (f" ({abs(float(north)):.2f} m)" if north is not None else "") + (" south" if dy >= 0 else " north")
    ew = f"{abs(dx):.2f} px" + (f" ({abs(float(east)):.2f} m)" if east is not None else "") + (" east" if dx >= 0 else " west")
    return f"{ns}, {ew}"


def _section_coregistration(data: ReportData) -> str:
    c = data.coregistration
    est = c.get("estimate") or {}
    sh = c.get("shift_px") or {}
    sm = c.get("shift_m") or {}
    reliable = c.get("reliable")
    rows = [
        ("method", _e(c.get("method", "n/a"))),
        ("offset of the after image (corrected)", _offset_text(sh, sm)),
        ("shift magnitude", _fmt(c.get("shift_magnitude_px"), 2, "px")),
        ("reliable", "yes" if reliable else ("not checked (co-registration disabled)" if reliable is None else "<b>NO</b>")),
        ("similarity (SSIM) before correction", _fmt(c.get("ssim_before_correction"), 3)),
        ("similarity (SSIM) after correction", _fmt(c.get("ssim_after_correction"), 3)),
    ]
    if est:
        if "peak_ratio" in est:
            rows.append(("correlation peak ratio (higher = clearer match)", _fmt(est.get("peak_ratio"), 2)))
        if "n_inliers" in est:
            rows.append(("tie areas agreeing / disagreeing", f"{_fmt(est.get('n_inliers'))} / {_fmt(est.get('n_outliers'))}"))
        if "rmse" in est:
            rows.append(("spread of the tie-area shifts (RMSE)", _fmt(est.get("rmse"), 3, "px")))
    out = [
        "<p>The after image was moved onto the before image's pixel grid before comparing them. A good alignment makes "
        "the two images more similar (SSIM rises after correction); misalignment would make unchanged buildings look "
        "changed along their edges.</p>",
        _kv(rows),
    ]
    tp = data.tie_points
    if tp is not None and len(tp):
        acc = _accepted(tp)
        if "residual_px" in tp.columns and np.isfinite(tp["residual_px"].astype(float).to_numpy()).any():
            # distance from the model that was applied (what the alignment left)
            res = tp["residual_px"].astype(float).to_numpy()
        else:
            gdy, gdx = float(sh.get("dy", 0.0)), float(sh.get("dx", 0.0))
            res = np.hypot(tp["dy_px"].astype(float).to_numpy() - gdy, tp["dx_px"].astype(float).to_numpy() - gdx)
        ra = res[acc & np.isfinite(res)]
        out.append(_kv([
            ("tie points", f"{_fmt(len(tp))} ({_fmt(int(acc.sum()))} accepted, {_fmt(int((~acc).sum()))} rejected)"),
            ("residual of accepted tie points (RMS)", _fmt(float(np.sqrt(np.mean(ra**2))) if ra.size else None, 3, "px")),
            ("largest residual of an accepted tie point", _fmt(float(ra.max()) if ra.size else None, 3, "px")),
        ]))
        out.append(_img(tie_points_figure(data), "tie points",
                        "Left: the shift measured at each tie point (arrow direction and relative length). Right: how far "
                        "each tie point lies from the model that was applied (translation, affine or smooth field); "
                        "accepted points below half a pixel mean a consistent alignment."))
    return "".join(out)


def _section_method(data: ReportData, threshold: float | None) -> str:
    p = data.parameters or {}
    ch = p.get("change") or {}
    dm = p.get("damage") or {}
    rad = (p.get("radiometry") or {}).get("method", "histogram")
    th = data.summary.get("threshold") or {}
    if th.get("method") == "otsu":
        how = (f"chosen automatically from this scene's scores (Otsu's method gave {_fmt(th.get('otsu'), 3)}; "
               f"the floor is {_fmt(th.get('floor'), 2)})")
    else:
        how = "given in the configuration"
    t = f"{threshold:.2f}" if threshold is not None else "n/a"
    if data.coregistration.get("enabled", True) is False:
        align = ("Alignment was switched off for this run: the after image was only resampled onto the before "
                 "image's pixel grid, so any misregistration remains in the comparison.")
    else:
        align = ("The after image is matched to the before image by correlating their textures, coarse to fine, "
                 "on pixels with data in both (in many small tiles around stable structure where the scene allows); "
                 "the shift found is applied in a single resampling onto the before image's pixels, so every pixel "
                 "compares the same spot on the ground.")
    weight = ch.get("structure_weight")
    if weight is None or abs(float(weight) - 0.5) < 1e-9:
        mean = "The geometric mean of two pieces of evidence"
    else:
        mean = (f"The weighted geometric mean (structure loss weighs {float(weight):.2f}, colour change "
                f"{1 - float(weight):.2f}) of two pieces of evidence")
    score_text = (f"{mean}: a colour change that stands out from the scene's own no-change noise, and a loss of "
                  "local structure. Both are needed, so a shadow that moved or a roof that changed colour scores low. "
                  "The score is damped where either image shows green vegetation, whose texture changes with the "
                  "season.")
    coherence = float(ch.get("coherence_weight") or 0.0)
    if coherence > 0:
        score_text += (f" A third cue counts as loss of structure too ({coherence:.0%} of it): straight edges of "
                       "roofs, walls and kerbs broken into fragments pointing every way (loss of orientation "
                       "coherence).")
    if ch.get("shadow_relight"):
        shift = float(ch.get("shadow_max_shift_m") or 0.0)
        score_text += (" Cast shadows that moved with the sun between the dates (by at most "
                       f"{shift:g} m) are relit before the local patterns are compared, so that a moved shadow "
                       "does not count as lost structure; a shadow that vanished with what cast it still counts.")
    damping = float(ch.get("shadow_damping") or 0.0)
    if damping > 0:
        score_text += (f" Where a pixel lies in cast shadow on only one date (the sun moved), {damping:.0%} of its "
                       "score is removed.")
    items = [
        ("Alignment (co-registration).", align),
        ("Radiometric normalisation.", "Lighting, season and sensor make the same roof look different on two dates. "
         + ("It was switched off for this run: the images are compared as they are." if rad == "none" else
            f"The after image's colours are mapped onto the before image's ({rad} matching on pixels valid in both) so "
            "that remaining differences are more likely to be real change.")),
        ("Colour difference.", "For every pixel, how much its colour changed (root mean square over the bands, as a "
         "fraction of the image's range)."),
        ("Structural similarity (SSIM).", f"In a small window around every pixel (about {_fmt(ch.get('ssim_sigma_m'), 2)} m), "
         "whether the local pattern of edges and textures is the same on both dates. Rubble replacing a flat roof "
         "breaks the pattern; a repainted roof does not."),
        ("Change score.", score_text),
        ("Threshold.", f"Pixels scoring {t} or more are flagged as change; the threshold was {how}."),
        ("Clean-up.", f"Specks and thin lines are removed (opening of {_fmt(dm.get('open_radius_m'), 1)} m), nearby "
         f"fragments joined ({_fmt(dm.get('close_radius_m'), 1)} m), holes under {_fmt(dm.get('max_hole_m2'), 0)} m² filled "
         f"and objects under {_fmt(dm.get('min_area_m2'), 0)} m² dropped"
         + ("; each object's outline is then moved to where its own score falls to half its peak"
            if dm.get("refine_boundaries", True) else "")
         + (f"; each object is then grown into the connected pixels scoring at least "
            f"{float(dm.get('hysteresis', 1.0)):.0%} of the threshold." if float(dm.get("hysteresis", 1.0)) < 1
            else ".")
         + (" With building footprints, a building graded moderately damaged or worse on which a damage polygon "
            "lies joins the damage layer with its whole footprint: damage is assessed building by building."
            if data.summary.get("buildings") and dm.get("complete_buildings", True) else "")),
        ("Grading.", "Each polygon gets a UNOSAT-like severity from the share of its area with strong structure loss, and "
         "a confidence from its score margin, its structure loss and the alignment's reliability."),
    ]
    lis = "".join(f"<li><b>{_e(a)}</b> {_e(b)}</li>" for a, b in items)
    return f"<ol>{lis}</ol>"


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k in sorted(d):
        v = d[k]
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _section_provenance(data: ReportData) -> str:
    inputs = _table(
        ["input", "file", "SHA-256", "bytes"],
        [[_e(r["role"]), _e(r["file"]), f'<span class="mono">{_e(r["sha256"])}</span>', _fmt(int(r["bytes"]))] for r in data.inputs],
        numeric=(3,),
    )
    software = _table(["software", "version"], [[_e(k), _e(v)] for k, v in sorted(data.software.items())])
    params = _table(["parameter", "value"], [[f"<code>{_e(k)}</code>", _e(v)] for k, v in _flatten(data.parameters or {})])
    outputs = ", ".join(f"<code>{_e(n)}</code>" for n in data.outputs)
    return (
        "<p>Outputs are evidence: anyone with the same input files can check that they are the ones used here (by their "
        "SHA-256 fingerprints) and reproduce every output. The fingerprints of all output files, this report included, "
        "and the time of the run are recorded in <code>manifest.json</code>; <code>changedetect verify</code> checks them, "
        "and <code>changedetect verify --rerun</code> repeats the whole analysis and compares.</p>"
        f"<h3>Input files</h3>{inputs}<h3>Software</h3>{software}<h3>Parameters</h3>{params}"
        f"<h3>Files in the output folder</h3><p>{outputs}</p>"
    )


def render_report(data: ReportData) -> str:
    """The HTML text of report.html (deterministic for the same data)."""
    threshold = _threshold(data.summary)
    window = data.summary.get("date_window")
    caveat = (f'<div class="caveat"><b>Dates.</b> {_e(window)} Imagery shows the state of the ground on two dates; '
              "damage appearing between them is consistent with any event in that window, and is not proof of when it "
              "happened.</div>") if window else (
        '<div class="caveat"><b>Dates.</b> The image dates were not given for this run. Damage found between two images '
        "is consistent with any event between their acquisition dates; it is not proof of when it happened.</div>")
    sections: list[tuple[str, str, str]] = [
        ("map", "Damage map", _img(overview_figure(data), "damage map",
                                    "All damage polygons by severity over the after image (grey). Dashed blue: areas of "
                                    "interest analysed. Outside them nothing was analysed.")),
        ("aois", "Areas of interest", _section_aois(data, threshold)),
    ]
    if data.summary.get("sites"):
        sections.append(("sites", "Reported sites", _section_sites(data, threshold)))
    sections.append(("polygons", "Damage polygons", _section_polygons(data)))
    if data.summary.get("evaluation") or data.sweep:
        sections.append(("accuracy", "Accuracy against reference damage", _section_accuracy(data, threshold)))
    sections += [
        ("coregistration", "Image alignment", _section_coregistration(data)),
        ("method", "How this map was made", _section_method(data, threshold)),
        ("provenance", "Provenance", _section_provenance(data)),
    ]
    nav = "".join(f'<li><a href="#{sid}">{_e(title)}</a></li>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections)
    notes = "".join(f'<div class="warn">{_e(n)}</div>' for n in data.notes)
    version = data.software.get("changedetect", data.summary.get("changedetect_version", ""))
    title = f"Damage assessment: {data.name}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f'<header><h1>{_e(title)}</h1><p class="sub">Automatic change detection between a before and an after image '
        f"· changedetect {_e(version)}</p></header>"
        f"{caveat}{notes}{_section_glance(data)}<nav><b>Contents</b><ol>{nav}</ol></nav>{body}"
        "<footer>Made by changedetect from the files of this output folder. Open <code>project.qgs</code> in QGIS to "
        "inspect every layer; the layers are also in <code>layers.gpkg</code>.</footer>"
        "</main></body></html>\n"
    )
