"""The strip-wise pipeline: outputs do not depend on the strip size; big scenes stay bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy import ndimage as ndi

from changedetect import coregister as cr
from changedetect import io, streaming
from changedetect.config import config_from_dict
from changedetect.grid import Grid
from changedetect.pipeline import run

from conftest import rgb_scene

SHIFT = (2.3, -3.6)
#: Planted changes (row, col, height, width) in before-image pixels; the tall
#: one crosses many borders of the small strips used below.
CHANGES = [(40, 50, 90, 24), (150, 200, 30, 40), (230, 60, 26, 26)]


@pytest.fixture
def big_pair(make_raster):
    before = rgb_scene((300, 320), seed=23)
    after = np.stack([ndi.shift(b.astype(np.float32), SHIFT, order=3, mode="nearest") for b in before])
    after = np.clip(after * 1.1 + 6, 0, 255)
    rng = np.random.default_rng(9)
    for r, c, h, w in CHANGES:
        noise = ndi.gaussian_filter(rng.random((h, w)), 0.7)
        rubble = np.stack([150 + 100 * noise, 40 + 60 * noise, 30 + 50 * noise])  # red-brown debris
        r1, c1 = r + round(SHIFT[0]), c + round(SHIFT[1])
        after[:, r1 : r1 + h, c1 : c1 + w] = rubble
    return make_raster(before, name="before.tif"), make_raster(after.astype(np.uint8), name="after.tif")


def _footprint(raster: Path, r: int, c: int, h: int, w: int):
    """The box of pixel rows r:r+h, columns c:c+w of ``raster``, in its CRS."""
    from shapely.geometry import box

    with rasterio.open(raster) as src:
        t = src.transform
    (x0, y0), (x1, y1) = t * (c, r), t * (c + w, r + h)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _config(before: Path, after: Path, **extra):
    data = {"name": "strips", "inputs": {"before": str(before), "after": str(after)}, **extra}
    return config_from_dict(data, source="test", base=before.parent)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_strips_give_the_same_outputs_as_one_pass(big_pair, tmp_path, monkeypatch):
    before, after = big_pair
    config = _config(before, after)
    whole = run(config, outdir=tmp_path / "whole", strip_pixels=1 << 26)
    # about 20 core rows per strip: every planted change crosses strip borders
    tiled = run(config, outdir=tmp_path / "tiled", strip_pixels=60 * 340)
    # one strip at a time (one core) instead of two in parallel
    monkeypatch.setattr(streaming.os, "cpu_count", lambda: 1)
    serial = run(config, outdir=tmp_path / "serial", strip_pixels=60 * 340)
    for other in (tiled, serial):
        for name in ("after_coregistered.tif", "difference.tif", "ssim.tif", "score.tif"):
            np.testing.assert_array_equal(_read(whole.outdir / name), _read(other.outdir / name), err_msg=name)
        for name in ("damage.geojson", "summary.json", "coregistration.json", "tie_points.geojson"):
            assert (whole.outdir / name).read_bytes() == (other.outdir / name).read_bytes(), name
    assert whole.summary["polygon_count"] >= len(CHANGES)


def _footprints_file(before: Path, path: Path, boxes) -> Path:
    import geopandas as gpd

    gpd.GeoDataFrame({"name": [f"b{i}" for i in range(len(boxes))]},
                     geometry=[_footprint(before, *b) for b in boxes], crs="EPSG:32637").to_file(path)
    return path


def test_strips_give_the_same_outputs_with_every_option(big_pair, tmp_path):
    """Shadow relighting, the coherence term, hysteresis and footprint completion are strip-invariant too."""
    before, after = big_pair
    # the second planted change covers 40 % of a wider building; another building is untouched
    fp = _footprints_file(before, tmp_path / "fp.geojson", [(150, 200, 30, 100), CHANGES[0], (20, 250, 30, 40)])
    config = _config(before, after, inputs={"before": str(before), "after": str(after), "buildings": str(fp)},
                     change={"shadow_relight": True, "coherence_weight": 0.5},
                     damage={"hysteresis": 0.6}, output={"write_layers": True})
    whole = run(config, outdir=tmp_path / "whole", strip_pixels=1 << 26)
    tiled = run(config, outdir=tmp_path / "tiled", strip_pixels=60 * 340)
    for name in ("difference.tif", "ssim.tif", "score.tif", "coherence_loss.tif", "structure_loss.tif"):
        np.testing.assert_array_equal(_read(whole.outdir / name), _read(tiled.outdir / name), err_msg=name)
    for name in ("damage.geojson", "buildings.geojson", "ground_changes.geojson", "summary.json"):
        assert (whole.outdir / name).read_bytes() == (tiled.outdir / name).read_bytes(), name


def test_polygons_crossing_strip_borders_are_joined(big_pair, tmp_path):
    import geopandas as gpd

    before, after = big_pair
    res = run(_config(before, after), outdir=tmp_path / "out", strip_pixels=40 * 340)
    damage = gpd.read_file(res.outdir / "damage.geojson").to_crs("EPSG:32637")
    # the 90-row change spans several strips: one polygon, no seam inside it
    with rasterio.open(before) as src:
        t = src.transform
    r, c, h, w = CHANGES[0]
    x0, y0 = t * (c + 3, r + 3)
    x1, y1 = t * (c + w - 3, r + h - 3)
    from shapely.geometry import box

    core = box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    hits = damage[damage.intersects(core)]
    assert len(hits) == 1
    assert hits.geometry.iloc[0].geom_type == "Polygon"
    assert hits.geometry.iloc[0].covers(core)


def test_write_layers_writes_every_term(big_pair, tmp_path):
    before, after = big_pair
    res = run(_config(before, after, output={"write_layers": True}), outdir=tmp_path / "out")
    for name in ("structure_loss", "difference_evidence", "vegetation", "shadow_change", "coherence_loss"):
        layer = _read(res.outdir / f"{name}.tif")[0]
        assert np.nanmin(layer) >= 0 and np.nanmax(layer) <= 1, name
    plain = run(_config(before, after), outdir=tmp_path / "plain")
    assert not (plain.outdir / "structure_loss.tif").exists()
    assert not list(plain.outdir.glob(".*"))


def test_large_scenes_are_coregistered_on_block_averages(big_pair):
    before, after = big_pair
    with rasterio.open(before) as src:
        grid = Grid(src.crs.to_string(), src.transform, src.width, src.height)
    align = streaming.estimate_alignment(
        before, after, grid=grid, bands=[1, 2, 3], max_shift_px=32, upsample=20, resampling="cubic",
        max_pixels=io.DEFAULT_MAX_PIXELS, estimation_pixels=300 * 320 // 4,
    )
    assert align.factor == 2
    assert align.report["estimation"]["factor"] == 2
    dy, dx = align.model.displacement(150.0, 160.0)
    assert abs(float(dy) - SHIFT[0]) < 0.15 and abs(float(dx) - SHIFT[1]) < 0.15


def test_reframe_matches_the_base_model():
    m = cr.GeometricModel("affine", np.array([[1.001, 0.002, 3.0], [-0.002, 0.999, -1.5]]))
    f = 4
    full = cr.reframe(m, 1 / f, (-(f - 1) / (2 * f),) * 2)
    # full-grid pixel r lies at (r - 1.5) / 4 on the averaged grid
    r, c = 101.0, 57.0
    br, bc = m.source_coordinates((r - 1.5) / 4, (c - 1.5) / 4)
    fr, fc = full.source_coordinates(r, c)
    assert np.allclose([fr, fc], [4 * br + 1.5, 4 * bc + 1.5])
    win = cr.reframe(full, 1.0, (40, 10))
    wr, wc = win.source_coordinates(r - 40, c - 10)
    assert np.allclose([wr + 40, wc + 10], [fr, fc])


def test_strip_writer_abort_leaves_nothing(tmp_path):
    grid = Grid("EPSG:32637", rasterio.transform.from_origin(500000, 4000000, 1, 1), 50, 40)
    w = io.StripWriter(tmp_path / "x.tif", grid, count=1, dtype="float32", nodata=float("nan"))
    w.write(0, np.zeros((20, 50), np.float32))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_every_row_of_each_step(big_pair, tmp_path):
    before, after = big_pair
    seen: dict[str, list[int]] = {}

    def progress(stage: str, rows: int, total: int) -> None:
        seen.setdefault(stage, [0, total])[0] += rows

    run(_config(before, after), outdir=tmp_path / "out", strip_pixels=60 * 340, progress=progress)
    assert set(seen) == {"warping the after image", "fitting radiometry", "no-change statistics", "change layers"}
    for stage, (done, total) in seen.items():
        assert done == total, stage


def test_buildings_are_graded_one_by_one(big_pair, tmp_path):
    import geopandas as gpd

    before, after = big_pair

    def footprint(r, c, h, w):
        return _footprint(before, r, c, h, w)

    # the three planted changes, and two untouched blocks
    geoms = [footprint(*ch) for ch in CHANGES] + [footprint(20, 250, 30, 40), footprint(250, 250, 30, 40)]
    path = tmp_path / "footprints.geojson"
    gpd.GeoDataFrame({"name": ["a", "b", "c", "d", "e"]}, geometry=geoms, crs="EPSG:32637").to_file(path)
    res = run(_config(before, after, inputs={"before": str(before), "after": str(after), "buildings": str(path)}),
              outdir=tmp_path / "out")
    graded = gpd.read_file(res.outdir / "buildings.geojson")
    assert list(graded["name"]) == ["a", "b", "c", "d", "e"]
    assert list(graded["grade"][:3]) == ["destroyed"] * 3
    assert list(graded["grade"][3:]) == ["no damage"] * 2
    assert res.summary["buildings"]["by_grade"]["destroyed"] == 3
    assert (res.outdir / "buildings.qml").is_file()


def test_changes_off_the_footprints_go_to_ground_changes(big_pair, tmp_path):
    import geopandas as gpd

    before, after = big_pair

    def footprint(r, c, h, w):
        return _footprint(before, r, c, h, w)

    # footprints for the first two planted changes only: the third is a ground change
    path = tmp_path / "footprints.geojson"
    gpd.GeoDataFrame(geometry=[footprint(*ch) for ch in CHANGES[:2]], crs="EPSG:32637").to_file(path)
    res = run(_config(before, after, inputs={"before": str(before), "after": str(after), "buildings": str(path)}),
              outdir=tmp_path / "out")
    damage = gpd.read_file(res.outdir / "damage.geojson").to_crs("EPSG:32637")
    ground = gpd.read_file(res.outdir / "ground_changes.geojson").to_crs("EPSG:32637")
    third = footprint(*CHANGES[2])
    assert not damage.intersects(third).any()
    assert ground.intersects(third).sum() == 1
    assert (ground["building_share"] < 0.3).all() and (damage["building_share"] >= 0.3).all()
    assert res.summary["ground_change_count"] == len(ground)
    assert (res.outdir / "ground_changes.qml").is_file()


def test_a_damaged_building_joins_the_damage_layer_whole(big_pair, tmp_path):
    """With footprints, a building graded moderate or worse that a damage object reaches is damage as a whole."""
    import geopandas as gpd

    before, after = big_pair
    wide = (150, 200, 30, 100)  # the second planted change (30 x 40 px) covers 40 % of it
    fp = _footprints_file(before, tmp_path / "fp.geojson", [wide, (20, 250, 30, 40)])
    inputs = {"before": str(before), "after": str(after), "buildings": str(fp)}
    res = run(_config(before, after, inputs=inputs), outdir=tmp_path / "on")
    off = run(_config(before, after, inputs=inputs, damage={"complete_buildings": False}), outdir=tmp_path / "off")
    footprint = _footprint(before, *wide)
    damage = gpd.read_file(res.outdir / "damage.geojson").to_crs("EPSG:32637").union_all()
    damage_off = gpd.read_file(off.outdir / "damage.geojson").to_crs("EPSG:32637").union_all()
    assert footprint.difference(damage).area < 1.0  # the whole 15 x 50 m footprint, to a pixel edge
    assert footprint.intersection(damage_off).area < 0.6 * footprint.area  # only the planted change
    untouched = _footprint(before, 20, 250, 30, 40)
    assert damage.intersection(untouched).area == 0
    graded = gpd.read_file(res.outdir / "buildings.geojson")
    # graded from what was detected (40 % lost: severe), not from the completed footprint
    assert graded["grade"].tolist() == ["severe", "no damage"]
    assert graded["whole_footprint"].tolist() == [True, False]
    assert res.summary["buildings"]["whole_footprints_in_damage"] == 1
    assert "whole_footprint" not in gpd.read_file(off.outdir / "buildings.geojson").columns


def test_aoi_labels_equal_rasterize():
    """The per-strip AOI numbers, with their shortcuts, are rasterize's."""
    from shapely.geometry import Polygon, box

    grid = Grid("EPSG:32637", rasterio.Affine(0.5, 0, 1000, 0, -0.5, 2000), 300, 200)
    left, bottom, right, top = grid.bounds
    aois = [
        box(left - 5, bottom - 5, right + 5, top + 5),  # holds the whole grid
        Polygon([(1010, 1990), (1100, 1985), (1060, 1930)]),  # over it, in part
        box(5000, 5000, 5010, 5010),  # elsewhere
    ]
    for geoms in (aois, aois[:1], aois[1:], aois[::-1], []):
        for r0, rows in ((0, 200), (0, 37), (150, 50), (40, 1)):
            sub = grid.window_grid(r0, 0, rows, grid.width)
            expected = streaming.rasterize(geoms, sub, list(range(1, len(geoms) + 1)))
            np.testing.assert_array_equal(streaming.aoi_labels(geoms, sub), expected)
