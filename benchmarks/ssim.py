"""Local SSIM: scikit-image vs changedetect's implementations, time and peak memory.

Compares, on 2048 x 2048 and 4096 x 4096 float32 images (Gaussian window,
sigma 1.5, the settings of the pipeline):

- ``skimage``: ``skimage.metrics.structural_similarity(full=True,
  gaussian_weights=True, use_sample_covariance=False)``;
- ``change``: :func:`changedetect.change.ssim_components` (scipy filters);
- ``fast``: :func:`changedetect.fastssim.ssim_components_fast` (OpenCV, row
  strips, one thread per CPU).

Times: per size, one subprocess runs the methods in turn for ``--repeats``
rounds (so a busy machine slows them alike) and keeps the best and the median.
Memory: each (method, size) is measured in a fresh subprocess that holds only
the inputs (loaded from .npy files): the extra peak resident memory of one call
(``ru_maxrss`` after minus before, the outputs included) and tracemalloc's peak
of numpy allocations (OpenCV's small internal row buffers are not traced). The
accuracy line compares ``fast`` with scikit-image on float64 copies of the
inputs (the exact definition) and on the float32 inputs.

Usage::

    python benchmarks/ssim.py [--repeats 5] [--out benchmarks/results/ssim.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

SIZES = (2048, 4096)
METHODS = ("skimage", "change", "fast")
SIGMA = 1.5


def make_pair(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A band-limited texture and a changed copy, float32 in [0, 1]."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(2841)
    base = ndi.gaussian_filter(rng.standard_normal((n, n), dtype=np.float32), 2.0)
    base = (base - base.min()) / (base.max() - base.min())
    after = 0.8 * base + 0.2 * rng.random((n, n), dtype=np.float32)
    after[n // 4 : n // 2, n // 4 : n // 2] = rng.random(
        (n // 4, n // 4), dtype=np.float32
    )
    return base.astype(np.float32), after.astype(np.float32)


def method_function(name: str):
    if name == "skimage":
        from skimage.metrics import structural_similarity

        def run(a, b):
            return structural_similarity(
                a,
                b,
                gaussian_weights=True,
                sigma=SIGMA,
                use_sample_covariance=False,
                data_range=1.0,
                full=True,
            )[1]
    elif name == "change":
        from changedetect.change import ssim_components

        def run(a, b):
            return ssim_components(a, b, sigma=SIGMA)[0]
    else:
        from changedetect.fastssim import ssim_components_fast

        def run(a, b):
            return ssim_components_fast(a, b, sigma=SIGMA)[0]

    return run


def load_pair(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / f"before_{n}.npy"), np.load(folder / f"after_{n}.npy")


def timing(folder: Path, n: int, repeats: int) -> dict:
    """Best and median time of every method, the methods taking turns (same load)."""
    a, b = load_pair(folder, n)
    runs = {name: method_function(name) for name in METHODS}
    for run in runs.values():
        run(a[:256, :256], b[:256, :256])  # imports, first-call costs
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(a, b)
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"best_s": min(t), "median_s": float(np.median(t))}
        for name, t in times.items()
    }


def memory(folder: Path, name: str, n: int) -> dict:
    """Extra peak memory of one call, in a fresh process holding only the inputs."""
    a, b = load_pair(folder, n)
    run = method_function(name)
    run(a[:256, :256], b[:256, :256])
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run(a, b)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    tracemalloc.start()
    run(a, b)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "extra_rss_mb": (peak_kb - base_kb) / 1024,
        "traced_peak_mb": traced / 2**20,
    }


def accuracy(folder: Path, n: int) -> dict:
    """Max |fast - skimage| against skimage on float64 and on float32 inputs."""
    from skimage.metrics import structural_similarity

    from changedetect.fastssim import ssim_components_fast

    a, b = load_pair(folder, n)
    kw = {
        "gaussian_weights": True,
        "sigma": SIGMA,
        "use_sample_covariance": False,
        "data_range": 1.0,
        "full": True,
    }
    fast = ssim_components_fast(a, b, sigma=SIGMA)[0]
    exact = structural_similarity(a.astype(np.float64), b.astype(np.float64), **kw)[1]
    sk32 = structural_similarity(a, b, **kw)[1]
    return {
        "size": n,
        "fast_vs_skimage64": float(np.abs(fast - exact).max()),
        "fast_vs_skimage32": float(np.abs(fast - sk32).max()),
        "skimage32_vs_skimage64": float(np.abs(sk32 - exact).max()),
    }


def _spawn(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _niceness() -> str:
    """How the run was prioritised, when not the default (a busy shared machine)."""
    nice = os.nice(0)
    return f", run at niceness {nice}" if nice else ""


def table(rows: list[dict], acc: dict) -> str:
    import cv2
    import scipy
    import skimage

    lines = [
        "# Local SSIM benchmark",
        "",
        f"`python benchmarks/ssim.py`, {time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPU(s) "
        f"({platform.processor() or platform.machine()}), load average at the end "
        f"{os.getloadavg()[0]:.1f}{_niceness()}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, scikit-image {skimage.__version__}, OpenCV {cv2.__version__}.",
        "",
        "Float32 inputs, Gaussian window sigma 1.5 (11 x 11), full SSIM map. Time: best (median) of "
        "the rounds, the methods taking turns; memory: extra peak resident memory of one call in a "
        "fresh process (inputs excluded, outputs included) and tracemalloc's peak of numpy allocations.",
        "",
        "| size | method | time best (median), s | speed-up vs skimage | extra peak RSS, MB | traced peak, MB | RSS vs skimage |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in SIZES:
        ref = next(r for r in rows if r["size"] == n and r["method"] == "skimage")
        for r in (r for r in rows if r["size"] == n):
            lines.append(
                f"| {n}² | {r['method']} | {r['best_s']:.3f} ({r['median_s']:.3f}) | "
                f"{ref['best_s'] / r['best_s']:.1f}x | {r['extra_rss_mb']:.0f} | {r['traced_peak_mb']:.0f} | "
                f"{r['extra_rss_mb'] / ref['extra_rss_mb']:.2f} |"
            )
    lines += [
        "",
        f"Accuracy on the {acc['size']}² pair: max |fast - skimage(float64 inputs)| = "
        f"{acc['fast_vs_skimage64']:.1e}; max |fast - skimage(float32)| = {acc['fast_vs_skimage32']:.1e}; "
        f"skimage's own float32 error, max |skimage(float32) - skimage(float64)| = "
        f"{acc['skimage32_vs_skimage64']:.1e}.",
        "",
        "methods: `skimage` = skimage.metrics.structural_similarity(full=True); `change` = "
        "changedetect.change.ssim_components (scipy.ndimage filters); `fast` = "
        "changedetect.fastssim.ssim_components_fast (OpenCV sepFilter2D in row strips, one thread per CPU).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds per size")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "ssim.md"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("TASK", "FOLDER", "ARG"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        task, folder, arg = args.child
        if task == "timing":
            result = timing(Path(folder), int(arg), args.repeats)
        elif task == "make":
            for n in SIZES:
                a, b = make_pair(n)
                np.save(Path(folder) / f"before_{n}.npy", a)
                np.save(Path(folder) / f"after_{n}.npy", b)
            result = {}
        elif task == "accuracy":
            result = accuracy(Path(folder), int(arg))
        else:
            name, n = arg.split(":")
            result = memory(Path(folder), name, int(n))
        print(json.dumps(result))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="ssim-bench-") as tmp:
        # made in a subprocess: a child inherits its parent's peak RSS, keep ours small.
        _spawn("--child", "make", tmp, "0")
        for n in SIZES:
            times = _spawn(
                "--child", "timing", tmp, str(n), "--repeats", str(args.repeats)
            )
            for name in METHODS:
                mem = _spawn("--child", "memory", tmp, f"{name}:{n}")
                rows.append({"method": name, "size": n, **times[name], **mem})
                print(
                    f"{name} {n}: {times[name]['best_s']:.3f} s, {mem['traced_peak_mb']:.0f} MB",
                    file=sys.stderr,
                )
        acc = _spawn("--child", "accuracy", tmp, str(SIZES[0]))
    text = table(rows, acc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
