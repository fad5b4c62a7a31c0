"""Fast local SSIM: the scikit-image definition, computed in row strips with OpenCV.

:func:`ssim_components_fast` returns the same local SSIM map (and its
contrast-structure factor) as :func:`skimage.metrics.structural_similarity`
with ``full=True``, for its Gaussian window (``gaussian_weights=True``, ``sigma``,
``truncate``, ``mode="reflect"``) and its uniform window (``win_size``), at a
fraction of the time and memory:

- the window means of x, y, xy and x² + y² (SSIM needs only the sum of the two
  variances) are separable filters run by
  :func:`cv2.sepFilter2D` with scipy's exact truncated kernel and
  ``BORDER_REFLECT`` (scipy's ``"reflect"``; OpenCV's default ``REFLECT_101`` is a
  different border);
- the image is processed in row strips with a halo of one window radius, so the
  temporaries are a few strip-sized buffers that each worker thread allocates once
  and reuses; OpenCV and numpy release the GIL, so the threads run in parallel;
- both images are shifted by one constant (the mean of their valid pixels) before
  the second moments are formed: variances and covariances do not change, and the
  float32 cancellation in ``E[x²] - E[x]²`` that limits scikit-image's own float32
  result in flat, bright areas becomes much smaller.

Every output pixel depends only on its own window, so the strips give exactly
the same values as one whole-array pass (tested).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, get_args

import numpy as np

__all__ = ["SsimWindow", "ssim_components_fast", "ssim_kernel"]

#: SSIM constants as in Wang et al. (2004) and scikit-image.
K1 = 0.01
K2 = 0.03

#: Window shapes of :func:`ssim_components_fast` (scikit-image's ``gaussian_weights``).
SsimWindow = Literal["gaussian", "uniform"]

#: Output pixels per strip that one thread processes at a time: about 1 MB per
#: float32 buffer, so a thread's seven buffers stay in the CPU's cache.
_STRIP_PIXELS = 1 << 18


def ssim_kernel(
    window: SsimWindow = "gaussian",
    *,
    sigma: float = 1.5,
    truncate: float = 3.5,
    win_size: int = 7,
) -> np.ndarray:
    """The 1-D window of the separable SSIM filter, float64, summing to 1.

    The Gaussian window is :func:`scipy.ndimage.gaussian_filter`'s kernel: radius
    ``int(truncate * sigma + 0.5)``, weights ``exp(-x² / (2 sigma²))`` normalised.
    The uniform window is ``win_size`` equal weights
    (:func:`scipy.ndimage.uniform_filter`).

    Examples
    --------
    >>> k = ssim_kernel(sigma=1.5)
    >>> k.size, round(float(k.sum()), 12)
    (11, 1.0)
    """
    if window == "gaussian":
        radius = int(truncate * sigma + 0.5)
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        phi = np.exp(-0.5 / (sigma * sigma) * x * x)
        return phi / phi.sum()
    return np.full(win_size, 1.0 / win_size)


def _float_type(dtype: np.dtype) -> np.dtype:
    """float32 stays float32 (float16 becomes it); anything else becomes float64."""
    return (
        np.dtype(np.float32)
        if dtype in (np.float16, np.float32)
        else np.dtype(np.float64)
    )


def _check(
    before: np.ndarray,
    after: np.ndarray,
    valid: np.ndarray | None,
    sigma: float,
    truncate: float,
    data_range: float,
    window: str,
    win_size: int,
    sample_cov: bool,
) -> None:
    if before.shape != after.shape:
        raise ValueError(
            f"before and after must have the same shape, got {before.shape} and {after.shape}"
        )
    if before.ndim != 2:
        raise ValueError("before and after must be 2-D (rows, cols) arrays")
    if before.size == 0:
        raise ValueError("before and after must not be empty")
    if valid is not None and valid.shape != before.shape:
        raise ValueError(f"valid must have shape {before.shape}, got {valid.shape}")
    if window not in get_args(SsimWindow):
        raise ValueError(
            f"window must be one of {get_args(SsimWindow)}, got {window!r}"
        )
    if not data_range > 0:
        raise ValueError("data_range must be > 0")
    if window == "gaussian":
        if not sigma > 0:
            raise ValueError("sigma must be > 0")
        if not truncate > 0:
            raise ValueError("truncate must be > 0")
    elif int(win_size) != win_size or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd positive integer, got {win_size}")
    elif sample_cov and win_size == 1:
        raise ValueError("win_size must be >= 3 with the sample covariance")


def ssim_components_fast(
    before: np.ndarray,
    after: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    sigma: float = 1.5,
    truncate: float = 3.5,
    data_range: float = 1.0,
    window: SsimWindow = "gaussian",
    win_size: int = 7,
    use_sample_covariance: bool | None = None,
    workers: int | None = None,
    strip_rows: int | None = None,
    center: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Local SSIM and its contrast-structure factor of two 2-D images, fast.

    The definition and parameters of :func:`skimage.metrics.structural_similarity`
    (``full=True``): with ``window="gaussian"`` it equals
    ``structural_similarity(before, after, gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False, data_range=data_range)`` (``truncate`` 3.5 as
    scikit-image fixes it), with ``window="uniform"`` it equals
    ``structural_similarity(before, after, win_size=win_size,
    data_range=data_range)`` (sample covariance, scikit-image's default). Borders
    are reflected (scipy ``mode="reflect"``). Unlike scikit-image, images smaller
    than the window (down to 1 pixel) are accepted.

    Parameters
    ----------
    before, after : (rows, cols) ndarray
        The two images; they are not modified.
    valid : (rows, cols) bool ndarray, optional
        True on valid pixels. Pixels whose window (radius ``int(truncate * sigma
        + 0.5)``, or ``win_size // 2`` for the uniform window) touches an invalid
        pixel are NaN, exactly as in :func:`changedetect.change.ssim_components`.
    sigma : float
        Standard deviation of the Gaussian window, pixels.
    truncate : float
        Radius of the Gaussian window in standard deviations.
    data_range : float
        Range of the image values (max - min possible); sets the SSIM constants
        ``C1 = (0.01 data_range)²`` and ``C2 = (0.03 data_range)²``.
    window : {"gaussian", "uniform"}
        Gaussian weights or a ``win_size`` x ``win_size`` square.
    win_size : int
        Side of the uniform window (odd); ignored for the Gaussian window.
    use_sample_covariance : bool, optional
        Scale variances and covariance by ``N / (N - 1)`` (``N`` = pixels in the
        window), as scikit-image does by default. Default: False for the Gaussian
        window (Wang et al. 2004), True for the uniform window.
    workers : int, optional
        Threads over row strips (default: the CPUs this process may use).
    strip_rows : int, optional
        Output rows per strip (default: about 256 k pixels per strip). Any value
        gives the same result; it only trades memory for overhead.
    center : float, optional
        The constant subtracted from both images before the second moments
        (default: the mean level of their valid pixels). It does not change the
        result beyond float rounding; pass one value for all the tiles of a scene
        to get bit-identical values where tiles overlap.

    Returns
    -------
    ssim : (rows, cols) ndarray
        Local structural similarity, float32 for float16/float32 inputs, float64
        otherwise.
    cs : (rows, cols) ndarray
        Contrast-structure factor ``(2 cov + C2) / (var_x + var_y + C2)``, same dtype.

    Raises
    ------
    ValueError
        On different shapes, non 2-D images or invalid parameters.

    Notes
    -----
    Both images are shifted by the same constant (the mean of their valid
    pixels, sampled on a grid) before the second moments are formed; SSIM does
    not change under such a shift, but the float32 cancellation in
    ``E[x²] - E[x]²`` shrinks. Extra memory is the two outputs plus seven
    strip-sized float buffers per worker thread.

    References
    ----------
    Wang, Z., Bovik, A. C., Sheikh, H. R., Simoncelli, E. P. (2004). Image quality
    assessment: from error visibility to structural similarity. IEEE TIP 13(4).

    Examples
    --------
    >>> a = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    >>> ssim, cs = ssim_components_fast(a, a)
    >>> bool(np.allclose(ssim, 1)), ssim.dtype
    (True, dtype('float32'))
    """
    sample_cov = (
        (window == "uniform")
        if use_sample_covariance is None
        else bool(use_sample_covariance)
    )
    _check(
        before, after, valid, sigma, truncate, data_range, window, win_size, sample_cov
    )
    dtype = _float_type(np.result_type(before.dtype, after.dtype))
    kernel = ssim_kernel(window, sigma=sigma, truncate=truncate, win_size=win_size)
    radius = (kernel.size - 1) // 2
    cov_norm = 1.0
    if sample_cov:
        n_px = kernel.size * kernel.size
        cov_norm = n_px / (n_px - 1)
    if valid is not None:
        valid = valid.astype(bool, copy=False)
        if valid.all():
            valid = None
    rows, cols = before.shape
    offset = _center(before, after, valid) if center is None else float(center)
    if strip_rows is None:
        strip_rows = max(16, 2 * radius, _STRIP_PIXELS // cols)
    strip_rows = max(1, min(int(strip_rows), rows))
    starts = list(range(0, rows, strip_rows))
    if workers is None:
        workers = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    workers = max(1, min(int(workers), len(starts)))

    ssim = np.empty((rows, cols), dtype)
    cs = np.empty((rows, cols), dtype)
    strip = _StripSSIM(
        before,
        after,
        valid,
        ssim,
        cs,
        kernel=kernel.astype(dtype),
        radius=radius,
        strip_rows=strip_rows,
        offset=offset,
        c1=(K1 * data_range) ** 2,
        c2=(K2 * data_range) ** 2,
        cov_norm=cov_norm,
    )
    if workers == 1:
        strip.work(starts)
    else:
        with ThreadPoolExecutor(workers) as pool:
            # a fixed share of strips per worker: each worker allocates its buffers once.
            list(pool.map(strip.work, [starts[w::workers] for w in range(workers)]))
    return ssim, cs


def _center(before: np.ndarray, after: np.ndarray, valid: np.ndarray | None) -> float:
    """One constant near both images' mean level (sampled; finite valid pixels only)."""
    step = max(1, int(np.sqrt(before.size / 65536)))
    b, a = before[::step, ::step], after[::step, ::step]
    ok = np.isfinite(b) & np.isfinite(a)
    if valid is not None:
        ok &= valid[::step, ::step]
    if not ok.any():
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        center = 0.5 * (
            float(np.mean(b[ok], dtype=np.float64))
            + float(np.mean(a[ok], dtype=np.float64))
        )
    return center if np.isfinite(center) else 0.0


class _StripSSIM:
    """SSIM of row strips ``[i0, i0 + strip_rows)`` written into the output arrays."""

    def __init__(
        self,
        before: np.ndarray,
        after: np.ndarray,
        valid: np.ndarray | None,
        ssim: np.ndarray,
        cs: np.ndarray,
        *,
        kernel: np.ndarray,
        radius: int,
        strip_rows: int,
        offset: float,
        c1: float,
        c2: float,
        cov_norm: float,
    ) -> None:
        self.before, self.after, self.valid = before, after, valid
        self.ssim, self.cs = ssim, cs
        self.kernel, self.radius, self.strip_rows = kernel, radius, strip_rows
        dt = ssim.dtype.type
        self.offset, self.c1, self.c2 = dt(offset), dt(c1), dt(c2)
        self.cov_norm = None if cov_norm == 1.0 else dt(cov_norm)

    def _filter(self) -> Callable[[np.ndarray, np.ndarray], None]:
        import cv2

        k = self.kernel

        def filt(src: np.ndarray, dst: np.ndarray) -> None:
            cv2.sepFilter2D(src, -1, k, k, dst=dst, borderType=cv2.BORDER_REFLECT)

        return filt

    def work(self, starts: list[int]) -> None:
        """Process the strips starting at ``starts`` with one set of buffers."""
        if not starts:
            return
        cols = self.ssim.shape[1]
        buf = np.empty((7, self.strip_rows + 2 * self.radius, cols), self.ssim.dtype)
        mask = (
            None
            if self.valid is None
            else np.empty((self.strip_rows + 2 * self.radius, cols), np.uint8)
        )
        filt = self._filter()
        for i0 in starts:
            self._strip(i0, buf, mask, filt)

    def _strip(
        self,
        i0: int,
        buf: np.ndarray,
        mask: np.ndarray | None,
        filt: Callable[[np.ndarray, np.ndarray], None],
    ) -> None:
        rows = self.ssim.shape[0]
        r = self.radius
        i1 = min(rows, i0 + self.strip_rows)
        # halo rows: real neighbours inside the image; at the image edges the
        # filter's own reflection of this sub-array is the image's reflection.
        h0, h1 = max(0, i0 - r), min(rows, i1 + r)
        dx, dy, ux, uy, uss, uxy, tmp = (b[: h1 - h0] for b in buf)
        np.subtract(self.before[h0:h1], self.offset, out=dx, casting="unsafe")
        np.subtract(self.after[h0:h1], self.offset, out=dy, casting="unsafe")
        invalid = None
        if self.valid is not None and mask is not None:
            invalid = mask[: h1 - h0].view(bool)
            np.logical_not(self.valid[h0:h1], out=invalid)
            np.copyto(dx, 0, where=invalid)
            np.copyto(dy, 0, where=invalid)
        # four window means: only vx + vy enters SSIM, so x² + y² is filtered as one.
        filt(dx, ux)
        filt(dy, uy)
        np.multiply(dx, dx, out=tmp)
        np.multiply(dy, dy, out=uss)
        tmp += uss
        filt(tmp, uss)
        np.multiply(dx, dy, out=tmp)
        filt(tmp, uxy)

        core = slice(i0 - h0, i1 - h0)
        ux, uy, uss, uxy, tmp = (b[core] for b in (ux, uy, uss, uxy, tmp))
        ssim, cs = self.ssim[i0:i1], self.cs[i0:i1]
        # (co)variances from the shifted means: vxy = E[xy] - E[x]E[y],
        # vx + vy = E[x² + y²] - E[x]² - E[y]².
        np.multiply(ux, uy, out=tmp)
        uxy -= tmp
        np.multiply(ux, ux, out=tmp)
        uss -= tmp
        np.multiply(uy, uy, out=tmp)
        uss -= tmp
        # cs = (2 cov + C2) / (vx + vy + C2)
        if self.cov_norm is not None:
            uss *= self.cov_norm
            uxy *= self.cov_norm
        uxy *= 2
        uxy += self.c2
        uss += self.c2
        np.divide(uxy, uss, out=cs)
        # luminance = (2 ux uy + C1) / (ux² + uy² + C1) with the true means.
        ux += self.offset
        uy += self.offset
        np.multiply(ux, uy, out=tmp)
        tmp *= 2
        tmp += self.c1
        ux *= ux
        uy *= uy
        ux += uy
        ux += self.c1
        tmp /= ux
        np.multiply(tmp, cs, out=ssim)
        if invalid is not None:
            self._mask_strip(invalid.view(np.uint8), i0 - h0, i1 - h0, ssim, cs)

    def _mask_strip(
        self, invalid_u8: np.ndarray, lo: int, hi: int, ssim: np.ndarray, cs: np.ndarray
    ) -> None:
        """NaN where the (2r+1)² window touches an invalid pixel (outside the image counts as valid)."""
        import cv2

        r = self.radius
        if r == 0:
            touched = invalid_u8[lo:hi].view(bool)
        else:
            square = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
            touched = cv2.dilate(
                invalid_u8, square, borderType=cv2.BORDER_CONSTANT, borderValue=0
            )
            touched = touched[lo:hi].view(bool)
        nan = ssim.dtype.type(np.nan)
        np.copyto(ssim, nan, where=touched)
        np.copyto(cs, nan, where=touched)
