"""QGIS layer styles (``.qml``) for every output, generated as plain XML (no QGIS needed).

A style is a :class:`LayerStyle`: the attributes and child elements that QGIS reads
from the root ``<qgis>`` element of a ``.qml`` file, and equally from a
``<maplayer>`` element of a project file, so the same object is written beside a
layer (:func:`qml_text`) and embedded in ``project.qgs``
(:mod:`changedetect.qgsproject`).

QGIS applies a ``.qml`` with the same base name as a layer file automatically
when the layer is loaded (``score.qml`` beside ``score.tif``).

Ranges are fixed, never stretched to the data, so the same colour means the same
value in every run:

* score: 0-1; below the threshold a transparent-to-grey ramp (not flagged), above
  it yellow to dark red (flagged as change);
* SSIM: 0-1 diverging, red where the local structure was lost, blue where it is
  unchanged (negative values take the red end);
* difference: 0-0.5 of the before image's range (magma-like).

Damage polygons follow UNOSAT-like colours by severity; the output is
deterministic (no timestamps, no random identifiers).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "SEVERITY_COLOURS",
    "SEVERITY_LABELS",
    "LayerStyle",
    "qml_text",
    "score_style",
    "difference_style",
    "ssim_style",
    "score_ramp",
    "difference_ramp",
    "ssim_ramp",
    "rgb_style",
    "gray_style",
    "damage_style",
    "aois_style",
    "sites_style",
    "sites_uncertainty_style",
    "tie_points_style",
]

#: The QGIS version the generated XML follows (read by QGIS 3.22 and later).
QGIS_VERSION = "3.22.0-Białowieża"

#: UNOSAT-like damage colours (fill), most severe first.
SEVERITY_COLOURS: dict[str, str] = {
    "destroyed": "#a50f15",
    "severe": "#f03b20",
    "moderate": "#fd8d3c",
    "possible": "#fed976",
}

#: Darker outline of each severity (the light "possible" needs one to be seen).
SEVERITY_OUTLINES: dict[str, str] = {
    "destroyed": "#67000d",
    "severe": "#a50f15",
    "moderate": "#b35806",
    "possible": "#b8860b",
}

#: Legend labels of the severities.
SEVERITY_LABELS: dict[str, str] = {
    "destroyed": "Destroyed",
    "severe": "Severe damage",
    "moderate": "Moderate damage",
    "possible": "Possible damage",
}

AOI_COLOUR = "#00a5c8"
SITE_COLOUR = "#e4007c"
TIE_ACCEPTED_COLOUR = "#1a5fb4"
TIE_REJECTED_COLOUR = "#8c8c8c"

#: Fixed display ranges of the change layers.
SCORE_RANGE = (0.0, 1.0)
SSIM_RANGE = (0.0, 1.0)
DIFFERENCE_RANGE = (0.0, 0.5)

DIFFERENCE_RAMP = ("#000004", "#3b0f70", "#8c2981", "#de4968", "#fe9f6d", "#fcfdbf")
SSIM_RAMP = ("#b2182b", "#ef8a62", "#f7f7f7", "#67a9cf", "#2166ac")
SCORE_FLAGGED_RAMP = ("#fee08b", "#fdae61", "#f46d43", "#d73027", "#67001f")

#: A colour stop: (value, "#rrggbb", alpha 0-255, legend label).
RampItem = tuple[float, str, int, str]


@dataclass(frozen=True)
class LayerStyle:
    """A QGIS layer style: root attributes plus child elements.

    Parameters
    ----------
    kind : {"vector", "raster"}
        The layer type the style applies to.
    attributes : dict
        Attributes of the ``<qgis>`` (QML) or ``<maplayer>`` (project) element,
        e.g. ``{"labelsEnabled": "1"}``.
    elements : tuple of Element
        Children of that element (``renderer-v2``, ``labeling``, ``pipe`` ...).
    """

    kind: str
    attributes: dict[str, str] = field(default_factory=dict)
    elements: tuple[ET.Element, ...] = ()


# --------------------------------------------------------------------------- XML helpers
def _el(tag: str, attrib: dict[str, str] | None = None, *children: ET.Element, text: str | None = None) -> ET.Element:
    e = ET.Element(tag, attrib or {})
    e.extend(children)
    if text is not None:
        e.text = text
    return e


def _num(value: float) -> str:
    """Shortest exact text of a number (``0.412``, ``1``)."""
    v = float(value)
    return str(int(v)) if v.is_integer() else repr(v)


def _rgba(hex_colour: str, alpha: int = 255) -> str:
    """``"#rrggbb"`` -> QGIS ``"r,g,b,a"``."""
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"{r},{g},{b},{alpha}"


def _option_map(props: dict[str, str]) -> ET.Element:
    """``<Option type="Map">`` with one QString option per property (sorted, like QGIS)."""
    root = _el("Option", {"type": "Map"})
    for key in sorted(props):
        root.append(_el("Option", {"name": key, "type": "QString", "value": props[key]}))
    return root


def _data_defined(properties: dict[str, str] | None = None, tag: str = "data_defined_properties") -> ET.Element:
    """Data-defined properties: ``{"angle": "expression", ...}`` (expression-based)."""
    coll = _el("Option", {"type": "Map"})
    coll.append(_el("Option", {"name": "name", "type": "QString", "value": ""}))
    if properties:
        props = _el("Option", {"name": "properties", "type": "Map"})
        for key in sorted(properties):
            props.append(
                _el(
                    "Option", {"name": key, "type": "Map"},
                    _el("Option", {"name": "active", "type": "bool", "value": "true"}),
                    _el("Option", {"name": "expression", "type": "QString", "value": properties[key]}),
                    _el("Option", {"name": "type", "type": "int", "value": "3"}),
                )
            )
        coll.append(props)
    else:
        coll.append(_el("Option", {"name": "properties"}))
    coll.append(_el("Option", {"name": "type", "type": "QString", "value": "collection"}))
    return _el(tag, {}, coll)


def _symbol(kind: str, name: str, layers: Iterable[ET.Element], *, alpha: float = 1.0) -> ET.Element:
    sym = _el("symbol", {"type": kind, "name": name, "alpha": _num(alpha), "clip_to_extent": "1", "force_rhr": "0"})
    sym.append(_data_defined())
    sym.extend(layers)
    return sym


def _symbol_layer(cls: str, props: dict[str, str], dd: dict[str, str] | None = None) -> ET.Element:
    return _el("layer", {"class": cls, "enabled": "1", "locked": "0", "pass": "0"}, _option_map(props), _data_defined(dd))


def _simple_fill(fill: str, outline: str, *, fill_alpha: int = 255, width: float = 0.4,
                 outline_style: str = "solid", no_fill: bool = False) -> ET.Element:
    return _symbol_layer("SimpleFill", {
        "color": _rgba(fill, fill_alpha),
        "joinstyle": "miter",
        "outline_color": _rgba(outline),
        "outline_style": outline_style,
        "outline_width": _num(width),
        "outline_width_unit": "MM",
        "style": "no" if no_fill else "solid",
    })


def _simple_marker(shape: str, fill: str, outline: str, *, size: float, outline_width: float = 0.3,
                   dd: dict[str, str] | None = None) -> ET.Element:
    return _symbol_layer("SimpleMarker", {
        "angle": "0",
        "color": _rgba(fill),
        "joinstyle": "miter",
        "name": shape,
        "outline_color": _rgba(outline),
        "outline_style": "solid",
        "outline_width": _num(outline_width),
        "outline_width_unit": "MM",
        "scale_method": "diameter",
        "size": _num(size),
        "size_unit": "MM",
    }, dd)


def _labeling(expression: str, *, size: float = 8.0, colour: str = "#000000", bold: bool = False,
              placement: str = "1", dist: float = 0.0, buffer_colour: str = "#ffffff",
              priority: int = 5) -> ET.Element:
    """Simple labeling from an expression, with a halo so labels read on imagery."""
    text_style = _el("text-style", {
        "fieldName": expression,
        "isExpression": "1",
        "fontSize": _num(size),
        "fontSizeUnit": "Point",
        "fontWeight": "75" if bold else "50",
        "textColor": _rgba(colour),
        "textOpacity": "1",
        "multilineHeight": "1",
    })
    text_style.append(_el("text-buffer", {
        "bufferDraw": "1", "bufferSize": "0.8", "bufferSizeUnits": "MM",
        "bufferColor": _rgba(buffer_colour), "bufferOpacity": "0.85", "bufferNoFill": "1",
        "bufferJoinStyle": "128",
    }))
    settings = _el("settings", {"calloutType": "simple"}, text_style)
    settings.append(_el("text-format", {"multilineAlign": "3", "wrapChar": "", "autoWrapLength": "0"}))
    settings.append(_el("placement", {
        "placement": placement, "dist": _num(dist), "distUnits": "MM", "priority": str(priority),
        "polygonPlacementFlags": "2", "placementFlags": "10", "fitInPolygonOnly": "0",
        "centroidInside": "1", "centroidWhole": "0", "quadOffset": "4", "offsetType": "0",
    }))
    settings.append(_el("rendering", {
        "obstacle": "1", "obstacleFactor": "1", "obstacleType": "1", "displayAll": "0",
        "upsidedownLabels": "0", "limitNumLabels": "0", "maxNumLabels": "2000", "drawLabels": "1",
        "scaleVisibility": "0", "labelPerPart": "0", "mergeLines": "0", "minFeatureSize": "0",
        "zIndex": "0",
    }))
    return _el("labeling", {"type": "simple"}, settings)


def _vector_style(renderer: ET.Element, labeling: ET.Element | None = None, *, opacity: float = 1.0) -> LayerStyle:
    elements = [renderer]
    if labeling is not None:
        elements.append(labeling)
    elements += [_el("blendMode", text="0"), _el("featureBlendMode", text="0"), _el("layerOpacity", text=_num(opacity))]
    return LayerStyle(
        kind="vector",
        attributes={"labelsEnabled": "1" if labeling is not None else "0"},
        elements=tuple(elements),
    )


def _single_symbol_renderer(symbol: ET.Element) -> ET.Element:
    return _el(
        "renderer-v2", {"type": "singleSymbol", "forceraster": "0", "symbollevels": "0", "enableorderby": "0", "referencescale": "-1"},
        _el("symbols", {}, symbol),
    )


def _raster_style(renderer: ET.Element, *, opacity: float = 1.0) -> LayerStyle:
    renderer.set("opacity", _num(opacity))
    pipe = _el(
        "pipe", {},
        renderer,
        _el("brightnesscontrast", {"brightness": "0", "contrast": "0", "gamma": "1"}),
        _el("huesaturation", {"saturation": "0", "grayscaleMode": "0", "colorizeOn": "0", "invertColors": "0",
                              "colorizeRed": "255", "colorizeGreen": "128", "colorizeBlue": "128", "colorizeStrength": "100"}),
        _el("rasterresampler", {"maxOversampling": "2"}),
        _el("resamplingStage", text="resamplingFilter"),
    )
    return LayerStyle(kind="raster", elements=(pipe, _el("blendMode", text="0")))


def _min_max_origin(limits: str = "None") -> ET.Element:
    return _el(
        "minMaxOrigin", {},
        _el("limits", text=limits),
        _el("extent", text="WholeRaster"),
        _el("statAccuracy", text="Estimated"),
        _el("cumulativeCutLower", text="0.02"),
        _el("cumulativeCutUpper", text="0.98"),
        _el("stdDevFactor", text="2"),
    )


# --------------------------------------------------------------------------- serialisation
def qml_text(style: LayerStyle) -> str:
    """The ``.qml`` file text of a style (UTF-8, deterministic)."""
    root = _el("qgis", {"version": QGIS_VERSION, "styleCategories": "Symbology|Labeling|Rendering", **style.attributes})
    root.extend(style.elements)
    return _xml_document(root)


def _xml_document(root: ET.Element) -> str:
    import copy

    tree = copy.deepcopy(root)
    ET.indent(tree, space="  ")
    body = ET.tostring(tree, encoding="unicode", short_empty_elements=True)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + body + "\n"


# --------------------------------------------------------------------------- rasters
def _pseudocolor(items: Sequence[RampItem], vmin: float, vmax: float, *,
                 clip: bool = False, opacity: float = 1.0) -> LayerStyle:
    """Single-band pseudocolor, interpolated ramp over the fixed range ``vmin``-``vmax``.

    ``items`` are ``(value, "#rrggbb", alpha, label)``.
    """
    shader = _el("colorrampshader", {
        "colorRampType": "INTERPOLATED", "classificationMode": "1", "clip": "1" if clip else "0",
        "minimumValue": _num(vmin), "maximumValue": _num(vmax), "labelPrecision": "2",
    })
    for value, colour, alpha, label in items:
        shader.append(_el("item", {"value": _num(value), "color": colour, "alpha": str(alpha), "label": label}))
    renderer = _el(
        "rasterrenderer", {"type": "singlebandpseudocolor", "band": "1", "alphaBand": "-1", "nodataColor": "",
                           "classificationMin": _num(vmin), "classificationMax": _num(vmax)},
        _min_max_origin(),
        _el("rastershader", {}, shader),
    )
    return _raster_style(renderer, opacity=opacity)


def _ramp_items(colours: Sequence[str], vmin: float, vmax: float, labels: dict[int, str]) -> list[RampItem]:
    n = len(colours) - 1
    return [
        (round(vmin + (vmax - vmin) * i / n, 6), c, 255, labels.get(i, ""))
        for i, c in enumerate(colours)
    ]


def score_ramp(threshold: float | None) -> list[RampItem]:
    """Colour stops ``(value, "#rrggbb", alpha, label)`` of the score, 0-1.

    Below the threshold (not flagged): transparent at 0 to grey at the threshold,
    so the imagery under it stays visible. From the threshold up (flagged):
    yellow to dark red. Without a threshold, flagged colours start at 0.3.
    """
    lo, hi = SCORE_RANGE
    top = len(SCORE_FLAGGED_RAMP) - 1
    if threshold is None or not lo < threshold < hi:
        return [(lo, "#ffffff", 0, "0 no change"), *_ramp_items(SCORE_FLAGGED_RAMP, 0.3, hi, {top: "1 strong change"})]
    t = round(float(threshold), 4)
    below = [
        (lo, "#ffffff", 0, "0 no change"),
        (round(t - 1e-4, 6), "#6e6e6e", 150, f"below threshold {t:.2f}: not flagged"),
    ]
    return below + _ramp_items(SCORE_FLAGGED_RAMP, t, hi, {0: f"threshold {t:.2f}: flagged as change", top: "1 strong change"})


def difference_ramp() -> list[RampItem]:
    """Colour stops of the colour difference, 0-0.5 of the before image's range."""
    lo, hi = DIFFERENCE_RANGE
    return _ramp_items(DIFFERENCE_RAMP, lo, hi, {0: "0 same colour", len(DIFFERENCE_RAMP) - 1: "0.5+ of the image range"})


def ssim_ramp() -> list[RampItem]:
    """Colour stops of the local SSIM, 0-1, diverging around 0.5."""
    lo, hi = SSIM_RANGE
    return _ramp_items(SSIM_RAMP, lo, hi, {0: "0 or less: structure lost", 2: "0.5", len(SSIM_RAMP) - 1: "1 unchanged"})


def score_style(threshold: float | None) -> LayerStyle:
    """Change score 0-1 with the run's threshold marked (see :func:`score_ramp`)."""
    return _pseudocolor(score_ramp(threshold), *SCORE_RANGE)


def difference_style() -> LayerStyle:
    """Colour difference 0-0.5 (fraction of the before image's range)."""
    return _pseudocolor(difference_ramp(), *DIFFERENCE_RANGE)


def ssim_style() -> LayerStyle:
    """Local SSIM 0-1, diverging: red = structure lost, blue = unchanged."""
    return _pseudocolor(ssim_ramp(), *SSIM_RANGE)


def _contrast(tag: str, lo: float, hi: float) -> ET.Element:
    return _el(
        tag, {},
        _el("minValue", text=_num(lo)),
        _el("maxValue", text=_num(hi)),
        _el("algorithm", text="StretchToMinimumMaximum"),
    )


def rgb_style(ranges: Sequence[tuple[float, float]], *, bands: tuple[int, int, int] = (1, 2, 3),
              alpha_band: int = -1) -> LayerStyle:
    """Multiband colour with a fixed linear stretch per band (``ranges`` as (min, max))."""
    if len(ranges) != 3:
        raise ValueError("ranges must hold three (min, max) pairs")
    renderer = _el(
        "rasterrenderer", {"type": "multibandcolor", "redBand": str(bands[0]), "greenBand": str(bands[1]),
                           "blueBand": str(bands[2]), "alphaBand": str(alpha_band), "nodataColor": ""},
        _el("rasterTransparency"),
        _min_max_origin("CumulativeCut"),
        _contrast("redContrastEnhancement", *ranges[0]),
        _contrast("greenContrastEnhancement", *ranges[1]),
        _contrast("blueContrastEnhancement", *ranges[2]),
    )
    return _raster_style(renderer)


def gray_style(value_range: tuple[float, float], *, band: int = 1, alpha_band: int = -1) -> LayerStyle:
    """Single-band grey with a fixed linear stretch."""
    lo, hi = value_range
    renderer = _el(
        "rasterrenderer", {"type": "singlebandgray", "grayBand": str(band), "alphaBand": str(alpha_band),
                           "gradient": "BlackToWhite", "nodataColor": ""},
        _el("rasterTransparency"),
        _min_max_origin("CumulativeCut"),
        _el("contrastEnhancement", {}, _el("minValue", text=_num(lo)), _el("maxValue", text=_num(hi)),
            _el("algorithm", text="StretchToMinimumMaximum")),
    )
    return _raster_style(renderer)


# --------------------------------------------------------------------------- vectors
def _categorized_renderer(attr: str, classes: list[tuple[str, str, str, str]], *, fill_alpha: int,
                          width: float) -> ET.Element:
    """A categorizedSymbol renderer on ``attr``: one fill per ``(value, label, fill, outline)``."""
    categories = _el("categories")
    symbols = _el("symbols")
    for i, (value, label, fill, outline) in enumerate(classes):
        categories.append(_el("category", {"value": value, "label": label, "symbol": str(i), "render": "true"}))
        symbols.append(_symbol("fill", str(i), [_simple_fill(fill, outline, fill_alpha=fill_alpha, width=width)]))
    return _el(
        "renderer-v2", {"type": "categorizedSymbol", "attr": attr, "forceraster": "0", "symbollevels": "0",
                        "enableorderby": "0", "referencescale": "-1"},
        categories, symbols,
    )


def damage_style() -> LayerStyle:
    """Damage polygons categorized by ``severity``, labelled with severity and confidence."""
    classes = [(sev, SEVERITY_LABELS[sev], SEVERITY_COLOURS[sev], SEVERITY_OUTLINES[sev]) for sev in SEVERITY_COLOURS]
    renderer = _categorized_renderer("severity", classes, fill_alpha=140, width=0.5)
    label = "concat(\"severity\", ' ', format_number(\"confidence\", 2))"
    return _vector_style(renderer, _labeling(label, size=7.5, colour="#3a0000", placement="1", priority=4))


#: Grades of buildings beyond the damage classes: fill and outline colours, legend labels.
BUILDING_EXTRA = {
    "no damage": ("#d9f0d3", "#5aae61", "No visible damage"),
    "not assessed": ("#d9d9d9", "#737373", "Not assessed (too little analysed)"),
}


def buildings_style() -> LayerStyle:
    """Building footprints categorized by ``grade``, labelled with grade and confidence."""
    classes = [(g, SEVERITY_LABELS[g], SEVERITY_COLOURS[g], SEVERITY_OUTLINES[g]) for g in SEVERITY_COLOURS]
    classes += [(g, label, f, o) for g, (f, o, label) in BUILDING_EXTRA.items()]
    renderer = _categorized_renderer("grade", classes, fill_alpha=170, width=0.4)
    label = "concat(\"grade\", ' ', format_number(\"confidence\", 2))"
    return _vector_style(renderer, _labeling(label, size=6.5, colour="#1a1a1a", placement="1", priority=2))


#: Changes off the building footprints (ground_changes.geojson).
GROUND_COLOUR = "#7b3294"


def ground_changes_style() -> LayerStyle:
    """Changes off the building footprints: a dashed purple outline, labelled with the score."""
    symbol = _symbol("fill", "0", [_simple_fill(GROUND_COLOUR, GROUND_COLOUR, fill_alpha=40, width=0.5,
                                                outline_style="dash")])
    label = "concat('ground change ', format_number(\"score\", 2))"
    return _vector_style(_single_symbol_renderer(symbol), _labeling(label, size=6.5, colour=GROUND_COLOUR,
                                                                    placement="1", priority=1))


def aois_style() -> LayerStyle:
    """Areas of interest: dashed outline, no fill, labelled with their name."""
    symbol = _symbol("fill", "0", [_simple_fill(AOI_COLOUR, AOI_COLOUR, width=0.7, outline_style="dash", no_fill=True)])
    return _vector_style(_single_symbol_renderer(symbol), _labeling('"name"', size=10, colour="#005f73", bold=True,
                                                                    placement="4", priority=3))


def sites_style() -> LayerStyle:
    """Reported sites: a star marker labelled with the name and the verdict."""
    symbol = _symbol("marker", "0", [_simple_marker("star", SITE_COLOUR, "#ffffff", size=5.0, outline_width=0.4)])
    label = "concat(\"name\", ': ', \"verdict\")"
    return _vector_style(_single_symbol_renderer(symbol), _labeling(label, size=9, colour="#5c0032", bold=True,
                                                                    placement="0", dist=2.0, priority=8))


def sites_uncertainty_style() -> LayerStyle:
    """The uncertainty circle of each reported site: dashed outline, no fill."""
    symbol = _symbol("fill", "0", [_simple_fill(SITE_COLOUR, SITE_COLOUR, width=0.5, outline_style="dash", no_fill=True)])
    return _vector_style(_single_symbol_renderer(symbol))


#: Arrow direction of a tie point's shift: clockwise from north (rows grow southwards).
TIE_ANGLE = 'degrees(atan2(coalesce("dx_px", 0), -coalesce("dy_px", 0)))'
#: Arrow length in mm, growing with the shift magnitude (px), capped.
TIE_SIZE = 'min(15, 3 + 1.2 * sqrt(coalesce("dx_px", 0)^2 + coalesce("dy_px", 0)^2))'


def tie_points_style() -> LayerStyle:
    """Tie points as shift arrows (data-defined rotation and size); rejected ones greyed."""
    dd = {"angle": TIE_ANGLE, "size": TIE_SIZE}
    accepted = _symbol("marker", "0", [_simple_marker("arrow", TIE_ACCEPTED_COLOUR, "#ffffff", size=4, outline_width=0.2, dd=dd)])
    rejected = _symbol("marker", "1", [_simple_marker("arrow", TIE_REJECTED_COLOUR, "#ffffff", size=4, outline_width=0.2, dd=dd)],
                       alpha=0.7)
    rules = _el(
        "rules", {"key": "{changedetect-tie-points-root}"},
        _el("rule", {"key": "{changedetect-tie-points-accepted}", "filter": 'if("accepted", 1, 0) = 1',
                     "label": "tie point accepted (arrow: shift of the after image)", "symbol": "0"}),
        _el("rule", {"key": "{changedetect-tie-points-rejected}", "filter": "ELSE",
                     "label": "tie point rejected (outlier)", "symbol": "1"}),
    )
    renderer = _el(
        "renderer-v2", {"type": "RuleRenderer", "forceraster": "0", "symbollevels": "0", "enableorderby": "0",
                        "referencescale": "-1"},
        rules, _el("symbols", {}, accepted, rejected),
    )
    return _vector_style(renderer)
