"""Per-building damage assessment from footprints, accumulated strip by strip (pure numpy/scipy).

Building footprints (an optional input, e.g. OpenStreetMap polygons) are
rasterized on the grid of each row strip as an id raster (0 = no building,
building ``k`` = row ``k - 1`` of the footprints table).
:class:`BuildingAccumulator` reduces every strip to per-building pixel counts
and sums with :func:`numpy.bincount`, so a scene of any size is assessed with
memory proportional to one strip plus a few numbers per building.

The sums of the SSIM and of the score are kept in fixed point (integers, see
:data:`VALUE_SCALE`), so the results are exactly the same however the rows are
split into strips (floating-point sums would differ in the last bits with the
order of addition).

:meth:`BuildingAccumulator.assess` then grades every building from the share
of its roof that is no longer intact (see :func:`grade_building`) and gives a
confidence in that grade.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from .types import SEVERITIES

__all__ = [
    "COMPLETION_SHARE", "GRADES", "GRADE_THRESHOLDS", "MIN_ANALYSED_FRACTION", "NO_DAMAGE", "NOT_ASSESSED",
    "STRONG_LOSS", "VALUE_SCALE",
    "BuildingAccumulator", "grade_building", "grade_confidence",
]

#: Grade of an analysed building with (almost) all of its roof intact.
NO_DAMAGE = "no damage"

#: Grade of a building too little of which lies in the analysed pixels.
NOT_ASSESSED = "not assessed"

#: Building grades in order of severity (for styling): the four damage classes
#: of :data:`changedetect.types.SEVERITIES`, then "no damage", then "not assessed".
GRADES: tuple[str, ...] = (*SEVERITIES, NO_DAMAGE, NOT_ASSESSED)

#: Lowest lost share (see :func:`grade_building`) of each damage class, most severe first.
#:
#: The classes follow the UNOSAT / Copernicus EMS damage scale for buildings:
#:
#: - destroyed, >= 0.5: the structure has collapsed; less than half of the roof
#:   is intact.
#: - severe, >= 0.3: part of the roof has collapsed or is missing; the building
#:   stands but a large part of it is no longer intact.
#: - moderate, >= 0.1: visible damage to the roof (holes, partly removed cover,
#:   debris on it) while most of it is intact.
#: - possible, >= 0.03: a few changed pixels on the roof; damage is doubtful
#:   (could be debris, a vehicle, shadow or noise).
#: - below 0.03: no damage (a few stray pixels are expected on any roof).
GRADE_THRESHOLDS: tuple[tuple[str, float], ...] = (
    (SEVERITIES[0], 0.5),
    (SEVERITIES[1], 0.3),
    (SEVERITIES[2], 0.1),
    (SEVERITIES[3], 0.03),
)

#: Lost share from which a building a damage object reaches is damage as a whole
#: (``damage.complete_buildings``, :meth:`changedetect.streaming.Detector._objects`):
#: the lowest lost share of a moderately damaged building in :data:`GRADE_THRESHOLDS`.
COMPLETION_SHARE = GRADE_THRESHOLDS[2][1]

#: Buildings with a smaller share of their footprint analysed are "not assessed"
#: (the default of :meth:`BuildingAccumulator.assess`).
MIN_ANALYSED_FRACTION = 0.5

#: Structure loss at or above which a pixel counts as "strong structure loss".
STRONG_LOSS = 0.5

#: Fixed-point scale of the SSIM and score sums (values are stored as
#: ``round(v * VALUE_SCALE)``; resolution 6e-8, far below the 4 decimals reported).
VALUE_SCALE = 1 << 24

# Per strip, bincount adds the fixed-point values in float64, which is exact while
# a building's partial sum stays below 2**53, i.e. up to 2**29 pixels of one
# building in one strip (a 0.3 m grid would need a 48 km^2 building).
_MAX_STRIP_PIXELS = 1 << 29


def grade_building(lost_share: float) -> str:
    """Damage class of a building from the share of its roof that is no longer intact.

    Parameters
    ----------
    lost_share : float
        Fraction, in [0, 1], of the building's analysed pixels that are not
        intact (inside a damage polygon or with strong structure loss).

    Returns
    -------
    str
        "destroyed" (>= 0.5), "severe" (>= 0.3), "moderate" (>= 0.1),
        "possible" (>= 0.03) or "no damage"; see :data:`GRADE_THRESHOLDS` for
        the reasons of the thresholds.
    """
    f = float(lost_share)
    for name, lowest in GRADE_THRESHOLDS:
        if f >= lowest:
            return name
    return NO_DAMAGE


def grade_confidence(lost: int | np.ndarray, analysed: int | np.ndarray) -> float | np.ndarray:
    """How sure the class of a lost share of ``lost`` out of ``analysed`` pixels is.

    The share ``p = lost / analysed`` is an estimate with a sampling noise; the
    grade is sure when ``p`` lies many standard errors from the nearest class
    boundary (any of the :data:`GRADE_THRESHOLDS`). With ``d`` that distance and
    ``se`` the binomial standard error, the result is
    ``erf(d / (se * sqrt(2)))`` = ``2 * Phi(d / se) - 1``: 0 on a boundary,
    0.68 one standard error from it, 0.95 at two, -> 1 far away.

    The standard error is ``sqrt(q * (1 - q) / (n + 1))`` with the Jeffreys
    estimate ``q = (lost + 0.5) / (n + 1)`` instead of ``p``, so that it is not 0
    for an all-intact or all-lost roof of few pixels (a one-pixel "destroyed"
    building gets 0.9, not 1). Pixels are spatially correlated, so this
    is an optimistic noise level; it serves to rank, not as a probability.

    Parameters
    ----------
    lost, analysed : int or int ndarray
        Pixels not intact, and analysed pixels, of each building.

    Returns
    -------
    float or float ndarray
        In [0, 1] (0 where ``analysed`` is 0); increases with the distance from
        the nearest boundary and with the number of analysed pixels.
    """
    k = np.asarray(lost, np.float64)
    n = np.asarray(analysed, np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("lost must be in [0, analysed]")
    p = k / np.maximum(n, 1)
    bounds = np.array([t for _, t in GRADE_THRESHOLDS])
    d = np.min(np.abs(p[..., None] - bounds), axis=-1)
    q = (k + 0.5) / (n + 1)
    se = np.sqrt(q * (1 - q) / (n + 1))
    conf = np.where(n > 0, erf(d / (se * np.sqrt(2))), 0.0)
    return float(conf) if conf.ndim == 0 else conf


def _grades(lost_share: np.ndarray) -> np.ndarray:
    """Vectorised :func:`grade_building` (an object array of grade names)."""
    names = np.array([NO_DAMAGE] + [name for name, _ in reversed(GRADE_THRESHOLDS)], dtype=object)
    lows = np.array([t for _, t in reversed(GRADE_THRESHOLDS)])
    return names[np.searchsorted(lows, lost_share, side="right")]


def _fixed_point_sums(flat_ids: np.ndarray, values: np.ndarray, where: np.ndarray, lo: float, n: int):
    """Per-id sums of ``round(clip(values, lo, 1) * VALUE_SCALE)`` over ``where`` (int64)."""
    v = np.clip(values, lo, 1.0, where=where, out=np.zeros(values.shape, np.float64))
    q = np.rint(v * VALUE_SCALE).ravel()
    sums = np.bincount(flat_ids, weights=q, minlength=n + 1)
    return np.rint(sums).astype(np.int64)


class BuildingAccumulator:
    """Per-building pixel counts and sums, accumulated over row strips.

    Call :meth:`add` once per strip (in any order; each pixel once), then
    :meth:`assess`. The results do not depend on how the rows are split into
    strips.

    Parameters
    ----------
    n_buildings : int
        Number of footprints; ids run from 1 to ``n_buildings``.

    Attributes
    ----------
    footprint, analysed, damaged, strong_loss, ssim_count : (n_buildings,) int64 ndarray
        Pixels of each building: all, analysed (finite score), analysed and in a
        damage polygon, analysed with structure loss >= :data:`STRONG_LOSS`,
        analysed with a finite SSIM.
    ssim_sum, score_sum : (n_buildings,) int64 ndarray
        Sums over those pixels in fixed point (divide by :data:`VALUE_SCALE`).
    """

    def __init__(self, n_buildings: int) -> None:
        if isinstance(n_buildings, bool) or not isinstance(n_buildings, (int, np.integer)):
            raise ValueError("n_buildings must be an integer")
        if n_buildings < 0:
            raise ValueError("n_buildings must be >= 0")
        self.n_buildings = int(n_buildings)
        z = lambda: np.zeros(self.n_buildings, np.int64)  # noqa: E731
        self.footprint, self.analysed, self.damaged, self.strong_loss = z(), z(), z(), z()
        self.ssim_count, self.ssim_sum, self.score_sum = z(), z(), z()
        self._width: int | None = None

    def add(
        self,
        ids: np.ndarray,
        *,
        damage: np.ndarray,
        score: np.ndarray,
        ssim: np.ndarray,
        structure_loss: np.ndarray,
    ) -> None:
        """Add one strip.

        Parameters
        ----------
        ids : (rows, cols) integer ndarray
            Footprint id of each pixel (0 = no building, 1..n_buildings).
        damage : (rows, cols) bool ndarray
            Pixels inside the final damage polygons.
        score : (rows, cols) float ndarray
            Change score in [0, 1]; NaN outside the analysed pixels (a pixel is
            analysed where it is finite).
        ssim : (rows, cols) float ndarray
            Local SSIM in [-1, 1]; NaN outside the analysed pixels.
        structure_loss : (rows, cols) float ndarray
            Structure loss in [0, 1]; NaN outside the analysed pixels.

        Notes
        -----
        Only analysed pixels count as damaged or with strong loss, so the
        fractions of :meth:`assess` are at most 1. Score and SSIM are clipped to
        their ranges before they are summed.

        Raises
        ------
        ValueError
            If an array is not 2-D, the shapes differ (or the width differs from
            earlier strips), ``ids`` is not an integer array or holds an id
            outside ``[0, n_buildings]``, or ``damage`` is not boolean.
        """
        ids = np.asarray(ids)
        arrays = {"damage": damage, "score": score, "ssim": ssim, "structure_loss": structure_loss}
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if ids.ndim != 2:
            raise ValueError(f"ids must be 2-D (rows, cols), got shape {ids.shape}")
        for name, a in arrays.items():
            if a.shape != ids.shape:
                raise ValueError(f"{name} has shape {a.shape}, ids has shape {ids.shape}; they must be equal")
        if self._width is not None and ids.shape[1] != self._width:
            raise ValueError(f"strip has {ids.shape[1]} columns, earlier strips had {self._width}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
        if arrays["damage"].dtype != bool:
            raise ValueError(f"damage must be a bool array, got dtype {arrays['damage'].dtype}")
        for name in ("score", "ssim", "structure_loss"):
            if not np.issubdtype(arrays[name].dtype, np.floating):
                raise ValueError(f"{name} must be a float array (NaN outside analysed pixels), "
                                 f"got dtype {arrays[name].dtype}")
        self._width = ids.shape[1]
        if ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > self.n_buildings:
            bad = lo if lo < 0 else hi
            raise ValueError(f"footprint id {bad} out of range [0, {self.n_buildings}]")
        if ids.size > _MAX_STRIP_PIXELS:
            raise ValueError(f"strip of {ids.size} pixels is too large; use strips of < {_MAX_STRIP_PIXELS}")

        n = self.n_buildings
        flat = ids.ravel().astype(np.intp, copy=False)
        score_a, ssim_a, loss_a = arrays["score"], arrays["ssim"], arrays["structure_loss"]
        analysed = np.isfinite(score_a)
        ssim_ok = analysed & np.isfinite(ssim_a)
        damaged = analysed & arrays["damage"]
        strong = analysed & np.isfinite(loss_a)
        strong[strong] = loss_a[strong] >= STRONG_LOSS

        def count(mask: np.ndarray | None) -> np.ndarray:
            sel = flat if mask is None else flat[mask.ravel()]
            return np.bincount(sel, minlength=n + 1)[1:].astype(np.int64, copy=False)

        self.footprint += count(None)
        self.analysed += count(analysed)
        self.damaged += count(damaged)
        self.strong_loss += count(strong)
        self.ssim_count += count(ssim_ok)
        self.ssim_sum += _fixed_point_sums(flat, ssim_a, ssim_ok, -1.0, n)[1:]
        self.score_sum += _fixed_point_sums(flat, score_a, analysed, 0.0, n)[1:]

    def assess(
        self, *, pixel_size: float, reliability: float = 1.0, min_analysed_fraction: float = MIN_ANALYSED_FRACTION
    ) -> list[dict]:
        """Grade every building from the pixels added so far.

        Parameters
        ----------
        pixel_size : float
            Side of a pixel of the strip grid, in metres.
        reliability : float
            Co-registration reliability factor, in [0, 1] (1.0 when the
            co-registration was verified, 0.5 otherwise); multiplies the confidence.
        min_analysed_fraction : float
            Buildings with a smaller share of their footprint analysed are
            "not assessed" (confidence 0).

        Returns
        -------
        list of dict
            One per building, in id order, with keys:

            - ``building_id`` (int, 1-based: row ``building_id - 1`` of the footprints),
            - ``footprint_area_m2``: rasterized footprint area (0 if the footprint
              falls on no pixel centre of the analysed region),
            - ``analysed_fraction``: analysed / footprint pixels (0 if no pixel),
            - ``damaged_fraction``: analysed pixels in a damage polygon / analysed,
            - ``structure_loss_fraction``: analysed pixels with strong structure
              loss / analysed,
            - ``mean_ssim``, ``mean_score``: over the analysed pixels,
            - ``grade``: one of :data:`GRADES`,
            - ``confidence``: in [0, 1].

            Fractions and means are ``None`` when no pixel is analysed (when some
            are, but too few, they are given although the grade is "not assessed").

        Notes
        -----
        The lost share is ``max(damaged_fraction, structure_loss_fraction)``:
        a roof pixel is counted as no longer intact by either signal, and the
        larger share is used so that a collapse seen by one measure and not the
        other still counts. :func:`grade_building` turns it into a grade.

        ``confidence = grade_confidence(lost, analysed) * analysed_fraction *
        reliability``: grows with how many standard errors the lost share lies
        from the nearest class boundary (see :func:`grade_confidence`), discounted for
        the part of the footprint not seen and for an unverified co-registration.
        """
        if not pixel_size > 0:
            raise ValueError("pixel_size must be > 0")
        if not 0 <= reliability <= 1:
            raise ValueError("reliability must be in [0, 1]")
        if not 0 <= min_analysed_fraction <= 1:
            raise ValueError("min_analysed_fraction must be in [0, 1]")
        px_area = float(pixel_size) * float(pixel_size)
        fp, na = self.footprint, self.analysed
        safe = np.maximum(na, 1)
        frac_an = na / np.maximum(fp, 1)
        lost = np.maximum(self.damaged, self.strong_loss)
        assessed = (na > 0) & (frac_an >= min_analysed_fraction)
        grades = np.where(assessed, _grades(lost / safe), NOT_ASSESSED)
        conf = np.where(assessed, grade_confidence(lost, na) * frac_an * float(reliability), 0.0)
        conf = np.clip(conf, 0.0, 1.0)

        def col(values: np.ndarray, defined: np.ndarray) -> list:
            return [round(float(v), 4) if ok else None for v, ok in zip(values, defined, strict=True)]

        has = na > 0
        damaged = col(self.damaged / safe, has)
        loss = col(self.strong_loss / safe, has)
        score = col(self.score_sum / VALUE_SCALE / safe, has)
        ssim = col(self.ssim_sum / VALUE_SCALE / np.maximum(self.ssim_count, 1), self.ssim_count > 0)
        return [
            {
                "building_id": i + 1,
                "footprint_area_m2": round(float(fp[i]) * px_area, 3),
                "analysed_fraction": round(float(frac_an[i]), 4),
                "damaged_fraction": damaged[i],
                "structure_loss_fraction": loss[i],
                "mean_ssim": ssim[i],
                "mean_score": score[i],
                "grade": str(grades[i]),
                "confidence": round(float(conf[i]), 3),
            }
            for i in range(self.n_buildings)
        ]
