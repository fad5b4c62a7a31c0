"""Load every output of a changedetect run in real QGIS and render them.

Run with the Python that has the ``qgis`` module (Debian's ``/usr/bin/python3``
after ``apt-get install qgis python3-qgis qgis-providers``), headless::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py OUTDIR PNG_OUT

Uses only the standard library and QGIS, never the project's own packages.
Every ``*.tif`` is loaded as a raster layer (gdal provider), every ``*.geojson``
and every layer of every ``*.gpkg`` as a vector layer (ogr provider), so QGIS
applies any same-named ``.qml`` style (or a GeoPackage's own); each layer's
style is described (renderer, classes, ranges, labels). Every ``*.qgs``/``*.qgz``
project is read: its layers in legend order with their validity, CRS, source,
visibility and style, and the project is rendered as it opens (visible layers,
legend order, default view) into ``PNG_OUT`` with ``_project`` added to its
name. All layers are also rendered together into a 400 x 400 PNG, which is
read back to count the pixels that differ from the background; each layer is
also rendered alone (in memory) to check that it draws something.

Prints one JSON object on stdout. Exit status: 0 when every layer and project
loaded and the render is not blank, 1 when something failed (the reasons are
on stderr, and in the JSON when it could still be printed), 2 on bad usage.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from pathlib import Path

SIZE = 400
BACKGROUND = (255, 255, 255)


def _num(value):
    """JSON-safe number: NaN and infinities become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _extent(rect):
    return [_num(rect.xMinimum()), _num(rect.yMinimum()), _num(rect.xMaximum()), _num(rect.yMaximum())]


def _data_type_name(value, qgis):
    """Name of a Qgis.DataType value ('Byte', 'Float32', ...), whatever its Python wrapping."""
    for name in ("Byte", "UInt16", "Int16", "UInt32", "Int32", "Float32", "Float64", "ARGB32"):
        if getattr(qgis.Qgis, name, None) == value:
            return name
    return str(int(value))


def _colour(c):
    return [c.red(), c.green(), c.blue(), c.alpha()]


def raster_style(layer):
    """The renderer of a raster layer: type, fixed range and colour stops, or RGB stretch."""
    renderer = layer.renderer()
    if renderer is None:
        return {"renderer": None}
    info = {"renderer": renderer.type(), "opacity": renderer.opacity()}
    if renderer.type() == "singlebandpseudocolor":
        shader = renderer.shader()
        function = shader.rasterShaderFunction()
        items = function.colorRampItemList()
        info.update({
            "band": renderer.band(),
            "min": renderer.classificationMin(), "max": renderer.classificationMax(),
            "ramp_type": int(function.colorRampType()), "clip": function.clip(),
            "stops": [{"value": it.value, "color": _colour(it.color), "label": it.label} for it in items],
        })
    elif renderer.type() == "multibandcolor":
        info["bands"] = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
        info["alpha_band"] = renderer.alphaBand()
        stretch = []
        for ce in (renderer.redContrastEnhancement(), renderer.greenContrastEnhancement(),
                   renderer.blueContrastEnhancement()):
            stretch.append(None if ce is None else [ce.minimumValue(), ce.maximumValue()])
        info["stretch"] = stretch
    elif renderer.type() == "singlebandgray":
        info["band"] = renderer.grayBand()
        ce = renderer.contrastEnhancement()
        info["stretch"] = None if ce is None else [ce.minimumValue(), ce.maximumValue()]
    return info


def _symbol_info(symbol, qgis):
    if symbol is None:
        return None
    info = {"type": int(symbol.type()), "color": _colour(symbol.color()), "layers": []}
    for i in range(symbol.symbolLayerCount()):
        sl = symbol.symbolLayer(i)
        props = sl.dataDefinedProperties()
        dd = {}
        for key, name in ((qgis.QgsSymbolLayer.PropertyAngle, "angle"), (qgis.QgsSymbolLayer.PropertySize, "size")):
            prop = props.property(key)
            if prop.isActive():
                dd[name] = prop.expressionString()
        info["layers"].append({"class": sl.layerType(), "data_defined": dd})
    return info


def vector_style(layer, qgis):
    """The renderer and labels of a vector layer (classes, rules, symbols, label expression)."""
    renderer = layer.renderer()
    if renderer is None:
        return {"renderer": None}
    info = {"renderer": renderer.type(), "labels_enabled": layer.labelsEnabled()}
    if renderer.type() == "categorizedSymbol":
        categories = renderer.categories()  # keep a reference: chained calls segfault
        info["attribute"] = renderer.classAttribute()
        info["categories"] = []
        for cat in categories:
            symbol = cat.symbol()
            info["categories"].append({"value": cat.value(), "label": cat.label(), "symbol": _symbol_info(symbol, qgis)})
    elif renderer.type() == "singleSymbol":
        symbol = renderer.symbol()
        info["symbol"] = _symbol_info(symbol, qgis)
    elif renderer.type() == "RuleRenderer":
        root = renderer.rootRule()
        children = root.children()
        info["rules"] = []
        for rule in children:
            symbol = rule.symbol()
            info["rules"].append({"filter": rule.filterExpression(), "label": rule.label(), "else": rule.isElse(),
                                  "symbol": _symbol_info(symbol, qgis)})
    if layer.labelsEnabled() and layer.labeling() is not None:
        labeling = layer.labeling()
        settings = labeling.settings()
        fmt = settings.format()
        buffer = fmt.buffer()
        info["label_expression"] = settings.fieldName
        info["label_is_expression"] = settings.isExpression
        info["label_buffer"] = buffer.enabled()
    return info


def raster_info(layer, qgis):
    """Validity, CRS, bands, nodata and band-1 statistics of a raster layer."""
    info = {"type": "raster", "valid": layer.isValid(), "crs": layer.crs().authid()}
    if not layer.isValid():
        info["error"] = layer.error().summary()
        return info
    prov = layer.dataProvider()
    info["band_count"] = layer.bandCount()
    info["extent"] = _extent(layer.extent())
    info["width"], info["height"] = layer.width(), layer.height()
    renderer = layer.renderer()
    info["renderer"] = renderer.type() if renderer else None
    if info["renderer"] == "multibandcolor":
        info["rgb_bands"] = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
    bands = []
    for b in range(1, layer.bandCount() + 1):
        band = {
            "data_type": _data_type_name(prov.dataType(b), qgis),
            "color_interpretation": prov.colorInterpretationName(b),
            "has_nodata": prov.sourceHasNoDataValue(b),
        }
        if prov.sourceHasNoDataValue(b):
            band["nodata"] = _num(prov.sourceNoDataValue(b))
        bands.append(band)
    info["bands"] = bands
    stats = prov.bandStatistics(1, qgis.QgsRasterBandStats.Min | qgis.QgsRasterBandStats.Max
                                | qgis.QgsRasterBandStats.Mean)
    info["band1_stats"] = {"min": _num(stats.minimumValue), "max": _num(stats.maximumValue),
                           "mean": _num(stats.mean)}
    info["style"] = raster_style(layer)
    return info


def vector_info(layer, qgis):
    """Validity, CRS, feature count, geometry type and fields of a vector layer."""
    info = {"type": "vector", "valid": layer.isValid(), "crs": layer.crs().authid()}
    if not layer.isValid():
        info["error"] = layer.error().summary() or "invalid vector layer"
        return info
    info["feature_count"] = layer.featureCount()
    info["extent"] = _extent(layer.extent())
    info["geometry_type"] = qgis.QgsWkbTypes.displayString(layer.wkbType())
    info["fields"] = [f.name() for f in layer.fields()]
    info["features_read"] = sum(1 for _ in layer.getFeatures())
    info["style"] = vector_style(layer, qgis)
    return info


def gpkg_layer_names(path, qgis):
    """Names of the vector layers of a GeoPackage, in file order."""
    probe = qgis.QgsVectorLayer(str(path), "probe", "ogr")
    provider = probe.dataProvider()
    names = []
    if provider is not None:
        separator = provider.sublayerSeparator()
        for sub in provider.subLayers():
            parts = sub.split(separator)
            if len(parts) > 1:
                names.append(parts[1])
    del probe
    return names


def nonblank_pixels(image, background):
    """Pixels of a QImage that differ from an opaque background colour."""
    from qgis.PyQt.QtGui import QImage

    img = image.convertToFormat(QImage.Format_ARGB32)
    bg = (0xFF << 24) | (background[0] << 16) | (background[1] << 8) | background[2]
    count = 0
    for y in range(img.height()):
        row = img.constScanLine(y)
        row.setsize(img.width() * 4)
        words = memoryview(bytes(row)).cast("I")  # ARGB32 is native-endian 32-bit words
        count += sum(1 for w in words if w != bg)
    return count


def render(layers, crs, extent, qgis, path=None, project=None):
    """Render ``layers`` (top first); return (QImage, errors, seconds)."""
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    settings = qgis.QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(crs)
    settings.setOutputSize(QSize(SIZE, SIZE))
    settings.setBackgroundColor(QColor(*BACKGROUND))
    settings.setExtent(extent)
    if project is not None:
        settings.setTransformContext(project.transformContext())
    t0 = time.perf_counter()
    job = qgis.QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    seconds = time.perf_counter() - t0
    image = job.renderedImage()
    errors = [f"{e.layerID}: {e.message}" for e in job.errors()]
    if path is not None and not image.save(str(path), "PNG"):
        errors.append(f"could not write {path}")
    return image, errors, seconds


def full_extent(layers, crs, qgis, project=None):
    """Union of the layers' extents in ``crs``."""
    extent = qgis.QgsRectangle()
    extent.setMinimal()
    for lyr in layers:
        tr = qgis.QgsCoordinateTransform(lyr.crs(), crs, project or qgis.QgsProject.instance())
        extent.combineExtentWith(tr.transformBoundingBox(lyr.extent()))
    return extent


def read_project(path, qgis, png_out=None):
    """Read a QGIS project file: its layers in legend order, and a render as it opens."""
    project = qgis.QgsProject()
    ok = project.read(str(path))
    layers = list(project.mapLayers().values())
    root = project.layerTreeRoot()
    tree = []
    for node in root.findLayers():
        lyr = node.layer()
        entry = {"name": node.name(), "id": node.layerId(), "visible": node.isVisible(), "loaded": lyr is not None}
        group = node.parent()
        entry["group"] = group.name() if group is not None and group is not root else None
        if lyr is not None:
            entry.update({"valid": lyr.isValid(), "crs": lyr.crs().authid(), "provider": lyr.providerType(),
                          "source": lyr.source()})
            if lyr.isValid():
                if isinstance(lyr, qgis.QgsRasterLayer):
                    entry["type"] = "raster"
                    entry["style"] = raster_style(lyr)
                else:
                    entry["type"] = "vector"
                    entry["feature_count"] = lyr.featureCount()
                    entry["style"] = vector_style(lyr, qgis)
        tree.append(entry)
    view = project.viewSettings().defaultViewExtent()
    report = {
        "read_ok": bool(ok),
        "layer_count": len(layers),
        "invalid_layers": sorted(lyr.name() for lyr in layers if not lyr.isValid()),
        "crs": project.crs().authid(),
        "title": project.title(),
        "tree": tree,
        "groups": [g.name() for g in root.children() if isinstance(g, qgis.QgsLayerTreeGroup)],
        "default_view": None if view.isNull() else {"extent": _extent(view), "crs": view.crs().authid()},
    }
    if png_out is not None and ok:
        visible = [lyr for lyr in root.layerOrder() if root.findLayer(lyr.id()).isVisible() and lyr.isValid()]
        extent = qgis.QgsRectangle(view) if not view.isNull() else full_extent(visible, project.crs(), qgis, project)
        image, errors, seconds = render(visible, project.crs(), extent, qgis, png_out, project=project)
        report["render"] = {"path": str(png_out), "layers": [lyr.name() for lyr in visible], "errors": errors,
                            "seconds": round(seconds, 3), "nonblank_pixels": nonblank_pixels(image, BACKGROUND)}
    return report


def load_layers(outdir, report, qgis):
    """Load every raster and vector layer of ``outdir`` (styles apply themselves); describe them."""
    rasters, vectors, names = [], [], {}
    for path in sorted(outdir.glob("*.tif")):
        layer = qgis.QgsRasterLayer(str(path), path.stem, "gdal")
        report["layers"][path.name] = raster_info(layer, qgis)
        rasters.append(layer)
        names[layer.id()] = path.name
    for path in sorted(outdir.glob("*.geojson")):
        layer = qgis.QgsVectorLayer(str(path), path.stem, "ogr")
        report["layers"][path.name] = vector_info(layer, qgis)
        vectors.append(layer)
        names[layer.id()] = path.name
    for path in sorted(outdir.glob("*.gpkg")):
        for sub in gpkg_layer_names(path, qgis):
            layer = qgis.QgsVectorLayer(f"{path}|layername={sub}", sub, "ogr")
            key = f"{path.name}|{sub}"
            report["layers"][key] = vector_info(layer, qgis)
            vectors.append(layer)
            names[layer.id()] = key
    return rasters, vectors, names


def check(outdir, png_out, qgis):
    """Load, describe and render every output; return (report, problems)."""
    from qgis.PyQt.QtGui import QImage

    report = {"qgis_version": qgis.Qgis.QGIS_VERSION, "layers": {}, "projects": {}}
    problems = []
    t0 = time.perf_counter()
    rasters, vectors, names = load_layers(outdir, report, qgis)  # names: layer id -> file name
    for path in sorted([*outdir.glob("*.qgs"), *outdir.glob("*.qgz")]):
        project_png = png_out.with_name(f"{png_out.stem}_project{png_out.suffix}")
        report["projects"][path.name] = proj = read_project(path, qgis, project_png)
        if not proj["read_ok"] or proj["invalid_layers"]:
            problems.append(f"{path.name}: project not read cleanly: {proj}")
        if proj.get("render", {}).get("errors"):
            problems.append(f"{path.name}: render errors {proj['render']['errors']}")
    report["load_seconds"] = round(time.perf_counter() - t0, 3)
    for name, info in report["layers"].items():
        if not info["valid"]:
            problems.append(f"{name}: invalid layer: {info.get('error', '')}")
    if not report["layers"]:
        problems.append(f"no *.tif or *.geojson in {outdir}")

    # Top first: polygons (half transparent), then single-band rasters (faint),
    # the multi-band (RGB) image at the bottom, so the composite shows every layer.
    rasters.sort(key=lambda lyr: lyr.bandCount() if lyr.isValid() else 0)
    valid = [lyr for lyr in (*vectors, *rasters) if lyr.isValid()]
    if valid:
        crs = next((lyr.crs() for lyr in rasters if lyr.isValid()), valid[0].crs())
        extent = qgis.QgsRectangle()
        extent.setMinimal()
        for lyr in valid:
            tr = qgis.QgsCoordinateTransform(lyr.crs(), crs, qgis.QgsProject.instance())
            layer_extent = tr.transformBoundingBox(lyr.extent())
            report["layers"][names[lyr.id()]]["extent_render_crs"] = _extent(layer_extent)
            extent.combineExtentWith(layer_extent)
        extent.scale(1.05)
        for lyr in valid[:-1]:
            lyr.setOpacity(0.5 if isinstance(lyr, qgis.QgsVectorLayer) else 0.25)
        _, errors, seconds = render(valid, crs, extent, qgis, png_out)
        written = QImage(str(png_out))
        report["render"] = {
            "path": str(png_out), "crs": crs.authid(), "extent": _extent(extent),
            "width": written.width(), "height": written.height(), "errors": errors,
            "seconds": round(seconds, 3),
            "nonblank_pixels": nonblank_pixels(written, BACKGROUND) if not written.isNull() else 0,
        }
        problems += [f"render: {e}" for e in errors]
        if written.isNull():
            problems.append(f"render: {png_out} could not be read back")
        elif report["render"]["nonblank_pixels"] == 0:
            problems.append("render: the image is blank")
        for lyr in valid:  # each layer alone must draw something
            image, errors, _ = render([lyr], crs, extent, qgis)
            report["layers"][names[lyr.id()]]["render_nonblank_pixels"] = nonblank_pixels(image, BACKGROUND)
            report["layers"][names[lyr.id()]]["render_errors"] = errors
    return report, problems


def _err(message):
    sys.stderr.write(message + "\n")


def main(argv):
    """Entry point: returns the exit status."""
    if len(argv) != 3:
        _err(f"usage: {Path(argv[0]).name} OUTDIR PNG_OUT")
        return 2
    outdir, png_out = Path(argv[1]), Path(argv[2])
    if not outdir.is_dir():
        _err(f"qgis_check: not a directory: {outdir}")
        return 2
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        import qgis.core as qgis
    except ImportError as exc:
        _err(f"qgis_check: cannot import qgis.core ({exc}): run with the Python of a QGIS install")
        return 1
    t0 = time.perf_counter()
    app = qgis.QgsApplication([], False)
    app.initQgis()
    init_seconds = time.perf_counter() - t0
    status = 0
    try:
        before = {p.name for p in outdir.iterdir()}
        report, problems = check(outdir, png_out, qgis)
        gc.collect()  # layers closed: GDAL has now written any *.aux.xml sidecar
        report["files_added"] = sorted({p.name for p in outdir.iterdir()} - before)
        report["init_seconds"] = round(init_seconds, 3)
        sys.stdout.write(json.dumps(report, indent=1, sort_keys=True) + "\n")
        sys.stdout.flush()
        for p in problems:
            _err(f"qgis_check: {p}")
        status = 1 if problems else 0
    except Exception as exc:  # anything QGIS raised is a failure (exit 1), after its traceback
        import traceback

        traceback.print_exc(file=sys.stderr)
        _err(f"qgis_check: failed: {exc}")
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        app.exitQgis()
    return status


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Some QGIS builds crash in Python's interpreter teardown (PyQt/sip objects
    # destroyed after exitQgis()): leave without it, the report is already out.
    os._exit(code)
