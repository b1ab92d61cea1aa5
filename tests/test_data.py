"""data.py: the Tacotron 2 mel against the reference fixture, audio loading, file lists, mel files."""

import datetime
import io
import math
import os
import pickle

import numpy as np
import pytest
import soundfile
import torch

import synthesis
import train
from data import DataError, MelSpectrogram, audio_length, load_audio, load_mel, mel_frame_count, read_file_list

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


def test_bad_file_lists_are_refused(tmp_path, monkeypatch):
    with pytest.raises(DataError) as excinfo:
        read_file_list(str(tmp_path / "nothing.txt"))
    assert_one_line_error(excinfo, tmp_path / "nothing.txt", "not found")
    assert "working directory" not in str(excinfo.value)
    # A relative list (as the shipped configs name theirs) from another directory: the error says where it looked.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as excinfo:
        read_file_list("data/demo/test_files.txt")
    assert_one_line_error(excinfo, "data/demo/test_files.txt", "not found", f"working directory, {os.getcwd()}")
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


def test_a_mel_folder_names_the_files_it_leaves_out(tmp_path, capsys):
    """--mels DIR reads its .pt and .npy files (any case); the others are named in one warning, but for the
    recordings -v measures them against."""
    for name in ("a.npy", "B.PT", "c.npz", "readme.txt", ".hidden", "a.wav", "b.FLAC", "d.mp3", "e.json"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.npy").mkdir()  # a folder, whatever its name
    assert synthesis.mel_files([str(tmp_path)]) == [str(tmp_path / "B.PT"), str(tmp_path / "a.npy")]
    warning = capsys.readouterr().err
    assert (
        warning == f"warning: {tmp_path}: 4 files not .pt or .npy left out of --mels: c.npz, d.mp3, e.json and 1 more\n"
    )
    assert synthesis.mel_files([str(tmp_path / "a.npy")]) == [str(tmp_path / "a.npy")]
    assert capsys.readouterr().err == ""


def test_a_mel_of_no_frames_is_too_short_not_misshapen(tmp_path):
    """[80, 0] has the shape of a mel: too short to synthesize (left out of -s and -v with a warning), not refused."""
    np.save(tmp_path / "empty.npy", np.zeros((80, 0), np.float32))
    assert mel_frame_count(str(tmp_path / "empty.npy")) == 0
    assert load_mel(str(tmp_path / "empty.npy")).shape == (80, 0)


def test_bad_mel_files_are_refused(tmp_path):
    torch.save(torch.randn(7, 80), tmp_path / "transposed.pt")
    np.save(tmp_path / "wrong.npy", np.zeros((40, 7), np.float32))
    torch.save({"mel": torch.randn(80, 7)}, tmp_path / "dict.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    (tmp_path / "mel.txt").write_text("1 2 3")
    cases = [
        ("transposed.pt", "frames first"),
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


def test_a_big_endian_npy_mel_loads(tmp_path):
    mel = np.random.default_rng(0).standard_normal((80, 7)).astype(np.float32)
    np.save(tmp_path / "big.npy", mel.astype(">f4"))  # as numpy writes on a big-endian machine, or asked to
    loaded = load_mel(str(tmp_path / "big.npy"))
    assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.from_numpy(mel))


def torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"), reason="torch < 2.5 refuses them (named)")
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_a_pt_mel_holding_a_numpy_array_loads(tmp_path, dtype):
    """`torch.save(mel.numpy(), path)`, as TTS scripts write it: read without unpickling anything else."""
    mel = np.random.default_rng(0).standard_normal((80, 7)).astype(dtype)
    torch.save(mel, tmp_path / "numpy.pt")
    assert mel_frame_count(str(tmp_path / "numpy.pt")) == 7
    assert torch.equal(load_mel(str(tmp_path / "numpy.pt")), torch.from_numpy(mel).float())


@pytest.mark.parametrize(
    "write,message",
    [
        (lambda path: torch.save(np.zeros((80, 7), np.int32), path), "it holds a numpy.dtypes.Int32DType; a mel file"),
        (lambda path: torch.save(np.array([{"a": 1}], dtype=object), path), "it holds a numpy.dtypes.ObjectDType"),
        (lambda path: torch.save(datetime.date(2020, 1, 1), path), "it holds a datetime.date"),
        (lambda path: pickle.dump(torch.zeros(80, 7), open(path, "wb")), "a Python pickle, not a file torch.save"),
        (lambda path: open(path, "wb").write(b"not a tensor " * 9), "not a file torch.save wrote"),
        (lambda path: open(path, "wb").close(), "an empty file"),
        (
            lambda path: open(path, "wb").write(torch_saved(torch.zeros(80, 70))[:300]),
            "torch.save's zip file, cut short or damaged",
        ),
    ],
)
def test_a_pt_mel_torch_load_cannot_read_is_named_in_a_short_line(tmp_path, capsys, write, message):
    path = tmp_path / "mel.pt"
    write(path)
    with pytest.raises(DataError) as excinfo:
        load_mel(str(path))
    assert_one_line_error(excinfo, path, f"cannot read mel: {message}")
    assert len(str(excinfo.value)) < len(str(path)) + 140 and "\x1b" not in str(excinfo.value)
    assert capsys.readouterr().err == ""  # nor torch's warnings about a plain pickle


@pytest.mark.parametrize("name", ["time_major.npy", "time_major.pt", "batched.npy"])
def test_a_time_major_mel_is_refused_with_the_line_that_transposes_it(tmp_path, monkeypatch, name):
    """ESPnet, ParallelWaveGAN and Coqui save [frames, 80]: the error gives the command that fixes the file."""
    mel = np.random.default_rng(0).standard_normal((80, 7)).astype(np.float32)
    path = str(tmp_path / name)
    if name.endswith(".pt"):
        torch.save(torch.from_numpy(mel.T.copy()), path)
    else:
        np.save(path, mel.T[None] if name.startswith("batched") else mel.T)
    with pytest.raises(DataError) as excinfo:
        load_mel(path)
    # [7, 80] could also be 7 bands of 80 frames: the message says both, and the command for the first
    assert_one_line_error(excinfo, path, "[80, frames]", "if it is 7 frames of 80 bands", "7 bands are another model's")
    command = str(excinfo.value).split("transpose it: ")[1].split("; 7 bands")[0]
    exec(command, {"np": np, "torch": torch})  # as a user pastes it
    assert torch.equal(load_mel(path), torch.from_numpy(mel))


def test_too_short_mels_are_counted_in_good_english(tmp_path, capsys):
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, np.zeros((80, 1), np.float32))
    checkpoint = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained")
    config = os.path.join(os.path.dirname(checkpoint), "configs", "demo.json")
    args = ["-s", "-c", config, "--checkpoint_path", os.path.join(checkpoint, "nanoflow-demo.pt")]
    assert train.main([*args, "--mels", str(tmp_path)]) == 1
    expected = "a mel of 1 frame is too short to synthesize (need at least 4) (as is the other)"
    assert capsys.readouterr().err.strip().endswith(f"error: {tmp_path / 'a.npy'}: {expected}")
