import numpy as np
import pytest
from shapely.geometry import box

from changedetect import evaluate


def test_pixel_metrics_known_counts():
    pred = np.zeros((10, 10), bool)
    truth = np.zeros((10, 10), bool)
    pred[0:4, 0:5] = True  # 20
    truth[2:6, 0:5] = True  # 20, overlap 10
    m = evaluate.pixel_metrics(pred, truth)
    assert (m.tp, m.fp, m.fn) == (10, 10, 10)
    assert m.precision == pytest.approx(0.5)
    assert m.f1 == pytest.approx(0.5)
    assert m.iou == pytest.approx(1 / 3)


def test_area_metrics_exact():
    m = evaluate.area_metrics([box(0, 0, 10, 10)], [box(5, 0, 15, 10)])
    assert m.tp == pytest.approx(50)
    assert m.precision == pytest.approx(0.5)
    assert m.recall == pytest.approx(0.5)


def test_object_recall_30_percent_rule_and_classes():
    truth = [box(0, 0, 10, 10), box(20, 0, 30, 10), box(40, 0, 50, 10)]
    pred = [box(0, 0, 10, 3.5), box(20, 0, 30, 2.5)]  # 35 % and 25 % covered
    r = evaluate.object_recall(truth, pred, classes=["destroyed", "destroyed", "moderate"])
    assert r["found"] == 1
    assert r["total"] == 3
    assert r["by_class"]["destroyed"] == {"found": 1, "total": 2, "recall": 0.5}
    assert r["by_class"]["moderate"]["found"] == 0


def test_empty_prediction():
    m = evaluate.area_metrics([], [box(0, 0, 1, 1)])
    assert m.recall == 0
    assert m.precision == 1.0
    assert m.f1 == 0


def test_building_truth_and_agreement():
    from shapely.geometry import box

    from changedetect.evaluate import building_agreement, building_truth

    footprints = [box(0, 0, 10, 10), box(20, 0, 30, 10), box(40, 0, 50, 10), box(60, 0, 70, 10)]
    truth = [box(0, 0, 10, 10), box(20, 0, 30, 2), box(40, 0, 50, 5)]
    reference = building_truth(footprints, truth, ["destroyed", "severe", "moderate"])
    # 20 % covered is below the 30 % rule; 50 % is enough
    assert reference == ["destroyed", "no damage", "moderate", "no damage"]
    agreement = building_agreement(["destroyed", "moderate", "severe", "not assessed"], reference)
    assert agreement["compared"] == 3
    assert agreement["exact"] == round(1 / 3, 4)
    assert agreement["within_one_class"] == round(2 / 3, 4)
    assert agreement["intact_flagged"] == 1.0
    assert agreement["heavy_missed"] == 0.0
    assert agreement["confusion"]["no damage"] == {"moderate": 1}
