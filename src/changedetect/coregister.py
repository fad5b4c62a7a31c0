"""Global co-registration: the translation that aligns an after image onto a before image.

Sign convention
---------------
A shift ``(dy, dx)`` is the displacement of the content of ``moving`` relative to
``reference``, in (row, col) pixels::

    moving[r + dy, c + dx] ~= reference[r, c]

To align ``moving`` onto the grid of ``reference``, sample ``moving`` at
``(r + dy, c + dx)`` (this is what :func:`apply_shift` does). Note that
:func:`skimage.registration.phase_cross_correlation` returns the opposite sign
(the correction to apply to ``moving``).

Method
------
1. :func:`prepare` turns each image into one float32 feature image: the mean of
   the bands, band-passed by a difference of Gaussians computed as a normalised
   (masked) convolution so that no-data values never bleed into valid pixels,
   plus a weight that is 0 on no-data (eroded by a few pixels) and on
   low-texture areas.
2. Both images are reduced to an image pyramid (masked 2x2 block means) until
   the largest shift left at the coarsest level is a few pixels. There a masked,
   weighted normalised cross-correlation (Padfield 2012) is evaluated for every
   integer shift within ``max_shift``; the ratio of its highest peak to the
   highest value outside a small exclusion zone is the quality figure
   ``peak_ratio``.
3. The integer estimate is refined level by level (search of +/-2 pixels on a
   window of bounded size). At full resolution the two windows are reweighted
   by their local similarity (correlation coefficient in 16-pixel blocks), so
   that changed areas drop out, and the sub-pixel peak of their tapered,
   band-passed, mean-free cross-correlation without spectral normalisation
   (phase normalisation biases sub-pixel estimates of band-limited imagery) is
   located with the upsampled matrix-multiply DFT of Guizar-Sicairos et al.
   (2008) and a parabolic fit on the upsampled grid. The moving window is then
   resampled onto the estimate and the residual measured again (up to three
   times), which removes the bias of a taper that stays put while the content
   moves. The taper is a Tukey window (Hann flanks over the outer 12.5 % of
   each side): a full Hann window leaves almost no weight near the window
   edges, where in a mostly changed scene the only stable content may lie.
4. Consensus (:func:`estimate_shift_tiles`, and by default inside
   :func:`estimate_shift`): the same coarse-to-fine search runs independently in
   a grid of windows (tie points). Windows with a good peak ratio vote; the
   largest cluster of agreeing votes is found by exhaustive hypothesis testing
   (RANSAC on a translation model with every measured shift as a hypothesis),
   outliers are rejected with a MAD-based threshold, and the mean of the inliers
   is returned with the inlier count and RMSE. This keeps working when most of
   the scene changed, where whole-image correlation has no usable peak.

The per-window results (:class:`TiePoints`) are the input a later local
(affine or displacement-field) model can be fitted to.

References
----------
.. [1] M. Guizar-Sicairos, S. T. Thurman and J. R. Fienup, "Efficient subpixel
       image registration algorithms," Optics Letters 33(2), 156-158 (2008).
       :doi:`10.1364/OL.33.000156`
.. [2] D. Padfield, "Masked object registration in the Fourier domain," IEEE
       Transactions on Image Processing 21(5), 2706-2718 (2012).
       :doi:`10.1109/TIP.2011.2181402`
.. [3] M. A. Fischler and R. C. Bolles, "Random sample consensus," Communications
       of the ACM 24(6), 381-395 (1981). :doi:`10.1145/358669.358692`
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import fft as sfft
from scipy import ndimage as ndi

__all__ = [
    "ShiftEstimate",
    "TiePoints",
    "apply_shift",
    "estimate_shift",
    "estimate_shift_tiles",
    "prepare",
]

# Largest shift (pixels) left to search at the coarsest pyramid level.
_COARSE_SHIFT = 8
# Smallest side (pixels) of a whole image at the coarsest pyramid level.
_MIN_LEVEL_SIZE = 64
# Smallest side (pixels) of a tile window at its coarsest level.
_MIN_WINDOW = 64
# Search radius (pixels) of the refinement at each finer level.
_REFINE_RADIUS = 2
# Chebyshev radius (pixels) around the main peak excluded from the second peak.
_EXCLUSION = 3
# Smallest radius of the correlation surface used for the peak ratio.
_MIN_EVAL_RADIUS = _EXCLUSION + 3
# Smallest overlap (fraction of the reference window weight) for a valid NCC.
_MIN_OVERLAP = 0.3
# Block size (pixels) of the local similarity weights of the sub-pixel step.
_SIMILARITY_BLOCK = 16
# Fraction of the window covered by the Hann flanks of the taper (1: plain Hann).
_TAPER_ALPHA = 0.25
# Margin (pixels) of the moving window resampled at sub-pixel offsets, and the
# number of resample-and-measure iterations.
_RESAMPLE_MARGIN = 4
_RESAMPLE_ITERATIONS = 3
# Peak ratios are capped here (a peak with no competitor is "infinitely" good).
_RATIO_CAP = 1000.0
# Levels with at most this many pixels get their features computed once, whole.
_WHOLE_LEVEL_PIXELS = 1 << 21
# A window is measured only if this fraction of its reference pixels is valid.
_MIN_WINDOW_VALID = 0.25
# Consensus: hypothesis radius, MAD multiplier and floor of the MAD threshold (px).
_RANSAC_TOL = 1.0
_MAD_K = 3.0
_MAD_FLOOR = 0.25
# A consensus is reliable if its inliers' residual RMSE is at most this (px).
_MAX_RMSE = 1.0
# Global and consensus estimates that differ by more than this (px) disagree.
_AGREE_TOL = 1.0
# Largest matrix product (multiply-adds) handed to BLAS in one call.
_BLAS_CHUNK = 60_000
# Default window sizes of the consensus (pixels), for large and small images.
_DEFAULT_TILE_LARGE = 256
_DEFAULT_TILE_SMALL = 128


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


def _json_float(value: float) -> float | None:
    """Return ``value`` as a float, or None if it is not finite (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True, eq=False)
class TiePoints:
    """Shifts measured independently in a grid of windows.

    Each entry maps the window centre ``(row, col)`` of the reference to
    ``(row + dy, col + dx)`` in the moving image, with the sign convention of
    the module. All arrays have the same length.

    Attributes
    ----------
    row, col : (N,) ndarray of float64
        Window centres in reference pixel coordinates (full resolution).
    dy, dx : (N,) ndarray of float64
        Shift measured in each window (pixels).
    peak_ratio : (N,) ndarray of float64
        Quality of each window's correlation peak (see :class:`ShiftEstimate`).
    n_valid : (N,) ndarray of int64
        Pixels with weight in both windows at full resolution.
    accepted : (N,) ndarray of bool
        True for the windows kept as inliers of the consensus.
    """

    row: NDArray[np.float64]
    col: NDArray[np.float64]
    dy: NDArray[np.float64]
    dx: NDArray[np.float64]
    peak_ratio: NDArray[np.float64]
    n_valid: NDArray[np.int64]
    accepted: NDArray[np.bool_]

    def __len__(self) -> int:
        """Return the number of windows."""
        return int(self.row.shape[0])

    def as_dict(self) -> dict[str, list[Any]]:
        """Return the tie points as JSON-serialisable lists (NaN becomes None).

        Returns
        -------
        dict
            One list per attribute, all of the same length.
        """
        out: dict[str, list[Any]] = {}
        for name in ("row", "col", "dy", "dx", "peak_ratio"):
            out[name] = [_json_float(v) for v in getattr(self, name)]
        out["n_valid"] = [int(v) for v in self.n_valid]
        out["accepted"] = [bool(v) for v in self.accepted]
        return out


@dataclass(frozen=True, eq=False)
class ShiftEstimate:
    """Estimated translation of ``moving`` relative to ``reference``.

    Attributes
    ----------
    dy, dx : float
        Shift in pixels, ``moving[r + dy, c + dx] ~= reference[r, c]``. NaN when
        nothing could be measured (no texture or no overlap).
    peak_ratio : float
        Height of the main correlation peak over the highest value outside a
        small exclusion zone around it (normalised cross-correlation at the
        coarsest level, over the whole search range). About 1 for unrelated
        images; for a consensus, the median over the inlier windows. Capped at
        1000.
    n_valid : int
        Pixels with weight in both images that the final (sub-pixel) estimate
        used, summed over the inlier windows for a consensus.
    reliable : bool
        For ``"global"``: the peak ratio reaches ``min_peak_ratio`` and every
        coarse-to-fine refinement stayed inside its search window. For
        ``"tiles"``: at least ``min_inliers`` windows agree, no rival cluster of
        votes is even half as large, and their RMSE is at most 1 pixel.
    method : str
        ``"global"`` (whole-image coarse-to-fine), ``"tiles"`` (consensus of
        windows) or ``"none"`` (nothing measurable).
    n_inliers, n_outliers : int
        Windows that agreed with / were rejected by the consensus (0 for
        ``"global"``).
    rmse : float
        Root-mean-square distance (pixels) of the inlier windows' shifts from the
        consensus; NaN for ``"global"``.
    tie_points : TiePoints or None
        Per-window results when windows were measured.
    """

    dy: float
    dx: float
    peak_ratio: float
    n_valid: int
    reliable: bool
    method: str
    n_inliers: int = 0
    n_outliers: int = 0
    rmse: float = math.nan
    tie_points: TiePoints | None = None

    @property
    def shift(self) -> tuple[float, float]:
        """The shift as a ``(dy, dx)`` tuple."""
        return (self.dy, self.dx)

    def as_dict(self, *, tie_points: bool = False) -> dict[str, Any]:
        """Return the estimate as a JSON-serialisable dict (NaN becomes None).

        Parameters
        ----------
        tie_points : bool, optional
            Include the per-window results under ``"tie_points"``.

        Returns
        -------
        dict
            Plain Python scalars (and lists for the tie points).
        """
        out: dict[str, Any] = {
            "dy": _json_float(self.dy),
            "dx": _json_float(self.dx),
            "peak_ratio": _json_float(self.peak_ratio),
            "n_valid": int(self.n_valid),
            "reliable": bool(self.reliable),
            "method": str(self.method),
            "n_inliers": int(self.n_inliers),
            "n_outliers": int(self.n_outliers),
            "rmse": _json_float(self.rmse),
        }
        if tie_points:
            out["tie_points"] = (
                None if self.tie_points is None else self.tie_points.as_dict()
            )
        return out


@dataclass(frozen=True)
class _Window:
    """Result of the coarse-to-fine search in one window (private)."""

    dy: float
    dx: float
    peak_ratio: float
    n_valid: int
    consistent: bool


# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------


def _check_image(image: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be a (rows, cols) or (bands, rows, cols) array, got {arr.ndim} dimensions"
        )
    if not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] == 0:
        raise ValueError(f"{name} has no band")
    if min(arr.shape[-2:]) < 16:
        raise ValueError(
            f"{name} must be at least 16 x 16 pixels, got {arr.shape[-2:]}"
        )
    return arr


def _check_valid(
    valid: ArrayLike | None, image: np.ndarray, name: str
) -> np.ndarray | None:
    if valid is None:
        return None
    mask = np.asarray(valid)
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.number):
            raise ValueError(f"{name} must be a boolean array, got dtype {mask.dtype}")
        mask = mask != 0
    if mask.shape == image.shape[-2:]:
        return mask
    if mask.ndim == 3 and image.ndim == 3 and mask.shape == image.shape:
        return np.asarray(mask.all(axis=0))
    raise ValueError(
        f"{name} must have shape {image.shape[-2:]} (or the image's shape), got {mask.shape}"
    )


def _check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_sigmas(sigma_low: float, sigma_high: float) -> tuple[float, float]:
    sigma_low = _check_positive(sigma_low, "sigma_low")
    sigma_high = _check_positive(sigma_high, "sigma_high")
    if sigma_high <= sigma_low:
        raise ValueError(
            f"sigma_high must be larger than sigma_low, got {sigma_high} <= {sigma_low}"
        )
    return sigma_low, sigma_high


def _luminance(
    image: np.ndarray, valid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the bands as float32 and the mask of valid, finite pixels."""
    if image.ndim == 3:
        lum = (
            image.mean(axis=0, dtype=np.float32)
            if image.shape[0] > 1
            else image[0].astype(np.float32)
        )
    else:
        lum = image.astype(np.float32)  # always a copy: the input is never touched
    finite = np.isfinite(lum)
    mask = finite if valid is None else finite & valid
    if not finite.all():
        lum[~finite] = 0.0
    return lum, mask


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------


def _edge_gain(n: int, size: int, sigma: float) -> np.ndarray:
    """Gaussian filter of a row of ``n`` ones in a zero-padded, ``size``-long circle."""
    ones = np.zeros(size, np.float32)
    ones[:n] = 1.0
    freq = sfft.rfftfreq(size).astype(np.float32)
    gain = sfft.irfft(
        sfft.rfft(ones) * np.exp(-2.0 * (np.pi * sigma * freq) ** 2), n=size
    )
    return gain[:n].astype(np.float32)


def _gaussian_transfer(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Transfer function of a Gaussian of std ``sigma`` on an rfft2 grid."""
    fy = sfft.fftfreq(shape[0]).astype(np.float32)
    fx = sfft.rfftfreq(shape[1]).astype(np.float32)
    gy = np.exp(-2.0 * (np.pi * sigma * fy) ** 2)
    gx = np.exp(-2.0 * (np.pi * sigma * fx) ** 2)
    return (gy[:, None] * gx[None, :]).astype(np.float32)


def _prepare(
    lum: np.ndarray,
    mask: np.ndarray,
    sigma_low: float,
    sigma_high: float,
    texture_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Band-pass feature and weight of a float32 image with a validity mask.

    Gaussians are applied in the Fourier domain on a zero-padded grid, as
    normalised convolutions ``G*(x m) / G*m``, so values under ``~mask`` never
    reach valid pixels and image borders are handled like no-data.
    """
    rows, cols = lum.shape
    feature = np.zeros((rows, cols), np.float32)
    weight = np.zeros((rows, cols), np.float32)
    n = int(np.count_nonzero(mask))
    if n == 0:
        return feature, weight
    pad = int(math.ceil(4.0 * sigma_high))
    size = (
        sfft.next_fast_len(rows + pad, real=True),
        sfft.next_fast_len(cols + pad, real=True),
    )
    full = n == mask.size
    m = mask.astype(np.float32)
    offset = np.float32(lum.mean() if full else lum[mask].mean())
    x = (lum - offset) * m
    g_low = _gaussian_transfer(size, sigma_low)
    g_high = _gaussian_transfer(size, sigma_high)
    if full:
        # Separable normalisation of an all-valid image: two 1-D filters.
        spec = sfft.rfft2(x, s=size)
        num = sfft.irfft2(
            np.stack([spec * g_low, spec * g_high]),
            s=size,
            axes=(-2, -1),
        )
        den_low = np.outer(
            _edge_gain(rows, size[0], sigma_low), _edge_gain(cols, size[1], sigma_low)
        )
        den_high = np.outer(
            _edge_gain(rows, size[0], sigma_high), _edge_gain(cols, size[1], sigma_high)
        )
        filt = (num[0, :rows, :cols], den_low, num[1, :rows, :cols], den_high)
    else:
        spec = sfft.rfft2(np.stack([x, m]), s=size, axes=(-2, -1))
        out = sfft.irfft2(
            np.stack(
                [spec[0] * g_low, spec[1] * g_low, spec[0] * g_high, spec[1] * g_high]
            ),
            s=size,
            axes=(-2, -1),
        )[:, :rows, :cols]
        filt = (out[0], out[1], out[2], out[3])
    eps = np.float32(1e-3)
    ok = mask & (filt[1] > eps) & (filt[3] > eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        band = np.where(
            ok, filt[0] / filt[1] - filt[2] / filt[3], np.float32(0.0)
        ).astype(np.float32)
    # Local standard deviation of the band-passed image (normalised too).
    energy = sfft.irfft2(
        sfft.rfft2(band * band, s=size) * g_high,
        s=size,
    )[:rows, :cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        local_std = np.sqrt(
            np.maximum(np.where(ok, energy / filt[3], 0.0), 0.0)
        ).astype(np.float32)
    core = ok
    if not mask.all():
        radius = int(math.ceil(sigma_low)) + 1
        core = ok & ndi.binary_erosion(mask, iterations=radius, border_value=1)
    if not core.any():
        return feature, weight
    sample = local_std[core]
    if sample.size > 16384:
        sample = sample[:: sample.size // 16384]
    floor = texture_threshold * float(np.median(sample))
    textured = core & (local_std > floor) & (local_std > 0)
    feature[ok] = band[ok]
    weight[textured] = 1.0
    return feature, weight


def prepare(
    image: ArrayLike,
    *,
    valid: ArrayLike | None = None,
    sigma_low: float = 1.0,
    sigma_high: float = 4.0,
    texture_threshold: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn an image into a band-passed feature image and a correlation weight.

    Parameters
    ----------
    image : (M, N) or (B, M, N) array_like
        Image; the bands are averaged. Non-finite values count as no-data.
    valid : (M, N) or (B, M, N) array_like of bool, optional
        True on valid pixels (a pixel is valid if it is valid in every band).
        Default: every finite pixel.
    sigma_low : float, optional
        Standard deviation (pixels) of the Gaussian low-pass that removes noise
        and the finest detail.
    sigma_high : float, optional
        Standard deviation (pixels) of the Gaussian whose output is subtracted
        (high-pass: removes illumination gradients and the mean level). Must be
        larger than ``sigma_low``.
    texture_threshold : float, optional
        Pixels whose local standard deviation of the band-passed image is below
        this fraction of its median over the valid pixels get weight 0.

    Returns
    -------
    feature : (M, N) ndarray of float32
        Difference of Gaussians of the band mean, 0 on no-data.
    weight : (M, N) ndarray of float32
        1 on valid, textured pixels at least ``ceil(sigma_low) + 1`` pixels
        away from no-data, 0 elsewhere.

    Raises
    ------
    ValueError
        If ``image`` is not a real 2-D or 3-D array of at least 16 x 16 pixels,
        ``valid`` does not match it, or a setting is out of range.

    Notes
    -----
    The Gaussians are computed as normalised convolutions, ``G*(x m) / G*m``
    with ``m`` the validity mask, in the Fourier domain on a zero-padded grid:
    no-data values do not bleed into valid pixels, and image borders are
    treated like no-data rather than reflected.

    Examples
    --------
    >>> import numpy as np
    >>> feature, weight = prepare(np.random.default_rng(0).random((64, 64)))
    >>> feature.dtype, weight.shape
    (dtype('float32'), (64, 64))
    """
    arr = _check_image(image, "image")
    mask = _check_valid(valid, arr, "valid")
    sigma_low, sigma_high = _check_sigmas(sigma_low, sigma_high)
    texture_threshold = _check_positive(
        texture_threshold, "texture_threshold", allow_zero=True
    )
    lum, mask = _luminance(arr, mask)
    return _prepare(lum, mask, sigma_low, sigma_high, texture_threshold)


# ----------------------------------------------------------------------------
# Pyramid
# ----------------------------------------------------------------------------


def _downsample(lum: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Halve an image by 2x2 block means; a block is valid if all 4 pixels are."""
    rows, cols = lum.shape[0] // 2 * 2, lum.shape[1] // 2 * 2
    x = np.where(mask, lum, np.float32(0.0))[:rows, :cols]
    m = mask[:rows, :cols]
    out = (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) * np.float32(
        0.25
    )
    valid = m[0::2, 0::2] & m[1::2, 0::2] & m[0::2, 1::2] & m[1::2, 1::2]
    return out, valid


class _Pyramid:
    """Image pyramid whose band-passed features are computed on demand."""

    def __init__(
        self,
        lum: np.ndarray,
        mask: np.ndarray,
        n_levels: int,
        sigma_low: float,
        sigma_high: float,
        texture_threshold: float,
    ) -> None:
        self.levels = [(lum, mask)]
        for _ in range(n_levels):
            self.levels.append(_downsample(*self.levels[-1]))
        self.sigmas = (sigma_low, sigma_high, texture_threshold)
        self.margin = int(math.ceil(4.0 * sigma_high)) + int(math.ceil(sigma_low)) + 2
        self._whole: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def shape(self, level: int) -> tuple[int, int]:
        rows, cols = self.levels[level][0].shape
        return rows, cols

    def window(
        self, level: int, r0: int, c0: int, h: int, w: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feature and weight of rows r0:r0+h, cols c0:c0+w (zero outside the image)."""
        lum, mask = self.levels[level]
        rows, cols = lum.shape
        feature = np.zeros((h, w), np.float32)
        weight = np.zeros((h, w), np.float32)
        ra, rb = max(r0, 0), min(r0 + h, rows)
        ca, cb = max(c0, 0), min(c0 + w, cols)
        if ra >= rb or ca >= cb:
            return feature, weight
        if rows * cols <= _WHOLE_LEVEL_PIXELS:
            if level not in self._whole:
                self._whole[level] = _prepare(lum, mask, *self.sigmas)
            f, wt = self._whole[level]
            feature[ra - r0 : rb - r0, ca - c0 : cb - c0] = f[ra:rb, ca:cb]
            weight[ra - r0 : rb - r0, ca - c0 : cb - c0] = wt[ra:rb, ca:cb]
            return feature, weight
        m = self.margin
        pa, pb = max(ra - m, 0), min(rb + m, rows)
        qa, qb = max(ca - m, 0), min(cb + m, cols)
        f, wt = _prepare(lum[pa:pb, qa:qb], mask[pa:pb, qa:qb], *self.sigmas)
        feature[ra - r0 : rb - r0, ca - c0 : cb - c0] = f[
            ra - pa : rb - pa, ca - qa : cb - qa
        ]
        weight[ra - r0 : rb - r0, ca - c0 : cb - c0] = wt[
            ra - pa : rb - pa, ca - qa : cb - qa
        ]
        return feature, weight


def _n_levels(size: int, max_shift: float, min_size: int) -> int:
    """Pyramid levels needed so that the coarsest search is at most a few pixels."""
    levels = 0
    while (
        max_shift / 2**levels > _COARSE_SHIFT and size // 2 ** (levels + 1) >= min_size
    ):
        levels += 1
    return levels


# ----------------------------------------------------------------------------
# Correlation
# ----------------------------------------------------------------------------


def _ncc_surface(
    f: np.ndarray, wf: np.ndarray, g: np.ndarray, wg: np.ndarray, min_overlap: float
) -> np.ndarray:
    """Weighted normalised cross-correlation for every shift within the margin.

    ``f, wf`` are (h, w); ``g, wg`` are (h + 2R, w + 2R) with ``g[R + i]``
    aligned to ``f[i]`` at shift 0. Returns a (2R + 1, 2R + 1) array whose entry
    ``[R + sy, R + sx]`` is the NCC of ``f`` with ``g`` shifted by ``(sy, sx)``,
    weighted by ``wf * wg``; ``-inf`` where the overlap weight is below
    ``min_overlap`` or a variance vanishes (Padfield 2012, with soft weights).
    """
    h, w = f.shape
    size_r, size_c = g.shape
    radius = (size_r - h) // 2
    size = (
        sfft.next_fast_len(size_r, real=True),
        sfft.next_fast_len(size_c, real=True),
    )
    # float32 is enough: the features are band-passed (nearly zero-mean), so
    # the variance terms below do not cancel catastrophically.
    a = np.stack([wf, wf * f, wf * f * f]).astype(np.float32, copy=False)
    b = np.stack([wg, wg * g, wg * g * g]).astype(np.float32, copy=False)
    spec_a = np.conj(sfft.rfft2(a, s=size, axes=(-2, -1)))
    spec_b = sfft.rfft2(b, s=size, axes=(-2, -1))
    prods = np.stack(
        [
            spec_a[0] * spec_b[0],
            spec_a[1] * spec_b[0],
            spec_a[0] * spec_b[1],
            spec_a[2] * spec_b[0],
            spec_a[0] * spec_b[2],
            spec_a[1] * spec_b[1],
        ]
    )
    n = 2 * radius + 1
    sums = sfft.irfft2(prods, s=size, axes=(-2, -1))[:, :n, :n].astype(np.float64)
    sw, sf, sg, sff, sgg, sfg = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = sfg - sf * sg / sw
        var_f = sff - sf * sf / sw
        var_g = sgg - sg * sg / sw
        ncc = cov / np.sqrt(var_f * var_g)
    tiny = 1e-9
    ok = (
        (sw >= max(min_overlap, 1.0))
        & (var_f > tiny * np.maximum(sff, tiny))
        & (var_g > tiny * np.maximum(sgg, tiny))
        & np.isfinite(ncc)
    )
    return np.where(ok, np.clip(ncc, -1.0, 1.0), -np.inf)


def _peak_ratio(
    surface: np.ndarray, peak: tuple[int, int], exclusion: int = _EXCLUSION
) -> float:
    """Peak value over the highest finite value outside the exclusion zone."""
    top = float(surface[peak])
    if not math.isfinite(top) or top <= 0:
        return 0.0
    rest = surface.copy()
    py, px = peak
    rest[
        max(py - exclusion, 0) : py + exclusion + 1,
        max(px - exclusion, 0) : px + exclusion + 1,
    ] = -np.inf
    second = float(rest.max()) if rest.size else -math.inf
    if second <= top / _RATIO_CAP:
        return _RATIO_CAP
    return top / second


def _taper1d(n: int, alpha: float) -> np.ndarray:
    """Tukey window: flat top, Hann (raised-cosine) flanks over ``alpha / 2`` of each end."""
    x = (np.arange(n) + 0.5) / n
    edge = max(alpha / 2.0, 1e-9)
    ramp = np.minimum(np.minimum(x, 1.0 - x) / edge, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * ramp)


@lru_cache(maxsize=16)
def _taper(h: int, w: int) -> np.ndarray:
    """Read-only 2-D Tukey taper of an (h, w) window (cached)."""
    win = np.outer(_taper1d(h, _TAPER_ALPHA), _taper1d(w, _TAPER_ALPHA)).astype(
        np.float32
    )
    win.setflags(write=False)
    return win


def _upsampled_dft(
    spectrum: np.ndarray,
    n_cols: int,
    centre: tuple[float, float],
    upsample: int,
    n_points: int,
) -> np.ndarray:
    """Cross-correlation sampled on a fine grid around ``centre`` (Guizar-Sicairos 2008).

    ``spectrum`` is the rfft2 half of the cross-power spectrum ``conj(A) * B``
    of two real images with ``n_cols`` columns. The result ``out[i, j]`` is the
    correlation at shift ``centre + ((i, j) - (n_points - 1) / 2) / upsample``,
    computed by two matrix products (the missing half of the spectrum is the
    complex conjugate of the stored one) instead of a zero-padded inverse FFT.
    """
    steps = (np.arange(n_points) - (n_points - 1) / 2.0) / upsample
    ky = sfft.fftfreq(spectrum.shape[0])
    kx = np.arange(spectrum.shape[1]) / n_cols
    # Hermitian symmetry: columns other than 0 and the Nyquist one count twice.
    twice = np.full(spectrum.shape[1], 2.0)
    twice[0] = 1.0
    if n_cols % 2 == 0:
        twice[-1] = 1.0
    row_kernel = np.exp(2j * np.pi * np.outer(centre[0] + steps, ky))
    col_kernel = np.exp(2j * np.pi * np.outer(kx, centre[1] + steps)) * twice[:, None]
    return np.real(_small_matmul(_small_matmul(row_kernel, spectrum), col_kernel))


def _small_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` as BLAS calls of at most ``_BLAS_CHUNK`` multiply-adds each.

    A threaded BLAS splits larger products over all cores; for products this
    small the threads cost more than they save, and on a busy machine (or
    next to other worker processes) their spin-waiting slows the whole
    estimate down several times.
    """
    step = max(1, _BLAS_CHUNK // max(a.shape[0] * a.shape[1], 1))
    if b.shape[1] <= step:
        return a @ b
    return np.concatenate(
        [a @ b[:, i : i + step] for i in range(0, b.shape[1], step)], axis=1
    )


def _parabola(minus: float, mid: float, plus: float) -> float:
    """Offset of the vertex of the parabola through three equally spaced samples."""
    denom = minus - 2.0 * mid + plus
    if denom >= 0 or not math.isfinite(denom):
        return 0.0
    return float(np.clip(0.5 * (minus - plus) / denom, -0.5, 0.5))


def _subpixel(
    f: np.ndarray,
    wf: np.ndarray,
    g: np.ndarray,
    wg: np.ndarray,
    upsample: int,
    search: int = 1,
) -> tuple[float, float, bool]:
    """Sub-pixel residual shift of ``g`` relative to ``f`` (both the same size).

    Tapered (Tukey window x weight), mean-free, not phase-normalised
    cross-correlation;
    the integer peak is searched within +/-``search`` pixels, then refined by
    the upsampled DFT and a parabolic fit. Returns ``(dy, dx, ok)``; ``ok`` is
    False if the peak is not positive or lies on the edge of the search.
    """
    h, w = f.shape
    # One weight for both windows: with different weights (e.g. different
    # no-data edges) the correlation would not be symmetric about the true
    # shift, and its peak would be biased even once the content is aligned.
    common = wf * wg * _taper(h, w)
    total = float(common.sum(dtype=np.float64))
    if total <= 0:
        return 0.0, 0.0, False
    a = (f - np.float32(float((f * common).sum(dtype=np.float64)) / total)) * common
    b = (g - np.float32(float((g * common).sum(dtype=np.float64)) / total)) * common
    spectra = sfft.rfft2(
        np.stack([a, b]).astype(np.float32, copy=False),
        axes=(-2, -1),
    )
    spectrum = (np.conj(spectra[0]) * spectra[1]).astype(np.complex128)
    local = _upsampled_dft(spectrum, w, (0.0, 0.0), 1, 2 * search + 1)
    iy, ix = np.unravel_index(int(np.argmax(local)), local.shape)
    if not local[iy, ix] > 0:
        return 0.0, 0.0, False
    peak = (int(iy) - search, int(ix) - search)
    n_points = 2 * int(math.ceil(0.75 * upsample)) + 1
    fine = _upsampled_dft(
        spectrum, w, (float(peak[0]), float(peak[1])), upsample, n_points
    )
    iy, ix = np.unravel_index(int(np.argmax(fine)), fine.shape)
    dy = peak[0] + (iy - (n_points - 1) / 2.0) / upsample
    dx = peak[1] + (ix - (n_points - 1) / 2.0) / upsample
    if 0 < iy < n_points - 1:
        dy += _parabola(fine[iy - 1, ix], fine[iy, ix], fine[iy + 1, ix]) / upsample
    if 0 < ix < n_points - 1:
        dx += _parabola(fine[iy, ix - 1], fine[iy, ix], fine[iy, ix + 1]) / upsample
    ok = max(abs(dy), abs(dx)) <= search
    return float(dy), float(dx), bool(ok)


# ----------------------------------------------------------------------------
# Coarse-to-fine search in one window
# ----------------------------------------------------------------------------


def _level_box(
    box: tuple[int, int, int, int], level: int, shape: tuple[int, int], cap: int | None
) -> tuple[int, int, int, int]:
    """A level-0 box scaled to ``level``, clipped to the image and to ``cap`` pixels."""
    r0, c0, h, w = box
    scale = 2**level
    ra, ca = -(-r0 // scale), -(-c0 // scale)
    rb, cb = min((r0 + h) // scale, shape[0]), min((c0 + w) // scale, shape[1])
    ra, ca = max(ra, 0), max(ca, 0)
    h, w = max(rb - ra, 0), max(cb - ca, 0)
    if cap is not None:
        if h > cap:
            ra, h = ra + (h - cap) // 2, cap
        if w > cap:
            ca, w = ca + (w - cap) // 2, cap
    return ra, ca, h, w


def _overlap_box(
    box: tuple[int, int, int, int], shift: tuple[int, int], shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Part of ``box`` whose pixels shifted by ``shift`` stay inside ``shape``."""
    r0, c0, h, w = box
    ra, rb = max(r0, -shift[0]), min(r0 + h, shape[0] - shift[0])
    ca, cb = max(c0, -shift[1]), min(c0 + w, shape[1] - shift[1])
    if rb - ra < 16 or cb - ca < 16:
        return box
    return ra, ca, rb - ra, cb - ca


def _ncc_peak(
    f: np.ndarray,
    wf: np.ndarray,
    g: np.ndarray,
    wg: np.ndarray,
    centre: tuple[int, int],
    limit: int | None,
) -> tuple[tuple[int, int], float]:
    """Best integer shift and peak ratio of the NCC of ``f`` with ``g``.

    ``g`` is larger than ``f`` by ``2 R`` per axis and covers the shifts
    ``centre +/- R``; only shifts within ``limit`` per axis may win. Returns
    ``(centre, 0.0)`` if no shift has enough overlap.
    """
    radius = (g.shape[0] - f.shape[0]) // 2
    surface = _ncc_surface(f, wf, g, wg, _MIN_OVERLAP * float(wf.sum(dtype=np.float64)))
    allowed = surface
    if limit is not None:
        sy = centre[0] - radius + np.arange(2 * radius + 1)
        sx = centre[1] - radius + np.arange(2 * radius + 1)
        inside = (np.abs(sy)[:, None] <= limit) & (np.abs(sx)[None, :] <= limit)
        allowed = np.where(inside, surface, -np.inf)
    flat = int(np.argmax(allowed))
    peak = (flat // allowed.shape[1], flat % allowed.shape[1])
    if not math.isfinite(float(allowed[peak])):
        return centre, 0.0
    best = (centre[0] + peak[0] - radius, centre[1] + peak[1] - radius)
    return best, _peak_ratio(surface, peak)


def _search(
    ref: _Pyramid,
    mov: _Pyramid,
    level: int,
    box: tuple[int, int, int, int],
    centre: tuple[int, int],
    radius: int,
    limit: int | None,
) -> tuple[tuple[int, int], float]:
    """NCC search of the shifts ``centre +/- radius`` of one window at one level."""
    r0, c0, h, w = box
    f, wf = ref.window(level, r0, c0, h, w)
    g, wg = mov.window(
        level,
        r0 + centre[0] - radius,
        c0 + centre[1] - radius,
        h + 2 * radius,
        w + 2 * radius,
    )
    return _ncc_peak(f, wf, g, wg, centre, limit)


def _similarity(
    f: np.ndarray, wf: np.ndarray, g: np.ndarray, wg: np.ndarray, block: int
) -> np.ndarray:
    """Weight map that keeps the parts of two aligned windows that still match.

    The windows are cut into ``block`` x ``block`` blocks; in each, the
    correlation coefficient of the (mean-free, band-passed) features is
    computed over the pixels weighted in both. The map is ``clip(r, 0, 1) ** 2``
    per block (0 for blocks with fewer than a quarter of their pixels
    weighted), expanded to pixels: changed areas drop out of the sub-pixel
    estimate instead of adding noise to it.
    """
    h, w = f.shape
    nby, nbx = -(-h // block), -(-w // block)
    pad = ((0, nby * block - h), (0, nbx * block - w))
    both = np.pad(wf * wg, pad)
    fw = np.pad(f, pad) * both
    gp = np.pad(g, pad)
    shape = (nby, block, nbx, block)
    sfg = (fw * gp).reshape(shape).sum(axis=(1, 3), dtype=np.float64)
    sff = (fw * np.pad(f, pad)).reshape(shape).sum(axis=(1, 3), dtype=np.float64)
    sgg = (gp * gp * both).reshape(shape).sum(axis=(1, 3), dtype=np.float64)
    count = both.reshape(shape).sum(axis=(1, 3), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = sfg / np.sqrt(sff * sgg)
    r = np.where(
        (count >= 0.25 * block * block) & np.isfinite(r), np.clip(r, 0.0, 1.0), 0.0
    )
    weights = (r * r).astype(np.float32)
    return np.repeat(np.repeat(weights, block, axis=0), block, axis=1)[:h, :w]


def _measure(
    ref: _Pyramid,
    mov: _Pyramid,
    box: tuple[int, int, int, int],
    *,
    start_level: int,
    max_shift: float,
    upsample: int,
    coarse_cap: int | None,
    fine_cap: int | None,
    coarse_only: bool = False,
) -> _Window | None:
    """Coarse-to-fine shift of the content of ``box`` (level-0 pixels).

    NCC over the whole search range at ``start_level``, NCC within
    +/-``_REFINE_RADIUS`` at each finer level, then at level 0 the tapered
    correlation of the windows reweighted by their local similarity (integer
    peak within +/-1, sub-pixel peak), repeated on the moving window resampled
    onto the estimate until the correction is below 0.002 pixel (at most
    ``_RESAMPLE_ITERATIONS`` times). With ``coarse_only``, stop after the
    first search and return its integer shift scaled to level 0.
    """
    level = start_level
    cbox = _level_box(box, level, ref.shape(level), coarse_cap)
    if cbox[2] < 8 or cbox[3] < 8:
        return None
    limit = int(math.ceil(max_shift / 2**level))
    radius = max(limit + 1, _MIN_EVAL_RADIUS)
    shift, ratio = _search(ref, mov, level, cbox, (0, 0), radius, limit)
    if ratio == 0.0:
        return None
    if coarse_only:
        scale = 2**level
        return _Window(shift[0] * scale, shift[1] * scale, ratio, 0, True)
    consistent = True
    while level > 1:
        level -= 1
        shift = (2 * shift[0], 2 * shift[1])
        fbox = _fine_box(box, level, shift, ref, mov, fine_cap)
        new, _ = _search(ref, mov, level, fbox, shift, _REFINE_RADIUS, None)
        if max(abs(new[0] - shift[0]), abs(new[1] - shift[1])) >= _REFINE_RADIUS:
            consistent = False
        shift = new
    # Level 0: one moving window, wide enough for the last NCC refinement and
    # for resampling around its result.
    m = _RESAMPLE_MARGIN
    extra = _REFINE_RADIUS if level == 1 else 0
    if level == 1:
        shift = (2 * shift[0], 2 * shift[1])
    r0, c0, h, w = _fine_box(box, 0, shift, ref, mov, fine_cap)
    f, wf = ref.window(0, r0, c0, h, w)
    margin = m + extra
    wide_g, wide_wg = mov.window(
        0,
        r0 + shift[0] - margin,
        c0 + shift[1] - margin,
        h + 2 * margin,
        w + 2 * margin,
    )
    oy = ox = 0
    if extra:
        inner = slice(m, m + h + 2 * extra), slice(m, m + w + 2 * extra)
        new, _ = _ncc_peak(f, wf, wide_g[inner], wide_wg[inner], shift, None)
        oy, ox = new[0] - shift[0], new[1] - shift[1]
        if max(abs(oy), abs(ox)) >= _REFINE_RADIUS:
            consistent = False
        shift = new
    big = (
        slice(extra + oy, extra + oy + h + 2 * m),
        slice(extra + ox, extra + ox + w + 2 * m),
    )
    big_g, big_wg = wide_g[big], wide_wg[big]
    g, wg = big_g[m : h + m, m : w + m], big_wg[m : h + m, m : w + m]
    sim = _similarity(f, wf, g, wg, _SIMILARITY_BLOCK)
    wf, wg = wf * sim, wg * sim
    dy, dx, ok = _refine(f, wf, big_g, big_wg, sim, shift, upsample)
    if not ok:
        consistent = False
    n_valid = int(np.count_nonzero((wf > 0) & (wg > 0)))
    if max(abs(dy), abs(dx)) > max_shift + 1.0:
        consistent = False
    return _Window(
        dy=float(dy),
        dx=float(dx),
        peak_ratio=float(ratio),
        n_valid=n_valid,
        consistent=consistent,
    )


def _refine(
    f: np.ndarray,
    wf: np.ndarray,
    big_g: np.ndarray,
    big_wg: np.ndarray,
    sim: np.ndarray,
    shift: tuple[int, int],
    upsample: int,
) -> tuple[float, float, bool]:
    """Sub-pixel shift at level 0, re-measured on the resampled moving window.

    ``big_g, big_wg`` extend the moving window aligned at the integer ``shift``
    by ``_RESAMPLE_MARGIN`` on each side; ``wf`` and ``sim`` already carry the
    similarity weights. The taper and the weights stay put while the content is
    misaligned by the residual, which biases the peak in proportion to it, so
    the moving window is resampled (cubic spline) onto the current estimate and
    what is left is measured again, until the correction is below 0.002 pixel.
    """
    m = _RESAMPLE_MARGIN
    h, w = f.shape
    g, wg = big_g[m : h + m, m : w + m], big_wg[m : h + m, m : w + m] * sim
    ry, rx, ok = _subpixel(f, wf, g, wg, upsample)
    dy, dx = shift[0] + ry, shift[1] + rx
    for _ in range(_RESAMPLE_ITERATIONS if ok else 0):
        fy, fx = dy - shift[0], dx - shift[1]
        if max(abs(fy), abs(fx)) > m - 2:
            return dy, dx, False
        g = ndi.shift(big_g, (-fy, -fx), order=3, mode="nearest")[m : h + m, m : w + m]
        iy, ix = round(fy), round(fx)
        wg = big_wg[m + iy : h + m + iy, m + ix : w + m + ix] * sim
        ry, rx, ok = _subpixel(f, wf, g, wg, upsample)
        if not ok:
            break
        dy, dx = dy + ry, dx + rx
        if max(abs(ry), abs(rx)) < 0.002:
            break
    return dy, dx, ok


def _fine_box(
    box: tuple[int, int, int, int],
    level: int,
    shift: tuple[int, int],
    ref: _Pyramid,
    mov: _Pyramid,
    cap: int | None,
) -> tuple[int, int, int, int]:
    """``box`` at ``level``, reduced to its overlap with the shifted moving image and to ``cap``."""
    fbox = _level_box(box, level, ref.shape(level), None)
    return _level_box(
        _overlap_box(fbox, shift, mov.shape(level)), 0, ref.shape(level), cap
    )


# ----------------------------------------------------------------------------
# Consensus
# ----------------------------------------------------------------------------


def _consensus(
    dy: np.ndarray, dx: np.ndarray, usable: np.ndarray
) -> tuple[float, float, np.ndarray, float, int]:
    """Translation consensus of the usable window shifts.

    Every usable shift is tried as a hypothesis; the one with most shifts
    within ``_RANSAC_TOL`` wins (ties: smallest summed distance). Its inliers
    are refined by a MAD threshold around their centre; the mean of the final
    inliers is returned with the inlier mask, their RMSE and the size of the
    largest rival cluster (votes farther than ``2 * _RANSAC_TOL`` from the
    consensus that agree among themselves).
    """
    idx = np.flatnonzero(usable)
    inliers = np.zeros(dy.shape, bool)
    if idx.size == 0:
        return math.nan, math.nan, inliers, math.nan, 0
    py, px = dy[idx], dx[idx]
    dist = np.hypot(py[:, None] - py[None, :], px[:, None] - px[None, :])
    close = dist <= _RANSAC_TOL
    count = close.sum(axis=1)
    spread = np.where(close, dist, 0.0).sum(axis=1)
    best = int(np.lexsort((spread, -count))[0])
    keep = close[best]
    cy, cx = float(np.median(py[keep])), float(np.median(px[keep]))
    for _ in range(3):
        resid = np.hypot(py - cy, px - cx)
        threshold = max(_MAD_FLOOR, _MAD_K * 1.4826 * float(np.median(resid[keep])))
        new_keep = resid <= threshold
        if not new_keep.any():
            break
        keep = new_keep
        cy, cx = float(py[keep].mean()), float(px[keep].mean())
    resid = np.hypot(py[keep] - cy, px[keep] - cx)
    inliers[idx[keep]] = True
    rivals = np.hypot(py - cy, px - cx) > 2.0 * _RANSAC_TOL
    rival = int(close[np.ix_(rivals, rivals)].sum(axis=1).max()) if rivals.any() else 0
    return cy, cx, inliers, float(np.sqrt(np.mean(resid**2))), rival


def _tile_starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    n = (size - tile) // step + 1
    first = ((size - tile) - (n - 1) * step) // 2
    return [first + i * step for i in range(n)]


def _tile_boxes(
    shape: tuple[int, int], tile: int, step: int, max_tiles: int
) -> list[tuple[int, int, int, int]]:
    rows, cols = shape
    while True:
        starts_r, starts_c = (
            _tile_starts(rows, tile, step),
            _tile_starts(cols, tile, step),
        )
        if len(starts_r) * len(starts_c) <= max_tiles:
            break
        step = int(math.ceil(step * 1.1)) + 1
    return [
        (r, c, min(tile, rows), min(tile, cols)) for r in starts_r for c in starts_c
    ]


# ----------------------------------------------------------------------------
# Public estimators
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    ref: _Pyramid
    mov: _Pyramid
    shape: tuple[int, int]
    max_shift: float
    upsample: int
    min_peak_ratio: float
    min_vote_ratio: float
    tile: int


def _setup(
    reference: ArrayLike,
    moving: ArrayLike,
    reference_valid: ArrayLike | None,
    moving_valid: ArrayLike | None,
    *,
    max_shift: float,
    upsample_factor: int,
    min_peak_ratio: float,
    min_vote_ratio: float,
    sigma_low: float,
    sigma_high: float,
    texture_threshold: float,
    tile: int | None,
    use_tiles: bool,
) -> _Setup:
    """Check the inputs, resolve the default tile size and build both pyramids."""
    ref = _check_image(reference, "reference")
    mov = _check_image(moving, "moving")
    if ref.shape[-2:] != mov.shape[-2:]:
        raise ValueError(
            f"reference and moving must have the same (rows, cols), got {ref.shape[-2:]} and {mov.shape[-2:]}"
        )
    ref_mask = _check_valid(reference_valid, ref, "reference_valid")
    mov_mask = _check_valid(moving_valid, mov, "moving_valid")
    max_shift = _check_positive(max_shift, "max_shift", allow_zero=True)
    upsample = _check_int(upsample_factor, "upsample_factor", 1)
    min_peak_ratio = _check_positive(min_peak_ratio, "min_peak_ratio")
    min_vote_ratio = _check_positive(min_vote_ratio, "min_vote_ratio")
    sigma_low, sigma_high = _check_sigmas(sigma_low, sigma_high)
    texture_threshold = _check_positive(
        texture_threshold, "texture_threshold", allow_zero=True
    )
    shape = (int(ref.shape[-2]), int(ref.shape[-1]))
    ref_lum, ref_mask = _luminance(ref, ref_mask)
    mov_lum, mov_mask = _luminance(mov, mov_mask)
    if not ref_mask.any():
        raise ValueError("reference_valid leaves no valid pixel in reference")
    if not mov_mask.any():
        raise ValueError("moving_valid leaves no valid pixel in moving")
    levels = _n_levels(min(shape), max_shift, _MIN_LEVEL_SIZE)
    if tile is None:
        tile = _DEFAULT_TILE_LARGE if min(shape) >= 1024 else _DEFAULT_TILE_SMALL
    tile = _check_int(tile, "tile", _MIN_WINDOW)
    if use_tiles:
        levels = max(levels, _n_levels(min(tile, *shape), max_shift, _MIN_WINDOW))
    args = (levels, sigma_low, sigma_high, texture_threshold)
    return _Setup(
        ref=_Pyramid(ref_lum, ref_mask, *args),
        mov=_Pyramid(mov_lum, mov_mask, *args),
        shape=shape,
        max_shift=max_shift,
        upsample=upsample,
        min_peak_ratio=min_peak_ratio,
        min_vote_ratio=min_vote_ratio,
        tile=tile,
    )


def _global(setup: _Setup, window: int, *, coarse_only: bool = False) -> ShiftEstimate:
    """Whole-image coarse-to-fine estimate (integer, coarsest level only if asked)."""
    start = _n_levels(min(setup.shape), setup.max_shift, _MIN_LEVEL_SIZE)
    res = _measure(
        setup.ref,
        setup.mov,
        (0, 0, setup.shape[0], setup.shape[1]),
        start_level=start,
        max_shift=setup.max_shift,
        upsample=setup.upsample,
        coarse_cap=max(window, 1024),
        fine_cap=window,
        coarse_only=coarse_only,
    )
    if res is None:
        return ShiftEstimate(math.nan, math.nan, 0.0, 0, False, "none")
    reliable = res.consistent and res.peak_ratio >= setup.min_peak_ratio
    return ShiftEstimate(
        res.dy, res.dx, res.peak_ratio, res.n_valid, reliable, "global"
    )


def _tiles(
    setup: _Setup, step: int | None, max_tiles: int, min_inliers: int
) -> ShiftEstimate:
    """Consensus of the shifts measured independently in a grid of windows."""
    tile = setup.tile
    step = tile if step is None else step
    start = min(
        _n_levels(min(tile, *setup.shape), setup.max_shift, _MIN_WINDOW),
        len(setup.ref.levels) - 1,
    )
    rows: list[tuple[float, float, float, float, float, float]] = []
    consistent: list[bool] = []
    for box in _tile_boxes(setup.shape, tile, step, max_tiles):
        r0, c0, h, w = box
        if (
            float(setup.ref.levels[0][1][r0 : r0 + h, c0 : c0 + w].mean())
            < _MIN_WINDOW_VALID
        ):
            continue
        res = _measure(
            setup.ref,
            setup.mov,
            box,
            start_level=start,
            max_shift=setup.max_shift,
            upsample=setup.upsample,
            coarse_cap=None,
            fine_cap=None,
        )
        if res is None:
            continue
        rows.append(
            (
                r0 + (h - 1) / 2.0,
                c0 + (w - 1) / 2.0,
                res.dy,
                res.dx,
                res.peak_ratio,
                res.n_valid,
            )
        )
        consistent.append(res.consistent)
    table = np.array(rows, np.float64).reshape(-1, 6)
    dy, dx, ratio = table[:, 2], table[:, 3], table[:, 4]
    n_valid = table[:, 5].astype(np.int64)
    usable = np.array(consistent, bool) & (ratio >= setup.min_vote_ratio)
    cy, cx, inliers, rmse, rival = _consensus(dy, dx, usable)
    ties = TiePoints(
        row=table[:, 0].copy(),
        col=table[:, 1].copy(),
        dy=dy.copy(),
        dx=dx.copy(),
        peak_ratio=ratio.copy(),
        n_valid=n_valid,
        accepted=inliers,
    )
    n_in = int(inliers.sum())
    n_out = int(usable.sum()) - n_in
    if n_in == 0:
        return ShiftEstimate(
            math.nan, math.nan, 0.0, 0, False, "tiles", 0, n_out, math.nan, ties
        )
    reliable = n_in >= min_inliers and n_in >= 2 * rival and rmse <= _MAX_RMSE
    return ShiftEstimate(
        dy=cy,
        dx=cx,
        peak_ratio=float(np.median(ratio[inliers])),
        n_valid=int(n_valid[inliers].sum()),
        reliable=bool(reliable),
        method="tiles",
        n_inliers=n_in,
        n_outliers=n_out,
        rmse=rmse,
        tie_points=ties,
    )


def estimate_shift(
    reference: ArrayLike,
    moving: ArrayLike,
    *,
    reference_valid: ArrayLike | None = None,
    moving_valid: ArrayLike | None = None,
    max_shift: float = 64,
    upsample_factor: int = 20,
    consensus: bool = True,
    tile: int | None = None,
    step: int | None = None,
    max_tiles: int = 64,
    min_inliers: int = 3,
    window: int = 512,
    min_peak_ratio: float = 1.5,
    min_vote_ratio: float = 1.2,
    sigma_low: float = 1.0,
    sigma_high: float = 4.0,
    texture_threshold: float = 0.25,
) -> ShiftEstimate:
    """Estimate the translation of ``moving`` relative to ``reference``.

    Parameters
    ----------
    reference, moving : (M, N) or (B, M, N) array_like
        Before and after images on the same pixel grid (the band counts may
        differ: the bands are averaged). Non-finite values count as no-data.
        Any real dtype (the work is done in float32).
    reference_valid, moving_valid : (M, N) or (B, M, N) array_like of bool, optional
        True on valid pixels. Default: every finite pixel.
    max_shift : float, optional
        Largest shift searched, per axis, in pixels.
    upsample_factor : int, optional
        The sub-pixel peak is located on a grid of ``1 / upsample_factor``
        pixel, then refined by a parabolic fit.
    consensus : bool, optional
        Also measure the shift in a grid of windows (see
        :func:`estimate_shift_tiles`) and return their consensus when it is
        reliable. Skipped for images with fewer than 4 windows.
    tile, step, max_tiles, min_inliers, min_vote_ratio
        Settings of the window consensus, see :func:`estimate_shift_tiles`.
    window : int, optional
        Largest side, in pixels, of the window used at the finer pyramid levels
        of the whole-image estimate (centred on the overlap).
    min_peak_ratio : float, optional
        Smallest peak ratio of a reliable whole-image estimate.
    sigma_low, sigma_high, texture_threshold : float, optional
        Band-pass and texture settings, see :func:`prepare`. They apply at every
        pyramid level, in that level's pixels.

    Returns
    -------
    ShiftEstimate
        ``dy``, ``dx`` in pixels with ``moving[r + dy, c + dx] ~= reference[r, c]``,
        quality figures and, with ``consensus``, the per-window tie points.
        The consensus is returned (``method="tiles"``) when it is reliable
        (it is marked unreliable if a confident whole-image search at the
        coarsest pyramid level points more than one coarse pixel elsewhere);
        otherwise the whole-image estimate (``method="global"``, with the tie
        points and vote counts attached), reliable or not; the consensus only
        if the whole image gave nothing. ``dy`` and ``dx`` are NaN when nothing
        could be measured.

    Raises
    ------
    ValueError
        If an image is not a real 2-D or 3-D array of at least 16 x 16 pixels,
        the images differ in (rows, cols), a mask does not match its image or
        has no valid pixel, or a setting is out of range.

    See Also
    --------
    estimate_shift_tiles : the window consensus on its own.
    apply_shift : resample ``moving`` onto the reference grid.

    Notes
    -----
    The whole-image estimate searches every integer shift within
    ``max_shift`` with a masked, weighted normalised cross-correlation [2]_ at
    the coarsest level of an image pyramid (2x2 block means, coarsened until at
    most 8 pixels of shift are left), and refines it by +/-2 pixels at each
    finer level. At full resolution the windows are reweighted by their local
    similarity (correlation coefficient in 16-pixel blocks, squared), so that
    changed areas drop out, and the peak of their tapered, band-passed
    cross-correlation without phase normalisation is located with the
    upsampled DFT [1]_. The moving window is then resampled (cubic spline)
    onto the estimate and the residual measured again, up to three times,
    which removes the bias a fixed taper causes. The taper is a Tukey window
    with Hann flanks over the outer 12.5 % of each side rather than a full
    Hann window: in a mostly changed scene the stable content may lie near the
    window edges, where a full Hann window leaves almost no weight.

    The estimate is reliable if its peak ratio reaches ``min_peak_ratio`` and
    every refinement stayed inside its search window. Whole-image correlation
    can fail on scenes where most of the content changed; the window consensus
    does not, as long as a few windows see stable structure.

    References
    ----------
    .. [1] M. Guizar-Sicairos, S. T. Thurman and J. R. Fienup, "Efficient
           subpixel image registration algorithms," Optics Letters 33(2),
           156-158 (2008).
    .. [2] D. Padfield, "Masked object registration in the Fourier domain,"
           IEEE Transactions on Image Processing 21(5), 2706-2718 (2012).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage as ndi
    >>> rng = np.random.default_rng(0)
    >>> ref = ndi.gaussian_filter(rng.standard_normal((256, 256)), 2.0)
    >>> mov = ndi.shift(ref, (3.0, -5.0), order=3, mode="nearest")
    >>> est = estimate_shift(ref, mov, max_shift=16)
    >>> round(est.dy, 1), round(est.dx, 1), est.reliable
    (3.0, -5.0, True)
    """
    step = None if step is None else _check_int(step, "step", 1)
    max_tiles = _check_int(max_tiles, "max_tiles", 1)
    min_inliers = _check_int(min_inliers, "min_inliers", 1)
    window = _check_int(window, "window", _MIN_WINDOW)
    setup = _setup(
        reference,
        moving,
        reference_valid,
        moving_valid,
        max_shift=max_shift,
        upsample_factor=upsample_factor,
        min_peak_ratio=min_peak_ratio,
        min_vote_ratio=min_vote_ratio,
        sigma_low=sigma_low,
        sigma_high=sigma_high,
        texture_threshold=texture_threshold,
        tile=tile,
        use_tiles=consensus,
    )
    n_boxes = len(_tile_boxes(setup.shape, setup.tile, step or setup.tile, max_tiles))
    if not consensus or n_boxes < 4:
        return _global(setup, window)
    tiles = _tiles(setup, step, max_tiles, min_inliers)
    if tiles.reliable:
        # Cross-check with the whole-image search at the coarsest level (its
        # integer shift is good to one coarse pixel): two confident answers
        # that disagree make the consensus unreliable.
        coarse = _global(setup, window, coarse_only=True)
        scale = 2 ** _n_levels(min(setup.shape), setup.max_shift, _MIN_LEVEL_SIZE)
        if (
            coarse.reliable
            and max(abs(tiles.dy - coarse.dy), abs(tiles.dx - coarse.dx))
            > scale + _AGREE_TOL
        ):
            return replace(tiles, reliable=False)
        return tiles
    glob = _global(setup, window)
    if glob.method == "none" and tiles.n_inliers > 0:
        return tiles
    return replace(
        glob,
        n_inliers=tiles.n_inliers,
        n_outliers=tiles.n_outliers,
        tie_points=tiles.tie_points,
    )


def estimate_shift_tiles(
    reference: ArrayLike,
    moving: ArrayLike,
    *,
    reference_valid: ArrayLike | None = None,
    moving_valid: ArrayLike | None = None,
    max_shift: float = 64,
    upsample_factor: int = 20,
    tile: int | None = None,
    step: int | None = None,
    max_tiles: int = 64,
    min_inliers: int = 3,
    min_vote_ratio: float = 1.2,
    sigma_low: float = 1.0,
    sigma_high: float = 4.0,
    texture_threshold: float = 0.25,
) -> ShiftEstimate:
    """Estimate the translation by the consensus of shifts measured in windows.

    Each window of a regular grid searches every shift within ``max_shift``
    on its own, coarse-to-fine as in :func:`estimate_shift`; the windows
    whose peak ratio reaches ``min_vote_ratio`` vote for a translation.

    Parameters
    ----------
    reference, moving : (M, N) or (B, M, N) array_like
        Before and after images on the same pixel grid.
    reference_valid, moving_valid : (M, N) or (B, M, N) array_like of bool, optional
        True on valid pixels. Default: every finite pixel.
    max_shift : float, optional
        Largest shift searched, per axis, in pixels.
    upsample_factor : int, optional
        Sub-pixel grid of each window's estimate, ``1 / upsample_factor`` pixel.
    tile : int, optional
        Window side in pixels (at least 64; clipped to the image). Default:
        256 for images of at least 1024 pixels on their short side, else 128.
    step : int, optional
        Spacing of the windows; default ``tile`` (no overlap).
    max_tiles : int, optional
        Largest number of windows; the spacing grows to respect it.
    min_inliers : int, optional
        Smallest number of agreeing windows of a reliable consensus.
    min_vote_ratio : float, optional
        Smallest peak ratio of a window that votes. Unrelated windows reach
        about 1.0-1.5; what makes the consensus safe is that their votes
        scatter over the whole search range while true matches agree.
    sigma_low, sigma_high, texture_threshold : float, optional
        Band-pass and texture settings, see :func:`prepare`.

    Returns
    -------
    ShiftEstimate
        ``method="tiles"``; ``dy``, ``dx`` are the mean of the inlier windows
        (NaN if no window voted); ``n_inliers``, ``n_outliers``, ``rmse`` and
        ``tie_points`` describe the vote. Reliable if at least ``min_inliers``
        windows agree, no rival cluster of votes is even half as large, and
        the inliers' RMSE is at most 1 pixel.

    Raises
    ------
    ValueError
        As :func:`estimate_shift`.

    Notes
    -----
    The consensus tries every voting window's shift as a translation
    hypothesis (an exhaustive RANSAC [3]_, cheap for a few hundred windows)
    and keeps the one with the most votes within 1 pixel. Its inliers are
    then refined three times: residual distances to the current centre,
    threshold ``max(0.25, 3 * 1.4826 * median residual)`` pixels, new centre =
    mean of the kept shifts. A rival cluster is the largest group of votes
    within 1 pixel of one another and more than 2 pixels from the consensus.

    References
    ----------
    .. [3] M. A. Fischler and R. C. Bolles, "Random sample consensus,"
           Communications of the ACM 24(6), 381-395 (1981).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage as ndi
    >>> rng = np.random.default_rng(0)
    >>> ref = ndi.gaussian_filter(rng.standard_normal((256, 256)), 2.0)
    >>> mov = ndi.shift(ref, (3.0, -5.0), order=3, mode="nearest")
    >>> est = estimate_shift_tiles(ref, mov, max_shift=16, tile=128)
    >>> round(est.dy, 1), round(est.dx, 1), est.n_inliers
    (3.0, -5.0, 4)
    """
    step = None if step is None else _check_int(step, "step", 1)
    max_tiles = _check_int(max_tiles, "max_tiles", 1)
    min_inliers = _check_int(min_inliers, "min_inliers", 1)
    setup = _setup(
        reference,
        moving,
        reference_valid,
        moving_valid,
        max_shift=max_shift,
        upsample_factor=upsample_factor,
        min_peak_ratio=1.0,
        min_vote_ratio=min_vote_ratio,
        sigma_low=sigma_low,
        sigma_high=sigma_high,
        texture_threshold=texture_threshold,
        tile=tile,
        use_tiles=True,
    )
    return _tiles(setup, step, max_tiles, min_inliers)


# ----------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------


def apply_shift(
    image: ArrayLike,
    shift: tuple[float, float],
    *,
    valid: ArrayLike | None = None,
    order: int = 1,
    fill_value: float = np.nan,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``image`` (the moving image) onto the reference grid.

    ``out[r, c] = image[r + dy, c + dx]``, the inverse of the shift found by
    :func:`estimate_shift`.

    Parameters
    ----------
    image : (M, N) or (B, M, N) array_like
        Image to resample.
    shift : (float, float)
        ``(dy, dx)`` in pixels, e.g. ``estimate.shift``.
    valid : (M, N) or (B, M, N) array_like of bool, optional
        True on valid pixels of ``image``. Default: every finite pixel.
    order : int, optional
        Spline order of the interpolation, 0 to 5 (1: bilinear).
    fill_value : float, optional
        Value written where the output is not valid.

    Returns
    -------
    aligned : ndarray
        Same shape as ``image``; float32 for float16/float32 input, float64
        otherwise (as skimage's ``_supported_float_type``).
    aligned_valid : (M, N) ndarray of bool
        True where every input pixel the interpolation used was valid and
        inside the image.

    Raises
    ------
    ValueError
        If ``image`` is not a real 2-D or 3-D array, ``valid`` does not match
        it, ``shift`` is not two finite numbers or ``order`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> aligned, ok = apply_shift(np.arange(25.0).reshape(5, 5), (1.0, 0.0))
    >>> aligned[0].tolist(), bool(ok[-1].any())
    ([5.0, 6.0, 7.0, 8.0, 9.0], False)
    """
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"image must be a (rows, cols) or (bands, rows, cols) array, got {arr.ndim} dimensions"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"image must be a real numeric array, got dtype {arr.dtype}")
    mask = _check_valid(valid, arr, "valid")
    try:
        dy, dx = (float(v) for v in shift)
    except (TypeError, ValueError):
        raise ValueError(f"shift must be two numbers (dy, dx), got {shift!r}") from None
    if not (math.isfinite(dy) and math.isfinite(dx)):
        raise ValueError(f"shift must be finite, got {(dy, dx)}")
    order = _check_int(order, "order", 0)
    if order > 5:
        raise ValueError(f"order must be between 0 and 5, got {order}")
    dtype = np.float32 if arr.dtype in (np.float16, np.float32) else np.float64
    data = arr.astype(dtype) if arr.ndim == 3 else arr.astype(dtype)[None]
    finite = np.isfinite(data).all(axis=0)
    mask = finite if mask is None else mask & finite
    rows, cols = mask.shape
    out = np.empty_like(data)
    for i, band in enumerate(data):
        filled = band.copy()
        if not mask.all():
            filled[~mask] = band[mask].mean() if mask.any() else 0.0
        out[i] = ndi.shift(
            filled, (-dy, -dx), order=order, mode="nearest", prefilter=order > 1
        )
    # A pixel is valid if every source pixel of its interpolation was valid
    # (splines of order > 1 reach further: grow the no-data accordingly).
    base = mask
    if order > 1 and not mask.all():
        base = ~ndi.binary_dilation(~mask, iterations=(order + 1) // 2, border_value=0)
    support = ndi.shift(
        base.astype(np.float32), (-dy, -dx), order=1, mode="constant", cval=0.0
    )
    ok = support >= 1.0 - 1e-4
    rr = np.arange(rows) + dy
    cc = np.arange(cols) + dx
    tol = 1e-6
    ok &= ((rr >= -tol) & (rr <= rows - 1 + tol))[:, None] & (
        (cc >= -tol) & (cc <= cols - 1 + tol)
    )[None, :]
    out[:, ~ok] = fill_value
    return (out if arr.ndim == 3 else out[0]), ok
