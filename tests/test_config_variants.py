"""Configs beyond the bundled ones: variations of their keys that were accepted and then crashed or misbehaved."""

import pytest

from config import ConfigError
from model import build_model
from test_model import tiny_config
from test_train import make_corpus, run_here, write_config


@pytest.mark.parametrize("factors", [[1, 256], [256, 1], [1, 16, 16]])
def test_an_upsample_factor_of_1_is_refused_naming_the_key(factors):
    """A factor of 1 passed the config's check (positive integers) and then crashed in the upsampler's
    transposed conv (kernel 2, stride 1, output padding 1) at the first training step."""
    with pytest.raises(ConfigError, match=r"waveflow_config\.upsample_factors must not hold a factor of 1"):
        build_model(tiny_config("nanoflow", upsample_factors=factors))


def test_train_py_refuses_an_upsample_factor_of_1_in_one_line(tmp_path, capsys):
    make_corpus(str(tmp_path), n_train=2, n_test=1)
    path = write_config(str(tmp_path), waveflow_config__upsample_factors=[256, 1])
    status, _, err = run_here(capsys, "-c", path, "--max_iterations", "1")
    assert status != 0
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {path}: waveflow_config.upsample_factors must not hold a factor of 1 (its transposed conv "
        "stretches nothing and cannot keep the length; leave it out), got [256, 1]"
    ]
