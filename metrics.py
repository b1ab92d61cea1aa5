"""Objective measures of synthesized speech against the real audio it should reproduce.

The measures that vocoder papers report, each comparing one synthesis with its
recording (mono float audio in [-1, 1] at the same rate, the config's, with the
config's hop). Lower is better except for V/UV F1 and PESQ.

- ``log_mel_l1``: mean absolute difference, over 80 bands and all frames, of the natural
  log of Tacotron 2's mel spectrogram of magnitudes (``data.MelSpectrogram``, the feature
  the vocoder is conditioned on at 22,050 Hz: 1024-point STFT, 0-8 kHz; at another rate
  the same bands from a window as long in time, with the config's hop) floored at 1e-2
  instead of 1e-5 (at another rate, 1e-2 scaled with the window, which scales the
  magnitudes), so that differences in near-silence, which nobody hears, do not dominate:
  the same audio at another rate gives the same value.
- ``mr_stft``: the multi-resolution STFT distance of Parallel WaveGAN (Yamamoto et al.,
  ICASSP 2020, Section 2.3): spectral convergence plus the L1 distance of log STFT
  magnitudes, averaged over FFT sizes 512/1024/2048 with hops 50/120/240 and Hann
  windows of 240/600/1200 samples.
- ``f0_rmse_cents``, ``vuv_f1``, ``periodicity_rmse``: the pitch measures of CARGAN
  (Morrison et al., ICLR 2022, Section 5): RMS F0 error in cents on the frames voiced in
  both, F1 of the synthesis's voicing decisions with the recording's as truth, and RMS
  difference of a per-frame periodicity. Pitch, voicing and periodicity (the voicing
  probability) come from librosa's probabilistic YIN (Mauch and Dixon, ICASSP 2014), not
  from CREPE as in CARGAN, so the values compare with each other, not with that paper's;
  `pyin.pyin` gives librosa's values bit for bit, 4-5x as fast.
- ``pesq_wb``: wide band PESQ (ITU-T P.862.2, from 1.04 to 4.64) at 16 kHz, from the
  ``pesq`` package when it is installed (``pip install pesq``); absent otherwise.

A synthesis of F mel frames has ``hop_length * (F - 3)`` samples, a little shorter than its
recording: both are cut to the shorter before measuring. Both are taken as a 16-bit
file would play them: clamped to [-1, 1], with non-finite samples as silence. A
measure that a clip leaves undefined (F0 error with no frame voiced in both, F1 with no
voiced frame in either, PESQ where the recording holds no speech, the multi-resolution STFT
where it is silent) is NaN for that clip and left out of the mean.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.signal
import scipy.stats
import torch

from data import MelSpectrogram
from pyin import pyin

LOG_MEL_FLOOR = 1e-2
STFT_RESOLUTIONS = ((512, 50, 240), (1024, 120, 600), (2048, 240, 1200))  # (fft size, hop, window)
STFT_MAGNITUDE_FLOOR = 1e-7  # on the squared magnitude, as Parallel WaveGAN's code clamps it
SILENCE_PEAK = 1 / 32768  # a recording whose samples all stay below one 16-bit step is silent
# Speech pitch range, as CARGAN's (50-550 Hz): wide enough for low male and high female and child voices.
PITCH_FMIN, PITCH_FMAX = 50.0, 550.0
# pYIN's frame at PITCH_FRAME_RATE, the mel's window; its 512-sample YIN windows reach down to 43 Hz. At another
# rate the frame is the power of two that keeps at least this duration (pitch_frame_length).
PITCH_FRAME_LENGTH, PITCH_FRAME_RATE = 1024, 22050
LOG_MEL_FMAX = 8000.0  # the 22,050 Hz configs' mel_fmax
PESQ_RATE = 16000
INTERVAL_LEVEL = 0.95

# name -> (label in tables, whether higher is better)
MEASURES = {
    "log_mel_l1": ("log-mel L1", False),
    "mr_stft": ("multi-resolution STFT", False),
    "f0_rmse_cents": ("F0 RMS error (cents)", False),
    "vuv_f1": ("V/UV F1", True),
    "periodicity_rmse": ("periodicity RMS error", False),
    "pesq_wb": ("PESQ wide band", True),
}


def pesq_available() -> bool:
    try:
        import pesq  # noqa: F401  # pyright: ignore[reportMissingImports] -- optional: pip install pesq
    except ImportError:
        return False
    return True


def _as_audio(audio) -> np.ndarray:
    """A tensor or array [T] -> float32 array [T] as a 16-bit file plays it."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio [T], got shape {list(audio.shape)}")
    return np.clip(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def align(synthesis, reference) -> tuple[np.ndarray, np.ndarray]:
    """Both as float32 arrays, cut to the shorter: -> (synthesis [T], reference [T])."""
    synthesis, reference = _as_audio(synthesis), _as_audio(reference)
    length = min(synthesis.shape[0], reference.shape[0])
    return synthesis[:length], reference[:length]


def pitch_frame_length(sampling_rate: int) -> int:
    """pYIN's frame at `sampling_rate`: at least as long in time as `PITCH_FRAME_LENGTH` at `PITCH_FRAME_RATE`."""
    return PITCH_FRAME_LENGTH * 2 ** max(0, math.ceil(math.log2(sampling_rate / PITCH_FRAME_RATE)))


def min_samples(sampling_rate: int) -> int:
    """The fewest samples `measure` takes at `sampling_rate`: more than half the largest window (the largest
    of `STFT_RESOLUTIONS`', the pitch's, `pitch_frame_length`, and the log-mel's), for their reflect padding."""
    windows = (pitch_frame_length(sampling_rate), log_mel_window(sampling_rate))
    largest = max(*(fft_size for fft_size, _, _ in STFT_RESOLUTIONS), *windows)
    return largest // 2 + 1


def log_mel_window(sampling_rate: int) -> int:
    """The log-mel L1's window (and FFT) at `sampling_rate`: as long in time as 1,024 samples at 22,050 Hz."""
    return round(PITCH_FRAME_LENGTH * sampling_rate / PITCH_FRAME_RATE)


def log_mel_l1(synthesis: np.ndarray, reference: np.ndarray, sampling_rate: int, hop_length: int) -> float:
    """Mean |log mel(synthesis) - log mel(reference)| over bands and frames; aligned inputs [T]. The window is
    `log_mel_window`, and the floor scales with it as the magnitudes do (a Hann window's sum): the same audio
    resampled gives the same value."""
    window = log_mel_window(sampling_rate)
    mel = MelSpectrogram(
        sampling_rate=sampling_rate,
        filter_length=window,
        hop_length=hop_length,
        win_length=window,
        mel_fmax=min(LOG_MEL_FMAX, sampling_rate / 2),
        log_floor=LOG_MEL_FLOOR * window / PITCH_FRAME_LENGTH,
    )
    with torch.no_grad():
        difference = mel(torch.from_numpy(synthesis)) - mel(torch.from_numpy(reference))  # [80, F]
    return difference.abs().mean().item()


def _stft_magnitude(audio: torch.Tensor, fft_size: int, hop: int, window: int) -> torch.Tensor:
    spectrum = torch.stft(
        audio, n_fft=fft_size, hop_length=hop, win_length=window, window=torch.hann_window(window), return_complex=True
    )  # [fft_size // 2 + 1, F]
    return torch.sqrt(torch.clamp(spectrum.real**2 + spectrum.imag**2, min=STFT_MAGNITUDE_FLOOR))


def multi_resolution_stft(synthesis: np.ndarray, reference: np.ndarray) -> float:
    """Mean over `STFT_RESOLUTIONS` of spectral convergence + log-magnitude L1; aligned inputs [T]. NaN where
    the recording is silent (no sample reaches a 16-bit step): spectral convergence divides by its norm."""
    if np.abs(reference).max() < SILENCE_PEAK:
        return math.nan
    total = 0.0
    for fft_size, hop, window in STFT_RESOLUTIONS:
        predicted = _stft_magnitude(torch.from_numpy(synthesis), fft_size, hop, window)
        target = _stft_magnitude(torch.from_numpy(reference), fft_size, hop, window)
        spectral_convergence = torch.linalg.norm(target - predicted) / torch.linalg.norm(target)
        log_magnitude = (target.log() - predicted.log()).abs().mean()
        total += (spectral_convergence + log_magnitude).item()
    return total / len(STFT_RESOLUTIONS)


def pitch(audio: np.ndarray, sampling_rate: int, hop_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pYIN on audio [T] -> (f0 [F] in Hz, NaN where unvoiced; voiced [F] bool; voicing probability [F]),
    F = 1 + T // hop_length: one pitch frame per mel frame. F0 is quantised to pYIN's 10-cent grid."""
    f0, voiced, probability = pyin(
        audio,
        fmin=PITCH_FMIN,
        fmax=PITCH_FMAX,
        sr=sampling_rate,
        frame_length=pitch_frame_length(sampling_rate),
        hop_length=hop_length,
    )
    return f0, voiced, probability


def pitch_measures(
    synthesis: np.ndarray, reference: np.ndarray, sampling_rate: int, hop_length: int
) -> dict[str, float]:
    """F0 RMS error in cents (frames voiced in both), V/UV F1 (reference voicing as truth) and
    RMS periodicity (voicing probability) difference over all frames; aligned inputs [T]."""
    f0, voiced, probability = pitch(synthesis, sampling_rate, hop_length)
    f0_true, voiced_true, probability_true = pitch(reference, sampling_rate, hop_length)
    both = voiced & voiced_true
    cents = 1200.0 * np.log2(f0[both] / f0_true[both])
    true_positives, false_positives = both.sum(), (voiced & ~voiced_true).sum()
    false_negatives = (~voiced & voiced_true).sum()
    decisive = 2 * true_positives + false_positives + false_negatives
    return {
        "f0_rmse_cents": float(np.sqrt(np.mean(cents**2))) if both.any() else math.nan,
        "vuv_f1": float(2 * true_positives / decisive) if decisive else math.nan,
        "periodicity_rmse": float(np.sqrt(np.mean((probability - probability_true) ** 2))),
    }


def pesq_wideband(synthesis: np.ndarray, reference: np.ndarray, sampling_rate: int) -> float:
    """Wide band PESQ of aligned inputs [T], resampled to 16 kHz; NaN where the pesq package cannot
    score them (it finds no speech in the recording, or fails on an all-zero synthesis)."""
    from pesq import NoUtterancesError, pesq  # pyright: ignore[reportMissingImports] -- optional

    divisor = math.gcd(PESQ_RATE, sampling_rate)
    up, down = PESQ_RATE // divisor, sampling_rate // divisor
    degraded = scipy.signal.resample_poly(synthesis, up, down).astype(np.float32)
    clean = scipy.signal.resample_poly(reference, up, down).astype(np.float32)
    try:
        return float(pesq(PESQ_RATE, clean, degraded, "wb"))
    except (NoUtterancesError, ValueError):  # the latter: pesq's own NaN cast on an all-zero input
        return math.nan


def measure(synthesis, reference, sampling_rate: int, hop_length: int) -> dict[str, float]:
    """Every measure of one synthesis [T] against its recording [T'] (tensors or arrays) at `sampling_rate`,
    with mel and pitch frames every `hop_length` samples; `pesq_wb` only when the pesq package is installed."""
    synthesis, reference = align(synthesis, reference)
    if synthesis.shape[0] < min_samples(sampling_rate):
        raise ValueError(
            f"{synthesis.shape[0]} samples are too few to measure (need at least {min_samples(sampling_rate)})"
        )
    results = {
        "log_mel_l1": log_mel_l1(synthesis, reference, sampling_rate, hop_length),
        "mr_stft": multi_resolution_stft(synthesis, reference),
        **pitch_measures(synthesis, reference, sampling_rate, hop_length),
    }
    if pesq_available():
        results["pesq_wb"] = pesq_wideband(synthesis, reference, sampling_rate)
    return results


def summarize(results: list[dict[str, float]]) -> dict[str, dict]:
    """Per-clip results -> {measure: {mean, low, high, n}} over the clips where it is defined.

    The interval is the mean's 95% confidence interval from Student's t distribution
    (``mean +- t(0.975, n - 1) * std / sqrt(n)``, sample standard deviation), which
    stays honest for the handful of clips measured during training; with one clip it
    is undefined (None). A measure defined on no clip has mean None, n 0 and a
    ``skipped`` reason.
    """
    summary = {}
    for name in MEASURES:
        values = np.array([result[name] for result in results if name in result], dtype=np.float64)
        values = values[np.isfinite(values)]
        entry = {"mean": None, "low": None, "high": None, "n": int(values.size)}
        if not values.size:
            entry["skipped"] = (
                "the pesq package is not installed"
                if name == "pesq_wb" and not pesq_available()
                else "undefined on every clip"
            )
        else:
            entry["mean"] = float(values.mean())
        if values.size > 1:
            half = (
                scipy.stats.t.ppf(0.5 + INTERVAL_LEVEL / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
            )
            entry["low"], entry["high"] = float(values.mean() - half), float(values.mean() + half)
        summary[name] = entry
    return summary


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def format_table(summary: dict[str, dict], clips: int) -> str:
    """A plain-text table of `summarize`'s output for `clips` measured clips."""
    lines = [f"{'measure':<24}{'mean':>9}   {'95% interval':<20}{'clips':>7}    better"]
    for name, (label, higher_is_better) in MEASURES.items():
        entry = summary[name]
        if entry["mean"] is None:
            lines.append(f"{label:<24}{'-':>9}   skipped: {entry['skipped']}")
            continue
        interval = f"[{_number(entry['low'])}, {_number(entry['high'])}]" if entry["low"] is not None else "-"
        lines.append(
            f"{label:<24}{_number(entry['mean']):>9}   {interval:<20}{entry['n']:>5}/{clips:<5}"
            f"{'higher' if higher_is_better else 'lower'}"
        )
    return "\n".join(lines)
