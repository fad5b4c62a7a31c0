"""Reusable click options and their callbacks."""

from __future__ import annotations

import tomllib
from typing import Any

import click

overwrite_opt = click.option(
    "--overwrite", is_flag=True, default=False, help="Replace existing outputs."
)

layers_opt = click.option(
    "--write-layers", is_flag=True, default=False,
    help="Also write each term of the change score (structure_loss, difference_evidence, vegetation, "
         "shadow_change, coherence_loss) as a COG, to show how the score was made.",
)


def key_val_handler(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    """Parse ``section.key=value`` pairs; values are TOML literals (strings need no quotes)."""
    out: dict[str, Any] = {}
    for item in value:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (e.g. damage.min_area_m2=30)", ctx, param)
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise click.BadParameter(f"{item!r} has an empty key", ctx, param)
        try:
            parsed = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = raw
        out[key] = parsed
    return out


set_opt = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    callback=key_val_handler,
    help="Override a pipeline parameter, e.g. --set damage.min_area_m2=30 (repeatable).",
)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides applied."""
    import copy

    out = copy.deepcopy(data)
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise click.BadParameter(f"{key}: {part} is not a section", param_hint="--set")
        node[parts[-1]] = value
    return out
