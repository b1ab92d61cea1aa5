"""WaveGlow's denoiser: the model's bias spectrum subtracted from its synthesis (Prenger et al., 2019; the
WaveGlow repository's `denoiser.py`).

A flow vocoder given a silent mel still makes a faint, steady sound (hiss, hum at a few
frequencies): its bias. The denoiser synthesizes a silent mel (every band at the log of the
mel's clamp floor) with zero noise, keeps the magnitude spectrum of that output averaged over
time (one frame's worth, so it fits any length), and subtracts `strength` times it from the
magnitude spectrum of every synthesis, keeping the phase and clamping at 0.

    denoiser = Denoiser.from_config(model, config.data)    # the bias: once per precision and device
    audio = denoiser(model.infer(mel), strength=0.05)      # audio [B, T] -> [B, T]
    stream = denoiser.stream(strength=0.05)                # the same on audio given in pieces
    chunks = stream.push(audio_piece) + stream.finish()

The STFT is the mel's (filter_length, hop_length, win_length, periodic Hann window, centred
with reflect padding), written out as frames and overlap-add so that a stream, which sees the
audio a piece at a time, gives the samples of the whole-clip denoising.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from config import Config, DataConfig, config_from_dict, parse_section
from data import LOG_FLOOR
from model import SYNTHESIS_TRIM_FRAMES, WaveFlow

BIAS_FRAMES = 88  # frames of the silent mel, as WaveGlow's denoiser (the bias is averaged over them)


class Denoiser:
    """The bias removal of one model. Its bias spectrum is computed on first use for the model's
    current precision and device and kept for each; the model is not changed."""

    def __init__(self, model: WaveFlow, filter_length: int = 1024, hop_length: int = 256, win_length: int = 1024):
        if win_length > filter_length:
            raise ValueError(f"the denoiser needs win_length ({win_length}) <= filter_length ({filter_length})")
        self.model = model
        self.filter_length, self.hop_length = filter_length, hop_length
        side = (filter_length - win_length) // 2  # torch.stft's centring of a shorter window
        self.window = F.pad(torch.hann_window(win_length, periodic=True), (side, filter_length - win_length - side))
        # (dtype, device) -> (the weights it was computed from, the bias spectrum)
        self.biases: dict[tuple[torch.dtype, torch.device], tuple[tuple, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, model: WaveFlow, data: DataConfig | Config | dict) -> Denoiser:
        """The denoiser of `model` with the STFT of a config's `data_config` (or of a whole config), parsed
        or as the JSON's dict, as `build_model` takes one."""
        if isinstance(data, dict):
            data = config_from_dict(data, sections=("data_config",)) if "data_config" in data else data
            data = parse_section(DataConfig, data, "data_config") if isinstance(data, dict) else data
        if isinstance(data, Config):
            data = data.data
        return cls(model, data.filter_length, data.hop_length, data.win_length)

    def bias(self) -> torch.Tensor:
        """The magnitude spectrum of the model's output for a silent mel, averaged over time: `[n_fft // 2 + 1]`.
        Computed again once the model's weights change (a checkpoint loaded into it, an optimizer step)."""
        parameters = list(self.model.parameters())
        parameter = parameters[0]
        key = (parameter.dtype, parameter.device)
        weights = tuple((p.data_ptr(), p._version) for p in parameters)  # as the CUDA graph cache tells them
        if key not in self.biases or self.biases[key][0] != weights:
            config = self.model.config
            mel = parameter.new_full((1, config.cin_channels, BIAS_FRAMES + SYNTHESIS_TRIM_FRAMES), math.log(LOG_FLOOR))
            width = (BIAS_FRAMES * config.hop_length) // config.n_height  # the model's hop: its synthesis length
            z = torch.zeros(1, 1, config.n_height, width, device=parameter.device)
            audio = self.model.infer(mel, z=z).float()  # [1, T]: sigma 0, as WaveGlow's
            self.biases[key] = weights, self.magnitude_and_phase(self.pad(audio))[0].mean(dim=(0, 1))
        return self.biases[key][1]

    def pad(self, audio: torch.Tensor) -> torch.Tensor:
        """`audio [B, T] -> [B, T + n_fft]`, reflected at both ends as torch.stft centres."""
        half = self.filter_length // 2
        mode = "reflect" if audio.shape[-1] > half else "constant"  # too short to reflect: zeros
        return F.pad(audio[:, None], (half, half), mode=mode)[:, 0]

    def magnitude_and_phase(self, padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames every hop_length samples of `padded [B, P]` -> magnitude and phase `[B, frames, n_fft // 2 + 1]`."""
        window = self.window.to(padded.device)
        spectrum = torch.fft.rfft(padded.unfold(-1, self.filter_length, self.hop_length) * window)
        return spectrum.abs(), spectrum.angle()

    def subtract(self, padded: torch.Tensor, strength: float) -> torch.Tensor:
        """`padded [B, P]` (P - n_fft a multiple of hop_length) -> its denoising `[B, P]`, by overlap-add;
        samples within `n_fft - hop_length` of either end lack frames and are not the whole clip's."""
        magnitude, phase = self.magnitude_and_phase(padded)
        magnitude = (magnitude - strength * self.bias().to(padded.device)).clamp(min=0)
        window = self.window.to(padded.device)
        frames = torch.fft.irfft(torch.polar(magnitude, phase), n=self.filter_length) * window  # [B, nF, n]
        size = (1, padded.shape[-1])
        kernel, stride = (1, self.filter_length), (1, self.hop_length)
        out = F.fold(frames.transpose(1, 2), size, kernel, stride=stride)  # [B, 1, 1, P]
        envelope = window.square()[None, :, None].expand(1, -1, frames.shape[1])
        envelope = F.fold(envelope, size, kernel, stride=stride)  # [1, 1, 1, P]
        return (out / envelope.clamp(min=1e-11)).flatten(1)  # [B, P]

    def __call__(self, audio: torch.Tensor, strength: float) -> torch.Tensor:
        """`audio [B, T]` -> the same with `strength` times the bias spectrum removed, `[B, T]` fp32."""
        check_strength(strength)
        if audio.dim() != 2:
            raise ValueError(
                f"the denoiser takes audio [B, T], as model.infer gives it, got shape {tuple(audio.shape)}"
            )
        audio = audio.float()
        if strength == 0 or audio.shape[0] == 0:  # an empty batch stays empty (the STFT refuses one)
            return audio
        length = audio.shape[-1]
        hop, half = self.hop_length, self.filter_length // 2
        padded = self.pad(audio)
        padded = F.pad(padded, (0, -(padded.shape[-1] - self.filter_length) % hop))  # whole frames
        return self.subtract(padded, strength)[:, half : half + length]

    def stream(self, strength: float) -> StreamingDenoiser:
        return StreamingDenoiser(self, strength)


def check_strength(strength: float) -> None:
    """Refuse a strength that is negative (it would add the bias) or not finite."""
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"denoiser strength must be a finite number >= 0 (0: off), got {strength}")


class StreamingDenoiser:
    """`Denoiser` on audio given a piece at a time, giving the samples of the whole clip's denoising.

    A sample is final once every STFT frame over it is known: the output lags the input by up to
    `filter_length` samples (the last `filter_length // 2` wait for the reflection at the end).
    Holds at most about two frames' worth of audio between pieces."""

    def __init__(self, denoiser: Denoiser, strength: float):
        check_strength(strength)
        self.denoiser, self.strength = denoiser, strength
        self.buffer: torch.Tensor | None = None  # [B, samples] of the padded clip, from padded index `start`
        self.start = 0  # padded index of the buffer's first sample, a multiple of hop_length
        self.emitted = 0  # padded index up to which denoised audio has been returned
        self.head: torch.Tensor | None = None  # the first audio, until it is long enough to reflect
        self.finished = False  # finish() has returned the last audio: no audio may follow

    def push(self, audio: torch.Tensor) -> list[torch.Tensor]:
        """The next audio `[B, n]` -> the denoised audio now final (a list of at most one `[B, m]`)."""
        if self.finished:
            raise ValueError("audio pushed after finish(): the stream has ended; start a new one with Denoiser.stream")
        held = self.buffer if self.buffer is not None else self.head
        if audio.dim() != 2 or (held is not None and audio.shape[0] != held.shape[0]):
            after = "" if held is None else f" after audio of {held.shape[0]} items"
            raise ValueError(
                f"the denoiser's stream takes audio [B, n] of one B, got shape {tuple(audio.shape)}{after}"
            )
        if self.strength == 0:  # the identity, as the whole clip's, not its STFT round trip
            return [audio.float()]
        # Held as a copy without autograd history: the caller may reuse its buffer, and a graph would be
        # chained from piece to piece.
        audio = audio.detach().float()
        half = self.denoiser.filter_length // 2
        if self.buffer is None:
            self.head = audio.clone() if self.head is None else torch.cat([self.head, audio], dim=1)
            if self.head.shape[1] <= half:
                return []
            reflected = self.head[:, 1 : half + 1].flip(1)
            self.buffer, self.head, self.emitted = torch.cat([reflected, self.head], dim=1), None, half
        else:
            self.buffer = torch.cat([self.buffer, audio], dim=1)
        return self._emit(final=False)

    def finish(self) -> list[torch.Tensor]:
        """The rest of the denoised audio; the stream ends here (called again, it returns nothing)."""
        if self.finished:
            return []
        self.finished = True
        denoiser, half = self.denoiser, self.denoiser.filter_length // 2
        if self.buffer is None:  # a clip shorter than half a window: denoised whole
            return [] if self.head is None else [denoiser(self.head, self.strength)]
        length = self.start + self.buffer.shape[1] - half  # samples of the clip
        self.buffer = torch.cat([self.buffer, self.buffer[:, -half - 1 : -1].flip(1)], dim=1)
        return self._emit(final=True, stop=half + length)

    def _emit(self, final: bool, stop: int | None = None) -> list[torch.Tensor]:
        assert self.buffer is not None
        n, hop = self.denoiser.filter_length, self.denoiser.hop_length
        frames = (self.buffer.shape[1] - n) // hop + 1 if self.buffer.shape[1] >= n else 0
        valid_stop = self.start + frames * hop  # the samples every frame over which is known
        if final:
            padded = F.pad(self.buffer, (0, -(self.buffer.shape[1] - n) % hop))
            valid_stop = stop
        else:
            padded = self.buffer[:, : (frames - 1) * hop + n] if frames else self.buffer
        if frames == 0 or valid_stop is None or valid_stop <= self.emitted:
            return []
        out = self.denoiser.subtract(padded, self.strength)[:, self.emitted - self.start : valid_stop - self.start]
        self.emitted = valid_stop
        # keep from the first frame that reaches an unemitted sample
        keep = max(self.start, (self.emitted - n + hop) // hop * hop)
        self.buffer, self.start = self.buffer[:, keep - self.start :], keep
        return [out]
