"""Any sample rate and hop: waveflow_config.upsample_factors, and the configs of other rates trained and
synthesized end to end at their own rate."""

import glob
import json
import math
import os
import warnings

import numpy as np
import pytest
import scipy.signal
import soundfile
import torch

import metrics
from checkpoint import CheckpointError, load_weights
from conftest import ROOT
from test_model import random_model
from test_train import run_here

TINY = dict(res_channels=8, n_layer=2, n_flow=2, n_layer_per_cycle=1, coupling_type="nanoflow", size_flow_embed=4)


def tiny(factors, n_height):
    return random_model(dict(TINY, model_name="tiny", cin_channels=80, n_height=n_height, upsample_factors=factors))


@pytest.mark.parametrize("factors", [[16, 16], [15, 20], [16, 32], [5, 6, 10], [3], [7, 8]])
def test_the_upsampler_turns_each_frame_into_hop_samples(factors):
    model = tiny(factors, n_height=math.prod(factors) if math.prod(factors) < 40 else 4)
    assert len(model.upsample_conv) == 2 * len(factors)  # a transposed conv and a leaky ReLU per factor
    for frames in (1, 2, 7):
        assert model.upsample(torch.randn(2, 80, frames)).shape == (2, 80, math.prod(factors) * frames)


def test_the_default_upsampler_is_the_originals():
    """The original's keys and shapes (two convs, kernel (3, 32), stride 16, padding 8), and the same numbers
    as a plain ConvTranspose2d with the original's settings."""
    model = tiny([16, 16], n_height=8)
    shapes = {name: list(value.shape) for name, value in model.state_dict().items() if "upsample" in name}
    assert shapes == {
        "upsample_conv.0.bias": [1],
        "upsample_conv.0.weight_g": [1, 1, 1, 1],
        "upsample_conv.0.weight_v": [1, 1, 3, 32],
        "upsample_conv.2.bias": [1],
        "upsample_conv.2.weight_g": [1, 1, 1, 1],
        "upsample_conv.2.weight_v": [1, 1, 3, 32],
    }
    state = model.state_dict()
    mel = torch.randn(1, 80, 5)
    x = mel.unsqueeze(1)
    for index in (0, 2):
        g, v, bias = (state[f"upsample_conv.{index}.{name}"] for name in ("weight_g", "weight_v", "bias"))
        x = torch.nn.functional.leaky_relu(
            torch.nn.functional.conv_transpose2d(x, g * v / v.norm(), bias, stride=(1, 16), padding=(1, 8)), 0.4
        )
    assert torch.allclose(model.upsample(mel), x.squeeze(1), atol=1e-6)


@pytest.mark.parametrize("factors,n_height", [([15, 20], 20), ([15, 20], 12), ([16, 32], 16), ([5, 6, 10], 15)])
def test_synthesis_at_another_hop_is_the_exact_inverse(factors, n_height):
    hop = math.prod(factors)
    model = tiny(factors, n_height).remove_weight_norm()
    mel = torch.randn(1, 80, 6)
    z = torch.randn(1, 1, n_height, hop * 3 // n_height, generator=torch.Generator().manual_seed(1)) * 0.5
    audio = model.infer(mel, z=z)
    assert audio.shape == (1, hop * (6 - 3))  # the last 3 frames' samples dropped, as the original does
    back, _ = model(audio, mel)
    assert torch.allclose(back, z, atol=1e-4)


def test_weights_of_another_hop_are_refused_naming_both_hops():
    model = tiny([16, 16], n_height=8)
    other = tiny([15, 20], n_height=10).state_dict()
    with pytest.raises(CheckpointError, match=r"hop 300\).*hop 256\).*upsample_conv\.0\.weight"):
        load_weights(model, other, "other.pt")


# --- the configs of other rates, end to end ------------------------------------------------------------

RATE_CONFIGS = ("nanoflow-16k", "nanoflow-24k-hop300", "nanoflow-44k-hop512")
ITERATIONS = 200


def speech_corpus(folder, rate):
    """Five clips of the demo corpus's speech (espeak-ng), 0.6 s each, resampled to `rate` with a polyphase
    filter: 4 to train on, 1 to test."""
    paths = []
    for index, source in enumerate(sorted(glob.glob(os.path.join(ROOT, "data", "demo", "wavs", "*.wav")))[:5]):
        audio, source_rate = soundfile.read(source, dtype="float32")
        audio = audio[int(0.3 * source_rate) : int(0.9 * source_rate)]
        divisor = math.gcd(rate, source_rate)
        audio = scipy.signal.resample_poly(audio, rate // divisor, source_rate // divisor)
        paths.append(os.path.join(folder, f"clip{index}.wav"))
        soundfile.write(paths[-1], np.clip(audio, -1, 1), rate, subtype="PCM_16")
    for name, chosen in (("train.txt", paths[:4]), ("test.txt", paths[4:])):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(chosen) + "\n")
    return paths


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", RATE_CONFIGS)
def test_a_config_of_another_rate_trains_and_synthesizes_at_its_rate(name, tmp_path, capsys):
    """The config's rate, hop, mel settings and upsampler as shipped; a tiny network, short crops and
    200 iterations, so that the three configs take seconds."""
    with open(os.path.join(ROOT, "configs", f"{name}.json")) as f:
        config = json.load(f)
    data, model = config["data_config"], config["waveflow_config"]
    rate, hop = data["sampling_rate"], data["hop_length"]
    assert math.prod(model["upsample_factors"]) == hop
    paths = speech_corpus(str(tmp_path), rate)
    config["train_config"].update(
        output_directory=str(tmp_path / "exp"),
        iters_per_checkpoint=ITERATIONS,
        max_iterations=ITERATIONS,
        batch_size=1,
        with_tensorboard=False,
    )
    data.update(
        training_files=str(tmp_path / "train.txt"),
        test_files=str(tmp_path / "test.txt"),
        segment_length=4 * hop,  # four frames: more than the reflect padding of a 2048-point STFT
        num_workers=0,
    )
    model.update(TINY)
    config_path = str(tmp_path / "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)

    status, out, err = run_here(capsys, "-c", config_path)
    assert status == 0, err
    run_dir = tmp_path / "exp" / model["model_name"]
    assert os.path.isfile(run_dir / f"waveflow_{ITERATIONS}")
    assert f"iteration {ITERATIONS}: test loss" in out
    assert "1 test clips at temperature" in out  # the speech measures ran at this rate and hop

    checkpoint = str(run_dir / f"waveflow_{ITERATIONS}")
    status, out, err = run_here(capsys, "-s", "-c", config_path, "--checkpoint_path", checkpoint)
    assert status == 0, err
    synthesized, written_rate = soundfile.read(
        tmp_path / "exp" / "samples" / model["model_name"] / "clip4_synthesis.wav"
    )
    recording = soundfile.read(paths[4])[0]
    frames = 1 + recording.shape[0] // hop  # the mel's frames
    assert written_rate == rate
    assert synthesized.shape == (hop * (frames - 3),)
    assert np.isfinite(synthesized).all() and synthesized.std() > 0


def test_the_pitch_measures_follow_the_rate_and_hop():
    """At 44.1 kHz with hop 512: one pitch frame per mel frame, and frames that hold two periods of the lowest
    pitch (50 Hz: 882 samples; the 1024 samples of a 22,050 Hz frame do not, and librosa warns)."""
    rate, hop = 44100, 512
    t = np.arange(rate) / rate
    harmonics = np.arange(1, 8)[:, None]
    voice = (0.3 / harmonics * np.sin(2 * np.pi * 70 * harmonics * t)).sum(axis=0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f0, voiced, _ = metrics.pitch(voice, rate, hop)
    assert f0.shape == (1 + rate // hop,)
    assert voiced.mean() > 0.8 and np.nanmedian(f0) == pytest.approx(70, rel=0.01)
