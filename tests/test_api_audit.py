"""The project used as a Python library, as a TTS engineer embeds the vocoder: the calls of the README's
"In Python" section and docs/deploy.md with the inputs such code passes (whole configs, float64 arrays,
tensors that require grad, buffers the caller reuses)."""

import pytest
import torch

from config import config_from_dict, load_config
from model import build_model
from test_model import ROOT, tiny_config


def small_config(**overrides) -> dict:
    return tiny_config("nanoflow", n_height=8, n_layer=2, n_flow=2, **overrides)


# ----------------------------------------------------------------------------- build_model


def test_build_model_takes_a_whole_config_as_well_as_its_section():
    section = small_config()
    whole = {"train_config": {}, "data_config": {}, "waveflow_config": section}
    expected = {name: tuple(value.shape) for name, value in build_model(section).state_dict().items()}
    for config in (whole, config_from_dict(whole, sections=("waveflow_config",))):
        model = build_model(config)
        assert {name: tuple(value.shape) for name, value in model.state_dict().items()} == expected
    demo = load_config(f"{ROOT}/configs/demo.json")
    assert build_model(demo).config == demo.waveflow
    with pytest.raises(ValueError, match="unknown section 'waveflow'"):
        build_model({"waveflow_config": section, "waveflow": {}})
