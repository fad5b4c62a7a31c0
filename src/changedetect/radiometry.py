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


def _match_cumulative_cdf(
    source: np.ndarray, template: np.ndarray, values: np.ndarray | None = None
) -> np.ndarray:
    """Map values so that ``source``'s distribution matches ``template``'s.

    ``source`` and ``template`` are 1-D arrays of samples that define the mapping
    (quantile mapping as in :func:`skimage.exposure.match_histograms`, on sorted
    samples so float data needs no binning). The mapping is applied to ``values``
    (default: ``source``), interpolating between the source samples and clamping
    beyond their range.
    """
    src_values, src_counts = np.unique(source, return_counts=True)
    # Quantile of every distinct source value (mid-rank for ties), then template value at it.
    src_quantiles = (np.cumsum(src_counts) - 0.5 * src_counts) / source.size
    tmpl_sorted = np.sort(template)
    tmpl_quantiles = (np.arange(template.size) + 0.5) / template.size
    mapped_values = np.interp(src_quantiles, tmpl_quantiles, tmpl_sorted)
    if values is None:
        return mapped_values[np.searchsorted(src_values, source)]
    return np.interp(values, src_values, mapped_values)


def match_histograms(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    fit: np.ndarray | None = None,
) -> tuple[np.ndarray, NormalisationFit]:
    """Match each band's histogram of ``image`` to ``reference`` on valid pixels.

    Parameters
    ----------
    image, reference : (bands, rows, cols) ndarray
        Same shape; float data.
    valid : (rows, cols) bool ndarray, optional
        True where both images hold data. Statistics use these pixels only, and
        invalid pixels are returned unchanged.
    fit : (rows, cols) bool ndarray, optional
        Pixels (within ``valid``) whose histograms define the mapping; by default
        all valid pixels. Used to fit on pixels that did not change.

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
    fit = _fit_mask(valid, fit)
    for b in range(image.shape[0]):
        out[b][valid] = _match_cumulative_cdf(image[b][fit], reference[b][fit], image[b][valid])
    return out, _fit_report("histogram", image, out, reference, valid, keep_count=int(fit.sum()))


def linear_normalize(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    iterations: int = 5,
    clip_sigma: float = 2.5,
    fit: np.ndarray | None = None,
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
    fit = _fit_mask(valid, fit)
    x = image[:, fit].astype(np.float64)
    y = reference[:, fit].astype(np.float64)
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
    fit: np.ndarray | None = None,
) -> tuple[np.ndarray, NormalisationFit]:
    """Dispatch to a normalisation ``method``: "histogram", "linear" or "none".

    ``fit`` (optional, bool) restricts the pixels whose statistics define the
    mapping, e.g. to pixels whose local structure did not change; the mapping is
    applied to every valid pixel.
    """
    if method == "histogram":
        return match_histograms(image, reference, valid=valid, fit=fit)
    if method == "linear":
        return linear_normalize(image, reference, valid=valid, fit=fit)
    if method == "none":
        valid = _check(image, reference, valid)
        out = np.array(image, dtype=np.float32, copy=True)
        return out, _fit_report("none", image, out, reference, valid)
    raise ValueError(f"method must be 'histogram', 'linear' or 'none', got {method!r}")


def _fit_mask(valid: np.ndarray, fit: np.ndarray | None, minimum: int = 100) -> np.ndarray:
    """The pixels that define a mapping: ``fit & valid``, or all valid ones if too few."""
    if fit is None:
        return valid
    if fit.shape != valid.shape:
        raise ValueError(f"fit must have shape {valid.shape}, got {fit.shape}")
    chosen = fit.astype(bool) & valid
    return chosen if chosen.sum() >= min(minimum, int(valid.sum())) else valid


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
