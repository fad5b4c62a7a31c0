"""Run many pipeline files as jobs on dask.distributed (``changedetect batch``).

Each pipeline file is one job: a worker process loads it, checks whether its
output folder already verifies against its manifest (then it is skipped), and
otherwise calls :func:`changedetect.pipeline.run`. A job never raises: it
returns a small :class:`JobResult`-shaped dict with its status and, for a
failure, the one-line error, so one bad file does not stop the others.

By default the jobs run on a :class:`distributed.LocalCluster` of single-threaded
worker processes on this machine; with ``scheduler`` they go to a running dask
scheduler (a real cluster). Workers must then have changedetect installed and
see the pipeline files, the input images and the output folders at the same
paths (a shared file system): paths are sent as absolute paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import tomllib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from .errors import ChangeDetectError, OutputExistsError

if TYPE_CHECKING:
    from .config import PipelineConfig

__all__ = [
    "BatchJob",
    "JobResult",
    "default_workers",
    "format_summary",
    "plan_jobs",
    "run_batch",
    "run_job",
]

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped (verified)"
STATUS_FAILED = "failed"


class JobResult(TypedDict):
    """What one job sends back (small and picklable)."""

    pipeline: str
    status: str
    outdir: str | None
    polygons: int | None
    seconds: float
    error: str | None
    warnings: list[str]


@dataclass(frozen=True)
class BatchJob:
    """One pipeline file to run.

    ``outdir`` is None to use the file's own ``output.dir``; ``label`` is how the
    summary names the job (the path as given); ``expected_outdir`` is the output
    folder read from the file without validating it, used to refuse two jobs
    writing into one folder (None when unknown).
    """

    pipeline: Path
    label: str
    outdir: Path | None
    expected_outdir: Path | None
    #: run only this AOI of the pipeline (``--split-aois``)
    aoi: str | None = None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _peek(path: Path) -> dict[str, Any]:
    """The raw TOML of a pipeline file, or {} if it cannot be read (the job will say why)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def _folder_name(name: object, fallback: str) -> str:
    """A safe folder name from a pipeline ``name`` (letters, digits, ``._-``)."""
    text = name if isinstance(name, str) else ""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return text or fallback


def plan_jobs(
    pipelines: Sequence[str | os.PathLike], *, out_root: Path | None = None, split_aois: bool = False
) -> list[BatchJob]:
    """One job per pipeline file, with its output folder.

    Without ``out_root`` a job writes into the file's own ``output.dir``. With it,
    into ``out_root / <name>``, where ``<name>`` is the file's ``name`` key (or the
    file name without extension), made unique with ``-2``, ``-3``... in the order
    given.

    With ``split_aois``, a pipeline with an AOI file becomes one job per AOI
    (``inputs.aoi_names``), writing into ``<its folder>/<AOI name>``: the areas
    of one big scene are then processed in parallel by separate workers.
    """
    jobs: list[BatchJob] = []
    used: set[str] = set()
    for given in pipelines:
        path = Path(given).absolute()
        raw = _peek(path)
        outdir = expected = None
        if out_root is not None:
            base = _folder_name(raw.get("name"), _folder_name(path.stem, "pipeline"))
            name, n = base, 1
            while name.lower() in used:
                n += 1
                name = f"{base}-{n}"
            used.add(name.lower())
            outdir = expected = Path(out_root).absolute() / name
        else:
            out = raw.get("output", {})
            value = out.get("dir") if isinstance(out, dict) else None
            if isinstance(value, str) and value:
                expected = (
                    Path(value) if Path(value).is_absolute() else path.parent / value
                )
        names = _aoi_names(path) if split_aois else None
        if not names:
            jobs.append(BatchJob(pipeline=path, label=str(given), outdir=outdir, expected_outdir=expected))
            continue
        for aoi in names:
            sub = _folder_name(aoi, "aoi")
            jobs.append(BatchJob(
                pipeline=path, label=f"{given} [{aoi}]",
                outdir=None if outdir is None else outdir / sub,
                expected_outdir=None if expected is None else expected / sub, aoi=aoi,
            ))
    return jobs


def _aoi_names(path: Path) -> list[str] | None:
    """Names of the AOIs of a pipeline file (None when it cannot tell: the job then reports why)."""
    try:
        from . import io
        from .config import load_pipeline

        config = load_pipeline(path)
        if config.inputs.aois is None:
            return None
        gdf = io.read_vector(config.inputs.aois, what="AOI file")
        if "name" not in gdf.columns:
            return [f"aoi{i + 1}" for i in range(len(gdf))]
        names = [str(n) for n in gdf["name"]]
        if config.inputs.aoi_names is not None:
            names = [n for n in names if n in set(config.inputs.aoi_names)]
        return list(dict.fromkeys(names))
    except ChangeDetectError:
        return None


def _polygon_count(outdir: Path) -> int | None:
    try:
        return int(
            json.loads((outdir / "summary.json").read_text(encoding="utf-8"))[
                "polygon_count"
            ]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_done(config: PipelineConfig, outdir: Path) -> None:
    """Return if ``outdir`` is this configuration's verified output, else raise OutputExistsError."""
    from .pipeline import _resolved_config, verify
    from .provenance import MANIFEST_NAME

    report = verify(outdir)
    if not report["ok"]:
        problems = [
            f"{len(report[k])} {k.replace('_', ' ')}"
            for k in ("changed", "missing", "extra", "inputs_changed")
            if report[k]
        ]
        raise OutputExistsError(
            f"{outdir}: output folder does not verify against its manifest ({', '.join(problems)}); "
            "use --overwrite to run it again"
        )
    recorded = json.loads((outdir / MANIFEST_NAME).read_text(encoding="utf-8")).get(
        "config"
    )
    current = json.loads(json.dumps(_resolved_config(config)))
    differ = (
        _differing_keys(recorded, current)
        if isinstance(recorded, dict)
        else ["(none recorded)"]
    )
    if differ:
        raise OutputExistsError(
            f"{outdir}: output folder was made with a different configuration ({', '.join(differ)}); "
            "use --overwrite to run it again"
        )


def _differing_keys(
    recorded: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ; keys only one side has (another version's) are not compared."""
    keys = []
    for key in sorted(set(recorded) & set(current)):
        a, b = recorded[key], current[key]
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def run_job(
    pipeline: str,
    outdir: str | None = None,
    overwrite: bool = False,
    label: str | None = None,
    aoi: str | None = None,
) -> JobResult:
    """Run one pipeline file; never raises (the dask task of :func:`run_batch`).

    Without ``overwrite``, an output folder that already has a manifest is
    checked instead: the job is skipped when every file verifies against the
    manifest and the manifest records this same configuration; otherwise it fails
    (the folder is left untouched). Errors of changedetect are reported with their
    message, any other exception with its type and message.
    """
    from .config import load_pipeline
    from .provenance import MANIFEST_NAME

    start = time.perf_counter()
    result: JobResult = {
        "pipeline": label or pipeline,
        "status": STATUS_FAILED,
        "outdir": outdir,
        "polygons": None,
        "seconds": 0.0,
        "error": None,
        "warnings": [],
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            config = load_pipeline(pipeline)
            if aoi is not None:
                config = config.model_copy(update={"inputs": config.inputs.model_copy(update={"aoi_names": [aoi]})})
            target = Path(outdir) if outdir is not None else config.output.dir
            if aoi is not None and outdir is None and target is not None:
                target = target / _folder_name(aoi, "aoi")
            if target is not None:
                result["outdir"] = str(target)
            if (
                target is not None
                and not overwrite
                and (target / MANIFEST_NAME).is_file()
            ):
                _check_done(config, target)
                result["status"] = STATUS_SKIPPED
                result["polygons"] = _polygon_count(target)
                return result
            from .pipeline import run

            run_result = run(config, outdir=target, overwrite=overwrite)
            result["status"] = STATUS_OK
            result["outdir"] = str(run_result.outdir)
            result["polygons"] = int(run_result.summary["polygon_count"])
        except ChangeDetectError as exc:
            result["error"] = _one_line(exc)
        except Exception as exc:  # noqa: BLE001 - a job reports, it never takes the batch down
            result["error"] = f"{type(exc).__name__}: {_one_line(exc)}"
        finally:
            result["seconds"] = round(time.perf_counter() - start, 2)
            result["warnings"] = [_one_line(w.message) for w in caught]  # type: ignore[arg-type]
    return result


def _failed(job: BatchJob, error: str) -> JobResult:
    return {
        "pipeline": job.label,
        "status": STATUS_FAILED,
        "outdir": str(job.outdir or job.expected_outdir or "") or None,
        "polygons": None,
        "seconds": 0.0,
        "error": error,
        "warnings": [],
    }


def _clashes(jobs: Sequence[BatchJob]) -> dict[int, str]:
    """Jobs whose output folder is already another job's: index -> error."""
    owner: dict[Path, BatchJob] = {}
    errors = {}
    for i, job in enumerate(jobs):
        if job.expected_outdir is None:
            continue
        key = Path(os.path.normcase(os.path.abspath(job.expected_outdir)))
        if key in owner:
            errors[i] = (
                f"{job.expected_outdir}: output folder is also that of {owner[key].label} (give --out-root)"
            )
        else:
            owner[key] = job
    return errors


def cluster_settings() -> dict[str, Any]:
    """The dask settings of a batch.

    - A job that kills its worker (out of memory) fails once instead of being
      run on 3 more workers (a local cluster; a remote scheduler keeps its own
      setting).
    - Local worker processes start with glibc's malloc arenas capped at 2
      (``MALLOC_ARENA_MAX``, as the CLI does for itself; unless already set):
      per-thread arenas took the peak memory of an 8192² detection from 0.8 to
      1.0-1.1 GiB. Workers of a remote cluster get it from the environment
      they are started in.
    """
    from dask import config as dask_config

    environ = dict(dask_config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ["MALLOC_ARENA_MAX"] = os.environ.get("MALLOC_ARENA_MAX", "2")
    return {"distributed.scheduler.allowed-failures": 0, "distributed.nanny.pre-spawn-environ": environ}


def default_workers(n_jobs: int) -> int:
    """Worker processes for a local cluster: one per CPU, no more than jobs."""
    cpus = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1
    )
    return max(1, min(cpus, n_jobs))


def run_batch(
    jobs: Sequence[BatchJob],
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    on_result: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Run ``jobs`` on dask.distributed; return their results in the order given.

    Parameters
    ----------
    jobs : sequence of BatchJob
        From :func:`plan_jobs`.
    workers : int, optional
        Worker processes of the local cluster (one thread each); default: one
        per CPU, at most one per job. Not used with ``scheduler``.
    scheduler : str, optional
        Address of a running dask scheduler (``tcp://host:8786``) instead of a
        local cluster.
    overwrite : bool
        Run every job again, replacing its outputs.
    on_result : callable, optional
        Called in this process with each result as soon as its job finishes
        (for a progress bar).

    Raises
    ------
    ChangeDetectError
        When the scheduler cannot be reached. Failing jobs do not raise: their
        result has status ``"failed"`` and the error.
    """
    from dask import config as dask_config
    from distributed import Client, LocalCluster, as_completed

    results: list[JobResult | None] = [None] * len(jobs)
    for i, error in _clashes(jobs).items():
        results[i] = _failed(jobs[i], error)
        if on_result is not None:
            on_result(results[i])  # type: ignore[arg-type]
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results  # type: ignore[return-value]

    with dask_config.set(cluster_settings()):
        if scheduler is not None:
            try:
                client = Client(scheduler, timeout="10s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise ChangeDetectError(
                    f"cannot connect to the dask scheduler at {scheduler}: {_one_line(exc)}"
                ) from exc
            cluster = None
        else:
            cluster = LocalCluster(
                n_workers=min(workers, len(todo))
                if workers
                else default_workers(len(todo)),
                threads_per_worker=1,
                processes=True,
                # any free port for the scheduler's HTTP server: with None it
                # still tries 8787 and warns when another cluster has it.
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            )
            client = Client(cluster)
        try:
            futures = {
                client.submit(
                    run_job,
                    str(jobs[i].pipeline),
                    None if jobs[i].outdir is None else str(jobs[i].outdir),
                    overwrite,
                    jobs[i].label,
                    jobs[i].aoi,
                    pure=False,
                ): i
                for i in todo
            }
            for future in as_completed(futures):
                i = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - worker died, lost connection...
                    result = _failed(jobs[i], f"{type(exc).__name__}: {_one_line(exc)}")
                results[i] = result
                if on_result is not None:
                    on_result(result)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    return results  # type: ignore[return-value]


def format_summary(results: Sequence[JobResult]) -> str:
    """The summary table: pipeline, status, polygons, seconds, output or error."""
    header = ("pipeline", "status", "polygons", "seconds", "output / error")
    rows = [
        (
            r["pipeline"],
            r["status"],
            "-" if r["polygons"] is None else str(r["polygons"]),
            f"{r['seconds']:.1f}",
            (r["error"] if r["status"] == STATUS_FAILED else r["outdir"]) or "",
        )
        for r in results
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(4)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            [
                row[0].ljust(widths[0]),
                row[1].ljust(widths[1]),
                row[2].rjust(widths[2]),
                row[3].rjust(widths[3]),
                row[4],
            ]
        ).rstrip()

    counts = {
        s: sum(r["status"] == s for r in results)
        for s in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)
    }
    total = f"{len(results)} job(s): " + ", ".join(
        f"{n} {s}" for s, n in counts.items()
    )
    return "\n".join([line(header), *(line(row) for row in rows), total])
