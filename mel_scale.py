"""Mels from other models: recognise a mel in other units than this vocoder's, and convert it.

The vocoder is conditioned on Tacotron 2's mel, ``ln(max(mel of magnitudes, 1e-5))``
(`data.MelSpectrogram`). Acoustic models written for other vocoders often produce
the same mel in other units, and a vocoder given those makes noise:

- ``log10``: ESPnet and ParallelWaveGAN take log10, so their mel is the ln mel / ln 10 (/ 2.303);
- ``db``: decibels (librosa's ``amplitude_to_db``, or ``power_to_db`` of a power mel), 20 / ln 10
  (8.686) times the ln mel;
- normalised: ESPnet and ParallelWaveGAN train on mels with the mean and standard deviation of
  each band over the training corpus removed, ``(mel - mean) / std``; their statistics files
  (ESPnet's ``feats_stats.npz``, ParallelWaveGAN's ``stats.h5`` or ``stats.npy``) undo it.

`MelConversion` undoes the normalisation first (`--mel_stats`: the statistics are in the units of
the mel before it was normalised), then the scale (`--mel_scale`), and floors the result at this
vocoder's ln(1e-5), which a converted mel may pass (ParallelWaveGAN floors at 1e-10).

`looks_like` tells the units of a mel from two numbers: the log of the standard deviation of its
values (a change of units multiplies it, so the log shifts by the log of the factor) and its mean
over that standard deviation (which no change of scale alters, and which normalisation brings to
zero). The centres of the four kinds are those numbers' means over real ln mels, the bundled demo
corpus (`corpus_features`; tests/test_mel_scale.py recomputes them), moved by the log of each
scale factor, and over the same mels normalised with the corpus's own statistics. The tolerances
are wider than that one voice's spread, for other voices and recordings: a mel is taken for the
kind whose centre is nearest in those units.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from data import LOG_FLOOR, DataError, holds_pickled_objects
from storage import warn

# value of the mel in these units = factor * the ln mel
MEL_SCALES = {"ln": 1.0, "log10": 1 / math.log(10), "db": 20 / math.log(10)}
LN_FLOOR = math.log(LOG_FLOOR)  # the smallest value of an ln mel, about -11.51
# (log of the standard deviation of a mel's values, their mean / that standard deviation), averaged over the
# ln mels of the demo corpus's 32 clips (spread 0.02 and 0.06), and over the same mels normalised per band.
LN_FEATURES = (0.838, -2.284)
NORMALISED_FEATURES = (-0.002, 0.001)
# How far from a centre a mel of that kind may lie: wider than the demo voice's spread, which is one voice
# in one recording; a level 10 dB up or down moves the second feature by about 0.5.
FEATURE_TOLERANCES = (0.15, 0.5)
STATS_EPSILON = 1e-20  # ESPnet's floor on a band's variance
# Fewer frames say nothing of a mel's units: every window of this many frames of the demo corpus's ln mels is
# taken as ln, where shorter ones of quiet frames (the end of a clip) may be taken for log10 (docs/corpora.md).
MIN_FRAMES = 48
# An ln mel as read lies above ln(1e-5), but for a TTS model's prediction scattered around the floor in silence,
# or a half-precision copy (ln(1e-5) in float16 is 0.003 lower): a mel with more than this fraction of its values
# more than FLOOR_MARGIN below the floor (in dB, or floored lower, such as at 1e-10) is not one.
BELOW_FLOOR_QUANTILE = 0.01
FLOOR_MARGIN = 1.0
# After a conversion, more of the values below ln(1e-5) than this means a wrong one: a correctly converted mel
# of speech 30 dB quieter than the demo's has a fifth there, an ln mel given --mel_scale log10 about half.
BELOW_FLOOR_FRACTION = 0.25

ADVICE = {
    "log10": "--mel_scale log10 converts it",
    "db": "--mel_scale db converts it",
    "normalised": "--mel_stats FILE, the mean and std per band its model was trained with, converts it",
    "linear": "a mel of magnitudes needs ln(max(mel, 1e-5)) first, one scaled into [0, 1] its scaling undone",
}
DESCRIPTIONS = {
    "log10": "a log10 mel (the ln mel / 2.303, as ESPnet and ParallelWaveGAN make)",
    "db": "a mel in decibels (8.686 times the ln mel)",
    "normalised": "a mean-variance normalised mel (mean near 0, std near 1)",
    "linear": "a mel with no negative value (magnitudes, not their log, or a mel scaled into [0, 1])",
}


def features(mel: np.ndarray) -> tuple[float, float]:
    """mel [n_mels, F] -> (log of the std of its values, their mean / that std)."""
    values = np.asarray(mel, dtype=np.float64)
    std = float(values.std())
    return math.log(std), float(values.mean()) / std


def corpus_features(mels: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """The centres of `looks_like` from real ln mels [n_mels, F_i]: the mean features of the mels, and of the
    mels normalised with the mean and std of each band over all of them (as ESPnet and ParallelWaveGAN do)."""
    frames = np.concatenate(mels, axis=1)
    mean, std = frames.mean(axis=1, keepdims=True), frames.std(axis=1, keepdims=True)
    ln = np.array([features(mel) for mel in mels]).mean(axis=0)
    normalised = np.array([features((mel - mean) / std) for mel in mels]).mean(axis=0)
    return {"ln": (float(ln[0]), float(ln[1])), "normalised": (float(normalised[0]), float(normalised[1]))}


def looks_like(mel: torch.Tensor | np.ndarray, floored: bool = True) -> str | None:
    """The units `mel [n_mels, F]` looks like: "ln", "log10", "db", "normalised" or "linear"; None for a
    constant mel and, unless it has no negative value, for one of fewer than `MIN_FRAMES` frames: they say
    nothing of their units. A mel `floored` as this vocoder's is (as read, not one converted from other units,
    whose floor may lie lower) is not an ln mel if more than 1% of its values lie more than 1 below ln(1e-5)."""
    values = mel.detach().cpu().numpy() if isinstance(mel, torch.Tensor) else mel
    values = np.asarray(values, dtype=np.float64)  # as `features` computes: a float32 std of a constant is not 0
    if values.size < 2 or float(values.min()) == float(values.max()):
        return None
    if float(values.min()) >= 0.0:
        return "linear"
    if values.shape[-1] < MIN_FRAMES:
        return None
    centres = {name: (LN_FEATURES[0] + math.log(factor), LN_FEATURES[1]) for name, factor in MEL_SCALES.items()}
    centres["normalised"] = NORMALISED_FEATURES
    if floored and float(np.quantile(values, BELOW_FLOOR_QUANTILE)) < LN_FLOOR - FLOOR_MARGIN:
        del centres["ln"]  # far below the floor of an ln mel, and not a few values: it is not one
    observed = features(values)

    def distance(centre: tuple[float, float]) -> float:
        return sum(((o - c) / t) ** 2 for o, c, t in zip(observed, centre, FEATURE_TOLERANCES, strict=True))

    return min(centres, key=lambda name: distance(centres[name]))


def describe_values(mel: torch.Tensor) -> str:
    return f"values {mel.min().item():.3g} to {mel.max().item():.3g}, mean {mel.mean().item():.3g}"


def read_mel_stats(path: str, n_mel_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std per band [n_mels] of a statistics file as ESPnet or ParallelWaveGAN write them:

    - ``.npy`` of shape [2, n_mels]: ParallelWaveGAN's ``stats.npy``, the mean then the scale (std);
    - ``.npy`` of shape [2, n_mels + 1]: Kaldi's and ESPnet1's, the sums then the sums of squares of each
      band, with the frame count last in the first row;
    - ``.npz`` with ``count``, ``sum`` and ``sum_square``: ESPnet2's ``feats_stats.npz``; or with ``mean``
      and ``scale`` (or ``std``);
    - ``.h5`` with datasets ``mean`` and ``scale``: ParallelWaveGAN's ``stats.h5`` (needs h5py).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: statistics file not found")
    extension = os.path.splitext(path)[1].lower()
    try:
        if extension == ".npy" and holds_pickled_objects(path):  # never unpickled: a pickle can run code
            converted = os.path.join(os.path.dirname(path), "mel_stats.npy")
            raise DataError(
                f"{path}: holds a pickled Python object, not an array (Coqui TTS's scale_stats.npy?); if it is "
                f"Coqui's, convert it: python -c \"import numpy as np; d = np.load({path!r}, allow_pickle=True)"
                f".item(); np.save({converted!r}, np.stack([d['mel_mean'], d['mel_std']]))\", and give "
                f"--mel_stats {converted} --mel_scale db (Coqui's mels are 20 log10 of magnitudes by default)"
            )
        if extension == ".npy":
            stats = np.load(path, allow_pickle=False)
            mean, std = _from_rows(path, stats, n_mel_channels)
        elif extension == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                mean, std = _from_arrays(path, {key: archive[key] for key in archive.files})
        elif extension in (".h5", ".hdf5"):
            try:
                import h5py  # pyright: ignore[reportMissingImports] -- optional: pip install h5py
            except ImportError:
                raise DataError(f"{path}: reading .h5 statistics needs h5py (pip install h5py)") from None
            with h5py.File(path, "r") as f:
                mean, std = _from_arrays(path, {key: np.asarray(f[key]) for key in f.keys()})
        else:
            raise DataError(f"{path}: unknown statistics file type '{extension}', expected .npy, .npz or .h5")
    except DataError:
        raise
    except Exception as error:  # np.load and h5py raise many types for a damaged file
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"{path}: cannot read statistics ({reason})") from None
    mean, std = np.asarray(mean, dtype=np.float64).reshape(-1), np.asarray(std, dtype=np.float64).reshape(-1)
    if mean.shape != (n_mel_channels,) or std.shape != (n_mel_channels,):
        raise DataError(
            f"{path}: statistics of {mean.size} bands, expected {n_mel_channels} (data_config.n_mel_channels)"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise DataError(f"{path}: statistics hold NaN, infinite or non-positive standard deviations")
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def _from_rows(path: str, stats: np.ndarray, n_mel_channels: int) -> tuple[np.ndarray, np.ndarray]:
    if stats.ndim == 2 and stats.shape == (2, n_mel_channels):
        return stats[0], stats[1]
    if stats.ndim == 2 and stats.shape == (2, n_mel_channels + 1):
        count = stats[0, -1]
        mean = stats[0, :-1] / count
        return mean, np.sqrt(np.maximum(stats[1, :-1] / count - mean * mean, STATS_EPSILON))
    raise DataError(
        f"{path}: statistics of shape {list(stats.shape)}, expected [2, {n_mel_channels}] (ParallelWaveGAN: "
        f"mean, then scale) or [2, {n_mel_channels + 1}] (Kaldi/ESPnet1: sums, sums of squares and count)"
    )


def _from_arrays(path: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if {"count", "sum", "sum_square"} <= arrays.keys():
        count = arrays["count"]
        mean = arrays["sum"] / count
        return mean, np.sqrt(np.maximum(arrays["sum_square"] / count - mean * mean, STATS_EPSILON))
    for name in ("scale", "std"):
        if "mean" in arrays and name in arrays:
            return arrays["mean"], arrays[name]
    raise DataError(
        f"{path}: holds {', '.join(sorted(arrays)) or 'nothing'}; expected count, sum and sum_square (ESPnet2) "
        f"or mean and scale (ParallelWaveGAN)"
    )


class MelConversion:
    """What `-s/-v --mels` does to each mel it reads: undo `--mel_stats`, then `--mel_scale`, floor at ln(1e-5),
    and warn, in one line naming the file, when the result does not look like an ln mel."""

    def __init__(self, scale: str = "ln", stats_path: str | None = None, n_mel_channels: int = 80):
        self.scale = scale
        self.stats_path = stats_path
        self.stats = read_mel_stats(stats_path, n_mel_channels) if stats_path else None

    def __call__(self, mel: torch.Tensor, source: str) -> torch.Tensor:
        """mel [n_mels, F] as read from `source` -> the ln mel [n_mels, F] the vocoder takes."""
        converted = self.scale != "ln" or self.stats is not None
        read = mel
        if self.stats is not None:
            mean, std = self.stats
            mel = mel * std[:, None] + mean[:, None]
        if converted:
            mel = mel / MEL_SCALES[self.scale]
        kind = looks_like(mel, floored=not converted)  # before the floor, which would hide a wrong scale
        given = " ".join(
            option
            for option in (
                f"--mel_stats {self.stats_path}" if self.stats_path else "",
                f"--mel_scale {self.scale}" if self.scale != "ln" else "",
            )
            if option
        )
        if kind is not None and kind != "ln":
            state = f"after {given} it still looks like" if converted else "looks like"
            warn(
                f"{source}: {state} {DESCRIPTIONS[kind]} ({describe_values(mel)}), not the natural-log mel the "
                f"vocoder takes: {self.advice(kind)}"
            )
        elif converted and (below := float((mel < LN_FLOOR - 1e-3).float().mean())) > BELOW_FLOOR_FRACTION:
            as_read = looks_like(read)
            if as_read == "ln":
                advice = f"as read it looks like the natural-log mel already: leave out {given}"
            elif as_read in MEL_SCALES and self.stats_path:
                advice = f"as read it looks like {DESCRIPTIONS[as_read]}: --mel_scale {as_read} without --mel_stats"
            elif as_read is not None:
                advice = f"as read it looks like {DESCRIPTIONS[as_read]}: {self.advice(as_read)}"
            else:
                advice = f"does the mel as read need {given}?"
            warn(
                f"{source}: after {given} it still looks like no natural-log mel: {below:.0%} of its values lie "
                f"below its floor ln(1e-5) = {LN_FLOOR:.1f} and are clamped to it ({describe_values(mel)}); {advice}"
            )
        return mel.clamp(min=LN_FLOOR) if converted else mel

    def advice(self, kind: str) -> str:
        """What converts a mel that looks like `kind` (not "ln"), given the options given."""
        if kind == "normalised" and self.stats_path:
            return f"are the statistics in {self.stats_path} the ones its model was trained with?"
        return ADVICE[kind]
