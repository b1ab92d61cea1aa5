"""The demo: a corpus without digital silence, dequantization, a run that ends by itself."""

import glob
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import soundfile
import torch

from conftest import ROOT
from mel2samp import Mel2Samp
from test_train import make_corpus, write_config

RATE = 22050
MEL_PARAMETERS: dict[str, Any] = dict(
    sampling_rate=RATE, filter_length=1024, hop_length=256, win_length=1024, mel_fmin=0.0, mel_fmax=8000.0
)


def longest_zero_run(pcm: np.ndarray) -> int:
    zero = np.concatenate([[0], (pcm == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    return int((edges[1::2] - edges[::2]).max()) if edges.size else 0


def test_demo_corpus_has_a_noise_floor_and_no_digital_silence():
    files = sorted(glob.glob(os.path.join(ROOT, "data", "demo", "wavs", "*.wav")))
    assert len(files) == 32
    for path in files:
        pcm, rate = soundfile.read(path, dtype="int16")
        assert rate == RATE
        # espeak-ng alone leaves about 22% of the samples at exactly 0, in runs of thousands.
        assert np.mean(pcm == 0) < 0.05, path
        assert longest_zero_run(pcm) < 20, path
        quietest = min(np.std(pcm[i : i + 1024].astype(float)) for i in range(0, len(pcm) - 1024, 1024))
        assert 5 < quietest < 20, path  # the -70 dBFS floor is about 10 LSB RMS


def test_noise_floor_script_is_deterministic_and_at_the_asked_level(tmp_path):
    tone = (3000 * np.sin(2 * np.pi * 150 * np.arange(RATE) / RATE)).astype(np.int16)
    pcm = np.concatenate([np.zeros(RATE, dtype=np.int16), tone])
    paths = []
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        paths.append(str(tmp_path / folder / "clip.wav"))
        soundfile.write(paths[-1], pcm, RATE, subtype="PCM_16")
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "scripts", "add_noise_floor.py"), "--level_db", "-60", paths[-1]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    first, second = (soundfile.read(path, dtype="int16")[0] for path in paths)
    assert np.array_equal(first, second)  # same name and seed: same noise
    noise_rms = np.sqrt(np.mean(first[:RATE].astype(float) ** 2)) / 32768
    assert abs(20 * np.log10(noise_rms) + 60) < 0.5
    added = (first[RATE:].astype(float) - tone) / 32768  # on the speech: the same noise, nothing else
    assert abs(20 * np.log10(np.std(added)) + 60) < 0.5 and abs(np.mean(added)) < 1e-5
    soundfile.write(paths[0], np.zeros(100), RATE, subtype="FLOAT")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "add_noise_floor.py"), paths[0]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "expected 16-bit PCM" in result.stderr and paths[0] in result.stderr


def test_dequantization_adds_at_most_half_a_16_bit_step(tmp_path):
    path = str(tmp_path / "clip.wav")
    pcm = np.zeros(6000, dtype=np.int16)
    pcm[3000:] = (np.random.default_rng(0).standard_normal(3000) * 2000).astype(np.int16)
    soundfile.write(path, pcm, RATE, subtype="PCM_16")
    listing = tmp_path / "list.txt"
    listing.write_text(path + "\n")
    for mode in ("train", "eval", "synthesis"):  # whole clips: when asked (-v's log-likelihood)
        plain = Mel2Samp(file_list=str(listing), mode=mode, segment_length=4096, **MEL_PARAMETERS)
        noisy = Mel2Samp(file_list=str(listing), mode=mode, segment_length=4096, dequantize=True, **MEL_PARAMETERS)
        (mel, audio), (noisy_mel, noisy_audio) = plain[0], noisy[0]
        difference = (noisy_audio - audio).abs()
        assert torch.equal(mel, noisy_mel)  # the conditioning is the clean audio's
        assert difference.max() <= 0.5 / 32768 and difference.mean() > 0.2 / 32768
        assert (noisy_audio == 0).sum() == 0
        assert torch.equal(noisy[0][1], noisy_audio)  # reproducible
        noisy.set_epoch(1)
        assert torch.equal(noisy[0][1], noisy_audio) == (mode != "train")  # fresh noise every training epoch


@pytest.mark.slow
def test_training_stops_at_max_iterations_and_says_where_its_outputs_are(tmp_path):
    make_corpus(str(tmp_path))
    config = write_config(
        str(tmp_path),
        train_config__epochs=100,
        train_config__max_iterations=3,
        train_config__iters_per_checkpoint=2,
        data_config__dequantize=True,
    )
    command = [sys.executable, os.path.join(ROOT, "train.py"), "-c", config]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "exp" / "tiny"
    assert sorted(os.listdir(folder)) == ["config.json", "train.lock", "waveflow_2", "waveflow_3"]
    assert "training finished at iteration 3" in result.stdout
    assert str(folder) in result.stdout and "python train.py -s -c" in result.stdout
    checkpoint = torch.load(folder / "waveflow_3", weights_only=True)
    assert checkpoint["iteration"] == 3

    # Going on: the command line raises the limit; a run already at its end trains nothing.
    def go_on_to_5(checkpoint: str) -> subprocess.CompletedProcess:
        arguments = ["--max_iterations", "5", "--checkpoint_path", str(folder / checkpoint)]
        return subprocess.run(command + arguments, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))

    longer = go_on_to_5("waveflow_3")
    assert longer.returncode == 0, longer.stderr
    assert "waveflow_5" in os.listdir(folder)
    again = go_on_to_5("waveflow_5")
    assert again.returncode == 0 and "nothing to train" in again.stdout
    shutil.rmtree(folder)


@pytest.mark.slow
def test_the_long_demo_command_continues_the_shipped_model_and_then_its_own_newest_checkpoint(tmp_path):
    """docs/demo-training.md's `python train.py -c configs/demo-long.json --max_minutes M`, with the run
    folder in a temporary folder and 2 iterations in fp32 (bf16 is several times slower on a CPU without
    bf16 instructions): it starts from the shipped model under its own schedule, and the same command
    again goes on from its own newest checkpoint."""
    with open(os.path.join(ROOT, "configs", "demo-long.json")) as f:
        config = json.load(f)
    config["train_config"].update(output_directory=str(tmp_path / "experiments"), bf16_run=False)
    (tmp_path / "demo-long.json").write_text(json.dumps(config))
    command = [sys.executable, os.path.join(ROOT, "train.py"), "-c", str(tmp_path / "demo-long.json")]
    command += ["--max_minutes", "30", "--max_iterations", "4002"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=environment)
    assert first.returncode == 0, first.stderr
    assert "resumed from pretrained/nanoflow-demo.pt at iteration 4000" in first.stdout
    assert "following the config's, learning rate 0.0005 at iteration 4000" in first.stdout
    assert "training finished at iteration 4002" in first.stdout
    folder = tmp_path / "experiments" / "nanoflow-demo-long"
    saved = torch.load(folder / "waveflow_4002", weights_only=True)
    assert saved["scheduler"]["step_size"] == 25000 and saved["optimizer"]["param_groups"][0]["lr"] == 5e-4
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=environment)
    assert again.returncode == 0, again.stderr
    assert "resuming from the newest, waveflow_4002 (not pretrained/nanoflow-demo.pt" in again.stdout
    assert "nothing to train" in again.stdout and "learning-rate schedule" not in again.stdout


@pytest.mark.slow
def test_the_shipped_demo_model_follows_a_sentence_it_never_heard():
    """pretrained/nanoflow-demo.pt is configs/demo.json's model, trained: on a held-out sentence in
    the demo voice its synthesis follows the recording's spectral envelope (the 300-iteration demo
    scores 0.85 on the held-out sentences). It does not yet reproduce the voice's pitch: see
    the README's quick start."""
    from checkpoint import load_checkpoint
    from data import MelSpectrogram, load_audio
    from metrics import measure
    from model import build_model

    path = os.path.join(ROOT, "pretrained", "nanoflow-demo.pt")
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        config = json.load(f)
    model = build_model(config["waveflow_config"])
    checkpoint = load_checkpoint(path, model)  # strict: the architecture of configs/demo.json
    assert checkpoint["config"]["waveflow_config"] == config["waveflow_config"]
    assert checkpoint["iteration"] >= 4000 and os.path.getsize(path) < 4 * 2**20
    recording = load_audio(os.path.join(ROOT, "data", "demo", "heldout", "wavs", "demo_002.wav"), RATE)
    mel = MelSpectrogram(n_mel_channels=80, **MEL_PARAMETERS)(recording)
    model = model.eval().remove_weight_norm()
    audio = model.infer(mel[None], sigma=0.8, generator=torch.Generator().manual_seed(1234))[0]
    assert torch.isfinite(audio).all() and 0.01 < audio.abs().max() < 1.0
    result = measure(audio, recording, RATE, 256)
    assert result["log_mel_l1"] < 0.65, result
