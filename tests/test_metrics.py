"""metrics.py on signals whose answers are known, and the measures through train.py (-v, --json, --mels,
TensorBoard at checkpoints) on a tiny corpus."""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import soxr
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import metrics
import synthesis
import train
from config import load_config
from data import DataError, load_audio
from mel2samp import write_mels
from test_train import ROOT, make_corpus, run, write_config

RATE, HOP = 22050, 256
SPEECH = os.path.join(ROOT, "data", "demo", "wavs", "demo_001.wav")  # espeak-ng, about 100 Hz
FORMANTS = ((700, 150), (1200, 150), (2600, 200))  # (centre, bandwidth) in Hz: an open vowel


def envelope(frequency: np.ndarray) -> np.ndarray:
    return np.asarray(sum(1.0 / (1.0 + ((frequency - centre) / width) ** 2) for centre, width in FORMANTS) + 0.02)


def vowel(f0: float, seconds: float = 1.0) -> np.ndarray:
    """A steady vowel: the harmonics of f0 up to 7 kHz shaped by `envelope`, peak 0.5."""
    t = np.arange(int(RATE * seconds)) / RATE
    harmonics = np.arange(1, int(7000 // f0) + 1)[:, None]
    audio = (envelope(harmonics * f0) * np.sin(2 * np.pi * f0 * harmonics * t + 0.3 * harmonics)).sum(0)
    return (0.5 * audio / np.abs(audio).max()).astype(np.float32)


def noise_like(audio: np.ndarray, seed: int = 0) -> np.ndarray:
    """White noise through the same spectral envelope as `vowel`, at the same RMS: no pitch at all."""
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(audio.size))
    frequency = np.fft.rfftfreq(audio.size, 1 / RATE)
    noise = np.fft.irfft(spectrum * envelope(frequency) * (frequency < 7000), audio.size)
    return (noise * np.sqrt(np.mean(audio**2) / np.mean(noise**2))).astype(np.float32)


@pytest.fixture(scope="module")
def speech():
    return load_audio(SPEECH, RATE)  # a tensor, as train.py passes it


def test_identical_audio_scores_perfectly(speech):
    results = metrics.measure(speech, speech.numpy(), RATE, HOP)  # a tensor and an array
    assert results["log_mel_l1"] == 0 and results["mr_stft"] == 0
    assert results["f0_rmse_cents"] == 0 and results["vuv_f1"] == 1 and results["periodicity_rmse"] == 0
    if metrics.pesq_available():
        assert results["pesq_wb"] == pytest.approx(4.64, abs=0.01)  # the top of P.862.2's scale


@pytest.mark.parametrize("cents", [100, 50, -35])
def test_a_pitch_shift_gives_its_cents(cents):
    reference = vowel(120.0)
    results = metrics.pitch_measures(vowel(120.0 * 2 ** (cents / 1200)), reference, RATE, HOP)
    # pYIN's F0 lies on a 10-cent grid: a shift is found to within half a step either side.
    assert results["f0_rmse_cents"] == pytest.approx(abs(cents), abs=5.5)
    assert results["vuv_f1"] == 1


def test_noise_with_the_same_envelope_is_unvoiced_and_far_in_log_mel():
    reference = vowel(120.0)
    noise = metrics.measure(noise_like(reference), reference, RATE, HOP)
    assert noise["vuv_f1"] == 0 and math.isnan(noise["f0_rmse_cents"])  # no frame voiced in both
    assert noise["periodicity_rmse"] > 0.3
    rng = np.random.default_rng(1)
    slightly_noisy = reference + 0.005 * rng.standard_normal(reference.size).astype(np.float32)  # 37 dB below
    close = metrics.measure(slightly_noisy, reference, RATE, HOP)
    assert close["vuv_f1"] == 1 and close["f0_rmse_cents"] < 5
    assert noise["log_mel_l1"] > 0.3 and noise["log_mel_l1"] > 5 * close["log_mel_l1"]


def test_silence_against_a_tone():
    tone, silence = vowel(150.0, seconds=0.5), np.zeros(RATE // 2, dtype=np.float32)
    results = metrics.measure(silence, tone, RATE, HOP)
    assert results["vuv_f1"] == 0 and math.isnan(results["f0_rmse_cents"])
    # The tone's mel is far above the 1e-2 floor that silence sits on.
    assert results["log_mel_l1"] > 1 and results["periodicity_rmse"] > 0.3
    if metrics.pesq_available():
        assert math.isnan(results["pesq_wb"])  # PESQ cannot score a silent synthesis
    reversed_roles = metrics.pitch_measures(tone, silence, RATE, HOP)
    assert reversed_roles["vuv_f1"] == 0  # voiced frames where the recording has none: false positives only
    assert math.isnan(metrics.pitch_measures(silence, silence, RATE, HOP)["vuv_f1"])  # nothing voiced: F1 undefined
    # A silent recording leaves the spectral convergence undefined (its norm is the floor's): not ~1e5.
    assert math.isnan(metrics.measure(tone, silence, RATE, HOP)["mr_stft"])
    assert math.isnan(metrics.multi_resolution_stft(tone, silence + 0.5 / 32768))  # below one 16-bit step
    assert metrics.multi_resolution_stft(tone, silence + 1 / 32768) > 0  # a step's DC is a recording
    assert math.isfinite(results["mr_stft"])  # a silent synthesis of a recording is measured


@pytest.mark.parametrize(
    "rate,hop,fewest", [(22050, 256, 1025), (16000, 160, 1025), (44100, 512, 1025), (48000, 480, 2049)]
)
def test_the_fewest_samples_measured_follow_the_rate(rate, hop, fewest):
    """At 48 kHz the log-mel and pitch window is 4,096 samples, longer than the largest STFT's 2,048: a clip
    too short for it is too short to measure (left out by -v and the checkpoint reports), not a traceback."""
    assert metrics.min_samples(rate) == fewest
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, fewest).astype(np.float32)
    assert math.isfinite(metrics.measure(noise, noise[::-1].copy(), rate, hop)["log_mel_l1"])
    with pytest.raises(ValueError, match=f"{fewest - 1} samples are too few to measure"):
        metrics.measure(noise[:-1], noise[:-1], rate, hop)
    frames = 3 + -(-fewest // hop)  # the fewest frames whose synthesis (hop * (frames - 3)) is measured
    assert synthesis.unmeasurable(frames, hop, rate) is None
    assert "too short to measure" in str(synthesis.unmeasurable(frames - 1, hop, rate))


def test_the_log_mel_distance_of_the_same_audio_is_the_same_at_every_rate():
    """The window as long in time at every rate, its floor scaled as the magnitudes are: a 1% noise over
    speech measures the same resampled to 16, 24, 44.1 or 48 kHz (with a fixed floor and the power-of-two
    window of the pitch tracker, 0.44 at 24 kHz and 0.71 at 48 kHz against 0.064)."""
    speech = load_audio(SPEECH, RATE).numpy()
    noisy = speech + 0.01 * np.random.default_rng(0).standard_normal(speech.size).astype(np.float32)
    at_22050 = metrics.log_mel_l1(noisy, speech, RATE, HOP)
    assert 0.03 < at_22050 < 0.2
    for rate, hop in ((16000, 160), (24000, 300), (44100, 512), (48000, 480)):
        reference, degraded = (soxr.resample(audio, RATE, rate, quality="VHQ") for audio in (speech, noisy))
        assert metrics.log_mel_l1(degraded, reference, rate, hop) == pytest.approx(at_22050, rel=0.03), rate


def test_half_the_amplitude_gives_the_known_spectral_distances():
    # Loud white noise that never clips: every mel band and STFT bin is far above the floors, so halving
    # the amplitude moves every log magnitude by log 2 and makes the spectral convergence ||Y - Y/2|| / ||Y|| = 1/2.
    reference = np.random.default_rng(0).uniform(-0.9, 0.9, RATE).astype(np.float32)
    synthesis, reference = metrics.align(0.5 * reference, reference)
    assert metrics.log_mel_l1(synthesis, reference, RATE, HOP) == pytest.approx(math.log(2), rel=1e-4)
    assert metrics.multi_resolution_stft(synthesis, reference) == pytest.approx(0.5 + math.log(2), rel=1e-4)


def test_lengths_are_cut_to_the_shorter():
    reference = vowel(130.0)
    longer = np.concatenate([reference, np.ones(700, dtype=np.float32)])  # what follows the cut is never seen
    results = metrics.measure(reference[:-300], longer, RATE, HOP)
    assert results["log_mel_l1"] == 0 and results["mr_stft"] == 0 and results["vuv_f1"] == 1
    with pytest.raises(ValueError, match="too few to measure"):
        metrics.measure(reference[:1000], reference, RATE, HOP)
    loud = metrics.align(torch.full((10,), 3.0), np.array([np.nan, -np.inf, 0.5]))
    assert loud[0].tolist() == [1.0, 1.0, 1.0] and loud[1].tolist() == [0.0, -1.0, 0.5]  # as a 16-bit file plays


def test_pesq_falls_with_the_noise(speech):
    pytest.importorskip("pesq")
    clean = speech.numpy()
    rng = np.random.default_rng(0)
    power = np.mean(clean**2)
    scores = [metrics.pesq_wideband(clean, clean, RATE)]
    for snr in (30, 10):
        noisy = clean + np.sqrt(power / 10 ** (snr / 10)) * rng.standard_normal(clean.size).astype(np.float32)
        scores.append(metrics.pesq_wideband(noisy, clean, RATE))
    assert 4.6 < scores[0] <= 4.65 and scores[0] > scores[1] > scores[2] >= 1.0


def test_without_pesq_the_measure_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)  # makes `import pesq` fail as when it is not installed
    assert not metrics.pesq_available()
    tone = vowel(200.0, seconds=0.3)
    results = metrics.measure(tone, tone, RATE, HOP)
    assert "pesq_wb" not in results and results["log_mel_l1"] == 0
    summary = metrics.summarize([results])
    assert summary["pesq_wb"]["n"] == 0 and summary["pesq_wb"]["mean"] is None
    assert "PESQ wide band" in metrics.format_table(summary, 1)
    assert "the pesq package is not installed" in metrics.format_table(summary, 1)


def test_summary_is_the_mean_with_a_student_t_interval():
    values = [1.0, 2.0, 3.0, 4.0]
    results = [{"log_mel_l1": value, "vuv_f1": math.nan if value == 4.0 else 1.0} for value in values]
    summary = metrics.summarize(results)
    # t(0.975, 3) = 3.182446 (tables); sample standard deviation of 1..4 = 1.290994
    half = 3.182446 * 1.290994 / 2
    assert summary["log_mel_l1"]["mean"] == pytest.approx(2.5)
    assert summary["log_mel_l1"]["low"] == pytest.approx(2.5 - half, rel=1e-5)
    assert summary["log_mel_l1"]["high"] == pytest.approx(2.5 + half, rel=1e-5)
    assert summary["log_mel_l1"]["n"] == 4
    assert summary["vuv_f1"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}  # the undefined clip left out
    single = metrics.summarize(results[:1])["log_mel_l1"]
    assert single["mean"] == 1.0 and single["low"] is None and single["high"] is None
    table = metrics.format_table(summary, 4)
    assert "[0.446, 4.554]" in table and "3/4" in table
    for label, _ in metrics.MEASURES.values():
        assert label in table


# ----------------------------------------------------------------------------- through train.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 training steps with TensorBoard and one checkpoint at the end, on 2 test clips."""
    folder = str(tmp_path_factory.mktemp("metrics"))
    make_corpus(folder)
    config = write_config(
        folder, train_config__with_tensorboard=True, train_config__epochs=1, train_config__iters_per_checkpoint=3
    )
    # One thread: a tiny model gains nothing from more, and on a busy machine they only wait for each other.
    result = run("-c", config, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return folder, config, os.path.join(folder, "exp", "tiny", "waveflow_3"), result


@pytest.mark.slow
def test_training_writes_the_measures_to_tensorboard(trained):
    folder, _, _, result = trained
    assert "iteration 3: 2 test clips at temperature 0.8" in result.stdout and "log-mel L1" in result.stdout
    events = EventAccumulator(os.path.join(folder, "exp", "tiny", "logs"))
    events.Reload()
    for name in ("log_mel_l1", "mr_stft", "vuv_f1", "periodicity_rmse"):
        [scalar] = events.Scalars(f"eval/{name}")
        assert scalar.step == 3 and np.isfinite(scalar.value)
    assert ("eval/pesq_wb" in events.Tags()["scalars"]) == metrics.pesq_available()


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """`train.py -v --json PATH` on the trained checkpoint: (its stdout, the JSON document)."""
    _, config, checkpoint, _ = trained
    path = str(tmp_path_factory.mktemp("evaluation") / "results.json")
    stdout, _ = evaluate("-v", "-c", config, "--checkpoint_path", checkpoint, "--json", path)
    return stdout, json.load(open(path))


def evaluate(*args) -> tuple[str, str]:
    """train.py's command line in this process (no second interpreter to start): -> (stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = train.main(list(args))
    assert status == 0, stderr.getvalue()
    return stdout.getvalue(), stderr.getvalue()


@pytest.mark.slow
def test_evaluate_prints_the_table_and_writes_json(trained, evaluated):
    folder, _, checkpoint, _ = trained
    stdout, document = evaluated
    assert "2 clips synthesized at temperature 0.8 (seed 1234)" in stdout
    for label, _ in metrics.MEASURES.values():
        assert label in stdout
    assert "log-likelihood (LL)" in stdout.strip().splitlines()[-2]  # then "wrote PATH"
    assert document["temperature"] == 0.8 and document["checkpoint"] == checkpoint
    assert [clip["name"] for clip in document["clips"]] == ["clip06", "clip07"]
    assert np.isfinite(document["log_likelihood"]["log_likelihood"])
    for name in ("log_mel_l1", "mr_stft", "vuv_f1", "periodicity_rmse"):
        values = [clip[name] for clip in document["clips"]]
        assert document["measures"][name]["mean"] == pytest.approx(np.mean(values))
        assert document["measures"][name]["n"] == 2
    # The checkpoint report synthesized the same clips with the same noise (weight norm not yet folded there).
    events = EventAccumulator(os.path.join(folder, "exp", "tiny", "logs"))
    events.Reload()
    for name in ("log_mel_l1", "mr_stft"):
        assert events.Scalars(f"eval/{name}")[0].value == pytest.approx(document["measures"][name]["mean"], rel=1e-3)


@pytest.mark.slow
def test_evaluate_precomputed_mels_against_their_audio(trained, evaluated, tmp_path):
    folder, config, checkpoint, _ = trained
    mels = tmp_path / "mels"
    write_mels(os.path.join(folder, "test.txt"), config, str(mels))  # as mel2samp.py does
    # clip06.wav.pt finds its audio in the test list; other.npy finds other.wav beside it.
    np.save(mels / "other.npy", torch.load(mels / "clip07.wav.pt").numpy())
    shutil.copy(os.path.join(folder, "clip07.wav"), mels / "other.wav")
    os.remove(mels / "clip07.wav.pt")
    stdout, stderr = evaluate("-v", "--mels", str(mels), "-c", config, "--checkpoint_path", checkpoint, "--json", "-")
    document = json.loads(stdout)  # stdout holds only the JSON; the table went to stderr
    assert "log-mel L1" in stderr and document["log_likelihood"] is None
    assert [clip["name"] for clip in document["clips"]] == ["clip06", "other"]
    # The same mels and recordings as the test list's clips: the same synthesis and the same values.
    for clip, same in zip(document["clips"], evaluated[1]["clips"], strict=True):
        for name in ("log_mel_l1", "mr_stft", "vuv_f1", "periodicity_rmse"):
            assert clip[name] == pytest.approx(same[name], rel=1e-6)


@pytest.mark.slow
def test_a_mel_without_audio_is_an_error_naming_where_it_looked(trained, tmp_path):
    _, config, _, _ = trained
    np.save(tmp_path / "lonely.npy", np.zeros((80, 10), dtype=np.float32))
    args = argparse.Namespace(mels=[str(tmp_path)])
    with pytest.raises(
        DataError,
        match=r"lonely.npy: no audio to measure it against: looked for lonely.wav or "
        r"lonely.flac beside it and in .*test.txt",
    ):
        synthesis.evaluation_inputs(load_config(config), args)


@pytest.mark.slow
def test_a_mel_of_another_hop_than_its_recording_is_refused_naming_both(trained, tmp_path):
    """-v --mels measures a synthesis against the first samples of its recording: a mel of another hop (or
    another clip) would be measured against the wrong part of it. As `data_config.mel_directory` refuses it."""
    folder, config, _, _ = trained
    shutil.copy(os.path.join(folder, "clip07.wav"), tmp_path / "clip07.wav")
    frames = 1 + len(load_audio(str(tmp_path / "clip07.wav"), RATE)) // HOP
    args = argparse.Namespace(mels=[str(tmp_path)], mel_scale="ln", mel_stats=None)
    for stored, accepted in ((frames + 2, True), (frames - 2, True), (frames * 256 // 160, False), (frames + 3, False)):
        np.save(tmp_path / "clip07.npy", np.full((80, stored), -5.0, dtype=np.float32))
        if accepted:
            assert [name for name, *_ in synthesis.evaluation_inputs(load_config(config), args)] == ["clip07"]
        else:
            with pytest.raises(DataError, match=rf"clip07.npy: mel has {stored} frames, its audio .*clip07.wav"):
                synthesis.evaluation_inputs(load_config(config), args)


def test_default_temperatures_and_argument_checks():
    assert train.parse_args(["-s", "-c", "x.json"]).temp == 1.0  # the original's synthesis default
    assert train.parse_args(["-v", "-c", "x.json"]).temp == train.MEASURE_TEMPERATURE == 0.8
    assert train.parse_args(["-c", "x.json"]).temp == 0.8  # the checkpoint reports in training
    assert train.parse_args(["-v", "-t", "0.6", "-c", "x.json"]).temp == 0.6
    for wrong in (
        ["--json", "-", "-c", "x.json"],
        ["-s", "--json", "r.json", "-c", "x.json"],
        ["--mels", "m", "-c", "x.json"],
    ):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            train.parse_args(wrong)
