"""Configs beyond the bundled ones: variations of their keys that were accepted and then crashed or misbehaved."""

import pytest
import torch
import torch.nn.functional as F

from config import ConfigError
from model import build_model, negative_log_likelihood
from modules import HeightCausalConv2d
from test_model import TOLERANCE, random_model, tiny_config
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


@pytest.mark.parametrize("channels", [8, 64])  # 64: the CPU's weight gradient by matrix products
def test_a_width_dilation_past_the_input_pads_nothing_and_changes_nothing(channels):
    """Block j's width dilation is 2 ** j: with n_layer 20 or more, padding 2 ** j columns each side of every
    block's input took gigabytes (n_layer 64: the process was killed). Past the width the side taps read
    only that padding, so the centre tap alone gives the same output and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, channels, 4, 6, requires_grad=True)
    for dilation_w in (6, 7, 64):
        conv = HeightCausalConv2d(channels, 4, 3, (2, dilation_w))
        out = conv(x)
        reference = F.conv2d(
            F.pad(x, (dilation_w, dilation_w, 4, 0)),
            conv.conv.normed_weight(),
            conv.conv.bias,
            dilation=(2, dilation_w),
        )
        assert torch.allclose(out, reference, atol=1e-5)
        grads = torch.autograd.grad(out.square().sum(), (x, conv.conv.weight_v, conv.conv.weight_g))
        reference_grads = torch.autograd.grad(reference.square().sum(), (x, conv.conv.weight_v, conv.conv.weight_g))
        for grad, reference_grad in zip(grads, reference_grads, strict=True):
            assert torch.allclose(grad, reference_grad, atol=1e-4)
    huge = HeightCausalConv2d(channels, 4, 3, (1, 2**50))  # its padding would be petabytes
    assert huge(x).shape == (2, 4, 4, 6)


def test_a_model_of_many_layers_trains_and_inverts():
    model = random_model(tiny_config("nanoflow", n_layer=16, n_flow=2, res_channels=4, n_height=8))
    mel, z = torch.randn(1, 80, 4), torch.randn(1, 1, 8, 32)
    audio = model.infer(mel, z=z)
    model.train()
    z_back, logdet = model(audio, mel)
    assert torch.allclose(z_back, z, atol=TOLERANCE)
    negative_log_likelihood(z_back, logdet).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
