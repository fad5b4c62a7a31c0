"""From a change score to damage objects: threshold, clean-up, grading (pure numpy/scipy).

Every size is given in metres or square metres and converted with the pixel size,
so the same settings mean the same on 0.3 m and 1 m imagery.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .types import SEVERITIES

__all__ = [
    "DamageObject", "clean_local", "clean_mask", "damage_objects", "grade", "hysteresis", "local_reach_px",
    "objects_from_stats", "refine_boundaries",
]


def _disk(radius_px: float) -> np.ndarray:
    r = int(np.floor(radius_px))
    if r < 1:
        return np.ones((1, 1), dtype=bool)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= radius_px * radius_px


def local_reach_px(pixel_size: float, open_radius_m: float, close_radius_m: float) -> int:
    """Rows beyond which :func:`clean_local` cannot change a pixel (its halo)."""
    ro = int(np.floor(open_radius_m / pixel_size)) if open_radius_m > 0 else 0
    rc = int(np.floor(close_radius_m / pixel_size)) if close_radius_m > 0 else 0
    return 3 * ro + 2 * rc + 2


def clean_local(
    mask: np.ndarray, *, pixel_size: float, open_radius_m: float = 1.5, close_radius_m: float = 1.0
) -> np.ndarray:
    """The local part of :func:`clean_mask`: opening (corners given back), then closing.

    Every output pixel depends only on the input within
    :func:`local_reach_px` of it (outside the array counts as background), so
    the function can be run on strips with that halo.
    """
    import cv2

    def erode(a: np.ndarray, se: np.ndarray) -> np.ndarray:
        # OpenCV's binary morphology equals scipy's (symmetric element, outside = 0), ~10x faster.
        return cv2.erode(a.view(np.uint8), se, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)

    def dilate(a: np.ndarray, se: np.ndarray) -> np.ndarray:
        return cv2.dilate(a.view(np.uint8), se, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)

    out = np.ascontiguousarray(mask, dtype=bool)
    if open_radius_m > 0:
        se = _disk(open_radius_m / pixel_size).astype(np.uint8)
        opened = dilate(erode(out, se), se)
        # Give back the corners the disk cannot reach (pixels of the mask within the
        # radius of what survived), so square objects keep their exact area while
        # lines and specks narrower than the disk stay removed.
        out = opened | (out & dilate(opened, se))
    elif out is mask:
        out = out.copy()
    if close_radius_m > 0:
        se = _disk(close_radius_m / pixel_size).astype(np.uint8)
        pad = se.shape[0]
        padded = np.pad(out, pad)
        out = np.ascontiguousarray(erode(dilate(padded, se), se)[pad:-pad, pad:-pad])
    return out


def clean_mask(
    mask: np.ndarray,
    *,
    pixel_size: float,
    open_radius_m: float = 1.5,
    close_radius_m: float = 1.0,
    min_area_m2: float = 40.0,
    max_hole_m2: float = 10.0,
) -> np.ndarray:
    """Morphological clean-up of a binary change mask.

    Opening (disk of ``open_radius_m``) removes lines and specks narrower than
    about twice the radius (shadow edges, residual misregistration), then gives
    back the mask pixels within the radius of what survived (so corners of kept
    objects are not rounded off); closing
    (``close_radius_m``) joins fragments of one object; holes smaller than
    ``max_hole_m2`` are filled; objects smaller than ``min_area_m2`` are removed.

    Returns a new bool array; ``mask`` is not modified.
    """
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    if pixel_size <= 0:
        raise ValueError("pixel_size must be > 0")
    for name, value in (
        ("open_radius_m", open_radius_m),
        ("close_radius_m", close_radius_m),
        ("min_area_m2", min_area_m2),
        ("max_hole_m2", max_hole_m2),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0")
    out = clean_local(mask, pixel_size=pixel_size, open_radius_m=open_radius_m, close_radius_m=close_radius_m)
    px_area = pixel_size * pixel_size
    if max_hole_m2 > 0:
        holes = ndi.binary_fill_holes(out) & ~out
        lab, n = ndi.label(holes)
        if n:
            sizes = np.bincount(lab.ravel())[1:] * px_area
            small = np.concatenate([[False], sizes <= max_hole_m2])
            out |= small[lab]
    if min_area_m2 > 0:
        lab, n = ndi.label(out)
        if n:
            sizes = np.bincount(lab.ravel())[1:] * px_area
            keep = np.concatenate([[False], sizes >= min_area_m2])
            out = keep[lab]
    return out


def refine_boundaries(
    mask: np.ndarray,
    score: np.ndarray,
    *,
    fraction: float = 0.5,
    percentile: float = 90.0,
) -> np.ndarray:
    """Move each object's boundary to the half-maximum of its own score.

    The score is made with windowed filters (SSIM window, smoothing), which blur a
    sharp change edge symmetrically: the true edge lies where the blurred score has
    fallen to half of the object's plateau, not where it crosses a low global
    threshold. Each connected object keeps only its pixels with
    ``score >= fraction * P`` where ``P`` is the object's ``percentile`` score.

    Returns a new bool array (a subset of ``mask``).
    """
    if mask.shape != score.shape:
        raise ValueError("mask and score must have the same shape")
    if not 0 <= fraction <= 1:
        raise ValueError("fraction must be in [0, 1]")
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask.astype(bool, copy=True)
    sc = np.where(np.isfinite(score), score, 0)
    idx = np.arange(1, n + 1)
    plateau = ndi.labeled_comprehension(
        sc, labels, idx, lambda v: np.percentile(v, percentile), np.float64, 0.0
    )
    cut = np.concatenate([[np.inf], fraction * plateau])
    return (labels > 0) & (sc >= cut[labels])


def hysteresis(seeds: np.ndarray, score: np.ndarray, low: float) -> np.ndarray:
    """Hysteresis thresholding: grow ``seeds`` into the connected pixels scoring at least ``low``.

    The seeds are the objects found at the (high) threshold. A change that
    fades out, such as debris thinning away from a collapsed building or a
    partly damaged roof, has scores that decline from the seed; the pixels
    connected to it (8-connectivity) down to ``low`` belong to the same
    object, while isolated pixels between ``low`` and the threshold (noise,
    clutter) are not taken (Canny 1986, who recommends a low threshold of a
    half to a third of the high one).

    Returns a new bool array (a superset of ``seeds``).
    """
    if seeds.shape != score.shape:
        raise ValueError("seeds and score must have the same shape")
    seeds = seeds.astype(bool, copy=False)
    grow = np.where(np.isfinite(score), score, -np.inf) >= low
    labels, n = ndi.label(grow, structure=np.ones((3, 3), bool))
    if n == 0:
        return seeds.copy()
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[seeds & grow])] = True
    keep[0] = False
    return seeds | keep[labels]


def grade(structure_loss_fraction: float) -> str:
    """UNOSAT-like grade from the fraction of an object with strong structure loss.

    destroyed >= 0.6 (most of the roof no longer intact), severe >= 0.4,
    moderate >= 0.2, otherwise possible.
    """
    f = float(structure_loss_fraction)
    if f >= 0.6:
        return SEVERITIES[0]
    if f >= 0.4:
        return SEVERITIES[1]
    if f >= 0.2:
        return SEVERITIES[2]
    return SEVERITIES[3]


@dataclass(frozen=True)
class DamageObject:
    """Per-object statistics of a connected damage region."""

    label: int
    area_m2: float
    score: float
    score_max: float
    mean_ssim: float
    mean_difference: float
    structure_loss_fraction: float
    severity: str
    confidence: float


def damage_objects(
    mask: np.ndarray,
    *,
    score: np.ndarray,
    ssim: np.ndarray,
    difference: np.ndarray,
    structure_loss: np.ndarray,
    threshold: float,
    pixel_size: float,
    strong_loss: float = 0.5,
    reliability: float = 1.0,
    size_scale_m2: float = 100.0,
) -> tuple[np.ndarray, list[DamageObject]]:
    """Label the connected regions of ``mask`` and measure each.

    Confidence, in [0, 1], is the product of three factors: the evidence (the root
    of the mean of how far the object's mean score lies above the threshold,
    ``(score - t) / (1 - t)``, and the share of it with strong structure loss);
    its size, ``1 - exp(-area / size_scale_m2)`` (vehicle- and stall-sized objects
    are often clutter); and the co-registration ``reliability`` (1 when verified,
    0.5 otherwise).

    Returns
    -------
    labels : (rows, cols) int32 ndarray
        0 outside objects, 1..n inside, in raster (row-major) order of first pixel.
    objects : list of DamageObject
    """
    if not 0 <= threshold < 1:
        raise ValueError("threshold must be in [0, 1)")
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    labels = labels.astype(np.int32)
    if n == 0:
        return labels, []
    flat = labels.ravel()

    def sum_of(a: np.ndarray) -> np.ndarray:
        a = np.where(np.isfinite(a), a, 0).astype(np.float64, copy=False)
        return np.bincount(flat, weights=a.ravel(), minlength=n + 1)[1:]

    counts = np.bincount(flat, minlength=n + 1)[1:]
    loss = np.where(np.isfinite(structure_loss), structure_loss, 0) >= strong_loss
    sc_max = np.asarray(
        ndi.maximum(np.where(np.isfinite(score), score, 0), labels, np.arange(1, n + 1)), dtype=float
    )
    objects = objects_from_stats(
        counts=counts, score_sum=sum_of(score), score_max=sc_max, ssim_sum=sum_of(ssim),
        difference_sum=sum_of(difference), loss_count=sum_of(loss), threshold=threshold,
        pixel_size=pixel_size, reliability=reliability, size_scale_m2=size_scale_m2,
    )
    return labels, objects


def objects_from_stats(
    *,
    counts: np.ndarray,
    score_sum: np.ndarray,
    score_max: np.ndarray,
    ssim_sum: np.ndarray,
    difference_sum: np.ndarray,
    loss_count: np.ndarray,
    threshold: float,
    pixel_size: float,
    reliability: float = 1.0,
    size_scale_m2: float = 100.0,
) -> list[DamageObject]:
    """Damage objects 1..n from per-object pixel counts and sums (see :func:`damage_objects`).

    Sums treat non-finite values as 0, as :func:`damage_objects` does; objects
    measured strip by strip (:class:`changedetect.components.StripLabeler`)
    give the same objects as one whole-array pass.
    """
    counts = np.asarray(counts, dtype=np.float64)
    safe = np.maximum(counts, 1)
    sc = np.asarray(score_sum, float) / safe
    ss = np.asarray(ssim_sum, float) / safe
    df = np.asarray(difference_sum, float) / safe
    loss_frac = np.asarray(loss_count, float) / safe
    px_area = pixel_size * pixel_size
    objects = []
    for i in range(counts.size):
        margin = np.clip((sc[i] - threshold) / max(1 - threshold, 1e-6), 0, 1)
        evidence = (0.5 * margin + 0.5 * loss_frac[i]) ** 0.5
        # Objects near the size of a vehicle or a market stall are more often
        # movable clutter than collapsed structure: confidence grows with area,
        # reaching ~0.86 at 2 x ``size_scale_m2`` and ~1 for building blocks.
        size = 1 - np.exp(-counts[i] * px_area / size_scale_m2)
        conf = float(np.clip(evidence * size * reliability, 0, 1))
        objects.append(
            DamageObject(
                label=i + 1,
                area_m2=round(float(counts[i] * px_area), 3),
                score=round(float(sc[i]), 4),
                score_max=round(float(score_max[i]), 4),
                mean_ssim=round(float(ss[i]), 4),
                mean_difference=round(float(df[i]), 4),
                structure_loss_fraction=round(float(loss_frac[i]), 4),
                severity=grade(loss_frac[i]),
                confidence=round(conf, 3),
            )
        )
    return objects
