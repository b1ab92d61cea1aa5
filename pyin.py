"""pYIN pitch tracking (Mauch and Dixon, ICASSP 2014) as `librosa.pyin` computes it, decoded faster.

librosa's pYIN spends most of its time in its Viterbi decoding (`librosa.sequence.viterbi`): for every
frame it adds the previous frame's scores to the whole transition matrix of 2 x 416 pitch states (50-550
Hz at 10 cents, voiced and unvoiced), 692,224 sums a frame, and writes them out before taking each
column's maximum. Yet a pitch can move at most 5 semitones a frame (pYIN's 35.92 octaves a second at a
256-sample hop), so all but 102 entries of each column are zero. Here the decoding visits each column's
nonzero entries, and takes the best of its zero entries (all the same score, `log(tiny)`, librosa's floor)
from the previous frame's best state, found once a frame (for the columns near it, from a scan of the
others): the same sums and the same first-index choice between equal scores as librosa's, so the same
path, bit for bit (`tests/test_pyin.py` holds it to `librosa.pyin`).
The rest of pYIN (YIN's difference function, the threshold prior, the observation probabilities) is
librosa's own, called as `librosa.pyin` calls it.

With a librosa whose pYIN is not the one this module mirrors (`MIRRORED_LIBROSA`) or lacks the parts it
calls, `pyin` is `librosa.pyin` itself: slower, the same values.

    f0, voiced, probability = pyin(audio, fmin=50.0, fmax=550.0, sr=22050, frame_length=1024, hop_length=256)
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any, cast

import librosa
import numba
import numpy as np
import scipy.stats

# librosa releases whose `pyin` this module computes step for step (the uniform initial distribution
# over all states came with 0.11).
MIRRORED_LIBROSA = ("0.11.",)
# pYIN's defaults, as `librosa.pyin` takes them.
N_THRESHOLDS, BETA_PARAMETERS, BOLTZMANN_PARAMETER = 100, (2, 18), 2
RESOLUTION, MAX_TRANSITION_RATE, SWITCH_PROB, NO_TROUGH_PROB = 0.1, 35.92, 0.01, 0.01


@functools.cache
def _librosa_parts() -> tuple[Callable[..., Any], ...] | None:
    """librosa's own pieces of its pYIN, or None where this librosa is not the one mirrored."""
    if not importlib.metadata.version("librosa").startswith(MIRRORED_LIBROSA):
        return None
    module = importlib.import_module("librosa.core.pitch")
    names = (
        "__check_yin_params",
        "_cumulative_mean_normalized_difference",
        "_parabolic_interpolation",
        "__pyin_helper",
    )
    parts = tuple(getattr(module, name, None) for name in names)
    return None if any(part is None for part in parts) else cast(tuple[Callable[..., Any], ...], parts)


def fast_path() -> bool:
    """Whether `pyin` decodes here (True) or hands the whole work to `librosa.pyin` (False)."""
    return _librosa_parts() is not None


@numba.njit(cache=True)
def sparse_viterbi(log_prob, log_p_init, nonzero_rows, nonzero_log, nonzero_starts, zero_log):
    """The most likely state sequence, as `librosa.sequence`'s Viterbi finds it: `log_prob [T, S]`,
    `log_p_init [S]`, and the log transitions into state j: from the states
    `nonzero_rows[nonzero_starts[j]:nonzero_starts[j + 1]]` (ascending) those of `nonzero_log` at the same
    positions, from every other state `zero_log` -> states [T].

    Each score is the sum librosa forms (previous score + log transition) and each choice its
    `argmax`: the largest score, the lowest state among equal ones. Scores must be finite."""
    steps, states = log_prob.shape
    value = np.empty((steps, states))
    pointer = np.empty((steps, states), dtype=np.int64)
    value[0] = log_prob[0] + log_p_init
    in_column = np.zeros(states, dtype=np.bool_)
    for t in range(1, steps):
        previous = value[t - 1]
        off = previous + zero_log  # every state's score through a zero transition
        top = 0  # the best of them, the lowest of equal ones
        for i in range(1, states):
            if off[i] > off[top]:
                top = i
        for j in range(states):
            start, stop = nonzero_starts[j], nonzero_starts[j + 1]
            best, arg = -np.inf, -1
            for k in range(start, stop):
                i = nonzero_rows[k]
                in_column[i] = True
                score = previous[i] + nonzero_log[k]
                if score > best:
                    best, arg = score, i
            # The best state that reaches j through a zero transition, the lowest of equal ones: `top`, unless
            # its transition to j is not zero (j near the best state), then a scan of the others.
            found = top
            if in_column[top]:
                found = -1
                for i in range(states):
                    if not in_column[i] and (found < 0 or off[i] > off[found]):
                        found = i
            if found >= 0 and (off[found] > best or (off[found] == best and found < arg)):
                best, arg = off[found], found
            for k in range(start, stop):
                in_column[nonzero_rows[k]] = False
            pointer[t, j] = arg
            value[t, j] = log_prob[t, j] + best
    path = np.empty(steps, dtype=np.int64)
    path[-1] = np.argmax(value[-1])
    for t in range(steps - 2, -1, -1):
        path[t] = pointer[t + 1, path[t + 1]]
    return path


def by_column(log_trans: np.ndarray, nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries of `log_trans [S, S]` where `nonzero [S, S]`, as `sparse_viterbi` reads them, column by
    column, rows ascending: `(nonzero_rows, nonzero_log, nonzero_starts)`."""
    columns = nonzero.T  # [j, i]
    return np.nonzero(columns)[1], log_trans.T[columns], np.concatenate([[0], np.cumsum(columns.sum(axis=1))])


def sparse_chain(transition: np.ndarray, p_init: np.ndarray) -> tuple:
    """A Markov chain as `decode` takes it: `transition [S, S]` (from state i to j at `[i, j]`) and `p_init [S]`,
    in logs with librosa's floor (`np.finfo(float).tiny` added) -> `(log_p_init, nonzero_rows, nonzero_log,
    nonzero_starts, zero_log, transition, p_init)` (`sparse_viterbi`'s names), read-only."""
    epsilon = np.finfo(np.float64).tiny  # librosa's, for float64 probabilities
    nonzero_rows, nonzero_log, nonzero_starts = by_column(np.log(transition + epsilon), transition != 0)
    zero_log = np.log(np.float64(0) + epsilon)
    chain = (np.log(p_init + epsilon), nonzero_rows, nonzero_log, nonzero_starts, zero_log, transition, p_init)
    for part in chain:
        if isinstance(part, np.ndarray):
            part.flags.writeable = False  # `pyin_chain`'s are shared by every call
    return chain


@functools.lru_cache(maxsize=8)
def pyin_chain(n_pitch_bins: int, transition_width: int) -> tuple:
    """pYIN's Markov chain over `2 n_pitch_bins` states (voiced, then unvoiced) as `librosa.pyin` builds it,
    its initial distribution uniform (`sparse_chain`)."""
    transition = librosa.sequence.transition_local(n_pitch_bins, transition_width, window="triangle", wrap=False)
    transition = np.kron(librosa.sequence.transition_loop(2, 1 - SWITCH_PROB), transition)
    return sparse_chain(transition, np.ones(2 * n_pitch_bins) / (2 * n_pitch_bins))


def decode(prob: np.ndarray, chain: tuple) -> np.ndarray:
    """`librosa.sequence.viterbi(prob, transition, p_init=p_init)` of float64 `prob [S, T]` over the chain
    (`sparse_chain`) -> states [T]."""
    log_p_init, nonzero_rows, nonzero_log, nonzero_starts, zero_log, transition, p_init = chain
    log_prob = np.log(prob + np.finfo(prob.dtype).tiny)
    if prob.dtype != np.float64 or not np.isfinite(log_prob).all():  # NaN: librosa's argmax would pick it
        return librosa.sequence.viterbi(prob, transition, p_init=p_init)
    return sparse_viterbi(log_prob.T.copy(), log_p_init, nonzero_rows, nonzero_log, nonzero_starts, zero_log)


def pyin(
    y: np.ndarray, *, fmin: float, fmax: float, sr: float, frame_length: int, hop_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`librosa.pyin(y, fmin=, fmax=, sr=, frame_length=, hop_length=)` of mono audio `y [N]`, its other
    parameters at their defaults: (f0 [F] in Hz, NaN where unvoiced; voiced [F] bool; voicing
    probability [F]), F = 1 + N // hop_length."""
    parts = _librosa_parts()
    if parts is None or y.ndim != 1:
        return librosa.pyin(y, fmin=fmin, fmax=fmax, sr=sr, frame_length=frame_length, hop_length=hop_length)
    check, difference, parabolic_interpolation, observations = parts
    # librosa.pyin, step by step, for one channel (its checks, its framing, its pieces).
    check(sr=sr, fmax=fmax, fmin=fmin, frame_length=frame_length)
    librosa.util.valid_audio(y)
    y = np.pad(y, (frame_length // 2, frame_length // 2), mode="constant")
    y_frames = librosa.util.frame(y, frame_length=frame_length, hop_length=hop_length)
    min_period = int(np.floor(sr / fmax))
    max_period = min(int(np.ceil(sr / fmin)), frame_length - 1)
    yin_frames = difference(y_frames, min_period, max_period)
    parabolic_shifts = parabolic_interpolation(yin_frames)
    thresholds = np.linspace(0, 1, N_THRESHOLDS + 1)
    beta_cdf = scipy.stats.beta.cdf(thresholds, BETA_PARAMETERS[0], BETA_PARAMETERS[1])
    beta_probs = np.diff(beta_cdf)
    n_bins_per_semitone = int(np.ceil(1.0 / RESOLUTION))
    n_pitch_bins = int(np.floor(12 * n_bins_per_semitone * np.log2(fmax / fmin))) + 1
    observation_probs, voiced_prob = observations(
        yin_frames,
        parabolic_shifts,
        sr,
        thresholds,
        BOLTZMANN_PARAMETER,
        beta_probs,
        NO_TROUGH_PROB,
        min_period,
        fmin,
        n_pitch_bins,
        n_bins_per_semitone,
    )  # [1, 2 n_pitch_bins, F], [1, F]
    max_semitones_per_frame = round(MAX_TRANSITION_RATE * 12 * hop_length / sr)
    transition_width = max_semitones_per_frame * n_bins_per_semitone + 1
    states = decode(observation_probs[0], pyin_chain(n_pitch_bins, transition_width))
    freqs = fmin * 2 ** (np.arange(n_pitch_bins) / (12 * n_bins_per_semitone))
    f0 = freqs[states % n_pitch_bins]
    voiced = states < n_pitch_bins
    f0[~voiced] = np.nan
    return f0, voiced, voiced_prob[0]
