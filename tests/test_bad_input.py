"""Input as other tools write it, and input that is wrong: file lists and configs in other encodings, audio
whose header hides its length, outputs that would overwrite each other, checkpoints that would compute
another model or hold NaN, flags that cannot apply. Each one works, or ends in a one-line error."""

import json
import os
import warnings

import numpy as np
import pytest
import soundfile
import torch

import train
from config import ConfigError, load_config
from data import DataError, audio_length, load_audio, read_file_list_entries
from mel2samp import Mel2Samp, write_mels
from model import build_model
from test_train import RATE, make_corpus, run, run_here, write_config


def write_bytes(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_file_lists_and_configs_as_windows_tools_write_them(tmp_path):
    clip = str(tmp_path / "clip.wav")
    soundfile.write(clip, np.zeros(4096, np.int16), RATE)
    lines = f"# path|speaker|text\n{clip}|s1|café\n"
    # a UTF-8 byte-order mark (Notepad), UTF-16 (PowerShell 5's `>`), CRLF; the header after a blank line
    for name, data in (
        ("bom.txt", b"\xef\xbb\xbf" + lines.encode()),
        ("utf16.txt", lines.replace("\n", "\r\n").encode("utf-16")),
        ("blank_first.txt", ("\n" + lines).encode()),
    ):
        assert read_file_list_entries(write_bytes(tmp_path / name, data)) == [(clip, "s1")], name
    latin1 = write_bytes(tmp_path / "latin1.txt", lines.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(line 2: byte 0xe9\); save it as UTF-8$"):
        read_file_list_entries(latin1)
    for name, encoding in (("utf16le.txt", "utf-16-le"), ("utf16be.txt", "utf-16-be")):  # no byte-order mark
        unmarked = write_bytes(tmp_path / name, ("\n" + lines).encode(encoding))
        with pytest.raises(DataError, match=rf"{name}: not UTF-8 text \(it holds NUL bytes: UTF-16 without"):
            read_file_list_entries(unmarked)
    with pytest.raises(DataError, match="is a folder, not a file list"):
        read_file_list_entries(str(tmp_path))

    config = write_config(str(tmp_path))
    with open(config, "rb") as f:
        text = f.read()
    assert load_config(write_bytes(tmp_path / "bom.json", b"\xef\xbb\xbf" + text)).train.batch_size == 2
    broken = write_bytes(tmp_path / "latin1.json", text.replace(b'"tiny"', '"tïny"'.encode("latin-1")))
    with pytest.raises(ConfigError, match="latin1.json: not UTF-8 text"):
        load_config(broken)
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(str(tmp_path))


def test_a_list_written_on_windows_or_naming_the_home_folder_finds_its_clips(tmp_path, monkeypatch):
    (tmp_path / "wavs").mkdir()
    clip = tmp_path / "wavs" / "LJ001-0001.wav"
    soundfile.write(str(clip), np.zeros(4096, np.int16), RATE)
    windows = write_bytes(tmp_path / "windows.txt", b"wavs\\LJ001-0001.wav|text\r\n")
    assert read_file_list_entries(windows) == [(str(clip), None)]
    monkeypatch.setenv("HOME", str(tmp_path))
    home = write_bytes(tmp_path / "elsewhere.txt", b"~/wavs/LJ001-0001.wav|text\n")
    assert read_file_list_entries(home) == [(str(clip), None)]
    missing = write_bytes(tmp_path / "missing.txt", b"wavs\\LJ009-0009.wav\n")
    with pytest.raises(DataError, match=r"missing.txt:1: audio file 'wavs\\LJ009-0009.wav' not found"):
        read_file_list_entries(missing)


def test_a_flac_whose_header_hides_its_length_is_refused_in_one_line(tmp_path):
    """ffmpeg writing FLAC to a pipe cannot go back to fill in the length: libsndfile then reports 2**63 - 1
    samples, and cannot seek in the file. Here the length field of a FLAC's STREAMINFO is zeroed, as ffmpeg
    leaves it."""
    path = str(tmp_path / "piped.flac")
    soundfile.write(path, np.zeros(22050, np.int16), RATE, subtype="PCM_16")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[21] &= 0xF0  # the 36-bit total-samples field: the low 4 bits of byte 21 and bytes 22-25
    data[22:26] = bytes(4)
    write_bytes(path, bytes(data))
    with pytest.raises(DataError, match="piped.flac: its header does not say how many samples it holds"):
        audio_length(path, RATE)


def test_a_truncated_wav_or_aiff_is_refused_and_a_streamed_one_is_read(tmp_path):
    """A copy cut short keeps a header that claims the whole clip; libsndfile reads what is there, silently.
    A writer to a pipe (ffmpeg: 0xFFFFFFFF, sox: 0x7FFFF000) leaves a placeholder size: read to the end."""
    clip = (np.sin(np.arange(22050) / 7) * 8000).astype(np.int16)
    for extension, audio_format in (("wav", "WAV"), ("aiff", "AIFF")):
        whole = str(tmp_path / f"whole.{extension}")
        soundfile.write(whole, clip, RATE, format=audio_format)
        with open(whole, "rb") as f:
            data = f.read()
        cut = write_bytes(tmp_path / f"cut.{extension}", data[: len(data) // 2])
        with pytest.raises(DataError, match=rf"cut.{extension}: is truncated: its header claims 441\d\d bytes"):
            audio_length(cut, RATE)
        # a missing pad byte or two is not truncation
        assert audio_length(write_bytes(tmp_path / f"short.{extension}", data[:-2]), RATE) == 22049
    whole = str(tmp_path / "whole.wav")
    with open(whole, "rb") as f:
        data = bytearray(f.read())
    assert data[36:40] == b"data"  # a 44-byte header: the RIFF size at 4, the data size at 40
    for placeholder in (0xFFFFFFFF, 0x7FFFF000):
        data[4:8] = data[40:44] = placeholder.to_bytes(4, "little")
        streamed = write_bytes(tmp_path / "streamed.wav", bytes(data))
        assert audio_length(streamed, RATE) == 22050
        assert torch.equal(load_audio(streamed, RATE), load_audio(whole, RATE))


@pytest.mark.parametrize(
    "audio_format,subtype,extension,claim",
    [
        ("RF64", "PCM_16", "wav", r"its header claims 22050 samples and the file holds 1\d{4} \(50%\)"),
        ("RF64", "FLOAT", "wav", r"its header claims 22050 samples"),
        ("W64", "PCM_24", "w64", r"its header claims 66\d{3} bytes and the file holds 33\d{3} \(50%\)"),
        ("WAVEX", "PCM_16", "wav", r"its header claims 44100 bytes of audio"),
        ("FLAC", "PCM_16", "flac", r"its header says it holds 22050 samples, and the last cannot be read"),
        ("FLAC", "PCM_24", "flac", r"and the last cannot be read"),
    ],
)
def test_a_truncated_file_of_another_container_is_refused(tmp_path, audio_format, subtype, extension, claim):
    """RF64 and Wave64 say what is missing in other lines of libsndfile's log than a WAV's data chunk; a FLAC
    cut short keeps its header's sample count and fails only where its audio stops. Whole, each is read."""
    clip = (np.random.default_rng(0).standard_normal(22050) * 0.1).astype(np.float32)
    whole = str(tmp_path / f"whole.{extension}")
    soundfile.write(whole, clip, RATE, format=audio_format, subtype=subtype)
    assert audio_length(whole, RATE) == 22050
    assert load_audio(whole, RATE).shape == (22050,)
    with open(whole, "rb") as f:
        data = f.read()
    cut = write_bytes(tmp_path / f"cut.{extension}", data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"cut.{extension}: is truncated.*{claim}"):
        audio_length(cut, RATE)
    with pytest.raises(DataError, match=rf"cut.{extension}: is truncated"):
        load_audio(cut, RATE, start=100, length=1000)


def test_a_wav_whose_data_size_was_never_written_is_refused_naming_that(tmp_path):
    """A writer that leaves the data chunk's size for later (0) and stops before writing it: libsndfile reads
    no samples, though the audio follows. A WAV that truly holds none, with a chunk after its data, is empty."""
    soundfile.write(str(tmp_path / "whole.wav"), np.zeros(1000, np.int16), RATE)
    with open(tmp_path / "whole.wav", "rb") as f:
        data = f.read()
    assert data[36:40] == b"data"  # a 44-byte header, the data size at 40
    header = data[:40] + bytes(4)
    unfinished = write_bytes(tmp_path / "unfinished.wav", header + data[44:])
    with pytest.raises(DataError, match=r"unfinished.wav: its header says it holds no audio .* 2044 bytes long"):
        audio_length(unfinished, RATE)
    info = b"INFOISFT" + (4).to_bytes(4, "little") + b"test"
    chunk = b"LIST" + len(info).to_bytes(4, "little") + info
    body = header[12:] + chunk
    empty = write_bytes(tmp_path / "empty.wav", b"RIFF" + (4 + len(body)).to_bytes(4, "little") + b"WAVE" + body)
    with pytest.raises(DataError, match=r"empty.wav: contains no audio samples"):
        audio_length(empty, RATE)


@pytest.mark.parametrize("subtype", ["GSM610", "G721_32"])
def test_a_wav_libsndfile_cannot_seek_in_is_read_in_parts(tmp_path, subtype):
    """GSM 6.10 and G.721 in a WAV (telephony corpora) can only be read from the start."""
    path = str(tmp_path / "phone.wav")
    soundfile.write(
        path, (np.random.default_rng(0).standard_normal(22050) * 0.1).astype(np.float32), RATE, subtype=subtype
    )
    whole = load_audio(path, RATE)
    assert whole.shape[0] == audio_length(path, RATE) >= 22050
    assert torch.equal(load_audio(path, RATE, start=1000, length=4000), whole[1000:5000])
    assert torch.equal(load_audio(path, RATE, start=20000), whole[20000:])


def tiny_checkpoint(folder, name="waveflow_2", **changes):
    """A checkpoint of write_config's model (untrained), with the config it stores."""
    config_path = write_config(folder, name=f"{name}.json", **changes)
    raw = json.load(open(config_path))
    model = build_model(raw["waveflow_config"])
    path = os.path.join(folder, name)
    torch.save({"model": model.state_dict(), "iteration": 2, "config": raw}, path)
    return path, model


def test_synthesis_refuses_inputs_whose_outputs_would_overwrite_each_other(tmp_path, capsys):
    folder = str(tmp_path)
    config = write_config(folder)
    checkpoint, _ = tiny_checkpoint(folder)
    mel = torch.zeros(80, 16) - 5.0
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        np.save(tmp_path / sub / "x.npy", mel.numpy())
    a, b = str(tmp_path / "a" / "x.npy"), str(tmp_path / "b" / "x.npy")
    status, _, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", checkpoint, "--mels", a, b)
    assert status == 1
    assert err.strip() == (
        f"error: '{a}' and '{b}' would both be written to x_synthesis.wav; rename one, or give them in separate runs"
    )
    assert not os.path.exists(os.path.join(folder, "exp", "samples", "tiny"))  # nothing synthesized
    status, _, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", checkpoint, "--mels", a, a)
    assert status == 0, err  # the same file twice is no clash
    assert os.listdir(os.path.join(folder, "exp", "samples", "tiny")) == ["x_synthesis.wav"]


def test_clips_of_one_name_in_two_folders_do_not_share_a_stored_mel(tmp_path):
    make_corpus(str(tmp_path), n_train=1, n_test=0)
    clips = []
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        clips.append(str(tmp_path / sub / "001.wav"))
        os.link(tmp_path / "clip00.wav", clips[-1])
    both = write_bytes(tmp_path / "both.txt", "\n".join(clips).encode())
    with pytest.raises(DataError, match="would both be written to 001.wav.pt"):  # mel2samp.py refuses them
        write_mels(str(both), write_config(str(tmp_path)), str(tmp_path / "mels"))
    write_mels(
        str(write_bytes(tmp_path / "a.txt", clips[0].encode())), write_config(str(tmp_path)), str(tmp_path / "m")
    )
    data = load_config(write_config(str(tmp_path), data_config__mel_directory=str(tmp_path / "m"))).data
    with pytest.raises(DataError, match=r"001.wav' both find their mel in .*001.wav.pt; rename one"):
        Mel2Samp.from_config(data, mode="train", file_list=clips)


def test_checkpoints_that_would_compute_another_model_or_nan_are_refused(tmp_path, capsys):
    folder = str(tmp_path)
    make_corpus(folder, n_train=1, n_test=1)
    checkpoint, model = tiny_checkpoint(folder)  # n_height 8
    # n_height changes no tensor's shape: the stored config tells
    config = write_config(folder, waveflow_config__n_height=16, data_config__segment_length=4096)
    status, _, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", checkpoint)
    assert status == 1
    assert err.startswith(f"error: {checkpoint}: checkpoint was trained with waveflow_config n_height 8 where this")
    assert len(err.strip().splitlines()) == 1
    bipartized = write_config(folder, name="bi.json", waveflow_config__bipartize=True)
    status, _, err = run_here(capsys, "-v", "-c", bipartized, "--checkpoint_path", checkpoint)
    assert status == 1 and "bipartize false where this config has true" in err
    # other shapes as well: the architecture first (it named only n_height, as if that were the whole difference)
    wider = write_config(
        folder,
        name="wide.json",
        waveflow_config__n_height=16,
        data_config__segment_length=4096,
        waveflow_config__res_channels=16,
    )
    status, _, err = run_here(capsys, "-s", "-c", wider, "--checkpoint_path", checkpoint)
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {checkpoint}: checkpoint holds a ") and "res_channels 16" in err, err
    assert err.rstrip().endswith("; and it was trained with waveflow_config n_height 8 where this config has 16"), err

    state = model.state_dict()
    state["upsample_conv.0.bias"] = torch.full_like(state["upsample_conv.0.bias"], float("nan"))
    torch.save({"model": state}, tmp_path / "diverged")
    status, _, err = run_here(capsys, "-s", "-c", write_config(folder), "--checkpoint_path", str(tmp_path / "diverged"))
    assert status == 1 and "weight upsample_conv.0.bias holds NaN or infinite values" in err


def test_a_checkpoint_of_another_rate_or_mel_analysis_is_refused_but_warm_starts(tmp_path, capsys):
    """Same architecture, other features: nanoflow-16k.json and nanoflow-h16-r128-emb512.json differ only in
    data_config. Synthesis, evaluation, averaging and resuming refuse the checkpoint of the other; -w takes it."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    checkpoint, model = tiny_checkpoint(folder, data_config__sampling_rate=16000, data_config__mel_fmax=None)
    stored = torch.load(checkpoint, weights_only=True)
    stored["optimizer"] = torch.optim.Adam(model.parameters()).state_dict()  # resumable
    torch.save(stored, checkpoint)
    config = write_config(folder)  # 22,050 Hz, mel_fmax 8000 (the Nyquist frequency at 16 kHz)
    wanted = "checkpoint was trained on data_config sampling_rate 16000 where this config has 22050: other audio"
    for args in (("-s",), ("-v",)):
        status, _, err = run_here(capsys, *args, "-c", config, "--checkpoint_path", checkpoint)
        assert (
            status == 1
            and err
            == f"error: {checkpoint}: {wanted} and mels than it learned (use its config, "
            "or -w/--warm_start to fine-tune from it)\n"
        )
    status, _, err = run_here(capsys, "-s", "-a", "1", "-c", config, "--checkpoint_path", folder)
    assert status == 1 and wanted in err
    status, _, err = run_here(capsys, "-c", config, "--checkpoint_path", checkpoint)  # resume
    assert status == 1 and wanted in err and len(err.strip().splitlines()) == 1
    fmax = write_config(folder, name="fmax.json", data_config__mel_fmax=7600.0)
    status, _, err = run_here(capsys, "-s", "-c", fmax, "--checkpoint_path", tiny_checkpoint(folder, "other")[0])
    assert status == 1 and "data_config mel_fmax 8000 where this config has 7600" in err
    warm = write_config(folder, name="warm.json", train_config__max_iterations=4)
    status, out, err = run_here(capsys, "-w", "-c", warm, "--checkpoint_path", checkpoint)
    assert status == 0 and "warm start from" in out, err
    # The same features written otherwise: null is the Nyquist frequency, 22050.0 is 22050.
    same, _ = tiny_checkpoint(folder, "same", data_config__sampling_rate=22050.0, data_config__mel_fmax=8000)
    status, _, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", same)
    assert status == 0, err


def test_config_warnings_are_said_once_under_torchrun(tmp_path, capsys, monkeypatch):
    """Every process reads the config; rank 0 says its warnings, and an error is every rank's."""
    config = write_config(str(tmp_path), waveflow_config__coupling_type="waveflow")  # size_flow_embed: ignored
    for rank, warned in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        train.read_config(config)
        assert ("size_flow_embed (4) is ignored" in capsys.readouterr().err) == warned
    with pytest.raises(ConfigError, match="learning_rte"):
        train.read_config(write_config(str(tmp_path), name="bad.json", train_config__learning_rte=1))


@pytest.mark.parametrize("args", [(), ("-s",)])
def test_ctrl_c_before_training_starts_or_in_synthesis_is_one_line(tmp_path, capsys, monkeypatch, args):
    """Training's own handler (a checkpoint, then a clean exit) starts with the first step; before it, and in
    -s or -v, Ctrl-C ends the command with one line, not a traceback."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    checkpoint, _ = tiny_checkpoint(folder)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "synthesize" if args else "build_training", interrupted)
    status, _, err = run_here(capsys, *args, "-c", write_config(folder), "--checkpoint_path", checkpoint)
    assert status == 130 and err == "interrupted (Ctrl-C); files written so far are whole\n"


def test_a_warm_start_that_ends_before_its_source_says_why_nothing_trains(tmp_path, capsys):
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    checkpoint, _ = tiny_checkpoint(folder)  # iteration 2
    config = write_config(folder, name="warm.json", train_config__max_iterations=2)
    status, out, _ = run_here(capsys, "-w", "-c", config, "--checkpoint_path", checkpoint)
    assert status == 0 and "nothing to train: the run is at iteration 2, its end is iteration 2" in out
    assert "-w and -a number on from their source's iteration 2: an end past it trains" in out


@pytest.mark.parametrize(
    "args",
    [
        ("-s", "-t", "nan"),
        ("-s", "-t", "inf"),
        ("-s", "--denoise", "nan"),
        ("-s", "--denoise", "inf"),
        ("--max_minutes", "nan"),
        ("-s", "-w"),
        ("-v", "--max_iterations", "3"),
        ("-s", "--max_minutes", "1"),
    ],
)
def test_flags_that_are_not_numbers_or_do_not_apply_are_refused(args, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["-c", "config.json", *args])
    assert stopped.value.code == 2
    assert ": error: " in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_error_in_a_dataloader_worker_is_one_line(tmp_path):
    """PyTorch raises a worker's exception again in the main process with the worker's traceback in its
    message; train.py prints the worker's own message."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=4, n_test=1)
    config = write_config(folder, data_config__num_workers=1, train_config__max_iterations=4)
    clip = os.path.join(folder, "clip01.wav")  # a training clip whose header is good and samples are NaN
    soundfile.write(clip, np.full(8000, np.nan, np.float32), RATE, subtype="FLOAT")
    result = run("-c", config, check=False)  # a process of its own: DataLoader workers fork
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {clip}: contains NaN or infinite samples"
    assert "Traceback" not in result.stderr


def test_synthesis_and_evaluation_do_not_warn_about_training_precision(monkeypatch, capsys):
    monkeypatch.setattr(train, "has_bf16_matrix_units", lambda device: False)
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.json"))
    assert config.train.bf16_run
    train.setup_runtime(config, "cpu", training=False)
    assert "bf16_run" not in capsys.readouterr().err
    train.setup_runtime(config, "cpu")
    assert "bf16_run: this CPU has no bf16 instructions" in capsys.readouterr().err


def test_weights_saved_by_hand_are_a_checkpoint(tmp_path, capsys):
    """torch.save(model.state_dict(), path), as the Python API hands the weights out, or under "state_dict"."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=1, n_test=1)
    config = write_config(folder)
    state = build_model(json.load(open(config))["waveflow_config"]).state_dict()
    for name, saved in (("bare", state), ("wrapped", {"state_dict": state, "epoch": 3})):
        torch.save(saved, tmp_path / name)
        status, out, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", str(tmp_path / name))
        assert status == 0 and "clip01_synthesis.wav" in out, err
    torch.save({"epoch": 3}, tmp_path / "nothing")
    status, _, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", str(tmp_path / "nothing"))
    assert status == 1 and "not a NanoFlow checkpoint (no 'model' weights)" in err


def test_evaluation_says_its_json_path_cannot_be_written_before_measuring(tmp_path, capsys):
    folder = str(tmp_path)
    make_corpus(folder, n_train=1, n_test=1)
    checkpoint, _ = tiny_checkpoint(folder)
    target = str(tmp_path / "missing" / "measures.json")
    status, out, err = run_here(
        capsys, "-v", "-c", write_config(folder), "--checkpoint_path", checkpoint, "--json", target
    )
    assert (
        status == 1
        and err.strip() == f"error: {target}: cannot write the measures there (a folder, or no writable folder)"
    )
    assert "log-likelihood" not in out.lower() and "LL" not in out  # nothing measured


def test_a_float_wav_written_at_16_bit_scale_is_refused(tmp_path):
    """scipy.io.wavfile.write of int16-scaled floats: a peak of thousands is no audio in [-1, 1]; a little
    over 1 (a float file's headroom) is kept."""
    t = np.arange(8000) / RATE
    loud = str(tmp_path / "scaled.wav")
    soundfile.write(loud, (np.sin(2 * np.pi * 220 * t) * 20000).astype(np.float32), RATE, subtype="FLOAT")
    with pytest.raises(DataError, match=r"scaled.wav: float samples reach 2e\+04, far outside \[-1, 1\]"):
        load_audio(loud, RATE)
    hot = str(tmp_path / "hot.wav")
    soundfile.write(hot, (np.sin(2 * np.pi * 220 * t) * 1.05).astype(np.float32), RATE, subtype="FLOAT")
    assert float(load_audio(hot, RATE).abs().max()) > 1.0


def test_a_config_key_given_twice_is_refused(tmp_path):
    """JSON keeps the last of two equal keys without a word: `"batch_size": 2, ..., "batch_size": 8`."""
    config = write_config(str(tmp_path))
    text = open(config).read().replace('"epochs": 2,', '"epochs": 2, "epochs": 3,')
    write_bytes(tmp_path / "twice.json", text.encode())
    with pytest.raises(ConfigError, match="twice.json: key 'epochs' appears twice in one object"):
        load_config(str(tmp_path / "twice.json"))


def test_measuring_a_mel_whose_audio_two_test_clips_could_be_is_refused(tmp_path, capsys):
    """-v --mels finds a mel's recording by its name among the test clips: two clips of that name in two
    folders leave it ambiguous."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=1, n_test=1)
    clips = []
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        clips.append(str(tmp_path / sub / "clip01.wav"))
        os.link(tmp_path / "clip01.wav", clips[-1])
    write_bytes(tmp_path / "test.txt", "\n".join(clips).encode())
    write_mels(str(write_bytes(tmp_path / "one.txt", clips[0].encode())), write_config(folder), str(tmp_path / "mels"))
    checkpoint, _ = tiny_checkpoint(folder)
    mel = str(tmp_path / "mels" / "clip01.wav.pt")
    status, _, err = run_here(capsys, "-v", "-c", write_config(folder), "--checkpoint_path", checkpoint, "--mels", mel)
    assert status == 1
    assert f"error: {mel}: its audio is ambiguous: " in err and clips[0] in err and clips[1] in err


def test_mel_channels_that_cover_no_stft_bin_are_one_warning_naming_them(tmp_path, capsys):
    """128 mels on a 256-point FFT: librosa's multi-line warning, once per filterbank built, becomes one line
    of ours, once per command."""
    make_corpus(str(tmp_path), n_train=1, n_test=1)
    test_list = str(tmp_path / "test.txt")
    changes = {"data_config__filter_length": 256, "data_config__win_length": 256}
    crowded = write_config(str(tmp_path), name="crowded.json", data_config__n_mel_channels=128, **changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert write_mels(test_list, crowded, str(tmp_path / "mels")) == 1
    assert not caught
    err = capsys.readouterr().err
    assert err.count("warning: data_config: 26 of 128 mel channels (0, 1, 4, 5, 8, 9, 12, 15, ...) cover no STFT") == 1
    assert "filter_length 256 and sampling_rate 22050" in err and "Empty filters" not in err
    assert write_mels(test_list, write_config(str(tmp_path)), str(tmp_path / "mels80")) == 1
    assert "warning" not in capsys.readouterr().err
    # train.py says it once, before its work, whatever the command
    model_changes = {"waveflow_config__cin_channels": 128, "data_config__n_mel_channels": 128}
    checkpoint, _ = tiny_checkpoint(
        str(tmp_path), "crowded", data_config__filter_length=256, data_config__win_length=256, **model_changes
    )
    config = write_config(str(tmp_path), name="crowded_model.json", **changes, **model_changes)
    mel = str(tmp_path / "mels" / os.listdir(tmp_path / "mels")[0])
    status, _, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", checkpoint, "--mels", mel)
    assert status == 0, err
    assert err.count("warning: data_config: 26 of 128 mel channels") == 1 and "Empty filters" not in err


def test_synthesis_writes_where_output_dir_says_and_refuses_a_file_there(tmp_path, capsys):
    folder = str(tmp_path)
    config = write_config(folder)
    checkpoint, _ = tiny_checkpoint(folder)
    mel = str(tmp_path / "utterance.npy")
    np.save(mel, np.zeros((80, 16), np.float32) - 5.0)
    wanted = tmp_path / "tts" / "wavs"  # not there yet: made
    status, out, _ = run_here(
        capsys, "-s", "-c", config, "--checkpoint_path", checkpoint, "--mels", mel, "-o", str(wanted)
    )
    assert status == 0 and os.listdir(wanted) == ["utterance_synthesis.wav"]
    assert soundfile.info(str(wanted / "utterance_synthesis.wav")).frames == 13 * 256  # hop * (frames - 3)
    assert str(wanted / "utterance_synthesis.wav") in out
    assert not os.path.exists(os.path.join(folder, "exp", "samples"))  # not the default folder
    (tmp_path / "taken").write_text("a file of the user's")
    for target in (tmp_path / "taken", tmp_path / "taken" / "below"):
        status, _, err = run_here(
            capsys, "-s", "-c", config, "--checkpoint_path", checkpoint, "--mels", mel, "-o", str(target)
        )
        assert status == 1 and len(err.strip().splitlines()) == 1 and err.startswith(f"error: {target}: ")
    assert (tmp_path / "taken").read_text() == "a file of the user's"
    with pytest.raises(SystemExit) as exit_:
        train.main(["-v", "-c", config, "-o", str(wanted)])
    assert exit_.value.code == 2 and "-o/--output_dir goes with -s/--synthesize" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, options, suggestion",
    [
        ("train", ["-c", "configs/demo.json", "--checkpoint_pth", "x"], "did you mean --checkpoint_path?"),
        ("train", ["-c", "configs/demo.json", "--denoize=0.5"], "did you mean --denoise?"),
        ("bench", ["-c", "configs/demo.json", "--matmul_sise", "64"], "did you mean --matmul_size?"),
        ("export", ["-c", "configs/demo.json", "--opsett", "17", "-o", "x.onnx"], "did you mean --opset?"),
        ("mel2samp", ["-c", "configs/demo.json", "--file_lists", "x", "-f", "l", "-o", "m"], "--filelist_path?"),
        ("mel2samp", ["-c", "configs/demo.json", "--quiet", "-f", "l", "-o", "m"], None),  # none close: no guess
    ],
)
def test_a_misspelt_option_is_refused_naming_the_closest_one(capsys, monkeypatch, command, options, suggestion):
    """As a misspelt config key gets "did you mean": argparse named only the unknown option."""
    import importlib

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    module = importlib.import_module(command)
    with pytest.raises(SystemExit) as stopped:
        module.main(options)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and "unrecognized arguments: " + options[2].partition("=")[0] in error, error
    assert error.endswith(suggestion) if suggestion else "did you mean" not in error, error
