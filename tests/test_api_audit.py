"""The project used as a Python library, as a TTS engineer embeds the vocoder: the calls of the README's
"In Python" section and docs/deploy.md with the inputs such code passes (whole configs, float64 arrays,
tensors that require grad, buffers the caller reuses)."""

import pytest
import torch

from config import config_from_dict, load_config
from model import build_model
from test_model import ROOT, random_model, tiny_config


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


# ----------------------------------------------------------------------------- the training direction


def test_forward_takes_float64_audio_and_mel_as_soundfile_and_numpy_give_them():
    model = random_model(small_config())
    audio, mel = torch.rand(2, 320) * 2 - 1, torch.randn(2, 80, 2)
    with torch.no_grad():
        z, logdet = model(audio, mel)
        z64, logdet64 = model(audio.double(), mel.double())
    assert z64.dtype == logdet64.dtype == torch.float32
    assert torch.equal(z64, z) and torch.equal(logdet64, logdet)


@pytest.mark.parametrize(
    "audio,mel,message",
    [
        ((2, 320), (3, 80, 2), r"one B >= 1, got shapes \(2, 320\) and \(3, 80, 2\)"),
        ((2, 1, 320), (2, 80, 2), r"audio must be \[B, T\] and mel \[B, 80, F\]"),
        ((320,), (80, 2), r"audio must be \[B, T\]"),
        ((2, 320), (2, 40, 2), r"mel \[B, 80, F\]"),
        ((0, 320), (0, 80, 2), r"one B >= 1"),
        ((2, 0), (2, 80, 2), r"audio length 0 is not a positive multiple of n_height 8"),
        ((2, 323), (2, 80, 2), r"audio length 323 is not a positive multiple of n_height 8"),
        ((2, 640), (2, 80, 1), r"mel of 1 frames covers 256 samples, audio has 640"),
    ],
)
def test_forward_refuses_shapes_it_cannot_take_in_one_line(audio, mel, message):
    model = build_model(small_config())
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(audio), torch.zeros(mel))


def test_forward_refuses_integer_audio_rather_than_read_pcm_as_samples():
    model = build_model(small_config())
    with pytest.raises(ValueError, match=r"audio must be floating point \(samples in \[-1, 1\]\), got torch.int16"):
        model(torch.zeros(1, 320, dtype=torch.int16), torch.zeros(1, 80, 2))
