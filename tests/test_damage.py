import numpy as np
import pytest

from changedetect import damage


def test_planted_5x5m_change_gives_one_object_of_right_area():
    # 0.5 m pixels: 5 x 5 m = 10 x 10 px.
    mask = np.zeros((60, 60), bool)
    mask[20:30, 31:41] = True
    mask[5, 5] = True  # a speck
    mask[50, 10:40] = True  # a 0.5 m wide line (a shadow edge)
    clean = damage.clean_mask(mask, pixel_size=0.5, open_radius_m=1.0, close_radius_m=1.0, min_area_m2=20)
    assert clean.sum() == 100
    assert clean[20:30, 31:41].all()
    score = np.where(clean, 0.9, 0.1).astype(np.float32)
    labels, objs = damage.damage_objects(
        clean, score=score, ssim=np.zeros_like(score), difference=score, structure_loss=score,
        threshold=0.5, pixel_size=0.5,
    )
    assert len(objs) == 1
    assert objs[0].area_m2 == pytest.approx(25.0)
    assert objs[0].severity == "destroyed"
    assert 0 < objs[0].confidence <= 1


def test_min_area_removes_small_objects_and_input_untouched():
    mask = np.zeros((40, 40), bool)
    mask[5:11, 5:11] = True  # 9 m2
    before = mask.copy()
    clean = damage.clean_mask(mask, pixel_size=0.5, open_radius_m=0, close_radius_m=0, min_area_m2=10)
    assert not clean.any()
    assert np.array_equal(mask, before)


def test_small_holes_filled():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[15:17, 15:17] = False  # 1 m2 hole
    clean = damage.clean_mask(mask, pixel_size=0.5, open_radius_m=0, close_radius_m=0, max_hole_m2=2)
    assert clean[15:17, 15:17].all()


@pytest.mark.parametrize(("fraction", "grade"), [(0.9, "destroyed"), (0.6, "destroyed"), (0.45, "severe"), (0.25, "moderate"), (0.05, "possible")])
def test_grade(fraction, grade):
    assert damage.grade(fraction) == grade


def test_bad_parameters():
    with pytest.raises(ValueError, match="pixel_size"):
        damage.clean_mask(np.zeros((4, 4), bool), pixel_size=0)
    with pytest.raises(ValueError, match="min_area_m2"):
        damage.clean_mask(np.zeros((4, 4), bool), pixel_size=1, min_area_m2=-1)


def test_hysteresis_grows_seeds_into_connected_low_scores_only():
    score = np.zeros((30, 40), np.float32)
    score[5:15, 5:15] = 0.9  # an object above the threshold...
    score[5:15, 15:25] = 0.3  # ...fading out next to it
    score[20:25, 5:15] = 0.3  # as low, but not connected to any seed
    score[5:15, 25:27] = 0.1  # below the low threshold
    score[0, 0] = np.nan
    seeds = score >= 0.5
    grown = damage.hysteresis(seeds, score, 0.25)
    expected = np.zeros_like(seeds)
    expected[5:15, 5:25] = True
    np.testing.assert_array_equal(grown, expected)
    assert not damage.hysteresis(np.zeros_like(seeds), score, 0.25).any()
    # diagonal contact is a connection (8-connectivity, as the objects)
    score2 = np.zeros((10, 10), np.float32)
    score2[2, 2] = 0.9
    score2[3, 3] = 0.3
    assert damage.hysteresis(score2 >= 0.5, score2, 0.25)[3, 3]
    with pytest.raises(ValueError, match="same shape"):
        damage.hysteresis(seeds, score[:5], 0.25)
