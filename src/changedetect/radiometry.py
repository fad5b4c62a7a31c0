"""Radiometric normalisation of the after image to the before image (pure numpy/scipy).

Two images of one place taken months apart by different sensors differ in gain,
offset, gamma and colour balance even where nothing changed. These functions map
the after image's values onto the before image's, band by band, using valid pixels
only, so that the remaining differences are more likely to be real change.

There are two ways to use them:

* fit, then apply. :func:`fit_normalisation` fits a mapping on *samples*: two
  ``(bands, n)`` arrays holding the same ``n`` pixels of both images, e.g. pixels
  sampled over many windows and restricted to those that did not change. It returns
  a :class:`Normalisation`, a small per-pixel mapping. :meth:`Normalisation.apply`
  applies it to a whole image or to any window of it with identical results, and
  :meth:`Normalisation.report` describes it for the run report.
* one call on whole images: :func:`normalize` dispatches to :func:`match_histograms`,
  :func:`linear_normalize` or IR-MAD. These fit on the pixels of the image and apply
  the result to every valid pixel.

Methods
-------
``"histogram"``
    Per-band quantile mapping (histogram matching). Handles non-linear differences
    such as gamma, but only if the fitting pixels have the same distribution of
    land cover on both dates.
``"linear"``
    Per-band robust least-squares gain and offset, refitted after clipping outliers.
``"irmad"``
    Iteratively reweighted multivariate alteration detection (IR-MAD) [1]_ finds
    pseudo-invariant pixels, and an orthogonal regression on them gives each band's
    gain and offset [2]_. It needs no prior no-change mask and is not biased by
    changed pixels, but it can only correct linear differences.
``"none"``
    The identity.

References
----------
.. [1] A. A. Nielsen, "The regularized iteratively reweighted MAD method for change
       detection in multi- and hyperspectral data", IEEE Transactions on Image
       Processing 16(2), 463-478, 2007. :DOI:`10.1109/TIP.2006.888195`
.. [2] M. J. Canty and A. A. Nielsen, "Automatic radiometric normalization of
       multitemporal satellite imagery with the iteratively re-weighted MAD
       transformation", Remote Sensing of Environment 112(3), 1025-1036, 2008.
       :DOI:`10.1016/j.rse.2007.07.013`
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import linalg
from scipy.stats import chi2 as _chi2

__all__ = [
    "METHODS",
    "IRMADResult",
    "Normalisation",
    "NormalisationFit",
    "fit_normalisation",
    "irmad",
    "linear_normalize",
    "match_histograms",
    "normalize",
]

#: Normalisation methods accepted by :func:`fit_normalisation` and :func:`normalize`.
METHODS: tuple[str, ...] = ("histogram", "linear", "irmad", "none")

#: Keyword options each method accepts (see :func:`fit_normalisation`).
_OPTIONS: dict[str, frozenset[str]] = {
    "histogram": frozenset({"max_knots", "thin_above"}),
    "linear": frozenset({"iterations", "clip_sigma"}),
    "irmad": frozenset(
        {"max_iter", "tol", "invariant_probability", "min_invariant", "iterations", "clip_sigma"}
    ),
    "none": frozenset(),
}


@dataclass(frozen=True)
class NormalisationFit:
    """What a normalisation did, per band, for the run report.

    Attributes
    ----------
    method : str
        The normalisation method.
    gain, offset : tuple of float
        Least-squares line of the normalised values on the original values, per band
        (for a linear method, its own gain and offset).
    r2 : tuple of float
        Squared correlation between the normalised values and the reference, per band.
    rmse_before, rmse_after : tuple of float
        Root-mean-square difference to the reference before and after normalisation.
    n_pixels : int
        Number of pixels that defined the mapping (for "linear" the inliers of the
        last fit, for "irmad" the pseudo-invariant pixels).
    extra : dict
        Method-specific statistics (IR-MAD: iterations, convergence, canonical
        correlations, ...); empty for the other methods.
    """

    method: str
    gain: tuple[float, ...]
    offset: tuple[float, ...]
    r2: tuple[float, ...]
    rmse_before: tuple[float, ...]
    rmse_after: tuple[float, ...]
    n_pixels: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-serialisable description (with an ``"extra"`` key if not empty)."""
        out = {
            "method": self.method,
            "gain": list(self.gain),
            "offset": list(self.offset),
            "r2": list(self.r2),
            "rmse_before": list(self.rmse_before),
            "rmse_after": list(self.rmse_after),
            "n_pixels": self.n_pixels,
        }
        if self.extra:
            out["extra"] = dict(self.extra)
        return out


@dataclass(frozen=True, eq=False)
class Normalisation:
    """A fitted per-band radiometric mapping from image values to reference values.

    Made by :func:`fit_normalisation`. The mapping is a pure function of each pixel's
    value in each band, so applying it to a window gives exactly the values that
    applying it to the whole image gives there.

    Attributes
    ----------
    method : str
        One of :data:`METHODS`.
    bands : int
        Number of bands.
    gain, offset : tuple of float
        "linear" and "irmad": ``reference ~= gain * image + offset`` per band.
        Empty for the other methods.
    knots, mapped : tuple of (k,) float64 ndarray
        "histogram": per band, increasing image values and the reference values they
        map to; values in between are interpolated linearly and values beyond are
        clamped to the end values. Empty for the other methods.
    n_pixels : int
        Number of samples that defined the mapping (see :class:`NormalisationFit`).
    extra : dict
        Method-specific fit statistics, copied into the report.
    """

    method: str
    bands: int
    gain: tuple[float, ...] = ()
    offset: tuple[float, ...] = ()
    knots: tuple[np.ndarray, ...] = ()
    mapped: tuple[np.ndarray, ...] = ()
    n_pixels: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the fields; store the knots as read-only float64 arrays."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bands < 1:
            raise ValueError(f"bands must be >= 1, got {self.bands}")
        linear = self.method in ("linear", "irmad")
        if len(self.gain) != (self.bands if linear else 0) or len(self.offset) != len(self.gain):
            raise ValueError(f"gain and offset must have one value per band for {self.method!r}")
        n_maps = self.bands if self.method == "histogram" else 0
        if len(self.knots) != n_maps or len(self.mapped) != n_maps:
            raise ValueError(f"knots and mapped must have one array per band for {self.method!r}")
        knots, mapped = [], []
        for k, m in zip(self.knots, self.mapped, strict=True):
            k = np.array(k, dtype=np.float64)
            m = np.array(m, dtype=np.float64)
            if k.ndim != 1 or k.shape != m.shape or k.size == 0:
                raise ValueError("knots and mapped must be non-empty 1-D arrays of equal length")
            if k.size > 1 and not np.all(np.diff(k) > 0):
                raise ValueError("knots must be strictly increasing")
            k.setflags(write=False)
            m.setflags(write=False)
            knots.append(k)
            mapped.append(m)
        object.__setattr__(self, "knots", tuple(knots))
        object.__setattr__(self, "mapped", tuple(mapped))
        object.__setattr__(self, "gain", tuple(float(g) for g in self.gain))
        object.__setattr__(self, "offset", tuple(float(o) for o in self.offset))

    def apply(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Map ``image`` onto the reference's radiometry.

        Parameters
        ----------
        image : (bands, rows, cols) ndarray
            The image or any window of it (any ``(bands, ...)`` shape works, e.g.
            ``(bands, n)`` samples).
        valid : (rows, cols) bool ndarray, optional
            True where the image holds data; other pixels are returned unchanged
            (cast to float32). By default every pixel is mapped.

        Returns
        -------
        normalised : (bands, rows, cols) float32 ndarray
            A new array; ``image`` is not modified.
        """
        image = np.asarray(image)
        if image.ndim < 2 or image.shape[0] != self.bands:
            raise ValueError(f"image must be a ({self.bands}, ...) array of bands first, got shape {image.shape}")
        if valid is not None:
            valid = np.asarray(valid)
            if valid.shape != image.shape[1:]:
                raise ValueError(f"valid must have shape {image.shape[1:]}, got {valid.shape}")
            valid = valid.astype(bool, copy=False)
        out = np.array(image, dtype=np.float32, copy=True)
        if self.method == "none":
            return out
        for b in range(self.bands):
            if valid is None:
                out[b] = self._map_band(b, image[b])
            else:
                out[b][valid] = self._map_band(b, image[b][valid])
        return out

    def _map_band(self, b: int, values: np.ndarray) -> np.ndarray:
        if self.method == "histogram":
            return np.interp(values, self.knots[b], self.mapped[b])
        # np.float64 scalars keep the arithmetic of the original linear_normalize.
        return np.float64(self.gain[b]) * values + np.float64(self.offset[b])

    def report(self, image_samples: np.ndarray, reference_samples: np.ndarray) -> NormalisationFit:
        """Describe the mapping on samples, for the run report.

        Parameters
        ----------
        image_samples, reference_samples : (bands, n) ndarray
            The same pixels of both images, e.g. the samples the mapping was fitted on.

        Returns
        -------
        NormalisationFit
            Per band: least-squares gain/offset of the mapped samples on the image
            samples, r² between mapped and reference samples, and the RMSE to the
            reference before and after mapping; ``n_pixels`` is the number of
            samples that defined the mapping and ``extra`` the method's fit
            statistics (IR-MAD: iterations, convergence, canonical correlations,
            share of no-change weight, pseudo-invariant pixels, notes).
        """
        x, y = _check_samples(image_samples, reference_samples)
        if x.shape[0] != self.bands:
            raise ValueError(f"samples must have {self.bands} bands, got {x.shape[0]}")
        m = self.apply(x)
        stats = [_band_stats(x[b], m[b], y[b]) for b in range(self.bands)]
        return _make_fit(self.method, stats, self.n_pixels, self.extra)


@dataclass(frozen=True, eq=False)
class IRMADResult:
    """Outcome of :func:`irmad` on ``n`` samples of ``bands`` bands.

    Attributes
    ----------
    no_change : (n,) float64 ndarray
        Probability of no change, ``1 - chi2.cdf(chi2, bands)``: near 0 over changed
        pixels; spread over [0, 1] over unchanged ones (uniform in theory, skewed
        towards 0 in practice because the reweighted covariance slightly
        underestimates the MAD variances).
    chi2 : (n,) float64 ndarray
        Sum of the squared standardised MAD variates.
    mad : (bands, n) float64 ndarray
        MAD variates, smallest canonical correlation (most change) first.
    correlations : tuple of float
        Canonical correlations, largest first.
    iterations : int
        Number of reweighting iterations done.
    converged : bool
        True if the canonical correlations changed by less than ``tol``.
    """

    no_change: np.ndarray
    chi2: np.ndarray
    mad: np.ndarray
    correlations: tuple[float, ...]
    iterations: int
    converged: bool


def irmad(
    image_samples: np.ndarray,
    reference_samples: np.ndarray,
    *,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> IRMADResult:
    """Iteratively reweighted multivariate alteration detection (IR-MAD) on samples.

    Canonical correlation analysis between the bands of the two dates gives pairs
    of linear combinations ``U = a.T x``, ``V = b.T y`` with maximal correlation
    ``rho``; the MAD variates ``U - V`` have variance ``2 (1 - rho)``, and the sum
    ``Z`` of their squares standardised by that variance is chi-square distributed
    with ``bands`` degrees of freedom where nothing changed. Each pixel's weight in
    the next weighted covariance is its no-change probability ``1 - chi2.cdf(Z,
    bands)``, so changed pixels stop influencing the transformation [1]_.

    Parameters
    ----------
    image_samples, reference_samples : (bands, n) ndarray
        The same ``n`` pixels of both images; ``n >= 2 * bands + 2``.
    max_iter : int, optional
        Maximum number of iterations (the first is the plain, unweighted MAD).
    tol : float, optional
        Stop when no canonical correlation changes by ``tol`` or more.

    Returns
    -------
    IRMADResult
        No-change probability and chi-square statistic per sample, MAD variates,
        canonical correlations, number of iterations and whether they converged.

    Raises
    ------
    ValueError
        If the sample arrays have different shapes, too few samples or non-finite
        values, or if ``max_iter < 1`` or ``tol < 0``.

    Notes
    -----
    Deterministic (no randomness). The generalized eigenproblems are solved with
    :func:`scipy.linalg.eigh`; a ridge of ``1e-10`` times the mean variance keeps
    the covariances positive definite when a band is constant.

    References
    ----------
    .. [1] A. A. Nielsen, "The regularized iteratively reweighted MAD method for
           change detection in multi- and hyperspectral data", IEEE Transactions on
           Image Processing 16(2), 463-478, 2007.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.random((2, 500))
    >>> res = irmad(0.5 * ref + 0.1 + 0.01 * rng.standard_normal((2, 500)), ref)
    >>> res.converged
    True
    """
    x, y = _check_samples(image_samples, reference_samples)
    p, n = x.shape
    if n < 2 * p + 2:
        raise ValueError(f"irmad needs at least {2 * p + 2} samples for {p} bands, got {n}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    z = np.vstack([x, y]).astype(np.float64)
    weights = np.ones(n)
    rho_prev: np.ndarray | None = None
    converged = False
    iterations = 0
    for it in range(1, max_iter + 1):
        iterations = it
        total = weights.sum()
        if not total > 0:  # every pixel changed: keep the last transformation
            break
        mean = z @ weights / total
        zc = z - mean[:, None]
        cov = (zc * weights) @ zc.T / total
        a, b, rho = _cca((cov + cov.T) / 2, p)
        mad = a.T @ zc[:p] - b.T @ zc[p:]
        var = np.maximum(2.0 * (1.0 - rho), 1e-12)
        chi = np.einsum("in,in->n", mad, mad / var[:, None])
        weights = _chi2.sf(chi, p)
        if rho_prev is not None and np.max(np.abs(rho - rho_prev)) < tol:
            converged = True
            break
        rho_prev = rho
    return IRMADResult(
        no_change=weights,
        chi2=chi,
        mad=mad,
        correlations=tuple(float(r) for r in rho[::-1]),
        iterations=iterations,
        converged=converged,
    )


def fit_normalisation(
    image_samples: np.ndarray,
    reference_samples: np.ndarray,
    *,
    method: str = "histogram",
    **opts: Any,
) -> Normalisation:
    """Fit a per-band mapping of image values onto reference values from samples.

    Parameters
    ----------
    image_samples, reference_samples : (bands, n) ndarray
        The same ``n`` pixels of both images, already restricted to the pixels that
        should define the mapping (valid in both, and for "histogram" and "linear"
        preferably unchanged). Finite values.
    method : {"histogram", "linear", "irmad", "none"}
        ``"histogram"``: quantile mapping, as :func:`skimage.exposure.match_histograms`
        but on sorted samples so float data needs no binning. Options:

        - ``max_knots`` (int or None, default 4096) and ``thin_above`` (int, default
          65536): a band with more than ``thin_above`` distinct sample values keeps
          at most ``max_knots`` knots of its mapping, chosen evenly in rank and in
          mapped value (the mapping is monotone, so the error of the thinned mapping
          is at most the mapped-value gap between neighbouring knots, about
          ``4 * range / max_knots``, and in practice far smaller). ``None`` keeps
          every distinct value, which reproduces :func:`match_histograms` exactly.

        ``"linear"``: least-squares gain and offset per band, refitted on the
        pixels whose residual is within ``clip_sigma`` robust standard deviations in
        every band. Options: ``iterations`` (int, default 5), ``clip_sigma`` (float,
        default 2.5).

        ``"irmad"``: :func:`irmad` gives each sample's no-change probability; the
        pseudo-invariant samples (probability above ``invariant_probability``) give
        each band's gain and offset by orthogonal regression (major axis) of the
        reference on the image [1]_. With fewer than ``min_invariant`` of them it
        falls back to the robust linear fit on all samples and says so in the
        notes. Options: ``max_iter`` (int, default 30), ``tol`` (float, default
        1e-4), ``invariant_probability`` (float, default 0.95), ``min_invariant``
        (int, default ``max(100, 10 * bands)``), and ``iterations`` and
        ``clip_sigma`` for the fallback. Only a few percent of the unchanged pixels
        pass 0.95 (about 1.5-2.5 % on synthetic tests), so give at least several
        thousand samples.

        ``"none"``: the identity.
    **opts
        The method's options above.

    Returns
    -------
    Normalisation
        The mapping; :meth:`Normalisation.apply` applies it, and
        :meth:`Normalisation.report` describes it. For "irmad" its ``extra``
        holds ``iterations``, ``converged``, ``canonical_correlations`` (largest
        first), ``no_change_weight_share`` (mean no-change probability over the
        samples; about 0.33 on synthetic data where nothing changed, lower the
        more changed), ``n_invariant``, ``invariant_share``,
        ``invariant_probability``, ``regression`` and ``notes``.

    Raises
    ------
    ValueError
        For an unknown method or option, samples that are not two ``(bands, n)``
        arrays of the same shape, non-finite samples, or too few samples (1 for
        "histogram" and "none", 2 for "linear", ``2 * bands + 2`` for "irmad").

    References
    ----------
    .. [1] M. J. Canty and A. A. Nielsen, "Automatic radiometric normalization of
           multitemporal satellite imagery with the iteratively re-weighted MAD
           transformation", Remote Sensing of Environment 112(3), 1025-1036, 2008.

    Examples
    --------
    >>> ref = np.linspace(0, 1, 200).reshape(2, 100)
    >>> norm = fit_normalisation(2 * ref + 1, ref, method="linear")
    >>> np.round(norm.gain, 6), np.round(norm.offset, 6)
    (array([0.5, 0.5]), array([-0.5, -0.5]))
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unknown = sorted(set(opts) - _OPTIONS[method])
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; it accepts {sorted(_OPTIONS[method])}"
        )
    x, y = _check_samples(image_samples, reference_samples)
    if method == "histogram":
        return _fit_histogram(x, y, **opts)
    if method == "linear":
        return _fit_linear(x, y, **opts)
    if method == "irmad":
        return _fit_irmad(x, y, **opts)
    return Normalisation("none", bands=x.shape[0], n_pixels=x.shape[1])


# --------------------------------------------------------------------------- whole images
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
    src_values, src_counts, mapped_values = _cdf_knots(source, template)
    if values is None:
        return mapped_values[np.searchsorted(src_values, source)]
    return np.interp(values, src_values, mapped_values)


def _cdf_knots(source: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ``source`` values, their counts, and the ``template`` values they map to."""
    src_values, src_counts = np.unique(source, return_counts=True)
    # Quantile of every distinct source value (mid-rank for ties), then template value at it.
    src_quantiles = (np.cumsum(src_counts) - 0.5 * src_counts) / source.size
    tmpl_sorted = np.sort(template)
    tmpl_quantiles = (np.arange(template.size) + 0.5) / template.size
    mapped_values = np.interp(src_quantiles, tmpl_quantiles, tmpl_sorted)
    return src_values, src_counts, mapped_values


def match_histograms(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    fit: np.ndarray | None = None,
) -> tuple[np.ndarray, NormalisationFit]:
    """Match each band's histogram of ``image`` to ``reference`` on valid pixels.

    The exact quantile mapping (no knot thinning) of
    ``fit_normalisation(..., method="histogram", max_knots=None)`` fitted on the
    ``fit`` pixels, applied to every valid pixel.

    Parameters
    ----------
    image, reference : (bands, rows, cols) ndarray
        Same shape; float data.
    valid : (rows, cols) bool ndarray, optional
        True where both images hold data. Statistics use these pixels only, and
        invalid pixels are returned unchanged.
    fit : (rows, cols) bool ndarray, optional
        Pixels (within ``valid``) whose histograms define the mapping; by default
        all valid pixels. Used to fit on pixels that did not change. If fewer than
        100 are given (and ``valid`` has more), all valid pixels are used.

    Returns
    -------
    matched : (bands, rows, cols) float32 ndarray
    fit : NormalisationFit
        Linear gain/offset equivalent of the mapping (least squares) and the RMSE
        between the images before and after, per band, over the valid pixels.
    """
    valid = _check(image, reference, valid)
    if not valid.any():
        raise ValueError("valid has no True pixel")
    chosen = _fit_mask(valid, fit)
    norm = fit_normalisation(image[:, chosen], reference[:, chosen], method="histogram", max_knots=None)
    return _apply_and_report(norm, image, reference, valid)


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
    dropped, so changed areas do not bias the gain and offset. This is
    ``fit_normalisation(..., method="linear")`` fitted on the ``fit`` pixels
    (see :func:`match_histograms` for ``valid`` and ``fit``), applied to every
    valid pixel.

    Returns
    -------
    normalised : (bands, rows, cols) float32 ndarray
    fit : NormalisationFit
    """
    valid = _check(image, reference, valid)
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    chosen = _fit_mask(valid, fit)
    if chosen.sum() < 2:
        raise ValueError("valid has fewer than 2 True pixels")
    norm = fit_normalisation(
        image[:, chosen], reference[:, chosen], method="linear", iterations=iterations, clip_sigma=clip_sigma
    )
    return _apply_and_report(norm, image, reference, valid)


def normalize(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    method: str = "histogram",
    valid: np.ndarray | None = None,
    fit: np.ndarray | None = None,
    **opts: Any,
) -> tuple[np.ndarray, NormalisationFit]:
    """Normalise a whole image with ``method``: "histogram", "linear", "irmad" or "none".

    Parameters
    ----------
    image, reference : (bands, rows, cols) ndarray
        Same shape.
    method : {"histogram", "linear", "irmad", "none"}
        See :func:`fit_normalisation`. "histogram" is :func:`match_histograms`
        (exact, unless ``max_knots`` is given) and "linear" :func:`linear_normalize`.
    valid : (rows, cols) bool ndarray, optional
        True where both images hold data; invalid pixels are returned unchanged.
    fit : (rows, cols) bool ndarray, optional
        Restricts the pixels whose statistics define the mapping, e.g. to pixels
        whose local structure did not change; the mapping is applied to every
        valid pixel.
    **opts
        The method's options (see :func:`fit_normalisation`).

    Returns
    -------
    normalised : (bands, rows, cols) float32 ndarray
    fit : NormalisationFit
        Computed over the valid pixels; for "irmad" with the IR-MAD statistics in
        ``extra``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unknown = sorted(set(opts) - _OPTIONS[method])
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; it accepts {sorted(_OPTIONS[method])}"
        )
    if method == "linear":
        return linear_normalize(image, reference, valid=valid, fit=fit, **opts)
    if method == "none":
        valid = _check(image, reference, valid)
        out = np.array(image, dtype=np.float32, copy=True)
        return out, _fit_report("none", image, out, reference, valid)
    valid = _check(image, reference, valid)
    if not valid.any():
        raise ValueError("valid has no True pixel")
    chosen = _fit_mask(valid, fit)
    if method == "histogram":
        opts.setdefault("max_knots", None)
    norm = fit_normalisation(image[:, chosen], reference[:, chosen], method=method, **opts)
    return _apply_and_report(norm, image, reference, valid)


# --------------------------------------------------------------------------- fitters
def _check_samples(image_samples: np.ndarray, reference_samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(image_samples)
    y = np.asarray(reference_samples)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"image_samples and reference_samples must be (bands, n) arrays, got shapes {x.shape} and {y.shape}"
        )
    if x.shape != y.shape:
        raise ValueError(
            f"image_samples and reference_samples must have the same shape, got {x.shape} and {y.shape}"
        )
    if x.shape[0] < 1:
        raise ValueError("samples must have at least one band")
    if x.shape[1] < 1:
        raise ValueError("no samples: image_samples and reference_samples have n = 0")
    for name, arr in (("image_samples", x), ("reference_samples", y)):
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} has non-finite values (NaN or inf): restrict the samples to valid pixels")
    return x, y


def _fit_histogram(
    x: np.ndarray, y: np.ndarray, *, max_knots: int | None = 4096, thin_above: int = 65536
) -> Normalisation:
    if max_knots is not None and (int(max_knots) != max_knots or max_knots < 16):
        raise ValueError(f"max_knots must be an integer >= 16 or None, got {max_knots!r}")
    if int(thin_above) != thin_above or (max_knots is not None and thin_above < max_knots):
        raise ValueError(f"thin_above must be an integer >= max_knots, got {thin_above!r}")
    knots, mapped = [], []
    for b in range(x.shape[0]):
        src_values, src_counts, mapped_values = _cdf_knots(x[b], y[b])
        if max_knots is not None and src_values.size > thin_above:
            keep = _thin(src_counts, mapped_values, int(max_knots))
            src_values, mapped_values = src_values[keep], mapped_values[keep]
        knots.append(src_values)
        mapped.append(mapped_values)
    return Normalisation(
        "histogram", bands=x.shape[0], knots=tuple(knots), mapped=tuple(mapped), n_pixels=x.shape[1]
    )


def _thin(counts: np.ndarray, mapped: np.ndarray, max_knots: int) -> np.ndarray:
    """Indices of at most ``max_knots`` knots of a monotone mapping, ends included.

    Half are spaced evenly in rank (pixel count), so the mapping stays accurate
    where most pixels are; the other half are pairs around evenly spaced mapped
    values, so no gap between neighbouring kept knots spans more than one level
    unless the two knots were neighbours already.
    """
    n = counts.size
    cum = np.cumsum(counts)
    by_rank = np.searchsorted(cum, np.linspace(1, cum[-1], max_knots // 2 - 2))
    levels = np.linspace(mapped[0], mapped[-1], max_knots // 4)
    upper = np.clip(np.searchsorted(mapped, levels), 1, n - 1)
    return np.unique(np.concatenate([[0, n - 1], by_rank, upper, upper - 1]))


def _linear_gains(
    x: np.ndarray, y: np.ndarray, iterations: int, clip_sigma: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Robust per-band least squares of ``y`` on ``x``: gains, offsets, inlier count."""
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
    return gains, offsets, int(keep.sum())


def _check_linear_opts(n: int, iterations: int, clip_sigma: float) -> None:
    if n < 2:
        raise ValueError(f"a linear fit needs at least 2 samples, got {n}")
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    if not clip_sigma > 0:
        raise ValueError(f"clip_sigma must be > 0, got {clip_sigma}")


def _fit_linear(x: np.ndarray, y: np.ndarray, *, iterations: int = 5, clip_sigma: float = 2.5) -> Normalisation:
    _check_linear_opts(x.shape[1], iterations, clip_sigma)
    gains, offsets, kept = _linear_gains(x.astype(np.float64), y.astype(np.float64), iterations, clip_sigma)
    return Normalisation(
        "linear", bands=x.shape[0], gain=tuple(gains), offset=tuple(offsets), n_pixels=kept
    )


def _fit_irmad(
    x: np.ndarray,
    y: np.ndarray,
    *,
    max_iter: int = 30,
    tol: float = 1e-4,
    invariant_probability: float = 0.95,
    min_invariant: int | None = None,
    iterations: int = 5,
    clip_sigma: float = 2.5,
) -> Normalisation:
    if not 0 <= invariant_probability < 1:
        raise ValueError(f"invariant_probability must be in [0, 1), got {invariant_probability}")
    p, n = x.shape
    need = max(100, 10 * p) if min_invariant is None else int(min_invariant)
    if need < 2:
        raise ValueError(f"min_invariant must be >= 2, got {min_invariant}")
    _check_linear_opts(n, iterations, clip_sigma)
    res = irmad(x, y, max_iter=max_iter, tol=tol)
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    invariant = res.no_change > invariant_probability
    n_inv = int(invariant.sum())
    notes: list[str] = []
    if not res.converged:
        notes.append(
            f"IR-MAD did not converge in {res.iterations} iterations "
            f"(canonical correlations still changed by >= {tol})"
        )
    if n_inv >= need:
        fits = [_orthogonal_regression(x[b, invariant], y[b, invariant]) for b in range(p)]
        gains = np.array([g for g, _, _ in fits])
        offsets = np.array([o for _, o, _ in fits])
        n_pixels = n_inv
        regression = "orthogonal"
        if any(degenerate for *_, degenerate in fits):
            notes.append("a band has no variance or no correlation over the invariant pixels: gain 1 there")
    else:
        gains, offsets, n_pixels = _linear_gains(x, y, iterations, clip_sigma)
        regression = "linear (fallback)"
        notes.append(
            f"only {n_inv} pseudo-invariant pixels (no-change probability > {invariant_probability}), "
            f"fewer than {need}: gain and offset from the robust linear fit on all {n} samples instead"
        )
    extra = {
        "iterations": res.iterations,
        "converged": res.converged,
        "canonical_correlations": [round(r, 8) for r in res.correlations],
        "no_change_weight_share": round(float(res.no_change.mean()), 6),
        "n_invariant": n_inv,
        "invariant_share": round(n_inv / n, 6),
        "invariant_probability": float(invariant_probability),
        "regression": regression,
        "notes": notes,
    }
    return Normalisation(
        "irmad", bands=p, gain=tuple(gains), offset=tuple(offsets), n_pixels=n_pixels, extra=extra
    )


def _cca(cov: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical correlation analysis from the joint covariance of ``[x; y]``.

    Returns ``a``, ``b`` (columns: canonical vectors with unit-variance variates,
    paired, signs such that each pair correlates positively) and the canonical
    correlations, all in increasing order of correlation.
    """
    ridge = 1e-10 * max(float(np.trace(cov)) / (2 * p), np.finfo(float).tiny)
    eye = np.eye(p)
    sxx = cov[:p, :p] + ridge * eye
    syy = cov[p:, p:] + ridge * eye
    sxy = cov[:p, p:]
    c1 = sxy @ linalg.solve(syy, sxy.T, assume_a="pos")
    lam, a = linalg.eigh((c1 + c1.T) / 2, sxx)
    rho = np.sqrt(np.clip(lam, 0.0, 1.0))
    # b paired with a: b ~ Syy^-1 Syx a, scaled to unit variance (positive correlation).
    b = linalg.solve(syy, sxy.T @ a, assume_a="pos")
    norm = np.sqrt(np.maximum(np.einsum("ij,ik,kj->j", b, syy, b), 0.0))
    weak = norm <= 1e-12 * max(float(norm.max()), np.finfo(float).tiny)
    if weak.any():  # no correlation: any unit-variance vectors of the second set
        c2 = sxy.T @ linalg.solve(sxx, sxy, assume_a="pos")
        _, b2 = linalg.eigh((c2 + c2.T) / 2, syy)
        b[:, weak] = b2[:, weak]
        norm[weak] = 1.0
    return a, b / norm, rho


def _orthogonal_regression(x: np.ndarray, y: np.ndarray) -> tuple[float, float, bool]:
    """Major-axis (total least squares) line ``y = gain * x + offset``; flag if degenerate."""
    mx, my = x.mean(), y.mean()
    dx, dy = x - mx, y - my
    sxx, syy, sxy = (dx * dx).mean(), (dy * dy).mean(), (dx * dy).mean()
    if not (sxx > 0 and sxy != 0):
        return 1.0, float(my - mx), True
    d = syy - sxx
    h = np.hypot(d, 2.0 * sxy)
    # Two algebraically equal forms; use the one without cancellation.
    gain = (d + h) / (2.0 * sxy) if d >= 0 else 2.0 * sxy / (h - d)
    return float(gain), float(my - gain * mx), False


# --------------------------------------------------------------------------- reports
def _apply_and_report(
    norm: Normalisation, image: np.ndarray, reference: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, NormalisationFit]:
    out = norm.apply(image, valid)
    report = _fit_report(norm.method, image, out, reference, valid, keep_count=norm.n_pixels)
    if norm.extra:
        report = replace(report, extra=dict(norm.extra))
    return out, report


def _fit_mask(valid: np.ndarray, fit: np.ndarray | None, minimum: int = 100) -> np.ndarray:
    """The pixels that define a mapping: ``fit & valid``, or all valid ones if too few."""
    if fit is None:
        return valid
    if fit.shape != valid.shape:
        raise ValueError(f"fit must have shape {valid.shape}, got {fit.shape}")
    chosen = fit.astype(bool) & valid
    return chosen if chosen.sum() >= min(minimum, int(valid.sum())) else valid


def _band_stats(x: np.ndarray, m: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Gain, offset (of ``m`` on ``x``), r² (``m`` vs ``y``), RMSE before and after."""
    x = x.astype(np.float64)
    m = m.astype(np.float64)
    y = y.astype(np.float64)
    var = x.var()
    g = float(((x - x.mean()) * (m - m.mean())).mean() / var) if var > 0 else 1.0
    offset = float(m.mean() - g * x.mean())
    sy = y.std()
    sm = m.std()
    r = float(((y - y.mean()) * (m - m.mean())).mean() / (sy * sm)) if sy > 0 and sm > 0 else 0.0
    rmse_before = float(np.sqrt(np.mean((x - y) ** 2)))
    rmse_after = float(np.sqrt(np.mean((m - y) ** 2)))
    return tuple(round(v, 6) for v in (g, offset, r * r, rmse_before, rmse_after))


def _make_fit(
    method: str, stats: list[tuple[float, ...]], n_pixels: int, extra: dict[str, Any] | None = None
) -> NormalisationFit:
    gains, offsets, r2s, rb, ra = (tuple(col) for col in zip(*stats, strict=True))
    return NormalisationFit(
        method=method,
        gain=gains,
        offset=offsets,
        r2=r2s,
        rmse_before=rb,
        rmse_after=ra,
        n_pixels=int(n_pixels),
        extra=dict(extra or {}),
    )


def _fit_report(
    method: str,
    image: np.ndarray,
    out: np.ndarray,
    reference: np.ndarray,
    valid: np.ndarray,
    keep_count: int | None = None,
) -> NormalisationFit:
    stats = [_band_stats(image[b][valid], out[b][valid], reference[b][valid]) for b in range(image.shape[0])]
    return _make_fit(method, stats, int(valid.sum()) if keep_count is None else keep_count)
