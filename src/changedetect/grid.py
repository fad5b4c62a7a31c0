"""A raster grid: CRS, affine transform and size, with no pixels attached."""

from __future__ import annotations

from dataclasses import dataclass

from affine import Affine


def _translate(t: Affine, cols: float, rows: float) -> Affine:
    """``t`` composed with a pixel translation (the origin moves by cols, rows)."""
    return Affine(t.a, t.b, t.c + t.a * cols + t.b * rows, t.d, t.e, t.f + t.d * cols + t.e * rows)


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a raster.

    Parameters
    ----------
    crs : str
        CRS as WKT or an authority string (``"EPSG:32637"``).
    transform : affine.Affine
        Pixel-to-CRS transform of the top-left corner of pixel (0, 0).
    width, height : int
        Number of columns and rows.
    """

    crs: str
    transform: Affine
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units (positive numbers)."""
        t = self.transform
        return (float((t.a**2 + t.d**2) ** 0.5), float((t.b**2 + t.e**2) ** 0.5))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units (north-up grids)."""
        t = self.transform
        xs = [t.c, t.c + t.a * self.width]
        ys = [t.f, t.f + t.e * self.height]
        return (min(xs), min(ys), max(xs), max(ys))

    def window_grid(self, row_off: int, col_off: int, height: int, width: int) -> Grid:
        """The sub-grid of a window of this grid."""
        return Grid(self.crs, _translate(self.transform, col_off, row_off), width, height)

    def shifted(self, dy: float, dx: float) -> Grid:
        """This grid translated by ``(dy, dx)`` pixels (rows, columns)."""
        return Grid(self.crs, _translate(self.transform, dx, dy), self.width, self.height)

    def as_dict(self) -> dict:
        """JSON-serialisable description."""
        return {
            "crs": self.crs,
            "transform": list(self.transform)[:6],
            "width": self.width,
            "height": self.height,
        }
