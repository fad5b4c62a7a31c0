"""CLI behaviour: exit codes, one-line messages, outputs, refusal to overwrite."""

import json

import pytest
import rasterio

from changedetect import __version__
from changedetect.cli.main import cli
from conftest import PAIR_SHIFT, rgb_scene

SHIFT = PAIR_SHIFT


def test_version_and_help(runner):
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0
    assert __version__ in res.output
    for cmd in ("run", "detect", "coregister", "evaluate", "sample"):
        res = runner.invoke(cli, [cmd, "--help"])
        assert res.exit_code == 0, cmd
        assert "Example" in res.output


def test_detect_finds_planted_change(runner, pair, tmp_path):
    before, after = pair
    out = tmp_path / "out"
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out)])
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"after_coregistered.tif", "difference.tif", "ssim.tif", "score.tif", "damage.geojson",
            "aois.geojson", "summary.json", "manifest.json", "quicklook.png", "coregistration.json"} <= names
    reg = json.loads((out / "coregistration.json").read_text())
    assert reg["shift_px"]["dy"] == pytest.approx(SHIFT[0], abs=0.1)
    assert reg["shift_px"]["dx"] == pytest.approx(SHIFT[1], abs=0.1)
    import geopandas as gpd

    dmg = gpd.read_file(out / "damage.geojson")
    assert dmg.crs.to_epsg() == 4326
    assert len(dmg) == 1
    poly = dmg.to_crs("EPSG:32637").geometry.iloc[0]
    # planted at before rows/cols 70:90, 80:100 of the written crop (0.5 m px)
    assert poly.area == pytest.approx(100.0, rel=0.25)
    cx, cy = poly.centroid.x, poly.centroid.y
    assert cx == pytest.approx(277000 + 0.5 * 90, abs=1.5)
    assert cy == pytest.approx(4010100 - 0.5 * 80, abs=1.5)
    with rasterio.open(out / "score.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.dtypes[0] == "float32"
    with rasterio.open(out / "after_coregistered.tif") as src, rasterio.open(before) as ref:
        assert src.transform == ref.transform
        assert src.crs == ref.crs
        assert src.shape == ref.shape
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {r["path"] for r in manifest["outputs"]}
    assert listed == names - {"manifest.json"}


def test_detect_is_deterministic(runner, pair, tmp_path):
    before, after = pair
    for name in ("a", "b"):
        res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(tmp_path / name / "out")])
        assert res.exit_code == 0, res.output
    for p in (tmp_path / "a" / "out").iterdir():
        if p.name != "manifest.json":
            assert p.read_bytes() == (tmp_path / "b" / "out" / p.name).read_bytes(), p.name


def test_existing_output_refused_untouched(runner, pair, tmp_path):
    before, after = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out)])
    assert res.exit_code == 2
    assert "not empty (use --overwrite" in res.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (lambda p: p.write_text("not a tiff"), 1, "not a readable raster"),
        (lambda p: p.write_bytes(b""), 1, "raster is empty"),
    ],
)
def test_bad_after_image(runner, pair, tmp_path, make, code, message):
    before, _ = pair
    bad = tmp_path / "bad.tif"
    make(bad)
    res = runner.invoke(cli, ["detect", str(before), str(bad), "-o", str(tmp_path / "o")])
    assert res.exit_code == code
    assert res.stderr.count("\n") == 1
    assert str(bad) in res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_no_overlap(runner, pair, make_raster, tmp_path):
    before, _ = pair
    from rasterio.transform import from_origin

    far = make_raster(rgb_scene((64, 64)), transform=from_origin(500000, 4000000, 0.5, 0.5), name="far.tif")
    res = runner.invoke(cli, ["detect", str(before), str(far), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "does not overlap" in res.stderr


def test_missing_pipeline_and_bad_key(runner, pair, tmp_path):
    res = runner.invoke(cli, ["run", str(tmp_path / "none.toml")])
    assert res.exit_code == 2
    assert "pipeline file not found" in res.stderr
    before, after = pair
    p = tmp_path / "p.toml"
    p.write_text(f'[inputs]\nbefore = "{before.name}"\nafter = "{after.name}"\n[damage]\nminarea = 1\n')
    res = runner.invoke(cli, ["run", str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"changedetect: error: {p}: damage.minarea: unknown key"


def test_set_override_validated(runner, pair, tmp_path):
    before, after = pair
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(tmp_path / "o"), "--set", "damage.min_area_m2=-3"])
    assert res.exit_code == 2
    assert "damage.min_area_m2" in res.stderr


def test_coregister_command(runner, pair, tmp_path):
    before, after = pair
    out = tmp_path / "aligned.tif"
    res = runner.invoke(cli, ["coregister", str(before), str(after), "-o", str(out)])
    assert res.exit_code == 0, res.output
    with rasterio.open(out) as src, rasterio.open(before) as ref:
        assert (src.crs, src.transform, src.width, src.height, src.count) == (ref.crs, ref.transform, ref.width, ref.height, 3)
        aligned = src.read(1).astype(float)
        mask = src.read_masks(1) > 0
        assert not mask[-1].any()  # after content moved up by 3.4 rows: no data at the bottom
    report = json.loads(out.with_name("aligned.coregistration.json").read_text())
    assert report["shift_px"]["dy"] == pytest.approx(SHIFT[0], abs=0.1)
    res = runner.invoke(cli, ["coregister", str(before), str(after), "-o", str(out)])
    assert res.exit_code == 2
    assert "exists" in res.stderr
    assert aligned.std() > 0


def test_evaluate_command(runner, tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    crs = "EPSG:32637"
    gpd.GeoDataFrame({"severity": ["destroyed", "moderate"]}, geometry=[box(0, 0, 10, 10), box(20, 0, 30, 10)], crs=crs).to_file(tmp_path / "t.geojson")
    gpd.GeoDataFrame({"id": [1]}, geometry=[box(0, 0, 10, 5)], crs=crs).to_file(tmp_path / "d.geojson")
    res = runner.invoke(cli, ["evaluate", str(tmp_path / "d.geojson"), str(tmp_path / "t.geojson"), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["precision"] == pytest.approx(1.0, abs=1e-3)
    assert r["recall"] == pytest.approx(0.25, abs=1e-3)
    assert r["objects"]["by_class"]["destroyed"]["found"] == 1
    res = runner.invoke(cli, ["evaluate", str(tmp_path / "d.geojson"), str(tmp_path / "missing.geojson")])
    assert res.exit_code == 1
    assert "truth file not found" in res.stderr


def test_verify_detects_changed_missing_extra(runner, pair, tmp_path):
    before, after = pair
    out = tmp_path / "out"
    assert runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out)]).exit_code == 0
    res = runner.invoke(cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output
    (out / "summary.json").write_text("{}")
    (out / "quicklook.png").unlink()
    (out / "planted.txt").write_text("x")
    res = runner.invoke(cli, ["verify", str(out)])
    assert res.exit_code == 1
    assert "changed: summary.json" in res.stderr
    assert "missing: quicklook.png" in res.stderr
    assert "extra file: planted.txt" in res.stderr


def test_verify_rerun_reproduces(runner, pair, tmp_path):
    before, after = pair
    out = tmp_path / "out"
    assert runner.invoke(cli, ["detect", str(before), str(after), "-o", str(out)]).exit_code == 0
    res = runner.invoke(cli, ["verify", str(out), "--rerun"])
    assert res.exit_code == 0, res.output
    assert "re-run compared" in res.output


def test_verify_not_an_output_folder(runner, tmp_path):
    res = runner.invoke(cli, ["verify", str(tmp_path)])
    assert res.exit_code == 1
    assert "manifest not found" in res.stderr


def test_limit_malloc_arenas_is_safe_to_call(monkeypatch):
    """The arena cap is a no-op off glibc or when the user set MALLOC_ARENA_MAX, and never raises."""
    from changedetect.cli.main import limit_malloc_arenas

    limit_malloc_arenas()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    limit_malloc_arenas()
    monkeypatch.setattr("sys.platform", "darwin")
    limit_malloc_arenas()
