"""The automatic synthesis precision on a CPU rests on PyTorch's private probes: without them, fp32."""

import os

import pytest
import torch

from config import load_config
from synthesis import BF16_MIN_CHANNELS, synthesis_precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
CPU = torch.device("cpu")


@pytest.fixture
def config():
    config = load_config(os.path.join(ROOT, "configs", "waveflow-h16-r128.json"))
    assert config.waveflow.res_channels >= BF16_MIN_CHANNELS  # wide enough for bf16 to be chosen
    return config


def test_a_cpu_with_bf16_units_synthesizes_in_bf16(config, monkeypatch):
    for name in PROBES:
        monkeypatch.setattr(torch.cpu, name, lambda: True, raising=False)
    dtype, reason = synthesis_precision(config, "auto", CPU)
    assert dtype == torch.bfloat16, reason


@pytest.mark.parametrize("missing", [PROBES, PROBES[:1], PROBES[1:]])
def test_a_torch_without_the_private_probes_falls_back_to_fp32(config, monkeypatch, missing):
    for name in PROBES:
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    for name in missing:
        monkeypatch.delattr(torch.cpu, name)
    dtype, reason = synthesis_precision(config, "auto", CPU)
    assert dtype == torch.float32
    assert "no bf16 matrix units" in reason


def test_one_remaining_probe_is_still_heard(config, monkeypatch):
    monkeypatch.delattr(torch.cpu, PROBES[0], raising=False)
    monkeypatch.setattr(torch.cpu, PROBES[1], lambda: True, raising=False)
    assert synthesis_precision(config, "auto", CPU)[0] == torch.bfloat16
