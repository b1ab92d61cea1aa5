"""scripts/: bad arguments, configs and checkpoints end a script with one `error:` line, before its work."""

import json
import os
import sys

import numpy as np
import pytest
import soundfile
import torch

from checkpoint import CheckpointError, check_fits
from conftest import ROOT
from model import build_model
from test_scripts import script

DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.json")
DEMO_CHECKPOINT = os.path.join(ROOT, "pretrained", "nanoflow-demo.pt")
HELDOUT_WAV = os.path.join(ROOT, "data", "demo", "heldout", "wavs", "demo_002.wav")


def demo_waveflow_config() -> dict:
    with open(DEMO_CONFIG) as f:
        return json.load(f)["waveflow_config"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """A checkpoint of another NanoFlow (res_channels 48), weights of another kind of model, a misspelt config."""
    folder = tmp_path_factory.mktemp("bad")
    section = dict(demo_waveflow_config(), res_channels=48)
    torch.save({"model": build_model(section).state_dict()}, folder / "other.pt")
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "conv.bias": torch.zeros(4)}, folder / "glow.pth")
    with open(DEMO_CONFIG) as f:
        config = json.load(f)
    config["train_config"]["learning_rte"] = config["train_config"].pop("learning_rate")
    (folder / "misspelt.json").write_text(json.dumps(config))
    (folder / "not_json.json").write_text("{not json")
    return folder


def one_error_line(capsys, *expected: str) -> str:
    """The only line of stderr, an `error:` line holding each of `expected`, with nothing on stdout (no header
    of a table that never comes)."""
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_a_checkpoint_of_another_kind_of_model_is_described_in_plain_words(bad_files):
    state = torch.load(bad_files / "glow.pth")
    with pytest.raises(CheckpointError) as raised:
        check_fits(build_model(demo_waveflow_config()), state, "glow.pth")
    message = str(raised.value)
    assert "glow.pth: checkpoint holds no WaveFlow/NanoFlow model, waveflow_config describes a nanoflow (" in message
    assert "not a WaveFlow/NanoFlow model model" not in message and ") model model" not in message


def test_a_checkpoint_of_another_nanoflow_names_both_models_once(bad_files):
    state = torch.load(bad_files / "other.pt")["model"]
    with pytest.raises(CheckpointError) as raised:
        check_fits(build_model(demo_waveflow_config()), state, "other.pt")
    message = str(raised.value)
    assert "other.pt: checkpoint holds a nanoflow (res_channels 48," in message
    assert "model, waveflow_config describes a nanoflow (res_channels " in message
    assert "model model" not in message


# --- denoise_check.py ---


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["-c", "nope.json"], "nope.json"),
        (["--checkpoint_path", "nope.pt"], "nope.pt: checkpoint not found"),
        (["--checkpoint_path", "{bad}/other.pt"], "checkpoint holds a nanoflow (res_channels 48"),
        (["--checkpoint_path", "{bad}/glow.pth"], "checkpoint holds no WaveFlow/NanoFlow model"),
        (["--files", "nope.txt"], "nope.txt: file list not found"),
        (["--threads", "0"], "--threads must be positive, got 0"),
        (["--temperature", "nan"], "--temperature must be positive, got nan"),
        (["--strengths", "0", "-1"], "--strengths: denoiser strength must be a finite number >= 0"),
        (["--strengths", "nan"], "--strengths: denoiser strength must be a finite number >= 0"),
    ],
)
def test_denoise_check_refuses_bad_input_in_one_line_before_synthesis(bad_files, capsys, arguments, expected):
    threads = torch.get_num_threads()
    arguments = [argument.replace("{bad}", str(bad_files)) for argument in arguments]
    assert script("denoise_check").main(arguments) == 1
    one_error_line(capsys, expected)
    assert torch.get_num_threads() == threads


# --- plot_synthesis.py ---


def plot_arguments(output: str, *extra: str) -> list[str]:
    return [HELDOUT_WAV, "-c", DEMO_CONFIG, "--checkpoint_path", DEMO_CHECKPOINT, "-o", output, *extra]


def test_plot_synthesis_refuses_a_folder_as_output_before_synthesis(tmp_path, capsys):
    assert script("plot_synthesis").main(plot_arguments(str(tmp_path))) == 1
    one_error_line(capsys, f"{tmp_path}: is a folder; name the PNG file to write")
    assert os.listdir(tmp_path) == []  # no .partial.png left


def test_plot_synthesis_refuses_an_output_in_a_missing_folder(tmp_path, capsys):
    output = str(tmp_path / "nodir" / "x.png")
    assert script("plot_synthesis").main(plot_arguments(output)) == 1
    one_error_line(capsys, f"{output}: folder {tmp_path / 'nodir'} does not exist")


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_plot_synthesis_refuses_a_temperature_that_is_not_positive(tmp_path, capsys, temperature):
    assert script("plot_synthesis").main(plot_arguments(str(tmp_path / "p.png"), "-t", temperature)) == 1
    one_error_line(capsys, "-t/--temp must be positive, got")


# --- precision_check.py ---


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--device", "bogus"], "--device bogus: not a device name"),
        (["-t", "nan"], "-t/--temp must be positive, got nan"),
        (["-t", "inf"], "-t/--temp must be positive, got inf"),
    ],
)
def test_precision_check_refuses_bad_arguments_in_one_line(capsys, extra, expected):
    arguments = ["-c", DEMO_CONFIG, "--checkpoint_path", DEMO_CHECKPOINT, *extra]
    assert script("precision_check").main(arguments) == 1
    one_error_line(capsys, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_precision_check_refuses_fp16_on_a_cpu_as_train_py_does(capsys):
    """A CPU emulates fp16, some ten times slower: train.py -s refuses it, and so does the check."""
    arguments = ["-c", DEMO_CONFIG, "--checkpoint_path", DEMO_CHECKPOINT, "--precision", "fp16"]
    assert script("precision_check").main(arguments) == 1
    one_error_line(capsys, "--precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")


# --- streaming_check.py ---


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["lookahead", "-c", "nope.json"], "nope.json"),
        (["lookahead", "-c", "{bad}/misspelt.json"], "learning_rte"),
        (["lookahead", "-c", DEMO_CONFIG, "--checkpoint_path", "{bad}/other.pt"], "holds a nanoflow (res_channels 48"),
        (["memory", "-c", DEMO_CONFIG, "--checkpoint_path", "{bad}/other.pt"], "holds a nanoflow (res_channels 48"),
        (["memory", "-c", "nope.json"], "nope.json"),
        (["lookahead", "-c", DEMO_CONFIG, "--chunk", "0"], "--chunk must be positive, got 0"),
        (["lookahead", "-c", DEMO_CONFIG, "--frames", "0"], "--frames must be positive, got 0"),
        (["lookahead", "-c", DEMO_CONFIG, "--sigma", "nan"], "--sigma must be positive, got nan"),
        (["lookahead", "-c", DEMO_CONFIG, "--threads", "0"], "--threads must be positive, got 0"),
        (["memory", "-c", DEMO_CONFIG, "--seconds", "-1"], "--seconds must be positive, got -1"),
        (["lookahead", "-c", DEMO_CONFIG, "--lookaheads", "2"], "--lookaheads must be at least 3"),
    ],
)
def test_streaming_check_refuses_bad_input_in_one_line_before_its_table(
    bad_files, capsys, one_thread, arguments, expected
):
    arguments = [argument.replace("{bad}", str(bad_files)) for argument in arguments]
    assert script("streaming_check").main(arguments) == 1
    one_error_line(capsys, expected)


def test_streaming_check_memory_passes_threads_and_sigma_and_relays_a_childs_error(monkeypatch, capsys, one_thread):
    module = script("streaming_check")
    commands = []

    def failing_child(command, **kwargs):
        commands.append(command)
        return module.subprocess.CompletedProcess(command, 1, stderr="error: the child's one line\n")

    monkeypatch.setattr(module.subprocess, "run", failing_child)
    arguments = ["memory", "-c", DEMO_CONFIG, "--seconds", "1", "2", "--threads", "1", "--sigma", "0.5"]
    assert module.main(arguments) == 1
    (command,) = commands  # the first failure ends the table
    assert command[command.index("--threads") + 1] == "1"
    assert float(command[command.index("--sigma") + 1]) == 0.5
    assert capsys.readouterr().err == "error: the child's one line\n"


def test_streaming_check_help_does_not_show_its_internal_child_mode(capsys):
    with pytest.raises(SystemExit):
        script("streaming_check").main(["--help"])
    help_text = capsys.readouterr().out
    assert "memory-child" not in help_text and "--child" not in help_text
    assert "lookahead" in help_text and "memory" in help_text


# --- time_resample.py ---


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["nope.wav"], "nope.wav"),
        ([HELDOUT_WAV, "--repeats", "0"], "--repeats must be positive, got 0"),
        ([HELDOUT_WAV, "--repeats", "-3"], "--repeats must be positive, got -3"),
        ([HELDOUT_WAV, "--rate", "0"], "--rate must be positive, got 0"),
        ([HELDOUT_WAV, "--rate", "-5"], "--rate must be positive, got -5"),
    ],
)
def test_time_resample_refuses_bad_input_in_one_line_before_its_header(capsys, arguments, expected):
    assert script("time_resample").main(arguments) == 1
    one_error_line(capsys, expected)


def test_time_resample_says_a_short_clip_is_timed_whole(tmp_path, capsys):
    clip = str(tmp_path / "short.wav")
    soundfile.write(clip, (0.3 * np.sin(np.arange(100) / 5) * 32767).astype(np.int16), 22050, subtype="PCM_16")
    assert script("time_resample").main([clip, "--repeats", "1", "--format", "wav"]) == 0
    out = capsys.readouterr().out
    assert "a crop of 100 samples from a clip of 100 samples (0.00 s) (wav), median of 1:" in out


# --- profile_synthesis.py ---


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--seconds", "nan"], "--seconds must be positive, got nan"),
        (["--seconds", "inf"], "--seconds must be positive, got inf"),
        (["--seconds", "0.001"], "--seconds 0.001 gives 0 samples, which must be positive"),
        (["--threads", "0"], "--threads must be positive, got 0"),
        (["--device", "bogus"], "--device bogus: not a device name"),
        (["--dtype", "fp16"], "--dtype fp16 needs a CUDA device"),
        (["--json", "{tmp}/nodir/p.json"], "{tmp}/nodir/p.json: folder {tmp}/nodir does not exist"),
        (["--json", "{tmp}"], "{tmp}: is a folder; name the JSON file to write"),
        (["-c", "nope.json"], "nope.json: config file not found"),
    ],
)
def test_profile_synthesis_refuses_bad_input_in_one_line_before_profiling(
    tmp_path, capsys, one_thread, extra, expected
):
    extra = [argument.replace("{tmp}", str(tmp_path)) for argument in extra]
    assert script("profile_synthesis").main(["-c", DEMO_CONFIG, *extra]) == 1
    one_error_line(capsys, expected.replace("{tmp}", str(tmp_path)))
    assert torch.get_num_threads() == 1


# --- profile_step.py ---


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["-c", "nope.json"], "nope.json: config file not found"),
        (["-c", "{bad}/misspelt.json"], "learning_rte"),
        (["-c", "{bad}/not_json.json"], "not_json.json: not valid JSON"),
        (["-c", DEMO_CONFIG, "--segment", "1000"], "--segment 1000 must be a multiple of waveflow_config.n_height"),
        (["-c", DEMO_CONFIG, "--device", "bogus"], "--device bogus: not a device name"),
        (["-c", DEMO_CONFIG, "--json", "{bad}/nodir/p.json"], "nodir/p.json: folder {bad}/nodir does not exist"),
        (["-c", DEMO_CONFIG, "--json", "{bad}"], "is a folder; name the JSON file to write"),
    ],
)
def test_profile_step_refuses_bad_input_in_one_line_before_profiling(bad_files, capsys, arguments, expected):
    arguments = [argument.replace("{bad}", str(bad_files)) for argument in arguments]
    assert script("profile_step").main(arguments) == 1
    one_error_line(capsys, expected.replace("{bad}", str(bad_files)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("name", ["profile_synthesis", "profile_step", "precision_check"])
def test_profiling_scripts_refuse_cuda_on_a_machine_without_it(capsys, name):
    arguments = ["-c", DEMO_CONFIG, "--device", "cuda"]
    if name == "precision_check":
        arguments += ["--checkpoint_path", DEMO_CHECKPOINT]
    assert script(name).main(arguments) == 1
    one_error_line(capsys, "--device cuda: this machine has no CUDA device")


# --- bench_onnx.py ---


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["-c", "nope.json"], "nope.json: config file not found"),
        (["-c", DEMO_CONFIG, "nope.json"], "nope.json: config file not found"),  # before the first config's run
        (["-c", DEMO_CONFIG, "{bad}/misspelt.json"], "learning_rte"),
        (["-c", DEMO_CONFIG, "--repeats", "0"], "--repeats must be positive, got 0"),
        (["-c", DEMO_CONFIG, "--seconds", "-1"], "--seconds must be positive, got -1"),
        (["-c", DEMO_CONFIG, "--seconds", "nan"], "--seconds must be positive, got nan"),
        (["-c", DEMO_CONFIG, "--threads", "2", "0"], "--threads must be positive, got 0"),
        (["-c", DEMO_CONFIG, "--max_seconds", "nan"], "--max_seconds must be >= 0, got nan"),
    ],
)
def test_bench_onnx_refuses_bad_input_in_one_line_before_any_export(bad_files, capsys, arguments, expected):
    arguments = [argument.replace("{bad}", str(bad_files)) for argument in arguments]
    assert script("bench_onnx").main(arguments) == 1
    one_error_line(capsys, expected)


def test_bench_onnx_without_onnxruntime_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    assert script("bench_onnx").main(["-c", DEMO_CONFIG]) == 1
    one_error_line(capsys, "scripts/bench_onnx.py needs the onnxruntime package: pip install -r requirements-onnx.txt")
