"""Killing a run midway (SIGTERM, Ctrl-C) leaves no partial output and no manifest.

Each test starts a real ``python -m changedetect detect`` process on a 2048 x 2048
pair (a run of about half a minute), waits until the run has started writing into
its staging folder ``.changedetect-partial-<pid>``, sends the signal and checks:
exit code 130, the one-line "interrupted" message, and that the output folder is
gone (the run created it, with its parent) or, when it existed before and
``--overwrite`` was given, is byte-identical to before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from changedetect import io
from changedetect.errors import DataError
from conftest import ORIGIN, UTM, textured

SIZE = 2048
INTERRUPTED = "changedetect: interrupted: no partial output was kept\n"
#: Names a complete run writes; the pre-existing folder holds old versions of them.
OUTPUT_NAMES = ("after_coregistered.tif", "difference.tif", "ssim.tif", "score.tif", "damage.geojson",
                "aois.geojson", "summary.json", "coregistration.json", "quicklook.png", "manifest.json")


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 2048 x 2048 3-band pair (0.5 m pixels) with a shift and a planted 20 x 20 m change."""
    folder = tmp_path_factory.mktemp("big")
    t = textured((SIZE, SIZE), seed=7)
    before = np.clip(np.stack([t, 0.9 * t + 0.05, 0.8 * t + 0.1]) * 255, 0, 255).astype(np.uint8)
    after = np.roll(before, (2, -3), axis=(1, 2))
    after[:, 1000:1040, 1000:1040] = 30
    paths = []
    for name, arr in (("before.tif", before), ("after.tif", after)):
        path = folder / name
        with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                           crs=UTM, transform=from_origin(*ORIGIN, 0.5, 0.5)) as dst:
            dst.write(arr)
        paths.append(path)
    return paths[0], paths[1]


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``root``: (bytes or None for a folder, mtime in ns)."""
    return {
        p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def start(big_pair, out: Path, *extra: str) -> subprocess.Popen:
    before, after = big_pair
    # SIGINT back to its default even when this test run was started in the background
    # (a shell then ignores it, and children inherit that): the run must see Ctrl-C.
    return subprocess.Popen(
        [sys.executable, "-m", "changedetect", "detect", str(before), str(after), "-o", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_staging(proc: subprocess.Popen, out: Path, *, ready=lambda staging: True, timeout: float = 120) -> Path:
    """Poll until the run's staging folder exists and ``ready(staging)``; return it."""
    staging = out / f".changedetect-partial-{proc.pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            pytest.fail(f"run ended (exit {proc.returncode}) before it could be interrupted:\n{stdout}{stderr}")
        try:
            if staging.is_dir() and ready(staging):
                return staging
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    proc.kill()
    proc.communicate()
    pytest.fail(f"no staging folder in {out} after {timeout} s")


def interrupt(proc: subprocess.Popen, signum: int) -> tuple[str, str]:
    proc.send_signal(signum)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the run did not stop within 120 s of the signal")
    assert proc.returncode == 130, stderr
    assert stderr == INTERRUPTED
    assert "Traceback" not in stdout + stderr
    return stdout, stderr


def test_sigterm_leaves_no_output_folder(big_pair, tmp_path):
    """SIGTERM as soon as the staging folder exists (while reading and co-registering)."""
    out = tmp_path / "case" / "out"
    proc = start(big_pair, out)
    wait_for_staging(proc, out)
    interrupt(proc, signal.SIGTERM)
    assert not out.exists()
    assert not (tmp_path / "case").exists(), "the parent folder the run created was left behind"


def test_sigint_while_writing_leaves_no_partial_file(big_pair, tmp_path):
    """Ctrl-C while the first output (a COG) is being written under its temporary name."""
    out = tmp_path / "out"
    # Without co-registration the first output is written after a few seconds.
    proc = start(big_pair, out, "--set", "coregister.enabled=false")
    staging = wait_for_staging(proc, out, ready=lambda s: any(".partial-" in p.name for p in s.iterdir()))
    assert not (out / "manifest.json").exists()
    interrupt(proc, signal.SIGINT)
    assert not staging.exists()
    assert not out.exists()


def test_interrupted_overwrite_keeps_old_outputs_byte_identical(big_pair, tmp_path):
    """--overwrite into a folder of old outputs, SIGTERM once a new output is complete but not committed."""
    out = tmp_path / "out"
    out.mkdir()
    for name in OUTPUT_NAMES:
        (out / name).write_bytes(f"old {name}\n".encode())
    (out / "notes.txt").write_text("analyst's notes\n")
    old_time = time.time() - 3600
    for p in out.iterdir():
        os.utime(p, (old_time, old_time))
    before = snapshot(out)
    proc = start(big_pair, out, "--overwrite", "--set", "coregister.enabled=false")
    wait_for_staging(proc, out, ready=lambda s: (s / "after_coregistered.tif").is_file())
    interrupt(proc, signal.SIGTERM)
    assert snapshot(out) == before


# --------------------------------------------------------------------------- the commit itself
def _staged_over_old_outputs(tmp_path: Path) -> tuple[Path, io.OutputFolder]:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("score.tif", "manifest.json"):
        (out / name).write_text(f"old {name}")
    folder = io.OutputFolder(out, overwrite=True)
    for name in ("score.tif", "summary.json", "manifest.json"):
        folder.file(name).write_text(f"new {name}")
    return out, folder


def test_signal_during_commit_is_delivered_after_it(tmp_path, monkeypatch):
    """Ctrl-C while the finished files are moved in: the move completes first."""
    out, folder = _staged_over_old_outputs(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        signal.raise_signal(signal.SIGINT)
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    # Python's own Ctrl-C handler, even if this process started with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), folder:
            folder.commit(last="manifest.json")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        name: f"new {name}" for name in ("score.tif", "summary.json", "manifest.json")
    }


def test_failed_commit_leaves_no_old_manifest(tmp_path, monkeypatch):
    """A commit that fails halfway (disk full) must not leave the old manifest vouching for a mix."""
    out, folder = _staged_over_old_outputs(tmp_path)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"), folder:
        folder.commit(last="manifest.json")
    names = {p.name for p in out.iterdir()}
    assert "manifest.json" not in names
    assert not [n for n in names if n.startswith(".changedetect-partial")]


def test_stale_staging_folder_is_never_adopted(tmp_path):
    """A staging folder left by a killed run with our process id: refused, left as it is."""
    out = tmp_path / "out"
    stale = out / f".changedetect-partial-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "score.tif").write_text("from a killed run")
    with pytest.raises(DataError, match="staging folder of an earlier, killed run exists"):
        io.OutputFolder(out, overwrite=True)
    assert (stale / "score.tif").read_text() == "from a killed run"


def test_interrupt_inside_exec_code_keeps_exit_code():
    """A signal that lands in code run by ``exec`` (dataclasses and scipy build
    functions so on first import) still ends the process with its exit code:
    CPython 3.11 kills a process with SIGINT at exit when a bare KeyboardInterrupt
    crossed ``exec``, even if it was caught."""
    program = (
        "import os, signal, sys\n"
        "from changedetect.cli.main import _interrupt\n"
        "signal.signal(signal.SIGTERM, _interrupt)\n"
        "try:\n"
        "    exec('import os, signal, time\\nos.kill(os.getpid(), signal.SIGTERM)\\ntime.sleep(5)')\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr


def test_error_while_unwinding_from_an_interrupt_is_the_interrupt(monkeypatch):
    """An import cut short by a signal fails with ImportError: still 'interrupted', exit 130."""
    from click.testing import CliRunner

    from changedetect.cli import main as cli_main

    def broken(*args, **kwargs):
        cli_main._INTERRUPTED.append(signal.SIGTERM)  # as the handler does
        raise ImportError("initialization failed")

    monkeypatch.setattr("changedetect.pipeline.run", broken)
    pipeline_file = Path(__file__).resolve().parent.parent / "pipelines" / "harem.toml"
    res = CliRunner().invoke(cli_main.cli, ["run", str(pipeline_file)])
    assert res.exit_code == 130, res.output
    assert res.stderr == INTERRUPTED
