"""Property-based tests (hypothesis) of the numeric core and the pipeline-file parser."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from changedetect import change, damage, radiometry
from changedetect.config import config_from_dict
from changedetect.errors import ConfigError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

images = st.integers(8, 24).flatmap(
    lambda n: st.tuples(
        arrays(np.float32, (3, n, n), elements=st.floats(0, 1, width=32)),
        arrays(np.float32, (3, n, n), elements=st.floats(0, 1, width=32)),
        arrays(np.bool_, (n, n)),
    )
)


@SETTINGS
@given(images)
def test_change_layers_no_nan_leak_shapes_dtypes_inputs_kept(pair):
    before, after, valid = pair
    b0, a0, v0 = before.copy(), after.copy(), valid.copy()
    layers = change.change_layers(before, after, valid=valid, pixel_size=0.5)
    for name in ("difference", "ssim", "score", "structure_loss", "vegetation"):
        arr = getattr(layers, name)
        assert arr.shape == valid.shape and arr.dtype == np.float32, name
        # finite exactly where the layer says the data is valid, NaN elsewhere
        assert np.array_equal(np.isfinite(arr), layers.valid), name
    assert not (layers.valid & ~valid).any()
    s = layers.score[layers.valid]
    assert np.all((s >= 0) & (s <= 1))
    assert np.array_equal(before, b0)
    assert np.array_equal(after, a0)
    assert np.array_equal(valid, v0)


@SETTINGS
@given(images)
def test_normalisation_finite_and_inputs_kept(pair):
    before, after, valid = pair
    if not valid.any():
        with pytest.raises(ValueError):
            radiometry.match_histograms(after, before, valid=valid)
        return
    a0 = after.copy()
    for method in ("histogram", "linear"):
        if method == "linear" and valid.sum() < 2:
            continue
        out, fit = radiometry.normalize(after, before, method=method, valid=valid)
        assert out.shape == after.shape
        assert out.dtype == np.float32
        assert np.isfinite(out).all()
        assert np.array_equal(out[:, ~valid], after[:, ~valid])
    assert np.array_equal(after, a0)


@SETTINGS
@given(arrays(np.bool_, st.tuples(st.integers(4, 40), st.integers(4, 40))), st.floats(0.1, 2.0))
def test_clean_mask_is_subset_of_closing_and_keeps_input(mask, pixel_size):
    m0 = mask.copy()
    out = damage.clean_mask(mask, pixel_size=pixel_size, min_area_m2=1.0)
    assert out.shape == mask.shape
    assert out.dtype == bool
    assert np.array_equal(mask, m0)
    refined = damage.refine_boundaries(out, np.where(out, 0.8, 0.0))
    assert not (refined & ~out).any()


keys = st.sampled_from(["inputs", "damage", "change", "coregister", "radiometry", "dates", "bogus"])
values = st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(), st.none(),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@SETTINGS
@given(st.dictionaries(keys, st.one_of(values, st.dictionaries(st.text(max_size=12), values, max_size=3)), max_size=4))
def test_config_parser_never_crashes(data):
    """Any parsed TOML either validates or raises a one-line ConfigError."""
    try:
        config_from_dict(data, source="p.toml")
    except ConfigError as exc:
        msg = str(exc)
        assert msg.startswith("p.toml: ")
        assert "\n" not in msg
