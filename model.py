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
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from config import WaveFlowConfig, parse_section
from modules import FlowEmbedding, ProjLogST, WaveNet2D, WeightNormMixin, WNConvTranspose2d, shift_1d

SYNTHESIS_TRIM = 768   # samples dropped at the end in synthesis, as the original did (3 frames)


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
    dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(dtype)
    n = z.numel()
    constant = 0.5 * (math.log(2 * math.pi) + 2 * math.log(sigma))
    return constant + (0.5 * z.pow(2).sum() / sigma ** 2 - logdet.to(dtype).sum()) / n


class CudaGraphCache:
    """Replays a function of CUDA tensors from a captured CUDA graph, per input shape.

    Row-by-row synthesis is a long chain of small kernels whose launches, not their
    arithmetic, bound its speed on a GPU: replaying them as one graph removes that cost.
    A shape is run eagerly the first time it is seen and captured the second time, so a
    one-off length pays nothing for capture, and a length synthesized again (a benchmark,
    a server with fixed-size requests, a batch of equal clips) runs at the graph's speed.
    Graphs are keyed by the inputs' shapes, dtypes and devices and by `weights`, a
    fingerprint of the parameters (their storage and version), so loading or folding
    weights never replays a stale graph. At most `size` graphs are kept, least recently
    used first out, since each holds its own memory pool.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.graphs: OrderedDict = OrderedDict()  # key -> (graph, static inputs, static output)
        self.seen: OrderedDict = OrderedDict()    # keys run eagerly once

    def __call__(self, function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                 weights: tuple) -> torch.Tensor:
        key = (weights, tuple((tensor.shape, tensor.dtype, tensor.device) for tensor in inputs))
        if key not in self.graphs:
            if key not in self.seen:
                self.seen[key] = None
                while len(self.seen) > 4 * self.size:
                    self.seen.popitem(last=False)
                return function(*inputs)
            self.graphs[key] = self._capture(function, inputs)
            while len(self.graphs) > self.size:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static_inputs, static_output = self.graphs[key]
        for static, tensor in zip(static_inputs, inputs):
            static.copy_(tensor)
        graph.replay()
        return static_output.clone()

    @staticmethod
    def _capture(function, inputs):
        device = inputs[0].device
        static_inputs = tuple(tensor.clone() for tensor in inputs)
        with torch.cuda.device(device):
            # A warm-up on a side stream, as CUDA graph capture requires (lazy library initialisation).
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                function(*static_inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = function(*static_inputs)
        return graph, static_inputs, static_output


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
            return WaveNet2D(R, config.cin_channels, L, config.n_layer_per_cycle,
                             config.size_flow_embed if kind == "nanoflow" else 0)

        if kind == "nanoflow":
            self.flow_embedding = FlowEmbedding(K, config.size_flow_embed, config.use_weightnorm_embed)
        # The ModuleDicts only reproduce the original's key names (`flows.0.coupling.net...`).
        if kind == "waveflow":
            self.flows = nn.ModuleList(nn.ModuleDict({"coupling": Coupling(R, net=estimator())})
                                       for _ in range(K))
        elif kind == "nanoflow_naive":
            self.flow = nn.ModuleDict({"coupling": Coupling(R, net=estimator())})
        else:
            self.estimator = nn.ModuleDict({"net": estimator()})
            self.flows = nn.ModuleList(Coupling(R, multgate_layers=L if kind == "nanoflow" else 0)
                                       for _ in range(K))
        # Inference keeps the conditioning of every row when it fits this many bytes (8 per layer,
        # channel and sample), and otherwise projects each row when it is needed: see `infer`.
        self.condition_cache_bytes = 2 ** 31
        # Synthesis on a CPU processes at most this many columns (batch x width) at once, when the
        # batch allows: beyond, a row's working set falls out of the caches.
        self.max_inference_columns = 2 ** 11
        # Synthesis on a GPU replays CUDA graphs for lengths it has seen before (CudaGraphCache);
        # False runs every kernel eagerly.
        self.cuda_graphs = True
        self._graph_cache = CudaGraphCache()
        self.upsample_conv = nn.Sequential(
            WNConvTranspose2d(1, 1, (3, 32), stride=(1, 16), padding=(1, 8)), nn.LeakyReLU(0.4),
            WNConvTranspose2d(1, 1, (3, 32), stride=(1, 16), padding=(1, 8)), nn.LeakyReLU(0.4))

    # --- what each flow uses ----------------------------------------------------------------

    def flow_parts(self, flow: int) -> tuple[WaveNet2D, Coupling, torch.Tensor | None]:
        """The estimator, the coupling parameters and the flow embedding that flow `flow` uses."""
        kind = self.config.coupling_type
        if kind == "waveflow":
            coupling = self.flows[flow]["coupling"]
            return coupling.net, coupling, None
        if kind == "nanoflow_naive":
            coupling = self.flow["coupling"]
            return coupling.net, coupling, None
        embedding = self.flow_embedding(flow) if kind == "nanoflow" else None
        return self.estimator["net"], self.flows[flow], embedding

    def permute(self, flow: int, x: torch.Tensor) -> torch.Tensor:
        """Flow `flow`'s permutation of the rows of `x [B, C, H, W]`; its own inverse.

        Reverse the height; with `bipartize`, the second half of the flows reverse each
        half of the rows separately (WaveFlow paper, section 4.3).
        """
        if self.config.bipartize and flow >= self.config.n_flow // 2:
            upper, lower = x.chunk(2, dim=2)
            return torch.cat([upper.flip(2), lower.flip(2)], dim=2)
        return x.flip(2)

    def coupling_params(self, flow: int, x: torch.Tensor, c: torch.Tensor,
                        cond: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(log_s, t)`, both `[B, 1, H, W]` in fp32 or better, for flow `flow` given its (permuted) input
        `x [B, 1, H, W]` and conditioning `c [B, cin, H, W]`. Row h depends on rows < h of `x`.
        `cond`, the estimator's projection of `c` (`WaveNet2D.condition`), is computed when not given."""
        net, coupling, embedding = self.flow_parts(flow)
        if cond is None:
            cond = net.condition(c)
        log_s_t = net(shift_1d(x), cond, net.gate_biases(embedding), getattr(coupling, "multgate", None),
                      *coupling.proj_log_s_t.affine())
        log_s, t = log_s_t.to(torch.promote_types(log_s_t.dtype, torch.float32)).chunk(2, dim=1)
        return log_s, t

    # --- training direction: audio -> z -------------------------------------------------------

    def upsample(self, mel: torch.Tensor) -> torch.Tensor:
        """`mel [B, cin, F] -> [B, cin, 256 * F]`."""
        return self.upsample_conv(mel.unsqueeze(1)).squeeze(1)

    def _flow_forward(self, flow: int, x: torch.Tensor,
                      cond: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        log_s, t = self.coupling_params(flow, x, None, cond)
        return x * torch.exp(log_s) + t, log_s.sum(dim=(1, 2, 3))

    def forward(self, audio: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`audio [B, T]`, `mel [B, cin, F]` with `256 * F >= T` -> `z [B, 1, H, T / H]`, `logdet [B]` (fp32)."""
        height = self.config.n_height
        length = audio.shape[1]
        if length % height:
            raise ValueError(f"audio length {length} is not a multiple of n_height {height}")
        c = self.upsample(mel)
        if c.shape[-1] < length:
            raise ValueError(f"mel of {mel.shape[-1]} frames covers {c.shape[-1]} samples, audio has {length}")
        c = squeeze(c[..., :length], height).contiguous(memory_format=torch.channels_last)  # [B, cin, H, W]
        x = squeeze(audio.unsqueeze(1), height)  # [B, 1, H, W]
        logdet = audio.new_zeros(audio.shape[0], dtype=torch.promote_types(audio.dtype, torch.float32))
        use_checkpoint = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # A shared estimator sees the mel in at most a few row orders: project it once per order.
        conds, cond_net = {}, None
        order = torch.arange(height).view(1, 1, height, 1)
        for flow in range(self.config.n_flow):
            x, c, order = self.permute(flow, x), self.permute(flow, c), self.permute(flow, order)
            net = self.flow_parts(flow)[0]
            if net is not cond_net:
                conds, cond_net = {}, net
            key = tuple(order.flatten().tolist())
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
    def infer(self, mel: torch.Tensor, sigma: float = 1.0, z: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Synthesize audio from `mel [B, cin, F]` -> `audio [B, 256 * (F - 3)]` (fp32).

        `z [B, 1, H, W]` is the noise, drawn from `N(0, sigma^2)` when not given (`generator`
        makes it reproducible). Exact inverse of `forward`, one row at a time with
        convolution queues; the conditioning is projected once per estimator.
        """
        height = self.config.n_height
        dtype = next(self.parameters()).dtype
        c = self.upsample(mel.to(dtype))[..., :-SYNTHESIS_TRIM]
        if c.shape[-1] <= 0 or c.shape[-1] % height:
            raise ValueError(f"a mel of {mel.shape[-1]} frames gives {max(c.shape[-1], 0)} samples, "
                             f"which must be positive and a multiple of n_height {height}")
        c = squeeze(c, height)  # [B, cin, H, W]
        batch, _, _, width = c.shape
        if z is None:
            z = torch.randn(batch, 1, height, width, device=c.device, generator=generator) * sigma
        elif z.shape != (batch, 1, height, width):
            raise ValueError(f"z must have shape {(batch, 1, height, width)}, got {tuple(z.shape)}")
        if c.device.type == "cuda" and self.cuda_graphs:
            weights = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
            return self._graph_cache(self._synthesize, (c, z), weights)
        # Items are independent: on a CPU a large batch goes in groups whose rows stay cache-sized.
        group = max(1, self.max_inference_columns // width) if c.device.type == "cpu" else batch
        audio = [self._synthesize(c[start:start + group], z[start:start + group])
                 for start in range(0, batch, group)]
        return audio[0] if len(audio) == 1 else torch.cat(audio)

    def _synthesize(self, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """`infer` for `c [B, cin, H, W]` (upsampled, squeezed), `z [B, 1, H, W]` -> `audio [B, H * W]`."""
        height = self.config.n_height
        # rows[flow][h]: the row of the unpermuted conditioning that is row h in that flow.
        order = torch.arange(height).view(1, 1, height, 1)
        rows = []
        for flow in range(self.config.n_flow):
            order = self.permute(flow, order)
            rows.append(order.flatten().tolist())

        x = z.float()
        # The conditioning of all rows, projected once per estimator, takes 8 bytes per layer,
        # channel and sample; past the budget each row is projected when it is needed instead.
        config = self.config
        cache_bytes = c.numel() // config.cin_channels * config.n_layer * 2 * config.res_channels * c.element_size()
        cache = cache_bytes <= self.condition_cache_bytes
        nets = [self.flow_parts(flow)[0] for flow in range(config.n_flow)]
        cond_net, cond = None, None
        try:
            for flow in reversed(range(config.n_flow)):
                net = nets[flow]
                if cache and net is not cond_net:
                    cond_net, cond = net, net.condition_rows(c)  # [H, B, W, L, 2R]
                x = self.permute(flow, self._reverse_coupling(flow, x, c, cond, rows[flow]))
                # An estimator shared with the flows still to come keeps its prepared weights.
                net.end_inference(keep_weights=net in nets[:flow])
        finally:
            for net in nets:
                net.end_inference()
        return unsqueeze(x).squeeze(1)

    def _reverse_coupling(self, flow: int, z: torch.Tensor, c: torch.Tensor, cond: torch.Tensor | None,
                          rows: list[int]) -> torch.Tensor:
        """Invert flow `flow`'s coupling row by row. `z [B, 1, H, W]` fp32, `c [B, cin, H, W]` and
        optionally its projection `cond [H, B, W, L, 2R]`, both of the unpermuted rows
        -> `x [B, 1, H, W]` in the flow's (permuted) row order."""
        net, coupling, embedding = self.flow_parts(flow)
        dtype = c.dtype
        batch, _, height, width = z.shape
        x = torch.empty_like(z)
        x_row = z.new_zeros(batch, width)  # the row above row 0 (shift_1d pads with zeros)
        net.start_inference(batch, width, c, net.gate_biases(embedding), getattr(coupling, "multgate", None),
                            *coupling.proj_log_s_t.affine())
        for h in range(height):
            source = rows[h]
            cond_row = cond[source] if cond is not None else net.condition_rows(c[:, :, source:source + 1])[0]
            log_s_t = net.step(x_row.to(dtype), cond_row, h).float()  # [B, W, 2]
            x_row = (z[:, 0, h] - log_s_t[..., 1]) * torch.exp(-log_s_t[..., 0])  # [B, W]
            x[:, 0, h] = x_row
        return x

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

    def remove_weight_norm(self) -> "WaveFlow":
        """Fold every weight norm into a plain weight (faster inference); the model stays usable
        and still loads checkpoints in either layout."""
        for module in self.modules():
            if isinstance(module, WeightNormMixin):
                module.remove_weight_norm()
        return self


def build_model(waveflow_config: dict | WaveFlowConfig) -> WaveFlow:
    """Build the model of a `waveflow_config` section (a dict as in the JSON configs, or parsed)."""
    if not isinstance(waveflow_config, WaveFlowConfig):
        waveflow_config = parse_section(WaveFlowConfig, waveflow_config, "waveflow_config")
    return WaveFlow(waveflow_config)
