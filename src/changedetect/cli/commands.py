"""The sub-commands: parse, build the configuration, call the pipeline, report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import apply_overrides, layers_opt, overwrite_opt, set_opt

existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
out_path = click.Path(path_type=Path)


class _StageBars:
    """One tqdm bar per long pipeline step, on stderr; silent with -q or when not a terminal."""

    def __init__(self) -> None:
        import sys

        ctx = click.get_current_context(silent=True)
        verbosity = (ctx.obj or {}).get("verbosity", 0) if ctx else 0
        self.disable = verbosity < 0 or not sys.stderr.isatty()
        self.stage: str | None = None
        self.bar = None

    def __call__(self, stage: str, rows: int, total: int) -> None:
        import sys

        from tqdm import tqdm  # type: ignore[import-untyped]

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="row", file=sys.stderr, disable=self.disable, leave=False)
        self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> _StageBars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _report_run(result, quiet: bool) -> None:
    s = result.summary
    click.echo(f"wrote {len(result.outputs)} files to {result.outdir}")
    shift = s["coregistration"]["shift_px"]
    click.echo(
        f"co-registration: shift dy={shift['dy']:+.2f} dx={shift['dx']:+.2f} px, "
        f"reliable={s['coregistration']['reliable']}"
    )
    for name, a in s["aois"].items():
        click.echo(
            f"  {name}: {a['polygon_count']} polygon(s), {a['damaged_area_m2']:.0f} m2 damaged "
            f"({a['damaged_percent']:.1f} %), mean SSIM {a['mean_ssim']}"
        )
    for site in s.get("sites", []):
        dist = "n/a" if site["distance_m"] is None else f"{site['distance_m']:.1f} m"
        click.echo(f"  site {site['name']}: {site['verdict']} (nearest polygon {dist})")
    if "evaluation" in s:
        e = s["evaluation"]
        click.echo(
            f"  vs truth: precision {e['precision']:.3f} recall {e['recall']:.3f} F1 {e['f1']:.3f} "
            f"IoU {e['iou']:.3f}; objects found {e['objects']['found']}/{e['objects']['total']}"
        )
    if s.get("date_window"):
        click.echo(s["date_window"])


@click.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", "outdir", type=out_path, help="Output folder (default: output.dir of the file).")
@layers_opt
@set_opt
@overwrite_opt
def run(pipeline_file: Path, outdir: Path | None, write_layers: bool, overrides: dict, overwrite: bool) -> None:
    """Run a pipeline file (TOML) and write every output.

    \b
    Example:
      changedetect run pipelines/harem.toml --out out/harem
      changedetect run pipelines/harem.toml --set damage.min_area_m2=30 --overwrite
    """
    import tomllib

    from ..config import config_from_dict, load_pipeline
    from ..errors import ConfigError
    from ..pipeline import run as run_pipeline

    if write_layers:
        overrides = {**overrides, "output.write_layers": True}
    config = load_pipeline(pipeline_file)
    if overrides:
        data = apply_overrides(tomllib.loads(pipeline_file.read_text(encoding="utf-8")), overrides)
        try:
            config = config_from_dict(data, source=str(pipeline_file), base=pipeline_file.parent)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (after --set)") from exc
    with _StageBars() as bars:
        result = run_pipeline(config, outdir=outdir, overwrite=overwrite, progress=bars)
    _report_run(result, quiet=False)


@click.command()
@click.argument("before", type=existing_file)
@click.argument("after", type=existing_file)
@click.option("--out", "-o", "outdir", type=out_path, required=True, help="Output folder.")
@click.option("--aoi", type=existing_file, help="Areas of interest (GeoJSON/GeoPackage); default: the whole overlap.")
@click.option("--sites", type=existing_file, help="Reported impact points to check.")
@click.option("--truth", type=existing_file, help="Reference damage polygons: evaluate the run.")
@click.option("--buildings", type=existing_file,
              help="Building footprints (e.g. OpenStreetMap): grade each building; changes off them go to "
                   "ground_changes.geojson.")
@click.option("--threshold", type=click.FloatRange(0, 1, max_open=True), help="Score threshold (default: automatic).")
@click.option("--min-area", type=click.FloatRange(min=0), help="Minimum polygon area, m2 (default 20).")
@layers_opt
@set_opt
@overwrite_opt
def detect(before, after, outdir, aoi, sites, truth, buildings, threshold, min_area, write_layers, overrides,
           overwrite) -> None:
    """Detect damage between BEFORE and AFTER without a pipeline file.

    BEFORE defines the grid; AFTER is co-registered onto it.

    \b
    Example:
      changedetect detect before.tif after.tif -o out/site1 --aoi aoi.geojson
    """
    from ..config import config_from_dict
    from ..pipeline import run as run_pipeline

    data: dict = {
        "name": Path(outdir).name,
        "inputs": {k: str(v) for k, v in {"before": before, "after": after, "aois": aoi, "sites": sites, "truth": truth,
                                          "buildings": buildings}.items() if v},
    }
    if threshold is not None:
        data.setdefault("damage", {})["threshold"] = threshold
    if min_area is not None:
        data.setdefault("damage", {})["min_area_m2"] = min_area
    if write_layers:
        data.setdefault("output", {})["write_layers"] = True
    data = apply_overrides(data, overrides)
    config = config_from_dict(data, source="command line", base=Path.cwd())
    with _StageBars() as bars:
        result = run_pipeline(config, outdir=outdir, overwrite=overwrite, progress=bars)
    _report_run(result, quiet=False)


@click.command()
@click.argument("reference", type=existing_file)
@click.argument("target", type=existing_file)
@click.option("--out", "-o", "out", type=out_path, required=True, help="Output GeoTIFF (COG).")
@click.option("--max-shift", type=click.FloatRange(min=0), default=64.0, show_default=True, help="Largest shift searched, pixels.")
@click.option("--resampling", type=click.Choice(["nearest", "bilinear", "cubic", "cubic_spline", "lanczos"]), default="cubic", show_default=True)
@click.option("--model", type=click.Choice(["auto", "translation", "affine", "field"]), default="auto", show_default=True, help="Richest geometric model allowed ('auto': chosen by cross-validation).")
@overwrite_opt
def coregister(reference, target, out, max_shift, resampling, model, overwrite) -> None:
    """Align TARGET onto REFERENCE's exact grid (all bands, one resampling).

    Writes OUT (same CRS, transform and size as REFERENCE; masked where TARGET has
    no data) and OUT.coregistration.json with the shift and its quality.

    \b
    Example:
      changedetect coregister before.tif after.tif -o after_aligned.tif
    """
    from ..pipeline import coregister_files

    report = coregister_files(
        reference, target, out, overwrite=overwrite, max_shift_px=max_shift, resampling=resampling, model=model
    )
    s = report["shift_px"]
    click.echo(
        f"wrote {out}: shift dy={s['dy']:+.3f} dx={s['dx']:+.3f} px, reliable={report['reliable']}, "
        f"SSIM {report['ssim_before_correction']} -> {report['ssim_after_correction']}"
    )


@click.command()
@click.argument("damage", type=click.Path(path_type=Path))
@click.argument("truth", type=click.Path(path_type=Path))
@click.option("--grid", "grid", type=existing_file, help="Count pixels of this raster's grid instead of exact areas.")
@click.option("--min-cover", type=click.FloatRange(0, 1, min_open=True), default=0.3, show_default=True, help="Share of a truth object that must be covered for it to count as found.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
def evaluate(damage, truth, grid, min_cover, as_json) -> None:
    """Compare a DAMAGE map with TRUTH polygons: precision, recall, F1, IoU, object recall.

    \b
    Example:
      changedetect evaluate out/harem/damage.geojson imagery/harem/truth.geojson
    """
    from ..pipeline import evaluate_files

    result = evaluate_files(damage, truth, grid_path=grid, min_cover=min_cover)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    unit = "pixels" if grid else "m2"
    click.echo(f"precision {result['precision']:.4f}  recall {result['recall']:.4f}  F1 {result['f1']:.4f}  IoU {result['iou']:.4f}  ({unit})")
    obj = result["objects"]
    click.echo(f"objects found (>= {obj['min_cover']:.0%} covered): {obj['found']}/{obj['total']}")
    for cls, v in obj.get("by_class", {}).items():
        click.echo(f"  {cls}: {v['found']}/{v['total']}")


@click.command()
@click.argument("name", type=click.Choice(["harem"]))
@click.option("--out", "-o", "outdir", type=out_path, required=True, help="Output folder.")
@overwrite_opt
def sample(name: str, outdir: Path, overwrite: bool) -> None:
    """Regenerate a shipped sample (deterministic: byte-identical to the shipped files).

    \b
    Example:
      changedetect sample harem -o imagery/harem --overwrite
    """
    from ..sample.harem import write_sample

    paths = write_sample(Path(outdir), overwrite=overwrite)
    click.echo(f"wrote {len(paths)} files to {outdir}")


@click.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--rerun", is_flag=True, help="Also re-run the recorded configuration into a temporary folder and compare hashes.")
@click.option("--strict", is_flag=True, help="Count QGIS statistics sidecars (*.aux.xml) as extra files.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify(outdir: Path, rerun: bool, strict: bool, as_json: bool) -> None:
    """Check every output in OUTDIR against the hashes in its manifest.

    Exit 0 when every file matches; exit 1 naming each changed, missing or extra
    file (and, with --rerun, each output that a fresh run does not reproduce).

    \b
    Example:
      changedetect verify output/harem
      changedetect verify output/harem --rerun
    """
    from ..pipeline import verify as verify_outputs

    report = verify_outputs(outdir, rerun=rerun, ignore_sidecars=not strict)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        for key, label in (("changed", "changed"), ("missing", "missing"), ("extra", "extra file"),
                           ("inputs_changed", "input changed"), ("inputs_missing", "input not found (not checked)"),
                           ("rerun_differs", "not reproduced by re-run")):
            for name in report.get(key, []):
                click.echo(f"{label}: {name}", err=key != "inputs_missing")
        if report["ignored_sidecars"]:
            click.echo(f"ignored {len(report['ignored_sidecars'])} *.aux.xml sidecar(s) (written by QGIS)")
        verdict = "OK" if report["ok"] else "FAILED"
        click.echo(f"{verdict}: {report['checked']} output(s) checked in {outdir}" + (", re-run compared" if rerun else ""))
    if not report["ok"]:
        raise SystemExit(1)


@click.command()
@click.argument("outdir", type=click.Path(path_type=Path))
def report(outdir: Path) -> None:
    """Rewrite report.html, the QGIS styles and project of an output folder.

    Rebuilds report.html, the .qml styles, project.qgs, layers.gpkg and the site
    layers from OUTDIR's summary.json and manifest.json and the run's input files,
    which must still be where the manifest says and unchanged. The files are
    rewritten in place, each atomically. With the same changedetect version they
    are byte-identical to what the run wrote, so `changedetect verify OUTDIR`
    still passes; any file that differs is named.

    \b
    Example:
      changedetect report output/harem
    """
    from ..publish import regenerate

    result = regenerate(outdir)
    click.echo(f"rewrote {len(result['written'])} file(s) in {outdir}, {len(result['identical'])} identical to the run")
    for name in result["differs"]:
        click.echo(f"differs from manifest.json: {name} (changedetect verify will report it)", err=True)


@click.command()
@click.argument("pipelines", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workers", "-w", type=click.IntRange(min=1), help="Worker processes of the local cluster (default: one per CPU, at most one per pipeline).")
@click.option("--scheduler", metavar="ADDRESS", help="Run on a running dask scheduler (e.g. tcp://10.0.0.5:8786) instead of a local cluster.")
@click.option("--out-root", type=out_path, help="Write each pipeline's outputs to OUT_ROOT/<pipeline name> instead of its output.dir.")
@click.option("--split-aois", is_flag=True, default=False,
              help="One job per AOI of each pipeline (the areas of a big scene in parallel), into <folder>/<AOI name>.")
@overwrite_opt
@click.pass_context
def batch(ctx: click.Context, pipelines: tuple[Path, ...], workers: int | None, scheduler: str | None,
          out_root: Path | None, split_aois: bool, overwrite: bool) -> None:
    """Run many pipeline files in parallel on dask.distributed, one job each.

    A pipeline whose output folder already verifies against its manifest (same
    configuration) is skipped; a failing pipeline does not stop the others. Prints
    a summary table; exits 1 if any pipeline failed.

    \b
    Examples:
      changedetect batch pipelines/*.toml --workers 4
      changedetect batch pipelines/*.toml --out-root out/
      changedetect batch pipelines/*.toml --scheduler tcp://10.0.0.5:8786
      changedetect batch pipelines/city.toml --split-aois --workers 2
    """
    import sys

    from tqdm import tqdm  # type: ignore[import-untyped]

    from ..batch import STATUS_FAILED, JobResult, format_summary, plan_jobs, run_batch

    if workers is not None and scheduler is not None:
        raise click.UsageError("--workers and --scheduler cannot be combined (a cluster has its own workers)")
    verbosity = (ctx.obj or {}).get("verbosity", 0)
    jobs = plan_jobs(pipelines, out_root=out_root, split_aois=split_aois)
    with tqdm(total=len(jobs), unit="job", file=sys.stderr, disable=verbosity < 0 or not sys.stderr.isatty()) as bar:

        def done(result: JobResult) -> None:
            bar.set_postfix_str(f"{result['pipeline']}: {result['status']}", refresh=False)
            bar.update()

        results = run_batch(jobs, workers=workers, scheduler=scheduler, overwrite=overwrite, on_result=done)
    click.echo(format_summary(results))
    if verbosity >= 0:
        for r in results:
            for text in r["warnings"]:
                click.echo(f"changedetect: warning: {r['pipeline']}: {text}", err=True)
    if any(r["status"] == STATUS_FAILED for r in results):
        ctx.exit(1)
