"""Shared small types and the single place where each set of choices is listed."""

from __future__ import annotations

from typing import Literal

#: A shift ``(dy, dx)`` in pixels (rows, columns).
Shift = tuple[float, float]

#: Radiometric normalisation methods (see :mod:`changedetect.radiometry`).
RadiometryMethod = Literal["histogram", "linear", "irmad", "none"]

#: Resampling kernels accepted for the warp of the after image.
ResamplingName = Literal["nearest", "bilinear", "cubic", "cubic_spline", "lanczos"]

#: UNOSAT-like damage grades, most severe first.
Severity = Literal["destroyed", "severe", "moderate", "possible"]

SEVERITIES: tuple[str, ...] = ("destroyed", "severe", "moderate", "possible")
