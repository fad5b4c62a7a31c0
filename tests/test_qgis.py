"""The outputs of ``changedetect detect`` load, are styled and render in real QGIS.

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


def _sites_and_truth(folder):
    import geopandas as gpd
    from shapely.geometry import Point, box

    from test_publish import CHANGE_XY

    x, y = CHANGE_XY
    sites = folder / "sites.geojson"
    truth = folder / "truth.geojson"
    gpd.GeoDataFrame({"name": ["strike"], "uncertainty_m": [10.0]}, geometry=[Point(x, y)], crs="EPSG:32637").to_file(sites)
    gpd.GeoDataFrame({"severity": ["destroyed"]}, geometry=[box(x - 5, y - 5, x + 5, y + 5)], crs="EPSG:32637").to_file(truth)
    return sites, truth


def _check_styles(layers, threshold):
    damage = layers["damage.geojson"]["style"]
    assert damage["renderer"] == "categorizedSymbol"
    assert damage["attribute"] == "severity"
    assert [c["value"] for c in damage["categories"]] == ["destroyed", "severe", "moderate", "possible"]
    assert damage["categories"][0]["symbol"]["color"][:3] == [165, 15, 21]  # dark red
    assert damage["labels_enabled"]
    assert '"confidence"' in damage["label_expression"]
    assert damage["label_buffer"]
    score = layers["score.tif"]["style"]
    assert score["renderer"] == "singlebandpseudocolor"
    assert (score["min"], score["max"]) == (0.0, 1.0)
    assert round(threshold, 4) in [s["value"] for s in score["stops"]]
    assert (layers["difference.tif"]["style"]["min"], layers["difference.tif"]["style"]["max"]) == (0.0, 0.5)
    assert (layers["ssim.tif"]["style"]["min"], layers["ssim.tif"]["style"]["max"]) == (0.0, 1.0)
    aois = layers["aois.geojson"]["style"]
    assert aois["renderer"] == "singleSymbol"
    assert aois["labels_enabled"]
    assert aois["symbol"]["layers"][0]["class"] == "SimpleFill"
    sites = layers["sites.geojson"]["style"]
    assert sites["symbol"]["layers"][0]["class"] == "SimpleMarker"
    assert '"verdict"' in sites["label_expression"]
    ties = layers["tie_points.geojson"]["style"]
    assert ties["renderer"] == "RuleRenderer"
    assert [r["else"] for r in ties["rules"]] == [False, True]
    assert set(ties["rules"][0]["symbol"]["layers"][0]["data_defined"]) == {"angle", "size"}
    for name in ("damage", "aois", "sites", "sites_uncertainty", "tie_points"):  # GeoPackage: same styles
        assert layers[f"layers.gpkg|{name}"]["style"]["renderer"] == layers[f"{name}.geojson"]["style"]["renderer"], name
    assert layers["layers.gpkg|damage"]["style"]["categories"] == damage["categories"]


def _check_project(project, before, out):
    assert project["read_ok"]
    assert project["invalid_layers"] == []
    assert project["crs"] == "EPSG:32637"
    assert project["groups"] == ["Damage assessment", "Change evidence", "Imagery"]
    tree = {t["name"]: t for t in project["tree"]}
    assert [t["name"] for t in project["tree"]] == [
        "reported sites", "site uncertainty", "damage by severity", "areas of interest", "co-registration tie points",
        "change score", "colour difference", "structural similarity (SSIM)", "after (co-registered)", "before"]
    assert all(t["loaded"] and t["valid"] for t in project["tree"])
    assert tree["before"]["source"] == str(before)
    assert tree["damage by severity"]["source"] == str(out / "damage.geojson")
    assert tree["damage by severity"]["style"]["renderer"] == "categorizedSymbol"
    assert tree["change score"]["style"]["renderer"] == "singlebandpseudocolor"
    assert tree["before"]["style"]["renderer"] == "multibandcolor"
    assert not tree["colour difference"]["visible"]
    assert tree["change score"]["visible"]
    assert project["default_view"]["crs"] == "EPSG:32637"
    render = project["render"]
    assert render["errors"] == []
    assert render["layers"][0] == "reported sites"
    assert render["layers"][-1] == "before"
    assert render["nonblank_pixels"] > 400 * 400 // 2


@pytest.mark.qgis
def test_outputs_load_and_render_in_qgis(runner, pair, tmp_path):
    _require_qgis()
    import geopandas as gpd

    before, after = pair
    sites, truth = _sites_and_truth(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out), "--sites", str(sites), "--truth", str(truth)])
    assert res.exit_code == 0, res.output
    layer_files = {p.name for p in out.iterdir() if p.suffix in (".tif", ".geojson")}
    assert set(RASTERS) | set(VECTORS) <= layer_files
    gpkg_layers = {f"layers.gpkg|{n}" for n in ("damage", "aois", "sites", "sites_uncertainty", "tie_points")}

    png = tmp_path / "qgis_render.png"
    proc = subprocess.run([QGIS_PYTHON, str(CHECK), str(out), str(png)], env=_qgis_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.stdout.strip(), f"qgis_check printed no report (exit {proc.returncode}): {proc.stderr}"
    report = json.loads(proc.stdout)
    layers = report["layers"]
    assert set(layers) == layer_files | gpkg_layers
    for name, info in layers.items():
        assert info["valid"], f"{name} is not a valid QGIS layer: {info.get('error')}"

    for name in RASTERS:
        assert layers[name]["crs"] == "EPSG:32637", name
    for name in layer_files - set(RASTERS):
        assert layers[name]["crs"] == "EPSG:4326", name
    for name in gpkg_layers:
        assert layers[name]["crs"] == "EPSG:32637", name
        geojson = layers[name.split("|")[1] + ".geojson"]
        assert layers[name]["feature_count"] == layers[name]["features_read"] == geojson["feature_count"], name
        assert layers[name]["geometry_type"].replace("Multi", "") == geojson["geometry_type"].replace("Multi", ""), name

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
    assert rgb["style"]["alpha_band"] == 4  # after_coregistered.qml: the mask stays transparent
    assert all(lo < hi for lo, hi in rgb["style"]["stretch"])
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

    summary = json.loads((out / "summary.json").read_text())
    _check_styles(layers, summary["threshold"]["value"])
    assert set(report["projects"]) == {"project.qgs"}
    _check_project(report["projects"]["project.qgs"], before, out)
    assert png.with_name("qgis_render_project.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert layers["sites.geojson"]["feature_count"] == 1
    ties = gpd.read_file(out / "tie_points.geojson")
    assert layers["tie_points.geojson"]["feature_count"] == len(ties) > 0

    # Opening the outputs in QGIS leaves *.aux.xml statistics beside the rasters:
    # the run must still verify.
    res = runner.invoke(cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output + res.stderr


@pytest.mark.qgis
def test_building_layers_load_and_render_in_qgis(runner, pair, tmp_path):
    """buildings.geojson (by grade) and ground_changes.geojson load styled and draw in QGIS."""
    _require_qgis()
    import geopandas as gpd
    from shapely.geometry import box

    from test_publish import CHANGE_XY

    before, after = pair
    x, y = CHANGE_XY
    footprints = tmp_path / "footprints.geojson"
    # one footprint on a fifth of the planted change (so it is a ground change), one on intact ground
    gpd.GeoDataFrame(geometry=[box(x - 5, y - 5, x - 3, y + 5), box(x + 20, y + 20, x + 30, y + 30)],
                     crs="EPSG:32637").to_file(footprints)
    out = tmp_path / "out"
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out), "--buildings", str(footprints)])
    assert res.exit_code == 0, res.output
    proc = subprocess.run([QGIS_PYTHON, str(CHECK), str(out), str(tmp_path / "render.png")], env=_qgis_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(proc.stdout)
    layers = report["layers"]
    buildings = layers["buildings.geojson"]
    assert buildings["valid"] and buildings["feature_count"] == 2
    assert buildings["style"]["renderer"] == "categorizedSymbol"
    assert buildings["style"]["attribute"] == "grade"
    assert [c["value"] for c in buildings["style"]["categories"]][:4] == ["destroyed", "severe", "moderate", "possible"]
    assert buildings["render_nonblank_pixels"] > 0
    assert layers["layers.gpkg|buildings"]["style"]["renderer"] == "categorizedSymbol"
    ground = gpd.read_file(out / "ground_changes.geojson")
    assert len(ground) >= 1
    assert layers["ground_changes.geojson"]["valid"]
    assert layers["ground_changes.geojson"]["feature_count"] == len(ground)
    assert layers["ground_changes.geojson"]["style"]["renderer"] == "singleSymbol"
    tree = [t["name"] for t in report["projects"]["project.qgs"]["tree"]]
    assert "buildings by damage grade" in tree and "changes off the building footprints" in tree
