"""Pipeline files (TOML): schema, strict validation, path resolution.

A pipeline file describes one before/after pair and everything done with it. Paths
are relative to the file. Validation is strict: an unknown key, a wrong type or a
missing file is a :class:`~changedetect.errors.ConfigError` naming the file and the
key (``damage.min_area_m2``).
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .types import RadiometryMethod, ResamplingName

__all__ = ["PipelineConfig", "load_pipeline", "config_from_dict"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Inputs(_Strict):
    """Input files of a run."""

    before: Path = Field(description="Before image (the reference grid).")
    after: Path = Field(description="After image (co-registered onto the before grid).")
    aois: Path | None = Field(None, description="Areas of interest (polygons, a 'name' column).")
    sites: Path | None = Field(None, description="Reported impact points ('name', 'uncertainty_m').")
    truth: Path | None = Field(None, description="Reference damage polygons to evaluate the run.")
    buildings: Path | None = Field(
        None, description="Building footprints (polygons, e.g. OpenStreetMap): graded one by one."
    )
    aoi_names: list[str] | None = Field(
        None, description="Analyse only the AOIs with these names (default: every AOI of the file)."
    )
    bands: list[int] | None = Field(
        None, description="1-based bands to use from both images; default: the common bands."
    )

    @field_validator("bands")
    @classmethod
    def _bands_positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(b < 1 for b in v)):
            raise ValueError("bands must be a non-empty list of 1-based band numbers")
        return v


class Dates(_Strict):
    """Acquisition dates and the incident date (for the date-window statement)."""

    before: dt.date | None = None
    after: dt.date | None = None
    incident: dt.date | None = None


class Output(_Strict):
    """Where the outputs go, and which optional layers are written."""

    dir: Path | None = None
    #: Also write each term of the change score as a COG (structure_loss,
    #: difference_evidence, vegetation, shadow_change, coherence_loss), to explain the fusion.
    write_layers: bool = False


class Coregister(_Strict):
    """Co-registration of the after image onto the before image's grid."""

    enabled: bool = True
    max_shift_px: float = Field(64.0, ge=0)
    upsample: int = Field(20, ge=1, le=1000)
    resampling: ResamplingName = "cubic"
    model: Literal["auto", "translation", "affine", "field"] = Field(
        "auto", description="Richest geometric model allowed; 'auto' lets cross-validation choose."
    )
    tie_window: int | None = Field(None, ge=16, description="Tie-point window, pixels (default: from image size).")
    tie_spacing: int | None = Field(None, ge=8, description="Tie-point spacing, pixels (default: the window).")


class Radiometry(_Strict):
    """Radiometric normalisation of the after image to the before image."""

    method: RadiometryMethod = "histogram"


class Change(_Strict):
    """Change-evidence layers (see :func:`changedetect.change.change_layers`)."""

    ssim_sigma_m: float = Field(0.75, gt=0)
    smooth_m: float = Field(1.0, ge=0)
    difference_z: float = Field(8.0, gt=0)
    vegetation_z: tuple[float, float] = (2.5, 5.0)
    structure_weight: float = Field(0.75, ge=0, le=1)
    shadow_damping: float = Field(0.0, ge=0, le=1)
    shadow_relight: bool = Field(
        default=True, description="Also compare local patterns with the cast shadows that moved between the dates relit."
    )
    shadow_min_width_m: float = Field(default=2.0, ge=0, description="Narrowest dark region taken as a cast shadow, m.")
    shadow_max_shift_m: float = Field(
        default=1.0, ge=0,
        description="Farthest a cast shadow may have moved between the dates and still be relit, m "
                    "(at least the neighbouring pixels; 0 relights nothing).",
    )
    coherence_weight: float = Field(
        default=0.0, ge=0, le=1,
        description="How much the loss of gradient orientation coherence counts as structure evidence (0: off).",
    )


class Damage(_Strict):
    """From score to damage polygons."""

    threshold: float | Literal["auto"] = "auto"
    min_threshold: float = Field(0.3, ge=0, lt=1)
    open_radius_m: float = Field(1.5, ge=0)
    close_radius_m: float = Field(1.0, ge=0)
    min_area_m2: float = Field(40.0, ge=0)
    max_hole_m2: float = Field(10.0, ge=0)
    site_radius_m: float = Field(25.0, gt=0)
    refine_boundaries: bool = True
    complete_buildings: bool = Field(
        default=True,
        description="With footprints: a building graded moderate or worse (lost share >= 10 %) on which a damage "
                    "object lies joins the damage layer with its whole footprint.",
    )
    hysteresis: float = Field(
        default=1.0, gt=0, le=1,
        description="Grow each object into connected pixels scoring at least this fraction of the threshold (1: off).",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 <= v < 1:
            raise ValueError("threshold must be 'auto' or a number in [0, 1)")
        return v


class Limits(_Strict):
    """Safety limits."""

    max_pixels: int = Field(1_000_000_000, gt=0)


class PipelineConfig(_Strict):
    """A whole pipeline file."""

    name: str = "changedetect"
    description: str = ""
    inputs: Inputs
    dates: Dates = Dates()
    output: Output = Output()
    coregister: Coregister = Coregister()
    radiometry: Radiometry = Radiometry()
    change: Change = Change()
    damage: Damage = Damage()
    limits: Limits = Limits()

    def parameters(self) -> dict[str, Any]:
        """The resolved processing parameters (no paths), for reports and tags."""
        return self.model_dump(mode="json", include={"coregister", "radiometry", "change", "damage", "limits"})


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key missing"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def config_from_dict(data: dict[str, Any], *, source: str = "<config>", base: Path | None = None) -> PipelineConfig:
    """Validate a parsed pipeline and resolve its paths relative to ``base``.

    Raises
    ------
    ConfigError
        Naming ``source`` and the offending key.
    """
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from exc
    if base is None:
        return cfg
    inputs = cfg.inputs
    resolved: dict[str, Any] = {}
    for key in ("before", "after", "aois", "sites", "truth", "buildings"):
        value = getattr(inputs, key)
        if value is None:
            continue
        path = value if value.is_absolute() else Path(os.path.normpath(base / value))
        if not path.exists():
            raise ConfigError(f"{source}: inputs.{key}: file not found: {value}")
        if path.is_dir():
            raise ConfigError(f"{source}: inputs.{key}: is a directory, expected a file: {value}")
        resolved[key] = path
    out_dir = cfg.output.dir
    if out_dir is not None and not out_dir.is_absolute():
        out_dir = Path(os.path.normpath(base / out_dir))
    return cfg.model_copy(
        update={
            "inputs": inputs.model_copy(update=resolved),
            "output": cfg.output.model_copy(update={"dir": out_dir}),
        }
    )


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file.

    Raises
    ------
    ConfigError
        Missing/unreadable file, TOML syntax error (with its line), unknown key,
        wrong type, or a missing input file.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a pipeline file (TOML)")
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from exc
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: cannot read pipeline file ({exc})") from exc
    return config_from_dict(data, source=str(path), base=path.parent)
