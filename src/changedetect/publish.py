"""Everything made for people from a run's files: QGIS styles and project, GeoPackage, report.

Placeholder: implemented in a follow-up (QGIS styles, project file, report.html).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def publish_outputs(folder: Path, *, crs: str, summary: dict[str, Any], inputs: dict[str, Path]) -> list[Path]:
    """Write the derived, human-facing outputs into ``folder``; return their paths."""
    return []
