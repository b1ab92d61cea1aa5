"""Streaming synthesis: mel frames in as an acoustic model makes them, audio out chunk by chunk.

WaveFlow's inverse (Ping et al., ICML 2020, section 3) is autoregressive along height only; along
width (time, in columns of `n_height` samples) its convolutions look both ways. A chunk of
columns is therefore synthesized over a window that adds `context_frames` of mel on its left
(recomputed, costing time) and `lookahead_frames` on its right (waited for, costing latency):
the chunk's audio is the window's middle, faded in from the previous window's audio over
`FADE_SAMPLES` so that no step is left at the seam. The windows cover what whole-utterance synthesis
sees at the same columns, the same noise included (`ColumnNoise`), so with context and
lookahead at least `receptive_field(model).frames` the chunks put end to end are the whole
utterance's synthesis; with less they differ by the little that lies beyond the window.

    synthesis = StreamingSynthesis(model, chunk_frames=32)
    for mel in acoustic_model_frames():           # mel [B, cin, n], any n >= 0
        for audio in synthesis.push(mel):          # audio [B, chunk_frames * hop]
            play(audio)
    for audio in synthesis.finish():               # the rest; in all synthesis_length(F, hop) samples
        play(audio)

Whole-utterance synthesis with the same noise: `model.infer(mel, z=ColumnNoise(...).take(0, W))`.
The state kept between chunks (the mel and noise of one window) does not grow with the utterance.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn

from config import HOP_LENGTH
from inference import synthesize
from model import (
    SYNTHESIS_TRIM_FRAMES,
    WaveFlow,
    check_finite_mel,
    check_mel_type,
    check_temperature,
    squeeze,
    unsqueeze,
)

if TYPE_CHECKING:
    from denoiser import StreamingDenoiser

CHUNK_FRAMES = 32  # mel frames per audio chunk by default: 0.37 s at 22,050 Hz
# Right and left context by default: the shortest whose log-mel difference from whole-utterance
# synthesis stays below the noise of resynthesis (docs/deploy.md, "Streaming synthesis").
LOOKAHEAD_FRAMES = 8
CONTEXT_FRAMES = 8
# A chunk starts by fading from the previous window's audio past that window's chunk into its own over
# this many samples (or what the previous window had), so that two windows' small differences make no step.
FADE_SAMPLES = 256  # 12 ms at 22,050 Hz


@dataclass(frozen=True)
class ReceptiveField:
    """How far one output sample's dependencies reach, on each side.

    `columns`: columns of noise and conditioning (through every flow's inverse); `samples`: the
    same in samples; `upsampler_frames`: mel frames the upsampler reads (left, right) beyond the
    frame of a sample; `frames`: the lookahead (and left context) in frames that makes streaming
    exact: the window past a chunk must hold `FADE_SAMPLES` exact samples for the next chunk's fade,
    and the lookahead covers the upsampler's reach ahead and the 3 frames that synthesis trims at the end."""

    columns: int
    samples: int
    upsampler_frames: tuple[int, int]
    frames: int


def upsampler_reach(model: WaveFlow) -> tuple[int, int]:
    """The mel frames the upsampler reads for a sample, as (frames before, frames after) the sample's
    own frame, at most over the samples of a frame (from each transposed conv's kernel, stride, padding)."""
    convs = [module for module in model.upsample_conv if isinstance(module, nn.ConvTranspose2d)]
    hop = model.config.hop_length
    left = right = 0
    for sample in range(4 * hop, 5 * hop):  # away from the edges, one frame's worth
        positions = {sample}
        for conv in reversed(convs):
            kernel, stride, padding = conv.kernel_size[1], conv.stride[1], cast(tuple[int, int], conv.padding)[1]
            # output o reads input i when 0 <= o + padding - stride * i < kernel
            positions = {
                i
                for o in positions
                for i in range(-((kernel - 1 - o - padding) // stride), (o + padding) // stride + 1)
            }
        frame = sample // hop
        left, right = max(left, frame - min(positions)), max(right, max(positions) - frame)
    return left, right


def receptive_field(model: WaveFlow) -> ReceptiveField:
    """The receptive field of synthesis along time, from the model's config.

    One estimator pass reaches `D = sum of the width dilations` columns each side (3-wide kernels).
    In a flow's inverse row h is computed from rows < h, each of which reached D further: row
    `H - 1` depends on the noise `(H - 1) D` columns away, and the conditioning `D - 1` further
    (the last block's conditioning reaches no further than its column). The flows' inverses run
    one after the other: `K (H - 1) D + D - 1` columns.

    A chunk's fade (`StreamingSynthesis`) reads the previous window's `FADE_SAMPLES` samples past that
    window's chunk: they are exact when the window reaches `columns` beyond their last column, and no further
    than whole synthesis's end could be. A window stops the upsampler's reach short of the frames received,
    and the end may come 3 frames (`SYNTHESIS_TRIM_FRAMES`) short of them: the lookahead adds the larger.
    """
    config = model.config
    net = model.flow_parts(0)[0]
    reach = sum(block.filter_gate_conv.conv.dilation[1] for block in net.res_blocks)
    columns = config.n_flow * (config.n_height - 1) * reach + reach - 1
    columns_per_frame = config.hop_length // config.n_height
    upsampler = upsampler_reach(model)
    fade_columns = -(-FADE_SAMPLES // config.n_height)
    frames = max(upsampler[1], SYNTHESIS_TRIM_FRAMES) + math.ceil((columns + fade_columns) / columns_per_frame)
    return ReceptiveField(columns, columns * config.n_height, upsampler, frames)


class ColumnNoise:
    """The prior's noise `z [B, 1, H, W]`, drawn a mel frame's columns at a time from one seeded generator,
    so that a stream (which needs it a window at a time) and whole-utterance synthesis (all at once,
    `take(0, W)`) get the same numbers. Frames already dropped (`drop_before`) cannot be taken again."""

    def __init__(
        self,
        batch: int,
        height: int,
        sigma: float = 1.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        hop_length: int = HOP_LENGTH,
    ):
        check_temperature(sigma)
        self.batch, self.height, self.sigma = batch, height, sigma
        self.columns_per_frame = hop_length // height  # a frame's samples, `hop_length`, in columns of `height`
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = torch.device(device)
        self.frames: list[torch.Tensor] = []  # [B, 1, H, columns_per_frame] each, from frame `self.first`
        self.first = 0

    def take(self, start: int, stop: int) -> torch.Tensor:
        """Columns `[start, stop)` of z: `[B, 1, H, stop - start]` (fp32)."""
        per = self.columns_per_frame
        if start < self.first * per:
            raise ValueError(f"noise column {start} was dropped (the noise starts at column {self.first * per})")
        while (self.first + len(self.frames)) * per < stop:
            shape = (self.batch, 1, self.height, per)
            self.frames.append(torch.randn(shape, generator=self.generator, device=self.device) * self.sigma)
        first_frame, last_frame = start // per, -(-stop // per)
        block = torch.cat(self.frames[first_frame - self.first : last_frame - self.first], dim=3)
        return block[..., start - first_frame * per : stop - first_frame * per]

    def drop_before(self, column: int) -> None:
        """Forget the noise of the frames wholly left of `column`."""
        frames = max(0, column // self.columns_per_frame - self.first)
        del self.frames[:frames]
        self.first += frames


class StreamingSynthesis:
    """Synthesis of one utterance (or a batch of them, in step) from mel frames given in pieces.

    `push(mel [B, cin, n])` takes the next n frames and returns the audio chunks now ready,
    each `[B, chunk_frames * hop]` (fp32, `hop` the model's hop length); `finish()` returns the rest. A chunk of frames
    `[e, e + chunk_frames)` is synthesized once `lookahead_frames` more frames have arrived, over
    a window starting `context_frames` before it, and starts with a fade from the previous window's
    audio. `noise` (default: a `ColumnNoise` of `sigma` and `seed`) gives the prior's noise a window
    at a time. The model should have weight norm
    folded (`remove_weight_norm`) and sits in the precision synthesis is to run in, as with `infer`.
    """

    def __init__(
        self,
        model: WaveFlow,
        chunk_frames: int = CHUNK_FRAMES,
        lookahead_frames: int = LOOKAHEAD_FRAMES,
        context_frames: int = CONTEXT_FRAMES,
        sigma: float = 1.0,
        seed: int = 0,
        noise: ColumnNoise | None = None,
    ):
        frames = {"chunk_frames": chunk_frames, "lookahead_frames": lookahead_frames, "context_frames": context_frames}
        for name, value in frames.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be a whole number of frames, got {value!r}")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
        self.upsampler = upsampler_reach(model)
        if lookahead_frames < max(self.upsampler[1], SYNTHESIS_TRIM_FRAMES):
            raise ValueError(
                f"lookahead_frames must be at least {max(self.upsampler[1], SYNTHESIS_TRIM_FRAMES)}: synthesis "
                f"drops the samples of the last {SYNTHESIS_TRIM_FRAMES} frames, which a stream knows only once "
                f"it is that far ahead (and the upsampler reads {self.upsampler[1]} ahead); got {lookahead_frames}"
            )
        if context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {context_frames}")
        check_temperature(sigma)
        self.model, self.noise_source = model, noise
        self.chunk, self.lookahead, self.context = chunk_frames, lookahead_frames, context_frames
        self.sigma, self.seed = sigma, seed
        self.mel: torch.Tensor | None = None  # [B, cin, frames held], frames from `self.mel_first`
        self.mel_first = 0
        self.received = 0  # mel frames pushed so far
        self.emitted = 0  # mel frames whose audio has been returned
        self.tail: torch.Tensor | None = None  # [B, <= FADE_SAMPLES]: the last window's audio after its chunk
        self.finished = False  # finish() has returned the last audio: no frames may follow

    @property
    def noise(self) -> ColumnNoise:
        if self.noise_source is None:
            if self.mel is None:
                raise RuntimeError("the noise is drawn once the first frames arrive")
            height = self.model.config.n_height
            batch, device, hop = self.mel.shape[0], self.mel.device, self.model.config.hop_length
            self.noise_source = ColumnNoise(batch, height, self.sigma, self.seed, device, hop_length=hop)
        return self.noise_source

    def push(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """Take the next frames `mel [B, cin, n]`; return the audio chunks now ready (possibly none)."""
        if self.finished:
            raise ValueError("mel frames pushed after finish(): the stream has ended; start a new StreamingSynthesis")
        check_mel_type(mel)
        cin = self.model.config.cin_channels
        if mel.dim() != 3 or mel.shape[1] != cin:
            raise ValueError(f"mel frames must be [B, {cin}, n], got shape {tuple(mel.shape)}")
        if mel.shape[0] == 0:
            raise ValueError(f"mel frames of an empty batch, shape {tuple(mel.shape)}: B must be at least 1")
        # A copy without autograd history: the caller may reuse its buffer, and an acoustic model's output
        # that requires grad would chain every push's graph to the held frames, growing with the utterance.
        mel = mel.detach()
        check_finite_mel(mel, next(self.model.parameters()).dtype)
        if self.mel is None:
            noise, height = self.noise_source, self.model.config.n_height
            if noise is not None and (noise.batch, noise.height) != (mel.shape[0], height):
                raise ValueError(
                    f"the noise given is of batch {noise.batch} and {noise.height} rows; the stream needs "
                    f"batch {mel.shape[0]} (the mel's) and {height} rows (the model's n_height)"
                )
            self.mel = mel.clone()
        elif mel.shape[:2] != self.mel.shape[:2]:
            raise ValueError(f"mel frames of shape {tuple(mel.shape)} follow frames of {tuple(self.mel.shape)}")
        else:
            self.mel = torch.cat([self.mel, mel], dim=2)
        self.received += mel.shape[2]
        chunks = []
        while self.received >= self.emitted + self.chunk + self.lookahead:
            # the upsampler's samples are exact up to its reach short of the last frame received
            chunks.append(self._synthesize(self.emitted + self.chunk, self.received - self.upsampler[1]))
        return chunks

    def finish(self) -> list[torch.Tensor]:
        """The audio of the frames left, in chunks of at most `chunk_frames` frames; the stream ends here
        (called again, it returns nothing). Whole-utterance synthesis drops the last `SYNTHESIS_TRIM_FRAMES`
        frames' samples: so does this."""
        if self.finished:
            return []
        end = self.received - SYNTHESIS_TRIM_FRAMES
        if end <= 0:
            raise ValueError(
                f"a mel of {self.received} frame{'s' if self.received != 1 else ''} is too short to synthesize "
                f"(need at least {SYNTHESIS_TRIM_FRAMES + 1})"
            )
        chunks = []
        while self.emitted < end:
            chunks.append(self._synthesize(min(self.emitted + self.chunk, end), end))
        self.finished = True
        return chunks

    def state_elements(self) -> int:
        """Elements held between chunks (mel and noise): bounded by the window, whatever was pushed."""
        held = 0 if self.mel is None else self.mel.numel()
        if self.noise_source is not None:
            held += sum(frame.numel() for frame in self.noise_source.frames)
        if self.tail is not None:
            held += self.tail.numel()
        return held

    def _synthesize(self, stop: int, window_stop: int) -> torch.Tensor:
        """The audio of frames `[self.emitted, stop)`, from a window of frames ending at `window_stop`."""
        assert self.mel is not None
        model = self.model
        height, hop = model.config.n_height, model.config.hop_length
        per = hop // height
        start = self.emitted
        window_start = max(0, start - self.context)
        # The upsampler's input: the window and the frames it reads around it.
        mel_start = max(0, window_start - self.upsampler[0])
        mel_stop = min(self.received, window_stop + self.upsampler[1])
        parameter = next(model.parameters())
        mel = self.mel[:, :, mel_start - self.mel_first : mel_stop - self.mel_first]
        offset = (window_start - mel_start) * hop
        c = model.upsample(mel.to(parameter.device, parameter.dtype))[
            ..., offset : offset + (window_stop - window_start) * hop
        ]
        c = squeeze(c, height)  # [B, cin, H, W of the window]
        z = self.noise.take(window_start * per, window_stop * per)  # [B, 1, H, W of the window]
        with torch.no_grad():
            x = synthesize(model, c, z.to(c.device))  # [B, 1, H, W of the window]
        audio = unsqueeze(x[..., (start - window_start) * per :]).squeeze(1)  # [B, samples from the chunk on]
        chunk_samples = (stop - start) * hop
        audio, tail = audio[:, :chunk_samples], audio[:, chunk_samples : chunk_samples + FADE_SAMPLES]
        if self.tail is not None:
            fade = min(self.tail.shape[1], chunk_samples)
            steps = torch.arange(fade, device=audio.device, dtype=audio.dtype)
            ramp = 0.5 - 0.5 * torch.cos(torch.pi * (steps + 0.5) / fade)
            audio = torch.cat([torch.lerp(self.tail[:, :fade], audio[:, :fade], ramp), audio[:, fade:]], dim=1)
        self.tail = tail if tail.shape[1] else None
        self.emitted = stop
        # Keep only what the next window reads: its left context and the upsampler's frames before it.
        keep_from = max(0, stop - self.context - self.upsampler[0])
        if keep_from > self.mel_first:
            self.mel = self.mel[:, :, keep_from - self.mel_first :]
            self.mel_first = keep_from
        self.noise.drop_before(max(0, stop - self.context) * per)
        return audio


def stream(
    model: WaveFlow,
    mel_chunks: Iterable[torch.Tensor],
    chunk_frames: int = CHUNK_FRAMES,
    lookahead_frames: int = LOOKAHEAD_FRAMES,
    context_frames: int = CONTEXT_FRAMES,
    sigma: float = 1.0,
    seed: int = 0,
    denoise: StreamingDenoiser | None = None,
) -> Iterator[torch.Tensor]:
    """`StreamingSynthesis` as a generator: mel pieces `[B, cin, n]` in, audio chunks `[B, samples]` out,
    denoised on the way when `denoise` (`Denoiser.stream(strength)`) is given."""
    synthesis = StreamingSynthesis(model, chunk_frames, lookahead_frames, context_frames, sigma, seed)
    for mel in mel_chunks:
        for audio in synthesis.push(mel):
            yield from [audio] if denoise is None else denoise.push(audio)
    for audio in synthesis.finish():
        yield from [audio] if denoise is None else denoise.push(audio)
    if denoise is not None:
        yield from denoise.finish()
