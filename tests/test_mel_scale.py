"""Mels from other models: log10, decibel and normalised mels recognised, converted back, and warned about."""

import argparse
import json
import math
import os
import shutil

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile
import torch

import mel_scale
import synthesis
from config import load_config
from conftest import ROOT
from data import DataError, MelSpectrogram, load_audio, read_file_list
from mel_scale import MelConversion, corpus_features, looks_like, read_mel_stats
from test_model import random_model
from test_train import run_here

RATE = 22050
DEMO = os.path.join(ROOT, "data", "demo")


def demo_mels(list_name: str) -> list[np.ndarray]:
    mel = MelSpectrogram()
    with torch.no_grad():
        return [mel(load_audio(path, RATE)).numpy() for path in read_file_list(os.path.join(DEMO, list_name))]


@pytest.fixture(scope="module")
def heldout():
    """ln mels of real speech the detector was not built from: the demo's held-out sentences."""
    return demo_mels(os.path.join("heldout", "test_files.txt"))


def test_the_detector_is_built_from_the_demo_corpus():
    """The centres in mel_scale.py are what the demo corpus's ln mels give."""
    centres = corpus_features(demo_mels("train_files.txt") + demo_mels("test_files.txt"))
    assert centres["ln"] == pytest.approx(mel_scale.LN_FEATURES, abs=1e-3)
    assert centres["normalised"] == pytest.approx(mel_scale.NORMALISED_FEATURES, abs=1e-3)


def test_real_ln_mels_do_not_warn(heldout, capsys):
    convert = MelConversion()
    for index, mel in enumerate(heldout):
        for gain in (0.1, 1.0, 3.0):  # the recording 20 dB quieter or 10 dB louder: its mel moves by ln(gain)
            assert looks_like(np.maximum(mel + math.log(gain), mel_scale.LN_FLOOR)) == "ln", (index, gain)
        assert torch.equal(convert(torch.from_numpy(mel), f"clip{index}"), torch.from_numpy(mel))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["nanoflow-16k", "nanoflow-24k-hop300", "nanoflow-44k-hop512"])
def test_ln_mels_of_the_other_configs_are_recognised_as_ln(name):
    data = load_config(os.path.join(ROOT, "configs", f"{name}.json")).data
    rate, mel = data.sampling_rate, MelSpectrogram.from_config(data)
    for path in read_file_list(os.path.join(DEMO, "heldout", "test_files.txt"))[:4]:
        audio = scipy.signal.resample_poly(load_audio(path, RATE).numpy(), rate // 50, RATE // 50)
        with torch.no_grad():
            ln = mel(torch.from_numpy(audio.astype(np.float32)))
        assert looks_like(ln) == "ln"
        assert looks_like(ln / math.log(10)) == "log10"
        assert looks_like(ln * 20 / math.log(10)) == "db"


def test_log10_and_decibel_mels_are_recognised_and_converted_back(heldout, capsys):
    for index, ln in enumerate(heldout):
        magnitudes = np.exp(ln)  # the mel of magnitudes, floored at 1e-5
        as_written = {
            "log10": np.log10(np.maximum(magnitudes, 1e-10)),  # ParallelWaveGAN's and ESPnet's log10
            "db": librosa.amplitude_to_db(magnitudes, ref=1.0, top_db=None),  # 20 log10
        }
        as_written["db power"] = librosa.power_to_db(magnitudes**2, ref=1.0, top_db=None)  # 10 log10 of power
        for name, mel in as_written.items():
            scale = name.split()[0]
            assert looks_like(mel) == scale, (index, name)
            back = MelConversion(scale)(torch.from_numpy(mel), f"clip{index}")
            assert torch.allclose(back, torch.from_numpy(ln), atol=1e-4), (index, name)
            capsys.readouterr()
            MelConversion()(torch.from_numpy(mel), f"clip{index}.npy")  # taken as it is: a warning says why
            err = capsys.readouterr().err
            assert err.startswith(f"warning: clip{index}.npy: looks like ") and err.count("\n") == 1
            assert f"--mel_scale {scale} converts it" in err
    # A dB mel relative to its loudest value (librosa's ref=np.max, top_db 80) is still a dB mel.
    assert looks_like(librosa.amplitude_to_db(np.exp(heldout[0]), ref=np.max)) == "db"


def write_stats(folder, kind, frames, mean, std):
    """Statistics files as ESPnet and ParallelWaveGAN write them (see mel_scale.read_mel_stats)."""
    if kind == "parallelwavegan.npy":
        path = os.path.join(folder, "stats.npy")
        np.save(path, np.stack([mean, std]).astype(np.float32))
    elif kind == "kaldi.npy":
        path = os.path.join(folder, "cmvn.npy")
        count = frames.shape[1]
        np.save(path, np.stack([np.append(frames.sum(axis=1), count), np.append((frames**2).sum(axis=1), 0)]))
    elif kind == "espnet2.npz":
        path = os.path.join(folder, "feats_stats.npz")
        np.savez(path, count=frames.shape[1], sum=frames.sum(axis=1), sum_square=(frames**2).sum(axis=1))
    else:
        h5py = pytest.importorskip("h5py")
        path = os.path.join(folder, "stats.h5")
        with h5py.File(path, "w") as f:
            f["mean"], f["scale"] = mean.astype(np.float32), std.astype(np.float32)
    return path


@pytest.mark.parametrize("kind", ["parallelwavegan.npy", "kaldi.npy", "espnet2.npz", "parallelwavegan.h5"])
@pytest.mark.parametrize("scale", ["ln", "log10"])
def test_normalised_mels_are_recognised_and_converted_back(kind, scale, heldout, tmp_path, capsys):
    factor = mel_scale.MEL_SCALES[scale]
    frames = np.concatenate([mel * factor for mel in heldout], axis=1).astype(np.float64)
    mean, std = frames.mean(axis=1), frames.std(axis=1)  # per band, as ESPnet and ParallelWaveGAN compute them
    path = write_stats(str(tmp_path), kind, frames, mean, std)
    read_mean, read_std = read_mel_stats(path, 80)
    assert np.allclose(read_mean.numpy(), mean, atol=1e-4) and np.allclose(read_std.numpy(), std, atol=1e-4)
    convert = MelConversion(scale, path)
    for index, ln in enumerate(heldout):
        normalised = (ln * factor - mean[:, None]) / std[:, None]
        assert looks_like(normalised) == "normalised", index
        back = convert(torch.from_numpy(normalised.astype(np.float32)), f"clip{index}")
        assert torch.allclose(back, torch.from_numpy(ln), atol=1e-3), index
    assert capsys.readouterr().err == ""
    MelConversion()(torch.from_numpy(((heldout[0] * factor - mean[:, None]) / std[:, None]).astype(np.float32)), "n")
    assert "--mel_stats FILE" in capsys.readouterr().err


def test_a_constant_mel_says_nothing_of_its_units(capsys):
    for value in (math.log(1e-5), 0.0, -3.0):  # a float32 std of these is not 0, a float64 one is
        mel = np.full((80, 87), value, np.float32)
        assert looks_like(mel) is None
        assert torch.equal(MelConversion()(torch.from_numpy(mel), "silence.npy"), torch.from_numpy(mel))
    assert capsys.readouterr().err == ""


def test_every_window_of_the_demo_corpus_long_enough_to_judge_is_taken_as_ln():
    """Below MIN_FRAMES frames the units are not judged: shorter windows of quiet frames look like log10."""
    mel = MelSpectrogram()
    with torch.no_grad():
        mels = [mel(load_audio(os.path.join(DEMO, "wavs", name), RATE)).numpy() for name in os.listdir(DEMO + "/wavs")]
    for frames in (4, 8, 16, mel_scale.MIN_FRAMES - 1, mel_scale.MIN_FRAMES):
        kinds = {looks_like(ln[:, start : start + frames]) for ln in mels for start in range(ln.shape[1] - frames)}
        assert kinds == ({"ln"} if frames == mel_scale.MIN_FRAMES else {None}), frames


def test_a_conversion_that_leaves_much_below_the_floor_is_warned_about(heldout, tmp_path, capsys):
    ln = torch.from_numpy(heldout[0])
    MelConversion("log10")(ln, "ln.npy")  # an ln mel taken for a log10 one: 2.3 times too low
    err = capsys.readouterr().err
    assert err.startswith("warning: ln.npy: after --mel_scale log10 it still looks like no natural-log mel: ")
    assert err.endswith("as read it looks like the natural-log mel already: leave out --mel_scale log10\n")
    frames = np.concatenate(heldout, axis=1)
    path = write_stats(str(tmp_path), "parallelwavegan.npy", frames, frames.mean(axis=1), frames.std(axis=1))
    MelConversion("ln", path)(ln, "ln.npy")  # never normalised
    assert f"after --mel_stats {path} it still looks like no natural-log mel" in capsys.readouterr().err
    MelConversion("log10", path)(ln / math.log(10), "log10.npy")  # a log10 mel never normalised
    assert "as read it looks like a log10 mel (" in capsys.readouterr().err
    # A log10 mel floored at 1e-10 (ParallelWaveGAN's) of speech 30 dB quieter passes the floor, rightly converted.
    with torch.no_grad():
        audio = load_audio(read_file_list(os.path.join(DEMO, "heldout", "test_files.txt"))[0], RATE)
        quiet = MelSpectrogram(log_floor=1e-10)(0.03 * audio)
    MelConversion("log10")(quiet / math.log(10), "quiet.npy")
    assert capsys.readouterr().err == ""


def test_the_advice_fits_the_mel_and_the_options_given(heldout, tmp_path, capsys):
    minmax = (heldout[0] - heldout[0].min()) / (heldout[0].max() - heldout[0].min())  # scaled into [0, 1]
    MelConversion()(torch.from_numpy(minmax), "minmax.npy")
    err = capsys.readouterr().err
    assert "scaled into [0, 1]" in err and "take its natural log first" not in err
    path = str(tmp_path / "identity.npy")  # statistics that undo nothing
    np.save(path, np.stack([np.zeros(80), np.ones(80)]))
    normalised = (heldout[0] - heldout[0].mean(axis=1, keepdims=True)) / heldout[0].std(axis=1, keepdims=True)
    MelConversion("ln", path)(torch.from_numpy(normalised), "n.npy")
    err = capsys.readouterr().err
    assert "still looks like a mean-variance normalised mel" in err and "--mel_stats FILE" not in err
    assert f"are the statistics in {path} the ones its model was trained with?" in err


def test_a_mel_still_wrong_after_conversion_is_named(heldout, capsys):
    log10_and_db = heldout[0] * 20 / math.log(10)
    MelConversion("log10")(torch.from_numpy(log10_and_db), "x.npy")
    err = capsys.readouterr().err
    assert err.startswith("warning: x.npy: after --mel_scale log10 it still looks like a mel in decibels")
    MelConversion()(torch.exp(torch.from_numpy(heldout[0])), "linear.npy")
    assert "a mel with no negative value (magnitudes, not their log" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("stats.npy", np.zeros((3, 80)), r"shape \[3, 80\], expected \[2, 80\] \(ParallelWaveGAN"),
        ("stats.npy", np.ones((2, 40)), r"shape \[2, 40\], expected \[2, 80\]"),
        ("stats.npz", {"mean": np.zeros(80)}, r"holds mean; expected count, sum and sum_square \(ESPnet2\)"),
        ("stats.npz", {"mean": np.zeros(64), "scale": np.ones(64)}, r"statistics of 64 bands, expected 80"),
        ("stats.npy", np.stack([np.zeros(80), np.zeros(80)]), r"non-positive standard deviations"),
        ("stats.txt", None, r"unknown statistics file type '\.txt', expected \.npy, \.npz or \.h5"),
        ("missing.npy", None, r"statistics file not found"),
    ],
)
def test_bad_statistics_files_are_refused_in_one_line(tmp_path, name, content, message):
    path = str(tmp_path / name)
    if isinstance(content, dict):
        np.savez(path, **content)
    elif content is not None:
        np.save(path, content)
    elif name.endswith(".txt"):
        open(path, "w").close()
    with pytest.raises(DataError, match=message) as error:
        read_mel_stats(path, 80)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)


def test_synthesis_of_another_models_mel_through_the_command_line(heldout, tmp_path, capsys):
    """A log10 mel given with --mel_scale log10 synthesizes as its ln mel does; without it, a warning."""
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        config = json.load(f)
    config["train_config"]["output_directory"] = str(tmp_path / "exp")
    config["waveflow_config"].update(res_channels=8, n_height=8, n_layer=2, n_flow=2, size_flow_embed=4)
    config_path = str(tmp_path / "demo.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    checkpoint = str(tmp_path / "model.pt")
    torch.save({"model": random_model(config["waveflow_config"]).state_dict()}, checkpoint)
    ln = heldout[0][:, : mel_scale.MIN_FRAMES]
    (tmp_path / "ln").mkdir()
    (tmp_path / "log10").mkdir()
    np.save(tmp_path / "ln" / "clip.npy", ln)
    np.save(tmp_path / "log10" / "clip.npy", (ln / math.log(10)).astype(np.float32))
    samples = tmp_path / "exp" / "samples" / config["waveflow_config"]["model_name"] / "clip_synthesis.wav"
    written = {}
    for folder, options in (("ln", []), ("log10", ["--mel_scale", "log10"]), ("log10", [])):
        status, _, err = run_here(
            capsys, "-s", "--mels", str(tmp_path / folder), *options, "-c", config_path, "--checkpoint_path", checkpoint
        )
        assert status == 0, err
        written[(folder, bool(options))] = soundfile.read(samples, dtype="int16")[0].astype(int)
        assert ("looks like a log10 mel" in err) == (folder == "log10" and not options)
    assert np.abs(written[("log10", True)] - written[("ln", False)]).max() <= 1  # 16-bit rounding
    assert np.abs(written[("log10", False)] - written[("ln", False)]).max() > 100


def test_mel_options_go_with_mels(capsys):
    with pytest.raises(SystemExit):
        run_here(capsys, "-s", "--mel_scale", "log10", "-c", "x.json")
    assert "--mel_scale and --mel_stats go with --mels" in capsys.readouterr().err


def test_evaluation_converts_the_mels_it_measures(heldout, tmp_path):
    """-v --mels reads each mel through the same conversion as -s, before measuring it against its audio."""
    folder = tmp_path / "mels"
    folder.mkdir()
    np.save(folder / "clip.npy", (heldout[0] / math.log(10)).astype(np.float32))
    shutil.copy(read_file_list(os.path.join(DEMO, "heldout", "test_files.txt"))[0], folder / "clip.wav")
    config = load_config(os.path.join(ROOT, "configs", "demo.json"))
    args = argparse.Namespace(mels=[str(folder)], mel_scale="log10", mel_stats=None)
    [(name, _, too_short, read)] = synthesis.evaluation_inputs(config, args)
    mel, audio = read()
    assert too_short is None and name == "clip" and torch.allclose(mel, torch.from_numpy(heldout[0]), atol=1e-4)
    assert mel.shape[-1] == 1 + audio.shape[0] // 256
