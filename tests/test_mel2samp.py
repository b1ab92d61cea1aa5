"""mel2samp.py: training crops, evaluation and synthesis items, batching, and the precompute command."""

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader

from conftest import ROOT
from data import DataError, MelSpectrogram, load_audio
from mel2samp import Mel2Samp, collate, write_mels

RATE = 22050
SEGMENT = 4000
HOP = 256
MEL_PARAMETERS: dict[str, Any] = dict(
    sampling_rate=RATE, filter_length=1024, hop_length=HOP, win_length=1024, mel_fmin=0.0, mel_fmax=8000.0
)


def write_clip(path, num_samples, rate=RATE, seed=0):
    pcm = (np.random.default_rng(seed).standard_normal(num_samples) * 3000).astype(np.int16)
    soundfile.write(str(path), pcm, rate, subtype="PCM_16")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """Four long clips and one shorter than a segment, in a file list."""
    paths = [write_clip(tmp_path / f"clip{i}.wav", 20000 + 1000 * i, seed=i) for i in range(4)]
    paths.append(write_clip(tmp_path / "short.wav", 1500, seed=9))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path}|text {i}\n" for i, path in enumerate(paths)))
    return str(listing), paths


def dataset(file_list, mode="train", seed=1234):
    return Mel2Samp(file_list=file_list, mode=mode, segment_length=SEGMENT, seed=seed, **MEL_PARAMETERS)


def test_training_crops_are_in_bounds_and_their_mel_is_the_crops(corpus):
    file_list, paths = corpus
    data = dataset(file_list)
    mel_spectrogram = MelSpectrogram(**MEL_PARAMETERS)
    for index in range(4):
        mel, audio = data[index]
        start = data.crop_start(index)
        full = load_audio(paths[index], RATE)
        assert 0 <= start <= full.shape[0] - SEGMENT
        assert torch.equal(audio, full[start : start + SEGMENT])
        assert mel.shape == (80, 1 + SEGMENT // HOP)
        assert torch.allclose(mel, mel_spectrogram(audio), atol=1e-5)


def test_crops_are_reproducible_from_seed_epoch_and_index(corpus):
    file_list, _ = corpus
    first, again, other_seed = dataset(file_list), dataset(file_list), dataset(file_list, seed=99)
    starts = lambda data: [data.crop_start(i) for i in range(4)]  # noqa: E731
    for epoch in (0, 3):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        assert starts(first) == starts(again)
        assert all(torch.equal(first[i][1], again[i][1]) for i in range(4))
    first.set_epoch(0)
    epoch_0 = starts(first)
    first.set_epoch(1)
    assert starts(first) != epoch_0
    assert starts(other_seed) != starts(first)
    assert len(set(epoch_0)) > 1  # indices do not share one crop


def test_crops_do_not_depend_on_the_number_of_workers(corpus):
    file_list, _ = corpus
    data = dataset(file_list)
    data.set_epoch(5)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=2, num_workers=workers, collate_fn=collate)
        batches[workers] = [audio for _, audio in loader]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))


def test_an_item_asked_for_with_its_epoch_is_that_epochs_item(corpus):
    file_list, _ = corpus
    data = Mel2Samp(file_list=file_list, mode="train", segment_length=SEGMENT, dequantize=True, **MEL_PARAMETERS)
    by_epoch = {epoch: [data[epoch, index] for index in range(5)] for epoch in (2, 3)}
    assert data.epoch == 0  # asking for an epoch's item does not change the dataset's epoch
    for epoch, items in by_epoch.items():
        data.set_epoch(epoch)
        for index, (mel, audio) in enumerate(items):
            assert data.crop_start(index) == data.crop_start(index, epoch)
            expected_mel, expected_audio = data[index]
            assert torch.equal(mel, expected_mel) and torch.equal(audio, expected_audio)  # crop and noise
    assert not torch.equal(by_epoch[2][0][1], by_epoch[3][0][1])


def test_short_clips_are_zero_padded(corpus):
    file_list, paths = corpus
    for mode in ("train", "eval"):
        mel, audio = dataset(file_list, mode)[4]
        assert audio.shape == (SEGMENT,)
        assert torch.equal(audio[:1500], load_audio(paths[4], RATE))
        assert not audio[1500:].any()
        assert mel.shape == (80, 1 + SEGMENT // HOP)


def test_evaluation_items_are_the_first_segment_in_every_epoch(corpus):
    file_list, paths = corpus
    data = dataset(file_list, "eval")
    for epoch in (0, 7):
        data.set_epoch(epoch)
        assert torch.equal(data[2][1], load_audio(paths[2], RATE)[:SEGMENT])


def test_synthesis_items_are_whole_clips_cut_to_whole_frames(corpus):
    file_list, paths = corpus
    mel, audio = dataset(file_list, "synthesis")[1]
    full = load_audio(paths[1], RATE)
    assert torch.allclose(mel, MelSpectrogram(**MEL_PARAMETERS)(full), atol=1e-5)
    assert mel.shape[1] == 1 + 21000 // HOP
    assert audio.shape[0] == HOP * (mel.shape[1] - 1) == 21000 // HOP * HOP
    assert torch.equal(audio, full[: audio.shape[0]])


def test_collate_stacks_equal_items_and_refuses_unequal_ones(corpus):
    file_list, _ = corpus
    mel, audio = collate([dataset(file_list)[i] for i in range(3)])
    assert mel.shape == (3, 80, 1 + SEGMENT // HOP) and audio.shape == (3, SEGMENT)
    synthesis = dataset(file_list, "synthesis")
    with pytest.raises(ValueError, match="different lengths"):
        collate([synthesis[0], synthesis[1]])


def test_bad_files_are_reported_when_the_dataset_is_built(tmp_path, corpus):
    _, paths = corpus
    wrong_rate = write_clip(tmp_path / "rate.wav", 5000, rate=16000)
    listing = tmp_path / "bad.txt"
    listing.write_text(f"{paths[0]}\n{wrong_rate}\n")
    with pytest.raises(DataError, match="rate.wav: sampling rate is 16000 Hz"):
        dataset(str(listing))


def run_command(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "mel2samp.py"), *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.fixture
def config_file(tmp_path):
    with open(os.path.join(ROOT, "configs", "nanoflow-h16-r128-emb512.json")) as f:
        config = json.load(f)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_command_writes_the_tacotron2_mel_of_every_clip(tmp_path, corpus, config_file):
    file_list, paths = corpus
    out = tmp_path / "mels"
    result = run_command("-f", file_list, "-c", config_file, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) + ".pt" for p in paths)
    mel_spectrogram = MelSpectrogram(**MEL_PARAMETERS)
    for path in paths:
        saved = torch.load(out / (os.path.basename(path) + ".pt"))
        assert saved.dtype == torch.float32
        assert torch.allclose(saved, mel_spectrogram(load_audio(path, RATE)), atol=1e-4)


@pytest.mark.parametrize("problem", ["wrong rate", "corrupt"])
def test_command_stops_on_a_bad_file_with_one_line_naming_it(tmp_path, corpus, config_file, problem):
    _, paths = corpus
    bad = tmp_path / "bad.wav"
    if problem == "wrong rate":
        write_clip(bad, 5000, rate=16000)
    else:
        bad.write_bytes(b"\x00\x01" * 4000)
    listing = tmp_path / "list_with_bad.txt"
    listing.write_text(f"{paths[0]}\n{bad}\n")
    out = tmp_path / "mels"
    out.mkdir()
    earlier = out / "earlier.wav.pt"
    torch.save(torch.ones(80, 3), earlier)
    result = run_command("-f", str(listing), "-c", config_file, "-o", str(out))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert "Traceback" not in result.stderr
    assert torch.equal(torch.load(earlier), torch.ones(80, 3))


def test_command_refuses_two_clips_with_one_output_name(tmp_path, config_file):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_clip(tmp_path / "a" / "same.wav", 3000)
    second = write_clip(tmp_path / "b" / "same.wav", 3000)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{first}\n{second}\n")
    with pytest.raises(DataError, match="same.wav.pt"):
        write_mels(str(listing), config_file, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_command_needs_only_data_config(tmp_path, corpus, config_file):
    file_list, paths = corpus
    with open(config_file) as f:
        data_only = {
            "data_config": json.load(f)["data_config"],
            "train_config": {"fp16_run": False},
        }  # the original's sections may be partial: not read
    path = tmp_path / "data_only.json"
    path.write_text(json.dumps(data_only))
    result = run_command("-f", file_list, "-c", str(path), "-o", str(tmp_path / "mels"))
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(tmp_path / "mels")) == len(paths)


def store_mels(folder, paths, name=lambda path: os.path.basename(path) + ".pt", frames_off=0):
    """Each clip's Tacotron 2 mel saved in `folder` as `name(path)` (.pt or .npy), as an acoustic model's
    ground-truth aligned mels would be; `frames_off` frames cut (< 0) or added (repeating the last)."""
    os.makedirs(folder, exist_ok=True)
    mels = []
    for path in paths:
        mel = MelSpectrogram(**MEL_PARAMETERS)(load_audio(path, RATE))  # [80, 1 + T // HOP]
        if frames_off < 0:
            mel = mel[:, :frames_off]
        elif frames_off > 0:
            mel = torch.cat([mel, mel[:, -1:].expand(-1, frames_off)], dim=1)
        target = os.path.join(folder, name(path))
        np.save(target, mel.numpy()) if target.endswith(".npy") else torch.save(mel, target)
        mels.append(mel)
    return mels


def test_stored_mels_are_read_and_cropped_in_step_with_the_audio(tmp_path, corpus):
    file_list, paths = corpus
    stored = store_mels(str(tmp_path / "mels"), paths)
    data = Mel2Samp(
        file_list=file_list,
        mode="train",
        segment_length=SEGMENT,
        seed=1234,
        mel_directory=str(tmp_path / "mels"),
        **MEL_PARAMETERS,
    )
    frames = 1 + SEGMENT // HOP
    mel_spectrogram = MelSpectrogram(**MEL_PARAMETERS)
    for epoch in (0, 1):
        data.set_epoch(epoch)
        for index in range(4):
            start = data.crop_start(index)
            assert start % HOP == 0
            mel, audio = data[index]
            first = start // HOP
            assert torch.equal(mel, stored[index][:, first : first + frames])
            assert torch.equal(audio, load_audio(paths[index], RATE)[start : start + SEGMENT])
            # The frames the crop's own mel would have, but for its edges' reflect padding.
            assert torch.allclose(mel[:, 2:-2], mel_spectrogram(audio)[:, 2:-2], atol=1e-4)
    assert len({data.crop_start(index) for index in range(4)}) > 1
    mel, audio = data[4]  # 1500 samples, zero-padded: its 6 frames, then silence
    assert torch.equal(mel[:, :6], stored[4]) and torch.all(mel[:, 6:] == np.log(1e-5))
    assert mel.shape == (80, frames) and audio.shape == (SEGMENT,)
    evaluation = Mel2Samp(
        file_list=file_list, mode="eval", segment_length=SEGMENT, mel_directory=str(tmp_path / "mels"), **MEL_PARAMETERS
    )
    assert torch.equal(evaluation[1][0], stored[1][:, :frames])
    synthesis = Mel2Samp(
        file_list=file_list,
        mode="synthesis",
        segment_length=SEGMENT,
        mel_directory=str(tmp_path / "mels"),
        **MEL_PARAMETERS,
    )
    mel, audio = synthesis[2]
    assert torch.equal(mel, stored[2]) and audio.shape[0] == HOP * (mel.shape[1] - 1)


def test_stored_mels_keep_dequantized_audio_and_names_of_either_convention(tmp_path, corpus):
    file_list, paths = corpus
    stem = lambda path: os.path.splitext(os.path.basename(path))[0] + ".npy"  # noqa: E731  HiFi-GAN's naming
    stored = store_mels(str(tmp_path / "mels"), paths, name=stem, frames_off=-2)
    data = Mel2Samp(
        file_list=file_list,
        mode="train",
        segment_length=SEGMENT,
        seed=5,
        dequantize=True,
        mel_directory=str(tmp_path / "mels"),
        **MEL_PARAMETERS,
    )
    mel, audio = data[0]
    start = data.crop_start(0)
    crop = load_audio(paths[0], RATE)[start : start + SEGMENT]
    assert 0 < (audio - crop).abs().max() <= 0.5 / 32768
    assert torch.equal(mel, stored[0][:, start // HOP : start // HOP + 1 + SEGMENT // HOP])
    synthesis = Mel2Samp(
        file_list=file_list,
        mode="synthesis",
        segment_length=SEGMENT,
        mel_directory=str(tmp_path / "mels"),
        **MEL_PARAMETERS,
    )
    mel, _ = synthesis[1]  # two frames short: the last one repeated up to 1 + T // hop
    assert mel.shape[1] == 1 + 21000 // HOP and torch.equal(mel[:, -3:], stored[1][:, -1:].expand(-1, 3))


@pytest.mark.parametrize("problem", ["missing", "frames"])
def test_a_stored_mel_that_does_not_fit_is_a_one_line_error_naming_it(tmp_path, corpus, problem):
    file_list, paths = corpus
    store_mels(str(tmp_path / "mels"), paths, frames_off=3 if problem == "frames" else 0)
    if problem == "missing":
        os.remove(tmp_path / "mels" / "clip2.wav.pt")
        message = f"{tmp_path / 'mels' / 'clip2.wav.pt'}: mel file not found (the mel of {paths[2]}"
    else:
        message = (
            f"{tmp_path / 'mels' / 'clip0.wav.pt'}: mel has {1 + 20000 // HOP + 3} frames, its audio "
            f"{paths[0]} (20000 samples) has {1 + 20000 // HOP}"
        )
    with pytest.raises(DataError) as error:
        Mel2Samp(
            file_list=file_list,
            mode="train",
            segment_length=SEGMENT,
            mel_directory=str(tmp_path / "mels"),
            **MEL_PARAMETERS,
        )
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
