"""Styles, QGIS project, GeoPackage and regeneration of the human-facing outputs."""

from __future__ import annotations

import json
import shutil
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from scipy import ndimage as ndi

from changedetect import io, publish, styles
from changedetect.cli.main import cli
from changedetect.qgsproject import ProjectGroup, ProjectLayer, project_xml
from conftest import ORIGIN, PAIR_SHIFT, UTM, rgb_scene

EXPECTED = {
    "sites.geojson", "sites_uncertainty.geojson", "layers.gpkg", "project.qgs", "report.html",
    "after_coregistered.qml", "difference.qml", "ssim.qml", "score.qml", "damage.qml", "aois.qml",
    "sites.qml", "sites_uncertainty.qml", "tie_points.geojson", "tie_points.qml",
    "threshold_sweep.csv", "threshold_sweep.png",
}
#: Centre of the planted change (before rows 70:90, cols 80:100 of the crop, 0.5 m pixels).
CHANGE_XY = (ORIGIN[0] + 0.5 * 90, ORIGIN[1] - 0.5 * 80)


def _write(path: Path, arr: np.ndarray) -> Path:
    profile = {"driver": "GTiff", "width": arr.shape[2], "height": arr.shape[1], "count": arr.shape[0],
               "dtype": arr.dtype.name, "crs": UTM, "transform": from_origin(*ORIGIN, 0.5, 0.5)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)
    return path


def make_inputs(folder: Path) -> dict[str, Path]:
    """The ``pair`` fixture's images, plus two reported sites and a truth polygon."""
    import geopandas as gpd
    from shapely.geometry import Point, box

    before = rgb_scene((200, 200), seed=11)
    after = np.stack([ndi.shift(b.astype(np.float32), PAIR_SHIFT, order=3, mode="nearest") for b in before])
    after = np.clip(after * 1.15 + 8, 0, 255)
    rng = np.random.default_rng(5)
    r0, c0 = 90 + round(PAIR_SHIFT[0]), 100 + round(PAIR_SHIFT[1])
    after[:, r0 : r0 + 20, c0 : c0 + 20] = ndi.gaussian_filter(rng.random((3, 20, 20)), (0, 0.6, 0.6)) * 255
    x, y = CHANGE_XY
    sites = gpd.GeoDataFrame({"name": ["strike", "rumour"], "uncertainty_m": [10.0, 4.0]},
                             geometry=[Point(x, y), Point(ORIGIN[0] + 12, ORIGIN[1] - 70)], crs=UTM)
    truth = gpd.GeoDataFrame({"severity": ["destroyed"]}, geometry=[box(x - 5, y - 5, x + 5, y + 5)], crs=UTM)
    paths = {
        "before": _write(folder / "before.tif", before[:, 20:180, 20:180]),
        "after": _write(folder / "after.tif", after.astype(np.uint8)[:, 20:180, 20:180]),
        "sites": folder / "sites.geojson",
        "truth": folder / "truth.geojson",
    }
    sites.to_file(paths["sites"])
    truth.to_file(paths["truth"])
    return paths


def tie_points(crs: str = UTM):
    import geopandas as gpd
    from shapely.geometry import Point

    dy, dx = PAIR_SHIFT
    return gpd.GeoDataFrame(
        {"dy_px": [dy + 0.05, dy - 0.1, dy + 2.5], "dx_px": [dx, dx + 0.08, dx - 3.0], "accepted": [True, True, False]},
        geometry=[Point(ORIGIN[0] + 20, ORIGIN[1] - 20), Point(ORIGIN[0] + 60, ORIGIN[1] - 25),
                  Point(ORIGIN[0] + 40, ORIGIN[1] - 60)],
        crs=crs,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One ``detect`` run with sites and truth, shared by the tests of this module (read only)."""
    from click.testing import CliRunner

    base = tmp_path_factory.mktemp("publish")
    inputs = make_inputs(base)
    out = base / "out"
    res = CliRunner().invoke(cli, ["detect", str(inputs["before"]), str(inputs["after"]), "-o", str(out),
                                   "--sites", str(inputs["sites"]), "--truth", str(inputs["truth"])])
    assert res.exit_code == 0, res.output
    return out, inputs


def _copy(run_dir, tmp_path) -> Path:
    out, _ = run_dir
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


# --------------------------------------------------------------------------- styles (pure)
def test_damage_style_has_four_unosat_categories():
    root = ET.fromstring(styles.qml_text(styles.damage_style()).split("\n", 1)[1])
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol"
    assert renderer.get("attr") == "severity"
    cats = renderer.findall("categories/category")
    assert [c.get("value") for c in cats] == ["destroyed", "severe", "moderate", "possible"]
    fills = [s.find("layer/Option/Option[@name='color']").get("value") for s in renderer.findall("symbols/symbol")]
    assert fills[0].startswith("165,15,21")  # destroyed: dark red
    assert root.get("labelsEnabled") == "1"
    label = root.find("labeling/settings/text-style").get("fieldName")
    assert '"severity"' in label
    assert '"confidence"' in label


def test_score_style_fixed_range_marks_threshold():
    root = ET.fromstring(styles.qml_text(styles.score_style(0.42)).split("\n", 1)[1])
    rr = root.find("pipe/rasterrenderer")
    assert rr.get("type") == "singlebandpseudocolor"
    assert (rr.get("classificationMin"), rr.get("classificationMax")) == ("0", "1")
    values = [float(i.get("value")) for i in rr.findall("rastershader/colorrampshader/item")]
    assert values[0] == 0
    assert values[-1] == 1
    assert 0.42 in values
    assert values == sorted(values)
    assert styles.score_style(None).elements  # no threshold: still a valid ramp


def test_qml_is_well_formed_and_deterministic():
    for make in (styles.difference_style, styles.ssim_style, styles.aois_style, styles.sites_style,
                 styles.sites_uncertainty_style, styles.tie_points_style):
        text = styles.qml_text(make())
        assert text == styles.qml_text(make())
        assert text.startswith("<!DOCTYPE qgis")
        ET.fromstring(text.split("\n", 1)[1])
    diff = ET.fromstring(styles.qml_text(styles.difference_style()).split("\n", 1)[1])
    assert diff.find("pipe/rasterrenderer").get("classificationMax") == "0.5"
    tie = styles.qml_text(styles.tie_points_style())
    assert styles.TIE_ANGLE.replace('"', "&quot;") in tie
    assert 'name="angle"' in tie


def test_project_xml_layers_groups_and_ids():
    layer = ProjectLayer("changedetect_damage", "damage", "./damage.geojson", "ogr", "EPSG:4326",
                         styles.damage_style(), geometry="Polygon")
    raster = ProjectLayer("changedetect_score", "score", "./score.tif", "gdal", UTM, styles.score_style(0.4), visible=False)
    text = project_xml(title="t", crs=UTM, extent=(0, 0, 10, 10),
                       groups=[ProjectGroup("A", (layer,)), ProjectGroup("B", (raster,))])
    root = ET.fromstring(text.split("\n", 1)[1])
    assert root.find("projectCrs/spatialrefsys/authid").text == "EPSG:32637"
    assert [g.get("name") for g in root.findall("layer-tree-group/layer-tree-group")] == ["A", "B"]
    assert [m.find("datasource").text for m in root.findall("projectlayers/maplayer")] == ["./damage.geojson", "./score.tif"]
    assert root.find("layer-tree-group/layer-tree-group[@name='B']/layer-tree-layer").get("checked") == "Qt::Unchecked"
    assert root.find("properties/Paths/Absolute").text == "false"
    with pytest.raises(ValueError, match="unique"):
        project_xml(title="t", crs=UTM, extent=(0, 0, 1, 1), groups=[ProjectGroup("A", (layer, layer))])
    with pytest.raises(ValueError, match="longer than 10"):
        ProjectLayer("short", "x", "./x.tif", "gdal", UTM, styles.ssim_style())


def test_write_geopackage_is_deterministic_and_atomic(tmp_path):
    import geopandas as gpd
    import pyogrio
    from shapely.geometry import box

    layers = {"aois": gpd.GeoDataFrame({"name": ["a"]}, geometry=[box(0, 0, 10, 10)], crs=UTM),
              "damage": gpd.GeoDataFrame({"id": []}, geometry=[], crs=UTM)}
    a = publish.write_geopackage(tmp_path / "a.gpkg", layers, styles={"aois": "<qgis/>"})
    b = publish.write_geopackage(tmp_path / "b.gpkg", layers, styles={"aois": "<qgis/>"})
    assert a.read_bytes() == b.read_bytes()
    assert pyogrio.get_gdal_config_option("OGR_CURRENT_DATE") is None  # restored
    with sqlite3.connect(a) as con:
        assert {r[0] for r in con.execute("select last_change from gpkg_contents")} == {publish.GPKG_DATE}
        assert con.execute("select f_table_name, useAsDefault from layer_styles").fetchall() == [("aois", 1)]
    assert [list(r) for r in pyogrio.list_layers(a)][:2] == [["aois", "Polygon"], ["damage", "MultiPolygon"]]
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the driver raises
        publish.write_geopackage(tmp_path / "c.gpkg", {"aois": layers["aois"], "bad": "not a frame"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gpkg", "b.gpkg"]


# --------------------------------------------------------------------------- a real run
def test_run_publishes_styled_layers_project_and_report(run_dir):
    out, inputs = run_dir
    names = {p.name for p in out.iterdir()}
    assert names >= EXPECTED
    for p in out.iterdir():
        if p.suffix in (".tif", ".geojson"):
            assert (out / f"{p.stem}.qml").is_file(), f"no style beside {p.name}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["path"] for r in manifest["outputs"]} >= EXPECTED
    assert not list(out.glob(".*"))


def test_sites_layers_carry_the_checks(run_dir):
    import geopandas as gpd

    out, _ = run_dir
    summary = json.loads((out / "summary.json").read_text())
    sites = gpd.read_file(out / "sites.geojson")
    assert sites.crs.to_epsg() == 4326
    assert list(sites["name"]) == [s["name"] for s in summary["sites"]] == ["strike", "rumour"]
    assert list(sites["verdict"]) == [s["verdict"] for s in summary["sites"]]
    assert sites["verdict"].iloc[0] == "damage found"
    assert {"distance_m", "uncertainty_m", "inside_damage", "nearest_polygon_id"} <= set(sites.columns)
    circles = gpd.read_file(out / "sites_uncertainty.geojson").to_crs(UTM)
    assert circles.geometry.area.to_numpy() == pytest.approx(np.pi * np.array([10.0, 4.0]) ** 2, rel=0.01)


def test_geopackage_has_every_layer_in_the_run_crs(run_dir):
    import geopandas as gpd
    import pyogrio

    out, _ = run_dir
    gpkg = out / "layers.gpkg"
    listed = [r[0] for r in pyogrio.list_layers(gpkg)]
    assert listed == ["damage", "aois", "sites", "sites_uncertainty", "tie_points", "layer_styles"]
    for name in listed[:-1]:
        layer = gpd.read_file(gpkg, layer=name)
        assert layer.crs.to_epsg() == 32637, name
        assert len(layer) == len(gpd.read_file(out / f"{name}.geojson")), name
    with sqlite3.connect(gpkg) as con:
        styled = dict(con.execute("select f_table_name, styleQML from layer_styles"))
        assert con.execute("pragma user_version").fetchone()[0] == 10200
    assert styled["damage"] == (out / "damage.qml").read_text(encoding="utf-8")


def test_project_file_order_sources_crs_and_extent(run_dir):
    import geopandas as gpd

    out, inputs = run_dir
    text = (out / "project.qgs").read_text(encoding="utf-8")
    root = ET.fromstring(text.split("\n", 1)[1])
    assert root.find("projectCrs/spatialrefsys/authid").text == "EPSG:32637"
    tree = [(g.get("name"), [lyr.get("name") for lyr in g.findall("layer-tree-layer")])
            for g in root.findall("layer-tree-group/layer-tree-group")]
    assert tree == [
        ("Damage assessment", ["reported sites", "site uncertainty", "damage by severity", "areas of interest",
                               "co-registration tie points"]),
        ("Change evidence", ["change score", "colour difference", "structural similarity (SSIM)"]),
        ("Imagery", ["after (co-registered)", "before"]),
    ]
    sources = {m.find("layername").text: m.find("datasource").text for m in root.findall("projectlayers/maplayer")}
    assert sources["change score"] == "./score.tif"
    assert sources["damage by severity"] == "./damage.geojson"
    assert Path(sources["before"]) == inputs["before"].resolve()
    styles_in = {m.find("layername").text: m.find("renderer-v2") for m in root.findall("projectlayers/maplayer")}
    assert styles_in["damage by severity"].get("type") == "categorizedSymbol"
    view = root.find("ProjectViewSettings/DefaultViewExtent")
    aois = gpd.read_file(out / "aois.geojson").to_crs(UTM).total_bounds
    ext = [float(view.get(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
    assert ext[0] < aois[0] < aois[2] < ext[2]
    assert ext[1] < aois[1] < aois[3] < ext[3]
    assert "saveDateTime" not in text


def test_publish_is_deterministic_and_styles_tie_points(run_dir, tmp_path):
    import pyogrio

    out, inputs = run_dir
    summary = json.loads((out / "summary.json").read_text())
    folders = []
    for name in ("a", "b"):
        dst = tmp_path / name / "out"
        shutil.copytree(out, dst)
        io.write_vector(dst / "tie_points.geojson", tie_points(), layer="tie_points", overwrite=True)
        written = publish.publish_outputs(dst, crs=UTM, summary=summary, inputs=inputs)
        folders.append((dst, written))
    (a, written_a), (b, _) = folders
    assert {p.name for p in written_a} == EXPECTED - {"tie_points.geojson"}
    for p in written_a:
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    assert [r[0] for r in pyogrio.list_layers(a / "layers.gpkg")][-2:] == ["tie_points", "layer_styles"]
    html = (a / "report.html").read_text(encoding="utf-8")
    assert "3 (2 accepted, 1 rejected)" in html
    assert (a / "report.html").read_bytes() != (out / "report.html").read_bytes()


def test_relative_inputs_option(run_dir, tmp_path):
    out, inputs = run_dir
    dst = _copy(run_dir, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    publish.publish_outputs(dst, crs=UTM, summary=summary, inputs=inputs, relative_inputs=True)
    root = ET.fromstring((dst / "project.qgs").read_text(encoding="utf-8").split("\n", 1)[1])
    source = next(m.find("datasource").text for m in root.findall("projectlayers/maplayer")
                  if m.find("layername").text == "before")
    assert source.startswith("../")
    assert (dst / source).resolve() == inputs["before"].resolve()


def test_staging_folder_maps_to_final_folder(tmp_path):
    assert publish._final_folder(tmp_path / ".changedetect-partial-123") == tmp_path
    assert publish._final_folder(tmp_path / "out") == tmp_path / "out"


# --------------------------------------------------------------------------- changedetect report
def test_report_command_rewrites_identical_files(runner, run_dir, tmp_path):
    dst = _copy(run_dir, tmp_path)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    (dst / "report.html").unlink()
    res = runner.invoke(cli, ["report", str(dst)])
    assert res.exit_code == 0, res.output + res.stderr
    assert "16 identical to the run" in res.output
    assert res.stderr == ""
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    res = runner.invoke(cli, ["verify", str(dst)])
    assert res.exit_code == 0, res.output


def test_report_command_names_changed_file(runner, run_dir, tmp_path):
    dst = _copy(run_dir, tmp_path)
    summary = json.loads((dst / "summary.json").read_text())
    summary["name"] = "renamed"
    (dst / "summary.json").write_text(json.dumps(summary))
    res = runner.invoke(cli, ["report", str(dst)])
    assert res.exit_code == 0
    assert "differs from manifest.json: report.html" in res.stderr
    assert "differs from manifest.json: project.qgs" in res.stderr


@pytest.mark.parametrize("problem", ["missing", "changed", "not_a_run"])
def test_report_command_errors_are_one_line(runner, run_dir, tmp_path, problem):
    dst = _copy(run_dir, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    if problem == "missing":
        manifest["config"]["inputs"]["sites"] = str(tmp_path / "gone.geojson")
        message = "gone.geojson: sites input recorded in"
    elif problem == "changed":
        manifest["inputs"]["truth"]["sha256"] = "0" * 64
        message = "truth input changed since the run"
    else:
        (dst / "manifest.json").unlink()
        message = "manifest (not a changedetect output folder"
    if problem != "not_a_run":
        (dst / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(cli, ["report", str(dst)])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1
    assert message in res.stderr
    assert "Traceback" not in res.output


def test_report_help(runner):
    res = runner.invoke(cli, ["report", "--help"])
    assert res.exit_code == 0
    assert "Example" in res.output
    assert "rewritten" in res.output


def test_threshold_sweep_table_matches_the_report(run_dir):
    import csv

    run_dir, _ = run_dir
    rows = list(csv.DictReader((run_dir / "threshold_sweep.csv").read_text(encoding="utf-8").splitlines()))
    assert [float(r["threshold"]) for r in rows] == list(publish.SWEEP_THRESHOLDS)
    f1 = [float(r["f1"]) for r in rows]
    p, r = np.array([float(x["precision"]) for x in rows]), np.array([float(x["recall"]) for x in rows])
    np.testing.assert_allclose(f1, np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0), atol=2e-4)
    assert r[0] >= r[-1]  # recall falls as the threshold rises
    assert (run_dir / "threshold_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
