"""Quick accuracy and speed check of changedetect.coregister.

Accuracy: shifted copies of a real scene (e.g. the CC0 Landsat RGB.byte.tif
from the rasterio test data), with and without radiometric differences and a
changed patch, estimated by the whole-image method and by the window consensus.
Speed: synthetic band-limited pairs of 1024 x 1024 and 4096 x 4096 pixels.

Usage::

    python benchmarks/coregister_quick.py PATH/TO/RGB.byte.tif [--n 8] [--json out.json]
    python benchmarks/coregister_quick.py PATH/TO/RGB.byte.tif --no-timing

The shifted copy is made with a cubic spline (scipy.ndimage.shift) of the whole
scene, so the truth is known: ``moving[r + dy, c + dx] == reference[r, c]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import rasterio
from scipy import ndimage as ndi

from changedetect.coregister import estimate_shift, estimate_shift_tiles


def read_scene(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(path) as src:
        data = src.read(masked=True)
    image = np.asarray(data.filled(0), np.float32)
    valid = ~np.ma.getmaskarray(data).any(axis=0)
    return image, valid


def shifted_copy(
    image: np.ndarray, valid: np.ndarray, shift: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    moved = np.stack([ndi.shift(b, shift, order=3, mode="nearest") for b in image])
    support = ndi.shift(valid.astype(np.float32), shift, order=1, mode="constant")
    return moved, support > 0.999


def perturb(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gain, gamma, blur and noise: a different sensor and date, same ground."""
    unit = np.clip(image / 255.0, 0.0, 1.0)
    out = 200.0 * unit**0.7 + 20.0
    out = np.stack([ndi.gaussian_filter(b, 0.8) for b in out])
    return (out + rng.normal(0.0, 4.0, out.shape)).astype(np.float32)


def paste_patch(
    image: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Replace a square covering ``fraction`` of the image by another part of it."""
    rows, cols = image.shape[-2:]
    side = int(np.sqrt(fraction * rows * cols))
    r0 = int(rng.integers(0, rows - side + 1))
    c0 = int(rng.integers(0, cols - side + 1))
    donor = np.rot90(image, 2, axes=(-2, -1))
    out = image.copy()
    out[..., r0 : r0 + side, c0 : c0 + side] = donor[
        ..., r0 : r0 + side, c0 : c0 + side
    ]
    return out


def accuracy(path: Path, n: int, max_shift: float, seed: int) -> list[dict]:
    image, valid = read_scene(path)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        shift = (
            float(rng.uniform(-max_shift, max_shift)),
            float(rng.uniform(-max_shift, max_shift)),
        )
        if i == 0:
            shift = (0.3, -0.3)
        moving, moving_valid = shifted_copy(image, valid, shift)
        cases = {
            "plain": moving,
            "radiometry": perturb(moving, rng),
            "changed 35%": paste_patch(moving, 0.35, rng),
        }
        for case, mov in cases.items():
            for method in ("global", "default", "tiles"):
                start = time.perf_counter()
                kwargs = {
                    "reference_valid": valid,
                    "moving_valid": moving_valid,
                    "max_shift": 64,
                }
                if method == "tiles":
                    est = estimate_shift_tiles(image, mov, tile=128, **kwargs)
                else:
                    est = estimate_shift(
                        image, mov, consensus=method == "default", **kwargs
                    )
                seconds = time.perf_counter() - start
                err = float(np.hypot(est.dy - shift[0], est.dx - shift[1]))
                rows.append(
                    {
                        "shift": shift,
                        "case": case,
                        "method": method,
                        "result": est.method,
                        "error_px": err,
                        "reliable": est.reliable,
                        "peak_ratio": est.peak_ratio,
                        "n_inliers": est.n_inliers,
                        "seconds": seconds,
                    }
                )
    return rows


def synthetic_pair(
    n: int, shift: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft2(rng.standard_normal((n, n)).astype(np.float32))
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    spec *= np.exp(-2 * (np.pi * 1.5) ** 2 * (fy**2 + fx**2))
    ref = np.fft.irfft2(spec, s=(n, n)).astype(np.float32)
    ramp = np.exp(-2j * np.pi * (fy * shift[0] + fx * shift[1]))
    mov = np.fft.irfft2(spec * ramp, s=(n, n)).astype(np.float32)
    return ref, mov


def timing(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    shift = (7.4, -3.7)
    for n in sizes:
        ref, mov = synthetic_pair(n, shift, seed=n)
        for consensus in (False, True):
            walls, cpus, errors = [], [], []
            for _ in range(repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                est = estimate_shift(ref, mov, consensus=consensus)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
                errors.append(float(np.hypot(est.dy - shift[0], est.dx - shift[1])))
            rows.append(
                {
                    "size": n,
                    "consensus": consensus,
                    "wall_min_s": min(walls),
                    "wall_median_s": float(np.median(walls)),
                    "cpu_min_s": min(cpus),
                    "error_px": max(errors),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene", type=Path, help="a real scene, e.g. RGB.byte.tif")
    parser.add_argument("--n", type=int, default=6, help="number of random shifts")
    parser.add_argument("--max-shift", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=2841)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    rows = accuracy(args.scene, args.n, args.max_shift, args.seed)
    print(
        f"{'shift':>18} {'case':>12} {'method':>8} {'->':>7} {'error px':>9} {'reliable':>8} {'ratio':>7} {'s':>6}"
    )
    for r in rows:
        shift = f"({r['shift'][0]:.2f},{r['shift'][1]:.2f})"
        print(
            f"{shift:>18} {r['case']:>12} {r['method']:>8} {r['result']:>7} "
            f"{r['error_px']:9.4f} {r['reliable']!s:>8} {r['peak_ratio']:7.2f} {r['seconds']:6.2f}"
        )
    for method in ("global", "default", "tiles"):
        for case in ("plain", "radiometry", "changed 35%"):
            errs = [
                r["error_px"]
                for r in rows
                if r["method"] == method and r["case"] == case
            ]
            print(f"max error {method:>8} {case:>12}: {max(errs):.4f} px")
    result: dict = {"accuracy": rows}
    if not args.no_timing:
        result["timing"] = timing([1024, 4096], args.repeats)
        for r in result["timing"]:
            print(
                f"{r['size']}^2 consensus={r['consensus']!s:5}: wall min {r['wall_min_s']:.2f} s "
                f"(median {r['wall_median_s']:.2f} s), cpu {r['cpu_min_s']:.2f} s, "
                f"error {r['error_px']:.4f} px"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
