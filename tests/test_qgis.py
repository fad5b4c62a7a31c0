"""The outputs of ``changedetect detect`` load and render in real QGIS.

QGIS runs in a separate process, Debian's ``/usr/bin/python3`` (the Python that
has the ``qgis`` module), on ``tests/qgis_check.py``. Without QGIS the test is
skipped, except in CI, where it must run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from changedetect.cli.main import cli

QGIS_PYTHON = "/usr/bin/python3"
CHECK = Path(__file__).with_name("qgis_check.py")
NOT_INSTALLED = "QGIS not installed (apt-get install qgis python3-qgis qgis-providers)"
RASTERS = ("after_coregistered.tif", "difference.tif", "ssim.tif", "score.tif")
VECTORS = ("damage.geojson", "aois.geojson")


def _qgis_env() -> dict[str, str]:
    # Debian's QGIS must use Debian's PROJ data and Python path, never ours.
    drop = {"PROJ_LIB", "PROJ_DATA", "PYTHONPATH", "PYTHONHOME"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["QT_QPA_PLATFORM"] = "offscreen"
    return env


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _require_qgis() -> None:
    try:
        found = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], env=_qgis_env(),
                               capture_output=True, timeout=120, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    if not found:
        if _in_ci():
            pytest.fail(NOT_INSTALLED)
        pytest.skip(NOT_INSTALLED)


@pytest.mark.qgis
def test_outputs_load_and_render_in_qgis(runner, pair, tmp_path):
    _require_qgis()
    import geopandas as gpd

    before, after = pair
    out = tmp_path / "out"
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out)])
    assert res.exit_code == 0, res.output
    layer_files = {p.name for p in out.iterdir() if p.suffix in (".tif", ".geojson")}
    assert set(RASTERS) | set(VECTORS) <= layer_files

    png = tmp_path / "qgis_render.png"
    proc = subprocess.run([QGIS_PYTHON, str(CHECK), str(out), str(png)], env=_qgis_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.stdout.strip(), f"qgis_check printed no report (exit {proc.returncode}): {proc.stderr}"
    report = json.loads(proc.stdout)
    layers = report["layers"]
    assert set(layers) == layer_files
    for name, info in layers.items():
        assert info["valid"], f"{name} is not a valid QGIS layer: {info.get('error')}"

    for name in RASTERS:
        assert layers[name]["crs"] == "EPSG:32637", name
    for name in VECTORS:
        assert layers[name]["crs"] == "EPSG:4326", name

    # The internal mask of the after image reaches QGIS as an alpha band after
    # the three colour bands, which QGIS draws as red, green, blue.
    rgb = layers["after_coregistered.tif"]
    data_bands = [b for b in rgb["bands"] if b["color_interpretation"] != "Alpha"]
    assert len(data_bands) == 3
    assert all(b["data_type"] == "Byte" for b in data_bands)
    assert rgb["band_count"] == 4
    assert rgb["bands"][3]["color_interpretation"] == "Alpha"
    assert rgb["renderer"] == "multibandcolor"
    assert rgb["rgb_bands"] == [1, 2, 3]
    for name in ("difference.tif", "ssim.tif", "score.tif"):
        info = layers[name]
        assert info["band_count"] == 1, name
        assert info["bands"][0]["data_type"] == "Float32", name
        assert info["bands"][0]["nodata"] == "nan", name  # NaN nodata recognised...
        stats = info["band1_stats"]
        assert all(isinstance(stats[k], float) for k in ("min", "max", "mean")), (name, stats)  # ...and left out

    damage = gpd.read_file(out / "damage.geojson")
    dmg = layers["damage.geojson"]
    assert len(damage) > 0
    assert dmg["feature_count"] == dmg["features_read"] == len(damage)
    assert {"id", "aoi", "area_m2", "score", "severity", "confidence"} <= set(dmg["fields"])
    assert dmg["geometry_type"] in ("Polygon", "MultiPolygon")
    assert dmg["extent"] == pytest.approx(list(damage.total_bounds), abs=1e-7)
    # QGIS places the polygons on the image: reprojected on the fly to the raster CRS
    assert dmg["extent_render_crs"] == pytest.approx(list(damage.to_crs(32637).total_bounds), abs=1.0)

    render = report["render"]
    assert render["errors"] == []
    assert (render["width"], render["height"]) == (400, 400)
    assert render["nonblank_pixels"] > 400 * 400 // 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, info in layers.items():
        assert info["render_errors"] == [], name
        assert info["render_nonblank_pixels"] > 0, f"{name} draws nothing in QGIS"
    assert proc.returncode == 0, proc.stderr

    # Opening the outputs in QGIS leaves *.aux.xml statistics beside the rasters:
    # the run must still verify.
    res = runner.invoke(cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output + res.stderr
