"""scripts/device_session.sh on the CPU (DEVICE=cpu): every step runs, and what comes back fits the
device tool (at most 8 files of at most 16 MiB, none in a subfolder), the summary printed last."""

import json
import os
import signal
import subprocess
import tarfile
import time

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow  # the whole script, training and measuring included


def test_device_session_runs_every_step_on_the_cpu_and_brings_back_a_checkpoint(tmp_path):
    with open(os.path.join(ROOT, "configs", "demo-long.json")) as f:
        config = json.load(f)
    config["waveflow_config"].update(res_channels=8, n_layer=2, n_layer_per_cycle=2, n_flow=2, size_flow_embed=8)
    config["train_config"].update(checkpoint_path="", iters_per_checkpoint=5, bf16_run=False, max_iterations=0)
    config["data_config"]["num_workers"] = 0
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(config))
    out = tmp_path / "out"
    environment = dict(
        os.environ,
        DEVICE="cpu",
        TRAIN_CONFIG=str(tiny),
        PROFILE_CONFIG=str(tiny),
        TRAIN_MINUTES="0.3",
        AMP_PROBE=str(tmp_path / "no-probe"),
        STEPS="env tests profile bench train measure",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "device_session.sh"), str(out), "4"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for step in ("cuda_tests", "profile_fp32", "profile_bf16", "profile_demo", "bench_fp32", "train", "measure"):
        assert f"PASS {step}" in summary, summary
    assert result.stdout.rstrip().endswith(summary.rstrip())  # the summary comes last
    files = sorted(os.listdir(out))
    assert files == ["logs.tar.gz", "measures.json", "nanoflow-demo.pt", "summary.txt"]
    assert all((out / name).is_file() and (out / name).stat().st_size <= 16 * 2**20 for name in files)
    checkpoint = torch.load(out / "nanoflow-demo.pt", map_location="cpu", weights_only=False)
    assert checkpoint["iteration"] >= 1 and checkpoint["optimizer"]["state"]
    assert json.loads((out / "measures.json").read_text())["log_likelihood"]["clips"] == 12  # the held-out sentences
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = {os.path.basename(name) for name in logs.getnames()}
    assert {"train.log", "measure.log", "profile_fp32.json", "bench_fp32.json", "steps.txt"} <= names
    assert not any(name.startswith("waveflow_") for name in names)


def test_device_session_stopped_from_outside_has_brought_back_its_finished_steps(tmp_path):
    """The device tool stops a command at its limit (SIGKILL to the whole group, no trap runs): the steps
    done by then are in OUT already (summary.txt with their outcomes, logs.tar.gz with their logs)."""
    out = tmp_path / "out"
    environment = dict(
        os.environ, DEVICE="cpu", AMP_PROBE=str(tmp_path / "no-probe"), STEPS="env tests bench", OMP_NUM_THREADS="1"
    )
    environment["TMPDIR"] = str(tmp_path)  # the script's own folder, left behind by the kill
    process = subprocess.Popen(
        ["bash", os.path.join(ROOT, "scripts", "device_session.sh"), str(out), "4"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while "cuda_tests" not in (summary := read_or_empty(out / "summary.txt")) and time.monotonic() < deadline:
            assert process.poll() is None, "the script ended before its first step was recorded"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert "PASS cuda_tests" in summary and "interim summary" in summary, summary
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = {os.path.basename(name) for name in logs.getnames()}
    assert {"cuda_tests.log", "steps.txt", "environment.txt"} <= names


def read_or_empty(path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
