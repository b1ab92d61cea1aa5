"""Data as other tools write it: mels saved by TTS toolkits, statistics files, file lists and audio of other
programs. Each one works where its meaning is unambiguous, or ends in a one-line error naming the file."""

import importlib.util
import json
import math
import os
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
import torch.multiprocessing  # registers torch's reductions of tensors with ForkingPickler

import train
from conftest import ROOT
from data import DataError, MelSpectrogram, load_audio, load_mel, mel_frame_count, read_file_list
from mel2samp import Mel2Samp
from mel_scale import MelConversion, looks_like, read_mel_stats

RATE = 22050
MEL_PARAMETERS: dict[str, Any] = dict(
    sampling_rate=RATE, filter_length=1024, hop_length=256, win_length=1024, mel_fmin=0.0, mel_fmax=8000.0
)


def write_clip(path, num_samples, seed=0):
    pcm = (np.random.default_rng(seed).standard_normal(num_samples) * 3000).astype(np.int16)
    soundfile.write(str(path), pcm, RATE, subtype="PCM_16")
    return str(path)


def test_a_mel_saved_with_requires_grad_trains_through_dataloader_workers(tmp_path):
    """`torch.save(mel_outputs, path)` of a TTS model's output keeps requires_grad. A DataLoader worker cannot
    send a crop of such a tensor (PyTorch refuses to pickle it across processes, and training then waited
    forever for the batch): the mel is read as data."""
    clip = write_clip(tmp_path / "clip.wav", 20000)
    (tmp_path / "list.txt").write_text(f"{clip}\n")
    os.makedirs(tmp_path / "mels")
    mel = torch.randn(80, 1 + 20000 // 256) - 5.0
    torch.save(mel.clone().requires_grad_(), tmp_path / "mels" / "clip.wav.pt")
    torch.save(mel.clone()[None].requires_grad_(), tmp_path / "batched.pt")
    for path in (tmp_path / "mels" / "clip.wav.pt", tmp_path / "batched.pt"):
        loaded = load_mel(str(path))
        assert not loaded.requires_grad and loaded.is_contiguous() and torch.equal(loaded, mel)
    data = Mel2Samp(
        file_list=str(tmp_path / "list.txt"),
        mode="train",
        segment_length=4096,
        mel_directory=str(tmp_path / "mels"),
        **MEL_PARAMETERS,
    )
    item_mel, _ = data[0]
    ForkingPickler.dumps(data[0])  # what a worker does with an item; raised RuntimeError before
    assert not item_mel.requires_grad


def test_a_fortran_ordered_or_transposed_view_mel_is_read_contiguous(tmp_path):
    mel = np.random.default_rng(0).standard_normal((80, 30)).astype(np.float32) - 5.0
    np.save(tmp_path / "fortran.npy", np.asfortranarray(mel))  # e.g. the .T of a time-major array, saved
    torch.save(torch.from_numpy(mel.T.copy()).T, tmp_path / "view.pt")  # a non-contiguous view
    for name in ("fortran.npy", "view.pt"):
        loaded = load_mel(str(tmp_path / name))
        assert loaded.is_contiguous() and torch.equal(loaded, torch.from_numpy(mel)), name


def test_indented_comments_are_skipped_and_a_list_of_clip_ids_says_what_it_is(tmp_path):
    os.makedirs(tmp_path / "wavs")
    clip = write_clip(tmp_path / "wavs" / "LJ001-0001.wav", 4096)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{clip}|text\n  # a comment, indented\n\n")
    assert read_file_list(str(listing)) == [clip]
    # LJSpeech's metadata.csv, and HiFi-GAN's LJSpeech-1.1/training.txt: ids, not paths
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("LJ001-0001|Printing, in the only sense|Printing, in the only sense\n")
    with pytest.raises(DataError) as excinfo:
        read_file_list(str(metadata))
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{metadata}:1: audio file 'LJ001-0001' not found")
    assert "wavs/LJ001-0001.wav is there" in message and "scripts/prepare_ljspeech.py" in message
    (tmp_path / "other.txt").write_text("LJ009-9999\n")  # no such clip: no hint
    with pytest.raises(DataError, match=r"not found \(looked in the working directory and in [^)]*\)$"):
        read_file_list(str(tmp_path / "other.txt"))


def demo_config(folder) -> str:
    """configs/demo.json writing into `folder`, for the shipped demo checkpoint."""
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        config = json.load(f)
    config["train_config"]["output_directory"] = str(folder / "exp")
    path = str(folder / "demo.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


DEMO_CHECKPOINT = os.path.join(ROOT, "pretrained", "nanoflow-demo.pt")


def test_a_mel_of_integers_is_refused_before_any_synthesis(tmp_path, capsys):
    """The dtype is in the header: -s refuses such a mel with the others' headers, not after synthesizing
    the mels before it."""
    os.makedirs(tmp_path / "mels")
    mel = np.random.default_rng(0).standard_normal((80, 20)).astype(np.float32) - 5.0
    np.save(tmp_path / "mels" / "a.npy", mel)
    np.save(tmp_path / "mels" / "b.npy", mel.astype(np.int16))  # quantised by a careless export
    args = ["-s", "-c", demo_config(tmp_path), "--checkpoint_path", DEMO_CHECKPOINT]
    assert train.main([*args, "--mels", str(tmp_path / "mels")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: {tmp_path / 'mels' / 'b.npy'}: mel has dtype int16, expected a floating point log-mel"
    assert not os.path.exists(tmp_path / "exp"), "a synthesis was written before the error"
    with pytest.raises(DataError, match=r"b.npy: mel has dtype int16"):
        mel_frame_count(str(tmp_path / "mels" / "b.npy"))


def test_a_float64_mel_beyond_float32_is_named_for_what_it_is(tmp_path):
    mel = np.random.default_rng(0).standard_normal((80, 20)) * 1e300  # finite in float64, inf in float32
    np.save(tmp_path / "huge.npy", mel)
    with pytest.raises(DataError) as excinfo:
        load_mel(str(tmp_path / "huge.npy"))
    assert str(excinfo.value).startswith(f"{tmp_path / 'huge.npy'}: mel holds values up to ")
    assert "beyond float32" in str(excinfo.value)


def test_mels_saved_inside_python_objects_are_named_for_what_they_hold(tmp_path):
    """np.save of a dict pickles it; torch.save of a dict, tuple or list keeps the container: one line that
    says what the file holds and what to save instead, from -s/-v's header check (mel_frame_count) too."""
    mel = np.zeros((80, 10), np.float32)
    holder = np.empty((), dtype=object)
    holder[()] = mel
    np.save(tmp_path / "object.npy", holder, allow_pickle=True)
    np.save(tmp_path / "dict.npy", {"mel": mel}, allow_pickle=True)  # type: ignore[arg-type]
    torch.save({"mel": torch.from_numpy(mel), "length": 10}, tmp_path / "dict.pt")
    torch.save((torch.from_numpy(mel), torch.from_numpy(mel)), tmp_path / "tuple.pt")
    cases = {
        "object.npy": "holds pickled Python objects (np.save of a dict, a list or an object array)",
        "dict.npy": "holds pickled Python objects",
        "dict.pt": "expected a tensor, found a dict with keys 'mel', 'length'; save the mel tensor itself",
        "tuple.pt": "expected a tensor, found a tuple of 2 items; save the mel tensor itself",
    }
    for name, problem in cases.items():
        for read in (load_mel, mel_frame_count):
            with pytest.raises(DataError) as excinfo:
                read(str(tmp_path / name))
            message = str(excinfo.value)
            assert message.startswith(f"{tmp_path / name}: ") and problem in message and "\n" not in message, message


def test_a_transcript_saved_with_a_byte_order_mark_and_crlf_is_one_clean_line(tmp_path):
    spec = importlib.util.spec_from_file_location("prepare_corpus", os.path.join(ROOT, "scripts", "prepare_corpus.py"))
    assert spec is not None and spec.loader is not None
    prepare_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_corpus)
    path = tmp_path / "p225_001.txt"
    path.write_bytes("\ufeffPlease call Stella.\r\n\r\n".encode())  # as Notepad saves it
    assert prepare_corpus.transcript(str(path)) == "Please call Stella."


def test_coqui_statistics_are_not_unpickled_and_the_error_gives_the_conversion(tmp_path):
    """Coqui TTS's scale_stats.npy is np.save of a dict (mel_mean, mel_std of its 20 log10 mels, ...): not read,
    since a pickle can run code, and the one-line error converts it as a user pastes it."""
    rng = np.random.default_rng(0)
    mean, std = rng.standard_normal(80) * 10 - 40, rng.uniform(5, 15, 80)
    stats = {"mel_mean": mean, "mel_std": std, "linear_mean": mean, "linear_std": std, "audio_config": {}}
    path = str(tmp_path / "scale_stats.npy")
    np.save(path, stats, allow_pickle=True)  # type: ignore[arg-type]
    with pytest.raises(DataError) as excinfo:
        read_mel_stats(path, 80)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: holds a pickled Python object") and "\n" not in message
    command = message.split('python -c "')[1].split('"')[0]
    exec(command, {})
    converted = str(tmp_path / "mel_stats.npy")
    assert f"--mel_stats {converted} --mel_scale db" in message
    read_mean, read_std = read_mel_stats(converted, 80)
    assert np.allclose(read_mean.numpy(), mean, atol=1e-5) and np.allclose(read_std.numpy(), std, atol=1e-5)


def test_an_ln_mel_scattered_around_its_floor_is_still_taken_as_ln(capsys):
    """A TTS model's prediction scatters around ln(1e-5) in silence, and ln(1e-5) in float16 is -11.516: such a
    mel was taken for a log10 one, with the advice --mel_scale log10, which would have ruined it."""
    path = read_file_list(os.path.join(ROOT, "data", "demo", "heldout", "test_files.txt"))[0]
    audio = load_audio(path, RATE)
    silence = torch.zeros(5000)
    with torch.no_grad():
        mel = MelSpectrogram()(torch.cat([silence, audio, silence]))  # [80, F], reaching the floor
    assert float(mel.min()) == pytest.approx(math.log(1e-5))
    noise = torch.randn(mel.shape, generator=torch.Generator().manual_seed(0))
    for name, predicted in {"half": mel.half().float(), "scattered": mel + 0.3 * noise}.items():
        assert looks_like(predicted) == "ln", name
        MelConversion()(predicted, f"{name}.npy")
    assert capsys.readouterr().err == ""
    assert looks_like(mel * 20 / math.log(10)) == "db"  # a dB mel lies far below the floor


def test_an_npz_mel_says_how_to_save_it(tmp_path):
    np.savez(tmp_path / "mel.npz", mel=np.zeros((80, 10), np.float32))
    with pytest.raises(DataError) as excinfo:
        load_mel(str(tmp_path / "mel.npz"))
    assert str(excinfo.value) == (
        f"{tmp_path / 'mel.npz'}: unknown mel file type '.npz', expected one of .pt, .npy "
        "(an archive of arrays, np.savez's: save the mel alone with np.save)"
    )


def test_a_npy_mel_that_is_no_npy_file_says_so(tmp_path):
    """numpy takes a file without its header for a pickle and says it "contains pickled (object) data"."""
    (tmp_path / "text.npy").write_text("-11.5 -11.5 -11.5\n")  # e.g. np.savetxt given a .npy name
    for read in (load_mel, mel_frame_count):
        with pytest.raises(DataError) as excinfo:
            read(str(tmp_path / "text.npy"))
        assert str(excinfo.value) == f"{tmp_path / 'text.npy'}: not a .npy file (it does not start with numpy's header)"
