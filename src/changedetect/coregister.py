"""Co-registration: the translation, affine or local model that aligns an after image.

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
   resampled onto the estimate and the residual measured again (up to four
   times, with Tukey-biweight weights on the pixel residuals), which removes
   the bias of a taper that stays put while the content moves. The taper is a Tukey window (Hann flanks over the outer 12.5 % of
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

5. Local model (:func:`register`): a dense grid of windows is measured around
   the shift the global estimate (or an affine model of its windows)
   predicts; outliers are rejected (affine RANSAC for the trend, normalised
   median test among neighbours); translation, affine and a thin-plate-spline
   displacement field are compared by spatially blocked cross-validation, and
   a richer model is used only when it cuts the held-out error significantly.
   The result (:class:`Registration`) carries the :class:`GeometricModel` to
   apply in one resampling, its held-out residual and a reliability verdict.
   Where most of the scene changed (and across sensors) single tie points
   are noisy: a model whose held-out residual is above 1 pixel is still
   reliable when that scatter has no spatial structure (a permutation test
   of the correlation between neighbouring residuals) and averages out over
   the inliers (standard error of the model at most 0.5 pixel).

Every window grid (the consensus windows, the dense tie points) and the
whole-image search are laid over the bounding box of the pixels valid in
both images, not over the whole grid: an after image that covers only part
of the before image gets all its windows where it has data, and the coarsest
pyramid level is chosen so that this overlap keeps at least 64 pixels on its
short side.

Cast shadows move with the sun between the dates. In built-up scenes their
edges are a large share of all edges and bias a translation toward their own
displacement: :func:`register` leaves out the dark mode of the luminance
histogram when both images have a distinct one (``shadows=None``), and the
sub-pixel step down-weights pixels whose residual is an outlier (Tukey
biweight), so that content that moved on its own drops out.

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
    "MODELS",
    "GeometricModel",
    "Registration",
    "ShiftEstimate",
    "TiePoints",
    "apply_shift",
    "estimate_shift",
    "estimate_shift_tiles",
    "prepare",
    "reframe",
    "register",
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
_RESAMPLE_ITERATIONS = 4
# Tuning constant of the Tukey biweight (95 % efficiency under Gaussian noise).
_TUKEY_C = 4.685
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
    similarity : (N,) ndarray of float64 or None
        Share (0-1) of each window that still matches once aligned: the
        mean of its block similarity weights (see :func:`estimate_shift`).
    residual : (N,) ndarray of float64 or None
        Distance (pixels) of each window's shift from the fitted model
        (:func:`register` only).
    """

    row: NDArray[np.float64]
    col: NDArray[np.float64]
    dy: NDArray[np.float64]
    dx: NDArray[np.float64]
    peak_ratio: NDArray[np.float64]
    n_valid: NDArray[np.int64]
    accepted: NDArray[np.bool_]
    similarity: NDArray[np.float64] | None = None
    residual: NDArray[np.float64] | None = None

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
        for name in ("similarity", "residual"):
            values = getattr(self, name)
            if values is not None:
                out[name] = [_json_float(v) for v in values]
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
    shadows_masked : bool
        True if the dark (cast-shadow) mode of both images was left out.
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
    shadows_masked: bool = False

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
            "shadows_masked": bool(self.shadows_masked),
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
    similarity: float = math.nan


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
    prior: tuple[int, int] | None = None,
) -> _Window | None:
    """Coarse-to-fine shift of the content of ``box`` (level-0 pixels).

    With ``prior`` (an integer shift at ``start_level``), the first search
    covers only ``prior +/- _MIN_EVAL_RADIUS`` instead of the whole range.

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
    consistent = True
    ratio = 0.0
    if prior is not None:
        # Search +/-_MIN_EVAL_RADIUS around the prior at level 0, in the same
        # moving window as the sub-pixel step (features computed once).
        level, shift, extra = 0, prior, _MIN_EVAL_RADIUS
    else:
        limit = int(math.ceil(max_shift / 2**level))
        radius = max(limit + 1, _MIN_EVAL_RADIUS)
        shift, ratio = _search(ref, mov, level, cbox, (0, 0), radius, limit)
        if ratio == 0.0:
            return None
        if coarse_only:
            scale = 2**level
            return _Window(shift[0] * scale, shift[1] * scale, ratio, 0, True)
        while level > 1:
            level -= 1
            shift = (2 * shift[0], 2 * shift[1])
            fbox = _fine_box(box, level, shift, ref, mov, fine_cap)
            new, _ = _search(ref, mov, level, fbox, shift, _REFINE_RADIUS, None)
            if max(abs(new[0] - shift[0]), abs(new[1] - shift[1])) >= _REFINE_RADIUS:
                consistent = False
            shift = new
        extra = _REFINE_RADIUS if level == 1 else 0
        if level == 1:
            shift = (2 * shift[0], 2 * shift[1])
    # Level 0: one moving window, wide enough for the last NCC refinement and
    # for resampling around its result.
    m = _RESAMPLE_MARGIN
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
        new, local_ratio = _ncc_peak(f, wf, wide_g[inner], wide_wg[inner], shift, None)
        oy, ox = new[0] - shift[0], new[1] - shift[1]
        if prior is not None:
            if local_ratio == 0.0:
                return None
            ratio = local_ratio
        if max(abs(oy), abs(ox)) >= min(extra, _REFINE_RADIUS if prior is None else extra):
            consistent = False
        shift = new
    big = (
        slice(extra + oy, extra + oy + h + 2 * m),
        slice(extra + ox, extra + ox + w + 2 * m),
    )
    big_g, big_wg = wide_g[big], wide_wg[big]
    g, wg = big_g[m : h + m, m : w + m], big_wg[m : h + m, m : w + m]
    sim = _similarity(f, wf, g, wg, _SIMILARITY_BLOCK)
    ref_wf = wf
    wf, wg = wf * sim, wg * sim
    dy, dx, ok = _refine(f, wf, big_g, big_wg, sim, shift, upsample)
    if not ok:
        consistent = False
    n_valid = int(np.count_nonzero((wf > 0) & (wg > 0)))
    if prior is None and max(abs(dy), abs(dx)) > max_shift + 1.0:
        consistent = False
    # Share of the window that still matches once aligned (similarity-weighted).
    both = ref_wf * (big_wg[m : h + m, m : w + m] > 0)
    total = float(both.sum(dtype=np.float64))
    similarity = float((sim * both).sum(dtype=np.float64)) / total if total > 0 else 0.0
    return _Window(
        dy=float(dy),
        dx=float(dx),
        peak_ratio=float(ratio),
        n_valid=n_valid,
        consistent=consistent,
        similarity=similarity,
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
    coef = None
    for _ in range(_RESAMPLE_ITERATIONS if ok else 0):
        fy, fx = dy - shift[0], dx - shift[1]
        if max(abs(fy), abs(fx)) > m - 2:
            return dy, dx, False
        if coef is None:
            coef = ndi.spline_filter(big_g, order=3, mode="mirror", output=np.float32)
        g = _spline_crop(coef, fy, fx, m, h, w)
        iy, ix = round(fy), round(fx)
        wg = big_wg[m + iy : h + m + iy, m + ix : w + m + ix] * sim
        wg = wg * _robust_weights(f, g, wf * wg)
        ry, rx, ok = _subpixel(f, wf, g, wg, upsample)
        if not ok:
            break
        dy, dx = dy + ry, dx + rx
        if max(abs(ry), abs(rx)) < 0.002:
            break
    return dy, dx, ok


def _spline_crop(
    coef: np.ndarray, fy: float, fx: float, m: int, h: int, w: int
) -> np.ndarray:
    """Cubic B-spline samples at ``(m + i + fy, m + j + fx)`` for an (h, w) window.

    ``coef`` holds the spline coefficients (``ndi.spline_filter``) of a window
    with a margin of ``m >= |shift| + 2`` pixels; two separable 4-tap passes,
    the same values as ``ndi.shift(..., order=3)`` away from the margin.
    """

    def weights(t: float) -> tuple[float, float, float, float]:
        return (
            (1.0 - t) ** 3 / 6.0,
            (4.0 - 6.0 * t * t + 3.0 * t**3) / 6.0,
            (1.0 + 3.0 * t + 3.0 * t * t - 3.0 * t**3) / 6.0,
            t**3 / 6.0,
        )

    by, bx = math.floor(fy), math.floor(fx)
    wy, wx = weights(fy - by), weights(fx - bx)
    r0, c0 = m + by - 1, m + bx - 1
    rows = np.float32(wy[0]) * coef[r0 : r0 + h, c0 : c0 + w + 3]
    for k in range(1, 4):
        rows += np.float32(wy[k]) * coef[r0 + k : r0 + k + h, c0 : c0 + w + 3]
    out = np.float32(wx[0]) * rows[:, 0:w]
    for k in range(1, 4):
        out += np.float32(wx[k]) * rows[:, k : k + w]
    return out


def _robust_weights(f: np.ndarray, g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Tukey biweight of the residual of two aligned windows (M-estimation weights).

    The moving features are matched to the reference ones by a least-squares
    gain over the weighted pixels; pixels whose residual exceeds 4.685 robust
    standard deviations (1.4826 x the weighted median absolute residual) get
    weight 0, the others ``(1 - u**2)**2``. Content that moved on its own
    between the dates (edges of cast shadows, vehicles, leaning walls) leaves
    large residuals once the rest is aligned, and drops out of the estimate.
    """
    sel = w > 0
    if np.count_nonzero(sel) < 16:
        return np.ones_like(f)
    fs, gs = f[sel].astype(np.float64), g[sel].astype(np.float64)
    ws = w[sel].astype(np.float64)
    denom = float((ws * fs * fs).sum())
    gain = float((ws * fs * gs).sum()) / denom if denom > 0 else 1.0
    resid = np.abs(g - np.float32(gain) * f)
    scale = 1.4826 * float(np.median(resid[sel]))
    if not scale > 0:
        return np.ones_like(f)
    u = resid / np.float32(_TUKEY_C * scale)
    return np.where(u < 1.0, (1.0 - u * u) ** 2, 0.0).astype(np.float32)


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
    shadows_masked: bool = False
    #: Bounding box (row0, col0, rows, cols) of the pixels valid in both images:
    #: windows are laid out over it, not over the whole grid.
    overlap: tuple[int, int, int, int] | None = None

    @property
    def area(self) -> tuple[int, int, int, int]:
        """The overlap box, or the whole grid if there is none."""
        return self.overlap or (0, 0, self.shape[0], self.shape[1])


def _overlap_bbox(
    ref_mask: np.ndarray, mov_mask: np.ndarray
) -> tuple[int, int, int, int] | None:
    """Bounding box (row0, col0, rows, cols) of the pixels valid in both masks.

    None if no pixel is valid in both (e.g. images that overlap only once
    shifted): the whole grid is used then.
    """
    both = ref_mask & mov_mask
    rows = np.flatnonzero(both.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(both.any(axis=0))
    return (
        int(rows[0]),
        int(cols[0]),
        int(rows[-1] - rows[0] + 1),
        int(cols[-1] - cols[0] + 1),
    )


def _area_boxes(
    area: tuple[int, int, int, int],
    shape: tuple[int, int],
    tile: int,
    step: int,
    max_tiles: int,
) -> list[tuple[int, int, int, int]]:
    """Window grid over ``area`` (grown to at least one ``tile`` inside ``shape``)."""
    r0, c0, h, w = area
    # An overlap narrower than a window: widen the area around its centre.
    if h < tile:
        r0 = min(max(r0 - (tile - h) // 2, 0), max(shape[0] - tile, 0))
        h = min(tile, shape[0])
    if w < tile:
        c0 = min(max(c0 - (tile - w) // 2, 0), max(shape[1] - tile, 0))
        w = min(tile, shape[1])
    return [
        (r0 + r, c0 + c, bh, bw)
        for r, c, bh, bw in _tile_boxes((h, w), tile, step, max_tiles)
    ]


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
    shadows: bool | None = False,
) -> _Setup:
    """Check the inputs, resolve the default tile size and build both pyramids.

    With ``shadows`` (True, or None and both images have a distinct dark
    mode, see :func:`_dark_threshold`), the dark class of each image is
    treated as no-data.
    """
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
    overlap = _overlap_bbox(ref_mask, mov_mask)
    area_shape = shape if overlap is None else overlap[2:]
    masked = False
    if shadows is None or shadows:
        t_ref = _dark_threshold(ref_lum, ref_mask, strict=shadows is None)
        t_mov = _dark_threshold(mov_lum, mov_mask, strict=shadows is None)
        if t_ref is not None and t_mov is not None:
            dark_ref = ref_mask & ~ndi.binary_dilation(ref_lum < t_ref)
            dark_mov = mov_mask & ~ndi.binary_dilation(mov_lum < t_mov)
            if dark_ref.any() and dark_mov.any():
                ref_mask, mov_mask, masked = dark_ref, dark_mov, True
    levels = _n_levels(min(shape), max_shift, _MIN_LEVEL_SIZE)
    if tile is None:
        tile = _DEFAULT_TILE_LARGE if min(area_shape) >= 1024 else _DEFAULT_TILE_SMALL
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
        shadows_masked=masked,
        overlap=overlap,
    )


def _dark_threshold(
    lum: np.ndarray, mask: np.ndarray, *, strict: bool = True
) -> float | None:
    """Upper bound of the dark (cast-shadow) mode of the luminance histogram.

    The histogram of the valid pixels (64 bins between the 0.5th and 99.5th
    percentiles, smoothed by a Gaussian of 1.5 bins) is split by Otsu's
    threshold. With ``strict``, a dark mode is reported only if it is distinct
    and a minority: a peak below the threshold and one above it, separated by
    a valley lower than half of the smaller peak, with fewer than half of the
    pixels on the dark side. Returns Otsu's threshold, or None.

    Cast shadows in very-high-resolution imagery form such a mode, and they
    move with the sun between the dates: their edges, which are a large part
    of all the edges of a built-up scene, would bias the estimate toward the
    shadows' displacement.
    """
    values = lum[mask]
    if values.size < 256:
        return None
    if values.size > 1 << 18:
        values = values[:: values.size // (1 << 18)]
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if not hi > lo:
        return None
    hist, edges = np.histogram(values, 64, (lo, hi))
    hist = ndi.gaussian_filter1d(hist.astype(np.float64), 1.5)
    centres = 0.5 * (edges[:-1] + edges[1:])
    # Otsu on the smoothed histogram.
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * centres)
    total, mean = w0[-1], m0[-1] / w0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean * w0 - m0) ** 2 / (w0 * (total - w0))
    between = np.nan_to_num(between[:-1], nan=0.0, posinf=0.0)
    split = int(np.argmax(between)) + 1
    if not strict:
        return float(edges[split])
    dark_peak = int(np.argmax(hist[:split]))
    bright_peak = split + int(np.argmax(hist[split:]))
    valley = dark_peak + int(np.argmin(hist[dark_peak : bright_peak + 1]))
    if not dark_peak < valley < bright_peak:
        return None
    if hist[valley] >= 0.5 * min(hist[dark_peak], hist[bright_peak]):
        return None
    threshold = float(edges[split])
    if float(np.mean(values < threshold)) >= 0.5:
        return None
    return threshold


def _global(setup: _Setup, window: int, *, coarse_only: bool = False) -> ShiftEstimate:
    """Whole-image coarse-to-fine estimate (integer, coarsest level only if asked)."""
    start = _n_levels(min(setup.area[2:]), setup.max_shift, _MIN_LEVEL_SIZE)
    res = _measure(
        setup.ref,
        setup.mov,
        setup.area,
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
    for box in _area_boxes(setup.area, setup.shape, tile, step, max_tiles):
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
    shadows: bool | None = False,
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
    shadows : bool or None, optional
        Leave out the dark (cast-shadow) mode of each image's luminance
        histogram: cast shadows move with the sun between the dates and bias
        the estimate in built-up scenes. None (default): only when both images
        have a distinct dark mode holding less than half of their pixels, and
        only if the estimate without them is reliable (otherwise every pixel
        is used). True: always split the histogram (Otsu) and leave out the
        dark side. False: use every pixel.

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
    onto the estimate and the residual measured again, up to four times
    (pixels whose residual is an outlier are down-weighted by a Tukey
    biweight), which removes the bias a fixed taper causes. The taper is a Tukey window
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
    if shadows not in (None, True, False):
        raise ValueError(f"shadows must be None, True or False, got {shadows!r}")
    args = (reference, moving, reference_valid, moving_valid)
    kwargs: dict[str, Any] = {
        "max_shift": max_shift,
        "upsample_factor": upsample_factor,
        "min_peak_ratio": min_peak_ratio,
        "min_vote_ratio": min_vote_ratio,
        "sigma_low": sigma_low,
        "sigma_high": sigma_high,
        "texture_threshold": texture_threshold,
        "tile": tile,
        "use_tiles": consensus,
    }
    setup = _setup(*args, **kwargs, shadows=shadows)
    est = _estimate(setup, consensus, step, max_tiles, min_inliers, window)
    if shadows is None and setup.shadows_masked and not est.reliable:
        # The shadow-free estimate could not be confirmed: use every pixel.
        setup = _setup(*args, **kwargs, shadows=False)
        est = _estimate(setup, consensus, step, max_tiles, min_inliers, window)
    return est


def _estimate(
    setup: _Setup,
    consensus: bool,
    step: int | None,
    max_tiles: int,
    min_inliers: int,
    window: int,
) -> ShiftEstimate:
    """The body of :func:`estimate_shift` on a prepared setup."""
    est = _estimate_raw(setup, consensus, step, max_tiles, min_inliers, window)
    return replace(est, shadows_masked=setup.shadows_masked)


def _estimate_raw(
    setup: _Setup,
    consensus: bool,
    step: int | None,
    max_tiles: int,
    min_inliers: int,
    window: int,
) -> ShiftEstimate:
    n_boxes = len(
        _area_boxes(setup.area, setup.shape, setup.tile, step or setup.tile, max_tiles)
    )
    if not consensus or n_boxes < 4:
        return _global(setup, window)
    tiles = _tiles(setup, step, max_tiles, min_inliers)
    if tiles.reliable:
        # Cross-check with the whole-image search at the coarsest level (its
        # integer shift is good to one coarse pixel): two confident answers
        # that disagree make the consensus unreliable.
        coarse = _global(setup, window, coarse_only=True)
        scale = 2 ** _n_levels(min(setup.area[2:]), setup.max_shift, _MIN_LEVEL_SIZE)
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
        256 when the pixels valid in both images span at least 1024 pixels
        on their short side, else 128. The windows cover the bounding box of
        those pixels.
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
# Geometric models: translation, affine, smooth displacement field
# ----------------------------------------------------------------------------

#: Models :func:`register` can fit, from the simplest to the richest.
MODELS = ("translation", "affine", "field")
# Fewest inlier tie points that support each model. An affine transform is
# fixed by any 3 points, so 8 asks for 5 independent confirmations; the field
# needs enough points for a 10-fold cross-validation to hold out whole areas.
_MIN_SUPPORT = {"translation": 3, "affine": 8, "field": 16}
# Normalised median test of Westerweel and Scarano (2005): neighbours,
# threshold and noise floor (px).
_NMT_NEIGHBOURS = 8
_NMT_THRESHOLD = 2.0
_NMT_EPS = 0.1
# Affine RANSAC hypotheses (random minimal samples, fixed seed).
_RANSAC_SAMPLES = 500
# Model selection: folds of the cross-validation; a richer model is used only
# if it cuts the held-out mean squared error by at least _SELECT_GAIN and a
# one-sided Wilcoxon signed-rank test on the paired errors gives p < _SELECT_P.
_CV_FOLDS = 10
_SELECT_GAIN = 0.1
_SELECT_P = 0.01
# Smoothing of the thin-plate spline field (coordinates in tie-point spacings),
# chosen by cross-validation among these values.
_FIELD_SMOOTHING = (0.01, 0.1, 1.0, 10.0)
# Dense tie points: largest number of windows; default window side from the
# image size (about an eighth of the short side, 64 to 128 pixels).
_DENSE_MAX_POINTS = 144
_DENSE_WINDOW_MIN = 64
_DENSE_WINDOW_MAX = 128
# Noise-limited tie points (massive change, another sensor): a translation or
# affine model whose held-out residual is above _MAX_RMSE is still reliable if
# that residual is at most _NOISY_MAX_RMSE, the model's standard error is at
# most _MAX_MODEL_SE (its 95 % interval within 1 px) and the residuals show no
# spatial structure (permutation test of neighbour correlation, p >= _STRUCTURE_P
# over _STRUCTURE_PERMUTATIONS shuffles among _STRUCTURE_NEIGHBOURS neighbours).
_NOISY_MAX_RMSE = 2.0
_MAX_MODEL_SE = 0.5
_STRUCTURE_P = 0.05
_STRUCTURE_PERMUTATIONS = 999
_STRUCTURE_NEIGHBOURS = 4
# Images larger than this (short side, pixels) get their global estimate on a
# 2x2-block-mean pyramid level: the dense tie points restore full resolution.
_GLOBAL_MAX_SIDE = 1024


class _Field:
    """Thin-plate spline of a displacement residual, in scaled coordinates."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                 smoothing: float, scale: float) -> None:
        from scipy.interpolate import RBFInterpolator

        self.scale = float(scale)
        self.smoothing = float(smoothing)
        points = np.column_stack([rows, cols]) / self.scale
        self._rbf = RBFInterpolator(
            points, values, kernel="thin_plate_spline", degree=1, smoothing=smoothing
        )

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        points = np.column_stack([np.ravel(rows), np.ravel(cols)]) / self.scale
        out = np.empty((points.shape[0], 2))
        step = 65536
        for i in range(0, points.shape[0], step):
            out[i : i + step] = self._rbf(points[i : i + step])
        return out


@dataclass(frozen=True, eq=False)
class GeometricModel:
    """Where each reference pixel's content lies in the moving image.

    ``moving[source_coordinates(r, c)] ~= reference[r, c]`` for reference pixel
    coordinates ``(r, c)`` (row, col; pixel centres at integers). For a
    translation ``(dy, dx)`` the source is ``(r + dy, c + dx)``, as for
    :func:`estimate_shift`.

    Attributes
    ----------
    kind : str
        ``"none"`` (identity), ``"translation"``, ``"affine"`` or ``"field"``.
    matrix : (2, 3) ndarray of float64
        Linear part: ``[r', c'] = matrix @ [r, c, 1]``. For ``"field"``, the
        least-squares affine part; the field adds a smooth residual to it.
    """

    kind: str
    matrix: NDArray[np.float64]
    field: _Field | None = None

    @classmethod
    def identity(cls) -> GeometricModel:
        """The model that leaves every pixel where it is."""
        return cls("none", np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    @classmethod
    def translation(cls, dy: float, dx: float) -> GeometricModel:
        """A translation by ``(dy, dx)`` pixels."""
        return cls("translation", np.array([[1.0, 0.0, dy], [0.0, 1.0, dx]]))

    @property
    def is_linear(self) -> bool:
        """True if the model is the affine ``matrix`` alone."""
        return self.field is None

    def source_coordinates(
        self, rows: ArrayLike, cols: ArrayLike
    ) -> tuple[np.ndarray, np.ndarray]:
        """Moving-image (row, col) coordinates of reference coordinates.

        Parameters
        ----------
        rows, cols : array_like
            Reference pixel coordinates (broadcast together).

        Returns
        -------
        rows, cols : ndarray of float64
            Where that content lies in the moving image.
        """
        r, c = np.broadcast_arrays(
            np.asarray(rows, np.float64), np.asarray(cols, np.float64)
        )
        m = self.matrix
        out_r = m[0, 0] * r + m[0, 1] * c + m[0, 2]
        out_c = m[1, 0] * r + m[1, 1] * c + m[1, 2]
        if self.field is not None:
            d = self.field(r, c)
            out_r = out_r + d[:, 0].reshape(r.shape)
            out_c = out_c + d[:, 1].reshape(r.shape)
        return out_r, out_c

    def displacement(
        self, rows: ArrayLike, cols: ArrayLike
    ) -> tuple[np.ndarray, np.ndarray]:
        """Shift ``(dy, dx)`` of the content at reference coordinates ``(rows, cols)``."""
        r, c = np.broadcast_arrays(
            np.asarray(rows, np.float64), np.asarray(cols, np.float64)
        )
        out_r, out_c = self.source_coordinates(r, c)
        return out_r - r, out_c - c

    def parameters(self, shape: tuple[int, int]) -> dict[str, Any]:
        """Readable parameters; shifts are given at the centre of a ``shape`` image."""
        rc, cc = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
        dy, dx = (float(v) for v in self.displacement(rc, cc))
        out: dict[str, Any] = {
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "shift_at_centre_px": {"dy": dy, "dx": dx},
        }
        # Linear part in (x = col, y = row) axes.
        lin = np.array(
            [[self.matrix[1, 1], self.matrix[1, 0]], [self.matrix[0, 1], self.matrix[0, 0]]]
        )
        out["rotation_deg"] = math.degrees(
            math.atan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1])
        )
        out["scale"] = math.sqrt(abs(float(np.linalg.det(lin))))
        out["scale_x"] = float(np.hypot(lin[0, 0], lin[1, 0]))
        out["scale_y"] = float(np.hypot(lin[0, 1], lin[1, 1]))
        if self.field is not None:
            out["field_smoothing"] = self.field.smoothing
            out["field_control_points"] = int(self.field._rbf.y.shape[0])
            rows = np.linspace(0, shape[0] - 1, 33)
            cols = np.linspace(0, shape[1] - 1, 33)
            r, c = np.meshgrid(rows, cols, indexing="ij")
            d = self.field(r, c)
            out["field_max_px"] = float(np.hypot(d[:, 0], d[:, 1]).max())
        return out


@dataclass(frozen=True, eq=False)
class Registration:
    """Result of :func:`register`.

    Attributes
    ----------
    model : GeometricModel
        The model to apply (identity when nothing reliable was found).
    reliable : bool
        True if the model is supported by enough agreeing tie points and its
        held-out residual is at most 1 pixel (see :func:`register`).
    rmse : float
        Cross-validated (held-out) residual of the chosen model at the inlier
        tie points, in pixels: the expected misalignment at a point the model
        was not fitted to. NaN when no tie point supports the model.
    fit_rmse : float
        Residual of the chosen model at its inlier tie points (pixels).
    shift : ShiftEstimate
        The global translation estimate (coarse-to-fine, window consensus).
    tie_points : TiePoints or None
        The dense tie points (``accepted``: inliers; ``residual``: distance
        from the chosen model).
    candidates : dict
        Per candidate model: ``cv_rmse`` (px), ``n_params`` and whether it
        had enough support.
    notes : tuple of str
        Why a simpler model than asked, or the identity, was used.
    model_se : float
        Standard error (pixels) of the displacement the model predicts,
        averaged over the inlier tie points: ``rmse * sqrt(p / n)`` for a
        model of ``p`` parameters per axis fitted to ``n`` points (NaN for the
        field and when nothing was fitted). The tie points' own scatter
        (``rmse``) is larger when they are noisy, as in a scene where most
        things changed.
    structure_p : float
        p-value of the permutation test for spatial structure in the inliers'
        residuals (correlation of each residual with the mean of its 4
        nearest neighbours' residuals). Small: neighbouring tie points are off
        in the same direction, i.e. the model misses part of the geometry.
        NaN when not computed (fewer than 6 inliers).
    """

    model: GeometricModel
    reliable: bool
    rmse: float
    fit_rmse: float
    shift: ShiftEstimate
    tie_points: TiePoints | None
    candidates: dict[str, dict[str, Any]]
    notes: tuple[str, ...] = ()
    window: int = 0
    spacing: int = 0
    model_se: float = math.nan
    structure_p: float = math.nan

    @property
    def n_used(self) -> int:
        """Tie points the model was fitted to."""
        return 0 if self.tie_points is None else int(self.tie_points.accepted.sum())

    @property
    def n_rejected(self) -> int:
        """Tie points measured but not used."""
        return 0 if self.tie_points is None else len(self.tie_points) - self.n_used

    def as_dict(self, shape: tuple[int, int]) -> dict[str, Any]:
        """JSON-serialisable summary (NaN becomes None); ``shape`` of the images."""
        return {
            "model": self.model.kind,
            "parameters": self.model.parameters(shape),
            "reliable": bool(self.reliable),
            "residual_rmse_px": _json_float(self.rmse),
            "fit_rmse_px": _json_float(self.fit_rmse),
            "model_se_px": _json_float(self.model_se),
            "residual_structure_p": _json_float(self.structure_p),
            "tie_points_used": self.n_used,
            "tie_points_rejected": self.n_rejected,
            "tie_window_px": int(self.window),
            "tie_spacing_px": int(self.spacing),
            "candidates": {
                k: {kk: (_json_float(vv) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                for k, v in self.candidates.items()
            },
            "notes": list(self.notes),
            "global": self.shift.as_dict(),
        }


def _affine_design(rows: np.ndarray, cols: np.ndarray, centre: tuple[float, float],
                   scale: float) -> np.ndarray:
    return np.column_stack(
        [np.ones_like(rows), (rows - centre[0]) / scale, (cols - centre[1]) / scale]
    )


def _fit_model(
    kind: str,
    rows: np.ndarray,
    cols: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
    *,
    scale: float,
    smoothing: float = 1.0,
) -> GeometricModel:
    """Least-squares fit of one model to tie points (all given points used)."""
    if kind == "translation":
        return GeometricModel.translation(float(dy.mean()), float(dx.mean()))
    centre = (float(rows.mean()), float(cols.mean()))
    design = _affine_design(rows, cols, centre, scale)
    coef, *_ = np.linalg.lstsq(design, np.column_stack([dy, dx]), rcond=None)
    # Back to pixel coordinates: d = a0 + a1 (r - r0) / s + a2 (c - c0) / s.
    matrix = np.zeros((2, 3))
    for k in range(2):
        a0, a1, a2 = coef[:, k]
        matrix[k] = [a1 / scale, a2 / scale, a0 - (a1 * centre[0] + a2 * centre[1]) / scale]
    matrix[0, 0] += 1.0
    matrix[1, 1] += 1.0
    if kind == "affine":
        return GeometricModel("affine", matrix)
    base = GeometricModel("affine", matrix)
    ry, rx = base.displacement(rows, cols)
    field = _Field(rows, cols, np.column_stack([dy - ry, dx - rx]), smoothing, scale)
    return GeometricModel("field", matrix, field)


def _cv_errors(
    kind: str,
    rows: np.ndarray,
    cols: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
    folds: np.ndarray,
    *,
    scale: float,
    smoothing: float = 1.0,
) -> np.ndarray:
    """Squared held-out errors (px^2) of one model, fold by fold."""
    err = np.empty(rows.shape[0])
    for k in np.unique(folds):
        test = folds == k
        train = ~test
        model = _fit_model(
            kind, rows[train], cols[train], dy[train], dx[train],
            scale=scale, smoothing=smoothing,
        )
        py, px = model.displacement(rows[test], cols[test])
        err[test] = (py - dy[test]) ** 2 + (px - dx[test]) ** 2
    return err


def _spatial_folds(
    rows: np.ndarray, cols: np.ndarray, block: float, n_folds: int
) -> np.ndarray:
    """Cross-validation folds made of whole square blocks of side ``block``.

    Neighbouring tie points share content and local biases; holding out
    whole blocks keeps the held-out error honest for the smooth field. Blocks
    are dealt to folds in a fixed random order; with fewer blocks than folds,
    each point is its own block.
    """
    key = np.floor(rows / block) * 1e6 + np.floor(cols / block)
    blocks, inverse = np.unique(key, return_inverse=True)
    n_blocks = int(blocks.size)
    if n_blocks < n_folds:
        inverse = np.arange(rows.shape[0], dtype=inverse.dtype)
        n_blocks = int(rows.shape[0])
    order = np.random.default_rng(20050101).permutation(n_blocks)
    return np.asarray((order % n_folds)[inverse])


def _richer_is_better(rich: np.ndarray, simple: np.ndarray) -> bool:
    """True if ``rich`` squared errors are significantly below ``simple`` ones."""
    if not float(rich.mean()) <= (1.0 - _SELECT_GAIN) * float(simple.mean()):
        return False
    return _wilcoxon_greater(simple - rich) < _SELECT_P


def _wilcoxon_greater(diff: np.ndarray) -> float:
    """One-sided p-value of the Wilcoxon signed-rank test that ``diff`` is positive.

    Normal approximation with tie correction (zero differences dropped); 1.0
    for fewer than 6 non-zero differences, too few for the test to reach 1 %.
    """
    d = diff[diff != 0]
    n = d.size
    if n < 6:
        return 1.0
    a = np.abs(d)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(n)
    sorted_a = a[order]
    # Average ranks of ties.
    _, first, counts = np.unique(sorted_a, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    w_plus = float(ranks[d > 0].sum())
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((counts**3 - counts).sum()) / 48.0
    if var <= 0:
        return 1.0
    z = (w_plus - mean) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _ransac_affine(
    rows: np.ndarray, cols: np.ndarray, dy: np.ndarray, dx: np.ndarray,
    tol: float, scale: float,
) -> np.ndarray:
    """Inliers of the affine hypothesis (from random 3-point samples) with most support."""
    n = rows.shape[0]
    if n < 3:
        return np.zeros(n, bool)
    rng = np.random.default_rng(20080101)
    centre = (float(rows.mean()), float(cols.mean()))
    design = _affine_design(rows, cols, centre, scale)
    target = np.column_stack([dy, dx])
    samples = np.array([rng.choice(n, 3, replace=False) for _ in range(_RANSAC_SAMPLES)])
    a = design[samples]  # (S, 3, 3)
    det = np.linalg.det(a)
    good = np.abs(det) > 1e-3
    if not good.any():
        return np.zeros(n, bool)
    coef = np.linalg.solve(a[good], target[samples[good]])  # (S, 3, 2)
    pred = np.einsum("nj,sjk->snk", design, coef)
    dist = np.hypot(*(pred - target[None]).transpose(2, 0, 1))
    count = (dist <= tol).sum(axis=1)
    best = dist[int(np.argmax(count))] <= tol
    for _ in range(3):
        if best.sum() < 3:
            break
        coef, *_ = np.linalg.lstsq(design[best], target[best], rcond=None)
        new = np.hypot(*(design @ coef - target).T) <= tol
        if new.sum() < best.sum():
            break
        best = new
    return best


def _structure_p(
    rows: np.ndarray, cols: np.ndarray, ey: np.ndarray, ex: np.ndarray
) -> float:
    """p-value of spatial structure in residual vectors ``(ey, ex)`` at ``(rows, cols)``.

    The statistic is the correlation between each residual and the mean
    residual of its nearest neighbours; its distribution without structure
    is sampled by shuffling the residuals among the points (fixed seed). A
    smooth misfit (the model misses a rotation, a scale or a local
    distortion) makes neighbours agree and the p-value small; noise, or
    displacements of single objects (leaning buildings, moved debris), does
    not. NaN for fewer than 6 points.
    """
    from scipy.spatial import cKDTree

    n = rows.shape[0]
    if n < 6:
        return math.nan
    k = min(_STRUCTURE_NEIGHBOURS, n - 1)
    pts = np.column_stack([rows, cols])
    _, idx = cKDTree(pts).query(pts, k=k + 1)
    nb = idx[:, 1:]

    def stat(vy: np.ndarray, vx: np.ndarray) -> np.ndarray:
        # vy, vx: (P, n) residual components, one permutation per row.
        my, mx = vy[:, nb].mean(axis=2), vx[:, nb].mean(axis=2)
        num = (vy * my + vx * mx).sum(axis=1)
        den = np.sqrt((vy * vy + vx * vx).sum(axis=1) * (my * my + mx * mx).sum(axis=1))
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)

    observed = float(stat(ey[None], ex[None])[0])
    rng = np.random.default_rng(19500101)
    perm = np.argsort(rng.random((_STRUCTURE_PERMUTATIONS, n)), axis=1)
    null = stat(ey[perm], ex[perm])
    return float((1 + np.count_nonzero(null >= observed)) / (_STRUCTURE_PERMUTATIONS + 1))


def _local_inliers(
    rows: np.ndarray, cols: np.ndarray, ry: np.ndarray, rx: np.ndarray, tol: float
) -> np.ndarray:
    """Inliers among points with residuals ``(ry, rx)`` from a global model.

    Where a point's neighbours agree among themselves (their median absolute
    deviation from their median residual is at most ``2 tol``), the point is an
    inlier if it passes the normalised median test [4]_; elsewhere, if its
    residual is at most ``tol``.
    """
    from scipy.spatial import cKDTree

    n = rows.shape[0]
    small = np.hypot(ry, rx) <= tol
    if n < 4:
        return small
    k = min(_NMT_NEIGHBOURS, n - 1)
    _, idx = cKDTree(np.column_stack([rows, cols])).query(
        np.column_stack([rows, cols]), k=k + 1
    )
    nb = idx[:, 1:]
    my, mx = np.median(ry[nb], axis=1), np.median(rx[nb], axis=1)
    spread = np.median(np.hypot(ry[nb] - my[:, None], rx[nb] - mx[:, None]), axis=1)
    # A smooth distortion changes by well under a pixel per tie-point spacing:
    # a neighbourhood spread over more than 2 tolerances is not a field.
    coherent = spread <= 2.0 * tol
    norm = np.hypot(ry - my, rx - mx) / (spread + _NMT_EPS)
    return np.where(coherent, norm <= _NMT_THRESHOLD, small)


def _dense_boxes(
    shape: tuple[int, int],
    window: int | None,
    spacing: int | None,
    max_points: int,
    area: tuple[int, int, int, int] | None = None,
) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """Windows of the dense tie-point grid and the window side and spacing used.

    The grid covers ``area`` (default: the whole grid), the bounding box of
    the pixels valid in both images: an after image that covers only part of
    the before grid gets its windows where it has data.
    """
    area = area or (0, 0, shape[0], shape[1])
    size = area[2:]
    if window is None:
        window = int(2 ** round(math.log2(max(min(shape) / 8.0, 1.0))))
        window = min(max(window, _DENSE_WINDOW_MIN), _DENSE_WINDOW_MAX)
    window = min(window, *shape)
    if spacing is None:
        spacing = window
        # As dense as max_points allows.
        extent = (max(size[0] - window, 0) + spacing) * (max(size[1] - window, 0) + spacing)
        spacing = max(spacing, int(math.ceil(math.sqrt(extent / max_points))))
    boxes = _area_boxes(area, shape, window, spacing, max_points)
    return boxes, window, spacing


def _dense_tie_points(
    setup: _Setup, prior: GeometricModel, boxes: list[tuple[int, int, int, int]]
) -> TiePoints:
    """Measure each window around the shift the prior model predicts there."""
    rows: list[tuple[float, ...]] = []
    valid_ref = setup.ref.levels[0][1]
    for box in boxes:
        r0, c0, h, w = box
        if float(valid_ref[r0 : r0 + h, c0 : c0 + w].mean()) < _MIN_WINDOW_VALID:
            continue
        rc, cc = r0 + (h - 1) / 2.0, c0 + (w - 1) / 2.0
        py, px = (float(v) for v in prior.displacement(rc, cc))
        res = _measure(
            setup.ref,
            setup.mov,
            box,
            start_level=0,
            max_shift=setup.max_shift,
            upsample=setup.upsample,
            coarse_cap=None,
            fine_cap=None,
            prior=(round(py), round(px)),
        )
        if res is None:
            continue
        rows.append(
            (rc, cc, res.dy, res.dx, res.peak_ratio, res.n_valid,
             float(res.consistent), res.similarity)
        )
    table = np.array(rows, np.float64).reshape(-1, 8)
    return TiePoints(
        row=table[:, 0].copy(),
        col=table[:, 1].copy(),
        dy=table[:, 2].copy(),
        dx=table[:, 3].copy(),
        peak_ratio=table[:, 4].copy(),
        n_valid=table[:, 5].astype(np.int64),
        accepted=table[:, 6] > 0,  # provisional: consistent windows
        similarity=table[:, 7].copy(),
    )


def _prior_model(est: ShiftEstimate, min_vote_ratio: float) -> GeometricModel:
    """Translation of the global estimate, or an affine model of its windows."""
    base = GeometricModel.translation(est.dy, est.dx)
    tp = est.tie_points
    if tp is None or len(tp) < _MIN_SUPPORT["affine"] - 2:
        return base
    usable = (tp.peak_ratio >= min_vote_ratio) & np.isfinite(tp.dy)
    if usable.sum() < 6:
        return base
    r, c, dy, dx = tp.row[usable], tp.col[usable], tp.dy[usable], tp.dx[usable]
    scale = max(float(np.ptp(r)), float(np.ptp(c)), 1.0)
    inl = _ransac_affine(r, c, dy, dx, _RANSAC_TOL, scale)
    if inl.sum() < 6:
        return base
    return _fit_model("affine", r[inl], c[inl], dy[inl], dx[inl], scale=scale)


def register(
    reference: ArrayLike,
    moving: ArrayLike,
    *,
    reference_valid: ArrayLike | None = None,
    moving_valid: ArrayLike | None = None,
    model: str = "auto",
    max_shift: float = 64,
    upsample_factor: int = 20,
    window: int | None = None,
    spacing: int | None = None,
    max_points: int = _DENSE_MAX_POINTS,
    min_vote_ratio: float = 1.2,
    shadows: bool | None = None,
) -> Registration:
    """Fit the geometric model that maps ``reference`` onto ``moving``.

    Parameters
    ----------
    reference, moving : (M, N) or (B, M, N) array_like
        Before and after images on the same pixel grid (see
        :func:`estimate_shift`).
    reference_valid, moving_valid : array_like of bool, optional
        True on valid pixels. Default: every finite pixel.
    model : {"auto", "translation", "affine", "field"}, optional
        ``"auto"`` chooses among the three by cross-validation; a named model
        is the richest one allowed (a simpler one is used when the tie points
        cannot support it).
    max_shift : float, optional
        Largest shift searched by the global estimate, per axis, in pixels.
    upsample_factor : int, optional
        Sub-pixel grid of each estimate, ``1 / upsample_factor`` pixel.
    window, spacing : int, optional
        Side and spacing (pixels) of the dense tie-point windows. Default:
        a power of two near an eighth of the short side (64 to 128 pixels),
        side by side (no overlap: independent measurements), or wider apart
        to keep at most ``max_points``, over the bounding box of the pixels
        valid in both images.
    max_points : int, optional
        Largest number of dense tie points.
    min_vote_ratio : float, optional
        Smallest peak ratio of a usable tie point.
    shadows : bool or None, optional
        Leave out cast shadows, see :func:`estimate_shift`.

    Returns
    -------
    Registration
        The model, its reliability and residual, the global estimate and the
        tie points.

    Raises
    ------
    ValueError
        As :func:`estimate_shift`, or if ``model`` is unknown.

    Notes
    -----
    1. The global translation is estimated with :func:`estimate_shift`; an
       affine model fitted by RANSAC to its (independently searched) windows,
       when they support one, or the translation is the prior.
    2. A dense grid of windows is measured, each searched within +/-6 pixels
       of the shift the prior predicts at its centre, with the same sub-pixel
       estimator.
    3. Tie points with a peak ratio below ``min_vote_ratio`` or an
       inconsistent coarse-to-fine search are dropped. An affine RANSAC gives
       the global trend; a point is an inlier if it passes the normalised
       median test of Westerweel and Scarano [4]_ among its 8 nearest
       neighbours (when these agree among themselves within 2 pixels), or
       else if it lies within 1 pixel of the trend.
    4. Translation, affine and a thin-plate-spline displacement field are
       compared by 10-fold cross-validation on the inliers (folds made of
       whole blocks of 2 x 2 tie-point spacings). The richer model
       is chosen only if its held-out mean squared error is at least 10 %
       lower and a one-sided Wilcoxon signed-rank test on the paired errors
       gives p < 0.01. A model needs at least 3, 8 and 16 inliers
       respectively. The field's smoothing is chosen by the same
       cross-validation.
    5. The result is reliable if the chosen model has that support, its
       held-out RMSE is at most 1 pixel and, for a translation, the global
       estimate is reliable and agrees (or, when the global estimate is not
       reliable, at least 8 tie points agree). Otherwise the simpler supported
       model, or the identity, is returned with ``reliable=False`` and a note.
       A translation or affine model whose held-out RMSE is between 1 and 2
       pixels is reliable too (with a note) if the tie points' scatter is
       noise: no spatial structure in the residuals (permutation test of the
       correlation of each residual with the mean of its 4 nearest
       neighbours', p >= 0.05) and a standard error of the model,
       ``rmse * sqrt(p / n)`` for ``p`` parameters per axis and ``n``
       inliers, of at most 0.5 pixel. Single tie points are noisy where most
       of the scene changed, but their mean is not.

    The windows (global consensus and dense tie points) are laid over the
    bounding box of the pixels valid in both images.

    When the global estimate is not reliable, the dense tie points are also
    searched around the identity (the georeferencing as given), and the
    search with more inliers is kept.

    References
    ----------
    .. [4] J. Westerweel and F. Scarano, "Universal outlier detection for PIV
           data," Experiments in Fluids 39, 1096-1100 (2005).
           :doi:`10.1007/s00348-005-0016-6`

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage as ndi
    >>> rng = np.random.default_rng(0)
    >>> ref = ndi.gaussian_filter(rng.standard_normal((256, 256)), 2.0)
    >>> mov = ndi.shift(ref, (3.0, -5.0), order=3, mode="nearest")
    >>> reg = register(ref, mov, max_shift=16)
    >>> reg.model.kind, [round(float(v), 2) for v in reg.model.displacement(128, 128)]
    ('translation', [3.0, -5.0])
    """
    if model != "auto" and model not in MODELS:
        raise ValueError(f"model must be 'auto' or one of {MODELS}, got {model!r}")
    max_points = _check_int(max_points, "max_points", 1)
    if window is not None:
        window = _check_int(window, "window", _MIN_WINDOW)
    if spacing is not None:
        spacing = _check_int(spacing, "spacing", 1)
    if shadows not in (None, True, False):
        raise ValueError(f"shadows must be None, True or False, got {shadows!r}")
    args = (reference, moving, reference_valid, moving_valid)
    kwargs: dict[str, Any] = {
        "max_shift": max_shift,
        "upsample_factor": upsample_factor,
        "min_peak_ratio": 1.5,
        "min_vote_ratio": min_vote_ratio,
        "sigma_low": 1.0,
        "sigma_high": 4.0,
        "texture_threshold": 0.25,
        "tile": None,
        "use_tiles": True,
    }
    setup = _setup(*args, **kwargs, shadows=shadows)
    est = _global_estimate(setup)
    if shadows is None and setup.shadows_masked and not est.reliable:
        setup = _setup(*args, **kwargs, shadows=False)
        est = _global_estimate(setup)
    return _register(setup, est, model, window, spacing, max_points)


def _global_estimate(setup: _Setup) -> ShiftEstimate:
    """:func:`estimate_shift` on the setup, at a coarser level for large images."""
    level = 0
    while min(setup.ref.shape(level)) > _GLOBAL_MAX_SIDE and level + 1 < len(setup.ref.levels):
        level += 1
    if level == 0:
        return _estimate(setup, True, None, 64, 3, 512)
    scale = 2**level
    (rl, rm), (ml, mm) = setup.ref.levels[level], setup.mov.levels[level]
    sub = _setup(
        rl, ml, rm, mm,
        max_shift=setup.max_shift / scale,
        upsample_factor=setup.upsample,
        min_peak_ratio=setup.min_peak_ratio,
        min_vote_ratio=setup.min_vote_ratio,
        sigma_low=setup.ref.sigmas[0],
        sigma_high=setup.ref.sigmas[1],
        texture_threshold=setup.ref.sigmas[2],
        tile=None,
        use_tiles=True,
        shadows=False,
    )
    est = _estimate(sub, True, None, 64, 3, 512)
    offset = (scale - 1) / 2.0
    tp = est.tie_points
    if tp is not None:
        tp = replace(tp, row=tp.row * scale + offset, col=tp.col * scale + offset,
                     dy=tp.dy * scale, dx=tp.dx * scale)
    return replace(
        est, dy=est.dy * scale, dx=est.dx * scale, rmse=est.rmse * scale, tie_points=tp,
        shadows_masked=setup.shadows_masked,
    )


def _dense_inliers(
    setup: _Setup, prior: GeometricModel, boxes: list[tuple[int, int, int, int]], scale: float
) -> tuple[TiePoints, np.ndarray, np.ndarray]:
    """Dense tie points around ``prior``, the usable ones' indexes and their inlier mask."""
    ties = _dense_tie_points(setup, prior, boxes)
    usable = ties.accepted & (ties.peak_ratio >= setup.min_vote_ratio)
    idx = np.flatnonzero(usable)
    r, c, dy, dx = ties.row[idx], ties.col[idx], ties.dy[idx], ties.dx[idx]
    inl = np.zeros(idx.size, bool)
    if idx.size >= 3:
        trend = _ransac_affine(r, c, dy, dx, _RANSAC_TOL, max(np.ptp(r), np.ptp(c), 1.0))
        if trend.sum() >= 3:
            base = _fit_model("affine", r[trend], c[trend], dy[trend], dx[trend], scale=scale)
            py, px = base.displacement(r, c)
            inl = _local_inliers(r, c, dy - py, dx - px, _RANSAC_TOL)
    return ties, idx, inl


def _too_few(
    empty: Registration,
    est: ShiftEstimate,
    ties: TiePoints,
    n_in: int,
    candidates: dict[str, dict[str, Any]],
    notes: list[str],
) -> Registration:
    """Too few dense tie points: the global translation if confirmed, else the identity."""
    none_used = replace(ties, accepted=np.zeros(len(ties), bool))
    if est.reliable:
        notes.append(f"only {n_in} reliable tie point(s): the global translation is used")
        return replace(
            empty,
            model=GeometricModel.translation(est.dy, est.dx),
            reliable=True,
            rmse=est.rmse,
            tie_points=none_used,
            candidates=candidates,
            notes=tuple(notes),
        )
    notes.append(
        f"only {n_in} reliable tie point(s) and no confirmed global shift: "
        "identity used (the georeferencing is not corrected)"
    )
    return replace(empty, tie_points=none_used, candidates=candidates, notes=tuple(notes))


def _compare_models(
    rows: np.ndarray,
    cols: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
    allowed: tuple[str, ...],
    spacing: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray], float]:
    """Cross-validated squared errors of every supported model (and the field's smoothing)."""
    n_in = rows.shape[0]
    candidates: dict[str, dict[str, Any]] = {}
    errors: dict[str, np.ndarray] = {}
    smoothing = 1.0
    if n_in < _MIN_SUPPORT["translation"]:
        return candidates, errors, smoothing
    scale = float(spacing)
    folds = _spatial_folds(rows, cols, 2 * spacing, min(_CV_FOLDS, n_in))
    for kind in allowed:
        supported = n_in >= _MIN_SUPPORT[kind]
        entry: dict[str, Any] = {
            "supported": supported,
            "n_params": {"translation": 2, "affine": 6}.get(kind),
        }
        candidates[kind] = entry
        if not supported:
            continue
        if kind == "field":
            best: tuple[float, np.ndarray] | None = None
            for lam in _FIELD_SMOOTHING:
                e = _cv_errors(kind, rows, cols, dy, dx, folds, scale=scale, smoothing=lam)
                if best is None or e.mean() < best[1].mean():
                    best = (lam, e)
            assert best is not None
            smoothing, errors[kind] = best
            entry["smoothing"] = smoothing
        else:
            errors[kind] = _cv_errors(kind, rows, cols, dy, dx, folds, scale=scale)
        entry["cv_rmse_px"] = float(np.sqrt(errors[kind].mean()))
    return candidates, errors, smoothing


def _noise_check(
    kind: str,
    fitted: GeometricModel,
    rmse: float,
    rows: np.ndarray,
    cols: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
) -> tuple[float, float, bool]:
    """Standard error of a linear model, spatial structure of its residuals, and the verdict.

    Returns ``(model_se, structure_p, noisy)``; ``noisy`` is True when the
    held-out residual ``rmse`` is above ``_MAX_RMSE`` but the scatter is
    tie-point noise the model averages out: at most ``_NOISY_MAX_RMSE``, no
    spatial structure (p >= ``_STRUCTURE_P``) and a standard error of at most
    ``_MAX_MODEL_SE``. NaN and False for the field (chosen only when the
    residuals have structure a linear model misses).
    """
    if kind not in ("translation", "affine"):
        return math.nan, math.nan, False
    n_par = 1 if kind == "translation" else 3
    model_se = rmse * math.sqrt(n_par / rows.shape[0])
    py, px = fitted.displacement(rows, cols)
    structure_p = _structure_p(rows, cols, dy - py, dx - px)
    noisy = (
        rmse > _MAX_RMSE
        and rmse <= _NOISY_MAX_RMSE
        and model_se <= _MAX_MODEL_SE
        and structure_p >= _STRUCTURE_P
    )
    return model_se, structure_p, bool(noisy)


def _residual_note(
    rmse: float, model_se: float, structure_p: float, n_in: int, *, reliable: bool
) -> str:
    """Why a held-out residual above ``_MAX_RMSE`` was, or was not, accepted."""
    head = f"held-out residual {rmse:.2f} px is above {_MAX_RMSE:g} px"
    if reliable:
        return (
            f"{head} but shows no spatial structure (p = {structure_p:.2f}): tie-point "
            f"noise, averaged out by {n_in} inliers (model standard error {model_se:.2f} px)"
        )
    if not math.isfinite(model_se):
        return head
    return (
        f"{head} and the tie points do not average it out (model standard error "
        f"{model_se:.2f} px, spatial structure p = {structure_p:.2f})"
    )


def _register(
    setup: _Setup,
    est: ShiftEstimate,
    model: str,
    window: int | None,
    spacing: int | None,
    max_points: int,
) -> Registration:
    boxes, window, spacing = _dense_boxes(
        setup.shape, window, spacing, max_points, setup.area
    )
    notes: list[str] = []
    empty = Registration(
        GeometricModel.identity(), False, math.nan, math.nan, est, None, {}, (),
        window, spacing,
    )
    priors = []
    if math.isfinite(est.dy) and math.isfinite(est.dx):
        priors.append(_prior_model(est, setup.min_vote_ratio))
    if not est.reliable:
        # The global search found nothing confirmed: also search around the
        # georeferencing itself (the images may be misaligned by a few pixels
        # only, with too little shared content for the whole-range search).
        priors.append(GeometricModel.identity())
    best_run = None
    for prior in priors:
        run = _dense_inliers(setup, prior, boxes, float(spacing))
        if best_run is None or run[2].sum() > best_run[2].sum():
            best_run = run
    assert best_run is not None
    ties, idx, inl = best_run
    r, c, dy, dx = ties.row[idx], ties.col[idx], ties.dy[idx], ties.dx[idx]
    scale = float(spacing)
    allowed = MODELS if model == "auto" else MODELS[: MODELS.index(model) + 1]
    n_in = int(inl.sum())
    ri, ci, yi, xi = r[inl], c[inl], dy[inl], dx[inl]
    candidates, errors, smoothing = _compare_models(ri, ci, yi, xi, allowed, spacing)
    chosen = None
    if "translation" in errors:
        chosen = "translation"
        for kind in ("affine", "field"):
            if kind in errors and _richer_is_better(errors[kind], errors[chosen]):
                chosen = kind
        if model != "auto" and chosen != model:
            notes.append(
                f"{model} model not used: "
                + ("too few tie points support it" if not candidates[model]["supported"]
                   else "it does not fit the tie points better than a simpler model")
                + f"; {chosen} used"
            )
    if chosen is None:
        return _too_few(empty, est, ties, n_in, candidates, notes)
    fitted = _fit_model(chosen, ri, ci, yi, xi, scale=scale, smoothing=smoothing)
    rmse = float(np.sqrt(errors[chosen].mean()))
    py, px = fitted.displacement(ties.row, ties.col)
    residual = np.hypot(ties.dy - py, ties.dx - px)
    accepted = np.zeros(len(ties), bool)
    accepted[idx[inl]] = True
    fit_rmse = float(np.sqrt(np.mean(residual[accepted] ** 2)))
    ties = replace(ties, accepted=accepted, residual=residual)
    model_se, structure_p, noisy = _noise_check(chosen, fitted, rmse, ri, ci, yi, xi)
    reliable = rmse <= _MAX_RMSE or noisy
    confirmed = est.reliable
    if chosen == "translation":
        # A handful of points can agree by chance on unrelated images: a
        # translation also needs the global estimate's confirmation, or as
        # many agreeing tie points as an affine model.
        if est.reliable:
            close = max(abs(fitted.matrix[0, 2] - est.dy), abs(fitted.matrix[1, 2] - est.dx))
            confirmed = close <= _AGREE_TOL + rmse
        else:
            confirmed = n_in >= _MIN_SUPPORT["affine"]
        reliable = reliable and confirmed
    if not reliable and chosen == "translation" and not confirmed:
        notes.append(
            "the translation could not be confirmed: identity used "
            "(the georeferencing is not corrected)"
        )
        fitted = GeometricModel.identity()
    elif not reliable or noisy:
        notes.append(_residual_note(rmse, model_se, structure_p, n_in, reliable=reliable))
    return Registration(
        fitted, bool(reliable), rmse, fit_rmse, est, ties, candidates, tuple(notes),
        window, spacing, model_se, structure_p,
    )


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


class _ReframedField:
    """A displacement field seen in another pixel frame (see :func:`reframe`)."""

    def __init__(self, base: Any, scale: float, offset: np.ndarray) -> None:
        self.base, self.scale, self.offset = base, float(scale), np.asarray(offset, np.float64)
        self.smoothing = base.smoothing
        self._rbf = base._rbf

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        a, (b0, b1) = self.scale, self.offset
        return self.base(a * np.ravel(rows) + b0, a * np.ravel(cols) + b1) / a


def reframe(model: GeometricModel, scale: float = 1.0, offset: ArrayLike = (0.0, 0.0)) -> GeometricModel:
    """The same geometric model in another pixel frame.

    ``model`` works in frame B; the new frame N is related to it by
    ``p_B = scale * p_N + offset`` (``p = (row, col)``, the same in both
    images). Used to apply a model estimated on an averaged copy of the images
    (``scale = 1 / f``, ``offset = -(f - 1) / (2 f)`` for ``f x f`` pixel
    blocks) and to apply a model to a window of the grid (``scale = 1``,
    ``offset = (row0, col0)``).

    Examples
    --------
    >>> m = GeometricModel.translation(1.5, -2.0)
    >>> [float(v) for v in reframe(m, 0.5, (-0.25, -0.25)).displacement(10.0, 10.0)]
    [3.0, -4.0]
    """
    a = float(scale)
    if a <= 0:
        raise ValueError("scale must be > 0")
    b = np.asarray(offset, np.float64).reshape(2)
    lin = model.matrix[:, :2]
    t = model.matrix[:, 2]
    matrix = np.column_stack([lin, (lin @ b + t - b) / a])
    field = None if model.field is None else _ReframedField(model.field, a, b)
    return GeometricModel(model.kind, matrix, field)


def apply_model(
    image: ArrayLike,
    model: GeometricModel,
    *,
    valid: ArrayLike | None = None,
    order: int = 3,
    node_spacing: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 2-D ``image`` (the moving image) through ``model`` onto the reference frame.

    ``out[r, c] = image[model.source_coordinates(r, c)]`` (spline of ``order``),
    NaN where the source is outside the image or touches invalid pixels. A
    field model is evaluated every ``node_spacing`` pixels and interpolated
    bilinearly in between (it is smooth on that scale), as the file warps do.

    Examples
    --------
    >>> out, ok = apply_model(np.arange(25.0).reshape(5, 5), GeometricModel.translation(1.0, 0.0), order=1)
    >>> out[0].tolist(), bool(ok[-1].any())
    ([5.0, 6.0, 7.0, 8.0, 9.0], False)
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"image must be a (rows, cols) array, got {arr.ndim} dimensions")
    mask = _check_valid(valid, arr, "valid")
    finite = np.isfinite(arr)
    mask = finite if mask is None else mask & finite
    rows, cols = arr.shape
    if model.is_linear:
        r = np.arange(rows, dtype=np.float64)[:, None]
        c = np.arange(cols, dtype=np.float64)[None, :]
        m = model.matrix
        sr = (m[0, 0] * r + m[0, 1] * c + m[0, 2]).astype(np.float32)
        sc = (m[1, 0] * r + m[1, 1] * c + m[1, 2]).astype(np.float32)
    else:
        nr = np.unique(np.r_[np.arange(0, rows, node_spacing), rows - 1]).astype(np.float64)
        nc = np.unique(np.r_[np.arange(0, cols, node_spacing), cols - 1]).astype(np.float64)
        node_r, node_c = model.source_coordinates(*np.meshgrid(nr, nc, indexing="ij"))

        def dense(node: np.ndarray) -> np.ndarray:
            part = np.stack([np.interp(np.arange(rows), nr, node[:, j]) for j in range(nc.size)], axis=1)
            return np.stack([np.interp(np.arange(cols), nc, row) for row in part]).astype(np.float32)

        sr, sc = dense(node_r), dense(node_c)
    filled = arr if mask.all() else np.where(mask, arr, np.float32(arr[mask].mean() if mask.any() else 0.0))
    out = ndi.map_coordinates(filled, [sr, sc], order=order, mode="nearest").astype(np.float32)
    base = mask
    if order > 1 and not mask.all():
        base = ~ndi.binary_dilation(~mask, iterations=(order + 1) // 2, border_value=0)
    support = ndi.map_coordinates(base.astype(np.float32), [sr, sc], order=1, mode="constant", cval=0.0)
    tol = 1e-6
    ok = (support >= 1.0 - 1e-4) & (sr >= -tol) & (sr <= rows - 1 + tol) & (sc >= -tol) & (sc <= cols - 1 + tol)
    out[~ok] = np.nan
    return out, ok
