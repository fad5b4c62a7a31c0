"""Change evidence between two co-registered, normalised images (pure numpy/scipy).

Three layers are computed, each documented where it is made:

difference
    Per-pixel colour difference magnitude: the root-mean-square over bands of
    ``after - before`` (units of the before image's [0, 1] range).
ssim
    Local structural similarity (Wang et al. 2004) of the two luminance images,
    the same definition and parameters as :func:`skimage.metrics.structural_similarity`
    with ``gaussian_weights=True``. Its contrast-structure factor ``cs`` (SSIM
    without the luminance term) is kept too: it is 1 where the local pattern is
    unchanged, whatever happened to brightness, and drops where a pattern
    appeared, vanished or was broken up.
coherence_loss
    Loss of gradient orientation coherence (:func:`orientation_coherence`):
    straight edges of roofs, walls and kerbs (one dominant gradient direction)
    replaced by edges in every direction (rubble, debris). A texture/edge term
    that does not need the pattern to match pixel by pixel.
score
    A change score in [0, 1] that needs *both* kinds of evidence: a colour change
    that stands out from the scene's own no-change noise *and* a loss of local
    structure (SSIM structure, or orientation coherence). A repainted roof
    (colour only) or a moved shadow edge (a thin line) scores low; collapsed
    roofs turned to rubble score high. Vegetation, whose canopy texture changes
    with the season, is down-weighted by an excess-green index of either date.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "ChangeLayers",
    "difference_magnitude",
    "luminance",
    "ssim_components",
    "excess_green",
    "orientation_coherence",
    "coherence_change",
    "change_layers",
    "threshold_otsu_valid",
    "SceneStatistics",
    "scene_samples",
    "scene_statistics",
    "change_halo",
    "stable_mask",
    "stable_mask_halo",
]

#: SSIM constant C2 = (K2 * data range)^2 as in Wang et al. (2004); also the
#: texture scale of :func:`stable_mask`.
K2 = 0.03


def _check_pair(before: np.ndarray, after: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if before.shape != after.shape:
        raise ValueError(
            f"before and after must have the same shape, got {before.shape} and {after.shape}"
        )
    if before.ndim not in (2, 3):
        raise ValueError("before and after must be (rows, cols) or (bands, rows, cols) arrays")
    shape = before.shape[-2:]
    if valid is None:
        return np.ones(shape, dtype=bool)
    if valid.shape != shape:
        raise ValueError(f"valid must have shape {shape}, got {valid.shape}")
    return valid.astype(bool, copy=False)


def _float(a: np.ndarray) -> np.ndarray:
    """float32 stays float32 (and float16 becomes it); other types become float64."""
    if a.dtype in (np.float32, np.float16):
        return a.astype(np.float32, copy=False)
    return a.astype(np.float64, copy=False)


def luminance(image: np.ndarray) -> np.ndarray:
    """Mean over bands of a (bands, rows, cols) image; a 2-D image is returned as is."""
    image = _float(image)
    return image if image.ndim == 2 else image.mean(axis=0, dtype=image.dtype)


def difference_magnitude(
    before: np.ndarray, after: np.ndarray, *, valid: np.ndarray | None = None
) -> np.ndarray:
    """Root-mean-square over bands of ``after - before``; NaN where not valid.

    Examples
    --------
    >>> a = np.zeros((3, 2, 2), np.float32); b = a + 0.5
    >>> float(difference_magnitude(a, b)[0, 0])
    0.5
    """
    valid = _check_pair(before, after, valid)
    b, a = _float(before), _float(after)
    if b.ndim == 2:
        b, a = b[np.newaxis], a[np.newaxis]
    diff = np.sqrt(np.mean((a - b) ** 2, axis=0, dtype=b.dtype))
    return np.where(valid, diff, np.nan).astype(b.dtype, copy=False)


def ssim_components(
    before: np.ndarray,
    after: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    sigma: float = 1.5,
    truncate: float = 3.5,
    data_range: float = 1.0,
    center: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Local SSIM and its contrast-structure factor of two 2-D images.

    Same definition as :func:`skimage.metrics.structural_similarity` with
    ``gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
    data_range=data_range`` (``full=True``), computed by
    :func:`changedetect.fastssim.ssim_components_fast` (OpenCV separable filters
    over row strips: about 10x faster and 6x less memory than scikit-image,
    equal to it within 1e-4; ``benchmarks/ssim.py``).

    Parameters
    ----------
    before, after : (rows, cols) ndarray
    valid : (rows, cols) bool ndarray, optional
        Pixels whose Gaussian window (radius ``truncate * sigma``) touches an
        invalid pixel are returned as NaN.
    sigma : float
        Standard deviation of the Gaussian window, in pixels.
    center : float, optional
        The constant both images are shifted by before the second moments are
        formed (see :mod:`changedetect.fastssim`); by default the images' mean.
        Give it when the images are parts of a larger scene, so that every part
        gets the same values as the whole.

    Returns
    -------
    ssim : (rows, cols) ndarray
        Structural similarity in [-1, 1].
    cs : (rows, cols) ndarray
        Contrast-structure factor ``(2 cov + C2) / (var_x + var_y + C2)``.

    References
    ----------
    Wang, Z., Bovik, A. C., Sheikh, H. R., Simoncelli, E. P. (2004). Image quality
    assessment: from error visibility to structural similarity. IEEE TIP 13(4).
    """
    from .fastssim import ssim_components_fast

    if before.ndim != 2:
        raise ValueError("before and after must be 2-D for SSIM")
    valid = _check_pair(before, after, valid)
    return ssim_components_fast(
        before, after, valid=valid, sigma=sigma, truncate=truncate, data_range=data_range, center=center
    )


def excess_green(image: np.ndarray) -> np.ndarray:
    """Excess-green index ``2g - r - b`` of chromatic coordinates (RGB bands 1-3).

    Chromatic coordinates divide each band by the sum of the three, so the index
    does not depend on brightness; green vegetation is above about 0.05.
    """
    if image.ndim != 3 or image.shape[0] < 3:
        raise ValueError("image must be (bands, rows, cols) with at least 3 bands (R, G, B)")
    img = _float(image)
    r, g, b = img[0], img[1], img[2]
    total = r + g + b
    with np.errstate(divide="ignore", invalid="ignore"):
        exg = np.where(total > 0, (2 * g - r - b) / total, 0)
    return exg.astype(img.dtype, copy=False)


def _robust_noise(values: np.ndarray) -> tuple[float, float]:
    """Median and robust spread (1.4826 MAD, floored) of finite values."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    return med, max(mad, 1e-3)


@dataclass(frozen=True)
class ChangeLayers:
    """The change layers of one area, all (rows, cols) float32 with NaN outside data."""

    difference: np.ndarray
    ssim: np.ndarray
    structure_loss: np.ndarray
    difference_evidence: np.ndarray
    vegetation: np.ndarray
    shadow_change: np.ndarray
    coherence_loss: np.ndarray
    score: np.ndarray
    valid: np.ndarray
    noise: dict

    def as_terms(self) -> dict[str, np.ndarray]:
        """The named explanatory layers (for ``--write-layers``)."""
        return {
            "difference_evidence": self.difference_evidence,
            "structure_loss": self.structure_loss,
            "vegetation": self.vegetation,
            "shadow_change": self.shadow_change,
            "coherence_loss": self.coherence_loss,
        }



def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0, 1)
    return t * t * (3 - 2 * t)


def gaussian(a: np.ndarray, sigma: float, mode: str = "reflect") -> np.ndarray:
    """:func:`scipy.ndimage.gaussian_filter` (truncate 4) of a 2-D float image, by OpenCV.

    The same kernel and borders (``"reflect"`` or ``"nearest"``) as scipy,
    equal to it within float rounding, about 8x faster (separable filter on
    all cores).
    """
    import cv2

    from .fastssim import ssim_kernel

    if a.ndim != 2 or sigma <= 0:
        return ndi.gaussian_filter(a, sigma, mode=mode)
    k = ssim_kernel("gaussian", sigma=sigma, truncate=4.0)
    border = {"reflect": cv2.BORDER_REFLECT, "nearest": cv2.BORDER_REPLICATE}[mode]
    src = np.ascontiguousarray(a, dtype=np.float32 if a.dtype != np.float64 else np.float64)
    return cv2.sepFilter2D(src, -1, k, k, borderType=border)


def orientation_coherence(
    lum: np.ndarray, *, derivative_sigma: float, integration_sigma: float, eps: float = K2 * K2,
) -> np.ndarray:
    """Orientation coherence of the local gradients, in [0, 1) (float32).

    With ``J`` the structure tensor (the outer product of the gradient, taken at
    ``derivative_sigma`` pixels, averaged with a Gaussian of ``integration_sigma``
    pixels) and ``l1 >= l2`` its eigenvalues, the coherence is
    ``(l1 - l2) / (l1 + l2 + eps)`` (Bigun & Granlund 1987; Jähne 1993): near 1
    along a straight edge or a set of parallel edges, near 0 where gradients
    point every way (rubble, gravel) and where there are almost none. ``eps`` is
    SSIM's texture scale (``K2`` squared, luminance in [0, 1]), so flat areas,
    whose gradients are noise, are not coherent.

    A pixel depends on ``lum`` within :func:`coherence_reach` of it.
    """
    lum = np.ascontiguousarray(lum, dtype=np.float32)
    sm = gaussian(lum, derivative_sigma) if derivative_sigma > 0 else lum
    gy, gx = np.gradient(sm)
    jxx = gaussian(gx * gx, integration_sigma)
    jxy = gaussian(gx * gy, integration_sigma)
    jyy = gaussian(gy * gy, integration_sigma)
    diff = np.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy)
    return np.clip(diff / (jxx + jyy + np.float32(eps)), 0, 1).astype(np.float32, copy=False)


def coherence_reach(derivative_sigma: float, integration_sigma: float) -> int:
    """Reach, in pixels, of :func:`orientation_coherence` (two Gaussians, truncate 4, and the gradient)."""
    return int(np.ceil(4.0 * derivative_sigma)) + int(np.ceil(4.0 * integration_sigma)) + 1


def coherence_change(
    before: np.ndarray, after: np.ndarray, *, valid: np.ndarray, derivative_sigma: float, integration_sigma: float,
) -> np.ndarray:
    """Drop of orientation coherence from before to after luminance, ``c_before - c_after`` (float32).

    Man-made surfaces have straight edges (roof outlines, parapets, walls,
    kerbs, shadows of buildings): their gradients are locally coherent. Rubble
    and debris break them into fragments with edges in every direction, so the
    coherence drops (positive values); it is measured over a window
    (``integration_sigma``), so it does not need the two dates to match pixel
    by pixel as SSIM does, and a thin spread of debris over a street still
    breaks the kerb's edge. NaN where the window touches an invalid pixel.
    """
    cb = orientation_coherence(before, derivative_sigma=derivative_sigma, integration_sigma=integration_sigma)
    ca = orientation_coherence(after, derivative_sigma=derivative_sigma, integration_sigma=integration_sigma)
    delta = cb - ca
    if not valid.all():
        reach = coherence_reach(derivative_sigma, integration_sigma)
        bad = ndi.binary_dilation(~valid, structure=np.ones((3, 3), bool), iterations=reach)
        delta[bad] = np.nan
    return delta.astype(np.float32, copy=False)


def _nan_gaussian(a: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing that ignores invalid pixels (normalised convolution)."""
    if sigma <= 0:
        return a
    w = valid.astype(a.dtype)
    num = gaussian(np.where(valid, a, 0).astype(a.dtype), sigma, mode="nearest")
    den = gaussian(w, sigma, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return np.where(valid, out, np.nan).astype(a.dtype, copy=False)


def stable_mask(
    before: np.ndarray,
    after: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    sigma: float = 1.5,
    min_cs: float = 0.8,
    center: float | None = None,
) -> np.ndarray:
    """Pixels that are confidently unchanged: textured, with the same local pattern.

    SSIM's contrast-structure factor ``cs`` ignores brightness and contrast, so it
    can be computed before radiometric normalisation: where the local pattern of
    textured surfaces (local standard deviation above SSIM's C2 scale in either
    date) correlates at ``cs >= min_cs``, nothing changed there but the light and
    the sensor. These pixels define the radiometric mapping and the scene's
    no-change noise, so that neither is biased when much of the scene changed.

    A pixel depends on the images within :func:`stable_mask_halo` of it.
    """
    valid = _check_pair(before, after, valid)
    lb, la = luminance(before), luminance(after)
    _, cs = ssim_components(lb, la, valid=valid, sigma=sigma, center=center)
    mu = gaussian(lb, sigma)
    var = gaussian(lb * lb, sigma) - mu * mu
    textured = var > (K2 * 1.0) ** 2
    return valid & textured & (np.nan_to_num(cs, nan=0.0) >= min_cs)


def stable_mask_halo(sigma: float) -> int:
    """Reach, in pixels, of :func:`stable_mask` (SSIM window and Gaussian variance)."""
    return int(np.ceil(3.5 * sigma)) + int(np.ceil(4.0 * sigma)) + 2


def shadow_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of the darker half of luminance ``values`` (0 if undefined)."""
    from skimage.filters import threshold_otsu

    values = values[np.isfinite(values)]
    if values.size < 16:
        return 0.0
    med = float(np.median(values))
    dark = values[values <= med]
    if dark.size < 16 or np.ptp(dark) == 0:
        return 0.0
    return float(threshold_otsu(dark))


def shadow_mask(lum: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
    """Pixels in cast shadow: darker than Otsu's threshold of the darker half of the scene.

    Cast shadows in sub-metre imagery form a dark mode of the luminance histogram.
    Otsu's threshold between 0 and the median luminance separates that mode from
    sunlit surfaces without a fixed brightness level.

    Returns the boolean mask and the threshold used.
    """
    t = shadow_threshold(lum[valid])
    if t == 0.0:
        return np.zeros(lum.shape, bool), 0.0
    return (lum < t) & valid, t


def shadow_change(
    before: np.ndarray,
    after: np.ndarray,
    *,
    valid: np.ndarray,
    smooth_px: float = 2.0,
    thresholds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Where a pixel is in cast shadow on exactly one date (0-1, smoothed).

    A change explained by the sun having moved between the dates (a shadow that
    appeared, vanished or shifted) is not damage; the score is damped there.
    Rubble with dark fragments is affected little: the fragments are small and
    the map is smoothed over ``smooth_px``. ``thresholds`` (before, after) are
    the scene's shadow thresholds; by default measured on these images.
    """
    if thresholds is None:
        thresholds = (shadow_threshold(before[valid]), shadow_threshold(after[valid]))
    sb = (before < thresholds[0]) & valid
    sa = (after < thresholds[1]) & valid
    xor = (sb ^ sa).astype(np.float32)
    return np.clip(_nan_gaussian(xor, valid, smooth_px / 2), 0, 1).astype(np.float32)


def shadow_ratio(values: np.ndarray, threshold: float) -> float:
    """Mean luminance of the cast-shadow pixels over that of the sunlit ones (1.0 if undefined).

    ``values`` are a scene's luminance samples and ``threshold`` its
    :func:`shadow_threshold`. In cast shadow a surface is lit by the sky only, so
    its luminance is its sunlit luminance times about this ratio (a scene-wide
    average: it mixes the albedos of shadowed and sunlit surfaces).
    """
    values = values[np.isfinite(values)]
    if threshold <= 0 or values.size < 32:
        return 1.0
    dark = values < threshold
    n_dark = int(np.count_nonzero(dark))
    if n_dark < 16 or values.size - n_dark < 16:
        return 1.0
    lit_mean = float(values[~dark].mean(dtype=np.float64))
    if lit_mean <= 0:
        return 1.0
    return float(np.clip(values[dark].mean(dtype=np.float64) / lit_mean, 1e-3, 1.0))


def _disk(radius_px: float) -> np.ndarray:
    """Structuring element: the pixels within ``radius_px`` of the centre (uint8)."""
    r = int(np.floor(radius_px))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ((yy * yy + xx * xx) <= radius_px * radius_px).astype(np.uint8)


def _dilate_mask(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary dilation by a disk (pixels within ``radius_px`` of ``mask``); outside the array is False."""
    import cv2

    if np.floor(radius_px) < 1:
        return mask
    m = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    return cv2.dilate(m, _disk(radius_px), borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)


def _open_mask(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary opening by a disk (pixels of regions narrower than ``2 * radius_px`` removed)."""
    import cv2

    if np.floor(radius_px) < 1:
        return mask
    se = _disk(radius_px)
    m = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    # outside the array counts as shadow for the erosion and as lit for the dilation,
    # so regions touching the border are kept (as in the middle of a larger scene)
    eroded = cv2.erode(m, se, borderType=cv2.BORDER_CONSTANT, borderValue=1)
    return cv2.dilate(eroded, se, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)


def _shift_radius(max_shift_px: float) -> float:
    """Search radius, pixels, for the other date's shadow: the shift allowed, at least the
    neighbouring pixels (a shadow edge that moved less than a pixel changed those)."""
    return max(float(max_shift_px), 1.0) if max_shift_px > 0 else 0.0


def shadow_relight_reach(pixel_size: float, min_width_m: float, max_shift_m: float = 0.0) -> int:
    """Reach, in pixels, of :func:`relight_moved_shadows` (its opening, then the shift allowed)."""
    opening = 2 * int(np.floor(0.5 * min_width_m / pixel_size)) if min_width_m > 0 else 0
    return opening + int(np.floor(_shift_radius(max_shift_m / pixel_size)))


def relight_moved_shadows(
    before: np.ndarray,
    after: np.ndarray,
    *,
    valid: np.ndarray,
    thresholds: tuple[float, float],
    ratios: tuple[float, float],
    min_width_px: float = 4.0,
    max_shift_px: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Luminance of both dates with the cast shadows that moved between them relit.

    The sun's azimuth and elevation differ between two acquisitions, so cast
    shadows move, lengthen or shorten; where a pixel is in cast shadow on one
    date only, its local pattern changes although the ground did not. Such a
    pixel is relit on the date it is in shadow, by dividing its luminance by the
    scene's shadow-to-sunlit ratio of that date (:func:`shadow_ratio`), so that
    it is compared in sunlight on both dates.

    A pixel counts as a moved shadow when

    * it lies in a cast-shadow region of one date only: luminance below the
      date's :func:`shadow_threshold`, in a dark region at least
      ``min_width_px`` wide (a binary opening by a disk of half that diameter).
      Cast shadows of buildings and walls are wide; the dark gaps and fragments
      of rubble, holes and soot specks are narrower and are left as they are;
    * it really darkened (or brightened) by shadow: its luminance on the
      shadow date is below the square root of the ratio (halfway, geometrically,
      between no change and full shadow) times its luminance on the other date.
      A dark roof near the threshold on both dates is not relit;
    * and the shadow is still there on the other date, moved by at most
      ``max_shift_px``: a cast-shadow region of the other date lies within that
      distance (at least the neighbouring pixels; 0 relights nothing). A
      shadow whose caster is gone (a collapsed house, a tree torn away)
      vanished without a counterpart nearby: it is evidence of the
      destruction and is left as it is. A shadow that moved farther than
      ``max_shift_px`` is left as it is too (its edges then count as change).

    Returns the relit ``before`` and ``after`` luminance and the boolean mask of
    relit pixels. A pixel depends on the images within
    :func:`shadow_relight_reach` of it.
    """
    valid = valid.astype(bool, copy=False)
    tb, ta = thresholds
    kb, ka = (float(np.clip(k, 1e-3, 1.0)) for k in ratios)
    half = 0.5 * min_width_px
    sb = _open_mask((before < tb) & valid, half) if tb > 0 else np.zeros(before.shape, bool)
    sa = _open_mask((after < ta) & valid, half) if ta > 0 else np.zeros(after.shape, bool)
    radius = _shift_radius(max_shift_px)
    into = sa & ~sb & valid & (after < before * np.float32(np.sqrt(ka))) & _dilate_mask(sb, radius)
    outof = sb & ~sa & valid & (before < after * np.float32(np.sqrt(kb))) & _dilate_mask(sa, radius)
    lb = np.where(outof, before / np.float32(kb), before).astype(before.dtype, copy=False)
    la = np.where(into, after / np.float32(ka), after).astype(after.dtype, copy=False)
    return lb, la, into | outof


@dataclass(frozen=True)
class SceneStatistics:
    """Scene-wide figures the change score is relative to (see :func:`change_layers`).

    ``difference`` is the (median, robust spread) of the smoothed colour
    difference on unchanged-pattern pixels; ``vegetation`` the (median, spread)
    of each date's smoothed excess-green index (None for fewer than 3 bands);
    ``shadow`` each date's cast-shadow luminance threshold and ``shadow_ratio``
    each date's shadow-to-sunlit luminance ratio (:func:`shadow_ratio`).
    """

    difference: tuple[float, float]
    vegetation: tuple[tuple[float, float], tuple[float, float]] | None
    shadow: tuple[float, float]
    shadow_ratio: tuple[float, float] = (1.0, 1.0)

    def as_dict(self) -> dict:
        return {"difference_median": round(self.difference[0], 6), "difference_spread": round(self.difference[1], 6)}


@dataclass(frozen=True)
class _Evidence:
    diff: np.ndarray
    ssim: np.ndarray
    cs: np.ndarray
    ok: np.ndarray
    diff_s: np.ndarray
    exg: tuple[np.ndarray, np.ndarray] | None
    lum: tuple[np.ndarray, np.ndarray]
    smooth_px: float
    relit: np.ndarray | None = None


def _evidence(
    before: np.ndarray, after: np.ndarray, valid: np.ndarray, *, pixel_size: float, ssim_sigma_m: float,
    smooth_m: float, center: float | None, relight: tuple[SceneStatistics, float, float] | None = None,
) -> _Evidence:
    """The per-pixel evidence; with ``relight`` (statistics, minimum shadow width and
    largest shadow shift in metres), ``cs`` is that of the luminance with moved shadows relit
    (:func:`relight_moved_shadows`) while ``ssim`` stays that of the luminance."""
    if before.ndim != 3:
        raise ValueError("before and after must be (bands, rows, cols) arrays")
    if pixel_size <= 0:
        raise ValueError("pixel_size must be > 0")
    b32 = before.astype(np.float32, copy=False)
    a32 = after.astype(np.float32, copy=False)
    diff = difference_magnitude(b32, a32, valid=valid)
    sigma_px = max(1.5, ssim_sigma_m / pixel_size)
    lb, la = luminance(b32), luminance(a32)
    ssim, cs = ssim_components(lb, la, valid=valid, sigma=sigma_px, center=center)
    relit = None
    if relight is not None:
        stats, min_width_m, max_shift_m = relight
        rb, ra, relit = relight_moved_shadows(lb, la, valid=valid, thresholds=stats.shadow,
                                              ratios=stats.shadow_ratio, min_width_px=min_width_m / pixel_size,
                                              max_shift_px=max_shift_m / pixel_size)
        if relit.any():
            _, cs_relit = ssim_components(rb, ra, valid=valid, sigma=sigma_px, center=center)
            # the better of the two explanations: same light on both dates, or a moved shadow
            cs = np.fmax(cs, cs_relit)
    ok = valid & np.isfinite(ssim)
    smooth_px = smooth_m / pixel_size
    diff_s = _nan_gaussian(diff, ok, smooth_px)
    exg = None
    if before.shape[0] >= 3:
        exg = tuple(_nan_gaussian(excess_green(img), ok, smooth_px) for img in (b32, a32))
    return _Evidence(diff, ssim, cs, ok, diff_s, exg, (lb, la), smooth_px, relit)


def _coherence_sigmas(pixel_size: float, ssim_sigma_m: float, smooth_m: float) -> tuple[float, float]:
    """Derivative and integration scales, pixels, of the coherence term.

    Gradients are taken at half the SSIM window (noise suppressed, edges of
    rubble fragments kept) and averaged over the smoothing scale of the other
    terms (at least a pixel), so every term describes the same neighbourhood.
    """
    sigma_px = max(1.5, ssim_sigma_m / pixel_size)
    return 0.5 * sigma_px, max(1.0, smooth_m / pixel_size)


def change_halo(
    pixel_size: float, *, ssim_sigma_m: float = 0.75, smooth_m: float = 1.0, shadow_min_width_m: float = 0.0,
    shadow_max_shift_m: float = 0.0,
) -> int:
    """Reach, in pixels, of :func:`change_layers` (SSIM window, then the smoothing; the coherence
    term's gradients and window). With ``shadow_relight``, give its ``shadow_min_width_m`` and
    ``shadow_max_shift_m``: the shadow opening and the search for the moved shadow come first."""
    sigma_px = max(1.5, ssim_sigma_m / pixel_size)
    chain = (shadow_relight_reach(pixel_size, shadow_min_width_m, shadow_max_shift_m)
             + int(np.ceil(3.5 * sigma_px))
             + int(np.ceil(4.0 * smooth_m / pixel_size)))
    return max(chain, coherence_reach(*_coherence_sigmas(pixel_size, ssim_sigma_m, smooth_m))) + 2


def scene_samples(
    before: np.ndarray,
    after: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    rows: slice = slice(None),
    cols: slice = slice(None),
    pixel_size: float = 1.0,
    ssim_sigma_m: float = 0.75,
    smooth_m: float = 1.0,
    center: float | None = None,
) -> dict[str, np.ndarray]:
    """The pixel values of ``[rows, cols]`` that :func:`scene_statistics` is computed from.

    Pass the rows of a strip (its core, the rest being its halo); samples of
    many strips, concatenated in row order, give the statistics of the scene.
    """
    valid = _check_pair(before, after, valid)
    ev = _evidence(before, after, valid, pixel_size=pixel_size, ssim_sigma_m=ssim_sigma_m,
                   smooth_m=smooth_m, center=center)
    win = (rows, cols)
    ok = ev.ok[win]
    stable = ok & (np.nan_to_num(ev.cs[win], nan=0.0) >= 0.8)
    out = {
        "difference_stable": ev.diff_s[win][stable],
        "difference": ev.diff_s[win][ok],
        "luminance_before": ev.lum[0][win][ok],
        "luminance_after": ev.lum[1][win][ok],
    }
    if ev.exg is not None:
        out["vegetation_before"] = ev.exg[0][win][ok]
        out["vegetation_after"] = ev.exg[1][win][ok]
    return out


def scene_statistics(samples: dict[str, np.ndarray] | list[dict[str, np.ndarray]]) -> SceneStatistics:
    """Scene statistics from :func:`scene_samples` (one dict, or a list in row order)."""
    if isinstance(samples, dict):
        samples = [samples]

    def cat(key: str) -> np.ndarray | None:
        parts = [s[key] for s in samples if key in s]
        return np.concatenate(parts) if parts else None

    stable = cat("difference_stable")
    diff = cat("difference")
    diff_values = stable if stable is not None and stable.size >= 100 else diff
    vb, va = cat("vegetation_before"), cat("vegetation_after")
    veg = None if vb is None else (_robust_noise(vb), _robust_noise(va))
    lum_b, lum_a = (np.zeros(0, np.float32) if v is None else v
                    for v in (cat("luminance_before"), cat("luminance_after")))
    shadow = (shadow_threshold(lum_b), shadow_threshold(lum_a))
    return SceneStatistics(
        difference=_robust_noise(diff_values if diff_values is not None else np.zeros(0)),
        vegetation=veg,
        shadow=shadow,
        shadow_ratio=(shadow_ratio(lum_b, shadow[0]), shadow_ratio(lum_a, shadow[1])),
    )


def change_layers(
    before: np.ndarray,
    after: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    pixel_size: float = 1.0,
    ssim_sigma_m: float = 0.75,
    smooth_m: float = 1.0,
    difference_z: float = 8.0,
    vegetation_z: tuple[float, float] = (2.5, 5.0),
    structure_weight: float = 0.75,
    shadow_damping: float = 0.0,
    shadow_relight: bool = True,
    shadow_min_width_m: float = 2.0,
    shadow_max_shift_m: float = 1.0,
    coherence_weight: float = 0.0,
    coherence_layer: bool = True,
    statistics: SceneStatistics | None = None,
    center: float | None = None,
) -> ChangeLayers:
    """Difference, SSIM and the fused change score of two normalised images.

    Parameters
    ----------
    before, after : (bands, rows, cols) ndarray
        Co-registered and radiometrically normalised, values about [0, 1].
    valid : (rows, cols) bool ndarray, optional
    pixel_size : float
        Ground size of a pixel in metres; every window below is given in metres
        so the same settings mean the same thing at any resolution.
    ssim_sigma_m : float
        Gaussian SSIM window standard deviation, metres (at least 1.5 px is used).
    smooth_m : float
        Standard deviation of the Gaussian that smooths each evidence term before
        fusion, metres.
    difference_z : float
        A colour difference this many robust standard deviations above the
        median no-change difference counts as strong evidence (term near 0.86).
        The no-change spread is measured on unchanged-pattern pixels, which
        under-estimates it somewhat; 8 was chosen by measurement on the synthetic
        Harem sample and the real Joplin pair together.
    vegetation_z : (low, high)
        Range of the excess-green index, in robust standard deviations above the
        scene's median (each date its own), over which a pixel turns from "not
        vegetation" to "vegetation". Relative to the scene, so it adapts to the
        sensor's colour balance and to sparse, dry or lush vegetation.
    structure_weight : float
        Weight of the structure-loss term in the weighted geometric mean with the
        colour-difference term (0.5: both count equally). Structure loss is the
        stronger cue: rubble often keeps the colour of the roof it replaced.
    shadow_damping : float
        How much of the score is removed where a pixel is in cast shadow on exactly
        one date (0: none, the default, 1: all). Off by default because a collapsed
        building also loses its shadow: damping removes real evidence.
    shadow_relight : bool
        Also compare the local patterns with the moved cast shadows relit
        (:func:`relight_moved_shadows`) and keep, per pixel, the better match
        (the larger ``cs``): a shadow edge that moved with the sun then breaks no
        pattern, while a collapsed roof (rubble texture) still does, and a dark
        surface taken for a shadow by mistake can only lose no structure it had.
        Only shadows still present on the other date within
        ``shadow_max_shift_m`` are relit: a shadow that vanished with its caster
        (a collapsed house, a tree torn away) stays evidence of the destruction.
        The colour difference and the ``ssim`` layer are left as they are. On by
        default (``benchmarks/detection.py``, with and without
        ``--set change.shadow_relight=false``): on the real Joplin pair it changes
        the shares of flattened and intact zones flagged by at most 0.004, on
        the known-answer composites it raises F1 by 0.001-0.004. Without the
        requirement of a nearby shadow on the other date, it also relit the
        shadows of torn-away trees and flattened houses and lowered the share
        of flattened zones flagged.
    shadow_min_width_m : float
        Narrowest dark region, metres, taken as a cast shadow by the relighting
        (narrower ones are rubble gaps, holes, specks); 0 takes every dark pixel.
    shadow_max_shift_m : float
        Farthest, metres, a cast shadow's edge may have moved between the dates
        and still be relit. Sun angles of two acquisitions of similar season and
        time of day move the edges of building shadows by a metre or less
        (a 10 m high wall's shadow moves 0.9 m when the sun's elevation changes
        from 50 to 47 degrees); give more for dates with very different sun.
    coherence_weight : float
        How much the loss of gradient orientation coherence (the
        ``coherence_loss`` layer) counts as structure evidence, 0 to 1. 0 (the
        default): the layer is computed and written with ``--write-layers`` but
        does not change the score. See Notes for why it is off by default.
    coherence_layer : bool
        Compute the ``coherence_loss`` layer even when ``coherence_weight`` is 0
        (else it is 0 everywhere and the work is skipped).
    statistics : SceneStatistics, optional
        The scene's no-change statistics (:func:`scene_statistics`); by default
        measured on these images. Give them when the images are a strip of a
        larger scene: every pixel then depends only on the images within
        :func:`change_halo` of it.
    center : float, optional
        SSIM's centring constant (see :func:`ssim_components`).

    Returns
    -------
    ChangeLayers

    Notes
    -----
    ``difference_evidence = 1 - exp(-z^2 / 2)`` with ``z = max(D - median, 0) /
    (difference_z / 2 * spread)``, where median and spread (1.4826 MAD) describe
    the scene's no-change differences, measured on pixels whose local pattern is
    unchanged (``cs >= 0.8``), so they hold when most of the scene changed.
    ``structure_loss = clip(1 - cs, 0, 1)``, smoothed. ``coherence_loss =
    clip(c_before - c_after, 0, 1)``, the drop of orientation coherence
    (:func:`coherence_change`; gradients at half the SSIM window, averaged over
    ``smooth_m``). The structure evidence is ``1 - (1 - structure_loss) *
    (1 - coherence_weight * coherence_loss)``: either the local pattern no
    longer matches, or its straight edges broke up (the probability of either
    of two independent cues). The score is the weighted geometric mean of the
    structure evidence and ``difference_evidence``, times ``1 - vegetation``.

    The coherence term separates rubble from intact roofs and from moved cars
    and stalls on the synthetic Harem sample, whose rubble is drawn as
    fragments pointing every way, but hardly on the real Joplin tornado imagery
    of ``benchmarks/detection.py`` (area under the ROC curve of the coherence
    drop 0.49-0.58 between flattened and intact zones, about 0.5 between pasted
    real debris and the ground around it; tornado debris, much of it planks and
    beams, has straight edges too). There, adding it lowered the composites' F1
    and raised the share of intact zones flagged. Hence ``coherence_weight = 0``
    by default.
    """
    valid = _check_pair(before, after, valid)
    if statistics is None:
        statistics = scene_statistics(
            scene_samples(before, after, valid=valid, pixel_size=pixel_size, ssim_sigma_m=ssim_sigma_m,
                          smooth_m=smooth_m, center=center)
        )
    ev = _evidence(before, after, valid, pixel_size=pixel_size, ssim_sigma_m=ssim_sigma_m,
                   smooth_m=smooth_m, center=center,
                   relight=(statistics, shadow_min_width_m, shadow_max_shift_m) if shadow_relight else None)
    ok, smooth_px = ev.ok, ev.smooth_px
    med, spread = statistics.difference
    z = np.maximum(ev.diff_s - med, 0) / (0.5 * difference_z * spread)
    d_term = (1 - np.exp(-0.5 * z * z)).astype(np.float32)

    s_term = _nan_gaussian(np.where(ok, np.clip(1 - ev.cs, 0, 1), 0).astype(np.float32), ok, smooth_px)

    if ev.exg is not None and statistics.vegetation is not None:
        zs = [((e - m) / sp).astype(e.dtype, copy=False)
              for e, (m, sp) in zip(ev.exg, statistics.vegetation, strict=True)]
        veg = _smoothstep(np.maximum(zs[0], zs[1]), *vegetation_z).astype(np.float32)
    else:
        veg = np.zeros(ok.shape, np.float32)

    shadow = shadow_change(ev.lum[0], ev.lum[1], valid=ok, smooth_px=smooth_px, thresholds=statistics.shadow)
    if coherence_weight > 0 or coherence_layer:
        d_sigma, i_sigma = _coherence_sigmas(pixel_size, ssim_sigma_m, smooth_m)
        coh = np.clip(np.nan_to_num(
            coherence_change(ev.lum[0], ev.lum[1], valid=valid, derivative_sigma=d_sigma, integration_sigma=i_sigma),
            nan=0.0), 0, 1).astype(np.float32)
    else:
        coh = np.zeros(ok.shape, np.float32)
    s_clip = np.clip(s_term, 0, 1)
    # 1 - (1 - s) (1 - w c), written so that it is exactly s where w c = 0
    structure = s_clip + (1 - s_clip) * (np.float32(coherence_weight) * coh)
    w = np.float32(structure_weight)
    fused = np.power(structure, w) * np.power(np.clip(d_term, 0, 1), 1 - w)
    score = fused * (1 - veg) * (1 - np.float32(shadow_damping) * shadow)
    nan = np.float32(np.nan)
    return ChangeLayers(
        difference=np.where(ok, ev.diff, nan),
        ssim=np.where(ok, ev.ssim, nan),
        structure_loss=np.where(ok, s_term, nan),
        difference_evidence=np.where(ok, d_term, nan),
        vegetation=np.where(ok, veg, nan),
        shadow_change=np.where(ok, shadow, nan).astype(np.float32),
        coherence_loss=np.where(ok, coh, nan).astype(np.float32),
        score=np.where(ok, score, nan).astype(np.float32),
        valid=ok,
        noise=statistics.as_dict(),
    )


def threshold_otsu_valid(score: np.ndarray, valid: np.ndarray | None = None, *, nbins: int = 256) -> float:
    """Otsu's threshold of the finite (and valid) values of ``score``."""
    from skimage.filters import threshold_otsu

    values = score[np.isfinite(score)] if valid is None else score[valid & np.isfinite(score)]
    if values.size == 0:
        raise ValueError("score has no finite valid value")
    if np.all(values == values[0]):
        return float(values[0])
    return float(threshold_otsu(values, nbins=nbins))
