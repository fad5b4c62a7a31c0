"""Speed and memory of ``changedetect detect`` on large images, against two references.

What it measures
----------------
For every size (``--sizes``, default 4096 and 8192 pixels square), one
before/after pair is generated (see *Data*), then three programs are run, each
in its own fresh child process, one at a time:

1. ``detect``: the tool under test, the real command
   ``changedetect -q detect BEFORE AFTER -o OUTDIR --overwrite``, as a whole
   process (start-up, reading, co-registration, detection, every output).
2. ``straightforward``: the pipeline a competent user would write with the same
   libraries (:func:`straightforward`, run as
   ``python benchmarks/performance.py _straightforward BEFORE AFTER OUTDIR``):
   read both images whole, ``rasterio.warp.reproject`` the after image onto the
   before grid (bilinear), global ``phase_cross_correlation`` (upsample 10) of
   the luminances, ``scipy.ndimage.shift``, ``match_histograms``, the magnitude
   of the colour difference, full ``structural_similarity`` of the luminances,
   Otsu thresholds, ``rasterio.features.sieve`` and ``shapes``, a GeoDataFrame
   written to GeoJSON.
3. ``floor``: read and decode both inputs completely, block by block, and do
   nothing else (``python benchmarks/performance.py _floor BEFORE AFTER``), in
   one thread: about the least time any program that reads every pixel needs.

4. ``write floor`` (after ``detect``, from its outputs): the raster outputs
   of that ``detect`` run (every ``*.tif``: the co-registered after image and
   the float32 layers), read into memory untimed, then written again as COGs
   with changedetect's own writer and options (``io.StripWriter``: DEFLATE,
   overviews) and timed (``python benchmarks/performance.py _write_floor
   DETECT_OUTDIR``): the least time any program that must deliver those files
   needs, whatever it computes.

The programs run in that order (floor, detect, write floor, straightforward)
for each size in turn. Each run is timed by wall clock (the whole process: start-up included).
Its peak resident memory is the ``ru_maxrss`` that ``os.wait4`` returns for
that child (the largest single process of its tree); the process tree's total
RSS is also sampled every 0.2 s with psutil, in case a program forks workers.
The orchestrating process imports no numerical library, so the little it
passes on to its children (Linux accounts the parent's memory at fork time to
the child's ``ru_maxrss``) is small; it is measured and reported as the
baseline RSS (a child running ``python -c pass``). A run that fails, exceeds
``--timeout`` or whose processes exceed ``--rss-limit`` (killed, to protect a
shared machine) is recorded (exit code, last line of stderr) and the benchmark
goes on. The files are in the page cache (warm) for every run. After the runs,
the damage maps are checked against the planted truth (polygon count, flagged
share, truth buildings touched), untimed.

Targets (checked at 8192², or the largest size run): ``detect`` at least 5x
faster than ``straightforward``; at least 20 Mpx/s end to end (pixels of one
image / seconds); at most 4x the time of ``floor``; peak RSS at most 1 GiB; peak
RSS growing at most 1.3x from 4096² to 8192² (4x the pixels).

Data
----
Generated, deterministic (``--seed``), cached in ``--workdir`` and reused while
the generator's parameters are unchanged. A procedural city evaluated on any
window, so it is written block by block in bounded memory: a street grid
(rotated, with lane markings and parked cars that move between the dates), lots
with buildings (flat and gable roofs, parapets, shadows), yards with grass, soil
and tree crowns, value-noise texture at several scales and per-pixel grain.
About 3 % of the buildings are destroyed in the after image (rubble spilling 1.5 m
beyond the footprint, no shadow); their footprints are written as
``truth.geojson``. The after image sees the scene shifted by a few pixels plus
a sub-pixel part (cubic resampling) through a different sensor: per-band gain,
gamma and offset, a faint haze, more blur and more noise. Both are 3-band uint8
GeoTIFF, EPSG:32637, 0.5 m pixels, tiled 512 x 512, DEFLATE, on the same grid.

Usage::

    python benchmarks/performance.py [--sizes 4096 8192] [--timeout 1800]
        [--skip-straightforward] [--rss-limit GIB] [--seed 1]
        [--workdir .benchmarks/performance] [--results benchmarks/results]

    python benchmarks/performance.py --sizes 1024 2048 --results /tmp/perf   # a quick check

Writes ``benchmarks/results/performance.json`` (every number, the commands, the
machine) and ``performance.md`` (the tables, printed too), after every size. The
straightforward pipeline needs about 5 GB at 8192² and is skipped above
``--straightforward-max-size`` (default 8192: at 16384² it would need ~20 GB).
Generating the data takes about 10 s at 4096² and 30-70 s at 8192² on 2 cores
(once: the pairs are reused); the whole run at 4096² and 8192² takes about
16 minutes with the current detector (about 10 of them in ``detect`` at 8192²).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The orchestrating process must stay small (see the docstring): numpy, rasterio
# and the rest are imported inside the functions that the child processes run.

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORKDIR = REPO / ".benchmarks" / "performance"
DEFAULT_RESULTS = HERE / "results"

GENERATOR_VERSION = 2  # bump when the generated images change
BLOCK = 512  # GeoTIFF tile and generation block
HALO = 8  # extra pixels evaluated around a block (blur, sub-pixel shift)
PIXEL_M = 0.5
CRS = "EPSG:32637"  # UTM zone 37N
ORIGIN = (470_000.0, 1_000_000.0)  # top-left corner, easting and northing (m)
# smallest polygon of the straightforward pipeline (= the detector's default)
MIN_AREA_M2 = 40.0

# Targets
TARGET_SPEEDUP = 5.0
TARGET_MPX_S = 20.0
TARGET_FLOOR_RATIO = 4.0
TARGET_RSS_MIB = 1024.0
TARGET_RSS_GROWTH = 1.3

METHODS = ("detect", "straightforward", "floor")


# =========================================================================== data
# Procedural city. Every quantity is a function of the global pixel coordinates
# (hash functions instead of stored random arrays), so any window can be
# evaluated on its own and neighbouring blocks join without seams.

# City layout, in pixels of the rotated frame (u, v)
PERIOD = 224  # street grid period (112 m)
ROAD = 28  # road width (14 m); the road occupies [0, ROAD) of each period
LOTS = 4  # lots per block side
LOT = (PERIOD - ROAD) / LOTS  # 49 px = 24.5 m
SHADOW = (-5.0, -6.0)  # shadows fall this far (x, y px) from a building


@dataclass(frozen=True)
class Params:
    """Everything that determines a generated pair (saved next to it, compared on reuse)."""

    size: int
    seed: int
    angle_deg: float  # rotation of the street grid
    # (dx, dy): pixel (r, c) of the after image shows the scene at (c + dx, r + dy)
    shift_px: tuple[float, float]
    gain: tuple[float, float, float]  # after sensor, per band
    gamma: tuple[float, float, float]
    offset: tuple[float, float, float]
    blur_before: float  # Gaussian sigma (px) of each sensor
    blur_after: float
    noise_before: float  # Gaussian noise sigma (DN)
    noise_after: float
    haze_dn: float  # amplitude of a smooth additive haze in the after image
    p_building: float = 0.8  # share of lots with a building
    p_destroyed: float = 0.03  # share of buildings destroyed in the after image
    generator: int = GENERATOR_VERSION
    pixel_m: float = PIXEL_M
    crs: str = CRS
    block: int = BLOCK


def make_params(size: int, seed: int) -> Params:
    """Draw the pair's parameters (the same for every size: the scenes are nested)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shift = rng.uniform(2.0, 5.0, 2) * rng.choice([-1.0, 1.0], 2)
    r = lambda lo, hi: tuple(round(float(x), 4) for x in rng.uniform(lo, hi, 3))  # noqa: E731
    return Params(
        size=size,
        seed=seed,
        angle_deg=round(float(rng.uniform(8.0, 35.0)), 3),
        shift_px=(round(float(shift[0]), 4), round(float(shift[1]), 4)),
        gain=r(0.9, 1.1),
        gamma=r(0.92, 1.08),
        offset=r(-8.0, 8.0),
        blur_before=0.5,
        blur_after=0.7,
        noise_before=1.5,
        noise_after=2.5,
        haze_dn=6.0,
    )


_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_K = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


def _hash(seed: int, salt: int, *coords: Any) -> Any:
    """splitmix64 of (seed, salt, integer coordinates), broadcast; uint64."""
    import numpy as np

    h = np.uint64((seed * _K[0] + salt * _K[1]) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        for i, c in enumerate(coords):
            h = h ^ (
                np.asarray(c).astype(np.int64).astype(np.uint64)
                * np.uint64(_K[(i + 2) % 4])
            )
            h = h ^ (h >> np.uint64(30))
            h = h * np.uint64(_M1)
            h = h ^ (h >> np.uint64(27))
            h = h * np.uint64(_M2)
            h = h ^ (h >> np.uint64(31))
    return h


def _unit(h: Any) -> Any:
    """Uniform float32 in [0, 1) from a hash."""
    import numpy as np

    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def value_noise(
    r0: int, c0: int, h: int, w: int, cell: int, seed: int, salt: int
) -> Any:
    """Value noise with lattice spacing ``cell`` px on a window, values in [0, 1).

    The lattice values are hashes of their global indices, and pixel (r, c)
    samples the lattice at ((r + 0.5) / cell - 0.5, (c + 0.5) / cell - 0.5) the
    same way whatever the window, so blocks join exactly. Fine lattices are
    upsampled with ``cv2.resize`` (cubic, integer factor: that exact mapping);
    coarse ones, which would upsample into huge arrays, by separable
    interpolation matrices (smoothstep weights).
    """
    import cv2
    import numpy as np

    if cell == 1:
        rows = np.arange(r0, r0 + h)[:, None]
        cols = np.arange(c0, c0 + w)[None, :]
        return _unit(_hash(seed, salt, rows, cols))
    i0, j0 = r0 // cell - 2, c0 // cell - 2  # two cells of margin: the cubic kernel
    ni, nj = (r0 + h) // cell + 3 - i0, (c0 + w) // cell + 3 - j0
    lattice = _unit(
        _hash(
            seed, salt, np.arange(i0, i0 + ni)[:, None], np.arange(j0, j0 + nj)[None, :]
        )
    )
    if cell <= 64:
        up = cv2.resize(lattice, (nj * cell, ni * cell), interpolation=cv2.INTER_CUBIC)
        oy, ox = r0 - i0 * cell, c0 - j0 * cell
        return up[oy : oy + h, ox : ox + w]

    def weights(start: int, n: int, first: int, count: int) -> Any:
        g = (np.arange(start, start + n) + 0.5) / cell - 0.5
        i = np.floor(g).astype(int)
        t = (g - i).astype(np.float32)
        f = t * t * (3 - 2 * t)
        m = np.zeros((n, count), np.float32)
        m[np.arange(n), i - first] = 1 - f
        m[np.arange(n), i + 1 - first] = f
        return m

    return weights(r0, h, i0, ni) @ lattice @ weights(c0, w, j0, nj).T


def fbm(
    r0: int, c0: int, h: int, w: int, cells: tuple[int, ...], seed: int, salt: int
) -> Any:
    """Octaves of value noise (amplitude halving with the cell), in about [0, 1]."""
    total, norm, amp = 0.0, 0.0, 1.0
    for k, cell in enumerate(cells):
        total = total + amp * value_noise(r0, c0, h, w, cell, seed, salt * 16 + k)
        norm += amp
        amp *= 0.5
    return total / norm


# Colours (RGB, DN) of the fixed materials; roofs and rubble get one colour per lot.
GROUND_LEVELS = 8  # grass -> bare soil, in steps
GRASS, SOIL = (80, 110, 55), (150, 130, 100)
PAVING, TREE, ASPHALT, MARKING = (
    (165, 160, 150),
    (45, 80, 40),
    (100, 100, 100),
    (215, 215, 210),
)
CARS = ((225, 225, 225), (30, 30, 35), (160, 160, 165), (150, 30, 30), (40, 60, 130))
ROOFS = (
    (170, 85, 70),
    (150, 150, 145),
    (205, 200, 190),
    (95, 95, 100),
    (180, 140, 110),
    (120, 130, 140),
)
RUBBLE = (140, 125, 105)


class _Lots:
    """Per-lot building parameters for the range of lots a window touches."""

    def __init__(self, p: Params, gu: Any, gv: Any) -> None:
        import numpy as np

        self.u0, self.v0 = int(gu.min()), int(gv.min())
        nu, nv = int(gu.max()) + 1 - self.u0, int(gv.max()) + 1 - self.v0
        self.nv = nv
        iu = np.arange(self.u0, self.u0 + nu)[:, None]
        iv = np.arange(self.v0, self.v0 + nv)[None, :]
        rnd = [_unit(_hash(p.seed, 100 + k, iu, iv)).ravel() for k in range(9)]
        self.n = nu * nv
        self.present = rnd[0] < p.p_building
        self.hu = 7.0 + 13.0 * rnd[1]  # half sizes (px): buildings 7-20 m wide
        self.hv = 7.0 + 13.0 * rnd[2]
        room_u, room_v = LOT / 2 - 2.0 - self.hu, LOT / 2 - 2.0 - self.hv
        self.cu = (2 * rnd[3] - 1) * room_u  # centre offset within the lot
        self.cv = (2 * rnd[4] - 1) * room_v
        self.gable = rnd[5] < 0.5
        roofs = np.array(ROOFS, np.float32)
        self.colour = roofs[(rnd[6] * len(roofs)).astype(int)] * (
            0.85 + 0.3 * rnd[7][:, None]
        )
        self.destroyed = self.present & (rnd[8] < p.p_destroyed)

    def index(self, gu: Any, gv: Any) -> Any:
        return (gu - self.u0) * self.nv + (gv - self.v0)


def _frame(p: Params, y: Any, x: Any) -> tuple[Any, Any]:
    """Rotated street frame (u, v) of pixel centres."""
    import numpy as np

    a = np.deg2rad(p.angle_deg)
    cos, sin = np.float32(np.cos(a)), np.float32(np.sin(a))
    return x * cos + y * sin, y * cos - x * sin


def _street_coords(t: Any) -> tuple[Any, Any, Any]:
    """Along one axis of the street frame: block index, position in the period, lot index, offset from the lot centre."""
    import numpy as np

    block = np.floor(t * np.float32(1 / PERIOD))
    pos = t - block * np.float32(PERIOD)
    lot = np.clip(np.floor((pos - ROAD) * np.float32(1 / LOT)), 0, LOTS - 1)
    offset = pos - ROAD - (lot + 0.5) * np.float32(LOT)
    return pos, (block * LOTS + lot).astype(np.int32), offset


def scene(p: Params, r0: int, c0: int, h: int, w: int, after: bool) -> Any:
    """The city on the window (rows r0.., cols c0..), (h, w, 3) float32, 0-255 DN.

    Each pixel gets an index into a colour table (fixed materials, then one
    roof and one rubble colour per lot) and a brightness factor; the colour
    image is made once at the end.
    """
    import numpy as np

    s = p.seed
    # buildings are evaluated on a window grown by the shadow's length, so the
    # shadow of a pixel is the building mask read a few pixels away
    sx, sy = -int(SHADOW[0]), -int(SHADOW[1])
    y = np.arange(r0, r0 + h + sy, dtype=np.float32)[:, None] + np.float32(0.5)
    x = np.arange(c0, c0 + w + sx, dtype=np.float32)[None, :] + np.float32(0.5)
    u, v = _frame(p, y, x)
    pu, gu, su = _street_coords(u)
    pv, gv, sv = _street_coords(v)
    road_big = (pu < ROAD) | (pv < ROAD)
    lots = _Lots(p, gu, gv)
    k_big = lots.index(gu, gv)
    du_big, dv_big = su - lots.cu[k_big], sv - lots.cv[k_big]
    hu_big, hv_big = lots.hu[k_big], lots.hv[k_big]
    standing = lots.present & ~lots.destroyed if after else lots.present
    in_big = (
        standing[k_big]
        & ~road_big
        & (np.abs(du_big) < hu_big)
        & (np.abs(dv_big) < hv_big)
    )
    shadow = in_big[sy:, sx:]
    crop = (slice(0, h), slice(0, w))
    u, v, pu, pv, road, k = (
        u[crop],
        v[crop],
        pu[crop],
        pv[crop],
        road_big[crop],
        k_big[crop],
    )
    du, dv, hu, hv, inside = (
        du_big[crop],
        dv_big[crop],
        hu_big[crop],
        hv_big[crop],
        in_big[crop],
    )

    # colour table: fixed materials, then roofs and rubble per lot
    fixed = [
        GRASS,
        *(
            tuple(
                g + (o - g) * i / (GROUND_LEVELS - 1)
                for g, o in zip(GRASS, SOIL, strict=True)
            )
            for i in range(1, GROUND_LEVELS)
        ),
        PAVING,
        TREE,
        ASPHALT,
        MARKING,
        *CARS,
    ]
    i_paving, i_tree, i_asphalt, i_marking, i_car = range(
        GROUND_LEVELS, GROUND_LEVELS + 5
    )
    i_roof = len(fixed)
    i_rubble = i_roof + lots.n
    table = np.concatenate(
        [
            np.array(fixed, np.float32),
            lots.colour,
            0.5 * lots.colour + 0.5 * np.array(RUBBLE, np.float32),
        ]
    )

    # ground: grass to soil by smooth noise, paved patches, tree crowns
    t = np.clip((fbm(r0, c0, h, w, (512, 128, 32), s, 1) - 0.35) * 4.0, 0, 1)
    idx = (t * (GROUND_LEVELS - 0.001)).astype(np.int32)
    idx[fbm(r0, c0, h, w, (64, 16), s, 2) > 0.62] = i_paving
    shade = np.ones((h, w), np.float32)
    canopy = fbm(r0, c0, h, w, (96, 24, 8), s, 3) > 0.64
    idx[canopy] = i_tree
    shade[canopy] = 0.6 + 0.8 * fbm(r0, c0, h, w, (6, 3), s, 4)[canopy]

    # roads: asphalt, dashed centre lines, parked cars (different on each date)
    idx[road] = i_asphalt
    shade[road] = 0.85 + 0.25 * fbm(r0, c0, h, w, (64, 8), s, 5)[road]

    def frac(t: Any, period: float) -> Any:  # position within a period (np.mod is slow)
        return t - np.floor(t * np.float32(1 / period)) * np.float32(period)

    line = ((np.abs(pv - ROAD / 2) < 0.8) & (frac(u, 16) < 8)) | (
        (np.abs(pu - ROAD / 2) < 0.8) & (frac(v, 16) < 8)
    )
    idx[line] = i_marking
    date = 7 if after else 6
    # streets along u, then streets along v
    for along, across, street in ((u, pv, v), (v, pu, u)):
        lane = np.where(
            (across > 3) & (across < 7),
            0,
            np.where((across > ROAD - 7) & (across < ROAD - 3), 1, -1),
        )
        # a car's place in its lane, one every 14 px (7 m)
        slot = np.nonzero((lane >= 0) & (frac(along, 14.0) < 9.5))
        hc = _hash(
            s,
            date,
            np.floor(along[slot] / 14.0),
            lane[slot],
            np.floor(street[slot] / PERIOD),
        )
        car = _unit(hc) < 0.15
        # the colour from other bits of the hash than the draw
        colour = (hc[car] & np.uint64(0xFFFF)).astype(int) % len(CARS)
        idx[slot[0][car], slot[1][car]] = i_car + colour
        shade[slot[0][car], slot[1][car]] = 1.0

    # buildings: shadows, then roofs (gable: two shades; flat: dark parapet)
    shade[shadow] *= 0.45
    idx[inside] = i_roof + k[inside]
    gable = lots.gable[k]
    side = np.where(hu >= hv, dv, du) > 0  # the ridge runs along the longer side
    rim = (np.abs(du) > hu - 1.5) | (np.abs(dv) > hv - 1.5)
    roof_shade = np.where(gable, np.where(side, 0.8, 1.0), np.where(rim, 0.75, 1.0))
    roof_shade *= 0.9 + 0.2 * value_noise(r0, c0, h, w, 2, s, 6)
    shade[inside] = roof_shade[inside]
    if after:
        # rubble, spilling 3 px beyond the destroyed footprints
        spill = (
            lots.destroyed[k]
            & ~road
            & (np.abs(du) < hu + 3.0)
            & (np.abs(dv) < hv + 3.0)
        )
        if spill.any():
            idx[spill] = i_rubble + k[spill]
            shade[spill] = 0.35 + 1.3 * fbm(r0, c0, h, w, (4, 2, 1), s, 8)[spill]

    # colour, then texture at every scale: broad variations, fine value noise, per-pixel grain
    shade *= 0.85 + 0.3 * fbm(r0, c0, h, w, (256, 64), s, 9)
    grain = (
        16.0 * value_noise(r0, c0, h, w, 3, s, 10)
        + 10.0 * value_noise(r0, c0, h, w, 1, s, 11)
        - 13.0
    )
    img = table[idx]
    img *= shade[..., None]
    img += grain[..., None]
    return img


def render_block(p: Params, r0: int, c0: int, h: int, w: int, after: bool) -> Any:
    """One block of the before or after image, (3, h, w) uint8, as the sensor delivers it."""
    import cv2
    import numpy as np

    H = HALO
    if after:
        dx, dy = p.shift_px
        ix, iy = int(np.floor(dx)), int(np.floor(dy))
        img = scene(p, r0 + iy - H, c0 + ix - H, h + 2 * H, w + 2 * H, after=True)
        m = np.float32([[1, 0, dx - ix], [0, 1, dy - iy]])
        img = cv2.warpAffine(
            img,
            m,
            (w + 2 * H, h + 2 * H),
            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        )
        sigma, noise = p.blur_after, p.noise_after
    else:
        img = scene(p, r0 - H, c0 - H, h + 2 * H, w + 2 * H, after=False)
        sigma, noise = p.blur_before, p.noise_before
    img = cv2.GaussianBlur(img, (0, 0), sigma)[H : H + h, H : H + w]
    if after:
        # the other sensor: gain, gamma and offset per band (a lookup table), haze
        levels = np.arange(256, dtype=np.float32) / 255.0
        q = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        img = np.empty(q.shape, np.float32)
        for b in range(3):
            table = 255.0 * levels ** p.gamma[b] * p.gain[b] + p.offset[b]
            img[..., b] = table.astype(np.float32)[q[..., b]]
        img += (p.haze_dn * fbm(r0, c0, h, w, (2048, 1024), p.seed, 12))[..., None]
    # sensor noise: a window of a stored noise tile, at a place drawn per block
    tile = _noise_tile(p.seed, after)
    rng = np.random.default_rng([p.seed, int(after), r0, c0])
    y0, x0 = (
        rng.integers(0, tile.shape[0] - h + 1),
        rng.integers(0, tile.shape[1] - w + 1),
    )
    img += tile[y0 : y0 + h, x0 : x0 + w] * np.float32(noise)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(2, 0, 1)


_NOISE: dict[tuple[int, bool], Any] = {}


def _noise_tile(seed: int, after: bool) -> Any:
    """Standard normal noise, (2 * BLOCK, 2 * BLOCK, 3) float32, drawn once per process."""
    import numpy as np

    if (seed, after) not in _NOISE:
        rng = np.random.default_rng([seed, int(after), 999])
        _NOISE[seed, after] = rng.standard_normal(
            (2 * BLOCK, 2 * BLOCK, 3), dtype=np.float32
        )
    return _NOISE[seed, after]


def _transform(p: Params) -> Any:
    from rasterio.transform import from_origin

    return from_origin(ORIGIN[0], ORIGIN[1], p.pixel_m, p.pixel_m)


def write_image(p: Params, path: Path, after: bool) -> None:
    """Write one image block by block (tiled, DEFLATE); memory: one block."""
    import rasterio
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff",
        "width": p.size,
        "height": p.size,
        "count": 3,
        "dtype": "uint8",
        "crs": p.crs,
        "transform": _transform(p),
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
        "interleave": "pixel",
        "photometric": "RGB",
    }
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, p.size, BLOCK):
            for c0 in range(0, p.size, BLOCK):
                h, w = min(BLOCK, p.size - r0), min(BLOCK, p.size - c0)
                dst.write(
                    render_block(p, r0, c0, h, w, after), window=Window(c0, r0, w, h)
                )
    tmp.replace(path)


def write_truth(p: Params, path: Path) -> int:
    """Footprints of the destroyed buildings inside the image (GeoJSON, EPSG:4326)."""
    import geopandas as gpd
    import numpy as np
    from shapely.geometry import Polygon

    n = p.size
    corners_y = np.array([0.0, 0.0, n, n])
    corners_x = np.array([0.0, n, 0.0, n])
    u, v = _frame(p, corners_y, corners_x)
    gu = np.arange(
        int(np.floor(u.min() / PERIOD)) * LOTS,
        int(np.ceil(u.max() / PERIOD)) * LOTS + LOTS,
    )
    gv = np.arange(
        int(np.floor(v.min() / PERIOD)) * LOTS,
        int(np.ceil(v.max() / PERIOD)) * LOTS + LOTS,
    )
    lots = _Lots(p, gu, gv)
    a = np.deg2rad(p.angle_deg)
    tr = _transform(p)
    polys = []
    for iu, iv in zip(*np.nonzero(lots.destroyed.reshape(-1, lots.nv)), strict=True):
        k = iu * lots.nv + iv
        lu, lv = (lots.u0 + iu) % LOTS, (lots.v0 + iv) % LOTS
        bu, bv = (lots.u0 + iu) // LOTS, (lots.v0 + iv) // LOTS
        cu = bu * PERIOD + ROAD + (lu + 0.5) * LOT + lots.cu[k]
        cv = bv * PERIOD + ROAD + (lv + 0.5) * LOT + lots.cv[k]
        ring = []
        for eu, ev in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
            uu, vv = cu + eu * lots.hu[k], cv + ev * lots.hv[k]
            px, py = uu * np.cos(a) - vv * np.sin(a), uu * np.sin(a) + vv * np.cos(a)
            ring.append(tr * (px, py))
        poly = Polygon(ring)
        c = poly.centroid
        col, row = ~tr * (c.x, c.y)
        if 20 <= col < n - 20 and 20 <= row < n - 20:
            polys.append(poly)
    gdf = gpd.GeoDataFrame({"id": range(len(polys))}, geometry=polys, crs=p.crs).to_crs(
        4326
    )
    gdf.to_file(path, driver="GeoJSON")
    return len(polys)


def pair_folder(workdir: Path, size: int, seed: int) -> Path:
    return workdir / f"pair_{size}_seed{seed}"


def generate_child(folder: Path, which: str, size: int, seed: int) -> dict:
    """Child task: write one file of a pair (``before``, ``after`` or ``truth``)."""
    p = make_params(size, seed)
    t0 = time.perf_counter()
    if which == "truth":
        n = write_truth(p, folder / "truth.geojson")
        return {"seconds": time.perf_counter() - t0, "truth_polygons": n}
    write_image(p, folder / f"{which}.tif", after=which == "after")
    return {"seconds": time.perf_counter() - t0}


# =================================================================== the programs
def straightforward(before: Path, after: Path, outdir: Path) -> dict:
    """The straightforward whole-image pipeline (run in its own process).

    What a competent user writes with the same libraries: every step on the
    whole image at once, with the libraries' own data types.
    """
    import geopandas as gpd
    import numpy as np
    import rasterio
    from rasterio.features import shapes, sieve
    from rasterio.warp import Resampling, reproject
    from scipy import ndimage as ndi
    from shapely.geometry import shape
    from skimage.exposure import match_histograms
    from skimage.filters import threshold_otsu
    from skimage.metrics import structural_similarity
    from skimage.registration import phase_cross_correlation

    stages: dict[str, float] = {}
    clock = [time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name] = round(now - clock[0], 3)
        clock[0] = now

    with rasterio.open(before) as src:
        ref = src.read()  # (3, rows, cols) uint8
        transform, crs = src.transform, src.crs
    with rasterio.open(after) as src:
        raw, raw_transform, raw_crs = src.read(), src.transform, src.crs
    stage("read")
    # the after image on the before grid
    moved = np.zeros_like(ref)
    reproject(
        raw,
        moved,
        src_transform=raw_transform,
        src_crs=raw_crs,
        dst_transform=transform,
        dst_crs=crs,
        resampling=Resampling.bilinear,
    )
    del raw
    stage("reproject")

    def luminance(img: Any) -> Any:
        return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).astype(
            np.float32
        ) / 255.0

    # global shift (phase correlation), applied band by band (bilinear)
    shift, _, _ = phase_cross_correlation(
        luminance(ref), luminance(moved), upsample_factor=10
    )
    stage("phase_correlation")
    moved = np.stack(
        [ndi.shift(band, shift, order=1, mode="nearest") for band in moved]
    )
    stage("shift")
    matched = match_histograms(
        moved.transpose(1, 2, 0), ref.transpose(1, 2, 0), channel_axis=-1
    )
    matched = matched.transpose(2, 0, 1)
    del moved
    stage("match_histograms")

    # change: colour difference and structural dissimilarity, each thresholded by Otsu
    diff = np.sqrt(
        ((matched.astype(np.float32) - ref.astype(np.float32)) ** 2).sum(axis=0)
    )
    stage("difference")
    _, ssim_map = structural_similarity(
        luminance(ref),
        luminance(matched),
        full=True,
        gaussian_weights=True,
        sigma=1.5,
        data_range=1,
    )
    stage("ssim")
    dissim = 1.0 - ssim_map
    mask = (dissim > threshold_otsu(dissim)) & (diff > threshold_otsu(diff))
    del diff, ssim_map, dissim, matched
    stage("otsu")

    # polygons of at least MIN_AREA_M2, GeoJSON in EPSG:4326 like changedetect's
    min_px = int(round(MIN_AREA_M2 / abs(transform.a * transform.e)))
    mask = sieve(mask.astype(np.uint8), size=min_px, connectivity=8)
    stage("sieve")
    geoms = [
        shape(g) for g, val in shapes(mask, mask=mask > 0, transform=transform) if val
    ]
    stage("shapes")
    gdf = gpd.GeoDataFrame({"id": range(len(geoms))}, geometry=geoms, crs=crs).to_crs(
        4326
    )
    outdir.mkdir(parents=True, exist_ok=True)
    gdf.to_file(outdir / "damage.geojson", driver="GeoJSON")
    stage("write")
    return {
        "shift_px": [round(float(x), 2) for x in shift],
        "polygons": len(geoms),
        "stages_s": stages,
    }


def read_floor(paths: list[Path]) -> dict:
    """Read and decode every block of the files (all bands), keeping nothing."""
    import rasterio

    t0 = time.perf_counter()
    values = 0
    for path in paths:
        with rasterio.open(path) as src:
            for _, window in src.block_windows(1):
                values += src.read(window=window).size
    return {"values_read": values, "read_s": round(time.perf_counter() - t0, 3)}


def write_floor(outdir: Path) -> dict:
    """Write the raster outputs of a detect run again as COGs: read them whole (not
    timed), then one ``io.StripWriter`` each (timed), as detect makes them."""
    import tempfile

    import rasterio

    from changedetect import io
    from changedetect.grid import Grid

    layers = []
    for path in sorted(outdir.glob("*.tif")):
        with rasterio.open(path) as src:
            grid = Grid(src.crs.to_wkt(), src.transform, src.width, src.height)
            masked = src.nodata is None
            valid = (src.dataset_mask() > 0) if masked else None
            layers.append((path.name, grid, src.read(), src.nodata, valid))
    seconds = 0.0
    with tempfile.TemporaryDirectory() as tmp, io.gdal_env():
        for name, grid, arr, nodata, valid in layers:
            t0 = time.perf_counter()
            writer = io.StripWriter(Path(tmp) / name, grid, count=arr.shape[0], dtype=arr.dtype.name,
                                    nodata=nodata, mask=valid is not None)
            writer.write(0, arr, valid)
            writer.finish()
            seconds += time.perf_counter() - t0
    return {"files": [name for name, *_ in layers], "write_s": round(seconds, 3)}


def check_outputs(folder: Path, damage: dict[str, Path]) -> dict:
    """Sanity check of the damage maps (not timed): polygons, area, truth buildings touched."""
    import geopandas as gpd

    truth = gpd.read_file(folder / "truth.geojson").to_crs(CRS)
    size = json.loads((folder / "params.json").read_text())["params"]["size"]
    image_m2 = (size * PIXEL_M) ** 2
    out = {}
    for name, path in damage.items():
        if not path.exists():
            continue
        d = gpd.read_file(path).to_crs(CRS)
        hit = truth.sjoin(
            d[["geometry"]], how="inner", predicate="intersects"
        ).index.unique()
        out[name] = {
            "polygons": len(d),
            "flagged_share": round(float(d.geometry.area.sum()) / image_m2, 4),
            "truth_hit": len(hit),
            "truth_total": len(truth),
        }
    return out


def machine_info() -> dict:
    """Software and hardware (a child task: it imports the libraries)."""
    import cv2
    import geopandas
    import numpy
    import psutil
    import rasterio
    import scipy
    import skimage

    import changedetect

    return {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "changedetect": changedetect.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "opencv": cv2.__version__,
        "geopandas": geopandas.__version__,
    }


def child_main(task: str, args: list[str]) -> None:
    """Entry point of the hidden child tasks; prints one JSON line."""
    if task == "_straightforward":
        result = straightforward(Path(args[0]), Path(args[1]), Path(args[2]))
    elif task == "_floor":
        result = read_floor([Path(a) for a in args])
    elif task == "_write_floor":
        result = write_floor(Path(args[0]))
    elif task == "_generate":
        result = generate_child(Path(args[0]), args[1], int(args[2]), int(args[3]))
    elif task == "_check":
        named = (a.split("=", 1) for a in args[1:])
        result = check_outputs(
            Path(args[0]), {name: Path(path) for name, path in named}
        )
    elif task == "_params":
        result = asdict(make_params(int(args[0]), int(args[1])))
    elif task == "_info":
        result = machine_info()
    else:
        raise SystemExit(f"unknown task {task}")
    print(json.dumps(result))


# ================================================================== orchestration
class Scrubber:
    """Replace this machine's folders by placeholders in recorded text."""

    def __init__(self, workdir: Path) -> None:
        pairs = {
            str(workdir): "WORKDIR",
            str(REPO) + os.sep: "",
            str(REPO): ".",
            sys.executable: "python",
            tempfile.gettempdir(): "TMP",
            str(Path.home()): "~",
        }
        cli = _changedetect_exe()
        pairs[cli] = "changedetect"
        self.pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, text: str) -> str:
        for old, new in self.pairs:
            text = text.replace(old, new)
        return text

    def command(self, cmd: list[str]) -> str:
        return self(shlex.join(cmd))


def _changedetect_exe() -> str:
    """The ``changedetect`` script of this interpreter's environment (else from PATH)."""
    import shutil

    beside = Path(sys.executable).parent / "changedetect"
    return (
        str(beside)
        if beside.exists()
        else (shutil.which("changedetect") or "changedetect")
    )


def _child(task: str, *args: str, env: dict | None = None) -> dict:
    """Run a child task to completion and return its JSON line."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), task, *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_measured(
    cmd: list[str], timeout: float, logs: Path, rss_limit_mib: float = float("inf")
) -> dict:
    """Run ``cmd`` in a fresh process (its own process group): wall time, peak RSS, outcome.

    The peak RSS is the ``ru_maxrss`` that ``os.wait4`` reports for the child
    (KiB on Linux: the largest process of its tree); a thread also samples the
    summed RSS of the whole tree every 0.2 s, for programs that fork workers,
    and kills the run if that sum exceeds ``rss_limit_mib`` (a shared machine
    must not run out of memory).
    """
    import threading

    import psutil

    logs.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs.with_suffix(".stdout"), logs.with_suffix(".stderr")
    load = os.getloadavg()[0]  # a busy shared machine shows here
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
        done = threading.Event()
        timed_out, over_limit = threading.Event(), threading.Event()
        tree_peak = [0]

        def kill(reason: threading.Event) -> None:
            reason.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this run started

        def sample() -> None:
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                return
            while not done.wait(0.2):
                try:
                    procs = [root, *root.children(recursive=True)]
                    tree_peak[0] = max(
                        tree_peak[0], sum(p.memory_info().rss for p in procs)
                    )
                except psutil.Error:
                    pass
                if tree_peak[0] > rss_limit_mib * 2**20 and not over_limit.is_set():
                    kill(over_limit)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, kill, (timed_out,))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        timer.cancel()
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        # leftovers of the group (workers that outlived their parent)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = err_path.read_text(errors="replace").strip().splitlines()
    stdout = out_path.read_text(errors="replace").strip().splitlines()
    result: dict[str, Any] = {
        "ok": proc.returncode == 0
        and not timed_out.is_set()
        and not over_limit.is_set(),
        "exit_code": proc.returncode,
        "timed_out": timed_out.is_set(),
        "rss_limit_hit": over_limit.is_set(),
        "seconds": round(seconds, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "load_average_before": round(load, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "tree_rss_sampled_mib": round(tree_peak[0] / 2**20, 1),
        "stderr_last_line": stderr[-1][:500] if stderr else "",
    }
    if stdout:
        with contextlib.suppress(json.JSONDecodeError):
            result["reported"] = json.loads(stdout[-1])
    return result


def ensure_pair(workdir: Path, size: int, seed: int) -> dict:
    """Generate the pair of this size (three children, two at a time) unless cached."""
    folder = pair_folder(workdir, size, seed)
    meta_path = folder / "params.json"
    # the parameters, computed here without numpy: make_params runs in the child too
    expected = _child("_params", str(size), str(seed))
    files = ("before.tif", "after.tif", "truth.geojson")
    if meta_path.exists() and all((folder / f).exists() for f in files):
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == expected:
            return {**meta, "cached": True}
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }  # two children share the CPUs
    script = str(Path(__file__).resolve())
    t0 = time.perf_counter()
    procs = {
        which: subprocess.Popen(
            [
                sys.executable,
                script,
                "_generate",
                str(folder),
                which,
                str(size),
                str(seed),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for which in ("before", "after")
    }
    reports = {}
    for which, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"generating {which} ({size}) failed")
        reports[which] = json.loads(out.strip().splitlines()[-1])
    reports["truth"] = _child(
        "_generate", str(folder), "truth", str(size), str(seed), env=env
    )
    meta = {
        "params": expected,
        "generation_s": round(time.perf_counter() - t0, 1),
        "truth_polygons": reports["truth"]["truth_polygons"],
        "file_mb": {f: round((folder / f).stat().st_size / 1e6, 1) for f in files},
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return {**meta, "cached": False}


def measure_size(size: int, args: argparse.Namespace, scrub: Scrubber) -> dict:
    """Generate (or reuse) the pair of one size and run the three programs on it."""
    print(f"[{size}] data ...", file=sys.stderr, flush=True)
    pair = ensure_pair(args.workdir, size, args.seed)
    folder = pair_folder(args.workdir, size, args.seed)
    before, after = str(folder / "before.tif"), str(folder / "after.tif")
    runs_dir = args.workdir / "runs" / str(size)
    script = str(Path(__file__).resolve())
    commands = {
        "floor": [sys.executable, script, "_floor", before, after],
        "detect": [
            _changedetect_exe(),
            "-q",
            "detect",
            before,
            after,
            "-o",
            str(runs_dir / "detect"),
            "--overwrite",
        ],
        "straightforward": [
            sys.executable,
            script,
            "_straightforward",
            before,
            after,
            str(runs_dir / "straightforward"),
        ],
    }
    runs: dict[str, dict] = {}
    for name in ("floor", "detect", "straightforward"):
        entry: dict[str, Any] = {"command": scrub.command(commands[name])}
        if name == "straightforward" and args.skip_straightforward:
            entry.update(ok=False, skipped="--skip-straightforward")
        elif name == "straightforward" and size > args.straightforward_max_size:
            entry.update(
                ok=False,
                skipped=f"size above --straightforward-max-size {args.straightforward_max_size}",
            )
        else:
            print(f"[{size}] {name} ...", file=sys.stderr, flush=True)
            res = run_measured(
                commands[name], args.timeout, runs_dir / name, args.rss_limit * 1024
            )
            res["stderr_last_line"] = scrub(res["stderr_last_line"])
            if res["ok"]:
                res["mpx_per_s"] = round(size * size / 1e6 / res["seconds"], 2)
            entry.update(res)
            print(
                f"[{size}] {name}: {_status(entry)}, {res['seconds']:.1f} s, "
                f"{res['peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
        runs[name] = entry
    write = {}
    if runs["detect"].get("ok"):
        print(f"[{size}] write floor ...", file=sys.stderr, flush=True)
        write = _child("_write_floor", str(runs_dir / "detect"))
        write["command"] = scrub.command(
            [sys.executable, script, "_write_floor", str(runs_dir / "detect")]
        )
    damage = {
        "detect": runs_dir / "detect" / "damage.geojson",
        "straightforward": runs_dir / "straightforward" / "damage.geojson",
    }
    ran = [f"{k}={v}" for k, v in damage.items() if runs[k].get("ok")]
    check = _child("_check", str(folder), *ran) if ran else {}
    det, sf, fl = runs["detect"], runs["straightforward"], runs["floor"]
    ratios: dict[str, Any] = {}
    if det.get("ok") and sf.get("ok"):
        ratios["straightforward_over_detect"] = round(sf["seconds"] / det["seconds"], 2)
    elif det.get("ok") and sf.get("timed_out"):  # a lower bound
        ratios["straightforward_over_detect_at_least"] = round(
            sf["seconds"] / det["seconds"], 2
        )
    if det.get("ok") and fl.get("ok"):
        ratios["detect_over_floor"] = round(det["seconds"] / fl["seconds"], 2)
        if write:
            # the least any program delivering detect's files needs: read the
            # inputs once, write the outputs once
            ratios["read_and_write_floor_s"] = round(fl["seconds"] + write["write_s"], 2)
            ratios["detect_over_read_and_write_floor"] = round(
                det["seconds"] / ratios["read_and_write_floor_s"], 2
            )
            if sf.get("ok"):
                ratios["straightforward_over_read_and_write_floor"] = round(
                    sf["seconds"] / ratios["read_and_write_floor_s"], 2
                )
    return {
        "size": size,
        "megapixels": round(size * size / 1e6, 2),
        "data": {
            "folder": scrub(str(folder)),
            **{k: v for k, v in pair.items() if k != "params"},
        },
        "runs": runs,
        "write_floor": write,
        "ratios": ratios,
        "outputs": check,
    }


def _status(run: dict) -> str:
    if run.get("skipped"):
        return "skipped"
    if run.get("timed_out"):
        return "timeout"
    if run.get("rss_limit_hit"):
        return "killed at --rss-limit"
    return "ok" if run.get("ok") else f"failed (exit {run.get('exit_code')})"


def _peak(run: dict) -> float:
    """Peak memory of a run: the largest process, or the sampled tree if larger."""
    return max(run.get("peak_rss_mib", 0.0), run.get("tree_rss_sampled_mib", 0.0))


def verdicts(sizes: list[dict]) -> list[dict]:
    """Pass/fail of every target (at 8192², else the largest size run)."""
    by = {s["size"]: s for s in sizes}
    at = 8192 if 8192 in by else max(by)
    note = "" if at == 8192 else f"at {at}² (8192² not run)"
    s = by[at]
    det, sf = s["runs"]["detect"], s["runs"]["straightforward"]
    out = []

    def add(
        target: str, value: Any, shown: str, ok: bool | None, extra: str = ""
    ) -> None:
        out.append(
            {
                "target": target,
                "size": at,
                "value": value,
                "shown": shown,
                "pass": ok,
                "note": "; ".join(x for x in (note, extra) if x),
            }
        )

    why = "" if det.get("ok") else f"detect {_status(det)}"
    # 1. speed-up over the straightforward pipeline
    r = s["ratios"]
    if "straightforward_over_detect" in r:
        v = r["straightforward_over_detect"]
        add(
            f">= {TARGET_SPEEDUP:g}x faster than straightforward",
            v,
            f"{v:.2f}x",
            v >= TARGET_SPEEDUP,
        )
    elif "straightforward_over_detect_at_least" in r:
        v = r["straightforward_over_detect_at_least"]
        add(
            f">= {TARGET_SPEEDUP:g}x faster than straightforward",
            v,
            f">= {v:.2f}x",
            True if v >= TARGET_SPEEDUP else None,
            "straightforward timed out: a lower bound",
        )
    else:
        add(
            f">= {TARGET_SPEEDUP:g}x faster than straightforward",
            None,
            "n/a",
            False if not det.get("ok") else None,
            why or f"straightforward {_status(sf)}",
        )
    # 2. throughput
    v = det.get("mpx_per_s")
    add(
        f">= {TARGET_MPX_S:g} Mpx/s end to end",
        v,
        f"{v:.2f} Mpx/s" if v else "n/a",
        (v >= TARGET_MPX_S) if v else False,
        why,
    )
    # 3. distance to the read floor
    v = r.get("detect_over_floor")
    add(
        f"within {TARGET_FLOOR_RATIO:g}x of the read floor",
        v,
        f"{v:.1f}x" if v else "n/a",
        (v <= TARGET_FLOOR_RATIO) if v else (False if not det.get("ok") else None),
        why,
    )
    # 4. peak memory
    v = _peak(det) if "peak_rss_mib" in det else None
    if det.get("ok"):
        add(
            f"peak RSS <= {TARGET_RSS_MIB:g} MiB",
            v,
            f"{v:.0f} MiB",
            v <= TARGET_RSS_MIB,
        )
    else:  # a run that did not finish: its peak so far can only prove a failure
        add(
            f"peak RSS <= {TARGET_RSS_MIB:g} MiB",
            v,
            f">= {v:.0f} MiB" if v else "n/a",
            False if v and v > TARGET_RSS_MIB else None,
            why,
        )
    # 5. memory growth with the image size
    small = (
        4096
        if (4096 in by and at == 8192)
        else (sorted(by)[-2] if len(by) > 1 else None)
    )
    target = f"RSS growth <= {TARGET_RSS_GROWTH:g}x from 4096² to 8192²"
    if small is None:
        add(target, None, "n/a", None, "one size only")
    else:
        a, b = by[small]["runs"]["detect"], det
        extra = (
            ""
            if (small, at) == (4096, 8192)
            else f"from {small}² to {at}² ({(at / small) ** 2:.0f}x the pixels)"
        )
        if a.get("ok") and b.get("ok"):
            v = round(_peak(b) / _peak(a), 2)
            add(target, v, f"{v:.2f}x", v <= TARGET_RSS_GROWTH, extra)
        else:
            add(
                target,
                None,
                "n/a",
                False,
                "; ".join(
                    x for x in (extra, "detect did not finish at both sizes") if x
                ),
            )
    return out


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Performance: changedetect detect on large images",
        "",
        f"`{report['command']}`, {report['date']}; {m['cpu_count']} CPU(s) ({m['cpu']}), "
        f"{m['memory_gib']} GiB, load average at the end {report['load_average_end']}; Python {m['python']}, "
        f"changedetect {m['changedetect']}, numpy {m['numpy']}, scipy {m['scipy']}, scikit-image "
        f"{m['scikit-image']}, rasterio {m['rasterio']} (GDAL {m['gdal']}), OpenCV {m['opencv']}, "
        f"geopandas {m['geopandas']}.",
        "",
        "Generated pairs (see the script's docstring): 3-band uint8 GeoTIFF, EPSG:32637, 0.5 m, tiled "
        "512 x 512, DEFLATE; the after image shifted by "
        f"{report['data_params']['shift_px'][0]:+.2f}, {report['data_params']['shift_px'][1]:+.2f} px (x, y) "
        "with another sensor's radiometry; about 3 % of the buildings destroyed. Each program runs in a fresh "
        "process, one at a time, files in the page cache. Time: wall clock of the whole process (start-up "
        "included); Mpx/s: pixels of one image / time; peak RSS: `ru_maxrss` of the process "
        f"(baseline of an empty `python -c pass`: {report['baseline_rss_mib']:.0f} MiB). Timeout per run: "
        f"{report['settings']['timeout_s']:g} s; a run is killed if its processes exceed "
        f"{report['settings']['rss_limit_gib']:g} GiB.",
        "",
        "| size | program | status | time, s | Mpx/s | peak RSS, MiB | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["sizes"]:
        for name in METHODS:
            r = s["runs"][name]
            note = r.get("skipped", "")
            if not r.get("ok") and not r.get("skipped"):
                note = (
                    f"`{r.get('stderr_last_line', '')[:160]}`"
                    if r.get("stderr_last_line")
                    else ""
                )
            lines.append(
                f"| {s['size']}² | {name} | {_status(r)} | {_fmt(r.get('seconds'), '.1f')} | "
                f"{_fmt(r.get('mpx_per_s'), '.2f')} | {_fmt(_peak(r) if 'peak_rss_mib' in r else None, '.0f')} | {note} |"
            )
    lines += [
        "",
        "| size | straightforward / detect time | detect / floor time | data generation | "
        "detect: polygons, truth hit | straightforward: polygons, truth hit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["sizes"]:
        r, o, d = s["ratios"], s["outputs"], s["data"]
        sod = r.get("straightforward_over_detect")
        sod = (
            f"{sod:.2f}x"
            if sod
            else (
                f">= {r['straightforward_over_detect_at_least']:.2f}x"
                if "straightforward_over_detect_at_least" in r
                else "–"
            )
        )
        gen = f"{d['generation_s']:.0f} s" + (" (cached)" if d["cached"] else "")

        def out(name: str, o: dict = o) -> str:
            x = o.get(name)
            return f"{x['polygons']}, {x['truth_hit']}/{x['truth_total']}" if x else "–"

        lines.append(
            f"| {s['size']}² | {sod} | {_fmt(r.get('detect_over_floor'), '.2f')}"
            f"{'x' if r.get('detect_over_floor') else ''} | {gen} | {out('detect')} | {out('straightforward')} |"
        )
    floors = [s for s in report["sizes"] if s.get("write_floor")]
    if floors:
        lines += [
            "",
            "Write floor: the raster outputs of the `detect` run ("
            + ", ".join(f"`{f}`" for f in floors[0]["write_floor"]["files"])
            + ") written again as COGs from memory with changedetect's writer (`_write_floor`, in-process "
            "time of the writes only). Read + write floor: the least time any program that reads these "
            "inputs and delivers these files needs.",
            "",
            "| size | write floor, s | read + write floor, s | detect / (read + write floor) | "
            "straightforward / (read + write floor) | 5x straightforward's speed, s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for s in floors:
            r = s["ratios"]
            sf = s["runs"]["straightforward"]
            lines.append(
                f"| {s['size']}² | {s['write_floor']['write_s']:.1f} | {_fmt(r.get('read_and_write_floor_s'), '.1f')} | "
                f"{_fmt(r.get('detect_over_read_and_write_floor'), '.2f')}x | "
                f"{_fmt(r.get('straightforward_over_read_and_write_floor'), '.2f')}x | "
                f"{_fmt(sf['seconds'] / 5 if sf.get('ok') else None, '.1f')} |"
            )
    lines += [
        "",
        "## Targets",
        "",
        "| target | at | measured | result | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v in report["verdicts"]:
        res = {True: "pass", False: "**fail**", None: "not measured"}[v["pass"]]
        lines.append(
            f"| {v['target']} | {v['size']}² | {v['shown']} | {res} | {v['note']} |"
        )
    sf_stages = [
        (s["size"], s["runs"]["straightforward"].get("reported", {}).get("stages_s"))
        for s in report["sizes"]
    ]
    sf_stages = [(n, st) for n, st in sf_stages if st]
    if sf_stages:
        lines += [
            "",
            "Straightforward pipeline, time per step (s): "
            + "; ".join(
                f"{n}²: " + ", ".join(f"{k} {t:.1f}" for k, t in st.items())
                for n, st in sf_stages
            )
            + ".",
        ]
    lines += ["", "## Commands", "", "```"]
    for s in report["sizes"]:
        for name in METHODS:
            lines.append(s["runs"][name]["command"])
        if s.get("write_floor", {}).get("command"):
            lines.append(s["write_floor"]["command"])
    lines += [
        "```",
        "",
        "WORKDIR = the `--workdir` folder (default `.benchmarks/performance`, not in git).",
    ]
    return "\n".join(lines) + "\n"


def write_results(report: dict, results: Path) -> str:
    results.mkdir(parents=True, exist_ok=True)
    (results / "performance.json").write_text(
        json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    text = markdown(report)
    (results / "performance.md").write_text(text, encoding="utf-8")
    return text


def _default_rss_limit() -> float:
    """Three quarters of the physical memory, GiB."""
    return round(
        0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # hidden child tasks
        child_main(sys.argv[1], sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[4096, 8192],
        help="image sizes (pixels square)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed to each run"
    )
    parser.add_argument(
        "--skip-straightforward",
        action="store_true",
        help="do not run the straightforward pipeline",
    )
    parser.add_argument(
        "--straightforward-max-size",
        type=int,
        default=8192,
        help="skip the straightforward pipeline above this size (it needs ~5 GB at 8192²)",
    )
    parser.add_argument(
        "--rss-limit",
        type=float,
        default=_default_rss_limit(),
        help="GiB: kill a run whose processes together exceed this (3/4 of the RAM)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the generated pairs"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="cache of the generated pairs and the programs' outputs",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="folder of performance.json and performance.md",
    )
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    scrub = Scrubber(args.workdir)

    t0 = time.perf_counter()
    machine = _child("_info")
    baseline = run_measured(
        [sys.executable, "-c", "pass"], 60, args.workdir / "runs" / "baseline"
    )
    report: dict[str, Any] = {
        "benchmark": "performance",
        "command": "python benchmarks/performance.py "
        + scrub(shlex.join(sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "settings": {
            "sizes": args.sizes,
            "timeout_s": args.timeout,
            "seed": args.seed,
            "skip_straightforward": args.skip_straightforward,
            "straightforward_max_size": args.straightforward_max_size,
            "rss_limit_gib": args.rss_limit,
            "workdir": scrub(str(args.workdir)),
            "min_area_m2_straightforward": MIN_AREA_M2,
        },
        "data_params": _child("_params", str(args.sizes[0]), str(args.seed)),
        "baseline_rss_mib": baseline["peak_rss_mib"],
        "targets": {
            "speedup_over_straightforward_min": TARGET_SPEEDUP,
            "mpx_per_s_min": TARGET_MPX_S,
            "detect_over_floor_max": TARGET_FLOOR_RATIO,
            "peak_rss_mib_max": TARGET_RSS_MIB,
            "rss_growth_4096_to_8192_max": TARGET_RSS_GROWTH,
        },
        "sizes": [],
    }
    for size in sorted(args.sizes):
        report["sizes"].append(measure_size(size, args, scrub))
        report["verdicts"] = verdicts(report["sizes"])
        report["load_average_end"] = round(os.getloadavg()[0], 1)
        report["total_s"] = round(time.perf_counter() - t0, 1)
        # written after every size: a long run keeps what it measured
        text = write_results(report, args.results)
    print(text)
    print(f"benchmark took {report['total_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
