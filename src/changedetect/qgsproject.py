"""A QGIS project file (``project.qgs``) written as plain XML, without QGIS.

The project lists layers in groups (top of the legend first = drawn on top), with
their styles embedded (the same :class:`~changedetect.styles.LayerStyle` objects
that are written beside the layers as ``.qml``), the project CRS and the initial
view extent. Layer sources inside the output folder are stored relative to the
project file (``./score.tif``), so the folder can be moved or shared as a whole.

The XML is deterministic: fixed layer identifiers, no save date, no user name.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from .styles import QGIS_VERSION, LayerStyle, _el, _num, _xml_document

__all__ = ["ProjectLayer", "ProjectGroup", "project_xml", "srs_element"]


@dataclass(frozen=True)
class ProjectLayer:
    """One layer of the project.

    Parameters
    ----------
    layer_id : str
        Unique, stable identifier (letters, digits, underscores), longer than 10
        characters (QGIS replaces shorter ones with a random identifier).
    name : str
        Name shown in the legend.
    source : str
        Data source: a path relative to the project file (``./damage.geojson``) or
        absolute, optionally with a provider suffix (``./layers.gpkg|layername=aois``).
    provider : {"gdal", "ogr"}
    crs : str
        The layer's CRS (``"EPSG:4326"`` or WKT).
    style : LayerStyle
    geometry : {"Point", "Line", "Polygon"}, optional
        Geometry type of a vector layer.
    visible : bool
        Checked in the legend when the project opens.
    """

    layer_id: str
    name: str
    source: str
    provider: str
    crs: str
    style: LayerStyle
    geometry: str | None = None
    visible: bool = True

    def __post_init__(self) -> None:
        """Check the identifier: QGIS keeps a layer's <id> only when longer than 10 characters."""
        if len(self.layer_id) <= 10:
            raise ValueError(f"layer id {self.layer_id!r} must be longer than 10 characters")

    @property
    def kind(self) -> str:
        """``"vector"`` or ``"raster"``."""
        return self.style.kind


@dataclass(frozen=True)
class ProjectGroup:
    """A legend group and its layers, top first."""

    name: str
    layers: tuple[ProjectLayer, ...]
    expanded: bool = True


def srs_element(crs: str) -> ET.Element:
    """``<spatialrefsys>`` of a CRS given as an authority string (``EPSG:32637``) or WKT.

    QGIS reads the WKT (lossless); the authority code and description are written
    too, for people reading the file.
    """
    from pyproj import CRS

    parsed = CRS.from_user_input(crs)
    srs = _el("spatialrefsys")
    srs.append(_el("wkt", text=parsed.to_wkt()))
    found = parsed.to_authority(min_confidence=100)
    srs.append(_el("authid", text=f"{found[0]}:{found[1]}" if found else ""))
    srs.append(_el("description", text=parsed.name))
    return srs


def _maplayer(layer: ProjectLayer) -> ET.Element:
    attrs = {"type": layer.kind, **layer.style.attributes}
    if layer.kind == "vector":
        attrs["geometry"] = layer.geometry or "Unknown"
    ml = _el("maplayer", attrs)
    ml.append(_el("id", text=layer.layer_id))
    ml.append(_el("datasource", text=layer.source))
    ml.append(_el("layername", text=layer.name))
    ml.append(_el("srs", {}, srs_element(layer.crs)))
    ml.append(_el("provider", {"encoding": "UTF-8"} if layer.kind == "vector" else {}, text=layer.provider))
    ml.extend(layer.style.elements)
    return ml


def _extent(tag: str, extent: Sequence[float]) -> ET.Element:
    xmin, ymin, xmax, ymax = (float(v) for v in extent)
    return _el(
        tag, {},
        _el("xmin", text=_num(xmin)), _el("ymin", text=_num(ymin)),
        _el("xmax", text=_num(xmax)), _el("ymax", text=_num(ymax)),
    )


def project_xml(
    *,
    title: str,
    crs: str,
    extent: Sequence[float],
    groups: Sequence[ProjectGroup],
) -> str:
    """The text of a ``.qgs`` project.

    Parameters
    ----------
    title : str
        Project title.
    crs : str
        Project CRS (the run's CRS); layers in other CRSs are reprojected on the fly.
    extent : (xmin, ymin, xmax, ymax)
        Initial view, in ``crs``.
    groups : sequence of ProjectGroup
        Legend groups, top first; within a group, layers top first.

    Returns
    -------
    str
        The XML document (deterministic for the same arguments).
    """
    layers = [lyr for g in groups for lyr in g.layers]
    ids = [lyr.layer_id for lyr in layers]
    if len(set(ids)) != len(ids):
        raise ValueError("layer ids must be unique")
    root = _el("qgis", {"projectname": title, "version": QGIS_VERSION})
    root.append(_el("homePath", {"path": ""}))
    root.append(_el("title", text=title))
    root.append(_el("projectCrs", {}, srs_element(crs)))

    tree = _el("layer-tree-group")
    tree.append(_el("customproperties"))
    for group in groups:
        g = _el("layer-tree-group", {"name": group.name, "checked": "Qt::Checked", "expanded": "1" if group.expanded else "0"})
        g.append(_el("customproperties"))
        for lyr in group.layers:
            g.append(_el("layer-tree-layer", {
                "id": lyr.layer_id, "name": lyr.name, "source": lyr.source, "providerKey": lyr.provider,
                "checked": "Qt::Checked" if lyr.visible else "Qt::Unchecked", "expanded": "1",
            }, _el("customproperties")))
        tree.append(g)
    tree.append(_el("custom-order", {"enabled": "0"}, *(_el("item", text=i) for i in reversed(ids))))
    root.append(tree)

    canvas = _el("mapcanvas", {"name": "theMapCanvas", "annotationsVisible": "1"})
    canvas.append(_el("units", text="meters"))
    canvas.append(_extent("extent", extent))
    canvas.append(_el("rotation", text="0"))
    canvas.append(_el("destinationsrs", {}, srs_element(crs)))
    canvas.append(_el("rendermaptile", text="0"))
    root.append(canvas)

    root.append(_el("projectlayers", {}, *(_maplayer(lyr) for lyr in layers)))
    root.append(_el("layerorder", {}, *(_el("layer", {"id": i}) for i in ids)))
    properties = _el(
        "properties", {},
        _el("Paths", {}, _el("Absolute", {"type": "bool"}, text="false")),
        _el("SpatialRefSys", {}, _el("ProjectionsEnabled", {"type": "int"}, text="1")),
    )
    root.append(properties)
    xmin, ymin, xmax, ymax = (float(v) for v in extent)
    view = _el("ProjectViewSettings", {"UseProjectScales": "0", "rotation": "0"})
    view.append(_el("Scales"))
    view.append(_el("DefaultViewExtent", {"xmin": _num(xmin), "ymin": _num(ymin), "xmax": _num(xmax), "ymax": _num(ymax)},
                    srs_element(crs)))
    root.append(view)
    return _xml_document(root)
