"""Radiometric normalisation of the after image to the before image (pure numpy).

Two images of one place taken months apart by different sensors differ in gain,
offset, gamma and colour balance even where nothing changed. These functions map
the after image's values onto the before image's, band by band, using valid pixels
only, so that the remaining differences are more likely to be real change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NormalisationFit", "match_histograms", "linear_normalize", "normalize"]


@dataclass(frozen=True)
class NormalisationFit:
    """What a normalisation did, per band, for the run report."""

    method: str
    gain: tuple[float, ...]
    offset: tuple[float, ...]
    r2: tuple[float, ...]
    rmse_before: tuple[float, ...]
    rmse_after: tuple[float, ...]
    n_pixels: int

    def as_dict(self) -> dict:
        """JSON-serialisable description."""
        return {
            "method": self.method,
            "gain": list(self.gain),
            "offset": list(self.offset),
            "r2": list(self.r2),
            "rmse_before": list(self.rmse_before),
            "rmse_after": list(self.rmse_after),
            "n_pixels": self.n_pixels,
        }


def _check(image: np.ndarray, reference: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if image.ndim != 3 or reference.ndim != 3:
        raise ValueError("image and reference must be (bands, rows, cols) arrays")
    if image.shape != reference.shape:
        raise ValueError(
            f"image and reference must have the same shape, got {image.shape} and {reference.shape}"
        )
    if valid is None:
        valid = np.ones(image.shape[1:], dtype=bool)
    elif valid.shape != image.shape[1:]:
        raise ValueError(f"valid must have shape {image.shape[1:]}, got {valid.shape}")
    return valid.astype(bool, copy=False)


def _match_cumulative_cdf(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Map ``source`` values so that their distribution matches ``template``'s.

    Both are 1-D arrays of valid samples. Returns the mapped source values.
    Quantile mapping as in :func:`skimage.exposure.match_histograms`, done on
    sorted samples so float data needs no binning.
    """
    src_sorted = np.sort(source)
    tmpl_sorted = np.sort(template)
    # Quantile of every source sample (mid-rank for ties), then template value at it.
    src_values, src_idx, src_counts = np.unique(src_sorted, return_inverse=True, return_counts=True)
    src_quantiles = (np.cumsum(src_counts) - 0.5 * src_counts) / source.size
    tmpl_quantiles = (np.arange(template.size) + 0.5) / template.size
    mapped_values = np.interp(src_quantiles, tmpl_quantiles, tmpl_sorted)
    positions = np.searchsorted(src_values, source)
    return mapped_values[positions]


def match_histograms(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, NormalisationFit]:
    """Match each band's histogram of ``image`` to ``reference`` on valid pixels.

    Parameters
    ----------
    image, reference : (bands, rows, cols) ndarray
        Same shape; float data.
    valid : (rows, cols) bool ndarray, optional
        True where both images hold data. Statistics use these pixels only, and
        invalid pixels are returned unchanged.

    Returns
    -------
    matched : (bands, rows, cols) float32 ndarray
    fit : NormalisationFit
        Linear gain/offset equivalent of the mapping (least squares) and the RMSE
        between the images before and after, per band.
    """
    valid = _check(image, reference, valid)
    out = np.array(image, dtype=np.float32, copy=True)
    n = int(valid.sum())
    if n == 0:
        raise ValueError("valid has no True pixel")
    for b in range(image.shape[0]):
        out[b][valid] = _match_cumulative_cdf(image[b][valid], reference[b][valid])
    return out, _fit_report("histogram", image, out, reference, valid)


def linear_normalize(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    iterations: int = 5,
    clip_sigma: float = 2.5,
) -> tuple[np.ndarray, NormalisationFit]:
    """Robust per-band linear regression of ``reference`` on ``image``.

    The fit is iterated on pseudo-invariant pixels: after each fit, pixels whose
    residual (in any band) exceeds ``clip_sigma`` robust standard deviations are
    dropped, so changed areas do not bias the gain and offset.

    Returns
    -------
    normalised : (bands, rows, cols) float32 ndarray
    fit : NormalisationFit
    """
    valid = _check(image, reference, valid)
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    x = image[:, valid].astype(np.float64)
    y = reference[:, valid].astype(np.float64)
    if x.shape[1] < 2:
        raise ValueError("valid has fewer than 2 True pixels")
    keep = np.ones(x.shape[1], dtype=bool)
    gains = np.ones(x.shape[0])
    offsets = np.zeros(x.shape[0])
    for _ in range(iterations):
        for b in range(x.shape[0]):
            xb, yb = x[b, keep], y[b, keep]
            var = xb.var()
            gains[b] = ((xb - xb.mean()) * (yb - yb.mean())).mean() / var if var > 0 else 1.0
            offsets[b] = yb.mean() - gains[b] * xb.mean()
        resid = y - (gains[:, None] * x + offsets[:, None])
        mad = np.median(np.abs(resid - np.median(resid, axis=1, keepdims=True)), axis=1) * 1.4826
        mad = np.where(mad > 0, mad, np.finfo(float).eps)
        new_keep = np.all(np.abs(resid) <= clip_sigma * mad[:, None], axis=0)
        if new_keep.sum() < 2 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    out = np.array(image, dtype=np.float32, copy=True)
    for b in range(image.shape[0]):
        out[b][valid] = (gains[b] * image[b][valid] + offsets[b]).astype(np.float32)
    return out, _fit_report("linear", image, out, reference, valid, keep_count=int(keep.sum()))


def normalize(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    method: str = "histogram",
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, NormalisationFit]:
    """Dispatch to a normalisation ``method``: "histogram", "linear" or "none"."""
    if method == "histogram":
        return match_histograms(image, reference, valid=valid)
    if method == "linear":
        return linear_normalize(image, reference, valid=valid)
    if method == "none":
        valid = _check(image, reference, valid)
        out = np.array(image, dtype=np.float32, copy=True)
        return out, _fit_report("none", image, out, reference, valid)
    raise ValueError(f"method must be 'histogram', 'linear' or 'none', got {method!r}")


def _fit_report(
    method: str,
    image: np.ndarray,
    out: np.ndarray,
    reference: np.ndarray,
    valid: np.ndarray,
    keep_count: int | None = None,
) -> NormalisationFit:
    gains, offsets, r2s, rb, ra = [], [], [], [], []
    for b in range(image.shape[0]):
        x = image[b][valid].astype(np.float64)
        m = out[b][valid].astype(np.float64)
        y = reference[b][valid].astype(np.float64)
        var = x.var()
        g = float(((x - x.mean()) * (m - m.mean())).mean() / var) if var > 0 else 1.0
        gains.append(round(g, 6))
        offsets.append(round(float(m.mean() - g * x.mean()), 6))
        sy = y.std()
        sm = m.std()
        r = float(((y - y.mean()) * (m - m.mean())).mean() / (sy * sm)) if sy > 0 and sm > 0 else 0.0
        r2s.append(round(r * r, 6))
        rb.append(round(float(np.sqrt(np.mean((x - y) ** 2))), 6))
        ra.append(round(float(np.sqrt(np.mean((m - y) ** 2))), 6))
    return NormalisationFit(
        method=method,
        gain=tuple(gains),
        offset=tuple(offsets),
        r2=tuple(r2s),
        rmse_before=tuple(rb),
        rmse_after=tuple(ra),
        n_pixels=int(valid.sum()) if keep_count is None else keep_count,
    )
