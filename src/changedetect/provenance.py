"""Provenance: software versions, hashes of inputs and outputs, the run manifest.

The manifest (``manifest.json``, written last) is what lets a third party verify a
run: the SHA-256 and size of every input and output file, the resolved parameters,
the software versions, the command line, and the UTC start and end times. The times
live only here, so every other output is byte-identical between two runs.
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "changedetect-manifest/1"


def software_versions() -> dict[str, str]:
    """Versions of changedetect, Python and the libraries that shape the outputs."""
    import numpy
    import rasterio

    versions = {
        "changedetect": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "numpy": numpy.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "proj": rasterio.__proj_version__,
    }
    for dist in ("scipy", "scikit-image", "geopandas", "pyogrio", "shapely", "pyproj", "pydantic", "click", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - optional at run time
            versions[dist] = "not installed"
    return versions


def utc_now() -> str:
    """UTC time as ISO 8601 with a Z suffix, to the second."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def command_line() -> list[str]:
    """The command line as the user typed it (program name shortened)."""
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return argv


def build_manifest(
    *,
    inputs: dict[str, dict[str, Any]],
    outputs: list[dict[str, Any]],
    parameters: dict[str, Any],
    dates: dict[str, Any],
    started: str,
    finished: str,
    command: list[str],
) -> dict[str, Any]:
    """Assemble the manifest dictionary (see the module docstring)."""
    return {
        "schema": MANIFEST_SCHEMA,
        "tool": "changedetect",
        "command": command,
        "started_utc": started,
        "finished_utc": finished,
        "software": software_versions(),
        "inputs": inputs,
        "outputs": sorted(outputs, key=lambda r: r["path"]),
        "parameters": parameters,
        "dates": dates,
    }
