"""metrics.py on signals whose answers are known."""
import math
import os
import sys

import numpy as np
import pytest
import torch

import metrics
from data import load_audio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RATE = 22050
SPEECH = os.path.join(ROOT, "data", "demo", "wavs", "demo_001.wav")  # espeak-ng, about 100 Hz
FORMANTS = ((700, 150), (1200, 150), (2600, 200))  # (centre, bandwidth) in Hz: an open vowel


def envelope(frequency: np.ndarray) -> np.ndarray:
    return sum(1.0 / (1.0 + ((frequency - centre) / width) ** 2) for centre, width in FORMANTS) + 0.02


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
    return (noise * np.sqrt(np.mean(audio ** 2) / np.mean(noise ** 2))).astype(np.float32)


@pytest.fixture(scope="module")
def speech():
    return load_audio(SPEECH, RATE)  # a tensor, as train.py passes it


def test_identical_audio_scores_perfectly(speech):
    results = metrics.measure(speech, speech.numpy())  # a tensor and an array
    assert results["log_mel_l1"] == 0 and results["mr_stft"] == 0
    assert results["f0_rmse_cents"] == 0 and results["vuv_f1"] == 1 and results["periodicity_rmse"] == 0
    if metrics.pesq_available():
        assert results["pesq_wb"] == pytest.approx(4.64, abs=0.01)  # the top of P.862.2's scale


@pytest.mark.parametrize("cents", [100, 50, -35])
def test_a_pitch_shift_gives_its_cents(cents):
    reference = vowel(120.0)
    results = metrics.pitch_measures(vowel(120.0 * 2 ** (cents / 1200)), reference)
    # pYIN's F0 lies on a 10-cent grid: a shift is found to within half a step either side.
    assert results["f0_rmse_cents"] == pytest.approx(abs(cents), abs=5.5)
    assert results["vuv_f1"] == 1


def test_noise_with_the_same_envelope_is_unvoiced_and_far_in_log_mel():
    reference = vowel(120.0)
    noise = metrics.measure(noise_like(reference), reference)
    assert noise["vuv_f1"] == 0 and math.isnan(noise["f0_rmse_cents"])  # no frame voiced in both
    assert noise["periodicity_rmse"] > 0.3
    rng = np.random.default_rng(1)
    slightly_noisy = reference + 0.005 * rng.standard_normal(reference.size).astype(np.float32)  # 37 dB below
    close = metrics.measure(slightly_noisy, reference)
    assert close["vuv_f1"] == 1 and close["f0_rmse_cents"] < 5
    assert noise["log_mel_l1"] > 0.3 and noise["log_mel_l1"] > 5 * close["log_mel_l1"]


def test_silence_against_a_tone():
    tone, silence = vowel(150.0, seconds=0.5), np.zeros(RATE // 2, dtype=np.float32)
    results = metrics.measure(silence, tone)
    assert results["vuv_f1"] == 0 and math.isnan(results["f0_rmse_cents"])
    # The tone's mel is far above the 1e-2 floor that silence sits on.
    assert results["log_mel_l1"] > 1 and results["periodicity_rmse"] > 0.3
    if metrics.pesq_available():
        assert math.isnan(results["pesq_wb"])  # PESQ cannot score a silent synthesis
    reversed_roles = metrics.pitch_measures(tone, silence)
    assert reversed_roles["vuv_f1"] == 0  # voiced frames where the recording has none: false positives only
    assert math.isnan(metrics.pitch_measures(silence, silence)["vuv_f1"])  # nothing voiced: F1 undefined


def test_half_the_amplitude_gives_the_known_spectral_distances():
    # Loud white noise that never clips: every mel band and STFT bin is far above the floors, so halving
    # the amplitude moves every log magnitude by log 2 and makes the spectral convergence ||Y - Y/2|| / ||Y|| = 1/2.
    reference = np.random.default_rng(0).uniform(-0.9, 0.9, RATE).astype(np.float32)
    synthesis, reference = metrics.align(0.5 * reference, reference)
    assert metrics.log_mel_l1(synthesis, reference) == pytest.approx(math.log(2), rel=1e-4)
    assert metrics.multi_resolution_stft(synthesis, reference) == pytest.approx(0.5 + math.log(2), rel=1e-4)


def test_lengths_are_cut_to_the_shorter():
    reference = vowel(130.0)
    longer = np.concatenate([reference, np.ones(700, dtype=np.float32)])  # what follows the cut is never seen
    results = metrics.measure(reference[:-300], longer)
    assert results["log_mel_l1"] == 0 and results["mr_stft"] == 0 and results["vuv_f1"] == 1
    loud = metrics.align(torch.full((10,), 3.0), np.array([np.nan, -np.inf, 0.5]))
    assert loud[0].tolist() == [1.0, 1.0, 1.0] and loud[1].tolist() == [0.0, -1.0, 0.5]  # as a 16-bit file plays


def test_pesq_falls_with_the_noise(speech):
    pytest.importorskip("pesq")
    clean = speech.numpy()
    rng = np.random.default_rng(0)
    power = np.mean(clean ** 2)
    scores = [metrics.pesq_wideband(clean, clean)]
    for snr in (30, 10):
        noisy = clean + np.sqrt(power / 10 ** (snr / 10)) * rng.standard_normal(clean.size).astype(np.float32)
        scores.append(metrics.pesq_wideband(noisy, clean))
    assert 4.6 < scores[0] <= 4.65 and scores[0] > scores[1] > scores[2] >= 1.0


def test_without_pesq_the_measure_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)  # makes `import pesq` fail as when it is not installed
    assert not metrics.pesq_available()
    tone = vowel(200.0, seconds=0.3)
    results = metrics.measure(tone, tone)
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
