"""quicklook.png: before | after (co-registered, normalised) | score with damage outlines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .grid import Grid

SEVERITY_COLOURS = {
    "destroyed": "#d7191c",
    "severe": "#fd8d3c",
    "moderate": "#fecc5c",
    "possible": "#74c1e8",
}


def _rgb(image: np.ndarray) -> np.ndarray:
    img = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    img = np.moveaxis(img, 0, -1).astype(np.float32)
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros(img.shape, np.float32)
    lo, hi = np.percentile(img[finite], [1, 99])
    return np.clip((np.nan_to_num(img) - lo) / max(hi - lo, 1e-6), 0, 1)


def _rings(geoms: Any) -> list[np.ndarray]:
    """Exterior rings of (multi)polygons as (n, 2) arrays."""
    rings = []
    for geom in geoms:
        for poly in getattr(geom, "geoms", [geom]):
            rings.append(np.asarray(poly.exterior.coords)[:, :2])
    return rings


def quicklook(
    path: str | Path,
    *,
    before: np.ndarray,
    after: np.ndarray,
    score: np.ndarray,
    threshold: float,
    grid: Grid,
    damage: Any,
    aois: Any,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Write a three-panel PNG; every panel in the grid's CRS coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    left, bottom, right, top = grid.bounds
    extent = (left, right, bottom, top)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), sharex=True, sharey=True, layout="constrained")
    axes[0].imshow(_rgb(before), extent=extent, interpolation="nearest")
    axes[0].set_title("before")
    axes[1].imshow(_rgb(after), extent=extent, interpolation="nearest")
    axes[1].set_title("after (co-registered, normalised)")
    im = axes[2].imshow(np.ma.masked_invalid(score), extent=extent, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    axes[2].set_title(f"change score, damage outlined (threshold {threshold:.2f})")
    fig.colorbar(im, ax=axes[2], shrink=0.8, label="score")
    aoi_rings = _rings(aois.geometry)
    sev_rings: dict[str, list] = {}
    for geom, sev in zip(damage.geometry, damage.get("severity", []), strict=False):
        sev_rings.setdefault(sev, []).extend(_rings([geom]))
    for ax in axes:
        ax.add_collection(LineCollection(aoi_rings, colors="#00e5ff", linewidths=1.0, linestyles="--"))
        for sev, rings in sev_rings.items():
            ax.add_collection(LineCollection(rings, colors=SEVERITY_COLOURS.get(sev, "white"), linewidths=1.2))
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(useOffset=False, style="plain")
    handles = [plt.Line2D([], [], color=c, lw=2, label=s) for s, c in SEVERITY_COLOURS.items()]
    handles.append(plt.Line2D([], [], color="#00e5ff", lw=1, ls="--", label="AOI"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return path
