"""Bad input gives one clear line on stderr, the right exit code, and leaves nothing behind.

Every case runs the real command (``changedetect detect`` or ``changedetect run``) and
checks: the exact exit code (1 for a data problem, 2 for a usage or configuration
problem), that stderr is exactly one line starting with ``changedetect: error: `` (or
``changedetect: warning: `` when the input is repaired and the run goes on) that
names the file and the problem, that there is no traceback, and that a failed run
changes nothing on disk: no output folder, no parent folder, no partial file, and an
existing folder stays byte-identical.

The README section "Bad input, exit codes and interrupted runs" lists the messages these tests produce.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

from changedetect.cli.main import cli
from conftest import ORIGIN, UTM, rgb_scene

ERROR = "changedetect: error: "
WARNING = "changedetect: warning: "
#: Centre of the ``pair`` fixture's planted change (UTM metres).
PLANTED_CENTRE = (ORIGIN[0] + 0.5 * 90, ORIGIN[1] - 0.5 * 80)
OUTPUT_NAMES = ("after_coregistered.tif", "difference.tif", "ssim.tif", "score.tif", "damage.geojson",
                "aois.geojson", "summary.json", "coregistration.json", "quicklook.png", "manifest.json")


# --------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (hidden ones too): file bytes, or None for a folder."""
    return {
        p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def invoke(runner, args, root: Path | None = None):
    """Run the CLI; when ``root`` is given, assert the run changed nothing under it."""
    before = snapshot(root) if root is not None else None
    res = runner.invoke(cli, [str(a) for a in args])
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if root is not None:
        after = snapshot(root)
        assert sorted(after) == sorted(before), "files were added or removed"
        assert after == before, "a file was changed"
    return res


def assert_one_line(res, code: int, prefix: str | tuple[str, ...], *needles: str) -> str:
    """Exit code ``code``; stderr is one line starting with ``prefix`` and holding ``needles``."""
    assert res.exit_code == code, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert res.stderr.endswith("\n")
    line = lines[0]
    assert line.startswith(prefix), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def detect_fails(runner, tmp_path, before, after, code, *needles, extra=()):
    """``detect`` into a new nested folder must fail, name the file, and create nothing."""
    out = tmp_path / "new" / "out"
    res = invoke(runner, ["detect", before, after, "-o", out, *extra], root=tmp_path)
    assert_one_line(res, code, ERROR, *needles)
    assert not (tmp_path / "new").exists()
    return res


def write_tif(path: Path, array: np.ndarray, *, georef: bool = True, nodata=None, **options) -> Path:
    array = array if array.ndim == 3 else array[np.newaxis]
    profile = {"driver": "GTiff", "width": array.shape[2], "height": array.shape[1],
               "count": array.shape[0], "dtype": array.dtype.name, "nodata": nodata, **options}
    if georef:
        profile.update(crs=UTM, transform=from_origin(*ORIGIN, 0.5, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(array)
    return path


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def write_geojson(path: Path, geoms, names=None) -> Path:
    import geopandas as gpd

    gdf = gpd.GeoDataFrame({"name": names or [f"a{i}" for i in range(len(geoms))]}, geometry=geoms, crs=UTM)
    gdf.to_crs("EPSG:4326").to_file(path, driver="GeoJSON")
    return path


def assert_planted_change_found(out: Path) -> None:
    """The pair's planted 10 x 10 m change is mapped, and nothing else is.

    Checked by area, not by polygon count: these tests are about inputs, not about
    how the outline is drawn.
    """
    import geopandas as gpd
    from shapely.geometry import box

    cx, cy = PLANTED_CENTRE
    square = box(cx - 5, cy - 5, cx + 5, cy + 5)
    dmg = gpd.read_file(out / "damage.geojson").to_crs(UTM)
    assert len(dmg) >= 1
    assert dmg.geometry.union_all().intersection(square).area >= 0.5 * square.area
    assert dmg.geometry.intersects(square.buffer(5)).all(), "damage mapped away from the planted change"
    assert 50 <= dmg.geometry.area.sum() <= 250


def assert_complete_outputs(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert set(OUTPUT_NAMES) <= names
    assert not [n for n in names if "partial" in n]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["path"] for r in manifest["outputs"]} == names - {"manifest.json"}


def pipeline(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


PAIR_INPUTS = '[inputs]\nbefore = "before.tif"\nafter = "after.tif"\n'


# --------------------------------------------------------------------------- raster files
def _deflate_copy(src: Path, dst: Path) -> bytes:
    write_tif(dst, read(src), compress="deflate")
    return dst.read_bytes()


def _empty(path, good):
    path.write_bytes(b"")


def _text(path, good):
    path.write_text("id,damage\n1,destroyed\n")


def _truncated(path, good):
    data = _deflate_copy(good, path)
    path.write_bytes(data[: len(data) // 2])


def _corrupt_pixels(path, good):
    data = bytearray(_deflate_copy(good, path))
    mid = len(data) // 2
    data[mid : mid + 4096] = b"\xa5" * 4096
    path.write_bytes(bytes(data))


def _corrupt_header(path, good):
    data = bytearray(good.read_bytes())
    data[4:8] = b"\xff\xff\xff\x7f"  # offset of the first TIFF directory
    path.write_bytes(bytes(data))


def _not_georeferenced(path, good):
    write_tif(path, read(good), georef=False)


def _all_nodata(path, good):
    write_tif(path, np.zeros_like(read(good)), nodata=0)


def _nan_only(path, good):
    write_tif(path, np.full(read(good).shape, np.nan, np.float32))


BAD_RASTERS = {
    "empty file": (_empty, ["raster is empty"]),
    "text renamed .tif": (_text, ["not a readable raster", "not recognized as being in a supported file format"]),
    "truncated GeoTIFF": (_truncated, ["cannot read pixels, the file is truncated or corrupt"]),
    "corrupt pixel data": (_corrupt_pixels, ["cannot read pixels, the file is truncated or corrupt", "Decoding error"]),
    "corrupt header": (_corrupt_header, ["not a readable raster (TIFFReadDirectory:Failed to read directory"]),
    "no georeferencing": (_not_georeferenced, ["raster has no georeferencing"]),
    "all nodata": (_all_nodata, ["has no valid pixel"]),
    "NaN only": (_nan_only, ["has no valid pixel"]),
}


@pytest.mark.parametrize("role", ["before", "after"])
@pytest.mark.parametrize("kind", list(BAD_RASTERS))
def test_bad_raster(runner, pair, tmp_path, kind, role):
    make, needles = BAD_RASTERS[kind]
    before, after = pair
    bad = tmp_path / f"bad_{role}.tif"
    make(bad, before if role == "before" else after)
    args = (bad, after) if role == "before" else (before, bad)
    detect_fails(runner, tmp_path, *args, 1, str(bad), *needles)




@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_missing_or_directory_raster_on_command_line(runner, pair, tmp_path, kind):
    before, _ = pair
    bad = tmp_path / "after_missing.tif"
    if kind == "directory":
        bad.mkdir()
    res = invoke(runner, ["detect", before, bad, "-o", tmp_path / "new" / "out"], root=tmp_path)
    line = assert_one_line(res, 2, ERROR, str(bad))
    problem = ("is a directory",) if kind == "directory" else ("does not exist", "not found")
    assert any(p in line for p in problem), line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("missing", "inputs.after: file not found: missing.tif"),
     ("directory", "inputs.after: is a directory, expected a file: missing.tif")],
)
def test_missing_or_directory_raster_in_pipeline(runner, pair, tmp_path, kind, needle):
    if kind == "directory":
        (tmp_path / "missing.tif").mkdir()
    p = pipeline(tmp_path, '[inputs]\nbefore = "before.tif"\nafter = "missing.tif"\n')
    res = invoke(runner, ["run", p, "--out", tmp_path / "new" / "out"], root=tmp_path)
    assert_one_line(res, 2, ERROR, str(p), needle)


def test_real_process_stderr_is_one_line(pair, tmp_path):
    """GDAL prints read errors from its warper threads straight to the process's stderr.

    CliRunner cannot see that, so run a real process on a corrupt after image.
    """
    before, after = pair
    bad = tmp_path / "corrupt.tif"
    _corrupt_pixels(bad, after)
    out = tmp_path / "new" / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "changedetect", "detect", str(before), str(bad), "-o", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{ERROR}{bad}: cannot read pixels, the file is truncated or corrupt")
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- grids
def test_no_overlap(runner, pair, tmp_path):
    before, _ = pair
    far = write_tif(tmp_path / "far.tif", rgb_scene((64, 64)))
    with rasterio.open(far, "r+") as dst:
        dst.transform = from_origin(500000, 4000000, 0.5, 0.5)
    detect_fails(runner, tmp_path, before, far, 1, str(far), "does not overlap the before image before.tif")


def test_overlap_too_small(runner, pair, tmp_path):
    before, _ = pair
    corner = write_tif(tmp_path / "corner.tif", rgb_scene((64, 64)))
    with rasterio.open(corner, "r+") as dst:  # 4 x 4 px over the before image's bottom-right corner
        dst.transform = from_origin(ORIGIN[0] + 0.5 * 156, ORIGIN[1] - 0.5 * 156, 0.5, 0.5)
    detect_fails(runner, tmp_path, before, corner, 1, str(corner), "overlaps the before image by less than 8 x 8 pixels")


def test_no_pixel_with_data_in_both(runner, pair, tmp_path):
    before, after = pair
    b, a = read(before), read(after)
    b[:, :, 80:] = 0
    a[:, :, :80] = 0
    left = write_tif(tmp_path / "left.tif", b, nodata=0)
    right = write_tif(tmp_path / "right.tif", a, nodata=0)
    detect_fails(runner, tmp_path, left, right, 1, str(right), "no pixel has data in both images")


# --------------------------------------------------------------------------- bands
@pytest.mark.parametrize("count", [1, 4])
def test_band_count_mismatch_uses_common_bands(runner, pair, tmp_path, count):
    """3 vs 1 or 3 vs 4 bands: the default uses bands 1..min(count) and says so."""
    before, after = pair
    a = read(after)
    a = a[:1] if count == 1 else np.concatenate([a, np.full_like(a[:1], 255)])
    other = write_tif(tmp_path / f"after{count}.tif", a)
    out = tmp_path / "out"
    res = invoke(runner, ["detect", before, other, "-o", out])
    n = min(3, count)
    assert_one_line(
        res, 0, ("changedetect: WARNING: ", WARNING),
        f"band counts differ (before.tif: 3, after{count}.tif: {count}): using the first {n} band(s); "
        "set inputs.bands to choose",
    )
    assert_complete_outputs(out)
    with rasterio.open(out / "after_coregistered.tif") as src:
        assert src.count == n
    assert_planted_change_found(out)


def test_band_selection_in_pipeline(runner, pair, tmp_path):
    """``inputs.bands`` picks bands explicitly: no warning, only those bands are used."""
    _, after = pair
    a = read(after)
    write_tif(tmp_path / "after4.tif", np.concatenate([a, np.full_like(a[:1], 255)]))
    p = pipeline(tmp_path, '[inputs]\nbefore = "before.tif"\nafter = "after4.tif"\nbands = [1, 3]\n')
    out = tmp_path / "out"
    res = invoke(runner, ["run", p, "--out", out])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    with rasterio.open(out / "after_coregistered.tif") as src:
        assert src.count == 2
    assert_planted_change_found(out)


@pytest.mark.parametrize("short", ["before", "after"])
def test_band_that_does_not_exist(runner, pair, tmp_path, short):
    """Asking for band 4 when one image has only 3 is a configuration error naming that image."""
    before, after = pair
    names = {"before": "before.tif", "after": "after.tif"}
    long_one = "after" if short == "before" else "before"
    a = read(after if long_one == "after" else before)
    names[long_one] = f"{long_one}4.tif"
    write_tif(tmp_path / names[long_one], np.concatenate([a, np.full_like(a[:1], 255)]))
    p = pipeline(tmp_path, f'[inputs]\nbefore = "{names["before"]}"\nafter = "{names["after"]}"\nbands = [1, 4]\n')
    res = invoke(runner, ["run", p, "--out", tmp_path / "new" / "out"], root=tmp_path)
    assert_one_line(res, 2, ERROR, f"{tmp_path / names[short]}: has 3 band(s), inputs.bands asks for [4]")


def test_band_zero_is_a_config_error(runner, pair, tmp_path):
    p = pipeline(tmp_path, PAIR_INPUTS + "bands = [0]\n")
    res = invoke(runner, ["run", p, "--out", tmp_path / "new" / "out"], root=tmp_path)
    assert_one_line(res, 2, ERROR, f"{p}: inputs.bands: bands must be a non-empty list of 1-based band numbers")


@pytest.mark.parametrize("wide", ["after", "before"])
def test_8bit_vs_16bit_is_normalised(runner, pair, tmp_path, wide):
    """A 12-bit-in-uint16 image against an 8-bit one: scaled to [0, 1] each, change found."""
    before, after = pair
    src = after if wide == "after" else before
    u16 = write_tif(tmp_path / f"{wide}16.tif", read(src).astype(np.uint16) * 16)
    args = (before, u16) if wide == "after" else (u16, after)
    out = tmp_path / "out"
    res = invoke(runner, ["detect", *args, "-o", out])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    assert_complete_outputs(out)
    with rasterio.open(out / "after_coregistered.tif") as dst:
        assert dst.dtypes[0] == ("uint16" if wide == "after" else "uint8")
    assert_planted_change_found(out)


# --------------------------------------------------------------------------- pixel limit
def test_decompression_bomb_refused_before_reading(runner, pair, tmp_path):
    """A 440 kB sparse GeoTIFF that declares 60000 x 60000 px: refused from its header.

    Decoding it would take 3.6 GB per band as uint8 (14 GB as float32).
    """
    before, _ = pair
    bomb = tmp_path / "bomb.tif"
    with rasterio.open(bomb, "w", driver="GTiff", width=60000, height=60000, count=1, dtype="uint8",
                       crs=UTM, transform=from_origin(*ORIGIN, 0.5, 0.5), tiled=True,
                       compress="deflate", sparse_ok=True):
        pass
    assert bomb.stat().st_size < 1_000_000
    detect_fails(runner, tmp_path, before, bomb, 1, f"{bomb}: raster is 60000 x 60000 px, above the limit "
                 "of 1000000000 px per band (raise limits.max_pixels to allow it)")


def test_pixel_limit_is_configurable(runner, pair, tmp_path):
    before, after = pair
    detect_fails(runner, tmp_path, before, after, 1, f"{before}: raster is 160 x 160 px, above the limit of 10000 px",
                 extra=["--set", "limits.max_pixels=10000"])


# --------------------------------------------------------------------------- areas of interest
def _aoi_text(text):
    def make(path):
        path.write_text(text)
    return make


def _aoi_outside(path):
    from shapely.geometry import box

    write_geojson(path, [box(ORIGIN[0] + 500, ORIGIN[1] - 600, ORIGIN[0] + 600, ORIGIN[1] - 500)])


BAD_AOIS = {
    "broken GeoJSON": (_aoi_text('{"type": "FeatureCollection", "features": ['), 1,
                       ["AOI file could not be read", "Unterminated array"]),
    "JSON but not GeoJSON": (_aoi_text('{"damage": "yes"}'), 1,
                             ["AOI file could not be read (not recognized as being in a supported file format.)"]),
    "empty AOI file": (_aoi_text(""), 1, ["AOI file is empty"]),
    "points only": (_aoi_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
                              '"geometry": {"type": "Point", "coordinates": [36.5, 36.2]}}]}'), 1,
                    ["AOI file has no polygon"]),
    "AOI outside the rasters": (_aoi_outside, 1, ["no AOI overlaps the area covered by both images"]),
}


@pytest.mark.parametrize("kind", list(BAD_AOIS))
def test_bad_aoi(runner, pair, tmp_path, kind):
    make, code, needles = BAD_AOIS[kind]
    before, after = pair
    aoi = tmp_path / "aoi.geojson"
    make(aoi)
    out = tmp_path / "new" / "out"
    res = invoke(runner, ["detect", before, after, "-o", out, "--aoi", aoi], root=tmp_path)
    assert_one_line(res, code, ERROR, str(aoi), *needles)


def test_self_intersecting_aoi_is_repaired_with_a_warning(runner, pair, tmp_path):
    import geopandas as gpd
    from shapely.geometry import Polygon

    before, after = pair
    x0, y0 = ORIGIN
    # Edges cross at (10, -40) m from the origin: a 32 m2 left lobe and a 2312 m2 right
    # lobe that holds the whole planted change.
    ring = [(2, -36), (78, -74), (78, -6), (2, -44)]
    bowtie = Polygon([(x0 + x, y0 + y) for x, y in ring])
    assert not bowtie.is_valid
    aoi = write_geojson(tmp_path / "bowtie.geojson", [bowtie], names=["bowtie"])
    out = tmp_path / "out"
    res = invoke(runner, ["detect", before, after, "-o", out, "--aoi", aoi])
    assert_one_line(res, 0, WARNING, f"{aoi}: 1 invalid geometry(ies) repaired (make_valid)")
    assert_complete_outputs(out)
    aois = gpd.read_file(out / "aois.geojson").to_crs(UTM)
    assert aois.geometry.is_valid.all()
    assert aois.geometry.area.sum() == pytest.approx(32 + 2312, rel=0.01)  # both lobes kept
    assert_planted_change_found(out)


# --------------------------------------------------------------------------- pipeline files
BAD_PIPELINES = {
    "syntax error": ('name = "x"\n' + PAIR_INPUTS + "[damage\n", ["TOML syntax error", "(at line 5, column 8)"]),
    "unknown key": (PAIR_INPUTS + "[damage]\nminarea = 1\n", ["damage.minarea: unknown key"]),
    "wrong type": (PAIR_INPUTS + '[damage]\nmin_area_m2 = "big"\n', ["damage.min_area_m2: Input should be a valid number"]),
    "out of range": (PAIR_INPUTS + "[damage]\nmin_area_m2 = -3\n", ["damage.min_area_m2: Input should be greater than or equal to 0"]),
    "missing path": ('[inputs]\nbefore = "before.tif"\nafter = "after_2023.tif"\n', ["inputs.after: file not found: after_2023.tif"]),
    "missing section key": ('[inputs]\nbefore = "before.tif"\n', ["inputs.after: required key missing"]),
}


@pytest.mark.parametrize("kind", list(BAD_PIPELINES))
def test_bad_pipeline(runner, pair, tmp_path, kind):
    text, needles = BAD_PIPELINES[kind]
    p = pipeline(tmp_path, text)
    res = invoke(runner, ["run", p, "--out", tmp_path / "new" / "out"], root=tmp_path)
    assert_one_line(res, 2, ERROR, f"{p}: ", *needles)


def test_pipeline_file_not_found(runner, tmp_path):
    p = tmp_path / "none.toml"
    res = invoke(runner, ["run", p, "--out", tmp_path / "new" / "out"], root=tmp_path)
    assert_one_line(res, 2, ERROR, f"{p}: pipeline file not found")


def test_pipeline_file_is_a_directory(runner, tmp_path):
    p = tmp_path / "pipelines"
    p.mkdir()
    res = invoke(runner, ["run", p, "--out", tmp_path / "new" / "out"], root=tmp_path)
    assert_one_line(res, 2, ERROR, str(p), "is a directory")


# --------------------------------------------------------------------------- output folder
def test_unwritable_output_folder(runner, pair, tmp_path):
    """An output folder below a regular file cannot be created, not even by root.

    Permission bits do not stop root (chmod 0o500 would not make a test fail as
    root), but no user can create a directory inside a file (ENOTDIR).
    """
    before, after = pair
    notes = tmp_path / "notes.txt"
    notes.write_text("case notes\n")
    res = invoke(runner, ["detect", before, after, "-o", notes / "out"], root=tmp_path)
    assert_one_line(res, 1, ERROR, f"{notes / 'out'}: cannot write to output folder (Not a directory)")


def test_output_is_a_file(runner, pair, tmp_path):
    before, after = pair
    notes = tmp_path / "notes.txt"
    notes.write_text("case notes\n")
    res = invoke(runner, ["detect", before, after, "-o", notes, "--overwrite"], root=tmp_path)
    assert_one_line(res, 1, ERROR, f"{notes}: output exists and is not a folder")


def _old_outputs(out: Path) -> None:
    out.mkdir()
    for name in OUTPUT_NAMES:
        (out / name).write_bytes(f"old {name}\n".encode())
    (out / "notes.txt").write_text("analyst's notes\n")
    (out / "extra").mkdir()
    (out / "extra" / "photo.jpg").write_bytes(b"\xff\xd8old")


def test_existing_folder_refused_byte_identical(runner, pair, tmp_path):
    before, after = pair
    out = tmp_path / "out"
    _old_outputs(out)
    res = invoke(runner, ["detect", before, after, "-o", out], root=tmp_path)
    assert_one_line(res, 2, ERROR, f"{out}: output folder exists and is not empty (use --overwrite to replace its outputs)")


def test_failed_overwrite_keeps_old_outputs(runner, pair, tmp_path):
    """With --overwrite, a run that fails midway (after image all nodata) keeps the old outputs."""
    before, after = pair
    out = tmp_path / "out"
    _old_outputs(out)
    bad = tmp_path / "blank.tif"
    _all_nodata(bad, after)
    res = invoke(runner, ["detect", before, bad, "-o", out, "--overwrite"], root=tmp_path)
    assert_one_line(res, 1, ERROR, f"{bad}: has no valid pixel over the before image")


# --------------------------------------------------------------------------- building footprints
def test_unreadable_building_footprints(runner, pair, tmp_path):
    before, after = pair
    bad = tmp_path / "footprints.geojson"
    bad.write_text("not a vector file")
    detect_fails(runner, tmp_path, before, after, 1, f"{bad}: building footprints could not be read",
                 extra=["--buildings", bad])


def test_building_footprints_without_polygons(runner, pair, tmp_path):
    import geopandas as gpd
    from shapely.geometry import Point

    before, after = pair
    points = tmp_path / "points.geojson"
    gpd.GeoDataFrame(geometry=[Point(ORIGIN[0] + 10, ORIGIN[1] - 10)], crs=UTM).to_file(points)
    detect_fails(runner, tmp_path, before, after, 1, f"{points}: building footprints file has no polygon",
                 extra=["--buildings", points])
