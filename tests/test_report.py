"""report.html: the threshold sweep, and a self-contained, readable, deterministic page."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from changedetect import report
from changedetect.report import (
    Chip,
    Overview,
    ReportData,
    render_report,
    threshold_sweep,
)

UTM = "EPSG:32637"


def test_threshold_sweep_known_answer():
    score = np.array([[0.9, 0.8, 0.2], [0.6, 0.1, np.nan]])
    truth = np.array([[True, True, False], [False, True, True]])
    sw = threshold_sweep(score, truth, [0.05, 0.5, 0.85, 0.95])
    # valid truth pixels: 0.9, 0.8, 0.1 (the NaN pixel is left out); others: 0.2, 0.6
    assert sw["truth_pixels"] == 3
    assert sw["pixels"] == 5
    assert sw["precision"] == [0.6, pytest.approx(0.6667, abs=1e-4), 1.0, 1.0]
    assert sw["recall"] == [1.0, pytest.approx(0.6667, abs=1e-4), pytest.approx(0.3333, abs=1e-4), 0.0]
    assert sw["f1"][3] == 0.0
    assert sw["best"] == {"threshold": 0.05, "f1": 0.75}


def test_threshold_sweep_edges():
    score = np.array([[0.1, 0.2]])
    nothing = threshold_sweep(score, np.zeros((1, 2), bool), [0.5])
    assert nothing["precision"] == [1.0]
    assert nothing["recall"] == [1.0]
    with pytest.raises(ValueError, match="same shape"):
        threshold_sweep(score, np.zeros((2, 2), bool), [0.5])


def test_offset_text_directions():
    assert report._offset_text({"dy": 3.9, "dx": -5.38}, {"north": -1.95, "east": -2.69}) == \
        "3.90 px (1.95 m) south, 5.38 px (2.69 m) west"
    assert report._offset_text({"dy": -1.0, "dx": 2.0}, {}) == "1.00 px north, 2.00 px east"


def _data(**changes) -> ReportData:
    import geopandas as gpd
    from shapely.geometry import Point, box

    x0, y0 = 277000.0, 4010000.0
    damage = gpd.GeoDataFrame(
        {"id": [1, 2], "aoi": ["market", "market"], "area_m2": [100.0, 30.0], "score": [0.8, 0.5],
         "score_max": [0.95, 0.6], "mean_ssim": [0.1, 0.4], "mean_difference": [0.3, 0.2],
         "structure_loss_fraction": [0.9, 0.3], "severity": ["destroyed", "moderate"], "confidence": [0.9, 0.5]},
        geometry=[box(x0 + 10, y0 + 10, x0 + 20, y0 + 20), box(x0 + 30, y0 + 5, x0 + 36, y0 + 10)], crs=UTM,
    )
    aois = gpd.GeoDataFrame({"name": ["market"]}, geometry=[box(x0, y0, x0 + 40, y0 + 30)], crs=UTM)
    sites = gpd.GeoDataFrame({"name": ["strike <1>"], "uncertainty_m": [8.0], "verdict": ["damage found"]},
                             geometry=[Point(x0 + 15, y0 + 15)], crs=UTM)
    ties = gpd.GeoDataFrame({"dy_px": [1.1, 0.9, 4.0], "dx_px": [-2.0, -2.1, 1.0], "accepted": [True, True, False]},
                            geometry=[Point(x0 + 5, y0 + 5), Point(x0 + 35, y0 + 25), Point(x0 + 20, y0 + 2)], crs=UTM)
    rng = np.random.default_rng(2841)
    rgba = np.concatenate([rng.random((30, 40, 3)), np.ones((30, 40, 1))], axis=-1).astype(np.float32)
    layer = rng.random((30, 40)).astype(np.float32)
    layer[:3] = np.nan
    chips = [
        Chip("aoi", "market", (x0, y0, x0 + 40, y0 + 30), rgba, rgba, 0.5 * layer, layer, layer, [("damaged", "130 m²")]),
        Chip("site", "strike <1>", (x0, y0, x0 + 40, y0 + 30), None, rgba, layer, layer, layer, []),
    ]
    summary = {
        "name": "test & co", "changedetect_version": "0.1.0", "polygon_count": 2, "damaged_area_m2": 130.0,
        "threshold": {"method": "otsu", "otsu": 0.41, "floor": 0.3, "value": 0.41},
        "coregistration": {"reliable": False},
        "aois": {"market": {"area_m2": 1200.0, "analysed_area_m2": 1100.0, "damaged_area_m2": 130.0,
                            "damaged_percent": 10.8, "polygon_count": 2, "mean_ssim": 0.6,
                            "polygons_by_severity": {"destroyed": 1, "severe": 0, "moderate": 1, "possible": 0}}},
        "sites": [{"name": "strike <1>", "verdict": "damage found", "inside_damage": True, "distance_m": 0.0,
                   "uncertainty_m": 8.0, "damaged_area_within_radius_m2": 90.0, "nearest_polygon_id": 1,
                   "nearest_severity": "destroyed"}],
        "evaluation": {"precision": 0.8, "recall": 0.7, "f1": 0.75, "iou": 0.6, "tp_m2": 90.0, "fp_m2": 20.0,
                       "fn_m2": 30.0, "objects": {"found": 1, "total": 2, "min_cover": 0.3,
                                                   "by_class": {"destroyed": {"found": 1, "total": 1}}}},
        "date_window": "Damage mapped here is consistent with any event between 2017-09-11 and 2018-04-24.",
    }
    fields = {
        "name": "test & co", "crs": UTM, "summary": summary,
        "coregistration": {"method": "tiles", "shift_px": {"dy": 1.0, "dx": -2.0}, "shift_m": {"north": -0.5, "east": -1.0},
                           "reliable": False, "ssim_before_correction": 0.2, "ssim_after_correction": 0.7,
                           "estimate": {"peak_ratio": 1.2, "n_inliers": 2, "n_outliers": 1, "rmse": 0.1}},
        "parameters": {"damage": {"min_area_m2": 20.0, "open_radius_m": 1.0}, "change": {"ssim_sigma_m": 0.75}},
        "software": {"changedetect": "0.1.0", "numpy": "2.0"},
        "inputs": [{"role": "before", "file": "before.tif", "sha256": "ab" * 32, "bytes": 1234}],
        "outputs": ["damage.geojson", "report.html"],
        "damage": damage, "aois": aois, "sites": sites, "tie_points": ties, "chips": chips,
        "overview": Overview((x0 - 5, y0 - 5, x0 + 45, y0 + 35), rng.random((40, 50))),
        "sweep": threshold_sweep(layer, layer > 0.7, [0.1, 0.4, 0.7]),
    }
    fields.update(changes)
    return ReportData(**fields)


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(_data())


def test_report_is_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script|<link|<iframe|url\(|@import", page, re.I)
    assert not re.search(r"(src|href)=\"(?!data:|#)", page)
    assert "http://" not in page
    assert "https://" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5  # map, 2 chips, sweep, tie points
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_sections_and_words(page):
    for anchor in ("map", "aois", "sites", "polygons", "accuracy", "coregistration", "method", "provenance"):
        assert f'id="{anchor}"' in page
    assert "between 2017-09-11 and 2018-04-24" in page
    assert "not proof of when" in page
    assert "geometric mean" in page
    assert "Radiometric normalisation" in page
    assert "Threshold sweep" in page
    assert "ab" * 32 in page
    assert "numpy" in page
    assert "Co-registration could not be confirmed" in page  # unreliable alignment is flagged
    assert "3 (2 accepted, 1 rejected)" in page
    assert "test &amp; co" in page
    assert "strike &lt;1&gt;" in page
    assert "strike <1>" not in page
    assert "1.00 px (0.50 m) south, 2.00 px (1.00 m) west" in page


def test_report_method_names_the_shadow_relighting():
    relit = {"ssim_sigma_m": 0.75, "shadow_relight": True, "shadow_max_shift_m": 1.5}
    page = render_report(_data(parameters={"damage": {"min_area_m2": 20.0}, "change": relit}))
    assert "(by at most 1.5 m) are relit" in page
    assert "a shadow that vanished with what cast it still counts" in page
    plain = render_report(_data(parameters={"damage": {"min_area_m2": 20.0}, "change": {"shadow_relight": False}}))
    assert "are relit" not in plain


def test_report_is_deterministic(page):
    assert render_report(_data()) == page


def test_report_without_optional_parts():
    summary = dict(_data().summary)
    for key in ("sites", "evaluation", "date_window"):
        summary.pop(key)
    text = render_report(_data(summary=summary, sites=None, tie_points=None, sweep=None, chips=_data().chips[:1]))
    assert 'id="sites"' not in text
    assert 'id="accuracy"' not in text
    assert "image dates were not given" in text
    assert text.count("data:image/png") == 2
