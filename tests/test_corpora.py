"""Audio at another rate or with several channels (data_config.resample, downmix), lossy formats, test clips
too short for -v and -s, and what a user looks at (the picture's title, the TensorBoard mel figure, the first
skipped step)."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import soundfile
import soxr
import torch

import mel2samp
import synthesis
import train
from conftest import ROOT
from data import DataError, MelSpectrogram, audio_length, load_audio
from mel2samp import Mel2Samp
from metrics import measure
from model import build_model
from test_scripts import script
from test_train import make_corpus, one_step_setup, write_config

RATE = 22050
DEMO_WAVS = os.path.join(ROOT, "data", "demo", "wavs")


def demo_clip(index=1, seconds=None):
    audio, rate = soundfile.read(os.path.join(DEMO_WAVS, f"demo_{index:03d}.wav"), dtype="float32")
    assert rate == RATE
    return audio if seconds is None else audio[: int(seconds * RATE)]


def write_at(path, audio, rate, subtype="PCM_16"):
    """`audio` at 22,050 Hz written at `rate` (resampled with soxr) as `subtype`."""
    soundfile.write(str(path), soxr.resample(audio, RATE, rate, quality="VHQ"), rate, subtype=subtype)
    return str(path)


def reference(path):
    """What a 16-bit file at another rate should read as: its samples / 32768, resampled by soxr at very high
    quality to 22,050 Hz, independently of data.py."""
    samples, rate = soundfile.read(path, dtype="int16")
    return soxr.resample(samples.astype(np.float64) / 32768.0, rate, RATE, quality="VHQ")


# ----------------------------------------------------------------------------- another rate, several channels


def test_a_clip_at_48_khz_is_refused_by_default_and_resampled_exactly_on_request(tmp_path):
    path = write_at(tmp_path / "a.wav", demo_clip(1), 48000)
    with pytest.raises(DataError) as refused:
        audio_length(path, RATE)
    message = str(refused.value)
    assert message.startswith(f"{path}: sampling rate is 48000 Hz, expected 22050 Hz") and "\n" not in message
    assert "data_config.resample" in message
    expected = reference(path)
    whole = load_audio(path, RATE, resample=True).numpy()
    assert audio_length(path, RATE, resample=True) == whole.shape[0]
    assert abs(whole.shape[0] - expected.shape[0]) <= 1
    length = min(whole.shape[0], expected.shape[0])
    np.testing.assert_allclose(whole[:length], expected[:length], atol=2e-6)
    crop = load_audio(path, RATE, start=5000, length=4096, resample=True).numpy()
    np.testing.assert_array_equal(crop, whole[5000:9096])  # a crop is that part of the resampled clip
    # A training item is a crop of the resampled clip with its mel, whatever the source rate.
    dataset = Mel2Samp(
        file_list=[path],
        mode="train",
        segment_length=4096,
        sampling_rate=RATE,
        filter_length=1024,
        hop_length=256,
        win_length=1024,
        mel_fmin=0.0,
        mel_fmax=8000.0,
        resample=True,
    )
    mel, audio = dataset[0]
    start = dataset.crop_start(0)
    assert start > 0 and torch.equal(audio, torch.from_numpy(whole[start : start + 4096]))
    assert torch.allclose(mel, dataset.mel(audio))


def test_mel2samp_writes_the_mel_of_the_resampled_clip(tmp_path, capsys):
    path = write_at(tmp_path / "a.flac", demo_clip(1, 0.5), 48000)
    short = write_at(tmp_path / "short.flac", demo_clip(1, 0.02), 48000)
    (tmp_path / "list.txt").write_text(path + "\n")
    config = write_config(str(tmp_path), data_config__resample=True)
    assert mel2samp.main(["-f", str(tmp_path / "list.txt"), "-c", config, "-o", str(tmp_path / "mels")]) == 0
    expected = MelSpectrogram()(torch.from_numpy(load_audio(path, RATE, resample=True).numpy()))
    assert torch.equal(torch.load(tmp_path / "mels" / "a.flac.pt"), expected)
    (tmp_path / "list.txt").write_text(short + "\n")
    assert mel2samp.main(["-f", str(tmp_path / "list.txt"), "-c", config, "-o", str(tmp_path / "mels")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {short}: clip of 441 samples is too short for a mel spectrogram (need more than 512)"
    )


def test_a_stereo_clip_at_another_rate_is_refused_naming_both_settings_at_once(tmp_path):
    """A stereo 44.1 kHz file got the rate's error, then, with resample on, the channels' one: two tries."""
    path = str(tmp_path / "stereo44.wav")
    soundfile.write(path, np.zeros((4410, 2), dtype=np.int16), 44100, subtype="PCM_16")
    with pytest.raises(DataError) as refused:
        load_audio(path, RATE)
    message = str(refused.value)
    assert message.startswith(f"{path}: sampling rate is 44100 Hz, expected 22050 Hz") and "\n" not in message
    assert "data_config.resample" in message and "has 2 channels, expected mono" in message
    assert "data_config.downmix" in message
    with pytest.raises(DataError, match=r"stereo44.wav: has 2 channels, expected mono"):
        load_audio(path, RATE, resample=True)


def test_a_stereo_clip_is_refused_by_default_and_downmixed_on_request(tmp_path):
    left, right = demo_clip(1, 0.5), demo_clip(2, 0.5)
    path = str(tmp_path / "stereo.flac")
    soundfile.write(path, np.stack([left, right], axis=1), RATE, subtype="PCM_16")
    with pytest.raises(DataError, match=r"stereo.flac: has 2 channels, expected mono"):
        load_audio(path, RATE)
    pcm, _ = soundfile.read(path, dtype="int16")
    expected = (pcm.astype(np.float32) / 32768).mean(axis=1)
    np.testing.assert_allclose(load_audio(path, RATE, downmix=True).numpy(), expected, atol=1e-7)
    assert audio_length(path, RATE, downmix=True) == left.shape[0]


@pytest.mark.parametrize(
    ("extension", "format_name", "subtype"), [("mp3", "MP3", "MPEG_LAYER_III"), ("ogg", "OGG", "VORBIS")]
)
def test_lossy_formats_are_refused_in_one_line(tmp_path, extension, format_name, subtype):
    path = str(tmp_path / f"clip.{extension}")
    soundfile.write(path, demo_clip(1, 0.5), RATE, format=format_name, subtype=subtype)
    for read in (lambda: audio_length(path, RATE), lambda: load_audio(path, RATE, start=1000, length=2048)):
        with pytest.raises(DataError) as refused:
            read()
        message = str(refused.value)
        assert message.startswith(f"{path}: ") and "lossy" in message and "wav or flac" in message
        assert "\n" not in message


@pytest.mark.slow
def test_a_corpus_at_48_khz_trains_the_demo_config_with_resample(tmp_path, capsys, one_thread):
    """A few iterations of configs/demo.json on 48 kHz flac clips: refused in one line, trained with resample."""
    folder = tmp_path / "corpus48"
    folder.mkdir()
    clips = [write_at(folder / f"clip{index}.flac", demo_clip(index, 0.8), 48000) for index in range(1, 6)]
    (folder / "train.txt").write_text("\n".join(clips[:4]) + "\n")
    (folder / "test.txt").write_text(clips[4] + "\n")
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        config = json.load(f)
    config["train_config"].update(
        output_directory=str(tmp_path / "exp"), max_iterations=2, iters_per_checkpoint=2, with_tensorboard=False
    )
    config["train_config"].update(batch_size=2, bf16_run=False)  # bf16 is emulated, and slow, on most CPUs
    config["data_config"].update(
        training_files=str(folder / "train.txt"), test_files=str(folder / "test.txt"), num_workers=0
    )
    path = tmp_path / "demo48.json"
    path.write_text(json.dumps(config))
    status = train.main(["-c", str(path)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.strip() == f"error: {clips[0]}: sampling rate is 48000 Hz, expected 22050 Hz " + (
        "(set data_config.resample to true, or resample the corpus first, e.g. with sox)"
    )
    config["data_config"]["resample"] = True
    path.write_text(json.dumps(config))
    status = train.main(["-c", str(path)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "iteration 2: test loss" in out and "training finished at iteration 2" in out
    sample = tmp_path / "exp" / "samples" / "nanoflow-demo" / "clip5_iter2.wav"
    info = soundfile.info(str(sample))
    assert info.samplerate == RATE
    assert abs(info.frames - audio_length(clips[4], RATE, resample=True)) <= 3 * 256  # synthesis trims 3 frames
    assert (
        train.main(["-s", "-c", str(path), "--checkpoint_path", str(tmp_path / "exp" / "nanoflow-demo" / "waveflow_2")])
        == 0
    )
    assert (
        soundfile.info(str(tmp_path / "exp" / "samples" / "nanoflow-demo" / "clip5_synthesis.wav")).frames
        == info.frames
    )


# ----------------------------------------------------------------------------- clips too short for -v and -s


def untrained_checkpoint(folder):
    """The tiny config's model, freshly initialised, as a weights-only checkpoint."""
    config = write_config(str(folder))
    torch.manual_seed(0)
    model = build_model(train.load_config(config).waveflow)
    path = os.path.join(str(folder), "weights.pt")
    torch.save({"model": model.state_dict()}, path)
    return config, path


def test_every_clip_too_short_is_left_out_of_v_and_s_with_a_warning(tmp_path, capsys, one_thread):
    make_corpus(str(tmp_path), n_train=1, n_test=1)
    shorts = []
    for length in (300, 512, 600):
        path = str(tmp_path / f"short{length}.wav")
        soundfile.write(path, (0.3 * np.sin(np.arange(length) / 5) * 32767).astype(np.int16), RATE, subtype="PCM_16")
        shorts.append(path)
    long_clip = str(tmp_path / "clip01.wav")
    (tmp_path / "test.txt").write_text("\n".join([shorts[0], long_clip, shorts[1], shorts[2]]) + "\n")
    config, checkpoint = untrained_checkpoint(tmp_path)
    status = train.main(["-v", "-c", config, "--checkpoint_path", checkpoint, "--json", str(tmp_path / "v.json")])
    out, err = capsys.readouterr()
    assert status == 0, err
    for path, frames in zip(shorts, (2, 3, 3), strict=True):
        assert (
            f"warning: {path}: a mel of {frames} frames is too short to synthesize (need at least 4): "
            f"left out of the measures"
        ) in err
    assert "1 clips synthesized at temperature 0.8" in out and "(3 too short, left out)" in out
    assert "2 test clips" in out  # the log-likelihood of the clips that have a mel (600 samples and clip01)
    document = json.load(open(tmp_path / "v.json"))
    assert [clip["file"] for clip in document["left_out"]] == shorts
    assert [clip["name"] for clip in document["clips"]] == ["clip01"]
    # -s synthesizes the others and leaves each too-short clip out the same way, wherever it stands.
    status = train.main(["-s", "-c", config, "--checkpoint_path", checkpoint])
    out, err = capsys.readouterr()
    assert status == 0, err
    for path, frames in zip(shorts, (2, 3, 3), strict=True):
        assert (
            f"warning: {path}: a mel of {frames} frames is too short to synthesize (need at least 4): "
            f"left out of the synthesis"
        ) in err
    assert os.listdir(tmp_path / "exp" / "samples" / "tiny") == ["clip01_synthesis.wav"]
    # Nothing left to synthesize is an error naming the first clip.
    (tmp_path / "test.txt").write_text("\n".join(shorts) + "\n")
    status = train.main(["-s", "-c", config, "--checkpoint_path", checkpoint])
    assert status == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {shorts[0]}: a mel of 2 frames is too short to synthesize (need at least 4) (as are the 2 others)"
    )


# ----------------------------------------------------------------------------- what a user looks at


def test_the_pictures_title_says_when_no_frame_was_voiced():
    plot_synthesis = script("plot_synthesis")
    noise = 0.1 * np.random.default_rng(0).standard_normal(RATE // 2).astype(np.float32)
    result = measure(noise, noise[::-1].copy(), RATE, 256)
    assert math.isnan(result["f0_rmse_cents"])
    title = plot_synthesis.describe_measures(result)
    assert "no frame voiced in both" in title and "nan" not in title
    voiced = plot_synthesis.describe_measures(dict(result, f0_rmse_cents=12.4, vuv_f1=0.5))
    assert "F0 error 12 cents" in voiced and "V/UV F1 0.50" in voiced


def test_the_tensorboard_mel_figure_has_one_colour_scale_and_labelled_axes():
    quiet = torch.full((80, 40), -11.0)
    loud = torch.linspace(-11.5, 3.0, 80)[:, None].expand(80, 40).clone()
    figure = synthesis.mel_figure(quiet, loud, 256)
    images = [axis.images[0] for axis in figure.axes if axis.images]
    assert len(images) == 2
    assert images[0].get_clim() == images[1].get_clim() == (math.log(1e-5), 3.0)
    axes = [axis for axis in figure.axes if axis.images]
    assert all(axis.get_ylabel() == "mel band" for axis in axes)
    assert axes[1].get_xlabel() == "frame (256 samples)"


def test_a_first_step_skipped_for_a_non_finite_loss_moves_the_schedule_without_pytorchs_warning(tmp_path, one_thread):
    model, optimizer, scheduler, scaler, runtime, config, batch = one_step_setup(tmp_path)
    mel, audio = batch
    audio = audio.clone()
    audio[0, 5] = float("nan")
    stepped = torch.optim.lr_scheduler.StepLR(
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), step_size=3, gamma=0.5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # across the schedule's first decay, at iteration 3
            metrics = train.train_step(model, (mel, audio), optimizer, scheduler, scaler, runtime, config)
            assert metrics["skipped"] == "non-finite loss"
    assert not [warning for warning in caught if "lr_scheduler.step()" in str(warning.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference: StepLR stepped as before, with its warning
        for _ in range(4):
            stepped.step()
    assert scheduler.state_dict()["last_epoch"] == 4
    assert scheduler.state_dict() == stepped.state_dict()
    assert optimizer.param_groups[0]["lr"] == stepped.optimizer.param_groups[0]["lr"] == 5e-4
