"""Labelled rasters to polygons (rasterio.features.shapes) with per-object attributes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from affine import Affine

__all__ = ["polygonize_labels"]


def polygonize_labels(
    labels: np.ndarray,
    transform: Affine,
    crs: str,
    *,
    attributes: Sequence[Mapping[str, Any]] = (),
) -> Any:
    """Turn a label raster (0 = background) into one polygon per label.

    Polygons follow pixel edges exactly (no smoothing), so every vertex can be
    traced back to a pixel of the change rasters. Pixels of one label that touch
    only at a corner become one MultiPolygon.

    Parameters
    ----------
    labels : (rows, cols) integer ndarray
    transform : Affine
        Pixel-to-CRS transform of ``labels``.
    crs : str
        CRS of ``transform``.
    attributes : sequence of mappings
        ``attributes[i]`` holds the columns of label ``i + 1``.

    Returns
    -------
    geopandas.GeoDataFrame
        One row per label present, ordered by label, in ``crs``.
    """
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape
    from shapely.ops import unary_union

    if labels.ndim != 2:
        raise ValueError("labels must be 2-D")
    lab = labels.astype(np.int32, copy=False)
    parts: dict[int, list] = {}
    for geom, value in shapes(lab, mask=lab > 0, transform=transform, connectivity=4):
        parts.setdefault(int(value), []).append(shape(geom))
    rows = []
    for value in sorted(parts):
        geom = unary_union(parts[value]) if len(parts[value]) > 1 else parts[value][0]
        attrs = dict(attributes[value - 1]) if value - 1 < len(attributes) else {}
        rows.append({**attrs, "geometry": geom})
    columns = list(attributes[0].keys()) if attributes else []
    if not rows:
        return gpd.GeoDataFrame({c: [] for c in columns}, geometry=[], crs=crs)
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)
