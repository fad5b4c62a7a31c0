"""Connected components of binary images too large to label at once (pure numpy/scipy).

A binary image is kept 1 bit per pixel (:class:`BitMask`) and labelled in row
strips: each strip is labelled with :func:`scipy.ndimage.label`, components that
continue across a strip border are joined through a graph of the touching
labels, and per-component sums, maxima and border contact are accumulated on the
way. The result numbers components exactly as one whole-array
:func:`scipy.ndimage.label` would (raster order of their first pixel), so a
pipeline that works strip by strip gives the same objects, the same ids and the
same statistics as one that labels the whole image (tested).

On top of it, :func:`clean_mask_strips` and :func:`refine_boundaries_strips`
are the strip-wise equivalents of :func:`changedetect.damage.clean_mask` and
:func:`changedetect.damage.refine_boundaries`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .tiling import strips

__all__ = [
    "BitMask", "StripLabeler", "Components", "clean_mask_strips", "hysteresis_strips", "refine_boundaries_strips",
]

_STRUCTURES = {4: ndi.generate_binary_structure(2, 1), 8: np.ones((3, 3), bool)}


class BitMask:
    """A (rows, cols) binary image stored with one bit per pixel."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = int(height), int(width)
        self.bits = np.zeros((self.height, (self.width + 7) // 8), np.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def get(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` as a bool array."""
        return np.unpackbits(self.bits[r0:r1], axis=1, count=self.width).view(bool)

    def set(self, r0: int, rows: np.ndarray) -> None:
        """Overwrite rows from ``r0`` with the bool array ``rows``."""
        self.bits[r0 : r0 + rows.shape[0]] = np.packbits(rows.astype(bool, copy=False), axis=1)

    def any(self) -> bool:
        return bool(self.bits.any())

    def count(self) -> int:
        return int(np.unpackbits(self.bits, axis=1, count=self.width).sum(dtype=np.int64))

    @classmethod
    def from_array(cls, mask: np.ndarray) -> BitMask:
        out = cls(*mask.shape)
        out.set(0, mask)
        return out


@dataclass
class Components:
    """Per-component results of :class:`StripLabeler` (index 0: background, unused)."""

    n: int
    counts: np.ndarray
    touches_border: np.ndarray
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    maxima: dict[str, np.ndarray] = field(default_factory=dict)
    #: final id of every provisional label (0 -> 0).
    lut: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))


class StripLabeler:
    """Label a binary image given strip by strip, top to bottom.

    Call :meth:`add` with consecutive strips (any heights), then :meth:`finish`;
    afterwards :meth:`labels` returns the final labels of strip ``i`` when given
    the same strip again.

    Parameters
    ----------
    height, width : int
        Size of the whole image.
    connectivity : 4 or 8
        Pixel connectivity (scipy's default structure is 4).
    """

    def __init__(self, height: int, width: int, *, connectivity: int = 8) -> None:
        if connectivity not in _STRUCTURES:
            raise ValueError("connectivity must be 4 or 8")
        self.height, self.width, self.connectivity = int(height), int(width), connectivity
        self._structure = _STRUCTURES[connectivity]
        self._bases: list[int] = []
        self._row0: list[int] = []
        self._n = 0
        self._next_row = 0
        self._prev: np.ndarray | None = None
        self._edges: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._touch: list[np.ndarray] = []
        self._sums: dict[str, list[np.ndarray]] = {}
        self._max: dict[str, list[np.ndarray]] = {}
        self._done: Components | None = None

    def _label(self, mask: np.ndarray) -> tuple[np.ndarray, int]:
        lab, n = ndi.label(mask, structure=self._structure)
        return lab, int(n)

    def add(
        self,
        mask: np.ndarray,
        *,
        sums: Mapping[str, np.ndarray] | None = None,
        maxima: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Add the next strip (bool, ``(rows, width)``), with per-pixel values to reduce."""
        if self._done is not None:
            raise RuntimeError("finish() was already called")
        if mask.ndim != 2 or mask.shape[1] != self.width:
            raise ValueError(f"a strip must have {self.width} columns")
        r0 = self._next_row
        r1 = r0 + mask.shape[0]
        if r1 > self.height:
            raise ValueError("strips cover more rows than the image")
        lab, n = self._label(mask)
        base = self._n
        self._bases.append(base)
        self._row0.append(r0)
        flat = lab.ravel()
        # reductions over the labelled pixels only (usually a small share of the strip)
        sel = np.flatnonzero(flat) if sums or maxima else None
        ids = flat[sel] if sel is not None else None
        self._counts.append(np.bincount(flat, minlength=n + 1)[1:])
        touch = np.zeros(n + 1, bool)
        if n:
            touch[lab[:, 0]] = True
            touch[lab[:, -1]] = True
            if r0 == 0:
                touch[lab[0]] = True
            if r1 == self.height:
                touch[lab[-1]] = True
        self._touch.append(touch[1:])
        for name, values in (sums or {}).items():
            v = np.asarray(values).ravel()[sel].astype(np.float64)
            v[~np.isfinite(v)] = 0.0
            self._sums.setdefault(name, []).append(np.bincount(ids, weights=v, minlength=n + 1)[1:])
        for name, values in (maxima or {}).items():
            v = np.asarray(values).ravel()[sel].astype(np.float64)
            v[~np.isfinite(v)] = -np.inf
            m = np.full(n + 1, -np.inf)
            np.maximum.at(m, ids, v)
            self._max.setdefault(name, []).append(m[1:])
        if self._prev is not None and n:
            cur = np.where(lab[0] > 0, lab[0] + base, 0)
            prev = self._prev
            pairs = [(prev, cur)]
            if self.connectivity == 8:
                pairs += [(prev[:-1], cur[1:]), (prev[1:], cur[:-1])]
            for a, b in pairs:
                both = (a > 0) & (b > 0)
                if both.any():
                    self._edges.append(np.stack([a[both], b[both]]))
        self._prev = np.where(lab[-1] > 0, lab[-1] + base, 0) if mask.shape[0] else self._prev
        self._n += n
        self._next_row = r1

    def finish(self) -> Components:
        """Join the strips; returns the components (ids in raster order of first pixel)."""
        if self._done is not None:
            return self._done
        if self._next_row != self.height:
            raise ValueError(f"strips cover {self._next_row} of {self.height} rows")
        n = self._n
        if self._edges and n:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            e = np.concatenate(self._edges, axis=1)
            graph = coo_matrix((np.ones(e.shape[1], np.int8), (e[0] - 1, e[1] - 1)), shape=(n, n))
            _, group = connected_components(graph, directed=False)
            # A group's first pixel is its lowest provisional label (labels are in
            # raster order within a strip, strips in row order).
            first = np.full(group.max() + 1, n, np.int64)
            np.minimum.at(first, group, np.arange(n))
            order = np.argsort(first, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            final = rank[group] + 1
            k = int(order.size)
        else:
            final = np.arange(1, n + 1)
            k = n
        lut = np.concatenate([[0], final]).astype(np.int64)

        def reduce_sum(parts: list[np.ndarray], dtype=np.float64) -> np.ndarray:
            v = np.concatenate(parts) if parts else np.zeros(0)
            out = np.zeros(k + 1, dtype)
            np.add.at(out, lut[1:], v)
            return out

        counts = reduce_sum(self._counts, np.int64)
        touch = np.zeros(k + 1, bool)
        if n:
            np.logical_or.at(touch, lut[1:], np.concatenate(self._touch))
        sums = {name: reduce_sum(parts) for name, parts in self._sums.items()}
        maxima = {}
        for name, parts in self._max.items():
            out = np.full(k + 1, -np.inf)
            np.maximum.at(out, lut[1:], np.concatenate(parts) if parts else np.zeros(0))
            maxima[name] = out
        self._done = Components(k, counts, touch, sums, maxima, lut)
        return self._done

    def labels(self, index: int, mask: np.ndarray) -> np.ndarray:
        """Final labels (int32) of strip ``index``, given the same mask as to :meth:`add`."""
        comps = self.finish()
        lab, _ = self._label(mask)
        lab = lab.astype(np.int64)
        lab[lab > 0] += self._bases[index]
        return comps.lut[lab].astype(np.int32)


def _label_pass(
    get: Callable[[int, int], np.ndarray], height: int, width: int, size: int, connectivity: int,
    invert: bool = False,
) -> tuple[StripLabeler, list]:
    labeler = StripLabeler(height, width, connectivity=connectivity)
    parts = strips(0, height, size=size, halo=0)
    for s in parts:
        m = get(s.r0, s.r1)
        labeler.add(~m if invert else m)
    labeler.finish()
    return labeler, parts


def clean_mask_strips(
    mask: BitMask,
    *,
    pixel_size: float,
    open_radius_m: float = 1.5,
    close_radius_m: float = 1.0,
    min_area_m2: float = 40.0,
    max_hole_m2: float = 10.0,
    strip_rows: int = 1024,
) -> BitMask:
    """:func:`changedetect.damage.clean_mask`, strip by strip; returns a new BitMask.

    The opening and closing are local (done per strip with a halo of their
    reach); filling small holes and removing small objects need whole
    components and use :class:`StripLabeler` (4-connected, as
    :func:`scipy.ndimage.binary_fill_holes` and :func:`scipy.ndimage.label`).
    """
    from .damage import clean_local, local_reach_px

    h, w = mask.shape
    out = BitMask(h, w)
    halo = local_reach_px(pixel_size, open_radius_m, close_radius_m)
    for s in strips(0, h, size=strip_rows, halo=halo):
        m = clean_local(mask.get(s.h0, s.h1), pixel_size=pixel_size, open_radius_m=open_radius_m,
                        close_radius_m=close_radius_m)
        out.set(s.r0, m[s.core])
    px_area = pixel_size * pixel_size
    if max_hole_m2 > 0 and out.any():
        lab, parts = _label_pass(out.get, h, w, strip_rows, 4, invert=True)
        comps = lab.finish()
        fill = ~comps.touches_border & (comps.counts * px_area <= max_hole_m2)
        fill[0] = False
        if fill.any():
            for i, s in enumerate(parts):
                m = out.get(s.r0, s.r1)
                out.set(s.r0, m | fill[lab.labels(i, ~m)])
    if min_area_m2 > 0 and out.any():
        lab, parts = _label_pass(out.get, h, w, strip_rows, 4)
        comps = lab.finish()
        keep = comps.counts * px_area >= min_area_m2
        keep[0] = False
        if not keep[1:].all():
            for i, s in enumerate(parts):
                out.set(s.r0, keep[lab.labels(i, out.get(s.r0, s.r1))])
    return out


def refine_boundaries_strips(
    mask: BitMask,
    score: Callable[[int, int], np.ndarray],
    *,
    fraction: float = 0.5,
    percentile: float = 90.0,
    strip_rows: int = 1024,
) -> BitMask:
    """:func:`changedetect.damage.refine_boundaries`, strip by strip; returns a new BitMask.

    ``score(r0, r1)`` returns the score of rows ``[r0, r1)``. Each 8-connected
    object keeps its pixels with ``score >= fraction * P``, ``P`` its
    ``percentile`` score (computed from all of its pixels, as the whole-array
    function does).
    """
    h, w = mask.shape
    out = BitMask(h, w)
    if not mask.any():
        return out
    lab, parts = _label_pass(mask.get, h, w, strip_rows, 8)
    comps = lab.finish()
    ids, vals = [], []
    for i, s in enumerate(parts):
        m = mask.get(s.r0, s.r1)
        if not m.any():
            continue
        labels = lab.labels(i, m)
        sc = score(s.r0, s.r1)
        sel = labels > 0
        ids.append(labels[sel])
        vals.append(np.where(np.isfinite(sc[sel]), sc[sel], 0).astype(sc.dtype, copy=False))
    ids_a = np.concatenate(ids)
    vals_a = np.concatenate(vals)
    order = np.argsort(ids_a, kind="stable")
    ids_a, vals_a = ids_a[order], vals_a[order]
    starts = np.searchsorted(ids_a, np.arange(1, comps.n + 2))
    plateau = np.array(
        [np.percentile(vals_a[starts[k] : starts[k + 1]], percentile) for k in range(comps.n)], np.float64
    )
    cut = np.concatenate([[np.inf], fraction * plateau])
    for i, s in enumerate(parts):
        m = mask.get(s.r0, s.r1)
        if not m.any():
            out.set(s.r0, m)
            continue
        labels = lab.labels(i, m)
        sc = score(s.r0, s.r1)
        sc = np.where(np.isfinite(sc), sc, 0)
        out.set(s.r0, (labels > 0) & (sc >= cut[labels]))
    return out


def hysteresis_strips(
    seeds: BitMask,
    score: Callable[[int, int], np.ndarray],
    low: float,
    *,
    strip_rows: int = 1024,
) -> BitMask:
    """:func:`changedetect.damage.hysteresis`, strip by strip; returns a new BitMask.

    The 8-connected regions of ``score >= low`` that hold a pixel of ``seeds``
    are added to ``seeds``; ``score(r0, r1)`` returns the score of rows ``[r0, r1)``.
    """
    h, w = seeds.shape
    out = BitMask(h, w)
    if not seeds.any():
        return out

    def low_mask(r0: int, r1: int) -> np.ndarray:
        sc = score(r0, r1)
        return np.where(np.isfinite(sc), sc, -np.inf) >= low

    labeler = StripLabeler(h, w, connectivity=8)
    parts = strips(0, h, size=strip_rows, halo=0)
    for s in parts:
        labeler.add(low_mask(s.r0, s.r1), sums={"seed": seeds.get(s.r0, s.r1)})
    comps = labeler.finish()
    keep = comps.sums["seed"] > 0
    keep[0] = False
    for i, s in enumerate(parts):
        lab = labeler.labels(i, low_mask(s.r0, s.r1))
        out.set(s.r0, seeds.get(s.r0, s.r1) | keep[lab])
    return out
