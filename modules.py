"""Building blocks of WaveFlow (Ping et al., ICML 2020) and NanoFlow (Lee et al., NeurIPS 2020).

The 2-D WaveNet estimator (`WaveNet2D`) is the density estimator of one affine
coupling; NanoFlow shares one of them across all flows and tells it which flow
it serves through a flow embedding (`filter_gate_conv_h`) and multiplicative
gates (`multgate`), paper section 3.

Layout: audio squeezed to `x [B, 1, H, W]` (H = `n_height` rows, W columns);
the estimator is causal along height (row h sees rows <= h of its input) and
non-causal along width. Fast inference produces one row at a time; every
residual block then keeps a small convolution queue of its recent input rows
(`ResidualBlock.step`), so a row costs one row's worth of convolutions.

Parameter names follow the original code (`filter_gate_conv`, `res_skip_conv`,
`weight_g`/`weight_v` of the old `torch.nn.utils.weight_norm`, ...) so that its
checkpoints load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SQRT_HALF = math.sqrt(0.5)


# ----------------------------------------------------------------------------- weight norm

def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    """L2 norm over every dimension but the first, kept as size-1 dims: `[out, ...] -> [out, 1, ...]`."""
    return torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)


class WeightNormMixin:
    """Weight normalisation (Salimans & Kingma, 2016): `weight = g * v / |v|`, norm over dim 0.

    Stores `weight_g` and `weight_v` exactly as the old `torch.nn.utils.weight_norm`
    did, so the original checkpoints load. `remove_weight_norm()` folds them into
    a plain `weight`; loading a state dict converts between the two layouts, so a
    checkpoint loads whichever state the module is in.
    """

    def _init_weight_norm(self) -> None:
        weight = self.weight.detach()
        del self._parameters["weight"]
        self.weight_g = nn.Parameter(_norm_except_dim0(weight))
        self.weight_v = nn.Parameter(weight.clone())

    @property
    def has_weight_norm(self) -> bool:
        return "weight_v" in self._parameters

    def normed_weight(self) -> torch.Tensor:
        if self.has_weight_norm:
            return self.weight_v * (self.weight_g / _norm_except_dim0(self.weight_v))
        return self.weight

    def remove_weight_norm(self) -> None:
        if not self.has_weight_norm:
            return
        weight = self.normed_weight().detach()
        del self._parameters["weight_g"], self._parameters["weight_v"]
        self.weight = nn.Parameter(weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        g, v, w = prefix + "weight_g", prefix + "weight_v", prefix + "weight"
        if not self.has_weight_norm and g in state_dict and v in state_dict:
            weight_g, weight_v = state_dict.pop(g), state_dict.pop(v)
            state_dict[w] = weight_v * (weight_g / _norm_except_dim0(weight_v))
        elif self.has_weight_norm and w in state_dict and g not in state_dict:
            weight = state_dict.pop(w)
            state_dict[v], state_dict[g] = weight, _norm_except_dim0(weight)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WNConv2d(WeightNormMixin, nn.Conv2d):
    """Weight-normed `nn.Conv2d`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normed_weight(), self.bias)


class WNConvTranspose2d(WeightNormMixin, nn.ConvTranspose2d):
    """Weight-normed `nn.ConvTranspose2d` (the mel upsampler)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.normed_weight(), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


# ----------------------------------------------------------------------------- small pieces

def shift_1d(x: torch.Tensor) -> torch.Tensor:
    """Shift down one row along height: a zero row on top, the last row dropped.

    `x [B, C, H, W] -> [B, C, H, W]`. Row h of the result is row h - 1 of `x`, so an
    estimator that is causal along height sees only rows < h when it predicts row h.
    """
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def gated_activation(a: torch.Tensor) -> torch.Tensor:
    """WaveNet's gate: `tanh(filter) * sigmoid(gate)` on the two halves of the channels."""
    filter_, gate = a.chunk(2, dim=1)
    return torch.tanh(filter_) * torch.sigmoid(gate)


def fused_res_skip(h: torch.Tensor, res_skip: torch.Tensor,
                   multgate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `res_skip_conv`'s output and update the residual stream.

    `h [B, R, ...]`, `res_skip [B, 2R, ...]`, `multgate [R]` or None.
    WaveFlow: `(h + res) * sqrt(0.5)`; NanoFlow: `h + res * multgate` (the flow's gate).
    Returns `(next h, skip)`.
    """
    res, skip = res_skip.chunk(2, dim=1)
    if multgate is None:
        return (h + res) * SQRT_HALF, skip
    shape = (1, -1) + (1,) * (h.dim() - 2)
    return h + res * multgate.view(shape), skip


class HeightCausalConv2d(nn.Module):
    """Weight-normed conv that is causal along height and centred along width.

    Kernel `(kh, kw)` with dilation `(dh, dw)`: `(kh - 1) * dh` zero rows are padded on
    top only, `(kw - 1) // 2 * dw` columns on each side, so output row h depends on
    input rows <= h and the output keeps the input's size. `[B, Cin, H, W] -> [B, Cout, H, W]`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 dilation: tuple[int, int] = (1, 1)):
        super().__init__()
        self.pad_top = (kernel_size - 1) * dilation[0]
        self.pad_side = (kernel_size - 1) // 2 * dilation[1]
        self.conv = WNConv2d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad_side, self.pad_side, self.pad_top, 0)))


class ProjLogST(nn.Module):
    """The last layer of a coupling: 1x1 conv `R -> 2` giving `(log_s, t)`, scaled by `exp(3 * scale)`.

    Near-zero initialisation (weights uniform in [-1e-3, 1e-3], `scale` zero) makes
    every flow start close to the identity. `feat [B, R, H, W] -> [B, 2, H, W]`.
    """

    def __init__(self, res_channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, 2, 1, 1))
        self.conv = nn.Conv2d(res_channels, 2, 1)
        nn.init.uniform_(self.conv.weight, -1e-3, 1e-3)
        nn.init.uniform_(self.conv.bias, -1e-3, 1e-3)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.conv(feat) * torch.exp(3 * self.scale)


class FlowEmbedding(WeightNormMixin, nn.Module):
    """NanoFlow's per-flow embedding: row i of a `[n_flow, E]` table tells the shared estimator
    which flow it serves (paper section 3.2). Orthogonal initialisation; optionally
    weight-normed (`use_weightnorm_embed`), stored as the original did: `weight_g [K, 1]`,
    `weight_v [K, E]`.
    """

    def __init__(self, n_flow: int, size: int, weight_norm: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_flow, size))
        nn.init.orthogonal_(self.weight)
        if weight_norm:
            self._init_weight_norm()

    def forward(self, flow: int) -> torch.Tensor:
        """The embedding of flow `flow` as a `[1, E, 1, 1]` tensor (broadcast over the batch)."""
        return self.normed_weight()[flow].view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- 2-D WaveNet

def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one batched matrix product: `x [B, Cin, *S] -> [B, Cout, *S]`.

    `weight [Cout, Cin, 1, ...]`. On CPU this is several times faster than the
    convolution kernels for these shapes, forward and backward; on GPU it is as fast.
    """
    batch, spatial = x.shape[0], x.shape[2:]
    weight = weight.reshape(1, weight.shape[0], -1).expand(batch, -1, -1)
    flat = x.reshape(batch, x.shape[1], -1)
    out = torch.bmm(weight, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, flat)
    return out.view(batch, -1, *spatial)


class ResidualBlock(nn.Module):
    """Layer j of the 2-D WaveNet.

    `a = filter_gate_conv(h) + filter_gate_conv_c(c) [+ filter_gate_conv_h(flow embedding)]`,
    gated activation, then `res_skip_conv` split into the residual update and the skip
    output (`fused_res_skip`). The 3x3 conv has dilation `(dh, dw)`, causal along height.
    The conditioning term arrives precomputed (`WaveNet2D.condition`) and the
    row-independent terms as one bias (`gate_bias`), so a shared estimator projects
    the mel once however many flows use it.

    For fast inference the block keeps a convolution queue (`start_inference`, `step`):
    the last `2 * dh + 1` rows of its input, the rows the causal 3x3 conv reads.
    """

    def __init__(self, res_channels: int, cin_channels: int, dilation: tuple[int, int],
                 size_flow_embed: int = 0, is_last: bool = False):
        super().__init__()
        self.res_channels = res_channels
        self.is_last = is_last  # the last block's residual half is never used: not computed
        self.filter_gate_conv = HeightCausalConv2d(res_channels, 2 * res_channels, 3, dilation)
        self.filter_gate_conv_c = WNConv2d(cin_channels, 2 * res_channels, 1)
        if size_flow_embed:
            self.filter_gate_conv_h = WNConv2d(size_flow_embed, 2 * res_channels, 1)
        self.res_skip_conv = WNConv2d(res_channels, 2 * res_channels, 1)
        # Inference state: the queue and the folded weights used while producing rows.
        self.register_buffer("queue", None, persistent=False)
        self.register_buffer("step_gate_weight", None, persistent=False)
        self.register_buffer("step_res_skip_weight", None, persistent=False)
        self.register_buffer("step_res_skip_bias", None, persistent=False)

    def gate_bias(self, flow_embed: torch.Tensor | None) -> torch.Tensor:
        """Everything added to the gate input that does not depend on the position: `[2R]`."""
        bias = self.filter_gate_conv.conv.bias + self.filter_gate_conv_c.bias
        if flow_embed is not None:
            bias = bias + conv1x1(flow_embed, self.filter_gate_conv_h.normed_weight(),
                                  self.filter_gate_conv_h.bias).flatten()
        return bias

    def _res_skip(self, gated: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  h: torch.Tensor, multgate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_last:
            return h, conv1x1(gated, weight[self.res_channels:], bias[self.res_channels:])
        return fused_res_skip(h, conv1x1(gated, weight, bias), multgate)

    def forward(self, h: torch.Tensor, cond: torch.Tensor, gate_bias: torch.Tensor,
                multgate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`h [B, R, H, W]`, `cond [B, 2R, H, W]` (this block's conditioning, no bias),
        `gate_bias [2R]`, `multgate [R]` -> `(next h [B, R, H, W], skip [B, R, H, W])`."""
        conv = self.filter_gate_conv
        padded = F.pad(h, (conv.pad_side, conv.pad_side, conv.pad_top, 0))
        a = F.conv2d(padded, conv.conv.normed_weight(), gate_bias, dilation=conv.conv.dilation) + cond
        return self._res_skip(gated_activation(a), self.res_skip_conv.normed_weight(),
                              self.res_skip_conv.bias, h, multgate)

    # --- fast inference: one row at a time ---------------------------------------------------

    def start_inference(self, batch: int, width: int, like: torch.Tensor) -> None:
        """Allocate an empty (zero) queue for rows of `width` columns, dtype and device of `like`."""
        conv = self.filter_gate_conv
        rows = conv.pad_top + 1
        # Rows are outermost so that the rows the conv reads form one [3R, W] input of a 1-D
        # conv over width; every row is written twice (slots s and s + rows), so the newest
        # `rows` rows are always one window of the buffer: a ring without wrap-around.
        self.queue = like.new_zeros(batch, 2 * rows, self.res_channels, width + 2 * conv.pad_side)
        weight = conv.conv.normed_weight().detach().to(like.dtype)  # [2R, R, 3, 3]
        self.step_gate_weight = weight.permute(0, 2, 1, 3).reshape(weight.shape[0], -1, weight.shape[3])
        self.step_res_skip_weight = self.res_skip_conv.normed_weight().detach().to(like.dtype)
        self.step_res_skip_bias = self.res_skip_conv.bias.detach().to(like.dtype)

    def end_inference(self) -> None:
        self.queue = self.step_gate_weight = self.step_res_skip_weight = self.step_res_skip_bias = None

    def step(self, h_row: torch.Tensor, cond_row: torch.Tensor, gate_bias: torch.Tensor,
             multgate: torch.Tensor | None, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute row `row` of the block's output from its input row and the queue.

        `h_row [B, R, W]` (input row `row`), `cond_row [B, 2R, W]` (the conditioning
        projection of that row, no bias), `gate_bias [2R]` -> `(next h_row, skip_row)`,
        both `[B, R, W]`. Rows must be fed in order 0, 1, 2, ... after `start_inference`.
        """
        conv = self.filter_gate_conv
        dilation_h, dilation_w = conv.conv.dilation
        rows = conv.pad_top + 1
        slot = row % rows
        columns = slice(conv.pad_side, conv.pad_side + h_row.shape[-1])
        self.queue[:, slot, :, columns] = h_row
        self.queue[:, slot + rows, :, columns] = h_row
        taps = self.queue[:, slot + 1:slot + rows + 1:dilation_h]  # [B, 3, R, W + 2 * pad_side], oldest first
        a = F.conv1d(taps.flatten(1, 2), self.step_gate_weight, gate_bias, dilation=dilation_w)  # [B, 2R, W]
        a += cond_row
        return self._res_skip(gated_activation(a), self.step_res_skip_weight, self.step_res_skip_bias,
                              h_row, multgate)


class WaveNet2D(nn.Module):
    """The density estimator of WaveFlow/NanoFlow: a 2-D WaveNet, causal along height.

    `front_conv` (1x1, 1 -> R), then `n_layer` residual blocks with dilation
    `(2 ** (j % n_layer_per_cycle), 2 ** j)`; the output is the sum of the skips.
    NanoFlow shares one instance across flows and passes the flow's embedding and
    gates (`flow_embed`, `multgate`) with every call.
    """

    def __init__(self, res_channels: int, cin_channels: int, n_layer: int, n_layer_per_cycle: int,
                 size_flow_embed: int = 0):
        super().__init__()
        self.res_channels = res_channels
        self.front_conv = nn.Sequential(HeightCausalConv2d(1, res_channels, 1))
        self.res_blocks = nn.ModuleList(
            ResidualBlock(res_channels, cin_channels, (2 ** (j % n_layer_per_cycle), 2 ** j), size_flow_embed,
                          is_last=j == n_layer - 1)
            for j in range(n_layer))

    def condition(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every block's conditioning projection, without bias: `c [B, cin, H, W] -> L x [B, 2R, H, W]`.

        Independent of the flow embedding, and a 1x1 conv commutes with permuting rows, so a
        shared estimator computes it once per orientation of the rows. A tuple, not one
        tensor, so that using it in many flows costs autograd one gradient per block.
        """
        weight = torch.cat([block.filter_gate_conv_c.normed_weight() for block in self.res_blocks])
        cond = conv1x1(c, weight, None)  # [B, L * 2R, H, W]
        return cond.split(2 * self.res_channels, dim=1)

    def gate_biases(self, flow_embed: torch.Tensor | None) -> torch.Tensor:
        """`[L, 2R]`: each block's position-independent gate input for this flow."""
        return torch.stack([block.gate_bias(flow_embed) for block in self.res_blocks])

    def front(self, x: torch.Tensor) -> torch.Tensor:
        """`front_conv`, a 1x1 conv from 1 channel: `x [B, 1, *S] -> [B, R, *S]`."""
        conv = self.front_conv[0].conv
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * conv.normed_weight().view(shape) + conv.bias.view(shape)

    def forward(self, x: torch.Tensor, cond: tuple[torch.Tensor, ...], gate_biases: torch.Tensor,
                multgate: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B, 1, H, W]`, `cond` L x `[B, 2R, H, W]` (`self.condition(c)`), `gate_biases [L, 2R]`
        (`self.gate_biases(flow_embed)`), `multgate [L, R]` -> `feat [B, R, H, W]`.
        Row h of `feat` depends on rows <= h of `x`."""
        h = self.front(x)
        skip = 0
        for j, block in enumerate(self.res_blocks):
            h, s = block(h, cond[j], gate_biases[j], None if multgate is None else multgate[j])
            skip = skip + s
        return skip

    # --- fast inference ----------------------------------------------------------------------

    def start_inference(self, batch: int, width: int, like: torch.Tensor) -> None:
        for block in self.res_blocks:
            block.start_inference(batch, width, like)

    def end_inference(self) -> None:
        for block in self.res_blocks:
            block.end_inference()

    def step(self, x_row: torch.Tensor, cond: tuple[torch.Tensor, ...], cond_row: int,
             gate_biases: torch.Tensor, multgate: torch.Tensor | None, row: int) -> torch.Tensor:
        """Row `row` of the estimator's output (rows are fed in order 0, 1, ...).

        `x_row [B, 1, W]` is row `row` of the (already shifted) input; `cond` is L x
        `[B, 2R, H, W]` (`self.condition(c)`), of which row `cond_row` belongs to this
        output row; `gate_biases [L, 2R]`, `multgate [L, R]` -> `feat_row [B, R, W]`.
        """
        h = self.front(x_row)
        skip = 0
        for j, block in enumerate(self.res_blocks):
            h, s = block.step(h, cond[j][:, :, cond_row], gate_biases[j],
                              None if multgate is None else multgate[j], row)
            skip = skip + s
        return skip
