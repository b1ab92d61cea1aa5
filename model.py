"""WaveFlow and NanoFlow: one family of flow-based vocoders.

WaveFlow (Ping et al., ICML 2020) squeezes audio into `n_height` rows and
stacks `n_flow` affine couplings that are autoregressive along height, each with
its own 2-D WaveNet. NanoFlow (Lee, Kim, Yoon, NeurIPS 2020, section 3) keeps
the flows but shares what computes them:

- `waveflow`: every flow owns its estimator and projection;
- `nanoflow_naive`: one flow (estimator and projection) applied `n_flow` times;
- `nanoflow_decomp`: one estimator shared by all flows, a projection per flow;
- `nanoflow`: `nanoflow_decomp` plus a learned flow embedding fed to every
  layer and per-flow multiplicative gates (`multgate`) on the residual updates.

`WaveFlow.flow_parts` is the only place where the four differ.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from config import Config, WaveFlowConfig, config_from_dict, parse_section
from cuda_graphs import CudaGraphCache
from inference import CONDITION_CACHE_BYTES, MAX_CPU_COLUMNS, synthesize
from modules import FlowEmbedding, ProjLogST, WaveNet2D, WeightNormMixin, WNConvTranspose2d, shift_1d

SYNTHESIS_TRIM_FRAMES = 3  # mel frames whose samples synthesis drops at the end, as the original did


# The largest temperature: fp32 noise drawn with it stays finite (a standard normal draw in fp32 stays below 6).
MAX_SIGMA = torch.finfo(torch.float32).max / 16


def check_temperature(sigma: float) -> None:
    """Refuse a temperature (the noise's standard deviation) that is negative, not finite or so large that the
    noise drawn with it overflows fp32 (`MAX_SIGMA`): NaN or infinite noise makes NaN audio. 0 (no noise) is one."""
    if not (math.isfinite(sigma) and 0 <= sigma <= MAX_SIGMA):
        raise ValueError(
            f"sigma, the noise's standard deviation, must be a finite number >= 0 and at most {MAX_SIGMA:.3g} "
            f"(fp32 noise), got {sigma}"
        )


def check_mel_type(mel: object) -> None:
    """Refuse a mel that is not a floating-point tensor: a numpy array, an integer or boolean tensor (a mask, or
    a mel saved in other units), or a complex one (its imaginary part would be dropped)."""
    if not isinstance(mel, torch.Tensor):
        raise TypeError(f"the mel must be a torch.Tensor, got {type(mel).__name__} (torch.from_numpy makes one)")
    if not mel.is_floating_point():
        raise ValueError(f"the mel has dtype {mel.dtype}, expected a floating-point log-mel")


def check_finite_mel(mel: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Refuse a mel holding NaN or an infinity (the log of a zero magnitude, unfloored): one such value spreads
    through the convolutions to most of the audio, as NaN. With `dtype` (the model's, which the mel is cast
    to), also a finite value beyond that dtype's range, which the cast would make infinite."""
    if not bool(torch.isfinite(mel).all()):
        bad = int((~torch.isfinite(mel)).sum())
        raise ValueError(
            f"the mel holds {bad} NaN or infinite value{'s' if bad != 1 else ''}, which would make NaN audio "
            f"(a log mel needs a floor: this project's mels clamp the magnitudes at data.LOG_FLOOR before the log)"
        )
    if dtype is not None and mel.numel() and float(mel.abs().max()) > torch.finfo(dtype).max:
        raise ValueError(
            f"the mel holds values up to {float(mel.abs().max()):.3g}, beyond the range of the model's {dtype} "
            f"({torch.finfo(dtype).max:.3g}), which would make NaN audio (a log mel lies within about -12 to 12)"
        )


def synthesis_length(frames: int, hop_length: int) -> int:
    """Samples that synthesis makes from a mel of `frames` frames of `hop_length` samples each (not positive:
    too short to synthesize)."""
    return hop_length * (frames - SYNTHESIS_TRIM_FRAMES)


def stretch(factor: int) -> WNConvTranspose2d:
    """One upsampling step, `[B, 1, cin, F] -> [B, 1, cin, factor * F]`: the original's weight-normed transposed
    conv (kernel 3 along the bands, `2 * factor` along time, stride `factor`), for any factor. The original's
    factor 16 has padding 8; an odd factor takes one sample more of padding and gives it back as output
    padding, so that every factor stretches F frames to exactly `factor * F` samples."""
    return WNConvTranspose2d(
        1, 1, (3, 2 * factor), stride=(1, factor), padding=(1, (factor + 1) // 2), output_padding=(0, factor % 2)
    )


def squeeze(x: torch.Tensor, n_height: int) -> torch.Tensor:
    """`[B, C, T] -> [B, C, H, T / H]` with `out[b, c, h, w] = x[b, c, w * H + h]`:
    each column holds H consecutive samples."""
    batch, channels, length = x.shape
    return x.view(batch, channels, length // n_height, n_height).transpose(2, 3)  # [B, C, H, W]


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `squeeze`: `[B, C, H, W] -> [B, C, H * W]`."""
    batch, channels, height, width = x.shape
    return x.transpose(2, 3).reshape(batch, channels, height * width)  # [B, C, T]


def negative_log_likelihood(z: torch.Tensor, logdet: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The original's training loss: negative log-likelihood per audio sample, in nats.

    `z [B, 1, H, W]`, `logdet [B]` -> scalar, under a prior `N(0, sigma^2)`; computed in fp32 or better.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma, the prior's standard deviation, must be a finite number > 0, got {sigma}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(dtype)
    n = z.numel()
    constant = 0.5 * (math.log(2 * math.pi) + 2 * math.log(sigma))
    return constant + (0.5 * z.pow(2).sum() / sigma**2 - logdet.to(dtype).sum()) / n


class Coupling(nn.Module):
    """The parameters of one affine coupling that are not shared with other flows.

    `net`: its own estimator (WaveFlow, NanoFlow-naive); `multgate [L, R]`: NanoFlow's
    per-flow gates on the residual updates (ones at the start); `proj_log_s_t`: the
    projection to `(log_s, t)`.
    """

    def __init__(self, res_channels: int, net: WaveNet2D | None = None, multgate_layers: int = 0):
        super().__init__()
        if multgate_layers:
            self.multgate = nn.Parameter(torch.ones(multgate_layers, res_channels))
        if net is not None:
            self.net = net
        self.proj_log_s_t = ProjLogST(res_channels)


class WaveFlow(nn.Module):
    """The vocoder: `forward(audio, mel) -> (z, logdet)`, `infer(mel) -> audio`.

    Shapes: audio `[B, T]`, mel `[B, cin, F]`, `z [B, 1, H, T / H]`, `logdet [B]`.
    Module names follow the original code so its checkpoints load unchanged.
    """

    def __init__(self, config: WaveFlowConfig):
        super().__init__()
        self.config = config
        kind = config.coupling_type
        R, K, L = config.res_channels, config.n_flow, config.n_layer

        def estimator() -> WaveNet2D:
            return WaveNet2D(
                R, config.cin_channels, L, config.n_layer_per_cycle, config.size_flow_embed if kind == "nanoflow" else 0
            )

        if kind == "nanoflow":
            self.flow_embedding = FlowEmbedding(K, config.size_flow_embed, config.use_weightnorm_embed)
        # The ModuleDicts only reproduce the original's key names (`flows.0.coupling.net...`).
        if kind == "waveflow":
            self.flows = nn.ModuleList(nn.ModuleDict({"coupling": Coupling(R, net=estimator())}) for _ in range(K))
        elif kind == "nanoflow_naive":
            self.flow = nn.ModuleDict({"coupling": Coupling(R, net=estimator())})
        else:
            self.estimator = nn.ModuleDict({"net": estimator()})
            self.flows = nn.ModuleList(Coupling(R, multgate_layers=L if kind == "nanoflow" else 0) for _ in range(K))
        # A transposed conv and a leaky ReLU per factor: one mel frame -> hop_length samples. The original's
        # two factors of 16 give its keys, upsample_conv.0 and upsample_conv.2.
        self.upsample_conv = nn.Sequential(
            *(layer for factor in config.upsample_factors for layer in (stretch(factor), nn.LeakyReLU(0.4)))
        )
        # row_orders[flow][h]: the row of the unpermuted input that is row h of flow `flow`'s input. The config
        # fixes them; held as numbers, not tensors, so that torch.compile traces the forward as one graph.
        order = torch.arange(config.n_height).view(1, 1, config.n_height, 1)
        row_orders = []
        for flow in range(K):
            order = self.permute(flow, order)
            row_orders.append(tuple(order.flatten().tolist()))
        self.row_orders: tuple[tuple[int, ...], ...] = tuple(row_orders)

    # --- what each flow uses ----------------------------------------------------------------

    def flow_parts(self, flow: int) -> tuple[WaveNet2D, Coupling, torch.Tensor | None]:
        """The estimator, the coupling parameters and the flow embedding that flow `flow` uses."""
        kind = self.config.coupling_type
        if kind in ("waveflow", "nanoflow_naive"):
            holder = cast(nn.ModuleDict, self.flows[flow] if kind == "waveflow" else self.flow)
            coupling = cast(Coupling, holder["coupling"])
            return coupling.net, coupling, None
        embedding = self.flow_embedding(flow) if kind == "nanoflow" else None
        return cast(WaveNet2D, self.estimator["net"]), cast(Coupling, self.flows[flow]), embedding

    def permute(self, flow: int, x: torch.Tensor) -> torch.Tensor:
        """Flow `flow`'s permutation of the rows of `x [B, C, H, W]`; its own inverse.

        Reverse the height; with `bipartize`, the second half of the flows reverse each
        half of the rows separately (WaveFlow paper, section 4.3).
        """
        if self.config.bipartize and flow >= self.config.n_flow // 2:
            upper, lower = x.chunk(2, dim=2)
            return torch.cat([upper.flip(2), lower.flip(2)], dim=2)
        return x.flip(2)

    def coupling_params(
        self, flow: int, x: torch.Tensor, c: torch.Tensor | None, cond: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(log_s, t)`, both `[B, 1, H, W]` in fp32 or better, for flow `flow` given its (permuted) input
        `x [B, 1, H, W]` and conditioning `c [B, cin, H, W]`. Row h depends on rows < h of `x`.
        `cond`, the estimator's projection of `c` (`WaveNet2D.condition`), is computed when not given."""
        net, coupling, embedding = self.flow_parts(flow)
        if cond is None:
            if c is None:
                raise ValueError("coupling_params needs the conditioning c or its projection cond")
            cond = net.condition(c)
        log_s_t = net(
            shift_1d(x).to(next(net.parameters()).dtype),  # the flow's state is fp32 in a bf16 model too
            cond,
            net.gate_biases(embedding),
            getattr(coupling, "multgate", None),
            *coupling.proj_log_s_t.affine(),
        )
        log_s, t = log_s_t.to(torch.promote_types(log_s_t.dtype, torch.float32)).chunk(2, dim=1)
        return log_s, t

    # --- training direction: audio -> z -------------------------------------------------------

    def upsample(self, mel: torch.Tensor) -> torch.Tensor:
        """`mel [B, cin, F] -> [B, cin, hop_length * F]`."""
        return self.upsample_conv(mel.unsqueeze(1)).squeeze(1)

    def _flow_forward(
        self, flow: int, x: torch.Tensor, cond: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_s, t = self.coupling_params(flow, x, None, cond)
        return x * torch.exp(log_s) + t, log_s.sum(dim=(1, 2, 3))

    def forward(self, audio: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`audio [B, T]`, `mel [B, cin, F]` with `hop_length * F >= T` -> `z [B, 1, H, T / H]`, `logdet [B]` (fp32).

        The mel is taken in the model's dtype, as `infer` takes it, the audio (floating point, samples in
        [-1, 1]) in fp32 or the model's dtype if better: float64 arrays, as soundfile reads them, included."""
        height, cin = self.config.n_height, self.config.cin_channels
        if audio.dim() != 2 or mel.dim() != 3 or mel.shape[1] != cin or not 1 <= audio.shape[0] == mel.shape[0]:
            raise ValueError(
                f"audio must be [B, T] and mel [B, {cin}, F], one B >= 1, got shapes "
                f"{tuple(audio.shape)} and {tuple(mel.shape)}"
            )
        if not audio.is_floating_point():
            raise ValueError(f"audio must be floating point (samples in [-1, 1]), got {audio.dtype}")
        length = audio.shape[1]
        if length == 0 or length % height:
            raise ValueError(f"audio length {length} is not a positive multiple of n_height {height}")
        dtype = next(self.parameters()).dtype
        audio, mel = audio.to(torch.promote_types(dtype, torch.float32)), mel.to(dtype)
        c = self.upsample(mel)
        if c.shape[-1] < length:
            frames = mel.shape[-1]
            raise ValueError(
                f"mel of {frames} frame{'s' if frames != 1 else ''} covers {c.shape[-1]} samples, audio has {length}"
            )
        c = squeeze(c[..., :length], height).contiguous(memory_format=torch.channels_last)  # [B, cin, H, W]
        x = squeeze(audio.unsqueeze(1), height)  # [B, 1, H, W]
        logdet = audio.new_zeros(audio.shape[0], dtype=torch.promote_types(audio.dtype, torch.float32))
        use_checkpoint = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # A shared estimator sees the mel in at most a few row orders: project it once per order.
        conds, cond_net = {}, None
        for flow in range(self.config.n_flow):
            x, c = self.permute(flow, x), self.permute(flow, c)
            net = self.flow_parts(flow)[0]
            if net is not cond_net:
                conds, cond_net = {}, net
            key = self.row_orders[flow]
            if key not in conds:
                conds[key] = net.condition(c)
            if use_checkpoint:
                x, flow_logdet = checkpoint(self._flow_forward, flow, x, conds[key], use_reentrant=False)
            else:
                x, flow_logdet = self._flow_forward(flow, x, conds[key])
            logdet = logdet + flow_logdet
        return x, logdet

    # --- synthesis: z -> audio ----------------------------------------------------------------

    @torch.no_grad()
    def infer(
        self,
        mel: torch.Tensor,
        sigma: float = 1.0,
        z: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        max_cpu_columns: int = MAX_CPU_COLUMNS,
        condition_cache_bytes: int = CONDITION_CACHE_BYTES,
        cuda_graphs: CudaGraphCache | None = None,
    ) -> torch.Tensor:
        """Synthesize audio from `mel [B, cin, F]` -> `audio [B, synthesis_length(F, hop_length)]` (fp32, float64
        for a float64 model, on the model's device, where the mel and `z` are moved).

        `z [B, 1, H, W]` is the noise, drawn from `N(0, sigma^2)` when not given (`generator`
        makes it reproducible; the noise is drawn on the generator's device, so a CPU generator gives a GPU
        model the CPU's noise; a `z` given is taken as it is, `sigma` unused). Exact inverse of `forward`,
        one row at a time with convolution queues (`inference.synthesize`, which documents the options; none
        changes the result beyond rounding).
        Nothing is stored on the model: threads may synthesize with one model at once. Runs under
        `torch.no_grad`: the audio carries no gradient back to the mel or the weights.
        """
        height, cin = self.config.n_height, self.config.cin_channels
        check_mel_type(mel)
        if mel.dim() != 3 or mel.shape[1] != cin or mel.shape[0] == 0:
            raise ValueError(f"mel must be [B, {cin}, F] with B >= 1, got shape {tuple(mel.shape)}")
        frames = mel.shape[-1]
        if synthesis_length(frames, self.config.hop_length) <= 0:
            raise ValueError(
                f"a mel of {frames} frame{'s' if frames != 1 else ''} is too short to synthesize "
                f"(need at least {SYNTHESIS_TRIM_FRAMES + 1})"
            )
        parameter = next(self.parameters())
        check_finite_mel(mel, parameter.dtype)
        # The mel and the noise go where the model is: a mel made on the CPU, `ColumnNoise`'s z (drawn there).
        mel = mel.to(parameter.device, parameter.dtype)
        c = self.upsample(mel)[..., : -SYNTHESIS_TRIM_FRAMES * self.config.hop_length]
        c = squeeze(c, height)  # [B, cin, H, W]: n_height divides the hop (the config's rule)
        batch, _, _, width = c.shape
        if z is None:
            check_temperature(sigma)
            where = c.device if generator is None else generator.device
            z = torch.randn(batch, 1, height, width, device=where, generator=generator) * sigma
        elif not isinstance(z, torch.Tensor) or not z.is_floating_point():
            kind = z.dtype if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a floating-point tensor [B, 1, H, W] of noise, got {kind}")
        elif z.shape != (batch, 1, height, width):
            raise ValueError(f"z must have shape {(batch, 1, height, width)}, got {tuple(z.shape)}")
        elif not bool(torch.isfinite(z).all()):
            raise ValueError("z holds NaN or infinite values, which would make NaN audio")
        x = synthesize(self, c, z.to(c.device), max_cpu_columns, condition_cache_bytes, cuda_graphs)  # [B, 1, H, W]
        return unsqueeze(x).squeeze(1)

    # --- inference preparation ----------------------------------------------------------------

    def parameter_count(self, inference: bool = False) -> int:
        """Trainable parameters as trained, or (`inference=True`) as the paper counts them:
        weight norm folded, and NanoFlow's embedding path replaced by its cached products
        (one `[2R]` vector per flow and layer)."""
        if not inference:
            return sum(p.numel() for p in self.parameters() if p.requires_grad)
        count = 0
        for name, parameter in self.named_parameters():
            if name.endswith("weight_g") or name.startswith("flow_embedding") or ".filter_gate_conv_h." in name:
                continue
            count += parameter.numel()
        if self.config.coupling_type == "nanoflow":
            config = self.config
            count += config.n_flow * config.n_layer * 2 * config.res_channels
        return count

    def remove_weight_norm(self) -> WaveFlow:
        """Fold every weight norm into a plain weight (faster inference); the model stays usable
        and still loads checkpoints in either layout. The folded weights are new parameters: an optimizer
        made before no longer updates them (fold a copy to synthesize during training)."""
        for module in self.modules():
            if isinstance(module, WeightNormMixin):
                module.remove_weight_norm()
        return self


def build_model(waveflow_config: dict | WaveFlowConfig | Config) -> WaveFlow:
    """Build the model of a `waveflow_config` section (a dict as in the JSON configs, or parsed), or of
    a whole config (the JSON's dict of sections, or a `Config`), whose `waveflow_config` it reads."""
    if isinstance(waveflow_config, Config):
        waveflow_config = waveflow_config.waveflow
    elif isinstance(waveflow_config, dict) and "waveflow_config" in waveflow_config:
        waveflow_config = config_from_dict(waveflow_config, sections=("waveflow_config",)).waveflow
    if not isinstance(waveflow_config, WaveFlowConfig):
        waveflow_config = parse_section(WaveFlowConfig, waveflow_config, "waveflow_config")
    return WaveFlow(waveflow_config)
