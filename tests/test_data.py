"""data.py: the Tacotron 2 mel against the reference fixture, audio loading, file lists, mel files."""

import math
import os

import numpy as np
import pytest
import soundfile
import torch

from data import DataError, MelSpectrogram, audio_length, load_audio, load_mel, read_file_list

RATE = 22050


def write_wav(path, samples, rate=RATE, subtype="PCM_16"):
    soundfile.write(str(path), samples, rate, subtype=subtype)
    return str(path)


def assert_one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert str(word) in message


def test_mel_matches_tacotron2_fixture(fixtures_dir):
    reference = torch.load(os.path.join(fixtures_dir, "mel-tacotron2.pt"))
    mel_spectrogram = MelSpectrogram(sampling_rate=reference["sampling_rate"], **reference["params"])
    audio = reference["pcm_int16"].float() / 32768
    mel = mel_spectrogram(audio[None])  # [1, 80, F]
    assert mel.shape == (1, 80, 1 + audio.shape[0] // 256) == (1, *reference["mel"].shape)
    assert torch.allclose(mel[0], reference["mel"], atol=1e-4, rtol=0)


def test_mel_of_a_wav_file_matches_fixture(tmp_path, fixtures_dir):
    reference = torch.load(os.path.join(fixtures_dir, "mel-tacotron2.pt"))
    path = write_wav(tmp_path / "clip.wav", reference["pcm_int16"].numpy())
    mel = MelSpectrogram(**reference["params"])(load_audio(path, RATE))
    assert torch.allclose(mel, reference["mel"], atol=1e-4, rtol=0)


def test_mel_is_batched_and_its_buffers_follow_the_module():
    mel_spectrogram = MelSpectrogram()
    audio = torch.randn(3, 5000).clamp(-1, 1) * 0.3
    batch = mel_spectrogram(audio)
    assert batch.shape == (3, 80, 1 + 5000 // 256)
    for b in range(3):
        assert torch.allclose(batch[b], mel_spectrogram(audio[b]), atol=1e-5)
    assert set(dict(mel_spectrogram.named_buffers())) == {"mel_basis", "window"}
    assert mel_spectrogram.state_dict() == {}  # features, not weights: never in a checkpoint
    assert mel_spectrogram.to(torch.float64).mel_basis.dtype == torch.float64
    assert torch.allclose(mel_spectrogram(audio), batch, atol=1e-4)  # computed in float32 regardless


def test_silence_maps_to_the_tacotron2_log_floor():
    mel = MelSpectrogram()(torch.zeros(2, 3000))
    assert torch.equal(mel, torch.full_like(mel, math.log(1e-5)))


def test_mel_refuses_audio_too_short_for_reflect_padding():
    with pytest.raises(ValueError, match="too short"):
        MelSpectrogram()(torch.zeros(1, 512))


def test_int16_is_scaled_by_one_over_32768_and_float_files_are_taken_as_they_are(tmp_path):
    pcm = np.array([-32768, -1, 0, 1, 12345, 32767], dtype=np.int16)
    audio = load_audio(write_wav(tmp_path / "int16.wav", pcm), RATE)
    assert audio.dtype == torch.float32
    assert torch.equal(audio, torch.from_numpy(pcm.astype(np.float32)) / 32768)
    floats = np.array([0.1, -0.25, 1.5, -2.0], dtype=np.float32)  # outside [-1, 1] on purpose
    assert torch.equal(
        load_audio(write_wav(tmp_path / "float.wav", floats, subtype="FLOAT"), RATE), torch.from_numpy(floats)
    )
    flac = load_audio(write_wav(tmp_path / "clip.flac", pcm, subtype="PCM_16"), RATE)
    assert torch.equal(flac, torch.from_numpy(pcm.astype(np.float32)) / 32768)


def test_load_audio_reads_the_requested_part(tmp_path):
    pcm = np.arange(1000, dtype=np.int16)
    path = write_wav(tmp_path / "ramp.wav", pcm)
    assert audio_length(path, RATE) == 1000
    part = load_audio(path, RATE, start=100, length=50)
    assert torch.equal(part * 32768, torch.arange(100, 150, dtype=torch.float32))


def test_bad_audio_files_are_refused_with_one_line_naming_file_and_problem(tmp_path):
    wrong_rate = write_wav(tmp_path / "rate.wav", np.zeros(100, np.int16), rate=16000)
    stereo = write_wav(tmp_path / "stereo.wav", np.zeros((100, 2), np.int16))
    no_samples = write_wav(tmp_path / "no_samples.wav", np.zeros(0, np.int16))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really a wave file" * 10)
    nan = write_wav(tmp_path / "nan.wav", np.array([0.0, np.nan], np.float32), subtype="FLOAT")
    cases = [
        (wrong_rate, "16000 Hz"),
        (stereo, "2 channels"),
        (no_samples, "no audio samples"),
        (empty, "empty"),
        (corrupt, "cannot read"),
        (tmp_path / "missing.wav", "not found"),
        (tmp_path, "not a file"),
        (nan, "NaN"),
    ]
    for path, problem in cases:
        with pytest.raises(DataError) as excinfo:
            load_audio(str(path), RATE)
        assert_one_line_error(excinfo, path, problem)
    assert isinstance(excinfo.value, ValueError)


def test_file_list_reads_paths_and_tts_lines_and_skips_blank_lines(tmp_path, monkeypatch):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    first = write_wav(wavs / "a.wav", np.zeros(10, np.int16))
    second = write_wav(wavs / "b.wav", np.zeros(10, np.int16))
    third = write_wav(tmp_path / "c.wav", np.zeros(10, np.int16))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{first}\n\n   \n{second}|Some text | with bars|normalised\r\nwavs/a.wav|x\nc.wav\n")
    monkeypatch.chdir(tmp_path)
    assert read_file_list(str(listing)) == [first, second, "wavs/a.wav", "c.wav"]  # as written, from the cwd
    monkeypatch.chdir(wavs)  # now only the list's folder has them
    assert read_file_list(str(listing))[2:] == [str(tmp_path / "wavs/a.wav"), third]


def test_bad_file_lists_are_refused(tmp_path):
    with pytest.raises(DataError) as excinfo:
        read_file_list(str(tmp_path / "nothing.txt"))
    assert_one_line_error(excinfo, tmp_path / "nothing.txt", "not found")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataError) as excinfo:
        read_file_list(str(blank))
    assert_one_line_error(excinfo, blank, "empty")
    dangling = tmp_path / "dangling.txt"
    dangling.write_text(f"\nwavs/gone.wav|text\n{tmp_path / 'gone.wav'}\n")
    with pytest.raises(DataError) as excinfo:
        read_file_list(str(dangling))
    assert_one_line_error(excinfo, f"{dangling}:2", "wavs/gone.wav", "not found")
    dangling.write_text(f"{tmp_path / 'gone.wav'}\n")
    with pytest.raises(DataError) as excinfo:
        read_file_list(str(dangling))
    assert_one_line_error(excinfo, f"{dangling}:1", tmp_path / "gone.wav", "not found")


def test_mel_files_load_from_pt_and_npy(tmp_path):
    mel = torch.randn(80, 7)
    torch.save(mel, tmp_path / "clip.wav.pt")
    np.save(tmp_path / "clip.npy", mel.numpy().astype(np.float64))
    torch.save(mel[None], tmp_path / "batched.pt")  # a Tacotron 2 output keeps its batch dimension
    for name in ("clip.wav.pt", "clip.npy", "batched.pt"):
        loaded = load_mel(str(tmp_path / name))
        assert loaded.dtype == torch.float32 and torch.allclose(loaded, mel)


def test_bad_mel_files_are_refused(tmp_path):
    torch.save(torch.randn(7, 80), tmp_path / "transposed.pt")
    np.save(tmp_path / "wrong.npy", np.zeros((40, 7), np.float32))
    torch.save({"mel": torch.randn(80, 7)}, tmp_path / "dict.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    (tmp_path / "mel.txt").write_text("1 2 3")
    cases = [
        ("transposed.pt", "transposed"),
        ("wrong.npy", "[40, 7]"),
        ("dict.pt", "expected a tensor"),
        ("corrupt.pt", "cannot read"),
        ("mel.txt", "unknown mel file type"),
        ("missing.npy", "not found"),
    ]
    for name, problem in cases:
        with pytest.raises(DataError) as excinfo:
            load_mel(str(tmp_path / name))
        assert_one_line_error(excinfo, tmp_path / name, problem)
