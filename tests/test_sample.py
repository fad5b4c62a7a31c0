"""Tests for the synthetic Harem sample (changedetect.sample.harem)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.enums import ColorInterp
from shapely.geometry import Point

from changedetect.errors import OutputExistsError
from changedetect.sample import harem

IMAGERY = Path(__file__).resolve().parents[1] / "imagery" / "harem"


@pytest.fixture(scope="module")
def sample() -> harem.HaremSample:
    return harem.generate()


@pytest.fixture(scope="module")
def written(
    sample: harem.HaremSample, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Write the sample once (generation is the slow part: reuse ``sample``)."""
    out = tmp_path_factory.mktemp("harem")
    seeds = []

    def fake_generate(seed: int = harem.DEFAULT_SEED) -> harem.HaremSample:
        seeds.append(seed)
        return sample

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harem, "generate", fake_generate)
        paths = harem.write_sample(out)
    assert seeds == [harem.DEFAULT_SEED]
    return paths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _utm(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    return gdf.to_crs(harem.CRS)


# -- reproducibility ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(harem.FILE_NAMES))
def test_generator_reproduces_committed_files(
    written: dict[str, Path], name: str
) -> None:
    committed = IMAGERY / harem.FILE_NAMES[name]
    assert committed.is_file(), f"missing committed sample file {committed.name}"
    assert _sha256(written[name]) == _sha256(committed)


def test_generator_reproduces_committed_content(
    sample: harem.HaremSample, written: dict[str, Path]
) -> None:
    """Same pixels and features as the committed files (explains a hash mismatch)."""
    for name in ("before", "after"):
        with rasterio.open(IMAGERY / harem.FILE_NAMES[name]) as ds:
            np.testing.assert_array_equal(ds.read(), getattr(sample, name))
    for name in ("truth", "aois", "sites", "harmless"):
        new = gpd.read_file(written[name])
        old = gpd.read_file(IMAGERY / harem.FILE_NAMES[name])
        assert list(new.columns) == list(old.columns)
        assert new.drop(columns="geometry").equals(old.drop(columns="geometry"))
        assert new.geometry.geom_equals_exact(old.geometry, tolerance=2e-7).all()


def test_writes_exactly_the_named_files(written: dict[str, Path]) -> None:
    outdir = written["before"].parent
    assert sorted(p.name for p in outdir.iterdir()) == sorted(harem.FILE_NAMES.values())
    assert {k: p.name for k, p in written.items()} == harem.FILE_NAMES


def test_written_images_equal_generated_arrays(
    sample: harem.HaremSample, written: dict[str, Path]
) -> None:
    for name in ("before", "after"):
        with rasterio.open(written[name]) as ds:
            np.testing.assert_array_equal(ds.read(), getattr(sample, name))


# -- the in-memory sample ------------------------------------------------------


def test_generate_result(sample: harem.HaremSample) -> None:
    for img in (sample.before, sample.after):
        assert img.shape == (3, harem.SIZE, harem.SIZE)
        assert img.dtype == np.uint8
        assert not img.flags.writeable
        assert 20 < img.mean() < 230
        assert img.std() > 20
    assert sample.crs == "EPSG:32637"
    assert sample.transform == harem.TRANSFORM
    assert sample.shift == harem.SHIFT
    assert (sample.before_date, sample.after_date) == ("2017-09-11", "2018-04-24")
    for layer in (sample.truth, sample.aois, sample.sites, sample.harmless):
        assert isinstance(layer, gpd.GeoDataFrame)
        assert layer.crs.to_epsg() == 4326


def test_grid_is_centred_on_the_two_sites() -> None:
    t = harem.TRANSFORM
    assert (t.a, t.e, t.b, t.d) == (0.5, -0.5, 0.0, 0.0)
    assert t.c % 0.5 == 0
    assert t.f % 0.5 == 0
    cx = t.c + harem.SIZE * 0.5 / 2
    cy = t.f - harem.SIZE * 0.5 / 2
    assert abs(cx - (277053.4 + 277035.5) / 2) <= 0.25
    assert abs(cy - (4010015.0 + 4010106.3) / 2) <= 0.25


def test_after_image_carries_the_planted_shift(sample: harem.HaremSample) -> None:
    from skimage.registration import phase_cross_correlation

    before = sample.before.astype(float).mean(axis=0)
    after = sample.after.astype(float).mean(axis=0)
    est, _, _ = phase_cross_correlation(before, after, upsample_factor=10)
    # the shift that registers after onto before is minus the planted shift
    np.testing.assert_allclose(est, [-harem.SHIFT[0], -harem.SHIFT[1]], atol=0.3)
    assert min(abs(harem.SHIFT[0]), abs(harem.SHIFT[1])) > 2
    assert harem.SHIFT[0] % 1 != 0  # a sub-pixel part
    assert harem.SHIFT[1] % 1 != 0


def test_before_and_after_differ_radiometrically(sample: harem.HaremSample) -> None:
    b = sample.before.reshape(3, -1).mean(axis=1)
    a = sample.after.reshape(3, -1).mean(axis=1)
    assert np.abs(b - a).max() > 3  # another sensor, not a copy


# -- rasters -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "date", "sensor"),
    [("before", "2017-09-11", "synthetic-A"), ("after", "2018-04-24", "synthetic-B")],
)
def test_raster_format(
    written: dict[str, Path], name: str, date: str, sensor: str
) -> None:
    path = written[name]
    assert path.stat().st_size < 5_000_000
    with rasterio.open(path) as ds:
        assert ds.driver == "GTiff"
        assert (ds.count, ds.width, ds.height) == (3, 1024, 1024)
        assert ds.dtypes == ("uint8", "uint8", "uint8")
        assert ds.crs.to_epsg() == 32637
        assert ds.transform == harem.TRANSFORM
        assert ds.nodata is None
        assert ds.block_shapes == [(256, 256)] * 3
        assert ds.descriptions == ("red", "green", "blue")
        assert ds.colorinterp == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        structure = ds.tags(ns="IMAGE_STRUCTURE")
        assert structure["COMPRESSION"] == "DEFLATE"
        assert structure["PREDICTOR"] == "2"
        tags = ds.tags()
        assert tags["ACQUISITION_DATE"] == date
        assert tags["SENSOR"] == sensor
        assert "TIFFTAG_DATETIME" not in tags
        assert not any("shift" in k.lower() for k in tags)
    assert not Path(str(path) + ".aux.xml").exists()


# -- vectors -----------------------------------------------------------------


def test_vector_layers(written: dict[str, Path]) -> None:
    truth = gpd.read_file(written["truth"])
    assert truth.crs.to_epsg() == 4326
    assert list(truth.columns) == ["id", "severity", "kind", "site", "geometry"]
    assert truth["id"].is_unique
    assert set(truth["severity"]) <= set(harem.SEVERITIES)
    assert set(truth["site"]) <= {"market", "residential", ""}
    assert set(truth.geom_type) <= {"Polygon", "MultiPolygon"}
    assert truth.is_valid.all()
    assert set(truth["severity"]) == {"destroyed", "severe", "moderate", "possible"}
    assert 3 <= int((truth["severity"] == "moderate").sum()) <= 6

    aois = gpd.read_file(written["aois"])
    assert sorted(aois["name"]) == ["market", "residential"]
    for geom in _utm(aois).geometry:
        minx, miny, maxx, maxy = geom.bounds
        assert 120 <= maxx - minx <= 200
        assert 120 <= maxy - miny <= 200

    sites = gpd.read_file(written["sites"])
    assert list(sites["name"]) == [
        "first strike: market",
        "second strike: residential complex",
    ]
    # GDAL reads the ISO date string of the GeoJSON as a date
    assert {str(d)[:10] for d in sites["date"]} == {"2018-03-22"}
    assert (sites["uncertainty_m"] > 0).all()
    np.testing.assert_allclose(sites.geometry.x, [36.5199889, 36.519764], atol=1e-9)
    np.testing.assert_allclose(sites.geometry.y, [36.2093028, 36.210121], atol=1e-9)

    harmless = gpd.read_file(written["harmless"])
    assert harmless.crs.to_epsg() == 4326
    assert set(harmless["kind"]) == {
        "car",
        "stall",
        "umbrella",
        "repainted_roof",
        "new_object",
        "removed_object",
        "vegetation",
    }
    assert harmless.is_valid.all()


def test_everything_inside_the_image(written: dict[str, Path]) -> None:
    with rasterio.open(written["before"]) as ds:
        extent = shapely.box(*ds.bounds).buffer(0.01)
    for name in ("truth", "aois", "sites", "harmless"):
        layer = _utm(gpd.read_file(written[name]))
        assert layer.within(extent).all(), name


def test_truth_and_harmless_do_not_overlap(written: dict[str, Path]) -> None:
    truth = shapely.union_all(_utm(gpd.read_file(written["truth"])).geometry.values)
    harmless = shapely.union_all(
        _utm(gpd.read_file(written["harmless"])).geometry.values
    )
    # only shared edges, up to the 1e-7 degree rounding of the coordinates
    assert truth.intersection(harmless).area < 0.5
    assert truth.buffer(-0.05).intersection(harmless).area == pytest.approx(
        0.0, abs=1e-6
    )


def test_truth_polygons_do_not_overlap(written: dict[str, Path]) -> None:
    geoms = list(_utm(gpd.read_file(written["truth"])).geometry.buffer(-0.05))
    for i, g in enumerate(geoms):
        for h in geoms[i + 1 :]:
            assert g.intersection(h).area == pytest.approx(0.0, abs=1e-6)


def test_sites_fall_inside_the_damage(written: dict[str, Path]) -> None:
    truth = gpd.read_file(written["truth"])
    first = Point(36.5199889, 36.2093028)
    second = Point(36.519764, 36.210121)
    hit = truth[truth.contains(first)]
    assert len(hit) == 1
    assert hit.iloc[0]["site"] == "market"
    assert hit.iloc[0]["severity"] == "destroyed"
    hit = truth[truth.contains(second)]
    assert len(hit) == 1
    assert hit.iloc[0]["site"] == "residential"
    assert hit.iloc[0]["kind"] == "residential_block"
    assert hit.iloc[0]["severity"] in ("destroyed", "severe")


def test_damage_is_a_realistic_minority(written: dict[str, Path]) -> None:
    truth = _utm(gpd.read_file(written["truth"]))
    total = truth.area.sum()
    assert total < 0.10 * (1024 * 0.5) ** 2
    market = truth[
        (truth["site"] == "market") & (truth["severity"] == "destroyed")
    ].area.sum()
    assert market > 4000  # more than 100 shops
    kinds = set(truth["kind"])
    assert {"market_block", "crater", "residential_block", "building"} <= kinds


# -- writing -----------------------------------------------------------------


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    existing = tmp_path / "truth.geojson"
    existing.write_text("{}")
    with pytest.raises(OutputExistsError, match="truth.geojson"):
        harem.write_sample(tmp_path)
    assert existing.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truth.geojson"]


def test_interrupted_write_leaves_no_partial_file(
    sample: harem.HaremSample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harem, "generate", lambda seed=harem.DEFAULT_SEED: sample)

    def broken(path: Path, *args: object, **kwargs: object) -> None:
        path.write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(harem, "_write_geojson", broken)
    with pytest.raises(KeyboardInterrupt):
        harem.write_sample(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after.tif", "before.tif"]


@pytest.mark.slow
def test_every_planted_change_is_recorded() -> None:
    """Every change of albedo or height between the dates is inside a polygon.

    The scene is rendered for both dates without sun and sensor (which are global
    differences); every 0.25 m sample whose albedo or height differs must fall
    inside a truth or a harmless polygon.
    """
    rng = np.random.default_rng(harem.DEFAULT_SEED)
    r_scene, r_tex, r_damage, _, _ = rng.spawn(5)
    world = harem._SceneBuilder(r_scene).build()
    tex = harem._Textures(r_tex)
    canvases = {}
    for date in ("before", "after"):
        cv = harem._Canvas(tex)
        harem._render_ground(cv, world, date)
        harem._render_buildings(cv, world, date)
        harem._render_objects(cv, world, date)
        harem._render_domes(cv, world)
        harem._render_trees(cv, world, date)
        if date == "after":
            harem._render_damage(cv, world, r_damage, {})
        canvases[date] = cv
    before, after = canvases["before"], canvases["after"]
    changed = (np.abs(before.alb - after.alb).max(axis=0) > 1e-6) | (
        np.abs(before.h - after.h) > 1e-6
    )
    recorded = harem._burn([(d.poly, 1) for d in world.damage], np.uint8) > 0
    recorded |= harem._burn([(g, 1) for g, _ in world.harmless], np.uint8) > 0
    inner = np.s_[64:-64, 64:-64]  # the image, without the rendering margin
    assert changed[inner].sum() > 100_000
    assert not (changed[inner] & ~recorded[inner]).any()
