"""Accuracy of a damage map against reference labels (pixel/area and object level).

Two ways to count, both exact:

* on a raster grid (``pixel_metrics``): a pixel is damage when its centre is inside
  a polygon; precision, recall, F1 and IoU are counts of pixels;
* on the polygons themselves (``area_metrics``): the same ratios from exact areas in
  a projected CRS, independent of any grid.

A truth object is *found* when at least ``min_cover`` (30 % by default) of its area
is covered by detected damage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Metrics", "area_metrics", "building_agreement", "building_truth", "object_recall", "pixel_metrics",
]


@dataclass(frozen=True)
class Metrics:
    """Precision, recall, F1 and IoU from true/false positive and negative amounts."""

    tp: float
    fp: float
    fn: float
    unit: str = "px"
    objects: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 1 when nothing was detected."""
        d = self.tp + self.fp
        return self.tp / d if d > 0 else 1.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 1 when there is nothing to find."""
        d = self.tp + self.fn
        return self.tp / d if d > 0 else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    @property
    def iou(self) -> float:
        """TP / (TP + FP + FN)."""
        d = self.tp + self.fp + self.fn
        return self.tp / d if d > 0 else 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary, ratios rounded to 4 decimals."""
        out = {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "iou": round(self.iou, 4),
            f"tp_{self.unit}": round(self.tp, 3),
            f"fp_{self.unit}": round(self.fp, 3),
            f"fn_{self.unit}": round(self.fn, 3),
        }
        if self.objects:
            out["objects"] = self.objects
        return out


def pixel_metrics(pred: np.ndarray, truth: np.ndarray, *, valid: np.ndarray | None = None) -> Metrics:
    """Pixel counts of two boolean masks (only where ``valid``)."""
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have the same shape, got {pred.shape} and {truth.shape}")
    p = pred.astype(bool)
    t = truth.astype(bool)
    if valid is not None:
        if valid.shape != pred.shape:
            raise ValueError("valid must have the shape of pred")
        p = p & valid
        t = t & valid
    tp = int(np.count_nonzero(p & t))
    return Metrics(tp=tp, fp=int(np.count_nonzero(p)) - tp, fn=int(np.count_nonzero(t)) - tp, unit="px")


def area_metrics(pred: Sequence[Any], truth: Sequence[Any]) -> Metrics:
    """Exact-area counts (m² when the geometries are in a metric CRS)."""
    from shapely import union_all

    p = union_all(list(pred)) if len(pred) else None
    t = union_all(list(truth)) if len(truth) else None
    pa = p.area if p is not None else 0.0
    ta = t.area if t is not None else 0.0
    tp = p.intersection(t).area if p is not None and t is not None else 0.0
    return Metrics(tp=tp, fp=pa - tp, fn=ta - tp, unit="m2")


def object_recall(
    truth: Sequence[Any],
    pred: Sequence[Any],
    *,
    classes: Sequence[str] | None = None,
    min_cover: float = 0.3,
) -> dict[str, Any]:
    """Share of truth objects covered at least ``min_cover`` by predicted damage.

    Parameters
    ----------
    truth, pred : sequences of shapely geometries (same metric CRS)
    classes : sequence of str, optional
        A class (e.g. severity) per truth object; recall is then also given per class.

    Returns
    -------
    dict
        ``{"found": n, "total": n, "recall": r, "min_cover": c, "coverage": [...],
        "by_class": {cls: {"found", "total", "recall"}}}``.
    """
    from shapely import union_all

    if not 0 < min_cover <= 1:
        raise ValueError("min_cover must be in (0, 1]")
    if classes is not None and len(classes) != len(truth):
        raise ValueError("classes must have one entry per truth object")
    p = union_all(list(pred)) if len(pred) else None
    coverage = []
    for geom in truth:
        area = geom.area
        cov = p.intersection(geom).area / area if p is not None and area > 0 else 0.0
        coverage.append(round(float(cov), 4))
    found = [c >= min_cover for c in coverage]

    def summary(sel: list[bool]) -> dict[str, Any]:
        total = sum(sel)
        n = sum(f for f, s in zip(found, sel, strict=True) if s)
        return {"found": n, "total": total, "recall": round(n / total, 4) if total else None}

    out: dict[str, Any] = {**summary([True] * len(truth)), "min_cover": min_cover, "coverage": coverage}
    if classes is not None:
        out["by_class"] = {c: summary([k == c for k in classes]) for c in dict.fromkeys(classes)}
    return out


#: Grades of a building from worst to none, as in :mod:`changedetect.buildings`.
_BUILDING_ORDER = ("destroyed", "severe", "moderate", "possible", "no damage")


def building_truth(footprints: Sequence[Any], truth: Sequence[Any], severities: Sequence[str], *,
                   min_cover: float = 0.3) -> list[str]:
    """Reference grade of each footprint: the worst severity among the truth polygons
    covering at least ``min_cover`` of it, else ``"no damage"``."""
    from shapely import STRtree

    tree = STRtree(list(truth))
    out = []
    for g in footprints:
        best = len(_BUILDING_ORDER) - 1
        area = g.area
        for i in tree.query(g):
            if area > 0 and g.intersection(truth[int(i)]).area / area >= min_cover:
                best = min(best, _BUILDING_ORDER.index(str(severities[int(i)])))
        out.append(_BUILDING_ORDER[best])
    return out


def building_agreement(graded: Sequence[str], reference: Sequence[str]) -> dict[str, Any]:
    """How per-building grades agree with reference grades (buildings not assessed left out).

    Returns the number compared, exact agreement, agreement within one class, the
    share of undamaged buildings graded moderate or worse (false alarms), the
    share of destroyed/severe buildings graded moderate or better-looking (misses),
    and the confusion counts ``{reference: {graded: n}}``.
    """
    pairs = [(g, r) for g, r in zip(graded, reference, strict=True) if g in _BUILDING_ORDER]
    n = len(pairs)
    idx = {k: i for i, k in enumerate(_BUILDING_ORDER)}
    exact = sum(g == r for g, r in pairs)
    within = sum(abs(idx[g] - idx[r]) <= 1 for g, r in pairs)
    intact = [g for g, r in pairs if r == "no damage"]
    heavy = [g for g, r in pairs if r in ("destroyed", "severe")]
    confusion: dict[str, dict[str, int]] = {}
    for g, r in pairs:
        confusion.setdefault(r, {}).setdefault(g, 0)
        confusion[r][g] += 1
    return {
        "compared": n,
        "exact": round(exact / n, 4) if n else None,
        "within_one_class": round(within / n, 4) if n else None,
        "intact_flagged": round(sum(idx[g] <= 2 for g in intact) / len(intact), 4) if intact else None,
        "heavy_missed": round(sum(idx[g] >= 2 for g in heavy) / len(heavy), 4) if heavy else None,
        "confusion": confusion,
    }
