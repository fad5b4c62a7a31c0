"""changedetect batch: jobs on dask.distributed, skip verified outputs, report failures."""

import json
from pathlib import Path

import pytest

from changedetect import batch as batch_mod
from changedetect.batch import format_summary, plan_jobs, run_job
from changedetect.cli.main import cli
from changedetect.pipeline import verify


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _pipeline(
    path: Path, name: str, before: str, after: str, outdir: str | None = None
) -> Path:
    text = f'name = "{name}"\n[inputs]\nbefore = "{before}"\nafter = "{after}"\n'
    if outdir is not None:
        text += f'[output]\ndir = "{outdir}"\n'
    return _write(path, text)


def _rows(output: str) -> dict[str, str]:
    """Summary table lines by pipeline (first column)."""
    return {
        line.split()[0]: line
        for line in output.splitlines()[1:]
        if line.strip() and " job(s): " not in line
    }


# distributed warns (UserWarning) when making its scratch folder is slow on a busy machine.
@pytest.mark.filterwarnings(
    "ignore:Creating scratch directories is taking a surprisingly long time:UserWarning"
)
def test_batch_runs_reports_failures_and_skips_verified(runner, pair, tmp_path):
    from distributed import LocalCluster

    before, after = pair
    # two good pipelines with the same name (folders made unique) and one whose
    # after image is missing (load_pipeline raises in the worker).
    alpha = _pipeline(tmp_path / "alpha.toml", "site", before.name, after.name)
    beta = _pipeline(tmp_path / "beta.toml", "site", before.name, after.name)
    broken = _pipeline(
        tmp_path / "broken.toml", "broken", before.name, "missing_after.tif"
    )
    out = tmp_path / "out"
    args = ["batch", str(alpha), str(broken), str(beta), "--out-root", str(out)]

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        args += ["--scheduler", cluster.scheduler_address]
        res = runner.invoke(cli, args)
        assert res.exit_code == 1, res.output
        rows = _rows(res.stdout)
        assert set(rows) == {str(alpha), str(broken), str(beta)}
        assert " ok " in rows[str(alpha)]
        assert rows[str(alpha)].endswith(str(out / "site"))
        assert rows[str(beta)].endswith(str(out / "site-2"))
        status, polygons, _, error = rows[str(broken)].split(maxsplit=4)[1:]
        assert (status, polygons) == ("failed", "-")
        assert error == f"{broken}: inputs.after: file not found: missing_after.tif"
        summary = json.loads((out / "site" / "summary.json").read_text())
        assert rows[str(alpha)].split()[2] == str(summary["polygon_count"])
        assert "3 job(s): 2 ok, 0 skipped (verified), 1 failed" in res.stdout
        for name in ("site", "site-2"):
            assert verify(out / name)["ok"]
        assert not (out / "broken").exists()

        # again: the verified outputs are skipped and left untouched.
        stamp = (out / "site" / "manifest.json").stat().st_mtime_ns
        res = runner.invoke(cli, args)
    assert res.exit_code == 1, res.output
    rows = _rows(res.stdout)
    assert "skipped (verified)" in rows[str(alpha)]
    assert "skipped (verified)" in rows[str(beta)]
    assert rows[str(alpha)].split()[3] == str(summary["polygon_count"])
    assert "file not found: missing_after.tif" in rows[str(broken)]
    assert "3 job(s): 0 ok, 2 skipped (verified), 1 failed" in res.stdout
    assert (out / "site" / "manifest.json").stat().st_mtime_ns == stamp


def test_batch_on_its_own_local_cluster(runner, pair, tmp_path):
    # the default: a LocalCluster of --workers processes made for the run.
    before, _ = pair
    missing = _pipeline(
        tmp_path / "missing.toml", "m", before.name, "gone.tif", outdir="out/m"
    )
    syntax = _write(tmp_path / "syntax.toml", "[inputs\n")
    res = runner.invoke(
        cli,
        [
            "batch",
            "--workers",
            "2",
            str(missing),
            str(syntax),
            str(tmp_path / "none.toml"),
        ],
    )
    assert res.exit_code == 1, res.output
    rows = _rows(res.stdout)
    assert "inputs.after: file not found: gone.tif" in rows[str(missing)]
    assert f"{syntax}: TOML syntax error" in rows[str(syntax)]
    assert (
        f"{tmp_path / 'none.toml'}: pipeline file not found"
        in rows[str(tmp_path / "none.toml")]
    )
    assert "3 job(s): 0 ok, 0 skipped (verified), 3 failed" in res.stdout


def test_unusable_scheduler_address(runner, tmp_path):
    p = _pipeline(tmp_path / "a.toml", "a", "b.tif", "a.tif")
    res = runner.invoke(cli, ["batch", str(p), "--scheduler", "nonsense://x"])
    assert res.exit_code == 1
    assert "cannot connect to the dask scheduler at nonsense://x" in res.stderr


def test_plan_jobs_out_root_names_and_own_output_dirs(tmp_path):
    a = _pipeline(
        tmp_path / "a.toml", "Harem / market", "b.tif", "a.tif", outdir="../results/a"
    )
    b = _pipeline(tmp_path / "b.toml", "harem_market", "b.tif", "a.tif")
    c = _write(tmp_path / "c.toml", "not = [valid toml")
    d = _write(
        tmp_path / "d.toml", '[inputs]\nbefore = "b.tif"\nafter = "a.tif"\n'
    )  # default name
    jobs = plan_jobs([a, b, c, d], out_root=tmp_path / "root")
    assert [j.outdir.name for j in jobs] == ["Harem_market", "harem_market-2", "c", "d"]
    assert all(j.outdir.parent == tmp_path / "root" for j in jobs)
    assert [j.label for j in jobs] == [str(p) for p in (a, b, c, d)]

    own = plan_jobs([a, b, c])
    assert [j.outdir for j in own] == [None, None, None]
    assert own[0].expected_outdir == tmp_path / "../results/a"
    assert own[1].expected_outdir is None


def test_two_jobs_with_one_output_folder_are_refused(tmp_path):
    a = _pipeline(tmp_path / "a.toml", "a", "b.tif", "a.tif", outdir="out")
    b = _pipeline(tmp_path / "b.toml", "b", "b.tif", "a.tif", outdir="./out")
    clashes = batch_mod._clashes(plan_jobs([a, b]))
    assert list(clashes) == [1]
    assert f"output folder is also that of {a}" in clashes[1]


def test_run_job_reports_errors_without_raising(tmp_path, monkeypatch):
    bad = _write(tmp_path / "bad.toml", "[inputs\n")
    result = run_job(str(bad), label="bad.toml")
    assert result["status"] == "failed"
    assert result["pipeline"] == "bad.toml"
    assert result["error"].startswith(f"{bad}: TOML syntax error")

    missing = run_job(str(tmp_path / "none.toml"))
    assert missing["error"] == f"{tmp_path / 'none.toml'}: pipeline file not found"

    def boom(path):
        raise RuntimeError("disk\non fire")

    monkeypatch.setattr("changedetect.config.load_pipeline", boom)
    result = run_job(str(bad))
    assert result["error"] == "RuntimeError: disk on fire"


def test_format_summary():
    results = [
        {
            "pipeline": "a.toml",
            "status": "ok",
            "outdir": "/o/a",
            "polygons": 3,
            "seconds": 12.34,
            "error": None,
            "warnings": [],
        },
        {
            "pipeline": "bb.toml",
            "status": "failed",
            "outdir": None,
            "polygons": None,
            "seconds": 0.0,
            "error": "bb.toml: boom",
            "warnings": [],
        },
    ]
    lines = format_summary(results).splitlines()
    assert lines[0].split() == [
        "pipeline",
        "status",
        "polygons",
        "seconds",
        "output",
        "/",
        "error",
    ]
    assert lines[1].split() == ["a.toml", "ok", "3", "12.3", "/o/a"]
    assert lines[2].split() == ["bb.toml", "failed", "-", "0.0", "bb.toml:", "boom"]
    assert lines[3] == "2 job(s): 1 ok, 0 skipped (verified), 1 failed"


def test_workers_and_scheduler_exclusive(runner, tmp_path):
    p = _pipeline(tmp_path / "a.toml", "a", "b.tif", "a.tif")
    res = runner.invoke(
        cli, ["batch", str(p), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"]
    )
    assert res.exit_code == 2
    assert "cannot be combined" in res.stderr


def test_batch_help(runner):
    res = runner.invoke(cli, ["batch", "--help"])
    assert res.exit_code == 0
    assert "Example" in res.output


def _two_aois(path: Path) -> Path:
    import geopandas as gpd
    from shapely.geometry import box

    from conftest import ORIGIN

    x, y = ORIGIN
    gpd.GeoDataFrame({"name": ["west", "east"]},
                     geometry=[box(x, y - 80, x + 40, y), box(x + 40, y - 80, x + 80, y)],
                     crs="EPSG:32637").to_file(path)
    return path


def test_plan_jobs_split_aois(pair, tmp_path):
    before, after = pair
    _two_aois(tmp_path / "aois.geojson")
    pipe = _write(tmp_path / "city.toml", f'name = "city"\n[inputs]\nbefore = "{before.name}"\n'
                                          f'after = "{after.name}"\naois = "aois.geojson"\n')
    jobs = plan_jobs([pipe], out_root=tmp_path / "out", split_aois=True)
    assert [j.aoi for j in jobs] == ["west", "east"]
    assert [j.outdir for j in jobs] == [tmp_path / "out" / "city" / "west", tmp_path / "out" / "city" / "east"]
    assert [j.label for j in jobs] == [f"{pipe} [west]", f"{pipe} [east]"]
    assert [j.aoi for j in plan_jobs([pipe], out_root=tmp_path / "out")] == [None]


# distributed warns (UserWarning) when making its scratch folder is slow on a busy machine.
@pytest.mark.filterwarnings(
    "ignore:Creating scratch directories is taking a surprisingly long time:UserWarning"
)
def test_batch_split_aois_runs_one_job_per_area(runner, pair, tmp_path):
    import json

    before, after = pair
    _two_aois(tmp_path / "aois.geojson")
    pipe = _write(tmp_path / "city.toml", f'name = "city"\n[inputs]\nbefore = "{before.name}"\n'
                                          f'after = "{after.name}"\naois = "aois.geojson"\n')
    out = tmp_path / "out"
    res = runner.invoke(cli, ["batch", str(pipe), "--split-aois", "--workers", "1", "--out-root", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 job(s): 2 ok" in res.stdout
    for name in ("west", "east"):
        summary = json.loads((out / "city" / name / "summary.json").read_text())
        assert list(summary["aois"]) == [name]


def test_unknown_aoi_name_is_a_config_error(runner, pair, tmp_path):
    before, after = pair
    aois = _two_aois(tmp_path / "aois.geojson")
    res = runner.invoke(cli, ["detect", str(before), str(after), "-o", str(tmp_path / "o"), "--aoi", str(aois),
                              "--set", 'inputs.aoi_names=["north"]'])
    assert res.exit_code == 2, res.output
    assert f"{aois}: no AOI named 'north' (inputs.aoi_names)" in res.stderr


def test_local_workers_start_with_capped_malloc_arenas(monkeypatch):
    """Worker processes of a batch's LocalCluster get MALLOC_ARENA_MAX=2 (as the CLI
    caps itself), keep dask's own start-up variables, and an explicit setting wins."""
    import os

    from dask import config as dask_config
    from distributed import Client, LocalCluster

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    settings = batch_mod.cluster_settings()
    environ = settings["distributed.nanny.pre-spawn-environ"]
    assert environ["MALLOC_ARENA_MAX"] == "2"
    assert "MALLOC_TRIM_THRESHOLD_" in environ  # dask's default kept
    assert settings["distributed.scheduler.allowed-failures"] == 0
    with dask_config.set(settings), LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("MALLOC_ARENA_MAX"))
    assert list(seen.values()) == ["2"]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert batch_mod.cluster_settings()["distributed.nanny.pre-spawn-environ"]["MALLOC_ARENA_MAX"] == "4"
