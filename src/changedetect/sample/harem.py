"""Synthetic before/after image pair of Harem (Idlib, Syria) with exact ground truth.

The commercial satellite images used to document the air strikes on Harem on
22 March 2018 cannot be redistributed, so changedetect ships a *synthetic* pair
of the same place instead. Everything in it is invented; only the coordinates
of the two reported impact sites are real:

* first strike, the popular market near the Great Mosque
  (36.2093028 N, 36.5199889 E; UTM 37N 277053.4, 4010015.0);
* second strike, a residential complex about 93 m further north
  (36.210121 N, 36.519764 E; UTM 37N 277035.5, 4010106.3).

The scene is a procedurally generated, 512 m x 512 m piece of a dense town of
flat-roofed concrete houses (roof tanks, solar water heaters, stairwell boxes,
parapets, courtyards), narrow dusty streets, a market of small shops, a
residential complex of 5-storey blocks, a mosque with a dome and a minaret,
gardens and trees, and the slope of the castle hill along the southern edge.
It is rendered from a height map with sun shading and cast shadows at 0.25 m,
averaged to 0.5 m pixels and passed through a simple sensor model (blur,
pan-sharpening-like colour blur, gain, gamma, noise).

Two dates are rendered on the same nominal grid (EPSG:32637, 0.5 m,
1024 x 1024 pixels):

``before`` (2017-09-11)
    dry season, sun azimuth 141.5 deg / elevation 52 deg, sensor "synthetic-A";
    correctly georeferenced.
``after`` (2018-04-24)
    green season, sun azimuth 130 deg / elevation 57.5 deg, sensor
    "synthetic-B" (other gains, gamma, colour balance, blur and noise); its
    content is displaced by :data:`SHIFT` = (+3.6, -5.3) pixels (rows, cols),
    i.e. 1.8 m south and 2.65 m west, with a cubic-spline resampling.

Between the dates the scene has *damage* (the destroyed market with a crater
and a debris spill, a collapsed and a partly collapsed residential block,
moderately damaged and possibly damaged buildings), recorded in the ``truth``
layer, and *harmless* changes that a damage detector must ignore (moved cars,
rearranged market stalls and umbrellas, repainted roofs, new and removed small
objects, greener and larger vegetation), recorded in the ``harmless`` layer.
Global differences (season, sun and shadows, sensor, misregistration) are not
recorded as polygons. All polygons are in true ground positions, i.e. in the
georeferencing of the before image.

Use :func:`generate` to get the arrays and layers in memory and
:func:`write_sample` to write the GeoTIFFs and GeoJSON files. The output is a
pure function of the seed: generating twice gives byte-identical files (with
the same versions of numpy, scipy, GEOS and GDAL).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio import features
from rasterio.transform import Affine
from scipy import ndimage
from scipy.spatial import cKDTree
from shapely import affinity
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from changedetect.errors import OutputExistsError

__all__ = [
    "AFTER_DATE",
    "BEFORE_DATE",
    "CRS",
    "DEFAULT_SEED",
    "FILE_NAMES",
    "PIXEL_SIZE",
    "SENSOR_AFTER",
    "SENSOR_BEFORE",
    "SHIFT",
    "SITES",
    "SIZE",
    "SUN_AFTER",
    "SUN_BEFORE",
    "TRANSFORM",
    "HaremSample",
    "generate",
    "write_sample",
]

# --------------------------------------------------------------------------
# Public constants
# --------------------------------------------------------------------------

#: Default seed: the date of the strikes.
DEFAULT_SEED = 20180322
#: Coordinate reference system of the images (UTM zone 37N).
CRS = "EPSG:32637"
#: Pixel size in metres.
PIXEL_SIZE = 0.5
#: Width and height of the images in pixels.
SIZE = 1024
#: Acquisition dates (ISO 8601).
BEFORE_DATE = "2017-09-11"
AFTER_DATE = "2018-04-24"
#: Made-up sensor names written to the SENSOR tag.
SENSOR_BEFORE = "synthetic-A"
SENSOR_AFTER = "synthetic-B"
#: Sun (azimuth, elevation) in degrees at acquisition, about 10:30 solar time.
SUN_BEFORE = (141.5, 52.0)
SUN_AFTER = (130.0, 57.5)
#: Planted misregistration of the after image, in pixels (rows, cols): the
#: after image shows at pixel (r, c) what the before image shows at
#: (r - 3.6, c + 5.3). Content moves 3.6 px down (south) and 5.3 px left (west).
SHIFT = (3.6, -5.3)

#: The reported impact points: name -> (lon, lat, UTM x, UTM y).
SITES: dict[str, tuple[float, float, float, float]] = {
    "first strike: market": (36.5199889, 36.2093028, 277053.4, 4010015.0),
    "second strike: residential complex": (36.519764, 36.210121, 277035.5, 4010106.3),
}


def _snap(v: float) -> float:
    return round(v / PIXEL_SIZE) * PIXEL_SIZE


_MID_X = (277053.4 + 277035.5) / 2.0
_MID_Y = (4010015.0 + 4010106.3) / 2.0
#: West and north edges of the grid (snapped to the 0.5 m grid).
ORIGIN_X = _snap(_MID_X - SIZE * PIXEL_SIZE / 2.0)
ORIGIN_Y = _snap(_MID_Y + SIZE * PIXEL_SIZE / 2.0)
#: Affine transform of both images.
TRANSFORM = Affine(PIXEL_SIZE, 0.0, ORIGIN_X, 0.0, -PIXEL_SIZE, ORIGIN_Y)

#: Files written by :func:`write_sample`, by name.
FILE_NAMES = {
    "before": "before.tif",
    "after": "after.tif",
    "truth": "truth.geojson",
    "aois": "aois.geojson",
    "sites": "sites.geojson",
    "harmless": "harmless.geojson",
    "buildings": "buildings.geojson",
}

SEVERITIES = ("destroyed", "severe", "moderate", "possible")

# --------------------------------------------------------------------------
# Internal frame.
#
# Geometry is built in local metres: x to the east from the west edge of the
# grid, y to the *south* from its north edge, so that pixel (row, col) of the
# images covers x in [col/2, col/2 + 0.5), y in [row/2, row/2 + 0.5). The scene
# is rendered at 0.25 m (SS = 2 samples per pixel) on a canvas with a margin of
# MARGIN pixels on every side, used to shift the after image without borders.
# --------------------------------------------------------------------------

_SS = 2
_MARGIN = 32
_MARGIN_M = _MARGIN * PIXEL_SIZE
_N1 = SIZE + 2 * _MARGIN
_N2 = _N1 * _SS
_RES2 = PIXEL_SIZE / _SS
_T2 = Affine(_RES2, 0.0, -_MARGIN_M, 0.0, _RES2, -_MARGIN_M)
_EXTENT = SIZE * PIXEL_SIZE

_SITE_MARKET = (277053.4 - ORIGIN_X, ORIGIN_Y - 4010015.0)
_SITE_RESID = (277035.5 - ORIGIN_X, ORIGIN_Y - 4010106.3)

_F32 = np.float32


def _c(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float64)


# Sensor models (reflectance -> digital numbers).
_SENSORS: dict[str, dict[str, Any]] = {
    "before": {
        "gain": _c(1.42, 1.38, 1.36),
        "offset": _c(0.012, 0.016, 0.024),
        "gamma": 2.15,
        "psf": 0.50,
        "chroma": 1.3,
        "sharpen": 0.45,
        "noise": (0.9, 0.010),
        "e_dir": _c(1.00, 0.96, 0.88),
        "e_sky": _c(0.21, 0.23, 0.29),
    },
    "after": {
        "gain": _c(1.30, 1.36, 1.46),
        "offset": _c(0.030, 0.034, 0.050),
        "gamma": 1.85,
        "psf": 0.66,
        "chroma": 1.6,
        "sharpen": 0.0,
        "noise": (1.3, 0.022),
        "e_dir": _c(1.00, 0.99, 0.95),
        "e_sky": _c(0.15, 0.18, 0.26),
    },
}


# --------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HaremSample:
    """A generated synthetic before/after pair with its vector layers.

    Attributes
    ----------
    before, after : numpy.ndarray
        RGB images, shape (3, 1024, 1024), dtype uint8, read-only.
    transform : affine.Affine
        Georeferencing of both images (EPSG:32637, 0.5 m pixels).
    crs : str
        ``"EPSG:32637"``.
    before_date, after_date : str
        Acquisition dates (ISO 8601).
    shift : tuple of float
        The planted misregistration of the after image in pixels (rows, cols).
    truth : geopandas.GeoDataFrame
        Damage polygons (EPSG:4326): ``id``, ``severity``, ``kind``, ``site``.
    aois : geopandas.GeoDataFrame
        The two areas of interest (EPSG:4326): ``name``.
    sites : geopandas.GeoDataFrame
        The reported impact points (EPSG:4326): ``name``, ``date``,
        ``uncertainty_m``.
    harmless : geopandas.GeoDataFrame
        Footprints of changes that are not damage (EPSG:4326): ``kind``.
    buildings : geopandas.GeoDataFrame
        Footprints of every building before the strikes (EPSG:4326), as a map
        such as OpenStreetMap would give them: ``id``, ``kind``.
    sensors : tuple of str
        Made-up sensor names of the before and after images.
    """

    before: np.ndarray
    after: np.ndarray
    transform: Affine
    crs: str
    before_date: str
    after_date: str
    shift: tuple[float, float]
    truth: gpd.GeoDataFrame
    aois: gpd.GeoDataFrame
    sites: gpd.GeoDataFrame
    harmless: gpd.GeoDataFrame
    buildings: gpd.GeoDataFrame
    sensors: tuple[str, str] = (SENSOR_BEFORE, SENSOR_AFTER)


# --------------------------------------------------------------------------
# Small geometry helpers
# --------------------------------------------------------------------------


def _frame(poly: BaseGeometry) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Centre, unit long axis, length and width of the minimum rotated rectangle."""
    mrr = shapely.minimum_rotated_rectangle(poly)
    xy = np.asarray(mrr.exterior.coords)[:4]
    e1, e2 = xy[1] - xy[0], xy[2] - xy[1]
    l1, l2 = float(np.hypot(*e1)), float(np.hypot(*e2))
    centre = xy.mean(axis=0)
    if l1 >= l2:
        return centre, e1 / max(l1, 1e-9), l1, l2
    return centre, e2 / max(l2, 1e-9), l2, l1


def _rrect(
    c: Iterable[float], a: Iterable[float], length: float, width: float
) -> Polygon:
    """Rectangle centred on ``c`` with its ``length`` along unit vector ``a``."""
    c = np.asarray(c, dtype=float)
    a = np.asarray(a, dtype=float)
    b = np.array([-a[1], a[0]])
    hl, hw = length / 2.0, width / 2.0
    return Polygon(
        [
            c + a * hl + b * hw,
            c - a * hl + b * hw,
            c - a * hl - b * hw,
            c + a * hl - b * hw,
        ]
    )


_CIRCLE = np.column_stack(
    [
        np.cos(np.linspace(0, 2 * np.pi, 12, endpoint=False)),
        np.sin(np.linspace(0, 2 * np.pi, 12, endpoint=False)),
    ]
)


def _disc(c: Iterable[float], r: float) -> Polygon:
    """A 12-sided disc (tanks, dishes), cheaper than ``Point.buffer``."""
    return Polygon(np.asarray(c, dtype=float) + r * _CIRCLE)


def _unit(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([np.cos(t), np.sin(t)])


def _polys(g: BaseGeometry) -> list[Polygon]:
    if g.is_empty:
        return []
    if isinstance(g, Polygon):
        return [g]
    out: list[Polygon] = []
    for part in getattr(g, "geoms", []):
        out.extend(_polys(part))
    return out


def _halves(poly: Polygon, frac: float) -> tuple[BaseGeometry, BaseGeometry]:
    """Cut ``poly`` perpendicular to its long axis at ``frac`` of its length."""
    c, a, length, _ = _frame(poly)
    b = np.array([-a[1], a[0]])
    p = c + a * (frac - 0.5) * length
    big = 1e4
    half = Polygon(
        [p + b * big, p - b * big, p - b * big + a * big, p + b * big + a * big]
    )
    return poly.difference(half), poly.intersection(half)


def _blob(
    c: Iterable[float],
    r: float,
    rng: np.random.Generator,
    rough: float = 0.18,
    n: int = 28,
) -> Polygon:
    """Irregular round polygon (random low harmonics of the radius)."""
    c = np.asarray(c, dtype=float)
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in (2, 3, 5):
        rad += rough / k * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = r * np.clip(rad, 0.55, 1.6)
    return Polygon(np.column_stack([c[0] + rad * np.cos(t), c[1] + rad * np.sin(t)]))


def _shadow_vec(sun: tuple[float, float], height: float) -> np.ndarray:
    az, el = np.deg2rad(sun[0]), np.deg2rad(sun[1])
    return -np.array([np.sin(az), -np.cos(az)]) * height / np.tan(el)


def _with_shadow(poly: Polygon, height: float, dates: str) -> Polygon:
    """Footprint of an object together with its shadow on the date(s) it exists."""
    parts = [poly]
    if dates in ("both", "before"):
        parts.append(affinity.translate(poly, *_shadow_vec(SUN_BEFORE, height)))
    if dates in ("both", "after"):
        parts.append(affinity.translate(poly, *_shadow_vec(SUN_AFTER, height)))
    return shapely.union_all(parts).convex_hull.buffer(0.3, quad_segs=2)


# --------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------


@dataclass
class _Building:
    poly: Polygon
    height: float
    color: np.ndarray
    kind: str
    axis: np.ndarray
    parapet: float = 0.9
    color_after: np.ndarray | None = None


@dataclass
class _Object:
    poly: Polygon
    top: float  # height of the top above ground (m)
    color: np.ndarray
    bid: int = 0  # owning building (1-based), 0 for ground objects
    dates: str = "both"  # "both", "before" or "after"
    kind: str = "clutter"


@dataclass
class _Tree:
    x: float
    y: float
    r: float
    h: float
    kind: str  # "tree", "olive", "shrub"
    grow: float
    coef: np.ndarray  # radius harmonics
    tone: float


@dataclass
class _Damage:
    poly: BaseGeometry
    severity: str
    kind: str
    site: str
    mode: str  # collapse, market, crater, spill, partial, holes, light
    bids: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class _World:
    buildings: list[_Building] = field(default_factory=list)
    objects: list[_Object] = field(default_factory=list)
    grounds: list[tuple[BaseGeometry, str]] = field(default_factory=list)
    trees: list[_Tree] = field(default_factory=list)
    damage: list[_Damage] = field(default_factory=list)
    harmless: list[tuple[BaseGeometry, str]] = field(default_factory=list)
    streets: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)
    domes: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    hill: Polygon = field(default_factory=Polygon)


# Ground materials: index -> name (0 is the default dusty street surface).
_GROUND = [
    "street",
    "asphalt",
    "paving",
    "lot",
    "garden",
    "court",
    "yard",
    "gravel",
    "path",
    "stone",
]
_GID = {name: i for i, name in enumerate(_GROUND)}


def _toe(x: np.ndarray | float) -> np.ndarray:
    """y of the foot of the castle hill as a function of x (local metres)."""
    x = np.asarray(x, dtype=np.float64)
    return np.asarray(
        447.0
        + 9.0 * np.sin(2 * np.pi * (x + 60.0) / 340.0)
        + 3.5 * np.sin(2 * np.pi * x / 115.0)
    )


def _terrain(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    s = np.maximum(0.0, y - _toe(x))
    return 0.46 * s * s / (s + 9.0)


_TANK_COLORS = [
    (_c(0.045, 0.045, 0.05), 0.50),
    (_c(0.72, 0.72, 0.70), 0.22),
    (_c(0.10, 0.20, 0.42), 0.12),
    (_c(0.42, 0.42, 0.41), 0.10),
    (_c(0.55, 0.50, 0.40), 0.06),
]
_AWNING_COLORS = [
    _c(0.55, 0.12, 0.10),
    _c(0.12, 0.24, 0.50),
    _c(0.14, 0.38, 0.22),
    _c(0.66, 0.46, 0.10),
    _c(0.72, 0.72, 0.68),
    _c(0.36, 0.20, 0.40),
    _c(0.20, 0.42, 0.52),
    _c(0.60, 0.30, 0.12),
]
_CAR_COLORS = [
    (_c(0.72, 0.72, 0.70), 0.38),
    (_c(0.50, 0.51, 0.52), 0.18),
    (_c(0.06, 0.06, 0.07), 0.14),
    (_c(0.45, 0.08, 0.07), 0.08),
    (_c(0.10, 0.16, 0.36), 0.08),
    (_c(0.70, 0.58, 0.12), 0.06),
    (_c(0.28, 0.30, 0.22), 0.08),
]


def _pick(
    rng: np.random.Generator, table: list[tuple[np.ndarray, float]]
) -> np.ndarray:
    cum = np.cumsum([p for _, p in table])
    i = min(
        int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(table) - 1
    )
    return table[i][0] * rng.uniform(0.9, 1.1)


def _faded(rng: np.random.Generator) -> np.ndarray:
    """A sun-faded awning or tarp colour."""
    base = _AWNING_COLORS[int(rng.integers(len(_AWNING_COLORS)))]
    k = rng.uniform(0.2, 0.55)
    return k * base + (1 - k) * _c(0.50, 0.48, 0.44) * rng.uniform(0.8, 1.15)


def _shop_color(rng: np.random.Generator) -> np.ndarray:
    """Roof of a market shop: concrete, corrugated metal, rust or a tarp."""
    r = rng.random()
    if r < 0.58:
        return _roof_color(rng) * rng.uniform(0.85, 1.0)
    if r < 0.84:
        return _c(0.56, 0.57, 0.58) * rng.uniform(0.8, 1.15)
    if r < 0.94:
        return _c(0.42, 0.31, 0.24) * rng.uniform(0.8, 1.15)
    return _faded(rng)


def _roof_color(rng: np.random.Generator) -> np.ndarray:
    r = rng.random()
    if r < 0.66:  # bare concrete
        lum = float(np.clip(rng.normal(0.45, 0.07), 0.28, 0.63))
        tint = _c(1.04, 1.0, 0.92) + rng.normal(0.0, 0.015, 3)
    elif r < 0.84:  # whitewashed / light coating
        lum = rng.uniform(0.55, 0.68)
        tint = _c(1.0, 1.0, 0.96) + rng.normal(0.0, 0.008, 3)
    elif r < 0.95:  # bitumen membrane
        lum = rng.uniform(0.20, 0.30)
        tint = _c(1.03, 1.0, 0.95)
    else:  # painted, tiled or metal
        lum = rng.uniform(0.34, 0.50)
        tint = [_c(0.96, 1.0, 1.06), _c(1.10, 0.97, 0.90), _c(0.98, 1.02, 0.98)][
            int(rng.integers(3))
        ]
    return np.clip(lum * tint, 0.02, 0.9)


# --------------------------------------------------------------------------
# Scene construction
# --------------------------------------------------------------------------


class _SceneBuilder:
    """Builds the scene description from a random generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.w = _World()
        self.excl: list[BaseGeometry] = []
        self.tree_spots: list[tuple[BaseGeometry, int]] = []
        self.market_poly = Polygon()
        self.resid: dict[str, int] = {}
        self.kg_bid = 0
        self.generic: list[int] = []

    # -- helpers ---------------------------------------------------------
    def add_building(
        self,
        poly: Polygon,
        height: float,
        color: np.ndarray,
        kind: str,
        parapet: float = 0.9,
    ) -> int:
        _, axis, _, _ = _frame(poly)
        self.w.buildings.append(
            _Building(
                poly, float(height), np.asarray(color, float), kind, axis, parapet
            )
        )
        return len(self.w.buildings)

    def add_object(
        self,
        poly: Polygon,
        top: float,
        color: np.ndarray,
        bid: int = 0,
        dates: str = "both",
        kind: str = "clutter",
    ) -> None:
        self.w.objects.append(
            _Object(poly, float(top), np.asarray(color, float), bid, dates, kind)
        )

    def sample_in(self, poly: BaseGeometry, n: int) -> np.ndarray:
        if poly.is_empty or n <= 0:
            return np.zeros((0, 2))
        minx, miny, maxx, maxy = poly.bounds
        pts = self.rng.uniform((minx, miny), (maxx, maxy), size=(8 * n + 16, 2))
        ok = shapely.contains_xy(poly, pts[:, 0], pts[:, 1])
        return pts[ok][:n]

    # -- top level -------------------------------------------------------
    def build(self) -> _World:
        self.roads()
        self.hill()
        self.market()
        self.residential()
        self.kindergarten()
        self.mosque()
        self.squares()
        self.town()
        self.damage()
        self.trees()
        self.vehicles()
        self.stalls()
        self.harmless_edits()
        self.seasonal()
        return self.w

    # -- roads -----------------------------------------------------------
    def roads(self) -> None:
        xs = np.linspace(-30, _EXTENT + 30, 60)
        toe_line = list(zip(xs, _toe(xs) - 3.5, strict=True))
        lines = [
            (
                [
                    (-30, 247),
                    (100, 243),
                    (200, 240.5),
                    (300, 238),
                    (420, 240),
                    (545, 245),
                ],
                9.0,
            ),
            ([(319, -30), (316.5, 120), (314.2, 240), (314.5, 330), (316, 452)], 8.0),
            ([(147, -30), (143, 150), (139.5, 300), (141, 452)], 7.0),
            ([(316.5, 120), (420, 78), (545, 40)], 7.0),
            ([(-30, 122), (60, 131), (143, 150)], 6.5),
            (toe_line, 7.0),
        ]
        for coords, width in lines:
            line = LineString(coords)
            self.w.grounds.append((line.buffer(width / 2, cap_style="flat"), "asphalt"))
            self.excl.append(line.buffer(width / 2 + 1.2))
            arr = np.asarray(line.coords)
            for p0, p1 in zip(arr[:-1], arr[1:], strict=True):
                self.w.streets.append((p0, p1, width))

    def hill(self) -> None:
        xs = np.linspace(-40, _EXTENT + 40, 80)
        top = list(zip(xs, _toe(xs) - 0.5, strict=True))
        hill = Polygon([*top, (_EXTENT + 40, _EXTENT + 40), (-40, _EXTENT + 40)])
        self.w.hill = hill
        self.excl.append(
            Polygon(
                [
                    *zip(xs, _toe(xs) - 8.0, strict=True),
                    (_EXTENT + 40, _EXTENT + 40),
                    (-40, _EXTENT + 40),
                ]
            )
        )
        # terrace walls along contours and a footpath up the slope
        for off in (11.0, 23.0, 37.0):
            x = np.linspace(-20, _EXTENT + 20, 90)
            y = _toe(x) + off + 1.5 * np.sin(x / 17.0 + off)
            line = LineString(np.column_stack([x, y]))
            keep = box(-20, 0, _EXTENT + 20, _EXTENT + 40)
            for k in range(6):
                gap = box(
                    40 + 85 * k + self.rng.uniform(0, 30),
                    0,
                    52 + 85 * k + self.rng.uniform(10, 40),
                    600,
                )
                keep = keep.difference(gap)
            wall = line.intersection(keep).buffer(0.35, cap_style="flat")
            for p in _polys(wall):
                self.add_object(p, 1.1, _c(0.60, 0.57, 0.51), kind="terrace")
        px = [(205, 447), (190, 462), (232, 478), (200, 496), (240, 515), (226, 535)]
        path = LineString([(x, _toe(x) - 447 + y) for x, y in px])
        self.w.grounds.append((path.buffer(0.9), "path"))

    # -- market (first strike) ------------------------------------------
    def market(self) -> None:
        rng = self.rng
        c0 = np.array([265.0, 302.0])
        ua = _unit(-3.0)
        va = np.array([-ua[1], ua[0]])

        def at(u: float, v: float) -> np.ndarray:
            return c0 + u * ua + v * va

        def quad(u0: float, u1: float, v0: float, v1: float) -> Polygon:
            return Polygon([at(u0, v0), at(u1, v0), at(u1, v1), at(u0, v1)])

        self.market_poly = quad(-42, 42, -26, 26)
        self.excl.append(self.market_poly.buffer(4.5, join_style="mitre"))
        self.w.grounds.append((self.market_poly, "street"))
        rows = [
            (-26, -20, 1),
            (-15, -9, -1),
            (-9, -3, 1),
            (3, 9, -1),
            (9, 15, 1),
            (20, 26, -1),
        ]
        segments = [(-42.0, -17.0), (-13.0, 13.0), (17.0, 42.0)]
        self.market_shops: list[int] = []
        for v0, v1, face in rows:
            for s0, s1 in segments:
                u = s0
                while u < s1 - 0.5:
                    wdt = rng.uniform(3.3, 4.7)
                    u1 = s1 if s1 - (u + wdt) < 2.6 else u + wdt
                    shop = quad(u, u1, v0, v1)
                    col = _shop_color(rng)
                    bid = self.add_building(
                        shop, rng.uniform(3.4, 4.4), col, "shop", parapet=0.3
                    )
                    self.market_shops.append(bid)
                    roof = self.w.buildings[bid - 1].height
                    if rng.random() < 0.3:
                        p = self.sample_in(shop.buffer(-0.8), 1)
                        if len(p):
                            self.add_object(
                                _disc(p[0], 0.5),
                                roof + 1.2,
                                _pick(rng, _TANK_COLORS),
                                bid,
                            )
                    for p in self.sample_in(shop.buffer(-0.4), int(rng.integers(0, 3))):
                        col = np.clip(
                            col * rng.uniform(0.4, 1.3) + rng.normal(0, 0.04, 3),
                            0.03,
                            0.8,
                        )
                        self.add_object(
                            _rrect(p, ua, rng.uniform(0.5, 1.8), rng.uniform(0.4, 1.2)),
                            roof + rng.uniform(0.2, 0.6),
                            col,
                            bid,
                            kind="junk",
                        )
                    if rng.random() < 0.72:  # awning over the lane
                        vf = v1 if face > 0 else v0
                        depth = rng.uniform(1.1, 1.9)
                        aw = quad(
                            u + 0.15,
                            u1 - 0.15,
                            min(vf, vf + face * depth),
                            max(vf, vf + face * depth),
                        )
                        self.add_object(aw, 2.7, _faded(rng), kind="awning")
                    u = u1
        lanes = [(-20, -15), (-3, 3), (15, 20)]
        for v0, v1 in lanes:
            u = -42.0
            while u < 42:
                ln = rng.uniform(3, 9)
                if rng.random() < 0.35:
                    tarp = (
                        _c(0.34, 0.40, 0.48)
                        if rng.random() < 0.5
                        else _c(0.55, 0.55, 0.52)
                    )
                    self.add_object(
                        quad(u, min(42, u + ln), v0 + 0.3, v1 - 0.3),
                        3.3,
                        tarp * rng.uniform(0.75, 1.2),
                        kind="tarp",
                    )
                u += ln + rng.uniform(1, 6)
            # goods, crates and carts in the lanes
            for p in self.sample_in(quad(-42, 42, v0 + 1.2, v1 - 1.2), 45):
                col = _AWNING_COLORS[int(rng.integers(8))] * rng.uniform(0.6, 1.2)
                self.add_object(
                    _rrect(p, ua, rng.uniform(0.5, 1.4), rng.uniform(0.5, 1.0)),
                    rng.uniform(0.4, 1.0),
                    col,
                    kind="goods",
                )

    # -- residential complex (second strike) ----------------------------
    def residential(self) -> None:
        rng = self.rng
        c0 = np.array([263.0, 191.5])
        ua = _unit(-5.0)
        va = np.array([-ua[1], ua[0]])
        yard = _rrect(c0, ua, 59.0, 77.0)
        self.excl.append(yard.buffer(3.5, join_style="mitre"))
        self.w.grounds.append((yard, "yard"))
        self.resid_yard = yard
        names = {
            "R1": (-15.5, 19.5),
            "R2": (15.5, 19.5),
            "R3": (-15.5, -19.5),
            "R4": (15.5, -19.5),
        }
        for name, (u, v) in names.items():
            centre = c0 + u * ua + v * va
            poly = _rrect(centre, va, 30.0, 20.0)
            col = _c(0.50, 0.49, 0.46) * rng.uniform(0.92, 1.08)
            bid = self.add_building(poly, 16.0, col, "block")
            self.resid[name] = bid
            # two stairwell boxes, rows of tanks and heaters along the long sides
            for sv in (-7.0, 7.0):
                box_c = centre + sv * va + rng.uniform(-1, 1) * ua
                self.add_object(
                    _rrect(box_c, va, 3.4, 2.8),
                    16.0 + 2.8,
                    col * 0.97,
                    bid,
                    kind="stairwell",
                )
            for side in (-1, 1):
                for k in range(11):
                    p = centre + side * 8.3 * ua + (-13 + 2.6 * k) * va
                    if rng.random() < 0.8:
                        self.add_object(
                            _disc(p, rng.uniform(0.5, 0.65)),
                            17.4,
                            _pick(rng, _TANK_COLORS),
                            bid,
                            kind="tank",
                        )
                for k in range(4):
                    p = (
                        centre
                        + side * 5.2 * ua
                        + (-11 + 7.3 * k + rng.uniform(-1, 1)) * va
                    )
                    self.add_heater(p, ua, 16.0, bid)
            for p in self.sample_in(poly.buffer(-2.0), 8):
                self.add_object(
                    _disc(p, 0.45),
                    17.0,
                    _c(0.68, 0.68, 0.66),
                    bid,
                    kind="dish",
                )

    def add_heater(
        self,
        p: np.ndarray,
        along: np.ndarray,
        roof: float,
        bid: int,
        dates: str = "both",
    ) -> list[_Object]:
        """Solar water heater: a dark panel and a white tank on its north side."""
        a = along if abs(along[0]) >= abs(along[1]) else np.array([along[1], -along[0]])
        b = np.array([-a[1], a[0]])
        if b[1] > 0:
            b = -b
        panel = _rrect(p, a, 2.0, 1.1)
        tank = _rrect(p + b * 0.75, a, 2.0, 0.45)
        self.add_object(
            panel,
            roof + 0.9,
            _c(0.10, 0.13, 0.20) * self.rng.uniform(0.8, 1.3),
            bid,
            dates,
            kind="heater",
        )
        self.add_object(
            tank, roof + 1.5, _c(0.70, 0.70, 0.68), bid, dates, kind="heater"
        )
        return self.w.objects[-2:]

    def kindergarten(self) -> None:
        ua = _unit(-5.0)
        va = np.array([-ua[1], ua[0]])
        c0 = np.array([221.0, 206.0])
        poly = _rrect(c0, va, 17.0, 12.0)
        self.kg_bid = self.add_building(poly, 7.2, _c(0.62, 0.60, 0.55), "kindergarten")
        yard = _rrect(c0 - 10.5 * ua, va, 17.0, 8.0)
        self.w.grounds.append((yard, "paving"))
        for p in self.sample_in(yard.buffer(-1.0), 5):
            self.add_object(
                _rrect(p, ua, 1.2, 0.8),
                1.2,
                _AWNING_COLORS[int(self.rng.integers(8))],
                kind="play",
            )
        self.add_object(
            _rrect(c0 + 2 * ua - 4 * va, va, 3.0, 2.6),
            7.2 + 2.6,
            _c(0.58, 0.57, 0.53),
            self.kg_bid,
            kind="stairwell",
        )
        for k in range(4):
            self.add_object(
                _disc(c0 + 4 * ua + (-1 + 1.3 * k) * va, 0.55),
                8.5,
                _c(0.05, 0.05, 0.05),
                self.kg_bid,
                kind="tank",
            )
        self.excl.append(
            shapely.union_all([poly, yard]).buffer(3.0, join_style="mitre")
        )

    # -- Great Mosque ----------------------------------------------------
    def mosque(self) -> None:
        c0 = np.array([193.0, 353.0])
        ua = _unit(-4.0)
        va = np.array([-ua[1], ua[0]])

        def at(u: float, v: float) -> np.ndarray:
            return c0 + u * ua + v * va

        def quad(u0: float, u1: float, v0: float, v1: float) -> Polygon:
            return Polygon([at(u0, v0), at(u1, v0), at(u1, v1), at(u0, v1)])

        stone = _c(0.58, 0.55, 0.49)
        self.add_building(quad(-16, 16, 2, 18), 8.5, stone, "mosque", parapet=0.8)
        for q in (
            quad(-16, 16, -18, -14),
            quad(-16, -12, -14, 2),
            quad(12, 16, -14, 2),
        ):
            self.add_building(q, 5.5, stone * 1.04, "mosque", parapet=0.5)
        court = quad(-12, 12, -14, 2)
        self.w.grounds.append((court, "stone"))
        fc = at(0, -6)
        self.add_object(
            Point(fc).buffer(1.8, quad_segs=2),
            0.6,
            _c(0.62, 0.60, 0.56),
            kind="fountain",
        )
        self.add_object(
            Point(fc).buffer(1.3, quad_segs=2),
            0.62,
            _c(0.16, 0.24, 0.27),
            kind="fountain",
        )
        dc = at(0, 10)
        self.add_object(
            Point(dc).buffer(6.1, quad_segs=8), 9.8, stone * 0.95, kind="drum"
        )
        self.w.domes.append((float(dc[0]), float(dc[1]), 5.6, 9.8, 5.2))
        mc = at(-14, -16)
        self.add_object(
            Point(mc).buffer(1.8, quad_segs=2),
            27.0,
            _c(0.63, 0.60, 0.54),
            kind="minaret",
        )
        self.add_object(
            Point(mc).buffer(0.9, quad_segs=2),
            29.5,
            _c(0.40, 0.46, 0.44),
            kind="minaret",
        )
        self.excl.append(quad(-16, 16, -18, 18).buffer(3.5, join_style="mitre"))

    def squares(self) -> None:
        """Vegetable market square and the old garage lot."""
        self.veg = box(322.5, 282.0, 356.0, 326.0)
        self.w.grounds.append((self.veg, "paving"))
        self.excl.append(self.veg.buffer(2.5, join_style="mitre"))
        self.garage = box(177.0, 283.0, 208.0, 324.0)
        self.w.grounds.append((self.garage, "gravel"))
        self.excl.append(self.garage.buffer(2.0, join_style="mitre"))

    # -- generic town ----------------------------------------------------
    def grid(self) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]:
        """Vertices of a jittered street grid, rotated by -7 deg, and a smooth warp."""
        rng = self.rng
        th = np.deg2rad(-7.0)
        cth, sth = np.cos(th), np.sin(th)

        def lines() -> np.ndarray:
            pos = [-345.0]
            while pos[-1] < 345:
                pos.append(pos[-1] + rng.uniform(28.0, 56.0))
            return np.array(pos)

        us, vs = lines(), lines()
        uu, vv = np.meshgrid(us, vs)
        uu = uu + rng.uniform(-4.5, 4.5, uu.shape)
        vv = vv + rng.uniform(-4.5, 4.5, vv.shape)
        gx = 256.0 + uu * cth - vv * sth
        gy = 256.0 + uu * sth + vv * cth
        ph = rng.uniform(0, 2 * np.pi, 4)

        def warp(xy: np.ndarray) -> np.ndarray:
            x, y = xy[:, 0], xy[:, 1]
            wx = 7.0 * np.sin(2 * np.pi * y / 310.0 + ph[0])
            wx = wx + 3.5 * np.sin(2 * np.pi * (x + y) / 170.0 + ph[1])
            wy = 7.0 * np.sin(2 * np.pi * x / 280.0 + ph[2])
            wy = wy + 3.5 * np.sin(2 * np.pi * (x - y) / 190.0 + ph[3])
            return np.column_stack([x + wx, y + wy])

        return gx, gy, warp

    def merge_cells(
        self, ni: int, nj: int
    ) -> tuple[list[int], set[tuple[int, int, int, int]]]:
        """Merge some neighbouring grid cells (union-find): returns cell groups and removed streets."""
        rng = self.rng
        parent = list(range((ni - 1) * (nj - 1)))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        merged: set[tuple[int, int, int, int]] = set()
        for i in range(ni - 1):
            for j in range(nj - 1):
                a = i * (nj - 1) + j
                if j + 1 < nj - 1 and rng.random() < 0.2:
                    parent[find(a)] = find(a + 1)
                    merged.add((i, j + 1, i + 1, j + 1))
                if i + 1 < ni - 1 and rng.random() < 0.2:
                    parent[find(a)] = find(a + nj - 1)
                    merged.add((i + 1, j, i + 1, j + 1))
        return [find(a) for a in range(len(parent))], merged

    def town(self) -> None:
        """Irregular street grid: jittered, warped, some blocks merged, dead-end alleys."""
        gx, gy, warp = self.grid()
        ni, nj = gx.shape
        groups_of, merged = self.merge_cells(ni, nj)
        for i in range(ni):
            for j in range(nj):
                for i2, j2 in ((i, j + 1), (i + 1, j)):
                    if i2 < ni and j2 < nj and (i, j, i2, j2) not in merged:
                        ends = np.array(
                            [[gx[i, j], gy[i, j]], [gx[i2, j2], gy[i2, j2]]]
                        )
                        seg = warp(ends)
                        self.w.streets.append((seg[0], seg[1], 4.5))
        groups: dict[int, list[Polygon]] = {}
        for i in range(ni - 1):
            for j in range(nj - 1):
                corners = [(i, j), (i, j + 1), (i + 1, j + 1), (i + 1, j)]
                quad = Polygon([(gx[a, b], gy[a, b]) for a, b in corners])
                groups.setdefault(groups_of[i * (nj - 1) + j], []).append(quad)
        excl = shapely.union_all(self.excl)
        shapely.prepare(excl)
        for key in sorted(groups):
            self.block(shapely.union_all(groups[key]), warp, excl)

    def block(
        self,
        blk: BaseGeometry,
        warp: Callable[[np.ndarray], np.ndarray],
        excl: BaseGeometry,
    ) -> None:
        """Turn one street block into lots (inset for the streets, minus special zones)."""
        rng = self.rng
        m = _MARGIN_M + 4
        canvas = box(-m, -m, _EXTENT + m, _EXTENT + m)
        if not blk.intersects(canvas.buffer(30)):
            return
        blk = shapely.transform(shapely.segmentize(blk, 4.0), warp)
        blk = blk.buffer(-rng.uniform(1.5, 3.0), join_style="mitre")
        if rng.random() < 0.15:  # a block slightly rotated
            blk = affinity.rotate(blk, rng.uniform(-5.0, 5.0), origin="centroid")
            blk = blk.buffer(-1.2, join_style="mitre")
        blk = blk.difference(excl).intersection(canvas)
        for piece in _polys(blk):
            if piece.area < 45.0 or _frame(piece)[3] < 6.0:
                continue
            for part in _polys(self.alley(piece)):
                if part.area < 45.0:
                    self.w.grounds.append((part, "lot"))
                    continue
                for lot in self.subdivide(part):
                    self.lot(lot)

    def alley(self, piece: Polygon) -> BaseGeometry:
        """Cut a dead-end alley into a large block."""
        rng = self.rng
        if piece.area < 1100.0 or rng.random() < 0.45:
            return piece
        ring = piece.exterior
        p = np.asarray(ring.interpolate(rng.uniform(0, ring.length)).coords[0])
        cen = np.asarray(piece.centroid.coords[0])
        d = cen - p
        d = d / max(float(np.hypot(*d)), 1e-9)
        length = rng.uniform(0.45, 0.8) * float(np.sqrt(piece.area))
        strip = LineString([p - 2.0 * d, p + length * d]).buffer(
            rng.uniform(1.1, 1.5), cap_style="flat"
        )
        return piece.difference(strip)

    def subdivide(self, poly: Polygon) -> list[Polygon]:
        rng = self.rng
        out: list[Polygon] = []
        stack = [poly]
        while stack:
            p = stack.pop()
            _, _, length, width = _frame(p)
            target = rng.uniform(80.0, 300.0)
            if (p.area < target and length < 2.8 * width) or length < 9.0:
                out.append(p)
                continue
            for attempt in range(4):
                a, b = _halves(p, rng.uniform(0.36, 0.64))
                pieces = [q for q in _polys(a) + _polys(b) if q.area > 1.0]
                small = [q for q in pieces if q.area < 25.0 or _frame(q)[3] < 3.0]
                if not small or (attempt == 3 and p.area > 350.0):
                    break
            else:
                out.append(p)
                continue
            for q in pieces:
                if q in small:
                    self.w.grounds.append((q, "lot"))
                else:
                    stack.append(q)
        return out

    def open_lot(self, lot: Polygon) -> None:
        """A garden or a vacant lot, often walled."""
        rng = self.rng
        kind = "garden" if rng.random() < 0.5 else "lot"
        self.w.grounds.append((lot, kind))
        if kind == "garden" or rng.random() < 0.5:  # a boundary wall with a gate
            ring = lot.exterior
            gate = Point(ring.interpolate(rng.uniform(0, ring.length)).coords[0])
            wall = ring.difference(gate.buffer(1.5)).buffer(0.18, cap_style="flat")
            col = _c(0.50, 0.47, 0.42) * rng.uniform(0.9, 1.1)
            self.add_object(
                wall.intersection(lot), rng.uniform(1.8, 2.6), col, kind="wall"
            )
        if kind == "garden":
            self.tree_spots.append((lot.buffer(-1.5), int(rng.integers(1, 5))))
        elif rng.random() < 0.5:
            self.tree_spots.append((lot.buffer(-1.5), 1))

    def footprint(self, lot: Polygon, r: float) -> BaseGeometry:
        """Footprint of the house on a lot: with a courtyard, a back yard, or the whole lot."""
        rng = self.rng
        if lot.area > 170.0 and r < 0.40:
            c, a, length, width = _frame(lot)
            inset = rng.uniform(3.0, 4.5)
            court = _rrect(c, a, length - 2 * inset, width - 2 * inset)
            court = court.intersection(lot)
            if court.area <= 12.0:
                return lot
            garden = rng.random() < 0.45
            self.w.grounds.append((court, "garden" if garden else "court"))
            if garden or rng.random() < 0.3:
                self.tree_spots.append((court.buffer(-1.2), 1))
            return lot.difference(court)
        if r < 0.55:
            a, b = _halves(lot, rng.uniform(0.62, 0.82))
            pa, pb = _polys(a), _polys(b)
            if (
                len(pa) != 1
                or len(pb) != 1
                or pb[0].area <= 14
                or _frame(pb[0])[3] <= 2.5
            ):
                return lot
            kind = "garden" if rng.random() < 0.4 else "lot"
            self.w.grounds.append((pb[0], kind))
            if kind == "garden":
                self.tree_spots.append((pb[0].buffer(-1.0), 1))
            return pa[0]
        if rng.random() < 0.3:
            return lot.buffer(-0.35, join_style="mitre")
        return lot

    def lot(self, lot: Polygon) -> None:
        rng = self.rng
        if lot.area < 30.0:
            self.w.grounds.append((lot, "lot"))
            return
        r = rng.random()
        if r < 0.065 and lot.area < 500.0:
            self.open_lot(lot)
            return
        bld = self.footprint(lot, r)
        for piece in _polys(bld):
            if piece.area < 20.0 or _frame(piece)[3] < 2.6:
                self.w.grounds.append((piece, "lot"))
                self.add_object(
                    piece.buffer(-0.25, join_style="mitre"),
                    2.3,
                    _c(0.52, 0.49, 0.44),
                    kind="wall",
                )
                continue
            storeys = int(rng.choice([1, 2, 3, 4], p=[0.17, 0.35, 0.32, 0.16]))
            height = storeys * 3.15 + 0.3 + rng.uniform(-0.2, 0.2)
            bid = self.add_building(piece, height, _roof_color(rng), "house")
            self.generic.append(bid)
            self.clutter(bid, storeys)

    def clutter(self, bid: int, storeys: int) -> None:
        rng = self.rng
        b = self.w.buildings[bid - 1]
        inner = b.poly.buffer(-0.75)
        if inner.is_empty:
            return
        roof = b.height
        axis = b.axis
        perp = np.array([-axis[1], axis[0]])
        area = b.poly.area
        # repair patches and stains of another shade
        for p in self.sample_in(inner, int(rng.poisson(area / 150.0))):
            patch = _rrect(
                p, axis, rng.uniform(1.5, 5.0), rng.uniform(1.2, 3.5)
            ).intersection(inner)
            if not patch.is_empty:
                self.add_object(
                    patch,
                    roof + 0.02,
                    b.color * rng.uniform(0.82, 1.12),
                    bid,
                    kind="patch",
                )
        if storeys >= 2 and rng.random() < 0.7 and area > 45:
            fits = b.poly.buffer(-0.4)
            for p in self.sample_in(b.poly.buffer(-2.2), 4):
                sw = _rrect(p, axis, rng.uniform(2.6, 3.4), rng.uniform(2.2, 2.8))
                if fits.contains(sw):
                    self.add_object(
                        sw,
                        roof + 2.6,
                        b.color * rng.uniform(0.9, 1.05),
                        bid,
                        kind="stairwell",
                    )
                    break
        # tanks in one or two clusters
        for _ in range(int(rng.integers(1, 3))):
            p0 = self.sample_in(inner, 1)
            if not len(p0):
                break
            n = int(rng.integers(1, 5 if area < 120 else 7))
            step = perp if rng.random() < 0.5 else axis
            pts = p0[0] + np.outer(np.arange(n) * rng.uniform(1.15, 1.45), step)
            ok = shapely.contains_xy(inner, pts[:, 0], pts[:, 1])
            col = _pick(rng, _TANK_COLORS)
            for p in pts[ok]:
                c2 = col if rng.random() < 0.75 else _pick(rng, _TANK_COLORS)
                self.add_object(
                    _disc(p, rng.uniform(0.45, 0.7)),
                    roof + rng.uniform(1.0, 1.7),
                    c2,
                    bid,
                    kind="tank",
                )
        if rng.random() < 0.45:
            for p in self.sample_in(inner.buffer(-0.6), int(rng.integers(1, 3))):
                self.add_heater(p, axis, roof, bid)
        for p in self.sample_in(inner, int(rng.poisson(0.7))):
            self.add_object(
                _disc(p, rng.uniform(0.35, 0.5)),
                roof + 1.1,
                _c(0.70, 0.70, 0.69),
                bid,
                kind="dish",
            )
        for p in self.sample_in(inner, int(rng.poisson(area / 90.0))):
            col = np.clip(
                b.color * rng.uniform(0.3, 1.5) + rng.normal(0, 0.05, 3), 0.03, 0.85
            )
            self.add_object(
                _rrect(p, axis, rng.uniform(0.4, 1.6), rng.uniform(0.4, 1.0)),
                roof + rng.uniform(0.2, 0.6),
                col,
                bid,
                kind="junk",
            )

    # -- damage ----------------------------------------------------------
    def spill(
        self, poly: Polygon, reach: tuple[float, float], keep_out: BaseGeometry
    ) -> BaseGeometry:
        rng = self.rng
        ring = poly.exterior
        n = max(8, int(ring.length / 2.5))
        pts = [
            ring.interpolate(d) for d in np.linspace(0, ring.length, n, endpoint=False)
        ]
        rad = rng.uniform(*reach, size=n)
        rad = ndimage.uniform_filter1d(rad, 3, mode="wrap")
        env = shapely.union_all(
            [p.buffer(r, quad_segs=4) for p, r in zip(pts, rad, strict=True)]
        )
        return env.difference(poly).difference(keep_out)

    def damage(self) -> None:
        rng = self.rng
        dmg = self.w.damage
        blds = self.w.buildings
        solid = shapely.union_all([b.poly for b in blds])
        market = self.market_poly
        crater = Point(_SITE_MARKET).buffer(5.6, quad_segs=16)
        dmg.append(
            _Damage(
                market.difference(crater),
                "destroyed",
                "market_block",
                "market",
                "market",
                list(self.market_shops),
            )
        )
        dmg.append(
            _Damage(
                crater,
                "destroyed",
                "crater",
                "market",
                "crater",
                [],
                {"c": _SITE_MARKET, "r": 4.1},
            )
        )
        keep = shapely.union_all(
            [solid, self.veg.buffer(1.5), self.garage.buffer(1.5), crater]
        )
        dmg.append(
            _Damage(
                self.spill(market, (2.5, 7.0), keep),
                "destroyed",
                "debris",
                "market",
                "spill",
                [],
                {"src": market},
            )
        )
        r1 = blds[self.resid["R1"] - 1].poly
        dmg.append(
            _Damage(
                r1,
                "destroyed",
                "residential_block",
                "residential",
                "collapse",
                [self.resid["R1"]],
            )
        )
        dmg.append(
            _Damage(
                self.spill(r1, (3.0, 8.5), solid),
                "destroyed",
                "debris",
                "residential",
                "spill",
                [],
                {"src": r1},
            )
        )
        r2 = blds[self.resid["R2"] - 1]
        dmg.append(
            _Damage(
                r2.poly,
                "severe",
                "residential_block",
                "residential",
                "partial",
                [self.resid["R2"]],
                {"toward": np.asarray(_SITE_RESID)},
            )
        )
        dmg.append(
            _Damage(
                blds[self.resid["R3"] - 1].poly,
                "moderate",
                "residential_block",
                "residential",
                "holes",
                [self.resid["R3"]],
            )
        )
        dmg.append(
            _Damage(
                blds[self.kg_bid - 1].poly,
                "moderate",
                "building",
                "residential",
                "holes",
                [self.kg_bid],
            )
        )
        # buildings next to the market, on three sides
        picked: list[int] = []
        for side in (
            np.array([0.0, -1.0]),
            np.array([0.3, 1.0]),
            np.array([-1.0, -0.4]),
        ):
            best, best_d = 0, 1e9
            for bid in self.generic:
                b = blds[bid - 1]
                if bid in picked or not 25 < b.poly.area < 400:
                    continue
                d = b.poly.distance(market)
                cen = np.asarray(b.poly.centroid.coords[0]) - np.asarray(
                    market.centroid.coords[0]
                )
                if d < 2.0 or d > 30 or float(cen @ side) < 0.5 * np.hypot(*cen):
                    continue
                if d < best_d:
                    best, best_d = bid, d
            if best:
                picked.append(best)
                dmg.append(
                    _Damage(
                        blds[best - 1].poly,
                        "moderate",
                        "building",
                        "market",
                        "holes",
                        [best],
                    )
                )
        # two more distant buildings with possible damage
        zone = shapely.union_all([d.poly for d in dmg])
        far = []
        for bid in self.generic:
            b = blds[bid - 1]
            d = min(
                b.poly.distance(Point(_SITE_MARKET)),
                b.poly.distance(Point(_SITE_RESID)),
            )
            if 48 < d < 75 and 40 < b.poly.area < 300 and b.poly.distance(zone) > 8:
                far.append(bid)
        for bid in [far[int(i)] for i in rng.choice(len(far), size=2, replace=False)]:
            dmg.append(
                _Damage(blds[bid - 1].poly, "possible", "building", "", "light", [bid])
            )
        self.damage_zone = shapely.union_all([d.poly for d in dmg])
        self.damaged_bids = {bid for d in dmg for bid in d.bids}

    # -- vegetation ------------------------------------------------------
    def new_tree(self, x: float, y: float, r: float, h: float, kind: str) -> _Tree:
        rng = self.rng
        grow = rng.uniform(1.06, 1.22) if kind != "olive" else rng.uniform(1.02, 1.08)
        return _Tree(
            float(x),
            float(y),
            float(r),
            float(h),
            kind,
            float(grow),
            rng.normal(0, 1, 6),
            float(rng.uniform(0.8, 1.2)),
        )

    def street_trees(self) -> list[_Tree]:
        """Trees along the sidewalks of the main roads."""
        rng = self.rng
        out = []
        for p0, p1, width in self.w.streets[:40]:
            if width < 7.0:
                continue
            d = p1 - p0
            length = float(np.hypot(*d))
            t = d / max(length, 1e-9)
            nrm = np.array([-t[1], t[0]])
            for s in np.arange(4.0, length - 4.0, 11.0):
                if rng.random() < 0.45:
                    side = 1 if rng.random() < 0.5 else -1
                    p = (
                        p0
                        + t * (s + rng.uniform(-2, 2))
                        + nrm * side * (width / 2 + 1.3)
                    )
                    r, h = rng.uniform(1.5, 2.6), rng.uniform(4.0, 6.5)
                    out.append(self.new_tree(p[0], p[1], r, h, "tree"))
        return out

    def hill_trees(self) -> list[_Tree]:
        """Olive trees in loose rows on the lower slope of the castle hill, and scrub."""
        rng = self.rng
        out = []
        xs = np.arange(-12.0, _EXTENT + 12.0, 7.0)
        for k in range(7):
            for x in xs:
                y = float(_toe(x)) + 6.0 + 7.0 * k + rng.uniform(-1.5, 1.5)
                if rng.random() < 0.45 and y < _EXTENT + 14:
                    x2 = x + rng.uniform(-1.5, 1.5)
                    r, h = rng.uniform(1.4, 2.4), rng.uniform(3.0, 4.5)
                    out.append(self.new_tree(x2, y, r, h, "olive"))
        slope = self.w.hill.buffer(-4.0).intersection(box(-16, 0, 528, 528))
        for p in self.sample_in(slope, 260):
            r, h = rng.uniform(0.5, 1.2), rng.uniform(0.6, 1.5)
            out.append(self.new_tree(p[0], p[1], r, h, "shrub"))
        return out

    def trees(self) -> None:
        """Plant trees, none over buildings or near damage."""
        rng = self.rng
        cand: list[_Tree] = []
        for area, n in self.tree_spots:
            for p in self.sample_in(area, n):
                r, h = rng.uniform(1.6, 3.6), rng.uniform(4.0, 8.0)
                cand.append(self.new_tree(p[0], p[1], r, h, "tree"))
        cand.extend(self.street_trees())
        for p in self.sample_in(self.resid_yard.buffer(-2.0), 9):
            r, h = rng.uniform(1.8, 3.2), rng.uniform(5.0, 8.0)
            cand.append(self.new_tree(p[0], p[1], r, h, "tree"))
        cand.extend(self.hill_trees())
        zone = self.damage_zone.buffer(1.0)
        shapely.prepare(zone)
        solid = shapely.union_all([b.poly.buffer(-0.5) for b in self.w.buildings])
        shapely.prepare(solid)
        for t in cand:
            if solid.intersects(Point(t.x, t.y)):
                continue
            if not zone.intersects(Point(t.x, t.y).buffer(t.r * t.grow * 1.45)):
                self.w.trees.append(t)

    # -- cars, stalls and other movable things ---------------------------
    def car(
        self, c: np.ndarray, a: np.ndarray, dates: str, kind: str = "car"
    ) -> list[_Object]:
        rng = self.rng
        if kind == "car":
            length, width, top = rng.uniform(4.0, 4.8), rng.uniform(1.7, 1.9), 1.45
        elif kind == "van":
            length, width, top = rng.uniform(4.8, 5.6), 2.0, 2.1
        else:
            length, width, top = rng.uniform(7.0, 9.0), 2.35, 2.9
        col = _pick(rng, _CAR_COLORS)
        objs = [
            _Object(
                _rrect(c, a, length, width),
                top - 0.45 if kind == "car" else top,
                col,
                0,
                dates,
                kind,
            )
        ]
        if kind == "car":
            objs.append(
                _Object(
                    _rrect(c - 0.15 * a, a, 1.9, width - 0.25),
                    top,
                    col * 1.05,
                    0,
                    dates,
                    kind,
                )
            )
            objs.append(
                _Object(
                    _rrect(c + 0.95 * a, a, 0.55, width - 0.3),
                    top - 0.05,
                    _c(0.05, 0.06, 0.07),
                    0,
                    dates,
                    kind,
                )
            )
        return objs

    def vehicles(self) -> None:
        rng = self.rng
        solid = shapely.union_all(
            [b.poly for b in self.w.buildings]
            + [o.poly for o in self.w.objects if o.kind == "awning"]
        )
        keep_out = shapely.union_all(
            [
                solid,
                self.damage_zone.buffer(2.5),
                self.veg,
                self.w.hill,
                self.market_poly.buffer(6.0),
            ]
        )
        shapely.prepare(keep_out)
        placed: list[Polygon] = []
        canvas = box(-8, -8, _EXTENT + 8, _EXTENT + 8)

        def try_place(c: np.ndarray, a: np.ndarray, dates: str, kind: str) -> bool:
            objs = self.car(c, a, dates, kind)
            foot = objs[0].poly.buffer(0.4)
            if (
                not canvas.contains(foot)
                or keep_out.intersects(foot)
                or any(foot.intersects(q) for q in placed)
            ):
                return False
            placed.append(foot)
            self.w.objects.extend(objs)
            if dates != "both":
                self.w.harmless.append(
                    (_with_shadow(objs[0].poly, objs[0].top, dates), "car")
                )
            return True

        streets = self.w.streets
        for dates, count in (("both", 70), ("before", 34), ("after", 34)):
            n, tries = 0, 0
            while n < count and tries < 4000:
                tries += 1
                p0, p1, width = streets[int(rng.integers(len(streets)))]
                d = p1 - p0
                length = float(np.hypot(*d))
                if length < 8:
                    continue
                t = d / length
                nrm = np.array([-t[1], t[0]])
                off = (width / 2 - 1.2) if width >= 6.5 else rng.uniform(0.2, 1.4)
                c = (
                    p0
                    + t * rng.uniform(3, length - 3)
                    + nrm * off * (1 if rng.random() < 0.5 else -1)
                )
                n += try_place(c, t, dates, "car")
        # parking in the yard of the residential complex
        yard = self.resid_yard.buffer(-2.0)
        for dates, count in (("both", 6), ("before", 4), ("after", 4)):
            n = 0
            for p in self.sample_in(yard, 60):
                if n >= count:
                    break
                n += try_place(
                    p, self.w.buildings[self.resid["R1"] - 1].axis, dates, "car"
                )
        # the old garage lot: parked vans and minibuses, some moved
        ga = np.array([0.0, 1.0])
        slots = [
            np.array([181.0 + 4.2 * i, 290.0 + 12.5 * j])
            for i in range(7)
            for j in range(3)
        ]
        for s in slots:
            r = rng.random()
            dates = (
                "both"
                if r < 0.45
                else ("before" if r < 0.65 else ("after" if r < 0.85 else ""))
            )
            if dates:
                kind = "bus" if rng.random() < 0.3 else "van"
                try_place(s + rng.uniform(-0.3, 0.3, 2), ga, dates, kind)

    def stalls(self) -> None:
        rng = self.rng
        inner = self.veg.buffer(-1.5)
        for dates in ("before", "after"):
            placed: list[Polygon] = []
            for kind, n in (("stall", 22), ("umbrella", 12)):
                k = 0
                for p in self.sample_in(inner, 200):
                    if k >= n:
                        break
                    if kind == "stall":
                        poly = _rrect(
                            p,
                            _unit(rng.choice([0.0, 90.0]) + rng.uniform(-8, 8)),
                            rng.uniform(1.8, 3.0),
                            rng.uniform(1.2, 1.8),
                        )
                        top = rng.uniform(1.0, 2.2)
                    else:
                        poly = Point(p).buffer(rng.uniform(1.1, 1.6), quad_segs=4)
                        top = 2.4
                    if not inner.contains(poly) or any(
                        poly.intersects(q) for q in placed
                    ):
                        continue
                    placed.append(poly)
                    col = _AWNING_COLORS[int(rng.integers(8))] * rng.uniform(0.75, 1.15)
                    self.add_object(poly, top, col, dates=dates, kind=kind)
                    self.w.harmless.append((_with_shadow(poly, top, dates), kind))
                    k += 1

    def harmless_edits(self) -> None:
        """Repainted roofs and new or removed small objects, away from damage."""
        rng = self.rng
        blds = self.w.buildings
        far = [
            bid
            for bid in self.generic
            if blds[bid - 1].poly.distance(self.damage_zone) > 25
            and 60 < blds[bid - 1].poly.area < 400
            and 20 < blds[bid - 1].poly.centroid.x < 490
            and 20 < blds[bid - 1].poly.centroid.y < 420
        ]
        chosen = [far[int(i)] for i in rng.choice(len(far), size=10, replace=False)]
        paints = [
            _c(0.70, 0.70, 0.68),
            _c(0.36, 0.41, 0.50),
            _c(0.47, 0.31, 0.25),
            _c(0.19, 0.18, 0.17),
        ]
        for bid, col in zip(chosen[:4], paints, strict=True):
            blds[bid - 1].color_after = col
            self.w.harmless.append((blds[bid - 1].poly, "repainted_roof"))
        # new tanks on two roofs
        for bid in chosen[4:6]:
            b = blds[bid - 1]
            for p in self.sample_in(b.poly.buffer(-1.2), 3):
                poly = _disc(p, 0.6)
                self.add_object(
                    poly, b.height + 1.5, _c(0.05, 0.05, 0.05), bid, "after", "new_tank"
                )
                self.w.harmless.append((_with_shadow(poly, 1.5, "after"), "new_object"))
        # a removed and an added solar water heater
        for bid, dates in ((chosen[6], "before"), (chosen[7], "after")):
            b = blds[bid - 1]
            p = self.sample_in(b.poly.buffer(-2.0), 1)
            if len(p):
                objs = self.add_heater(p[0], b.axis, b.height, bid, dates)
                foot = shapely.union_all([o.poly for o in objs])
                self.w.harmless.append(
                    (
                        _with_shadow(foot, 1.5, dates),
                        "removed_object" if dates == "before" else "new_object",
                    )
                )
        # a new white tarp shelter and a removed shed in gardens / lots
        lots = [
            g
            for g, m in self.w.grounds
            if m == "lot"
            and g.area > 60
            and g.distance(self.damage_zone) > 25
            and 20 < g.centroid.x < 490
            and 20 < g.centroid.y < 420
        ]
        for k, idx in enumerate(rng.choice(len(lots), size=3, replace=False)):
            lot = lots[int(idx)]
            c, a, _, _ = _frame(lot)
            poly = _rrect(c, a, 4.0, 3.0).intersection(lot.buffer(-0.5))
            if poly.is_empty:
                continue
            dates = "after" if k != 1 else "before"
            col = (
                _c(0.78, 0.78, 0.76)
                if k == 0
                else (_c(0.35, 0.33, 0.30) if k == 1 else _c(0.58, 0.52, 0.40))
            )
            self.add_object(
                poly,
                2.2 if k < 2 else 0.9,
                col,
                0,
                dates,
                ["tent", "shed", "sand_pile"][k],
            )
            self.w.harmless.append(
                (
                    _with_shadow(poly, 2.2, dates),
                    "new_object" if dates == "after" else "removed_object",
                )
            )

    def seasonal(self) -> None:
        """Record the vegetation that greened or grew (trees, gardens, hill grass)."""
        clip = box(0, 0, _EXTENT, _EXTENT)
        for t in self.w.trees:
            if t.kind == "shrub":
                continue
            poly = _crown_polygon(t, t.r * t.grow)
            if poly.intersects(clip):
                self.w.harmless.append((poly, "vegetation"))
        for g, m in self.w.grounds:
            if m in ("garden", "lot", "yard") and g.intersects(clip):
                self.w.harmless.append((g, "vegetation"))
        hill = self.w.hill.intersection(clip)
        self.w.harmless.append((hill, "vegetation"))
        zone = self.damage_zone
        self.w.harmless = [
            (g.difference(zone) if g.intersects(zone) else g, k)
            for g, k in self.w.harmless
        ]


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _geo(g: BaseGeometry) -> dict[str, Any]:
    """GeoJSON-like mapping of a (multi)polygon, faster than __geo_interface__."""
    parts = [
        [np.asarray(r.coords).tolist() for r in (p.exterior, *p.interiors)]
        for p in _polys(g)
    ]
    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": parts[0]}
    return {"type": "MultiPolygon", "coordinates": parts}


def _burn(
    items: Iterable[tuple[BaseGeometry, int]], dtype: Any = np.int32
) -> np.ndarray:
    shapes = [(_geo(g), v) for g, v in items if not g.is_empty and g.area > 0]
    if not shapes:
        return np.zeros((_N2, _N2), dtype=dtype)
    return features.rasterize(
        shapes, out_shape=(_N2, _N2), transform=_T2, fill=0, dtype=dtype
    )


def _noise(rng: np.random.Generator, scale_px: float) -> np.ndarray:
    """Smooth Gaussian noise with unit variance and correlation length ``scale_px``."""
    f = max(1, int(scale_px // 2))
    n = _N2 // f + 4
    white = rng.standard_normal((n, n)).astype(_F32)
    sigma = scale_px / f / 2.0
    sm = ndimage.gaussian_filter(white, sigma, mode="wrap")
    sm /= _F32(
        1.0 / (2.0 * np.sqrt(np.pi) * sigma)
    )  # analytic std of filtered white noise
    if f == 1:
        return sm[:_N2, :_N2]
    return ndimage.zoom(sm, f, order=1, mode="grid-wrap", grid_mode=True)[:_N2, :_N2]


class _Textures:
    """Noise fields shared by both dates (the same physical surfaces)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.fine = _noise(rng, 1.2)
        self.grain = _noise(rng, 2.5)
        self.mid = _noise(rng, 8.0)
        self.mid2 = _noise(rng, 14.0)
        self.large = _noise(rng, 60.0)
        self.huge = _noise(rng, 180.0)
        self.speck = rng.random((_N2, _N2), dtype=_F32)
        j = np.arange(_N2, dtype=np.float64)
        self.x = (-_MARGIN_M + (j + 0.5) * _RES2).astype(_F32)  # x of columns
        self.y = self.x.copy()  # y of rows (square canvas)
        self.terrain = _terrain(
            self.x[None, :].astype(np.float64), self.y[:, None].astype(np.float64)
        ).astype(_F32)
        self.terrain += np.clip(self.terrain / 2.0, 0, 1) * (
            0.25 * self.mid + 0.15 * self.grain
        )


def _win(poly: BaseGeometry, pad: float = 1.0) -> tuple[slice, slice]:
    minx, miny, maxx, maxy = poly.bounds
    c0 = max(0, int(np.floor((minx - pad + _MARGIN_M) / _RES2)))
    c1 = min(_N2, int(np.ceil((maxx + pad + _MARGIN_M) / _RES2)) + 1)
    r0 = max(0, int(np.floor((miny - pad + _MARGIN_M) / _RES2)))
    r1 = min(_N2, int(np.ceil((maxy + pad + _MARGIN_M) / _RES2)) + 1)
    return slice(r0, r1), slice(c0, c1)


class _Canvas:
    """Albedo, height above ground and shading relief at 0.25 m."""

    def __init__(self, tex: _Textures) -> None:
        self.alb = np.zeros((3, _N2, _N2), _F32)
        self.h = np.zeros((_N2, _N2), _F32)
        self.relief = np.zeros((_N2, _N2), _F32)
        self.tex = tex

    def paint(
        self,
        mask: np.ndarray,
        rgb: np.ndarray,
        h: np.ndarray | float | None = None,
        relief: np.ndarray | float = 0.0,
        zbuf: bool = True,
        win: tuple[slice, slice] | None = None,
    ) -> None:
        """Paint where ``mask`` (in window ``win``).

        ``rgb`` is (3,) or (3, n) and ``h``/``relief`` scalars or (n,) arrays,
        n being the number of masked pixels (in C order). With ``zbuf`` a pixel
        is painted only where ``h`` is not below the current height.
        """
        sl = win if win is not None else (slice(None), slice(None))
        idx = np.nonzero(mask)
        n = idx[0].size
        if n == 0:
            return
        rgb = np.asarray(rgb, _F32)
        rgb = np.broadcast_to(rgb[:, None], (3, n)) if rgb.ndim == 1 else rgb
        hw = self.h[sl]
        rw = self.relief[sl]
        hv = None if h is None else np.broadcast_to(np.asarray(h, _F32), (n,))
        rv = np.broadcast_to(np.asarray(relief, _F32), (n,))
        if zbuf and hv is not None:
            keep = hv >= hw[idx] - 1e-3
            idx = (idx[0][keep], idx[1][keep])
            rgb, hv, rv = rgb[:, keep], hv[keep], rv[keep]
        aw = self.alb[(slice(None), *sl)]
        aw[:, idx[0], idx[1]] = rgb
        if hv is not None:
            hw[idx] = hv
            rw[idx] = rv


def _render_ground(cv: _Canvas, w: _World, date: str) -> None:
    tex = cv.tex
    green = date == "after"
    lab = _burn(((g, _GID[m]) for g, m in w.grounds), np.uint8)
    base = {
        "street": _c(0.42, 0.385, 0.33),
        "asphalt": _c(0.20, 0.20, 0.20),
        "paving": _c(0.50, 0.47, 0.42),
        "lot": _c(0.44, 0.39, 0.31),
        "garden": _c(0.38, 0.34, 0.25),
        "court": _c(0.52, 0.48, 0.42),
        "yard": _c(0.46, 0.43, 0.38),
        "gravel": _c(0.47, 0.44, 0.39),
        "path": _c(0.58, 0.53, 0.44),
        "stone": _c(0.62, 0.59, 0.53),
    }
    table = np.stack([base[m] for m in _GROUND]).astype(_F32)  # (k, 3)
    rgb = table[lab].transpose(2, 0, 1)
    t = (1.0 + 0.08 * tex.mid + 0.06 * tex.grain + 0.05 * tex.large).astype(_F32)
    # dark stains and litter on streets and lots
    stain = np.clip(tex.mid2 - 1.2, 0, 1.5).astype(_F32)
    t *= 1.0 - 0.25 * stain
    rgb *= t
    # asphalt: dust along the edges and patches
    asph = lab == _GID["asphalt"]
    dust = np.clip(0.5 + 0.6 * tex.mid2, 0, 1).astype(_F32) * 0.45
    for k, d in enumerate((0.40, 0.37, 0.32)):
        band = rgb[k]
        band[asph] = band[asph] * (1 - dust[asph]) + d * dust[asph]
    # vegetation in gardens, lots and the yard: dry in September, green in April
    veg_amt = np.zeros((_N2, _N2), _F32)
    for m, thr in (("garden", -0.6), ("lot", 0.6), ("yard", 1.4)):
        sel = lab == _GID[m]
        veg_amt[sel] = np.clip((tex.mid[sel] + 0.5 * tex.grain[sel] - thr) * 0.8, 0, 1)
    _apply_veg(rgb, veg_amt, tex, green)
    # small bright and dark specks (people, bins, stones), identical on both dates
    sp = tex.speck
    rgb[:, sp > 0.9985] *= _F32(1.6)
    rgb[:, sp < 0.0015] *= _F32(0.35)
    cv.alb[:] = rgb
    _render_hill(cv, w, green)
    cv.h[:] = 0.0
    cv.relief[:] = 0.0


def _apply_veg(rgb: np.ndarray, amt: np.ndarray, tex: _Textures, green: bool) -> None:
    sel = amt > 0
    if not sel.any():
        return
    a = amt[sel]
    if green:
        col = _c(0.15, 0.23, 0.09)
        a = np.minimum(1.0, a * 1.35)
    else:
        col = _c(0.40, 0.35, 0.24)
        a = a * 0.7
    v = (1.0 + 0.25 * tex.grain[sel] + 0.1 * tex.fine[sel]).astype(_F32)
    for k in range(3):
        band = rgb[k]
        band[sel] = band[sel] * (1 - a) + (col[k] * v) * a


def _render_hill(cv: _Canvas, w: _World, green: bool) -> None:
    tex = cv.tex
    sel = tex.terrain > 0.02
    sel &= _burn([(w.hill, 1)], np.uint8) > 0
    paths = _burn(((g, 1) for g, m in w.grounds if m == "path"), np.uint8) > 0
    sel &= ~paths
    soil = (
        np.array([0.50, 0.41, 0.32], _F32)[:, None] * (1 + 0.06 * tex.huge[sel])[None]
    )
    red = np.clip(0.5 + 0.5 * tex.large[sel], 0, 1)
    soil = (
        soil * (1 - 0.25 * red)
        + np.array([0.47, 0.31, 0.23], _F32)[:, None] * 0.25 * red
    )
    rock = np.array([0.64, 0.61, 0.55], _F32)
    rockiness = np.clip((0.8 * tex.large[sel] + 0.6 * tex.mid[sel] - 0.35) * 1.5, 0, 1)
    crack = np.clip(-tex.fine[sel] - 1.0, 0, 1) * 0.5
    t = (1 + 0.10 * tex.mid2[sel] + 0.08 * tex.grain[sel]).astype(_F32)
    grass = np.clip((0.5 - rockiness) * 1.4 + 0.35 * tex.mid2[sel], 0, 1) * np.clip(
        0.7 + 0.5 * tex.grain[sel], 0, 1
    )
    gcol = np.array([0.19, 0.27, 0.10] if green else [0.50, 0.44, 0.31], _F32)
    gw = grass * (0.95 if green else 0.6)
    for k in range(3):
        v = soil[k] * (1 - rockiness) + rock[k] * rockiness * (1 - crack)
        v = v * (1 - gw) + gcol[k] * gw * (1 + 0.2 * tex.fine[sel])
        cv.alb[k][sel] = v * t


def _render_buildings(cv: _Canvas, w: _World, date: str) -> np.ndarray:
    tex = cv.tex
    nb = len(w.buildings)
    lab = _burn((b.poly, i + 1) for i, b in enumerate(w.buildings))
    heights = np.array([0.0] + [b.height for b in w.buildings], _F32)
    cols = np.zeros((nb + 1, 3), _F32)
    for i, b in enumerate(w.buildings):
        cols[i + 1] = (
            b.color_after
            if (date == "after" and b.color_after is not None)
            else b.color
        )
    sel = lab > 0
    ids = lab[sel]
    hsel = heights[ids]
    # roof texture: mottling, fine grain, water stains, dirt near the parapets
    t = (
        1.0
        + 0.07 * tex.mid[sel]
        + 0.05 * tex.grain[sel]
        + 0.03 * tex.fine[sel]
        + 0.04 * tex.large[sel]
    )
    t -= 0.22 * np.clip(tex.mid2[sel] - 1.0, 0, 1.2)
    rgb = (cols[ids].T * t).astype(_F32)
    cv.paint(sel, rgb, hsel, 0.0, zbuf=False)
    # parapets: the rim of every roof (including courtyard rims)
    edge = np.zeros_like(sel)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge &= sel
    par = np.array([0.0] + [b.parapet for b in w.buildings], _F32)
    eids = lab[edge]
    bright = np.where(tex.speck[edge] > 0.5, 1.12, 0.9).astype(_F32)
    cv.alb[:, edge] = np.clip(cols[eids].T * bright * 1.05, 0, 0.9)
    cv.h[edge] = heights[eids] + par[eids]
    return lab


def _render_objects(cv: _Canvas, w: _World, date: str) -> None:
    tex = cv.tex
    objs = [o for o in w.objects if o.dates in ("both", date)]
    order = sorted(range(len(objs)), key=lambda i: objs[i].top)
    lab = _burn((objs[i].poly, k + 1) for k, i in enumerate(order))
    tops = np.array([0.0] + [objs[i].top for i in order], _F32)
    cols = np.zeros((len(order) + 1, 3), _F32)
    for k, i in enumerate(order):
        cols[k + 1] = objs[i].color
    sel = lab > 0
    ids = lab[sel]
    t = 1.0 + 0.05 * tex.grain[sel] + 0.03 * tex.fine[sel]
    cv.paint(sel, (cols[ids].T * t).astype(_F32), tops[ids], 0.0)


def _render_trees(cv: _Canvas, w: _World, date: str) -> None:
    tex = cv.tex
    after = date == "after"
    for tr in w.trees:
        r = tr.r * (tr.grow if after else 1.0)
        if tr.kind == "shrub":
            r = tr.r * (1.05 if after else 1.0)
        rmax = r * 2.0
        sl = _win(Point(tr.x, tr.y).buffer(rmax), 0.5)
        if sl[0].stop <= sl[0].start or sl[1].stop <= sl[1].start:
            continue
        dx = (tex.x[sl[1]][None, :] - tr.x).astype(np.float64)
        dy = (tex.y[sl[0]][:, None] - tr.y).astype(np.float64)
        rad = _crown_radius(tr, r, np.arctan2(dy, dx))
        rr = np.sqrt(dx * dx + dy * dy) / rad
        # ragged edge of the crown (reaches at most 1 / (1 - 0.15) of rad)
        rr = rr + 0.10 * np.clip(tex.grain[sl], -1.5, 1.5)
        inside = rr < 1.0
        if not inside.any():
            continue
        dome = np.sqrt(np.clip(1 - rr * rr, 0, 1))
        crown = 0.55 * min(r, 3.0)
        h = (tr.h - crown + crown * dome).astype(_F32)
        relief = (crown * dome + 0.35 * tex.fine[sl]).astype(_F32)
        foliage = np.clip(0.8 + 0.35 * tex.fine[sl] + 0.2 * tex.grain[sl], 0.25, 1.4)
        if tr.kind == "olive":
            col = _c(0.20, 0.22, 0.16) if not after else _c(0.17, 0.22, 0.13)
        elif tr.kind == "shrub":
            col = _c(0.22, 0.21, 0.14) if not after else _c(0.14, 0.20, 0.09)
        else:
            col = _c(0.17, 0.19, 0.10) if not after else _c(0.10, 0.19, 0.06)
        col = col * tr.tone
        rgb = np.stack([col[k] * foliage[inside] for k in range(3)]).astype(_F32)
        cv.paint(inside, rgb, h[inside], relief[inside], win=sl)


def _crown_radius(tr: _Tree, r: float, ang: np.ndarray) -> np.ndarray:
    """Radius of a tree crown as a function of direction (low harmonics)."""
    c = tr.coef
    k = (
        1
        + 0.10 * np.tanh(c[0]) * np.cos(2 * ang + c[1])
        + 0.07 * np.tanh(c[2]) * np.cos(3 * ang + c[3])
    )
    return r * (k + 0.05 * np.tanh(c[4]) * np.cos(5 * ang + c[5]))


def _crown_polygon(tr: _Tree, r: float) -> Polygon:
    """Polygon enclosing everything :func:`_render_trees` paints for a crown."""
    ang = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    rad = _crown_radius(tr, r, ang) / 0.85 + 0.3
    return Polygon(
        np.column_stack([tr.x + rad * np.cos(ang), tr.y + rad * np.sin(ang)])
    )


def _render_domes(cv: _Canvas, w: _World) -> None:
    tex = cv.tex
    for x, y, r, base, hd in w.domes:
        sl = _win(Point(x, y).buffer(r), 0.5)
        dx = (tex.x[sl[1]][None, :] - x).astype(np.float64)
        dy = (tex.y[sl[0]][:, None] - y).astype(np.float64)
        rr = np.sqrt(dx * dx + dy * dy) / r
        inside = rr < 1.0
        prof = hd * np.sqrt(np.clip(1 - rr * rr, 0, 1))
        col = _c(0.64, 0.64, 0.62)
        t = 1 + 0.03 * tex.grain[sl][inside]
        rgb = np.stack([col[k] * t for k in range(3)]).astype(_F32)
        cv.paint(
            inside,
            rgb,
            (base + prof)[inside].astype(_F32),
            prof[inside].astype(_F32),
            win=sl,
        )
        # finial
        cv.paint(
            rr < 0.08, _c(0.70, 0.62, 0.30), float(base + hd + 1.2), float(hd), win=sl
        )


# -- damage ---------------------------------------------------------------

_RUBBLE = [
    (_c(0.54, 0.52, 0.48), 0.26),  # light concrete
    (_c(0.44, 0.43, 0.41), 0.26),  # concrete
    (_c(0.61, 0.57, 0.50), 0.18),  # dust, plaster
    (_c(0.33, 0.32, 0.30), 0.13),  # dirty concrete
    (_c(0.13, 0.12, 0.11), 0.07),  # voids, charred
    (_c(0.38, 0.28, 0.21), 0.06),  # rust, rebar, brick
    (_c(0.70, 0.69, 0.66), 0.04),  # fresh fracture, white plaster
]
_RUBBLE_W = np.array([p for _, p in _RUBBLE]) / sum(p for _, p in _RUBBLE)
_RUBBLE_PAL = np.stack([c for c, _ in _RUBBLE])


def _rubble(
    cv: _Canvas,
    rng: np.random.Generator,
    mask: np.ndarray,
    sl: tuple[slice, slice],
    heap: np.ndarray,
    slab: float,
    colorful: float = 0.0,
    soot: float = 0.0,
) -> None:
    """Paint a collapsed structure.

    Broken slabs are the cells of a random Voronoi tessellation (scale
    ``slab`` metres), each a tilted plane with its own albedo, on top of the
    ``heap`` profile; a second, finer tessellation adds fragments. Cracks
    between slabs are dark and lower; ``soot`` blackens patches (fire),
    ``colorful`` is the share of fragments of awnings and goods.
    """
    tex = cv.tex
    if not mask.any():
        return
    yy, xx = np.nonzero(mask)
    px = tex.x[sl[1]][xx].astype(np.float64)
    py = tex.y[sl[0]][yy].astype(np.float64)
    pts = np.column_stack([px, py])
    minx, maxx, miny, maxy = px.min(), px.max(), py.min(), py.max()
    cells = []
    for scale in (slab, slab * 0.4):
        n = max(4, int((maxx - minx + 2) * (maxy - miny + 2) / scale**2 * 1.3))
        seeds = np.column_stack(
            [rng.uniform(minx - 1, maxx + 1, n), rng.uniform(miny - 1, maxy + 1, n)]
        )
        d, i = cKDTree(seeds).query(pts, k=2)
        cells.append((seeds, d, i, n))
    seeds, d, i, n = cells[0]
    tilt = rng.normal(0, 0.28, (n, 2))
    off = rng.normal(0, 0.12 * slab, n)
    col = _RUBBLE_PAL[rng.choice(len(_RUBBLE), size=n, p=_RUBBLE_W)] * rng.uniform(
        0.85, 1.15, (n, 1)
    )
    if colorful > 0:
        pick = rng.random(n) < colorful
        col[pick] = (
            np.stack([_faded(rng) for _ in range(int(pick.sum()))])
            if pick.any()
            else col[pick]
        )
    j = i[:, 0]
    z = (
        heap
        + off[j]
        + tilt[j, 0] * (px - seeds[j, 0])
        + tilt[j, 1] * (py - seeds[j, 1])
    )
    crack = (d[:, 1] - d[:, 0]) < 0.13
    rgb = col[j].T.copy()
    _, d2, i2, n2 = cells[1]
    fcol = _RUBBLE_PAL[rng.choice(len(_RUBBLE), size=n2, p=_RUBBLE_W)] * rng.uniform(
        0.8, 1.2, (n2, 1)
    )
    mix = (rng.random(n2) < 0.3)[i2[:, 0]]
    rgb[:, mix] = 0.4 * rgb[:, mix] + 0.6 * fcol[i2[mix, 0]].T
    z = z + rng.normal(0, 0.08 * slab, n2)[i2[:, 0]]
    rgb[:, crack] *= 0.55
    z[crack] -= 0.15 * slab
    # dust-covered and darker zones at a few metres, fine grain
    t = (
        1
        + 0.18 * tex.mid2[sl][mask]
        + 0.10 * tex.fine[sl][mask]
        + 0.08 * tex.grain[sl][mask]
    )
    rgb *= t
    if soot > 0:
        g = tex.mid2[sl][mask] + 0.7 * tex.large[sl][mask] + 0.4 * tex.mid[sl][mask]
        s = np.clip((g - (1.6 - 2.2 * soot)) * 0.7, 0, 0.8)
        rgb *= 1 - s
    z = np.maximum(z, 0.05).astype(_F32)
    cv.paint(mask, np.clip(rgb, 0.02, 0.85).astype(_F32), z, z, zbuf=False, win=sl)


def _edt_inside(mask: np.ndarray) -> np.ndarray:
    return (
        ndimage.distance_transform_edt(np.pad(mask, 1)).astype(np.float64)[1:-1, 1:-1]
        * _RES2
    )


def _paint_collapse(
    cv: _Canvas,
    rng: np.random.Generator,
    dmg: _Damage,
    lab: np.ndarray,
    did: int,
    w: _World,
) -> None:
    b = w.buildings[dmg.bids[0] - 1]
    sl = _win(dmg.poly, 1.0)
    mask = lab[sl] == did
    din = _edt_inside(mask)[mask]
    heap = (
        0.30
        * b.height
        * np.clip(din / 5.0, 0, 1) ** 0.6
        * (0.75 + 0.25 * cv.tex.mid[sl][mask])
    )
    _rubble(cv, rng, mask, sl, heap, slab=2.6, soot=0.15)
    # remnants: wall stubs along the outline and a corner still standing
    ring = dmg.poly.exterior
    for s in rng.uniform(0, ring.length, 7):
        p = np.asarray(ring.interpolate(s).coords[0])
        q = np.asarray(ring.interpolate(s + rng.uniform(1.5, 4.5)).coords[0])
        wall = LineString([p, q]).buffer(0.3, cap_style="flat").intersection(dmg.poly)
        wm = _burn([(wall, 1)], np.uint8)[sl] > 0
        cv.paint(
            wm & mask,
            _c(0.50, 0.48, 0.44) * rng.uniform(0.8, 1.1),
            float(rng.uniform(2.0, 6.5)),
            0.0,
            zbuf=False,
            win=sl,
        )
    c, a, length, width = _frame(dmg.poly)
    corner = np.asarray(dmg.poly.exterior.coords[int(rng.integers(4))])
    stand = _rrect(
        corner + (c - corner) * 0.22, a, length * 0.3, width * 0.35
    ).intersection(dmg.poly)
    stand = stand.intersection(_blob(corner, 0.45 * length, rng, 0.3))
    sm = (_burn([(stand, 1)], np.uint8)[sl] > 0) & mask
    t = 1 + 0.07 * cv.tex.mid[sl][sm] + 0.05 * cv.tex.grain[sl][sm]
    cv.paint(
        sm, np.outer(b.color, t).astype(_F32), b.height * 0.45, 0.0, zbuf=False, win=sl
    )


def _paint_market(
    cv: _Canvas,
    rng: np.random.Generator,
    dmg: _Damage,
    lab: np.ndarray,
    did: int,
    w: _World,
) -> None:
    sl = _win(dmg.poly, 8.0)
    mask = (lab[sl] == did) | (lab[sl] == did + 1)  # the market block and its crater
    tex = cv.tex
    px = tex.x[sl[1]][None, :]
    py = tex.y[sl[0]][:, None]
    dist = np.sqrt((px - _SITE_MARKET[0]) ** 2 + (py - _SITE_MARKET[1]) ** 2)
    shops = _burn((w.buildings[b - 1].poly, 1) for b in dmg.bids)[sl].astype(_F32)
    shops = ndimage.gaussian_filter(shops, 4.0)
    din = _edt_inside(mask)
    heap = 0.25 + np.clip(din / 2.5, 0, 1) * (0.3 + 1.5 * shops) * (
        0.75 + 0.25 * np.clip(tex.mid2[sl], -1, 1)
    )
    heap *= np.clip(0.55 + dist / 30.0, 0.55, 1.0)  # blown flatter near the impact
    # a path cleared along the central lane, the debris pushed to its sides
    u = (px - 265.0) * np.cos(np.deg2rad(-3.0)) + (py - 302.0) * np.sin(
        np.deg2rad(-3.0)
    )
    v = -(px - 265.0) * np.sin(np.deg2rad(-3.0)) + (py - 302.0) * np.cos(
        np.deg2rad(-3.0)
    )
    lane = np.exp(-((v / 2.2) ** 4)) * np.clip((np.abs(u) - 9.0) / 4.0, 0, 1)
    heap = heap * (1 - 0.8 * lane) + 0.6 * np.exp(
        -(((np.abs(v) - 3.2) / 1.2) ** 2)
    ) * np.clip((np.abs(u) - 9.0) / 4.0, 0, 1)
    _rubble(cv, rng, mask, sl, heap[mask], slab=2.0, colorful=0.07, soot=0.35)
    clear = mask & (lane > 0.5) & (tex.speck[sl] > 0.25) & (tex.mid[sl] > -0.8)
    dirt = np.stack(
        [
            0.50 * (1 + 0.1 * tex.grain[sl][clear]),
            0.47 * (1 + 0.1 * tex.grain[sl][clear]),
            0.41 * (1 + 0.1 * tex.grain[sl][clear]),
        ]
    )
    cv.paint(clear, dirt.astype(_F32), 0.05, 0.0, zbuf=False, win=sl)
    # wall stubs and pillars of the shop rows survive, mostly far from the impact
    n = 0
    while n < 34:
        p = np.array([rng.uniform(224, 306), rng.uniform(277, 327)])
        dd = float(np.hypot(*(p - np.asarray(_SITE_MARKET))))
        if dd < 12 or rng.random() > dd / 40.0:
            continue
        a = _unit(-3.0 + (90 if rng.random() < 0.4 else 0))
        wall = _rrect(p, a, rng.uniform(1.0, 4.0), 0.35).intersection(dmg.poly)
        wm = (_burn([(wall, 1)], np.uint8)[sl] > 0) & (lab[sl] == did)
        cv.paint(
            wm,
            _c(0.50, 0.48, 0.44) * rng.uniform(0.8, 1.15),
            float(rng.uniform(1.2, 3.4)),
            0.0,
            zbuf=False,
            win=sl,
        )
        n += 1


def _paint_crater(
    cv: _Canvas, rng: np.random.Generator, dmg: _Damage, lab: np.ndarray, did: int
) -> None:
    """Crater over the rubble already painted: a dark bowl, a raised rim, ejecta."""
    sl = _win(dmg.poly, 8.0)
    tex = cv.tex
    cx, cy = dmg.params["c"]
    r0 = dmg.params["r"]
    dx = tex.x[sl[1]][None, :].astype(np.float64) - cx
    dy = tex.y[sl[0]][:, None].astype(np.float64) - cy
    ang = np.arctan2(dy, dx)
    wob = (
        1
        + 0.10 * np.cos(3 * ang + 1.3)
        + 0.06 * np.cos(5 * ang + 0.4)
        + 0.05 * tex.mid[sl]
    )
    rr = np.sqrt(dx * dx + dy * dy) / (r0 * wob)
    mask = lab[sl] == did
    bowl = np.clip(1 - rr * rr, 0, 1)
    rim = 0.8 * np.exp(-(((rr - 1.0) / 0.25) ** 2)) * (0.7 + 0.3 * tex.mid2[sl])
    z = (-2.6 * bowl + rim + 0.12 * tex.grain[sl]).astype(_F32)
    h0 = cv.h[sl]
    znew = np.where(rr < 1.0, z, np.maximum(h0, z)).astype(_F32)
    soil = _c(0.20, 0.18, 0.16)
    dust = _c(0.63, 0.60, 0.54)
    tx = (1 + 0.18 * tex.fine[sl] + 0.15 * tex.grain[sl] + 0.1 * tex.mid[sl]).astype(
        _F32
    )
    inside = np.clip((1.05 - rr) / 0.15, 0, 1)
    rimw = np.exp(-(((rr - 1.12) / 0.28) ** 2)) * np.clip(
        0.6 + 0.4 * tex.mid[sl] + 0.3 * tex.grain[sl], 0, 0.9
    )
    old = cv.alb[:, sl[0], sl[1]]
    rgb = np.empty_like(old)
    for k in range(3):
        v = old[k] * (1 - inside) + soil[k] * tx * (0.75 + 0.25 * rr) * inside
        rgb[k] = v * (1 - rimw) + dust[k] * tx * rimw
    frag = (tex.speck[sl] > 0.96) & (rr < 1.0)
    rgb[:, frag] = old[:, frag]
    cv.paint(mask, rgb[:, mask], znew[mask], znew[mask], zbuf=False, win=sl)
    # ejecta rays over the surrounding rubble (inside the market polygon)
    rays = np.clip(
        np.cos(11 * ang + 0.7) * np.cos(7 * ang + 2.1) + 0.4 * tex.mid[sl] + 0.2, 0, 1
    )
    halo = np.clip((2.4 - rr) / 0.9, 0, 1) * np.clip(
        0.75 + 0.3 * tex.mid[sl] + 0.25 * tex.grain[sl], 0, 1
    )
    ej = np.maximum(np.clip((2.9 - rr) / 1.4, 0, 1) * rays * 0.7, 0.8 * halo) * np.clip(
        (rr - 1.15) / 0.2, 0, 1
    )
    ejm = (ej > 0.02) & (lab[sl] > 0)
    for k in range(3):
        band = cv.alb[k][sl]
        band[ejm] = band[ejm] * (1 - ej[ejm]) + dust[k] * tx[ejm] * ej[ejm]


def _paint_spill(
    cv: _Canvas, rng: np.random.Generator, dmg: _Damage, lab: np.ndarray, did: int
) -> None:
    sl = _win(dmg.poly, 1.0)
    mask = lab[sl] == did
    if not mask.any():
        return
    src = _burn([(dmg.params["src"], 1)], np.uint8)[sl] > 0
    dout = ndimage.distance_transform_edt(~src) * _RES2
    tex = cv.tex
    cover = (1.5 - dout / 3.0 + 0.8 * tex.mid[sl] + 0.4 * tex.grain[sl]) > 0
    m = mask & cover
    heap = (0.7 * np.exp(-dout / 2.5) * (0.8 + 0.2 * tex.mid[sl]))[m]
    _rubble(cv, rng, m, sl, heap, slab=0.9, colorful=0.03, soot=0.1)
    # dust veneer on the rest of the spill zone
    rest = mask & ~cover
    a = np.clip(0.5 - dout / 14.0, 0, 0.45)[rest]
    for k, d in enumerate((0.58, 0.55, 0.49)):
        band = cv.alb[k][sl]
        band[rest] = band[rest] * (1 - a) + d * a


def _paint_partial(
    cv: _Canvas,
    rng: np.random.Generator,
    dmg: _Damage,
    lab: np.ndarray,
    did: int,
    w: _World,
) -> float:
    b = w.buildings[dmg.bids[0] - 1]
    sl = _win(dmg.poly, 1.0)
    mask = lab[sl] == did
    tex = cv.tex
    px = tex.x[sl[1]][None, :].astype(np.float64)
    py = tex.y[sl[0]][:, None].astype(np.float64)
    c = np.asarray(dmg.poly.centroid.coords[0])
    toward = dmg.params["toward"] - c
    toward /= np.hypot(*toward)
    s = (px - c[0]) * toward[0] + (py - c[1]) * toward[1]
    f = s + 3.2 * tex.mid[sl] + 1.2 * tex.grain[sl]
    coll = mask & (f > float(np.quantile(f[mask].astype(np.float64), 0.5)))
    # no isolated pillars or specks: clean both parts morphologically
    st = np.ones((5, 5), bool)
    coll = ndimage.binary_opening(ndimage.binary_closing(coll, st), st) & mask
    lab_rest, nrest = ndimage.label(mask & ~coll)
    if nrest > 1:
        sizes = ndimage.sum_labels(
            np.ones_like(lab_rest), lab_rest, index=np.arange(1, nrest + 1)
        )
        small = np.isin(lab_rest, 1 + np.flatnonzero(sizes < 0.2 * sizes.max()))
        coll |= small
    din = _edt_inside(coll)[coll]
    heap = 3.5 + 3.5 * np.clip(din / 4.0, 0, 1) * (0.6 + 0.4 * tex.mid[sl][coll])
    _rubble(cv, rng, coll, sl, heap, slab=2.2, soot=0.25)
    # holes down into the building
    holes = coll & ((tex.mid2[sl] + 0.7 * tex.grain[sl]) > 0.9)
    cv.paint(holes, _c(0.05, 0.05, 0.05), 1.5, 0.0, zbuf=False, win=sl)
    # debris scattered on the remaining roof near the break line
    rest = mask & ~coll
    dout = ndimage.distance_transform_edt(~coll) * _RES2
    near = rest & (dout < 6.0) & (tex.speck[sl] > 0.55 + 0.07 * dout)
    frag = (
        np.stack(
            [_RUBBLE[int(k)][0] for k in rng.integers(0, 4, int(near.sum()))], axis=1
        )
        if near.any()
        else np.zeros((3, 0))
    )
    cv.paint(near, frag.astype(_F32), float(b.height + 0.3), 0.0, zbuf=False, win=sl)
    return float(coll.sum() / mask.sum())


def _paint_holes(
    cv: _Canvas,
    rng: np.random.Generator,
    dmg: _Damage,
    lab: np.ndarray,
    did: int,
    w: _World,
    light: bool,
) -> None:
    b = w.buildings[dmg.bids[0] - 1]
    sl = _win(dmg.poly, 1.0)
    mask = lab[sl] == did
    tex = cv.tex
    px = tex.x[sl[1]][None, :].astype(np.float64)
    py = tex.y[sl[0]][:, None].astype(np.float64)
    inner = dmg.poly.buffer(-1.5)
    pts: list[np.ndarray] = []
    if not inner.is_empty:
        minx, miny, maxx, maxy = inner.bounds
        cand = rng.uniform((minx, miny), (maxx, maxy), size=(60, 2))
        cand = cand[shapely.contains_xy(inner, cand[:, 0], cand[:, 1])]
        pts = list(cand[: (1 if light else int(rng.integers(1, 4)))])
    for p in pts:
        d = np.sqrt((px - p[0]) ** 2 + (py - p[1]) ** 2)
        # soot: smooth blackening around the hole
        rs = rng.uniform(2.5, 5.5) * (0.5 if light else 1.0)
        g = np.clip(1 - d / rs + 0.3 * tex.mid[sl], 0, 1) * (0.25 if light else 0.75)
        gm = mask & (g > 0)
        cv.alb[:, sl[0], sl[1]][:, gm] *= (1 - g[gm]).astype(_F32)
        if light:
            continue
        rh = rng.uniform(0.8, 1.9)
        hole = mask & (d < rh * (1 + 0.25 * tex.grain[sl]))
        cv.paint(
            hole, _c(0.05, 0.045, 0.04), float(b.height - 3.0), 0.0, zbuf=False, win=sl
        )
        ring = mask & ~hole & (d < rh * 3.0) & (tex.speck[sl] > 0.5 + 0.15 * d / rh)
        if ring.any():
            frag = np.stack(
                [_RUBBLE[int(k)][0] for k in rng.integers(0, 5, int(ring.sum()))],
                axis=1,
            )
            cv.paint(
                ring, frag.astype(_F32), float(b.height + 0.25), 0.0, zbuf=False, win=sl
            )
    # scattered fragments over the roof
    sc = (
        mask
        & (tex.speck[sl] > (0.985 if light else 0.94))
        & (cv.h[sl] <= b.height + 0.5)
    )
    if sc.any():
        frag = np.stack(
            [_RUBBLE[int(k)][0] for k in rng.integers(0, 5, int(sc.sum()))], axis=1
        )
        cv.paint(sc, frag.astype(_F32), float(b.height + 0.2), 0.0, zbuf=False, win=sl)


def _render_damage(
    cv: _Canvas, w: _World, rng: np.random.Generator, stats: dict[str, float]
) -> None:
    lab = _burn((d.poly, i + 1) for i, d in enumerate(w.damage))
    for i, d in enumerate(w.damage):
        did = i + 1
        if d.mode == "market":
            _paint_market(cv, rng, d, lab, did, w)
        elif d.mode == "crater":
            _paint_crater(cv, rng, d, lab, did)
        elif d.mode == "spill":
            _paint_spill(cv, rng, d, lab, did)
        elif d.mode == "collapse":
            _paint_collapse(cv, rng, d, lab, did, w)
        elif d.mode == "partial":
            stats["partial_collapse_fraction"] = _paint_partial(cv, rng, d, lab, did, w)
        else:
            _paint_holes(cv, rng, d, lab, did, w, light=d.mode == "light")


def _shadow(H: np.ndarray, sun: tuple[float, float], hmax: float) -> np.ndarray:
    """Cast shadows by marching over the height raster toward the sun."""
    az, el = np.deg2rad(sun[0]), np.deg2rad(sun[1])
    dc, dr = np.sin(az), -np.cos(az)  # toward the sun in (col, row)
    step = 1.0 / max(abs(dc), abs(dr))
    tan_el = np.tan(el)
    kmax = int(np.ceil(hmax / tan_el / _RES2 / step)) + 1
    pad = int(np.ceil(kmax * step)) + 2
    Hp = np.pad(H, pad, mode="edge")
    acc = np.full(H.shape, -1e9, _F32)
    n = H.shape[0]
    for k in range(1, kmax + 1):
        oc = int(round(k * step * dc))
        orow = int(round(k * step * dr))
        drop = _F32(np.hypot(oc, orow) * _RES2 * tan_el)
        view = Hp[pad + orow : pad + orow + n, pad + oc : pad + oc + n]
        np.maximum(acc, view - drop, out=acc)
    return (acc > H + 0.02).astype(_F32)


def _shade(cv: _Canvas, sun: tuple[float, float], sensor: dict[str, Any]) -> np.ndarray:
    """Radiance at 0.25 m: direct sun with cast shadows plus sky light."""
    tex = cv.tex
    H = tex.terrain + cv.h
    sh = _shadow(H, sun, float(cv.h.max()) + 1.0)
    S = (tex.terrain + cv.relief).astype(np.float64)
    gy, gx = np.gradient(S, _RES2)
    gx = np.clip(gx, -3, 3)
    gy = np.clip(gy, -3, 3)
    az, el = np.deg2rad(sun[0]), np.deg2rad(sun[1])
    s = np.array([np.sin(az) * np.cos(el), -np.cos(az) * np.cos(el), np.sin(el)])
    cosi = (-gx * s[0] - gy * s[1] + s[2]) / np.sqrt(gx * gx + gy * gy + 1.0)
    cosi = np.clip(cosi, 0, 1).astype(_F32)
    # ambient occlusion from the surrounding heights (street canyons)
    f = 4
    hs = cv.h.reshape(_N2 // f, f, _N2 // f, f).mean(axis=(1, 3))
    loc = ndimage.gaussian_filter(hs, 2.5)
    loc = ndimage.zoom(loc, f, order=1, grid_mode=True, mode="grid-constant")
    occl = np.clip((loc - cv.h) / 9.0, 0, 1)
    ao = (1.0 - 0.5 * occl).astype(_F32)
    direct = cosi * (1.0 - sh)
    rad = np.empty_like(cv.alb)
    for k in range(3):
        rad[k] = cv.alb[k] * (
            _F32(sensor["e_dir"][k]) * direct + _F32(sensor["e_sky"][k]) * ao
        )
    return rad


def _render(
    w: _World,
    tex: _Textures,
    date: str,
    rng: np.random.Generator,
    stats: dict[str, float],
) -> np.ndarray:
    cv = _Canvas(tex)
    _render_ground(cv, w, date)
    _render_buildings(cv, w, date)
    _render_objects(cv, w, date)
    _render_domes(cv, w)
    _render_trees(cv, w, date)
    if date == "after":
        _render_damage(cv, w, rng, stats)
    sun = SUN_BEFORE if date == "before" else SUN_AFTER
    rad = _shade(cv, sun, _SENSORS[date])
    return rad.reshape(3, _N1, _SS, _N1, _SS).mean(axis=(2, 4))


def _sensor(rad: np.ndarray, date: str, rng: np.random.Generator) -> np.ndarray:
    """Resample (after only), blur, colour-process, add noise and quantise."""
    s = _SENSORS[date]
    img = rad.astype(np.float64)
    if date == "after":
        img = np.stack([ndimage.shift(b, SHIFT, order=3, mode="nearest") for b in img])
    img = img[:, _MARGIN:-_MARGIN, _MARGIN:-_MARGIN]
    img = np.stack([ndimage.gaussian_filter(b, s["psf"]) for b in img])
    # pan-sharpening: luminance at full resolution, colour from a coarser band set
    lum = img.mean(axis=0)
    chroma = np.stack([ndimage.gaussian_filter(b - lum, s["chroma"]) for b in img])
    img = lum[None] + chroma
    if s["sharpen"]:
        lum = img.mean(axis=0)
        img = img + s["sharpen"] * (lum - ndimage.gaussian_filter(lum, 1.2))[None]
    v = np.clip(img * s["gain"][:, None, None] + s["offset"][:, None, None], 0, None)
    dn = 255.0 * np.minimum(v, 1.0) ** (1.0 / s["gamma"])
    a, b = s["noise"]
    dn = dn + rng.standard_normal(dn.shape) * np.sqrt(a * a + b * dn)
    return np.clip(np.rint(dn), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Vector layers
# --------------------------------------------------------------------------


def _to_utm(g: BaseGeometry) -> BaseGeometry:
    g = shapely.transform(
        g, lambda xy: np.column_stack([ORIGIN_X + xy[:, 0], ORIGIN_Y - xy[:, 1]])
    )
    if isinstance(g, Polygon):
        return orient(g, 1.0)
    if isinstance(g, MultiPolygon):
        return MultiPolygon([orient(p, 1.0) for p in g.geoms])
    return g


def _gdf(
    rows: list[dict[str, Any]], geoms: list[BaseGeometry], crs: str = CRS
) -> gpd.GeoDataFrame:
    df = gpd.GeoDataFrame(rows, geometry=geoms, crs=crs)
    return df.to_crs("EPSG:4326") if crs != "EPSG:4326" else df


def _vectors(
    w: _World,
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, gpd.GeoDataFrame, gpd.GeoDataFrame]:
    clip = box(0, 0, _EXTENT, _EXTENT)
    rows, geoms = [], []
    for i, d in enumerate(w.damage):
        rows.append(
            {"id": i + 1, "severity": d.severity, "kind": d.kind, "site": d.site}
        )
        geoms.append(_to_utm(d.poly.intersection(clip)))
    truth = _gdf(rows, geoms)
    truth["id"] = truth["id"].astype("int32")
    aoi = [
        (
            "market",
            box(
                _SITE_MARKET[0] - 85,
                _SITE_MARKET[1] - 62,
                _SITE_MARKET[0] + 85,
                _SITE_MARKET[1] + 78,
            ),
        ),
        (
            "residential",
            box(
                _SITE_RESID[0] - 78,
                _SITE_RESID[1] - 75,
                _SITE_RESID[0] + 78,
                _SITE_RESID[1] + 45,
            ),
        ),
    ]
    aois = _gdf([{"name": n} for n, _ in aoi], [_to_utm(g) for _, g in aoi])
    sites = gpd.GeoDataFrame(
        [{"name": n, "date": "2018-03-22", "uncertainty_m": 25} for n in SITES],
        geometry=[Point(v[0], v[1]) for v in SITES.values()],
        crs="EPSG:4326",
    )
    sites["uncertainty_m"] = sites["uncertainty_m"].astype("int32")
    hrows, hgeoms = [], []
    for g, k in w.harmless:
        g = g.intersection(clip)
        for p in _polys(g):
            if p.area > 0.05:
                hrows.append({"kind": k})
                hgeoms.append(_to_utm(p))
    harmless = _gdf(hrows, hgeoms)
    return truth, aois, sites, harmless


def _footprints(w: _World) -> gpd.GeoDataFrame:
    """Every building's footprint inside the scene (the map a user would bring)."""
    clip = box(0, 0, _EXTENT, _EXTENT)
    rows, geoms = [], []
    for b in w.buildings:
        g = b.poly.intersection(clip)
        if g.is_empty or g.area < 4.0:
            continue
        rows.append({"id": len(rows) + 1, "kind": b.kind})
        geoms.append(_to_utm(g))
    out = _gdf(rows, geoms)
    # Snapped to the 1e-7 degree grid the file is written with, kept valid: a few
    # composed footprints would otherwise touch themselves after rounding.
    out = out.set_geometry(shapely.set_precision(out.geometry.values, 1e-7))
    out["id"] = out["id"].astype("int32")
    return out


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _build(seed: int) -> tuple[_World, np.ndarray, np.ndarray, dict[str, float]]:
    rng = np.random.default_rng(seed)
    r_scene, r_tex, r_damage, r_before, r_after = rng.spawn(5)
    world = _SceneBuilder(r_scene).build()
    tex = _Textures(r_tex)
    stats: dict[str, float] = {}
    before = _sensor(_render(world, tex, "before", r_damage, stats), "before", r_before)
    after = _sensor(_render(world, tex, "after", r_damage, stats), "after", r_after)
    return world, before, after, stats


def generate(seed: int = DEFAULT_SEED) -> HaremSample:
    """Generate the synthetic Harem before/after pair and its vector layers.

    The function is pure: it uses only a local random generator seeded with
    ``seed``, and the same seed always gives the same result.

    Parameters
    ----------
    seed : int, optional
        Seed of the random generator (default 20180322).

    Returns
    -------
    HaremSample
        Images (3, 1024, 1024) uint8 in the grid :data:`TRANSFORM`
        (EPSG:32637), and the truth, AOI, site and harmless-change layers in
        EPSG:4326.
    """
    world, before, after, _ = _build(seed)
    truth, aois, sites, harmless = _vectors(world)
    buildings = _footprints(world)
    before.flags.writeable = False
    after.flags.writeable = False
    return HaremSample(
        before=before,
        after=after,
        transform=TRANSFORM,
        crs=CRS,
        before_date=BEFORE_DATE,
        after_date=AFTER_DATE,
        shift=SHIFT,
        truth=truth,
        aois=aois,
        sites=sites,
        harmless=harmless,
        buildings=buildings,
    )


def _write_tif(path: pathlib.Path, data: np.ndarray, date: str, sensor: str) -> None:
    profile = {
        "driver": "GTiff",
        "width": SIZE,
        "height": SIZE,
        "count": 3,
        "dtype": "uint8",
        "crs": CRS,
        "transform": TRANSFORM,
        "nodata": None,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "photometric": "RGB",
        "interleave": "pixel",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(ACQUISITION_DATE=date, SENSOR=sensor)
        for i, name in enumerate(("red", "green", "blue"), start=1):
            dst.set_band_description(i, name)


def _write_geojson(path: pathlib.Path, gdf: gpd.GeoDataFrame, layer: str) -> None:
    gdf.to_file(
        path,
        driver="GeoJSON",
        engine="pyogrio",
        layer=layer,
        COORDINATE_PRECISION=7,
        RFC7946="NO",
        WRITE_BBOX="NO",
    )


def write_sample(
    outdir: pathlib.Path, *, seed: int = DEFAULT_SEED, overwrite: bool = False
) -> dict[str, pathlib.Path]:
    """Generate the sample and write it to ``outdir``.

    Writes ``before.tif`` and ``after.tif`` (RGB uint8 GeoTIFFs, EPSG:32637,
    tiled, DEFLATE) and ``truth.geojson``, ``aois.geojson``,
    ``sites.geojson`` and ``harmless.geojson`` (EPSG:4326). Every file is
    first written under a temporary name in ``outdir`` and renamed when
    complete, so an interrupted run leaves no partial file.

    Parameters
    ----------
    outdir : pathlib.Path
        Output directory, created if needed.
    seed : int, optional
        Seed of the random generator (default 20180322).
    overwrite : bool, optional
        Replace existing files. If false (the default) and any of the files
        exists, nothing is written.

    Returns
    -------
    dict of str to pathlib.Path
        The written files by name: ``before``, ``after``, ``truth``, ``aois``,
        ``sites``, ``harmless``.

    Raises
    ------
    changedetect.errors.OutputExistsError
        If a file exists and ``overwrite`` is false.
    """
    outdir = pathlib.Path(outdir)
    paths = {name: outdir / fname for name, fname in FILE_NAMES.items()}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing)
        raise OutputExistsError(f"output exists (use --overwrite to replace): {names}")
    sample = generate(seed)
    outdir.mkdir(parents=True, exist_ok=True)
    writers: list[tuple[str, Callable[[pathlib.Path], None]]] = [
        ("before", lambda p: _write_tif(p, sample.before, BEFORE_DATE, SENSOR_BEFORE)),
        ("after", lambda p: _write_tif(p, sample.after, AFTER_DATE, SENSOR_AFTER)),
        ("truth", lambda p: _write_geojson(p, sample.truth, "truth")),
        ("aois", lambda p: _write_geojson(p, sample.aois, "aois")),
        ("sites", lambda p: _write_geojson(p, sample.sites, "sites")),
        ("harmless", lambda p: _write_geojson(p, sample.harmless, "harmless")),
        ("buildings", lambda p: _write_geojson(p, sample.buildings, "buildings")),
    ]
    for name, write in writers:
        final = paths[name]
        tmp = final.with_name(f".{final.name}.partial")
        try:
            if tmp.exists():
                tmp.unlink()
            write(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
    return paths
