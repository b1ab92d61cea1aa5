"""scripts/: bad input ends a script with one line naming it."""

import importlib.util
import json
import os

import numpy as np
import soundfile

from conftest import ROOT


def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_synthesis_names_a_recording_too_short_to_synthesize_and_measure(tmp_path, capsys):
    recording = str(tmp_path / "short.wav")
    soundfile.write(recording, (0.3 * np.sin(np.arange(1500) / 5) * 32767).astype(np.int16), 22050, subtype="PCM_16")
    status = script("plot_synthesis").main(
        [
            recording,
            "-c",
            os.path.join(ROOT, "configs", "demo.json"),
            "--checkpoint_path",
            os.path.join(ROOT, "pretrained", "nanoflow-demo.pt"),
            "-o",
            str(tmp_path / "plot.png"),
        ]
    )
    assert status == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {recording}: a recording of 1500 samples, its synthesis of "
        f"768 samples is too short to measure (need at least 1025)"
    )
    assert not os.path.exists(tmp_path / "plot.png")


def test_precision_check_leaves_out_test_clips_too_short_and_says_so(tmp_path, capsys):
    recording = str(tmp_path / "short.wav")
    soundfile.write(recording, (0.3 * np.sin(np.arange(1000) / 5) * 32767).astype(np.int16), 22050, subtype="PCM_16")
    (tmp_path / "test.txt").write_text(recording + "\n")
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        config = json.load(f)
    config["data_config"]["test_files"] = str(tmp_path / "test.txt")
    (tmp_path / "config.json").write_text(json.dumps(config))
    status = script("precision_check").main(
        ["-c", str(tmp_path / "config.json"), "--checkpoint_path", os.path.join(ROOT, "pretrained", "nanoflow-demo.pt")]
    )
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{recording}: its synthesis of 256 samples is too short to compare (need more than 512): left out",
        f"error: {tmp_path / 'test.txt'}: no test clip is long enough to compare",
    ]


def test_profile_synthesis_times_and_groups_the_row_step(tmp_path, capsys, one_thread):
    out = tmp_path / "profile.json"
    config = os.path.join(ROOT, "configs", "demo.json")
    argv = ["-c", config, "--seconds", "0.05", "--warmup", "0", "--repeats", "1", "--json", str(out)]
    assert script("profile_synthesis").main(argv) == 0
    figures = json.loads(out.read_text())
    assert abs(sum(figures["shares"].values()) - 1) < 1e-6
    # The row step is matrix products and the gate chain; both must show up, by the row step's own ops.
    assert figures["shares"]["matrix products"] > 0.2
    assert figures["shares"]["gate chain"] > 0
    names = {op["name"] for op in figures["operators"]}
    assert "aten::addmm_" in names and "aten::sigmoid_" in names  # batch 1: the side taps accumulate by addmm_
    assert figures["kHz"] > 0 and 0 < figures["of_matmul"]
    assert "kHz" in capsys.readouterr().out
    assert script("profile_synthesis").main(["-c", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
