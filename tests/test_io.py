import numpy as np
import pytest
import rasterio

from changedetect import io
from changedetect.errors import DataError, OutputExistsError
from changedetect.grid import Grid
from conftest import rgb_scene


def test_read_grid_scales_uint8(make_raster):
    path = make_raster(rgb_scene((32, 32)))
    arr, valid, scale = io.read_grid(path)
    assert arr.dtype == np.float32
    assert arr.shape == (3, 32, 32)
    assert scale == 255.0
    assert valid.all()
    assert arr.max() <= 1.0


def test_read_grid_nodata_is_invalid(make_raster):
    a = rgb_scene((32, 32))
    a[:, :, :4] = 0
    path = make_raster(a, nodata=0)
    _, valid, _ = io.read_grid(path)
    assert not valid[:, :4].any()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "raster not found"),
        ("dir", "is a directory"),
        ("empty", "raster is empty"),
        ("text", "not a readable raster"),
    ],
)
def test_bad_raster_messages(tmp_path, setup, message):
    path = tmp_path / "x.tif"
    if setup == "dir":
        path.mkdir()
    elif setup == "empty":
        path.write_bytes(b"")
    elif setup == "text":
        path.write_text("this is not an image\n")
    with pytest.raises(DataError, match=message) as err:
        io.raster_info(path)
    assert str(path) in str(err.value)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_not_georeferenced(tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(DataError, match="no georeferencing"):
        io.raster_info(path)


def test_pixel_limit_refuses_before_reading(make_raster):
    path = make_raster(np.zeros((1, 64, 64), np.uint8))
    with pytest.raises(DataError, match="above the limit"):
        io.read_grid(path, max_pixels=1000)


def test_write_cog_is_cog_deterministic_and_atomic(tmp_path, make_raster):
    info = io.raster_info(make_raster(rgb_scene((300, 300))))
    arr = np.random.default_rng(1).random((300, 300), dtype=np.float32)
    arr[:10] = np.nan
    p1, p2 = tmp_path / "a.tif", tmp_path / "b.tif"
    io.write_cog(p1, arr, info.grid, nodata=float("nan"), tags={"K": {"a": 1}})
    io.write_cog(p2, arr, info.grid, nodata=float("nan"), tags={"K": {"a": 1}})
    assert p1.read_bytes() == p2.read_bytes()
    with rasterio.open(p1) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.tags()["K"] == '{"a": 1}'
    with pytest.raises(OutputExistsError, match="exists"):
        io.write_cog(p1, arr, info.grid)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_atomic_output_removes_partial_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), io.atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_refuses_and_cleans(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), io.OutputFolder(out) as folder:
        folder.file("a.txt").write_text("x")
        raise KeyboardInterrupt
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("k")
    with pytest.raises(OutputExistsError, match="not empty"):
        io.OutputFolder(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_warp_to_grid_with_shift_moves_content(make_raster):
    a = rgb_scene((64, 64))
    path = make_raster(a)
    info = io.raster_info(path)
    out, valid, dtype, _ = io.warp_to_grid(path, info.grid.shifted(2, 3), resampling="nearest")
    assert dtype == "uint8"
    assert np.array_equal(out[:, :50, :50], a[:, 2:52, 3:53].astype(np.float32))
    assert not valid[-1].any()


def test_grid_window_and_bounds():
    from affine import Affine

    g = Grid("EPSG:32637", Affine(0.5, 0, 100, 0, -0.5, 200), 10, 20)
    assert g.bounds == (100, 190, 105, 200)
    assert g.window_grid(2, 4, 5, 6).transform.c == 102


@pytest.mark.parametrize(
    "dtype, nodata, tiled",
    [("uint8", None, True), ("uint16", 7, True), ("float32", None, False), ("float32", -1.0, True)],
)
def test_block_row_reads_equal_direct_reads(tmp_path, dtype, nodata, tiled):
    """Windows cut from cached block rows (inside gdal_env) equal windows read directly."""
    from rasterio.windows import Window

    rng = np.random.default_rng(5)
    arr = (rng.random((3, 700, 300)) * 200).astype(dtype)
    if nodata is not None:
        arr[:, 100:180, 40:90] = nodata
    if np.dtype(dtype).kind == "f":
        arr[1, 400:420, 10:20] = np.nan
    path = tmp_path / "r.tif"
    profile = {"driver": "GTiff", "width": 300, "height": 700, "count": 3, "dtype": dtype, "crs": "EPSG:32637",
               "transform": rasterio.Affine(0.5, 0, 0, 0, -0.5, 0), "nodata": nodata}
    if tiled:
        profile.update(tiled=True, blockxsize=64, blockysize=64)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)
    windows = [Window(0, 0, 300, 700), Window(13, 250, 200, 301), Window(0, 255, 300, 2), Window(299, 699, 1, 1)]
    windows += [Window(int(c), int(r), 17, 290) for r, c in rng.integers(0, 280, (6, 2))]
    with io.open_raster(path) as src:
        direct = [io._read_window(src, path, [1, 3], w) for w in windows]
    with io.gdal_env(), io.open_raster(path) as src:
        cached = [io._read_window(src, path, [1, 3], w) for w in windows]
        assert io._BLOCK_ROWS.get().entries  # the cache was used
    for (d, dv), (c, cv) in zip(direct, cached, strict=True):
        np.testing.assert_array_equal(dv, cv)
        np.testing.assert_array_equal(d, c)  # NaN where NaN
    assert io._BLOCK_ROWS.get() is None


def _plain_cog(tmp_path, arr, grid, valid=None, name="ref.tif"):
    """The COG GDAL's driver makes from a plain tiled GeoTIFF (no overviews) of ``arr``."""
    import rasterio.shutil

    src, out = tmp_path / f"src_{name}", tmp_path / name
    profile = {"driver": "GTiff", "width": grid.width, "height": grid.height, "count": arr.shape[0],
               "dtype": arr.dtype, "crs": grid.crs, "transform": grid.transform, "tiled": True,
               "blockxsize": 256, "blockysize": 256,
               "nodata": float("nan") if arr.dtype.kind == "f" else None}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(src, "w", **profile) as dst:
            dst.write(arr)
            if valid is not None:
                dst.write_mask(np.where(valid, 255, 0).astype(np.uint8))
        predictor = 3 if arr.dtype.kind == "f" else 2
        rasterio.shutil.copy(src, out, driver="COG", predictor=predictor, **io.COG_OPTIONS)
    return out


@pytest.mark.parametrize(("width", "height"), [(1024, 768), (1000, 600), (513, 200), (300, 2049), (256, 256)])
def test_cog_overview_factors_are_the_cog_drivers(tmp_path, width, height):
    grid = Grid("EPSG:32637", rasterio.Affine(0.5, 0, 0, 0, -0.5, 0), width, height)
    ref = _plain_cog(tmp_path, np.zeros((1, height, width), np.float32), grid)
    with rasterio.open(ref) as src:
        assert io.cog_overview_factors(width, height, io.COG_OPTIONS["blocksize"]) == src.overviews(1)


@pytest.mark.parametrize("kind", ["float32", "uint8_masked"])
def test_strip_writer_makes_the_cog_drivers_file(tmp_path, kind):
    """Strips of any height, held back to whole tile rows, with overviews built on them:
    byte for byte the COG GDAL's driver makes of the whole array (sides divisible by
    the largest overview factor); in a background thread too, with the strips
    readable until the COG is done."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    h, w = 768, 1024
    grid = Grid("EPSG:32637", rasterio.Affine(0.5, 0, 0, 0, -0.5, 0), w, h)
    if kind == "float32":
        arr = rng.random((1, h, w), dtype=np.float32)
        arr[0, :40, 100:300] = np.nan
        valid, opts = None, {"count": 1, "dtype": "float32", "nodata": float("nan")}
    else:
        arr = (rng.random((3, h, w)) * 255).astype(np.uint8)
        valid = np.ones((h, w), bool)
        valid[300:420, :77] = False
        opts = {"count": 3, "dtype": "uint8", "mask": True}
    ref = _plain_cog(tmp_path, arr, grid, valid)

    def write(path, background=None):
        writer = io.StripWriter(path, grid, **opts)
        with io.gdal_env():
            for r in range(0, h, 77):  # not a multiple of the tile rows
                writer.write(r, arr[:, r:r + 77], None if valid is None else valid[r:r + 77])
            if background is None:
                return writer.finish()
            writer.finish_later(background)
            assert writer.readable != path
            np.testing.assert_array_equal(writer.read(100, 300), arr[:, 100:300])
            return writer.wait()

    assert write(tmp_path / "a.tif").read_bytes() == ref.read_bytes()
    with ThreadPoolExecutor(1) as pool:
        assert write(tmp_path / "b.tif", pool).read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".a", ".b"))) == []


def test_strip_writer_abort_while_the_cog_is_made(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    grid = Grid("EPSG:32637", rasterio.Affine(0.5, 0, 0, 0, -0.5, 0), 600, 600)
    writer = io.StripWriter(tmp_path / "a.tif", grid, count=1, dtype="float32")
    writer.write(0, np.ones((600, 600), np.float32))
    with ThreadPoolExecutor(1) as pool:
        writer.finish_later(pool)
        writer.abort()  # waits for the COG, then drops the strips
    assert not writer.tmp.exists()
