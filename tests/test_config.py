import pytest

from changedetect.config import load_pipeline
from changedetect.errors import ConfigError


@pytest.fixture
def pipeline_dir(tmp_path, make_raster):
    import numpy as np

    make_raster(np.zeros((8, 8), np.uint8), name="b.tif")
    make_raster(np.zeros((8, 8), np.uint8), name="a.tif")
    return tmp_path


def write(tmp_path, text):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


def test_valid_pipeline_resolves_relative_paths(pipeline_dir):
    p = write(pipeline_dir, 'name = "x"\n[inputs]\nbefore = "b.tif"\nafter = "a.tif"\n[output]\ndir = "out"\n[dates]\nbefore = 2017-09-11\n')
    cfg = load_pipeline(p)
    assert cfg.inputs.before == pipeline_dir / "b.tif"
    assert cfg.output.dir == pipeline_dir / "out"
    assert cfg.dates.before.isoformat() == "2017-09-11"
    assert cfg.damage.threshold == "auto"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[inputs]\nbefore = "b.tif"\nafter = "a.tif"\n[damage]\nmin_area = 3\n', "damage.min_area: unknown key"),
        ('[inputs]\nbefore = "b.tif"\nafter = "a.tif"\n[damage]\nmin_area_m2 = "big"\n', "damage.min_area_m2: Input should be a valid number"),
        ('[inputs]\nbefore = "b.tif"\n', "inputs.after: required key missing"),
        ('[inputs]\nbefore = "b.tif"\nafter = "missing.tif"\n', "inputs.after: file not found: missing.tif"),
        ('[inputs]\nbefore = "b.tif"\nafter = "a.tif"\n[damage]\nthreshold = 1.5\n', "damage.threshold"),
        ('[inputs\nbefore = "b.tif"\n', "TOML syntax error"),
    ],
)
def test_invalid_pipelines(pipeline_dir, text, message):
    p = write(pipeline_dir, text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(p)
    assert message in str(err.value)
    assert str(p) in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_syntax_error_names_line(pipeline_dir):
    p = write(pipeline_dir, 'name = "x"\n\n[inputs\n')
    with pytest.raises(ConfigError, match="line 3"):
        load_pipeline(p)


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_pipeline(tmp_path / "nope.toml")
