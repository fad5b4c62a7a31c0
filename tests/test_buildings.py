"""Per-building damage assessment: known answers, strip invariance, input checks."""

from __future__ import annotations

import numpy as np
import pytest

from changedetect import buildings
from changedetect.buildings import (
    GRADES,
    BuildingAccumulator,
    grade_building,
    grade_confidence,
)
from changedetect.types import SEVERITIES


def _scene():
    """Four 10 x 10 px buildings on a 30 x 60 grid (0.5 m pixels), NaN outside the analysed area.

    1: fully damaged; 2: 20 of 100 pixels damaged; 3: intact; 4: 70 % outside the
    analysed area.
    """
    shape = (30, 60)
    ids = np.zeros(shape, np.int32)
    ids[5:15, 2:12] = 1
    ids[5:15, 15:25] = 2
    ids[5:15, 28:38] = 3
    ids[5:15, 45:55] = 4
    score = np.full(shape, 0.1, np.float32)
    ssim = np.full(shape, 0.9, np.float32)
    loss = np.full(shape, 0.05, np.float32)
    damage = np.zeros(shape, bool)
    damage[3:17, 0:14] = True  # a damage polygon over all of building 1
    score[ids == 1], ssim[ids == 1], loss[ids == 1] = 0.9, 0.1, 0.8
    damage[5:7, 15:25] = True  # 20 px of building 2
    score[5:7, 15:25] = 0.8
    score[:, 48:] = np.nan  # analysed area ends inside building 4 (3 of 10 columns left)
    ssim[:, 48:] = np.nan
    loss[:, 48:] = np.nan
    return ids, {"damage": damage, "score": score, "ssim": ssim, "structure_loss": loss}


def _assess(ids, arrays, n=None, **kw):
    acc = BuildingAccumulator(int(ids.max()) if n is None else n)
    acc.add(ids, **arrays)
    return acc.assess(pixel_size=0.5, **kw)


def test_known_answers():
    ids, arrays = _scene()
    b1, b2, b3, b4 = _assess(ids, arrays)
    assert [b["building_id"] for b in (b1, b2, b3, b4)] == [1, 2, 3, 4]
    for b in (b1, b2, b3, b4):
        assert b["footprint_area_m2"] == pytest.approx(25.0)

    assert b1["grade"] == "destroyed"
    assert b1["damaged_fraction"] == 1.0
    assert b1["structure_loss_fraction"] == 1.0
    assert b1["mean_score"] == pytest.approx(0.9, abs=1e-4)
    assert b1["mean_ssim"] == pytest.approx(0.1, abs=1e-4)
    assert b1["confidence"] > 0.99

    assert b2["grade"] == "moderate"
    assert b2["damaged_fraction"] == pytest.approx(0.2)
    assert b2["structure_loss_fraction"] == 0.0
    assert b2["mean_score"] == pytest.approx(0.2 * 0.8 + 0.8 * 0.1, abs=1e-4)
    assert 0.9 < b2["confidence"] < 1  # 0.1 from a boundary, se 0.04: 2.5 standard errors

    assert b3["grade"] == "no damage"
    assert b3["damaged_fraction"] == 0.0
    assert b3["mean_ssim"] == pytest.approx(0.9, abs=1e-4)
    assert b3["confidence"] > 0.99

    assert b4["grade"] == "not assessed"
    assert b4["analysed_fraction"] == pytest.approx(0.3)
    assert b4["confidence"] == 0.0
    assert b4["damaged_fraction"] == 0.0  # given, although not graded


def test_structure_loss_alone_grades_and_reliability_scales_confidence():
    ids, arrays = _scene()
    arrays["damage"][:] = False  # building 1 is still lost by its structure loss
    b1 = _assess(ids, arrays)[0]
    half = _assess(ids, arrays, reliability=0.5)[0]
    assert b1["grade"] == "destroyed"
    assert b1["damaged_fraction"] == 0.0
    assert half["confidence"] == pytest.approx(b1["confidence"] / 2, abs=1e-3)


def test_min_analysed_fraction_and_unseen_buildings():
    ids, arrays = _scene()
    b4 = _assess(ids, arrays, n=6, min_analysed_fraction=0.25)[3]
    assert b4["grade"] == "no damage"
    # 30 intact pixels: 0.03 from the boundary is only ~1.3 standard errors; times the analysed share
    assert b4["confidence"] == pytest.approx(grade_confidence(0, 30) * 0.3, abs=1e-3)
    assert 0.2 < b4["confidence"] < 0.3
    b5, b6 = _assess(ids, arrays, n=6)[4:]  # no pixel in the region at all
    for b in (b5, b6):
        assert b["grade"] == "not assessed"
        assert b["confidence"] == 0.0
        assert b["footprint_area_m2"] == 0.0
        assert b["analysed_fraction"] == 0.0
        assert b["damaged_fraction"] is None
        assert b["mean_ssim"] is None


def test_damage_outside_analysed_pixels_is_not_counted():
    ids = np.ones((4, 4), np.int32)
    score = np.full((4, 4), 0.5, np.float32)
    score[:, :2] = np.nan
    arrays = {"damage": np.ones((4, 4), bool), "score": score, "ssim": score.copy(), "structure_loss": score.copy()}
    (b,) = _assess(ids, arrays)
    assert b["analysed_fraction"] == 0.5
    assert b["damaged_fraction"] == 1.0  # 8 of the 8 analysed pixels, not 16 of 8


def test_grade_thresholds():
    cases = {1.0: "destroyed", 0.5: "destroyed", 0.49: "severe", 0.3: "severe", 0.29: "moderate",
             0.1: "moderate", 0.09: "possible", 0.03: "possible", 0.029: "no damage", 0.0: "no damage"}
    for share, name in cases.items():
        assert grade_building(share) == name
        assert buildings._grades(np.array([share]))[0] == name
    assert (*SEVERITIES, "no damage", "not assessed") == GRADES


def test_confidence_is_monotone_and_bounded():
    # Farther from the nearest boundary (0.3, 0.5) -> surer; more pixels -> surer.
    n = 200
    lost = np.arange(60, 101)  # shares 0.30 .. 0.50
    c = grade_confidence(lost, np.full(lost.shape, n))
    assert c[0] == 0.0
    assert c[-1] == 0.0
    mid = int(np.argmax(c))
    assert np.all(np.diff(c[: mid + 1]) >= 0)
    assert np.all(np.diff(c[mid:]) <= 0)
    sizes = np.array([10, 100, 1000, 10000])
    c = grade_confidence(sizes // 5, sizes)  # 20 % lost
    assert np.all(np.diff(c) > 0)
    assert np.all((c >= 0) & (c <= 1))
    assert grade_confidence(1, 1) == pytest.approx(0.9, abs=0.01)  # one pixel is not certainty
    assert grade_confidence(0, 0) == 0.0


def _random_scene(seed, shape=(97, 41), n=25):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n + 1, shape).astype(np.int32)
    ids[rng.random(shape) < 0.3] = 0
    score = rng.random(shape).astype(np.float32)
    ssim = (rng.random(shape) * 2 - 1).astype(np.float32)
    loss = rng.random(shape).astype(np.float32)
    out = rng.random(shape) < 0.2
    for a in (score, ssim, loss):
        a[out] = np.nan
    ssim[rng.random(shape) < 0.05] = np.nan  # some analysed pixels without SSIM
    damage = rng.random(shape) < 0.3
    return n, ids, {"damage": damage, "score": score, "ssim": ssim, "structure_loss": loss}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strip_split_invariance(seed):
    n, ids, arrays = _random_scene(seed)
    whole = BuildingAccumulator(n)
    whole.add(ids, **arrays)
    expected = whole.assess(pixel_size=0.3, reliability=0.5, min_analysed_fraction=0.3)
    rng = np.random.default_rng(seed + 10)
    rows = ids.shape[0]
    for cuts in ([1], [50], [0, 13, 13, 60, 96], sorted(rng.choice(np.arange(1, rows), 20, replace=False))):
        edges = [0, *cuts, rows]
        acc = BuildingAccumulator(n)
        pieces = list(zip(edges[:-1], edges[1:], strict=False))
        for a, b in reversed(pieces):  # order of the strips does not matter either
            acc.add(ids[a:b], **{k: v[a:b] for k, v in arrays.items()})
        for name in ("footprint", "analysed", "damaged", "strong_loss", "ssim_count", "ssim_sum", "score_sum"):
            np.testing.assert_array_equal(getattr(acc, name), getattr(whole, name))
        assert acc.assess(pixel_size=0.3, reliability=0.5, min_analysed_fraction=0.3) == expected


def test_sums_match_float_reference():
    n, ids, arrays = _random_scene(5)
    acc = BuildingAccumulator(n)
    acc.add(ids, **arrays)
    analysed = np.isfinite(arrays["score"])
    for k, rec in enumerate(acc.assess(pixel_size=1.0, min_analysed_fraction=0.0), start=1):
        sel = (ids == k) & analysed
        assert rec["mean_score"] == pytest.approx(float(np.mean(arrays["score"][sel])), abs=1e-4)
        assert rec["mean_ssim"] == pytest.approx(float(np.nanmean(arrays["ssim"][sel])), abs=1e-4)
        assert rec["damaged_fraction"] == pytest.approx(float(arrays["damage"][sel].mean()), abs=1e-4)
        loss = arrays["structure_loss"][sel] >= 0.5
        assert rec["structure_loss_fraction"] == pytest.approx(float(loss.mean()), abs=1e-4)
        assert rec["footprint_area_m2"] == float((ids == k).sum())


def test_input_validation():
    ids, arrays = _scene()
    acc = BuildingAccumulator(4)
    with pytest.raises(ValueError, match="damage has shape"):
        acc.add(ids, **{**arrays, "damage": arrays["damage"][:-1]})
    with pytest.raises(ValueError, match="ssim has shape"):
        acc.add(ids, **{**arrays, "ssim": arrays["ssim"][:, :-1]})
    with pytest.raises(ValueError, match="2-D"):
        acc.add(ids[0], **{k: v[0] for k, v in arrays.items()})
    with pytest.raises(ValueError, match=r"id 4 out of range \[0, 3\]"):
        BuildingAccumulator(3).add(ids, **arrays)
    bad = ids.copy()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="id -1 out of range"):
        acc.add(bad, **arrays)
    with pytest.raises(ValueError, match="integer"):
        acc.add(ids.astype(np.float32), **arrays)
    with pytest.raises(ValueError, match="damage must be a bool"):
        acc.add(ids, **{**arrays, "damage": arrays["damage"].astype(np.float32)})
    with pytest.raises(ValueError, match="score must be a float"):
        acc.add(ids, **{**arrays, "score": np.zeros(ids.shape, np.int32)})
    with pytest.raises(ValueError, match="n_buildings"):
        BuildingAccumulator(-1)
    assert not acc.footprint.any()  # nothing was added by the failed calls
    acc.add(ids[:10], **{k: v[:10] for k, v in arrays.items()})
    with pytest.raises(ValueError, match="columns"):
        acc.add(ids[10:, :-1], **{k: v[10:, :-1] for k, v in arrays.items()})
    for kw, what in (
        ({"pixel_size": 0.0}, "pixel_size"),
        ({"pixel_size": 0.5, "reliability": 1.5}, "reliability"),
        ({"pixel_size": 0.5, "min_analysed_fraction": -0.1}, "min_analysed_fraction"),
    ):
        with pytest.raises(ValueError, match=what):
            acc.assess(**kw)
    with pytest.raises(ValueError, match="lost"):
        grade_confidence(5, 4)


def test_empty_inputs():
    assert BuildingAccumulator(0).assess(pixel_size=1.0) == []
    acc = BuildingAccumulator(2)
    empty = np.zeros((0, 7))
    acc.add(empty.astype(np.int32), damage=empty.astype(bool), score=empty, ssim=empty, structure_loss=empty)
    assert [b["grade"] for b in acc.assess(pixel_size=1.0)] == ["not assessed"] * 2
