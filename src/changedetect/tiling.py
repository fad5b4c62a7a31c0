"""Row strips with halos, and the fixed row bands that statistics are sampled from.

Every stage of a run processes the scene in horizontal strips, each read with a
halo of rows above and below wide enough for the stage's neighbourhood (SSIM
window, smoothing, morphology), so a strip's core rows get exactly the values a
whole-array pass would give them, while memory stays proportional to one strip.

Scene-wide statistics (radiometric mapping, no-change noise) are measured on
*sample bands*: fixed groups of rows defined by the scene alone, never by the
strip size, so the statistics, and everything that depends on them, are the
same whatever the strips are. A scene small enough is sampled entirely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Strip", "block_mean", "rows_per_strip", "sample_bands", "strips"]

#: Pixels per strip (core plus halo) that the stages are sized for: about 16 MB
#: per float32 buffer; a stage holds a few dozen such buffers.
STRIP_PIXELS = 1 << 21

#: Rows of one sample band.
BAND_ROWS = 64


@dataclass(frozen=True)
class Strip:
    """Rows ``[r0, r1)`` of a scene, read as ``[h0, h1)`` (with the halo, clipped).

    Row numbers are absolute (scene rows).
    """

    r0: int
    r1: int
    h0: int
    h1: int

    @property
    def core(self) -> slice:
        """The core rows within the halo-padded strip."""
        return slice(self.r0 - self.h0, self.r1 - self.h0)

    @property
    def rows(self) -> int:
        return self.r1 - self.r0


def rows_per_strip(width: int, *, pixels: int = STRIP_PIXELS, minimum: int = 64) -> int:
    """Core rows per strip for a scene ``width`` pixels wide."""
    return max(minimum, pixels // max(width, 1))


def strips(r0: int, r1: int, *, size: int, halo: int, lo: int = 0, hi: int | None = None) -> list[Strip]:
    """Strips of ``size`` core rows covering ``[r0, r1)``, halos clipped to ``[lo, hi)``.

    Examples
    --------
    >>> [(s.r0, s.r1, s.h0, s.h1) for s in strips(0, 10, size=4, halo=2)]
    [(0, 4, 0, 6), (4, 8, 2, 10), (8, 10, 6, 10)]
    """
    if size < 1:
        raise ValueError("size must be >= 1")
    if halo < 0:
        raise ValueError("halo must be >= 0")
    hi = r1 if hi is None else hi
    out = []
    for a in range(r0, r1, size):
        b = min(a + size, r1)
        out.append(Strip(a, b, max(lo, a - halo), min(hi, b + halo)))
    return out


def sample_bands(r0: int, r1: int, width: int, *, max_pixels: int = 1 << 21) -> list[tuple[int, int]]:
    """Row ranges over ``[r0, r1)`` whose pixels scene statistics are measured on.

    All rows when ``(r1 - r0) * width <= max_pixels``; otherwise every k-th band
    of :data:`BAND_ROWS` rows (counted from row 0 of the scene, so the choice
    depends only on the scene), with k the smallest step that keeps the sample
    within ``max_pixels``. The bands are returned in order, adjacent ones merged.

    Examples
    --------
    >>> sample_bands(0, 100, 10)
    [(0, 100)]
    >>> sample_bands(0, 1024, 1000, max_pixels=300_000)[:2]
    [(0, 64), (256, 320)]
    """
    n = r1 - r0
    if n <= 0:
        return []
    if n * width <= max_pixels:
        return [(r0, r1)]
    per_band = BAND_ROWS * max(width, 1)
    n_bands = math.ceil(n / BAND_ROWS)
    keep = max(1, max_pixels // per_band)
    step = max(1, math.ceil(n_bands / keep))
    out: list[tuple[int, int]] = []
    first = r0 // BAND_ROWS
    for j in range(first, math.ceil(r1 / BAND_ROWS)):
        if j % step:
            continue
        a, b = max(r0, j * BAND_ROWS), min(r1, (j + 1) * BAND_ROWS)
        if a >= b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def block_mean(data: np.ndarray, valid: np.ndarray, f: int, *, all_valid: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Average ``f x f`` pixel blocks of ``(bands, rows, cols)`` data over its valid pixels.

    Edge blocks may be partial. A block is valid when all its pixels are
    (``all_valid``) or when any is. Invalid blocks are NaN.
    """
    import cv2

    b, h, w = data.shape
    hh, ww = -(-h // f), -(-w // f)
    size_hw, n = (ww, hh), float(f * f)

    def area(x: np.ndarray) -> np.ndarray:
        # block sums (OpenCV's area interpolation for an integer factor)
        if (hh * f, ww * f) == (h, w):
            pad = np.ascontiguousarray(x, dtype=np.float32)
        else:
            pad = np.zeros((hh * f, ww * f), np.float32)
            pad[:h, :w] = x
        return cv2.resize(pad, size_hw, interpolation=cv2.INTER_AREA) * n

    if valid.all():
        # every block valid: divide by its pixel count (partial at the edges)
        rows_in = np.minimum(f, h - np.arange(hh) * f).astype(np.float32)
        cols_in = np.minimum(f, w - np.arange(ww) * f).astype(np.float32)
        counts = rows_in[:, None] * cols_in[None, :]
        out = np.empty((b, hh, ww), np.float32)
        for i in range(b):
            out[i] = area(data[i]) / counts
        return out, np.ones((hh, ww), bool)
    counts = area(valid.astype(np.float32))
    size = area(np.ones((h, w), np.float32))
    ok = counts >= size - 0.5 if all_valid else counts > 0.5
    out = np.empty((b, hh, ww), np.float32)
    for i in range(b):
        sums = area(np.where(valid, data[i], np.float32(0)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i] = np.where(ok, sums / np.maximum(counts, 1), np.nan)
    return out, ok
