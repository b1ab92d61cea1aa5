"""train.py end to end, run as a user runs it, on a tiny corpus made here."""

import builtins
import contextlib
import errno
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader

import synthesis
import train
from checkpoint import average_checkpoints, list_checkpoints, read_checkpoint
from config import ConfigError, load_config
from mel2samp import Mel2Samp, collate, write_mels
from model import WaveFlow, build_model
from resumption import EpochSampler, WallClockLimit, training_batches
from runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
RATE = 22050

# Nearly every test here runs train.py in a subprocess or uses the `trained` run.
pytestmark = pytest.mark.slow


def make_corpus(folder, n_train=6, n_test=2):
    """Short tones with noise: enough for a model to have something to fit."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n_train + n_test):
        t = np.arange(int(RATE * (0.35 + 0.05 * index))) / RATE
        audio = 0.3 * np.sin(2 * np.pi * (200 + 40 * index) * t) + 0.01 * rng.standard_normal(t.size)
        path = os.path.join(folder, f"clip{index:02d}.wav")
        soundfile.write(path, (audio * 32767).astype(np.int16), RATE, subtype="PCM_16")
        paths.append(path)
    for name, chosen in (("train.txt", paths[:n_train]), ("test.txt", paths[n_train:])):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(chosen) + "\n")


def write_config(folder, name="config.json", **changes):
    config = {
        "train_config": {
            "fp16_run": False,
            "output_directory": os.path.join(folder, "exp"),
            "epochs": 2,
            "learning_rate": 1e-3,
            "lr_decay_step": 3,
            "lr_decay_gamma": 0.5,
            "sigma": 1.0,
            "iters_per_checkpoint": 2,
            "batch_size": 2,
            "seed": 1234,
            "checkpoint_path": "",
            "with_tensorboard": False,
        },
        "data_config": {
            "training_files": os.path.join(folder, "train.txt"),
            "test_files": os.path.join(folder, "test.txt"),
            "segment_length": 2048,
            "sampling_rate": RATE,
            "filter_length": 1024,
            "hop_length": 256,
            "win_length": 1024,
            "mel_fmin": 0.0,
            "mel_fmax": 8000.0,
            "num_workers": 0,
        },
        "dist_config": {"dist_backend": "nccl", "dist_url": "tcp://localhost:54321"},
        "waveflow_config": {
            "model_name": "tiny",
            "cin_channels": 80,
            "res_channels": 8,
            "n_height": 8,
            "n_layer": 2,
            "n_flow": 2,
            "n_layer_per_cycle": 1,
            "coupling_type": "nanoflow",
            "size_flow_embed": 4,
            "use_weightnorm_embed": "False",
        },
    }
    for section_key, value in changes.items():
        section, key = section_key.split("__")
        config[section][key] = value
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def run_here(capsys, *args):
    """train.py's main in this process (no start-up cost): -> (exit status, stdout, stderr)."""
    status = train.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def run(*args, check=True, env=None):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def weights(path):
    return read_checkpoint(path)["model"]


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests that need a trained model: 3 batches per
    epoch, 2 epochs, a checkpoint every 2 iterations."""
    folder = str(tmp_path_factory.mktemp("run"))
    make_corpus(folder)
    config = write_config(folder, data_config__num_workers=1, train_config__with_tensorboard=True)
    result = run("-c", config)
    return folder, config, result


def test_training_writes_checkpoints_logs_and_samples(trained):
    folder, _, result = trained
    run_dir = os.path.join(folder, "exp", "tiny")
    assert [it for it, _ in list_checkpoints(run_dir)] == [2, 4, 6]
    checkpoint = read_checkpoint(os.path.join(run_dir, "waveflow_6"))
    for key in ("model", "iteration", "optimizer", "scheduler", "learning_rate"):  # the original's keys
        assert key in checkpoint
    assert checkpoint["iteration"] == 6 and checkpoint["scheduler"]["last_epoch"] == 6
    assert checkpoint["config"]["waveflow_config"]["model_name"] == "tiny"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "logs")))
    assert os.path.isfile(os.path.join(run_dir, "config.json"))
    samples = os.listdir(os.path.join(folder, "exp", "samples", "tiny"))
    assert sorted(samples) == ["clip06_iter2.wav", "clip06_iter4.wav", "clip06_iter6.wav"]
    assert "test loss" in result.stdout
    assert not any(name.endswith(".partial") for name in os.listdir(run_dir))


def test_resume_mid_epoch_matches_an_uninterrupted_run(trained, tmp_path, capsys, one_thread):
    folder, config, _ = trained
    uninterrupted = os.path.join(folder, "exp", "tiny")
    # Interrupted run: keep only the checkpoint of iteration 2, in the middle of epoch 0 (3 batches).
    output = str(tmp_path / "exp")
    os.makedirs(os.path.join(output, "tiny"))
    shutil.copy(os.path.join(uninterrupted, "waveflow_2"), os.path.join(output, "tiny", "waveflow_2"))
    resumed = write_config(
        folder,
        "resume.json",
        data_config__num_workers=0,
        train_config__output_directory=output,
        train_config__checkpoint_path=os.path.join(output, "tiny", "waveflow_2"),
    )
    result = run("-c", resumed)
    assert "resumed from" in result.stdout
    for iteration in (4, 6):
        assert_same_weights(
            weights(os.path.join(output, "tiny", f"waveflow_{iteration}")),
            weights(os.path.join(uninterrupted, f"waveflow_{iteration}")),
        )
    # The same command again names an older checkpoint of this run folder: it goes on from the newest.
    status, out, err = run_here(capsys, "-c", resumed)
    assert status == 0, err
    assert "resuming from the newest, waveflow_6 (not " in out and "nothing to train" in out
    # A checkpoint from elsewhere still wins; training from it would overwrite newer ones: refused.
    elsewhere = write_config(
        folder,
        "again.json",
        train_config__output_directory=output,
        train_config__checkpoint_path=os.path.join(uninterrupted, "waveflow_2"),
    )
    status, out, err = run_here(capsys, "-c", elsewhere)
    assert status == 1 and "already holds checkpoints after iteration 2" in err and len(err.strip().splitlines()) == 1


def test_synthesize_writes_one_wav_per_test_clip(trained):
    folder, config, _ = trained
    result = run(
        "-s", "-t", "0.6", "-c", config, "--checkpoint_path", os.path.join(folder, "exp", "tiny", "waveflow_6")
    )
    out = os.path.join(folder, "exp", "samples", "tiny")
    for name in ("clip06_synthesis.wav", "clip07_synthesis.wav"):
        info = soundfile.info(os.path.join(out, name))
        assert info.samplerate == RATE and info.subtype == "PCM_16" and info.channels == 1
        assert name in result.stdout
    assert "kHz" in result.stdout and "x real time" in result.stdout


def test_synthesis_precision_is_chosen_on_the_command_line_and_said(trained):
    folder, config, _ = trained
    checkpoint = ["--checkpoint_path", os.path.join(folder, "exp", "tiny", "waveflow_6")]
    wav = os.path.join(folder, "exp", "samples", "tiny", "clip06_synthesis.wav")
    # auto: a model of 8 channels stays in fp32, where bf16 would not be faster
    assert "synthesis in fp32" in run("-s", "-t", "0.6", "-c", config, *checkpoint).stdout
    full = soundfile.read(wav)[0]
    result = run("-s", "-t", "0.6", "--precision", "bf16", "-c", config, *checkpoint)
    assert "synthesis in bf16" in result.stdout
    reduced = soundfile.read(wav)[0]
    assert reduced.shape == full.shape and 0 < np.abs(reduced - full).max() < 0.1
    refused = run("-s", "--precision", "fp16", "--device", "cpu", "-c", config, *checkpoint, check=False)
    assert (
        refused.returncode == 1
        and refused.stderr.strip() == "error: --precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU"
    )


def test_synthesize_from_precomputed_mels(trained, tmp_path):
    folder, config, _ = trained
    mels = tmp_path / "mels"
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "mel2samp.py"),
            "-f",
            os.path.join(folder, "test.txt"),
            "-c",
            config,
            "-o",
            str(mels),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    np.save(mels / "extra.npy", torch.load(mels / "clip06.wav.pt").numpy())
    output = str(tmp_path / "out")
    config = write_config(
        str(tmp_path),
        "mels.json",
        train_config__output_directory=output,
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )
    run("-s", "--mels", str(mels), "-c", config, "--checkpoint_path", os.path.join(folder, "exp", "tiny", "waveflow_6"))
    written = sorted(os.listdir(os.path.join(output, "samples", "tiny")))
    assert written == ["clip06_synthesis.wav", "clip07_synthesis.wav", "extra_synthesis.wav"]
    frames = torch.load(mels / "clip07.wav.pt").shape[-1]
    assert soundfile.info(os.path.join(output, "samples", "tiny", "clip07_synthesis.wav")).frames == 256 * (frames - 3)


def test_averaging_checkpoints(trained):
    folder, config, _ = trained
    run_dir = os.path.join(folder, "exp", "tiny")
    average, newest = average_checkpoints(run_dir, 2)
    assert newest["iteration"] == 6
    four, six = weights(os.path.join(run_dir, "waveflow_4")), weights(os.path.join(run_dir, "waveflow_6"))
    for name in average:
        assert torch.allclose(average[name], (four[name] + six[name]) / 2, atol=1e-6)
    polyak, _ = average_checkpoints(run_dir, 3, epsilon=0.9)
    two = weights(os.path.join(run_dir, "waveflow_2"))
    name = "estimator.net.res_blocks.0.filter_gate_conv.conv.weight_v"
    expected = 0.9 * (0.9 * two[name] + 0.1 * four[name]) + 0.1 * six[name]
    assert torch.allclose(polyak[name], expected, atol=1e-6)
    result = run("-a", "2", "-s", "-c", config, "--checkpoint_path", run_dir)
    assert "clip07_synthesis.wav" in result.stdout
    result = run("-a", "5", "-s", "-c", config, "--checkpoint_path", run_dir, check=False)
    assert result.returncode == 1 and "needs 5 checkpoints" in result.stderr
    assert "synthesis in" not in result.stdout  # the precision is said once the checkpoints loaded, not before


def test_evaluate_prints_the_log_likelihood(trained):
    folder, config, _ = trained
    result = run("-v", "-c", config, "--checkpoint_path", os.path.join(folder, "exp", "tiny", "waveflow_6"))
    line = result.stdout.strip().splitlines()[-1]
    nll = float(line.split("negative log-likelihood ")[1].split()[0])
    ll = float(line.split("log-likelihood (LL) ")[1])
    assert nll == pytest.approx(-ll) and np.isfinite(nll)


def test_the_test_log_likelihood_scores_dequantized_audio_when_training_does(tmp_path):
    """With `dequantize`, training and its test loss score audio plus one 16-bit step of noise: so
    does -v's log-likelihood of the whole test clips, while its measures compare against the recordings."""
    make_corpus(str(tmp_path))
    plain, noisy = (
        load_config(write_config(str(tmp_path), f"{name}.json", data_config__dequantize=on))
        for name, on in (("plain", False), ("noisy", True))
    )
    torch.manual_seed(0)
    model = build_model(plain).eval()
    cpu = torch.device("cpu")
    clean = synthesis.test_likelihood(model, plain, cpu, None)
    dequantized = synthesis.test_likelihood(model, noisy, cpu, None)
    assert clean is not None and dequantized is not None
    clips = Mel2Samp.from_config(noisy.data, mode="synthesis", seed=noisy.train.seed, dequantize=True)
    recordings = Mel2Samp.from_config(noisy.data, mode="synthesis", seed=noisy.train.seed)
    for index in range(len(clips)):
        difference = (clips[index][1] - recordings[index][1]).abs()
        assert 0 < difference.max() <= 0.5 / 32768
    nll, samples = synthesis.test_loss(model, clips, cpu, None, noisy.train.sigma, batch_size=1)
    assert dequantized["samples"] == clean["samples"] == samples
    # An untrained model's likelihood hardly moves with noise this small: the same sums, exactly.
    assert dequantized["negative_log_likelihood"] == nll != clean["negative_log_likelihood"]


def test_warm_start_loads_matching_weights_with_a_fresh_optimizer(trained, tmp_path):
    folder, _, _ = trained
    source = os.path.join(folder, "exp", "tiny", "waveflow_6")
    output = str(tmp_path / "exp")
    config = write_config(
        str(tmp_path),
        "warm.json",
        train_config__output_directory=output,
        train_config__checkpoint_path=source,
        train_config__epochs=1,
        train_config__iters_per_checkpoint=100,
        waveflow_config__size_flow_embed=6,
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )
    result = run("--warm_start", "-c", config)
    assert "warm start from" in result.stdout and "flow_embedding.weight (shape [2, 4] vs [2, 6])" in result.stdout
    [(iteration, path)] = list_checkpoints(os.path.join(output, "tiny"))
    assert iteration == 6 + 3  # numbering goes on after the source; 3 new steps
    checkpoint = read_checkpoint(path)
    assert checkpoint["scheduler"]["last_epoch"] == 3  # a fresh schedule
    assert all(state["step"] == 3 for state in checkpoint["optimizer"]["state"].values())  # a fresh Adam


def test_original_checkpoint_with_dataparallel_prefix_loads(tmp_path):
    fixture = torch.load(os.path.join(FIXTURES, "nanoflow-small.pt"), weights_only=False)
    checkpoint = fixture["checkpoint"]
    checkpoint["model"] = {f"module.{name}": value for name, value in checkpoint["model"].items()}
    path = str(tmp_path / "waveflow_1234")
    torch.save(checkpoint, path)
    make_corpus(str(tmp_path))
    # 3 batches per epoch: iteration 1234 is batch 1 of epoch 411, so epoch 412 ends at 1236.
    config_path = write_config(
        str(tmp_path),
        train_config__checkpoint_path=path,
        train_config__epochs=412,
        train_config__iters_per_checkpoint=1000,
        data_config__segment_length=4096,
        waveflow_config__res_channels=32,
        waveflow_config__n_height=16,
        waveflow_config__n_layer=4,
        waveflow_config__n_flow=4,
        waveflow_config__size_flow_embed=64,
    )
    result = run("-s", "-c", config_path)
    assert result.stdout.count("_synthesis.wav") == 2
    # Resuming the original's checkpoint (with its Adam state) continues its iteration count.
    result = run("-c", config_path)
    assert "resumed from" in result.stdout
    [(iteration, saved)] = list_checkpoints(os.path.join(str(tmp_path), "exp", "tiny"))
    assert iteration == 1236 and read_checkpoint(saved)["epoch"] == 412


def test_bad_inputs_give_one_line_errors(tmp_path):
    make_corpus(str(tmp_path))
    missing_list = write_config(str(tmp_path), "a.json", data_config__training_files=str(tmp_path / "nope.txt"))
    result = run("-c", missing_list, check=False)
    assert result.returncode == 1 and "nope.txt: file list not found" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    too_few = write_config(str(tmp_path), "few.json", train_config__batch_size=7)  # 6 training clips
    result = run("-c", too_few, check=False)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: {tmp_path / 'train.txt'}: 6 clips cannot fill one batch of 7 per process (1 process)"
    )
    assert not (tmp_path / "exp").exists()  # said before the run folder is made
    config = json.load(open(missing_list))
    config["train_config"]["learning_rte"] = 1e-3
    with open(tmp_path / "b.json", "w") as f:
        json.dump(config, f)
    result = run("-c", str(tmp_path / "b.json"), check=False)
    assert result.returncode == 1 and "unknown key 'learning_rte'; did you mean 'learning_rate'" in result.stderr
    result = run(
        "-s",
        "-c",
        write_config(str(tmp_path), "c.json", train_config__checkpoint_path=str(tmp_path / "x")),
        check=False,
    )
    assert result.returncode == 1 and "checkpoint not found" in result.stderr
    other = write_config(
        str(tmp_path), "d.json", train_config__checkpoint_path=os.path.join(FIXTURES, "waveflow-small.pt")
    )
    result = run("-s", "-c", other, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_non_finite_losses_stop_training_and_keep_the_last_checkpoint(trained, tmp_path):
    folder, _, _ = trained
    source = read_checkpoint(os.path.join(folder, "exp", "tiny", "waveflow_6"))
    # finite (a checkpoint holding NaN is refused on loading), but exp(log_s) overflows: every loss is inf
    source["model"]["flows.0.proj_log_s_t.conv.bias"][:] = 1e30
    output = tmp_path / "exp" / "tiny"
    output.mkdir(parents=True)
    torch.save(source, output / "waveflow_6")
    config = write_config(
        str(tmp_path),
        train_config__output_directory=str(tmp_path / "exp"),
        train_config__checkpoint_path=str(output / "waveflow_6"),
        train_config__max_bad_steps=3,
        train_config__epochs=10,
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )
    result = run("-c", config, check=False)
    assert result.returncode == 1
    assert "3 steps in a row skipped for a non-finite loss or gradient at iteration 9" in result.stderr
    assert result.stderr.count("step skipped") == 3
    assert [it for it, _ in list_checkpoints(str(output))] == [6]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    make_corpus(str(tmp_path))
    config = write_config(
        str(tmp_path),
        train_config__epochs=100000,
        train_config__iters_per_checkpoint=100000,
        data_config__num_workers=1,
    )
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "-c", config],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = ""
    deadline = time.time() + 120
    # A measured speed ("1.23it/s", not the "?it/s" of the bar drawn before the first step): the loop, and
    # its signal handler, have started.
    while not re.search(r"\d(it/s|s/it)", progress) and time.time() < deadline and process.poll() is None:
        assert process.stderr is not None
        progress += os.read(process.stderr.fileno(), 4096).decode()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    [(iteration, path)] = list_checkpoints(str(tmp_path / "exp" / "tiny"))
    assert iteration >= 1 and read_checkpoint(path)["iteration"] == iteration


def test_fp16_on_cpu_warns_and_trains_in_fp32(tmp_path):
    make_corpus(str(tmp_path))
    config = write_config(
        str(tmp_path), train_config__fp16_run=True, train_config__epochs=1, train_config__iters_per_checkpoint=100
    )
    result = run("-c", config)
    assert "fp16_run needs a CUDA device" in result.stderr
    [(_, path)] = list_checkpoints(str(tmp_path / "exp" / "tiny"))
    assert all(value.dtype == torch.float32 for value in weights(path).values())


@pytest.mark.parametrize("bf16_instructions", [False, True])
def test_bf16_run_trains_in_bf16_only_where_the_device_runs_it(tmp_path, monkeypatch, capsys, bf16_instructions):
    """On a CPU without bf16 instructions autocast emulates bf16 about 11x slower than fp32 (the demo's
    step, 2-core AVX2 EPYC): bf16_run there warns and trains in fp32. GPUs and bf16 CPUs keep bf16."""
    monkeypatch.setattr(train, "has_bf16_matrix_units", lambda device: bf16_instructions)
    config = load_config(write_config(str(tmp_path), train_config__bf16_run=True))
    runtime = train.setup_runtime(config, "cpu")
    warning = capsys.readouterr().err
    if bf16_instructions:
        assert runtime.amp_dtype == torch.bfloat16 and warning == ""
    else:
        assert runtime.amp_dtype is None
        assert "bf16_run: this CPU has no bf16 instructions" in warning and "training in fp32" in warning
    assert train.training_precision(config.train, torch.device("cuda")) == (torch.bfloat16, None)
    config.train.bf16_run, config.train.fp16_run = False, True
    assert train.training_precision(config.train, torch.device("cuda")) == (torch.float16, None)
    dtype, warning = train.training_precision(config.train, torch.device("cpu"))
    assert dtype is None and warning is not None and "fp16_run needs a CUDA device" in warning
    config.train.fp16_run = False
    assert train.training_precision(config.train, torch.device("cpu")) == (None, None)


def test_torchrun_two_processes_match_one_process_with_the_combined_batch(trained, tmp_path):
    folder, _, _ = trained
    common = dict(
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
        train_config__epochs=1,
        train_config__iters_per_checkpoint=100,
    )
    single = write_config(
        str(tmp_path),
        "single.json",
        train_config__batch_size=2,
        train_config__output_directory=str(tmp_path / "single"),
        **common,
    )
    double = write_config(
        str(tmp_path),
        "double.json",
        train_config__batch_size=1,
        train_config__output_directory=str(tmp_path / "ddp"),
        **common,
    )
    run("-c", single)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "train.py"),
        "-c",
        double,
    ]
    # Stopped after 2 iterations, then the same command again: every rank resumes from rank 0's choice.
    result = subprocess.run(
        torchrun + ["--max_iterations", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "resuming from the newest, waveflow_2" in result.stdout
    assert result.stdout.count("saved ") == 1  # only rank 0 writes
    [_, (iteration, ddp_path)] = list_checkpoints(str(tmp_path / "ddp" / "tiny"))
    [(_, single_path)] = list_checkpoints(str(tmp_path / "single" / "tiny"))
    assert iteration == 3
    assert_same_weights(weights(ddp_path), weights(single_path), atol=1e-5)
    assert read_checkpoint(ddp_path)["world_size"] == 2

    # One process of batch 1 goes on from the two processes' iteration 2, 4 clips into the epoch: at step
    # 4 of its 6, so that its epoch ends after the clips the two processes had left.
    halves = write_config(
        str(tmp_path),
        "halves.json",
        train_config__batch_size=1,
        train_config__output_directory=str(tmp_path / "halves"),
        train_config__checkpoint_path=str(tmp_path / "ddp" / "tiny" / "waveflow_2"),
        **common,
    )
    result = run("-c", halves)
    assert (
        "the checkpoint's run took 2 clips a step (1 x 2 processes), this one takes 1 clip a step (1 x 1 process): "
        "epoch 0 goes on at step 4, after the 4 clips of its order that run had taken" in result.stdout
    )
    assert [iteration for iteration, _ in list_checkpoints(str(tmp_path / "halves" / "tiny"))] == [4]


def test_a_resume_with_other_steps_goes_on_after_the_clips_the_checkpoints_run_had_taken(tmp_path):
    fives, ones = (
        load_config(write_config(str(tmp_path), f"{batch}.json", train_config__batch_size=batch)) for batch in (5, 1)
    )
    stored = {"train_config": {"batch_size": 2}}
    checkpoint = {"epoch": 3, "batch_in_epoch": 6, "world_size": 2, "config": stored}  # 6 steps of 2 x 2 clips
    assert train.steps_taken(checkpoint, fives, world_size=1) == (
        4,
        "the checkpoint's run took 4 clips a step (2 x 2 processes), this one takes 5 clips a step "
        "(5 x 1 process): epoch 3 goes on at step 4, after the 24 clips of its order that run had taken; "
        "the last 4 come again",
    )
    steps, line = train.steps_taken(checkpoint, fives, world_size=2)
    assert (
        steps == 2
        and line is not None
        and line.endswith("after the 24 clips of its order that run had taken; the last 4 come again")
    )
    assert train.steps_taken(checkpoint, ones, world_size=4) == (6, None)  # 1 x 4 clips a step: the same steps
    assert train.steps_taken({**checkpoint, "batch_in_epoch": 0}, fives, world_size=1) == (0, None)
    # Without a stored config the batch size is taken as this run's; without world_size (ours before it
    # was stored), the world size too.
    no_config = {"epoch": 3, "batch_in_epoch": 6, "world_size": 2}
    assert train.steps_taken(no_config, ones, world_size=1)[0] == 12
    assert train.steps_taken({"epoch": 3, "batch_in_epoch": 6}, ones, world_size=4) == (6, None)


def test_the_data_order_counts_the_clips_a_step_takes_and_stored_values_as_a_config_parses_them(tmp_path):
    """2 processes of batch 2 take the clips of 1 process of batch 4 step by step: its resume is exact, and
    says nothing. A stored batch size of 2.0 (JSON allows it, the config takes it) is the batch size 2."""
    fours = load_config(write_config(str(tmp_path), "4.json", train_config__batch_size=4))
    of_two = {"epoch": 0, "batch_in_epoch": 5, "world_size": 2, "config": {"train_config": {"batch_size": 2}}}
    assert train.data_order_changes(of_two, fours, world_size=1) is None
    assert train.steps_taken(of_two, fours, world_size=1) == (5, None)
    said = train.data_order_changes(of_two, fours, world_size=2)  # 8 clips a step now
    assert said is not None and said.startswith("the checkpoint's run had train_config.batch_size 2 where")
    as_float = {**of_two, "world_size": 1, "config": {"train_config": {"batch_size": 2.0, "seed": 1234.0}}}
    assert train.steps_taken(as_float, fours, world_size=1) == (
        2,
        "the checkpoint's run took 2 clips a step (2 x 1 process), this one takes 4 clips a step (4 x 1 process): "
        "epoch 0 goes on at step 2, after the 10 clips of its order that run had taken; the last 2 come again",
    )
    assert train.data_order_changes({**as_float, "world_size": 2}, fours, world_size=1) is None


def test_epoch_sampler_is_reproducible_and_resumable():
    sampler = EpochSampler(10, batch_size=3, seed=7)
    sampler.set_epoch(4)
    full = list(sampler)
    assert len(full) == 9 and len(set(full)) == 9
    sampler.set_epoch(4, skip_batches=2)
    assert list(sampler) == full[6:]
    sampler.set_epoch(5)
    assert list(sampler) != full
    shards = []
    for rank in range(2):
        shard = EpochSampler(10, batch_size=2, seed=7, rank=rank, world_size=2)
        shard.set_epoch(4)
        shards.append(list(shard))
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 4


def as_the_original_saves(checkpoint, config):
    """A checkpoint of ours as the original's training loop saves it after an in-training synthesis:
    its five keys, and for NanoFlow `model['h_cache']` [n_flow, n_layer, 2R, 1, 1], the output of every
    block's filter_gate_conv_h for each flow's embedding, flows in reversed order."""
    model = build_model(config["waveflow_config"])
    model.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        flow_embed = model.flow_embedding.normed_weight().flip(0)[:, :, None, None]  # [K, E, 1, 1]
        blocks = model.flow_parts(0)[0].res_blocks
        h_cache = torch.stack(
            [
                block.filter_gate_conv_h(flow_embed)
                for block in blocks  # [L, K, 2R, 1, 1]
                if block.filter_gate_conv_h is not None
            ]
        )
        assert len(h_cache) == len(blocks)
    saved = {key: checkpoint[key] for key in ("iteration", "optimizer", "scheduler", "learning_rate")}
    saved["model"] = dict(checkpoint["model"], h_cache=h_cache.permute(1, 0, 2, 3, 4).clone())
    return saved


def test_original_checkpoints_holding_h_cache_load_everywhere(trained, tmp_path, capsys, one_thread):
    folder, config_path, _ = trained
    uninterrupted = os.path.join(folder, "exp", "tiny")
    config = json.load(open(config_path))
    originals = tmp_path / "original"
    originals.mkdir()
    # The original's first checkpoint comes before any synthesis: no h_cache; the later ones hold it.
    first = read_checkpoint(os.path.join(uninterrupted, "waveflow_2"))
    torch.save(
        {key: first[key] for key in ("model", "iteration", "optimizer", "scheduler", "learning_rate")},
        originals / "waveflow_2",
    )
    torch.save(
        as_the_original_saves(read_checkpoint(os.path.join(uninterrupted, "waveflow_4")), config),
        originals / "waveflow_4",
    )
    raw = torch.load(originals / "waveflow_4", weights_only=True)
    assert raw["model"]["h_cache"].shape == (2, 2, 16, 1, 1) and "epoch" not in raw
    newest = str(originals / "waveflow_4")
    output = str(tmp_path / "exp")
    config_path = write_config(
        str(tmp_path),
        train_config__output_directory=output,
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )

    status, out, err = run_here(capsys, "-s", "-c", config_path, "--checkpoint_path", newest)
    assert status == 0, err
    assert out.count("_synthesis.wav") == 2
    status, out, err = run_here(capsys, "-v", "-c", config_path, "--checkpoint_path", newest)
    assert status == 0 and "log-likelihood (LL)" in out, err
    status, out, err = run_here(capsys, "-a", "2", "-s", "-c", config_path, "--checkpoint_path", str(originals))
    assert status == 0, err
    status, out, err = run_here(capsys, "-w", "-c", config_path, "--checkpoint_path", newest, "--max_iterations", "5")
    assert status == 0, err
    assert "0 not" in out and "h_cache" not in out  # every tensor loaded, h_cache not listed as left out
    # Resuming with the original's Adam state and schedule goes on exactly as the uninterrupted run did.
    shutil.rmtree(output)
    status, out, err = run_here(capsys, "-c", config_path, "--checkpoint_path", newest)
    assert status == 0, err
    assert f"resumed from {newest} at iteration 4" in out
    assert_same_weights(
        weights(os.path.join(output, "tiny", "waveflow_6")), weights(os.path.join(uninterrupted, "waveflow_6"))
    )


def test_rules_between_sections_stop_every_command_in_one_line(tmp_path, capsys):
    make_corpus(str(tmp_path))
    config = write_config(str(tmp_path), data_config__segment_length=2044)
    status, _, err = run_here(capsys, "-c", config)
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(
        f"error: {config}: data_config.segment_length (2044) must be a multiple of waveflow_config.n_height (8)"
    )
    config = write_config(str(tmp_path), "hop.json", data_config__hop_length=200)
    status, _, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", str(tmp_path / "none"))
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(
        f"error: {config}: data_config.hop_length (200) must equal the product of waveflow_config.upsample_factors "
        f"(16 x 16 = 256)"
    )


def test_fine_tuning_on_an_acoustic_models_mels(trained, tmp_path, capsys, one_thread):
    folder, trained_config, _ = trained
    mels = str(tmp_path / "mels")
    for listing in ("train.txt", "test.txt"):
        write_mels(os.path.join(folder, listing), trained_config, mels)
    source = os.path.join(folder, "exp", "tiny", "waveflow_6")
    common: dict[str, Any] = dict(
        train_config__output_directory=str(tmp_path / "exp"),
        train_config__iters_per_checkpoint=100,
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )
    config = write_config(str(tmp_path), data_config__mel_directory=mels, **common)
    status, out, err = run_here(capsys, "-w", "-c", config, "--checkpoint_path", source, "--max_iterations", "7")
    assert status == 0, err
    assert "saved" in out and list_checkpoints(str(tmp_path / "exp" / "tiny"))[-1][0] == 7
    status, out, err = run_here(capsys, "-v", "-c", config, "--checkpoint_path", source)
    assert status == 0 and "log-likelihood (LL)" in out, err
    os.remove(os.path.join(mels, "clip07.wav.pt"))
    status, _, err = run_here(capsys, "-v", "-c", config, "--checkpoint_path", source)
    assert status == 1 and err.strip() == (
        f"error: {os.path.join(mels, 'clip07.wav.pt')}: mel file not found "
        f"(the mel of {os.path.join(folder, 'clip07.wav')}; also looked for "
        f"clip07.wav.npy, clip07.pt, clip07.npy)"
    )
    os.remove(os.path.join(mels, "clip00.wav.pt"))
    status, _, err = run_here(capsys, "-c", config)
    assert status == 1 and err.startswith(f"error: {os.path.join(mels, 'clip00.wav.pt')}: mel file not found")


# ----------------------------------------------------------------------------- faults of long runs

# train.py's main with each checkpoint's rename delayed by $RENAME_DELAY seconds: its .partial file,
# whole and synced, waits on disk that long, time to kill the run in the middle of a checkpoint write.
SLOW_CHECKPOINT_WRITES = """
import os, sys, time
replace = os.replace
def slow_replace(source, target):
    if os.path.basename(source).startswith("waveflow_"):
        time.sleep(float(os.environ["RENAME_DELAY"]))
    replace(source, target)
os.replace = slow_replace
import train
sys.exit(train.main(sys.argv[1:]))
"""


def start_training(config, log, rename_delay=0.0):
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CHECKPOINT_WRITES, "-c", config],
        cwd=ROOT,
        stdout=open(log + ".out", "w"),
        stderr=open(log, "w"),
        env=dict(ONE_THREAD, RENAME_DELAY=str(rename_delay)),
    )


def wait_for(process, condition, timeout=120.0):
    """Poll until `condition()` holds (True) or the process ends (False)."""
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_at_random_moments_the_same_command_ends_as_an_uninterrupted_run(trained, tmp_path):
    folder, _, _ = trained
    uninterrupted = os.path.join(folder, "exp", "tiny")
    config = write_config(
        str(tmp_path),
        train_config__output_directory=str(tmp_path / "exp"),
        data_config__num_workers=1,
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )
    run_dir, log = tmp_path / "exp" / "tiny", str(tmp_path / "stderr.txt")
    writing = lambda iteration: (run_dir / f"waveflow_{iteration}.partial").exists  # noqa: E731
    stepping = lambda: "it/s" in open(log).read() or "s/it" in open(log).read()  # noqa: E731
    rng = random.Random(13)

    # During the first checkpoint write; meanwhile a second process is refused the run folder.
    process = start_training(config, log, rename_delay=60)
    assert wait_for(process, writing(2))
    before = sorted(os.listdir(run_dir))
    second = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "-c", config],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_THREAD,
    )
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1
    assert f"{run_dir}: another training process (pid {process.pid} on " in second.stderr
    assert sorted(os.listdir(run_dir)) == before
    kill(process)
    assert writing(2)() and not (run_dir / "waveflow_2").exists()
    # At a random moment of the training steps; during the write of waveflow_4, with waveflow_2 whole;
    # at a random moment of the whole run.
    process = start_training(config, log)
    if wait_for(process, stepping):
        time.sleep(rng.uniform(0.0, 0.5))
    kill(process)
    process = start_training(config, log, rename_delay=0.5)
    if wait_for(process, writing(4)):
        time.sleep(rng.uniform(0.0, 0.4))
    kill(process)
    assert (run_dir / "waveflow_2").exists()
    process = start_training(config, log, rename_delay=0.2)
    time.sleep(rng.uniform(0.0, 6.0))
    kill(process)

    process = start_training(config, log)
    assert process.wait(timeout=300) == 0, open(log).read()
    assert "resuming from the newest, waveflow_" in open(log + ".out").read()
    for iteration in (2, 4, 6):
        assert_same_weights(
            weights(str(run_dir / f"waveflow_{iteration}")),
            weights(os.path.join(uninterrupted, f"waveflow_{iteration}")),
        )
    assert sorted(os.listdir(run_dir)) == ["config.json", "train.lock", "waveflow_2", "waveflow_4", "waveflow_6"]
    assert not [name for name in os.listdir(tmp_path / "exp" / "samples" / "tiny") if name.endswith(".partial")]


@pytest.fixture
def small_disk(monkeypatch):
    """`small_disk(folder)` -> `fill(free_bytes, read_only=False)`: from then on only `free_bytes` more
    fit in `folder` (or nothing: read-only). A tmpfs mounted there where the tests may mount one (as
    root); elsewhere `open` is patched so that writes under `folder` fail with ENOSPC once `free_bytes`
    are written (EROFS at once)."""
    mounted = []

    def make(folder):
        os.makedirs(folder, exist_ok=True)
        if (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True
            ).returncode
            == 0
        ):
            mounted.append(folder)

            def fill(free_bytes, read_only=False):
                stats = os.statvfs(folder)
                used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
                options = "remount,ro" if read_only else f"remount,size={used + free_bytes}"
                subprocess.run(["mount", "-o", options, str(folder)], check=True)

            return fill

        def fill(free_bytes, read_only=False):
            free, real_open, limited = [free_bytes], io.open, os.path.realpath(folder) + os.sep
            failure = errno.EROFS if read_only else errno.ENOSPC

            class OnSmallDisk:
                def __init__(self, file):
                    self.file = file

                def write(self, data):
                    size = len(data.encode() if isinstance(data, str) else memoryview(data).cast("B"))
                    if size > free[0] or read_only:
                        free[0] = 0
                        raise OSError(failure, os.strerror(failure))
                    free[0] -= size
                    return self.file.write(data)

                def __getattr__(self, name):
                    return getattr(self.file, name)

                def __enter__(self):
                    return self

                def __exit__(self, *failure):
                    self.file.close()

            def small_open(file, mode="r", *args, **kwargs):
                opened = real_open(file, mode, *args, **kwargs)
                inside = (
                    not isinstance(file, int)
                    and any(flag in mode for flag in "wax+")
                    and os.fsdecode(os.path.realpath(file)).startswith(limited)
                )
                return OnSmallDisk(opened) if inside else opened

            monkeypatch.setattr(builtins, "open", small_open)
            monkeypatch.setattr(io, "open", small_open)

        return fill

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)])


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_disk_ends_training_in_one_line_naming_the_newest_intact_checkpoint(
    trained, tmp_path, capsys, one_thread, small_disk, fault
):
    folder, _, _ = trained
    disk = tmp_path / "disk"
    fill = small_disk(disk)
    config = write_config(
        str(tmp_path),
        train_config__output_directory=str(disk / "exp"),
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )
    status, _, err = run_here(capsys, "-c", config, "--max_iterations", "4")
    assert status == 0, err
    fill(8192, read_only=fault == "read-only")  # room for the config's copy, not for a checkpoint
    status, out, err = run_here(capsys, "-c", config)
    run_dir = disk / "exp" / "tiny"
    if fault == "full":
        assert "resuming from the newest, waveflow_4" in out
        failure = "checkpoint waveflow_6 ([Errno 28] No space left on device)"
    else:
        failure = "the run folder ([Errno 30] Read-only file system)"
    assert status == 1
    assert err.strip().splitlines()[-1] == (
        f"error: {run_dir}: cannot write {failure}; the newest intact checkpoint is {run_dir / 'waveflow_4'}"
    )
    assert err.count("error") == 1 and "Traceback" not in err
    assert sorted(os.listdir(run_dir)) == ["config.json", "train.lock", "waveflow_2", "waveflow_4"]
    assert_same_weights(
        weights(str(run_dir / "waveflow_4")), weights(os.path.join(folder, "exp", "tiny", "waveflow_4"))
    )


def test_failing_logs_and_samples_are_warnings_and_training_goes_on(
    trained, tmp_path, capsys, one_thread, small_disk, monkeypatch
):
    folder, _, _ = trained
    unhandled = []  # what a thread's uncaught exception would print as a traceback
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    run_dir = tmp_path / "exp" / "tiny"
    small_disk(run_dir / "logs")(4096)  # TensorBoard's writer thread dies with ENOSPC at the first audio
    (tmp_path / "exp" / "samples").mkdir(parents=True)
    (tmp_path / "exp" / "samples" / "tiny").write_text("a file where the samples' folder should be")
    config = write_config(
        str(tmp_path),
        train_config__output_directory=str(tmp_path / "exp"),
        train_config__with_tensorboard=True,
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )
    status, out, err = run_here(capsys, "-c", config)
    assert status == 0, err
    assert (
        err.count(
            f"warning: {run_dir / 'logs'}: TensorBoard logs stopped ([Errno 28] No space left on "
            f"device); training goes on without logs"
        )
        == 1
    )
    assert err.count("clip06_iter") == 3 and err.count("cannot write the sample") == 3
    assert "Traceback" not in err and not unhandled
    for iteration in (2, 4, 6):
        assert_same_weights(
            weights(str(run_dir / f"waveflow_{iteration}")),
            weights(os.path.join(folder, "exp", "tiny", f"waveflow_{iteration}")),
        )


def test_a_mel_too_short_to_synthesize_is_named_by_its_path(trained, tmp_path, capsys):
    folder, config, _ = trained
    torch.save(torch.zeros(80, 3), tmp_path / "tiny.pt")
    status, _, err = run_here(
        capsys,
        "-s",
        "--mels",
        str(tmp_path / "tiny.pt"),
        "-c",
        config,
        "--checkpoint_path",
        os.path.join(folder, "exp", "tiny", "waveflow_6"),
    )
    assert status == 1
    assert err.strip() == (
        f"error: {tmp_path / 'tiny.pt'}: a mel of 3 frames is too short to synthesize (need at least 4)"
    )


# ----------------------------------------------------------------------------- skipped updates


def one_step_setup(tmp_path, amp_dtype=None, init_scale=2.0**16):
    """A tiny model, its optimizer, schedule and scaler, and one batch: what `train_step` takes."""
    config = load_config(write_config(str(tmp_path)))
    torch.manual_seed(0)
    model = build_model(config.waveflow)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=amp_dtype == torch.float16)
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=amp_dtype)
    batch = (torch.randn(2, 80, 9), 0.1 * torch.randn(2, 2048))
    return model, optimizer, scheduler, scaler, runtime, config, batch


def infinite_gradient(model):
    """Give one weight an infinite gradient while the loss stays finite."""
    model.flows[0].proj_log_s_t.conv.bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))


def test_a_finite_loss_with_a_non_finite_gradient_is_a_skipped_step(tmp_path, one_thread):
    model, optimizer, scheduler, scaler, runtime, config, batch = one_step_setup(tmp_path)
    infinite_gradient(model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    metrics = train.train_step(model, batch, optimizer, scheduler, scaler, runtime, config)
    assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
    assert metrics["skipped"] == "non-finite gradient"
    assert_same_weights(model.state_dict(), before, atol=0)
    assert "gradient norm is inf" in train.skipped_step_warning(metrics, 7)


def test_fp16_overflow_is_the_scalers_calibration_and_an_overflow_at_scale_one_is_not(tmp_path, one_thread):
    model, optimizer, scheduler, scaler, runtime, config, batch = one_step_setup(
        tmp_path, amp_dtype=torch.float16, init_scale=2.0**60
    )  # so large a scale overflows fp16
    metrics = train.train_step(model, batch, optimizer, scheduler, scaler, runtime, config)
    assert np.isfinite(metrics["loss"])
    assert metrics["skipped"] == "fp16 gradient overflow" and metrics["loss_scale"] == 2.0**59
    assert train.skipped_step_warning(metrics, 1) == (
        "iteration 1: fp16 gradient overflow, step skipped; the loss scale drops to 5.76461e+17"
    )
    model, optimizer, scheduler, scaler, runtime, config, batch = one_step_setup(
        tmp_path, amp_dtype=torch.float16, init_scale=1.0
    )
    infinite_gradient(model)
    metrics = train.train_step(model, batch, optimizer, scheduler, scaler, runtime, config)
    assert metrics["skipped"] == "non-finite gradient"


def diverging_model(waveflow_config) -> WaveFlow:
    """`build_model`, whose every gradient is infinite (`infinite_gradient`): each step is skipped."""
    model = build_model(waveflow_config)
    infinite_gradient(model)
    return model


def test_non_finite_gradients_in_a_row_stop_training(tmp_path, capsys, monkeypatch, one_thread):
    make_corpus(str(tmp_path))
    config = write_config(str(tmp_path), train_config__max_bad_steps=3, train_config__iters_per_checkpoint=100)

    monkeypatch.setattr(train, "build_model", diverging_model)
    status, _, err = run_here(capsys, "-c", config)
    assert status == 1
    assert err.count("gradient norm is inf") == 3 and err.count("step skipped") == 3
    assert err.strip().splitlines()[-1] == (
        "error: 3 steps in a row skipped for a non-finite loss or gradient at "
        "iteration 3: training stopped; the last good checkpoint is none"
    )


def test_training_that_ends_in_a_streak_of_skipped_steps_writes_no_checkpoint(
    tmp_path, capsys, monkeypatch, one_thread
):
    """The end of training (or a stop) in the middle of a streak shorter than max_bad_steps: a checkpoint there
    would start the streak's count again when resumed, and hold the state the streak left."""
    make_corpus(str(tmp_path))
    config = write_config(str(tmp_path), train_config__max_bad_steps=10, train_config__iters_per_checkpoint=100)

    monkeypatch.setattr(train, "build_model", diverging_model)
    status, out, err = run_here(capsys, "-c", config, "--max_iterations", "3")
    assert status == 0 and "training finished at iteration 3" in out, err
    assert err.count("step skipped") == 3 and (
        "warning: no checkpoint at iteration 3: its last 3 steps were skipped for a non-finite loss or "
        "gradient; the last good checkpoint is none\n" in err
    )
    assert list_checkpoints(os.path.join(str(tmp_path), "exp", "tiny")) == []


# ----------------------------------------------------------------------------- test clips too short to measure


def short_test_clips(folder):
    """The tiny corpus, with two clips first in the test list that pass the data checks but are too short:
    600 samples (3 mel frames: nothing to synthesize) and 1,500 (768 samples synthesized: too few to measure)."""
    make_corpus(folder)
    shorts = []
    for length in (600, 1500):
        path = os.path.join(folder, f"short{length}.wav")
        soundfile.write(path, (0.3 * np.sin(np.arange(length) / 5) * 32767).astype(np.int16), RATE, subtype="PCM_16")
        shorts.append(path)
    with open(os.path.join(folder, "test.txt"), "w") as f:
        f.write("\n".join([*shorts, os.path.join(folder, "clip06.wav"), os.path.join(folder, "clip07.wav")]) + "\n")
    return shorts


def test_test_clips_too_short_to_measure_are_named_at_start_and_left_out(tmp_path, capsys, monkeypatch, one_thread):
    shorts = short_test_clips(str(tmp_path))
    monkeypatch.setattr(synthesis, "MEASURED_CLIPS", 1)
    config = write_config(str(tmp_path), train_config__epochs=1, train_config__iters_per_checkpoint=100)
    status, out, err = run_here(capsys, "-c", config)
    assert status == 0, err
    assert (
        f"warning: {shorts[0]}: a clip of 600 samples, a mel of 3 frames is too short to synthesize (need at "
        f"least 4): left out of the checkpoint reports"
    ) in err
    assert (
        f"warning: {shorts[1]}: a clip of 1500 samples, its synthesis of 768 samples is too short to measure "
        f"(need at least 1025): left out of the checkpoint reports"
    ) in err
    assert "iteration 3: 1 test clips at temperature" in out and "Traceback" not in err
    assert os.listdir(tmp_path / "exp" / "samples" / "tiny") == ["clip06_iter3.wav"]
    # -v measures the others and names each clip it leaves out in one line.
    status, out, err = run_here(
        capsys,
        "-v",
        "-c",
        config,
        "--checkpoint_path",
        str(tmp_path / "exp" / "tiny" / "waveflow_3"),
        "--json",
        str(tmp_path / "v.json"),
    )
    assert status == 0, err
    assert (
        f"warning: {shorts[0]}: a mel of 3 frames is too short to synthesize (need at least 4): "
        f"left out of the measures" in err
    )
    assert (
        f"warning: {shorts[1]}: its synthesis of 768 samples is too short to measure (need at least 1025): "
        f"left out of the measures" in err
    )
    assert (
        "2 clips synthesized at temperature 0.8 (seed 1234) and measured against their recordings (2 too short, "
        "left out)" in out
    )
    assert "4 test clips" in out and "Traceback" not in err
    document = json.load(open(tmp_path / "v.json"))
    assert [clip["file"] for clip in document["left_out"]] == shorts
    assert [clip["name"] for clip in document["clips"]] == ["clip06", "clip07"]


def test_a_measure_that_fails_at_a_checkpoint_is_a_warning(tmp_path, capsys, monkeypatch, one_thread):
    make_corpus(str(tmp_path))

    def failing_measure(synthesis, reference, sampling_rate, hop_length):
        raise ValueError("no pitch found\nsecond line")

    monkeypatch.setattr(synthesis, "measure", failing_measure)
    config = write_config(str(tmp_path), train_config__epochs=1, train_config__iters_per_checkpoint=100)
    status, out, err = run_here(capsys, "-c", config)
    assert status == 0, err
    assert err.count("warning: iteration 3: clip0") == 2
    assert (
        "warning: iteration 3: clip06: cannot measure the synthesis (ValueError: no pitch found); training goes "
        "on" in err
    )
    assert "training finished at iteration 3" in out


# ----------------------------------------------------------------------------- options that did nothing


def test_warm_start_or_averaging_without_a_checkpoint_is_refused(tmp_path, capsys):
    make_corpus(str(tmp_path))
    config = write_config(str(tmp_path))
    for option, says in (
        (["-w"], "-w/--warm_start needs a checkpoint"),
        (["-a", "2"], "-a needs a folder of checkpoints"),
    ):
        status, _, err = run_here(capsys, *option, "-c", config, "--max_iterations", "1")
        assert status == 1 and err.strip() == (
            f"error: {config}: {says} to start from: train_config.checkpoint_path is empty (or give --checkpoint_path)"
        )
    assert not os.path.exists(tmp_path / "exp" / "tiny")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        train.parse_args(["-e", "0.9", "-s", "-c", config])  # -e averages nothing without -a


def test_resuming_from_weights_only_is_refused_in_one_line(tmp_path, capsys):
    make_corpus(str(tmp_path))
    torch.save(
        {"model": build_model(load_config(write_config(str(tmp_path))).waveflow).state_dict()}, tmp_path / "weights.pt"
    )
    config = write_config(str(tmp_path), train_config__checkpoint_path=str(tmp_path / "weights.pt"))
    status, _, err = run_here(capsys, "-c", config)
    assert status == 1 and err.strip() == (
        f"error: {tmp_path / 'weights.pt'}: holds no iteration and optimizer "
        f"state to resume training from (weights only?); use -w/--warm_start to "
        f"start from its weights"
    )
    status, out, err = run_here(capsys, "-w", "-c", config, "--max_iterations", "1")
    assert status == 0 and "warm start from" in out, err


def test_resume_position_of_our_checkpoints_the_originals_and_a_warm_start(tmp_path):
    tc = load_config(write_config(str(tmp_path), train_config__epochs=4)).train  # 3 batches an epoch below
    assert train.resume_position(5, 1, 2, 3, tc) == (1, 2, 12)  # ours: epoch and batch recorded
    assert train.resume_position(5, -1, -1, 3, tc) == (1, 2, 12)  # the original's: from the iteration alone
    assert train.resume_position(100, 0, 0, 3, tc) == (0, 0, 112)  # warm start: numbering goes on from 100
    tc.max_iterations = 10
    assert train.resume_position(5, 1, 2, 3, tc) == (1, 2, 10)
    # a checkpoint stopped further into its epoch than an epoch now lasts (batch_size grew): refused, no traceback
    with pytest.raises(ConfigError, match="after batch 5 of epoch 0, but an epoch has 3 batches now"):
        train.resume_position(5, 0, 5, 3, tc)


def test_resuming_under_another_schedule_follows_the_configs_and_under_the_same_one_the_checkpoints(capsys):
    shipped = os.path.join(ROOT, "pretrained", "nanoflow-demo.pt")
    stored = read_checkpoint(shipped)["scheduler"]  # trained with configs/demo.json: halved every 2,000
    assert stored["step_size"] == 2000 and stored["last_epoch"] == 4000 and stored["_last_lr"] == [2.5e-4]
    for name, step_size, rate, said in (("demo-long", 25000, 5e-4, True), ("demo", 2000, 2.5e-4, False)):
        config_path = os.path.join(ROOT, "configs", f"{name}.json")
        training = train.build_training(load_config(config_path), Runtime(device=torch.device("cpu")))
        assert train.restore(training, shipped, train.parse_args(["-c", config_path]), True)[0] == 4000
        scheduler = training.scheduler
        assert (scheduler.step_size, scheduler.last_epoch) == (step_size, 4000)
        assert training.optimizer.param_groups[0]["lr"] == rate and scheduler.get_last_lr() == [rate]
        out = capsys.readouterr().out
        assert (
            "the checkpoint's learning-rate schedule (learning_rate 0.001, lr_decay_step 2000, lr_decay_gamma 0.5) "
            "is not the config's (learning_rate 0.0005, lr_decay_step 25000, lr_decay_gamma 0.5): following the "
            "config's, learning rate 0.0005 at iteration 4000" in out
        ) == said
        for _ in range(2000):  # to iteration 6000, where the stored schedule halves and the long one does not
            training.optimizer.step()
            scheduler.step()
        assert training.optimizer.param_groups[0]["lr"] == (5e-4 if said else 1.25e-4)


# ----------------------------------------------------------------------------- the wall-clock limit


def test_the_wall_clock_margin_is_the_longest_step_after_the_first_and_the_last_checkpoints_times():
    now = [0.0]
    limit = WallClockLimit(1.0, started=0.0, clock=lambda: now[0])
    limit.begin_steps()
    now[0] = 30.0
    limit.step_done()  # the first step (it compiles): 30 s
    assert limit.leaves_no_time(with_report=False)  # 30 + 30 + 30 (no save measured yet) > 60
    now[0] = 32.0
    limit.step_done()  # 2 s: from now on the first no longer counts
    assert not limit.leaves_no_time(with_report=False)  # 32 + 2 + 2 (a save not yet measured: a step)
    assert limit.leaves_no_time(with_report=True)  # ... + 60 (a report not yet measured)
    with limit.timing("save"):
        now[0] = 35.0
    with limit.timing("report"):
        now[0] = 45.0
    now[0] = 46.0
    limit.step_done()  # 1 s after the report: the longest step stays 2 s
    assert limit.longest_step == 2.0
    assert not limit.leaves_no_time(with_report=False)  # 46 + 2 + 3
    assert limit.leaves_no_time(with_report=True)  # 46 + 2 + 3 + 10 > 60
    assert not limit.passed() and WallClockLimit(0.0, 0.0, clock=lambda: 1e9).leaves_no_time(True) is False


class FakeClock:
    """A clock for `train.main(..., clock=)` in which time passes only where `fake_time` says: in
    setup, in each training step (the first slower, as it compiles and tunes cuDNN), in each
    checkpoint save and in each checkpoint report."""

    def __init__(self, setup=0.0, first_step=0.0, step=0.0, save=0.0, report=0.0):
        self.seconds = dict(setup=setup, first_step=first_step, step=step, save=save, report=report)
        self.now, self.steps = 0.0, 0

    def __call__(self):
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    """`fake_time(**seconds)` -> a fresh `FakeClock`, which train.py's setup, steps, saves and reports
    advance from then on: no sleeping, nothing depends on the machine's speed."""
    clocks = []

    def advancing(function, part):
        def timed(*args, **kwargs):
            result = function(*args, **kwargs)
            clock = clocks[-1]
            clock.now += clock.seconds["first_step" if part == "step" and clock.steps == 0 else part]
            clock.steps += part == "step"
            return result

        return timed

    monkeypatch.setattr(train, "build_training", advancing(train.build_training, "setup"))
    monkeypatch.setattr(train, "train_step", advancing(train.train_step, "step"))
    monkeypatch.setattr(train, "save_checkpoint", advancing(train.save_checkpoint, "save"))
    monkeypatch.setattr(
        synthesis.CheckpointReport, "__call__", advancing(synthesis.CheckpointReport.__call__, "report")
    )

    def make(**seconds):
        clocks.append(FakeClock(**seconds))
        return clocks[-1]

    return make


def test_the_wall_clock_limit_stops_in_time_with_a_checkpoint_and_the_same_command_goes_on_exactly(
    trained, tmp_path, capsys, one_thread, fake_time
):
    folder, _, _ = trained
    uninterrupted = os.path.join(folder, "exp", "tiny")
    config = write_config(
        str(tmp_path),
        train_config__output_directory=str(tmp_path / "exp"),
        data_config__training_files=os.path.join(folder, "train.txt"),
        data_config__test_files=os.path.join(folder, "test.txt"),
    )
    run_dir = tmp_path / "exp" / "tiny"
    # 30 s: steps of 5 s after a first one of 10, saves of 2 s, reports of 4 s; 6 iterations, a checkpoint
    # with a report every 2.
    seconds = dict(first_step=10.0, step=5.0, save=2.0, report=4.0)
    stops = []
    for _ in range(4):
        clock = fake_time(**seconds)
        status = train.main(["-c", config, "--max_minutes", "0.5"], clock=clock)
        out, err = capsys.readouterr()
        assert status == 0, err
        assert clock.now <= 30.0  # never past the limit
        if "training finished" in out:
            break
        [line] = [line for line in out.splitlines() if line.startswith("wall-clock limit:")]
        iteration = int(line.split("stopped at iteration ")[1].split()[0])
        assert line == (
            f"wall-clock limit: stopped at iteration {iteration} after {clock.now / 60:.2f} of 0.5 min; the same "
            f"command resumes"
        )
        assert list_checkpoints(str(run_dir))[-1][0] == iteration  # its last iteration is saved
        stops.append(iteration)
    # Each stop is where one more step and the checkpoint with its report after it would end past 30 s:
    # after 1 at 10 s (a step and a save not yet measured count as the first step's 10 s, a report as a
    # minute), after 3 and 5 at 21 s (5 + 2 + 4 more). Not earlier: after 2 and 4, at 16 s, a step (still
    # the first's 10 s) and a save fit.
    assert stops == [1, 3, 5] and "training finished at iteration 6" in out
    assert [it for it, _ in list_checkpoints(str(run_dir))] == [1, 2, 3, 4, 5, 6]
    for iteration in (2, 4, 6):
        assert_same_weights(
            weights(str(run_dir / f"waveflow_{iteration}")),
            weights(os.path.join(uninterrupted, f"waveflow_{iteration}")),
        )


def test_a_wall_clock_limit_that_setup_uses_up_trains_nothing(tmp_path, capsys, one_thread, fake_time):
    make_corpus(str(tmp_path))
    config = write_config(str(tmp_path))
    status = train.main(["-c", config, "--max_minutes", "0.5"], clock=fake_time(setup=40.0))
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.strip().splitlines()[-1] == (
        "wall-clock limit: 0.5 min passed before the first step (setup took 0.67 min); nothing trained"
    )
    assert list_checkpoints(str(tmp_path / "exp" / "tiny")) == []
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as message:
        train.parse_args(["-c", config, "--max_minutes", "-1"])
    assert "--max_minutes must be a number >= 0" in message.getvalue()


@pytest.mark.parametrize("workers", [0, 2])
def test_one_loader_over_the_run_gives_each_epochs_batches(tmp_path, workers, one_thread):
    """`training_batches` from the middle of epoch 0 to the end of epoch 2 gives the batches that a
    DataLoader per epoch (the dataset and sampler set to that epoch) gives: crops and noise included."""
    make_corpus(str(tmp_path))
    data = load_config(write_config(str(tmp_path), data_config__dequantize=True)).data
    train_set, reference_set = (Mel2Samp.from_config(data, mode="train", seed=5) for _ in range(2))
    sampler, reference_sampler = (EpochSampler(len(train_set), batch_size=2, seed=5) for _ in range(2))
    expected = []
    for epoch in range(3):
        reference_sampler.set_epoch(epoch, skip_batches=1 if epoch == 0 else 0)
        reference_set.set_epoch(epoch)
        expected += DataLoader(reference_set, batch_size=2, sampler=reference_sampler, collate_fn=collate)
    batches = list(training_batches(train_set, sampler, (0, 1), 3, workers, pin_memory=False))
    assert len(batches) == len(expected) == 2 + 3 + 3
    for (mel, audio), (expected_mel, expected_audio) in zip(batches, expected, strict=True):
        assert torch.equal(mel, expected_mel) and torch.equal(audio, expected_audio)


def test_the_loaders_workers_start_once_and_end_with_the_run(tmp_path, capsys, monkeypatch, one_thread):
    make_corpus(str(tmp_path))
    config = write_config(str(tmp_path), data_config__num_workers=1, train_config__iters_per_checkpoint=100)
    workers_at_each_step = []
    train_step = train.train_step

    def recording_train_step(*args, **kwargs):
        workers_at_each_step.append(frozenset(process.pid for process in multiprocessing.active_children()))
        return train_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", recording_train_step)
    before = {process.pid for process in multiprocessing.active_children()}
    status, _, err = run_here(capsys, "-c", config)
    assert status == 0, err
    assert len(workers_at_each_step) == 6  # 2 epochs of 3 batches
    assert len(set(workers_at_each_step)) == 1 and len(workers_at_each_step[0] - before) == 1  # one worker throughout
    assert {process.pid for process in multiprocessing.active_children()} <= before
