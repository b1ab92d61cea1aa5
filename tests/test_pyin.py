"""pyin.py: librosa's pYIN, bit for bit, with a Viterbi decoding that visits only nonzero transitions."""

import importlib.metadata
import os

import librosa
import numpy as np
import pytest

import metrics
import pyin
from data import load_audio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRRORED = importlib.metadata.version("librosa").startswith(pyin.MIRRORED_LIBROSA)


def signals(rate: int) -> dict[str, np.ndarray]:
    """Speech (a demo recording, resampled where `rate` is another), a glide, a square wave, noise, silence
    and a clip shorter than one frame hop, float32 as the measures take them."""
    time = np.arange(2 * rate) / rate
    rng = np.random.default_rng(0)
    speech = np.asarray(load_audio(os.path.join(ROOT, "data", "demo", "wavs", "demo_008.wav"), 22050))
    if rate != 22050:
        speech = librosa.resample(speech, orig_sr=22050, target_sr=rate)
    clips = {
        "speech": speech,
        "glide 100-500 Hz": 0.3 * np.sin(2 * np.pi * (100 + 100 * time) * time),
        "square 180 Hz": 0.5 * np.sign(np.sin(2 * np.pi * 180 * time)),
        "noise": 0.1 * rng.standard_normal(rate // 2),
        "silence": np.zeros(rate // 4),
        "a hop": 0.1 * rng.standard_normal(100),
    }
    return {name: clip.astype(np.float32) for name, clip in clips.items()}


@pytest.mark.parametrize("rate,hop", [(22050, 256), (24000, 300), (44100, 512)])
def test_pyin_gives_librosas_pitch_voicing_and_probability_bit_for_bit(rate, hop):
    fmin, fmax, frame_length = metrics.PITCH_FMIN, metrics.PITCH_FMAX, metrics.pitch_frame_length(rate)
    clips = signals(rate)
    clips["speech in float64"] = clips["speech"].astype(np.float64)
    for name, clip in clips.items():
        expected = librosa.pyin(clip, fmin=fmin, fmax=fmax, sr=rate, frame_length=frame_length, hop_length=hop)
        got = pyin.pyin(clip, fmin=fmin, fmax=fmax, sr=rate, frame_length=frame_length, hop_length=hop)
        for label, a, b in zip(("f0", "voiced", "probability"), expected, got, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, label)
            assert np.array_equal(a, b, equal_nan=True), (name, label)


@pytest.mark.skipif(not MIRRORED, reason="another librosa: pyin.pyin hands the work to librosa.pyin")
def test_with_the_mirrored_librosa_the_decoding_is_pyins_own(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("librosa's Viterbi decoding was called")

    monkeypatch.setattr(librosa.sequence, "viterbi", refused)
    assert pyin.fast_path()
    f0, voiced, _ = pyin.pyin(
        signals(22050)["square 180 Hz"], fmin=50.0, fmax=550.0, sr=22050, frame_length=1024, hop_length=256
    )
    assert voiced[10:-10].all() and np.allclose(f0[10:-10], 180, rtol=0.01)


def random_chain(rng: np.random.Generator, states: int, steps: int, band: int, levels: int):
    """A random hidden Markov chain whose transitions from state i reach only states within `band` of it,
    and whose probabilities take `levels` values (few: equal scores, so ties, are common); some
    observations are zero."""
    transition = rng.integers(1, levels + 1, size=(states, states)).astype(np.float64)
    distance = np.abs(np.arange(states)[:, None] - np.arange(states)[None, :])
    transition[distance > band] = 0
    transition /= transition.sum(axis=1, keepdims=True)
    prob = rng.integers(0, levels + 1, size=(states, steps)) / levels
    p_init = np.full(states, 1 / states)
    return prob, transition, p_init


@pytest.mark.parametrize("band,levels", [(0, 3), (1, 2), (2, 4), (5, 1000), (40, 2)])
def test_the_sparse_decoding_chooses_as_librosas_dense_one_ties_included(band, levels):
    rng = np.random.default_rng(band * 1000 + levels)
    for _ in range(20):
        states = int(rng.integers(2, 60))
        prob, transition, p_init = random_chain(rng, states, int(rng.integers(1, 40)), band, levels)
        expected = librosa.sequence.viterbi(prob, transition, p_init=p_init)
        got = pyin.decode(prob, pyin.sparse_chain(transition, p_init))
        assert np.array_equal(got, expected), (states, band, levels)


def dense_viterbi(log_prob: np.ndarray, log_trans: np.ndarray, log_p_init: np.ndarray) -> np.ndarray:
    """librosa's Viterbi recursion as its documentation states it, over the whole matrix: `log_prob [T, S]`,
    each choice `np.argmax` (the lowest state among equal scores)."""
    value = log_prob[0] + log_p_init
    pointers = []
    for t in range(1, len(log_prob)):
        scores = value[:, None] + log_trans  # [from, to]
        pointers.append(np.argmax(scores, axis=0))
        value = log_prob[t] + scores[pointers[-1], np.arange(len(value))]
    path = [int(np.argmax(value))]
    for pointer in reversed(pointers):
        path.append(int(pointer[path[-1]]))
    return np.array(path[::-1])


@pytest.mark.parametrize("band", [0, 1, 3, 10])
def test_equal_scores_through_zero_and_nonzero_transitions_go_to_the_lowest_state(band):
    """Scores in small integers, so that they tie exactly and often, the zero transitions' score among
    the others': each choice between equal scores, whichever kind of transition gives them, is the lowest
    state's, as librosa's `argmax` makes it."""
    rng = np.random.default_rng(band)
    for _ in range(50):
        states, steps = int(rng.integers(2, 30)), int(rng.integers(1, 20))
        zero_log = -float(rng.integers(1, 4))
        log_trans = -rng.integers(0, 4, size=(states, states)).astype(np.float64)
        distance = np.abs(np.arange(states)[:, None] - np.arange(states)[None, :])
        log_trans[distance > band] = zero_log
        log_prob = -rng.integers(0, 3, size=(steps, states)).astype(np.float64)
        log_p_init = -rng.integers(0, 2, size=states).astype(np.float64)
        # The transitions sparse_viterbi is told are nonzero: those within the band.
        got = pyin.sparse_viterbi(log_prob, log_p_init, *pyin.by_column(log_trans, distance <= band), zero_log)
        assert np.array_equal(got, dense_viterbi(log_prob, log_trans, log_p_init)), (states, steps, band)
