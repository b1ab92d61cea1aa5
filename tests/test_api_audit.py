"""The project used as a Python library, as a TTS engineer embeds the vocoder: the calls of the README's
"In Python" section and docs/deploy.md with the inputs such code passes (whole configs, float64 arrays,
tensors that require grad, buffers the caller reuses)."""

import copy
import json
import os
import weakref
from typing import Any, cast

import pytest
import torch

from checkpoint import read_checkpoint
from config import TrainConfig, WaveFlowConfig, config_from_dict, load_config, parse_section
from denoiser import Denoiser
from model import build_model, negative_log_likelihood
from streaming import ColumnNoise, StreamingSynthesis
from test_model import ROOT, random_model, tiny_config


def small_config(**overrides) -> dict:
    return tiny_config("nanoflow", **{"n_height": 8, "n_layer": 2, "n_flow": 2, **overrides})


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


def test_a_model_cast_to_bf16_computes_its_likelihood_in_fp32_as_it_synthesizes():
    """`model.to(torch.bfloat16)` synthesizes (docs/precision.md); its forward failed at the second flow, whose
    estimator got the flow's fp32 state."""
    model = random_model(small_config())
    audio, mel = torch.rand(2, 320) * 2 - 1, torch.randn(2, 80, 2)
    with torch.no_grad():
        z, logdet = model(audio, mel)
        z_bf16, logdet_bf16 = model.to(torch.bfloat16)(audio, mel)
    assert z_bf16.dtype == logdet_bf16.dtype == torch.float32
    assert (z_bf16 - z).abs().max() < 0.05 and (logdet_bf16 - logdet).abs().max() < 1.0


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
        ((2, 640), (2, 80, 1), r"mel of 1 frame covers 256 samples, audio has 640"),
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


# ----------------------------------------------------------------------------- streaming


def streamed(model, pushes) -> torch.Tensor:
    synthesis = StreamingSynthesis(model, chunk_frames=4, lookahead_frames=3, context_frames=3, sigma=0.8, seed=1)
    chunks = [chunk for mel in pushes for chunk in synthesis.push(mel)]
    return torch.cat(chunks + synthesis.finish(), dim=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_a_gpu_takes_a_mel_and_column_noise_made_on_the_cpu(monkeypatch):
    """deploy.md's whole synthesis with a stream's noise, `model.infer(mel, z=ColumnNoise(...).take(0, W))`: the
    noise is drawn on the CPU, and on a GPU model it failed inside synthesis; so did a stream of CPU frames."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # TF32 rounds to 10 bits: not 1e-4
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = random_model(small_config()).remove_weight_norm()
    mel = torch.randn(2, 80, 12)
    z = ColumnNoise(2, 8, 0.8, seed=1, hop_length=256).take(0, 9 * 32)
    expected = model.infer(mel, z=z)
    gpu_model = model.cuda()
    audio = gpu_model.infer(mel, z=z)
    assert audio.device.type == "cuda" and torch.allclose(audio.cpu(), expected, atol=1e-4)
    assert streamed(gpu_model, [mel]).device.type == "cuda"


def test_a_stream_keeps_its_own_copy_of_the_frames_pushed():
    """An acoustic model writing its frames into one buffer it reuses: the stream read the buffer again
    later (the first piece was held as given), and synthesized what the buffer held by then."""
    model = random_model(small_config()).remove_weight_norm()
    mel = torch.randn(2, 80, 12)
    expected = streamed(model, [mel[:, :, :2], mel[:, :, 2:]])
    synthesis = StreamingSynthesis(model, chunk_frames=4, lookahead_frames=3, context_frames=3, sigma=0.8, seed=1)
    buffer = mel[:, :, :2].clone()
    chunks = synthesis.push(buffer)
    buffer.zero_()
    chunks += synthesis.push(mel[:, :, 2:]) + synthesis.finish()
    assert torch.equal(torch.cat(chunks, dim=1), expected)


def test_a_stream_does_not_hold_the_autograd_graph_of_frames_that_require_grad():
    """The frames of an acoustic model run without torch.no_grad require grad: each push chained its graph
    to the frames held, so a stream kept every input of the utterance alive."""
    model = random_model(small_config()).remove_weight_norm()
    acoustic_model = torch.nn.Linear(10, 80)
    synthesis = StreamingSynthesis(model, chunk_frames=4, lookahead_frames=3, context_frames=3)
    inputs = []
    for _ in range(12):
        features = torch.randn(1, 1, 10)
        inputs.append(weakref.ref(features))
        mel = acoustic_model(features).transpose(1, 2)  # [1, 80, 1]
        assert mel.requires_grad
        assert not any(chunk.requires_grad for chunk in synthesis.push(mel))
        del features, mel
    assert sum(ref() is not None for ref in inputs) == 0
    assert not any(chunk.requires_grad for chunk in synthesis.finish())


@pytest.mark.parametrize("batch,height", [(1, 8), (2, 16)])
def test_a_stream_refuses_noise_of_another_batch_or_height_in_one_line(batch, height):
    model = build_model(small_config())
    synthesis = StreamingSynthesis(model, chunk_frames=4, noise=ColumnNoise(batch, height, hop_length=256))
    message = rf"the noise given is of batch {batch} and {height} rows; the stream needs batch 2 .* and 8 rows"
    with pytest.raises(ValueError, match=message):
        synthesis.push(torch.zeros(2, 80, 20))


def test_a_stream_refuses_an_empty_batch_in_one_line():
    synthesis = StreamingSynthesis(build_model(small_config()), chunk_frames=4)
    with pytest.raises(ValueError, match=r"mel frames of an empty batch, shape \(0, 80, 20\): B must be at least 1"):
        synthesis.push(torch.zeros(0, 80, 20))


# ----------------------------------------------------------------------------- the denoiser


def test_the_denoiser_takes_a_configs_data_section_or_the_whole_config():
    config = load_config(os.path.join(ROOT, "configs", "nanoflow-24k-hop300.json"))
    model = build_model(config)
    for given in (config, config.data):
        denoiser = Denoiser.from_config(model, given)
        assert (denoiser.filter_length, denoiser.hop_length) == (config.data.filter_length, config.data.hop_length)
        assert int(torch.count_nonzero(denoiser.window)) == config.data.win_length - 1  # periodic Hann: one zero


def test_the_denoisers_stream_keeps_its_own_copy_of_the_audio_and_not_its_graph():
    model = random_model(small_config()).remove_weight_norm()
    denoiser = Denoiser(model)
    audio = model.infer(torch.randn(2, 80, 10), sigma=0.8)  # [2, 1792]
    expected = denoiser(audio, 1.0)
    stream = denoiser.stream(1.0)
    buffer = audio[:, :100].clone()  # shorter than half a window: held until the end can be reflected
    out = stream.push(buffer)
    buffer.zero_()
    out += stream.push(audio[:, 100:]) + stream.finish()
    assert torch.allclose(torch.cat(out, dim=1), expected, atol=1e-5)

    stream, inputs = denoiser.stream(1.0), []
    for start in range(0, audio.shape[1], 256):
        piece = audio[:, start : start + 256].clone().requires_grad_()
        inputs.append(weakref.ref(piece))
        assert not any(chunk.requires_grad for chunk in stream.push(piece * 1))
        del piece
    assert sum(ref() is not None for ref in inputs) == 0


def test_the_denoiser_refuses_audio_of_another_shape_in_one_line():
    model = random_model(small_config()).remove_weight_norm()
    denoiser = Denoiser(model)
    audio = model.infer(torch.randn(2, 80, 10), sigma=0.8)
    with pytest.raises(
        ValueError, match=r"the denoiser takes audio \[B, T\], as model.infer gives it, got shape \(1792,\)"
    ):
        denoiser(audio[0], 1.0)
    stream = denoiser.stream(1.0)
    with pytest.raises(ValueError, match=r"takes audio \[B, n\] of one B, got shape \(1792,\)"):
        stream.push(audio[0])
    stream.push(audio[:, :1000])
    with pytest.raises(ValueError, match=r"got shape \(1, 792\) after audio of 2 items"):
        stream.push(audio[:1, 1000:])


# ----------------------------------------------------------------------------- the temperature


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), -0.5, 1e38])
def test_a_temperature_that_would_make_nan_or_negative_noise_is_refused(sigma):
    """NaN or infinite noise made NaN audio without a word (the command line refuses such a -t); so did a finite
    sigma of 1e38, whose fp32 noise overflowed."""
    model = build_model(small_config())
    message = r"sigma, the noise's standard deviation, must be a finite number >= 0"
    for make in (
        lambda: model.infer(torch.randn(1, 80, 5), sigma=sigma),
        lambda: StreamingSynthesis(model, sigma=sigma),
        lambda: ColumnNoise(1, 8, sigma=sigma, hop_length=256),
    ):
        with pytest.raises(ValueError, match=message):
            make()


def test_temperature_0_is_synthesis_from_zero_noise():
    model = random_model(small_config())
    mel = torch.randn(1, 80, 5)
    assert torch.equal(model.infer(mel, sigma=0.0), model.infer(mel, z=torch.zeros(1, 1, 8, 64)))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_the_loss_is_the_gaussian_negative_log_likelihood_per_sample_at_any_sigma(sigma):
    z, logdet = torch.randn(2, 1, 8, 5, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    expected = -(torch.distributions.Normal(0.0, sigma).log_prob(z).sum() + logdet.sum()) / z.numel()
    assert torch.allclose(negative_log_likelihood(z, logdet, sigma=sigma), expected, rtol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_the_loss_refuses_a_sigma_that_is_no_standard_deviation(sigma):
    """0 and negative sigmas failed as Python's "math domain error"; NaN gave a NaN loss."""
    with pytest.raises(ValueError, match=r"sigma, the prior's standard deviation, must be a finite number > 0"):
        negative_log_likelihood(torch.zeros(1, 1, 8, 5), torch.zeros(1), sigma=sigma)


def test_the_denoiser_follows_a_checkpoint_loaded_into_its_model():
    """A service that loads new weights into the model it serves kept denoising with the old weights' bias."""
    model = random_model(small_config(), seed=0).remove_weight_norm()
    other = random_model(small_config(), seed=1).remove_weight_norm()
    denoiser = Denoiser(model)
    first = denoiser.bias().clone()
    model.load_state_dict(other.state_dict())
    assert torch.equal(denoiser.bias(), Denoiser(other).bias())
    assert not torch.allclose(denoiser.bias(), first)


def test_a_section_built_directly_reads_the_original_string_booleans_as_parsing_does():
    """`WaveFlowConfig(**section)` kept the original's "False" as a string, which is true: the model it built
    bipartized its flows, another permutation than the checkpoint's model."""
    section = small_config(n_flow=4, bipartize="False", use_weightnorm_embed="True", upsample_factors=[16, 16])
    direct = WaveFlowConfig(**section)
    assert direct == parse_section(WaveFlowConfig, section, "waveflow_config")
    assert direct.bipartize is False and direct.use_weightnorm_embed is True and direct.upsample_factors == (16, 16)
    assert build_model(direct).row_orders == build_model(section).row_orders
    with pytest.raises(ValueError, match=r"waveflow_config\.bipartize must be a boolean"):
        WaveFlowConfig(**small_config(bipartize="no"))
    with pytest.raises(ValueError, match=r"train_config\.with_tensorboard must be a boolean"):
        TrainConfig(**{**json.load(open(f"{ROOT}/configs/demo.json"))["train_config"], "with_tensorboard": "yes"})


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda model: torch.compile(model), id="compile"),
        pytest.param(
            lambda model: torch.nn.DataParallel(cast(torch.nn.Module, torch.compile(model))), id="dataparallel-compile"
        ),
        pytest.param(lambda model: torch.compile(torch.nn.DataParallel(model)), id="compile-dataparallel"),
    ],
)
def test_weights_saved_from_a_compiled_model_load(tmp_path, wrap):
    """`torch.save(torch.compile(model).state_dict(), path)`, as a fine-tuning loop saves the module it trains:
    every name began with torch.compile's `_orig_mod.` and no model took them."""
    model = random_model(small_config())
    path = str(tmp_path / "weights.pt")
    torch.save(wrap(model).state_dict(), path)
    fresh = build_model(small_config())
    fresh.load_state_dict(read_checkpoint(path)["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def held_by(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
    """Whether the optimizer holds every parameter of the model (and so trains all of it)."""
    held = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    return all(id(parameter) in held for parameter in model.parameters())


def test_listening_during_training_as_the_readme_says_leaves_every_weight_trained():
    """README: folding weight norm replaces the weight-normed parameters, so an optimizer made before trains
    only the others; synthesizing with the model as it is, or with a folded copy, leaves it all trained."""
    model = random_model(small_config()).train()
    optimizer = torch.optim.Adam(model.parameters())
    copy.deepcopy(model).remove_weight_norm().infer(torch.randn(1, 80, 5))
    model.infer(torch.randn(1, 80, 5))
    assert held_by(optimizer, model)
    model.remove_weight_norm()
    assert not held_by(optimizer, model)


# ----------------------------------------------------------------------------- a mel that would make NaN audio


@pytest.mark.parametrize("value", [float("-inf"), float("nan")])
def test_a_mel_holding_nan_or_an_infinity_is_refused_rather_than_made_into_nan_audio(value):
    """The log of a zero magnitude, unfloored, is -inf: one such bin made most of the clip NaN."""
    model = random_model(small_config()).remove_weight_norm()
    mel = torch.randn(1, 80, 10)
    mel[0, 5, 3] = value
    message = r"the mel holds 1 NaN or infinite value, which would make NaN audio"
    with pytest.raises(ValueError, match=message):
        model.infer(mel, sigma=0.8)
    synthesis = StreamingSynthesis(model, chunk_frames=4)
    with pytest.raises(ValueError, match=message):
        synthesis.push(mel)


# ----------------------------------------------------------------------------- inputs of other types


def test_a_mel_that_is_no_floating_point_tensor_or_beyond_the_models_range_is_refused_in_one_line():
    """A numpy array gave an AttributeError naming no mel; bool, int and complex mels were synthesized (a mask as
    0/1, a complex one's imaginary part dropped); a float64 mel of 1e300 became inf in the fp32 model, then NaN
    audio; an integer z was rounded noise."""
    model = random_model(small_config()).remove_weight_norm()
    mel = torch.randn(1, 80, 6)
    stream = StreamingSynthesis(model, chunk_frames=4)
    with pytest.raises(TypeError, match=r"the mel must be a torch.Tensor, got ndarray \(torch.from_numpy"):
        model.infer(cast(torch.Tensor, mel.numpy()))
    with pytest.raises(TypeError, match="the mel must be a torch.Tensor, got list"):
        stream.push(cast(torch.Tensor, mel.tolist()))
    for other in (mel > 0, mel.long(), mel.to(torch.complex64)):
        for synthesize in (model.infer, stream.push):
            with pytest.raises(ValueError, match=f"the mel has dtype {other.dtype}, expected a floating-point log-mel"):
                synthesize(other)
    huge = mel.double()
    huge[0, 3, 2] = -1e300
    for synthesize in (model.infer, stream.push):
        with pytest.raises(ValueError, match=r"the mel holds values up to 1e\+300, beyond the range of the model's "):
            synthesize(huge)
    assert torch.isfinite(model.infer(mel.double() * 1e3)).all()  # large, but within fp32: synthesized
    with pytest.raises(ValueError, match="z must be a floating-point tensor .* got torch.int64"):
        model.infer(mel, z=torch.ones(1, 1, 8, 48, dtype=torch.long))


def test_synthesis_options_of_other_types_are_refused_naming_them():
    """`condition_cache_bytes=None` failed deep in synthesis comparing an int with None, and a fractional
    `chunk_frames` in slicing; a `max_cpu_columns` of 0 passed."""
    model = random_model(small_config()).remove_weight_norm()
    mel = torch.randn(1, 80, 6)
    for option, value in (("condition_cache_bytes", None), ("condition_cache_bytes", -1), ("max_cpu_columns", 0)):
        with pytest.raises(ValueError, match=f"{option} must be a whole number >= [01], got {value}"):
            model.infer(mel, **cast(Any, {option: value}))  # what a caller's typo passes
    for option in ("chunk_frames", "lookahead_frames", "context_frames"):
        with pytest.raises(ValueError, match=f"{option} must be a whole number of frames, got 8.5"):
            StreamingSynthesis(model, **cast(Any, {option: 8.5}))


def test_the_denoiser_gives_an_empty_batch_back_empty():
    """The STFT refused a batch of none with an MKL error."""
    denoiser = Denoiser(random_model(small_config()).remove_weight_norm())
    assert denoiser(torch.zeros(0, 1000), 1.0).shape == (0, 1000)
