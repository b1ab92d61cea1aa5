"""Building blocks of WaveFlow (Ping et al., ICML 2020) and NanoFlow (Lee et al., NeurIPS 2020).

The 2-D WaveNet estimator (`WaveNet2D`) is the density estimator of one affine
coupling; NanoFlow shares one of them across all flows and tells it which flow
it serves through a flow embedding (`filter_gate_conv_h`) and multiplicative
gates (`multgate`), paper section 3.

Layout: audio squeezed to `x [B, 1, H, W]` (H = `n_height` rows, W columns);
the estimator is causal along height (row h sees rows <= h of its input) and
non-causal along width. Synthesis produces one row at a time; `inference.py`
runs these modules that way, with a small convolution queue per residual block.
The modules hold parameters only, never the state of one synthesis.

Parameter names follow the original code (`filter_gate_conv`, `res_skip_conv`,
`weight_g`/`weight_v` of the old `torch.nn.utils.weight_norm`, ...) so that its
checkpoints load unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

SQRT_HALF = math.sqrt(0.5)


# ----------------------------------------------------------------------------- weight norm


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    """L2 norm over every dimension but the first, kept as size-1 dims: `[out, ...] -> [out, 1, ...]`."""
    return torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)


class WeightNormMixin(nn.Module):
    """Weight normalisation (Salimans & Kingma, 2016): `weight = g * v / |v|`, norm over dim 0.

    Stores `weight_g` and `weight_v` exactly as the old `torch.nn.utils.weight_norm`
    did, so the original checkpoints load. `remove_weight_norm()` folds them into
    a plain `weight`; loading a state dict converts between the two layouts, so a
    checkpoint loads whichever state the module is in.
    """

    weight: torch.Tensor  # a Parameter of the module mixed with, while weight norm is folded
    weight_g: torch.Tensor  # [out, 1, ...], while weight norm is on
    weight_v: torch.Tensor  # the weight's shape, while weight norm is on

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
        """Computed in fp32 (or better) whatever the dtype of `x`, of the weights or of autocast, and returned
        in the dtype of `x`: one channel in and out leaves nothing for matrix units, and a CPU's bf16
        transposed conv ran 5-7x slower than fp32 (2-core Xeon with AMX, 10 s of audio: 0.50-0.67 s against
        0.10 s, 5% of bf16 synthesis)."""
        padding = cast(tuple[int, int], self.padding)  # ConvTranspose2d takes no string padding
        dtype = torch.promote_types(x.dtype, torch.float32)
        with autocast_off(x.device):
            y = F.conv_transpose2d(
                x.to(dtype),
                self.normed_weight().to(dtype),
                conv_bias(self).to(dtype),
                self.stride,
                padding,
                self.output_padding,
                self.groups,
                self.dilation,
            )
        return y.to(x.dtype)


# ----------------------------------------------------------------------------- small pieces


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on `device` (a device autocast knows nothing of, e.g. meta,
    has it off already)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # "unknown device type for autocast"
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def conv_bias(conv: nn.Conv2d | nn.ConvTranspose2d) -> torch.Tensor:
    """The bias of a convolution built with one, as every convolution of this model is."""
    if conv.bias is None:
        raise ValueError(f"{conv} has no bias")
    return conv.bias


def shift_1d(x: torch.Tensor) -> torch.Tensor:
    """Shift down one row along height: a zero row on top, the last row dropped.

    `x [B, C, H, W] -> [B, C, H, W]`. Row h of the result is row h - 1 of `x`, so an
    estimator that is causal along height sees only rows < h when it predicts row h.
    """
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as one matrix product: `x [B, Cin, *S] -> [B, Cout, *S]`, `weight [Cout, Cin, ...]`.

    A plain matrix product runs at the BLAS's speed, which the CPU convolution kernels do not
    reach for these shapes, forward or backward. A channels-last `x` gives a channels-last result.
    """
    weight = weight.reshape(weight.shape[0], -1)  # [Cout, Cin]
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
        batch, channels, height, width = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(-1, channels)  # [B * H * W, Cin], a view
        out = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)  # [B, Cout, H, W], channels last
    batch, spatial = x.shape[0], x.shape[2:]
    flat = x.reshape(batch, x.shape[1], -1)  # [B, Cin, S]
    weight = weight.unsqueeze(0).expand(batch, -1, -1)
    out = torch.bmm(weight, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, flat)
    return out.view(batch, -1, *spatial)


class GatedActivation(torch.autograd.Function):
    """WaveNet's gate, `tanh(a[:, :R]) * sigmoid(a[:, R:])`: `a [B, 2R, ...] -> [B, R, ...]`.

    Written out so that the backward pass fills the gradient of `a` as one tensor:
    autograd's own computes the halves' gradients apart and concatenates them, a
    full extra copy per layer.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        filter_, gate = a.chunk(2, dim=1)
        if a.device.type == "cpu":
            # A CPU's tanh over the strided half of a channels-last `a` ran 8x slower than over a dense copy
            # (fp32), and in bf16 2x slower than in fp32 (1 x 256 x 16 x 1000, 2 threads, AMX Xeon): tanh of a
            # dense fp32 copy, rounded back, is bitwise the same.
            tanh = torch.tanh(filter_.to(torch.promote_types(a.dtype, torch.float32), copy=True)).to(a.dtype)
        else:
            tanh = torch.tanh(filter_)
        sigmoid = torch.sigmoid(gate)
        ctx.save_for_backward(tanh, sigmoid)
        return tanh * sigmoid

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        tanh, sigmoid = ctx.saved_tensors
        grad_s = grad * sigmoid  # d/d tanh
        grad_ts = grad_s * tanh  # d/d sigmoid
        if torch.compiler.is_compiling():
            # torch.compile cannot trace `out=` into slices, and fuses the concatenation into the kernels anyway.
            return torch.cat([grad_s - grad_ts * tanh, grad_ts - grad_ts * sigmoid], dim=1)
        channels = tanh.shape[1]
        layout = (
            torch.channels_last
            if tanh.dim() == 4 and not tanh.is_contiguous() and tanh.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        grad_a = torch.empty(
            (tanh.shape[0], 2 * channels, *tanh.shape[2:]), dtype=grad.dtype, device=grad.device, memory_format=layout
        )
        torch.addcmul(grad_s, grad_ts, tanh, value=-1, out=grad_a[:, :channels])  # grad * s * (1 - t^2)
        torch.addcmul(grad_ts, grad_ts, sigmoid, value=-1, out=grad_a[:, channels:])  # grad * t * s * (1 - s)
        return grad_a


def weight_gradient_by_products(
    x: torch.Tensor, grad: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """The weight gradient of an unpadded, unstrided conv, one matrix product per kernel tap:
    `x [B, Cin, Hp, Wp]` (the padded input), `grad [B, Cout, H, W]` -> `[Cout, Cin, kh, kw]`.

    Tap `(i, j)` is `grad`'s positions against the input window shifted by `(i dh, j dw)`:
    `sum_b grad[b]^T [Cout, H W] @ window[b] [H W, Cin]`. Channels-last, each window is a view of one
    contiguous copy per width tap.
    """
    batch, out_channels, height, width = grad.shape
    in_channels = x.shape[1]
    rows = x.permute(0, 2, 3, 1)  # [B, Hp, Wp, Cin]
    grad_t = grad.permute(0, 2, 3, 1).reshape(batch, height * width, out_channels).transpose(1, 2)  # [B, Cout, H W]
    weight_grad = grad.new_empty(out_channels, in_channels, *kernel)
    for j in range(kernel[1]):
        columns = rows[:, :, j * dilation[1] : j * dilation[1] + width].contiguous()  # [B, Hp, W, Cin]
        for i in range(kernel[0]):
            window = columns[:, i * dilation[0] : i * dilation[0] + height].reshape(batch, height * width, in_channels)
            product = torch.bmm(grad_t, window)  # [B, Cout, Cin]
            weight_grad[:, :, i, j] = product[0] if batch == 1 else product.sum(0)
    return weight_grad


class DilatedConv2d(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, dilation=dilation)` (no padding, stride 1) whose weight gradient is
    `weight_gradient_by_products`: on a CPU, oneDNN's weight gradient of these dilated 3x3 convs ran at
    about half its forward's speed (AVX2 EPYC, fp32), nine plain matrix products at the forward's.
    The input gradient is the library's, the bias gradient a sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return F.conv2d(x, weight, bias, dilation=dilation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad_x = grad_bias = grad_weight = None
        if needs_x:  # (asking oneDNN for the bias gradient too took it off its fast path: 3x slower)
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [0, 0], list(ctx.dilation), False, [0, 0], 1, [True, False, False]
            )[0]
        if needs_bias and ctx.has_bias:
            grad_bias = grad.sum((0, 2, 3))
        if needs_weight:
            grad_weight = weight_gradient_by_products(x, grad, tuple(weight.shape[2:]), ctx.dilation)
        return grad_x, grad_weight, grad_bias, None


# `DilatedConv2d` from this many input channels on: measured 1.2x faster training at 128 channels, no
# faster at 32 (2-core AVX2 EPYC, fp32; docs/speed.md).
PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS = 64


def dilated_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: tuple[int, int]
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, dilation=dilation)`, with `DilatedConv2d`'s weight gradient where it was
    measured faster: fp32 training on a CPU, from `PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS` input channels on.
    Autocast (bf16) and other devices keep the library's backward (not measured on matrix engines yet)."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or torch.is_autocast_enabled("cpu")
        or not (torch.is_grad_enabled() and weight.requires_grad)
        or weight.shape[1] < PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS
    ):
        return F.conv2d(x, weight, bias, dilation=dilation)
    return cast(torch.Tensor, DilatedConv2d.apply(x, weight, bias, dilation))


def fused_res_skip(
    gated: torch.Tensor, h: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor, residual_keep: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`res_skip_conv` and the residual update in one step, with the flow's scales folded in.

    `gated [B, R, ...]` (the block's gated activation), `h [B, R, ...]` (its input),
    `out_weight [R + 2, R]`, `out_bias [R + 2]` from `ResidualBlock.output_weights` (only
    the last 2 rows for the last block). Returns `(next h, share)`: the residual stream
    `res' + residual_keep * h` (None for the last block) and the block's share
    `[B, 2, ...]` of the flow's `(log_s, t)`.
    """
    share = conv1x1(gated, out_weight[-2:], out_bias[-2:])
    if out_weight.shape[0] == 2:
        return None, share
    channels = h.shape[1]
    res = conv1x1(gated, out_weight[:channels], out_bias[:channels])
    return torch.add(res, h, alpha=residual_keep), share


class HeightCausalConv2d(nn.Module):
    """Weight-normed conv that is causal along height and centred along width.

    Kernel `(kh, kw)` with dilation `(dh, dw)`: `(kh - 1) * dh` zero rows are padded on
    top only, `(kw - 1) // 2 * dw` columns on each side, so output row h depends on
    input rows <= h and the output keeps the input's size. `[B, Cin, H, W] -> [B, Cout, H, W]`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: tuple[int, int] = (1, 1)):
        super().__init__()
        self.pad_top = (kernel_size - 1) * dilation[0]
        self.pad_side = (kernel_size - 1) // 2 * dilation[1]
        self.conv = WNConv2d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, input_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`bias` replaces the conv's own, so that other position-independent terms ride along.
        With `input_map [C, Cin]` the input is `x [B, C, H, W]` and the conv sees `input_map`
        applied to it per position: the two maps are folded into one weight."""
        conv = self.conv
        weight = conv.normed_weight()
        if input_map is not None:
            weight = torch.einsum("oihw,ci->ochw", weight, input_map)
        dilation, pad_side = cast(tuple[int, int], conv.dilation), self.pad_side
        if dilation[1] >= x.shape[-1] and weight.shape[-1] > 1:
            # The side taps would read only padding, i.e. add zeros: the centre tap alone gives the same
            # output without padding 2 * dilation columns (2 ** n_layer of them over the layers).
            centre = (weight.shape[-1] - 1) // 2
            weight, dilation, pad_side = weight[..., centre : centre + 1], (dilation[0], 1), 0
        return dilated_conv2d(
            F.pad(x, (pad_side, pad_side, self.pad_top, 0)), weight, conv.bias if bias is None else bias, dilation
        )


class ProjLogST(nn.Module):
    """The last layer of a coupling: 1x1 conv `R -> 2` giving `(log_s, t)`, scaled by `exp(3 * scale)`.

    Near-zero initialisation (weights uniform in [-1e-3, 1e-3], `scale` zero) makes
    every flow start close to the identity.
    """

    def __init__(self, res_channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, 2, 1, 1))
        self.conv = nn.Conv2d(res_channels, 2, 1)
        nn.init.uniform_(self.conv.weight, -1e-3, 1e-3)
        nn.init.uniform_(conv_bias(self.conv), -1e-3, 1e-3)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection as one affine map, scale included: `(weight [2, R], bias [2])`;
        `(log_s, t) = weight @ feat + bias`. The estimator folds it into its layers."""
        scale = torch.exp(3 * self.scale).view(2, 1)
        return self.conv.weight.flatten(1) * scale, conv_bias(self.conv) * scale.flatten()


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


class ResidualBlock(nn.Module):
    """Layer j of the 2-D WaveNet.

    `a = filter_gate_conv(h) + filter_gate_conv_c(c) [+ filter_gate_conv_h(flow embedding)]`,
    gated activation, then `res_skip_conv`: a residual update and a skip output. The 3x3
    conv has dilation `(dh, dw)`, causal along height. The conditioning term arrives
    precomputed (`WaveNet2D.condition`) and the position-independent terms as one bias
    (`gate_bias`), so a shared estimator projects the mel once for all its flows.

    The skip outputs only ever feed the flow's projection to `(log_s, t)`, which is
    linear, so `proj(sum_j skip_j) = sum_j (P W_skip_j) g_j + ...`: each block maps its
    gated activation `g_j` straight to its share of `(log_s, t)`
    (`output_weights`, `fused_res_skip`), and the skips are never formed at full width.

    Row-by-row synthesis runs the block through a convolution queue (`inference.BlockQueue`):
    the last `3 * dh` rows of its input, among them the rows the causal 3x3 conv reads.
    """

    def __init__(
        self,
        res_channels: int,
        cin_channels: int,
        dilation: tuple[int, int],
        size_flow_embed: int = 0,
        is_last: bool = False,
    ):
        super().__init__()
        self.res_channels = res_channels
        self.is_last = is_last  # the last block's residual half is never used: not computed
        self.filter_gate_conv = HeightCausalConv2d(res_channels, 2 * res_channels, 3, dilation)
        self.filter_gate_conv_c = WNConv2d(cin_channels, 2 * res_channels, 1)
        self.filter_gate_conv_h = WNConv2d(size_flow_embed, 2 * res_channels, 1) if size_flow_embed else None
        self.res_skip_conv = WNConv2d(res_channels, 2 * res_channels, 1)

    def gate_bias(self, flow_embed: torch.Tensor | None) -> torch.Tensor:
        """Everything added to the gate input that does not depend on the position: `[2R]`."""
        bias = conv_bias(self.filter_gate_conv.conv) + conv_bias(self.filter_gate_conv_c)
        if flow_embed is not None:
            embed = self.filter_gate_conv_h
            if embed is None:
                raise ValueError("a flow embedding was given to a block built without one (size_flow_embed 0)")
            bias = bias + conv1x1(flow_embed, embed.normed_weight(), conv_bias(embed)).flatten()
        return bias

    def output_weights(self, res_scale: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`res_skip_conv` with one flow's scales folded in: `(weight [R + 2, R], bias [R + 2])`.

        Rows `:R` give the residual update scaled by `res_scale [R]` (the flow's `multgate`
        row, or sqrt(0.5)); the last 2 rows give the block's share of `(log_s, t)` through
        the flow's `projection [2, R]`. The last block has only those 2 rows.
        """
        channels = self.res_channels
        weight = self.res_skip_conv.normed_weight().flatten(1)  # [2R, R]
        bias = conv_bias(self.res_skip_conv)
        share_weight, share_bias = projection @ weight[channels:], projection @ bias[channels:]
        if self.is_last:
            return share_weight, share_bias
        return (
            torch.cat([res_scale[:, None] * weight[:channels], share_weight]),
            torch.cat([res_scale * bias[:channels], share_bias]),
        )

    def forward(
        self,
        h: torch.Tensor,
        cond: torch.Tensor,
        gate_bias: torch.Tensor,
        out_weight: torch.Tensor,
        out_bias: torch.Tensor,
        residual_keep: float,
        conv_input: torch.Tensor | None = None,
        input_map: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`h [B, R, H, W]`, `cond [B, 2R, H, W]` (this block's conditioning, no bias), `gate_bias [2R]`,
        `out_weight`, `out_bias` (`output_weights`) -> `(next h [B, R, H, W], share [B, 2, H, W])`.

        `conv_input [B, C, H, W]` with `input_map [C, R]`, where `h = input_map^T conv_input` per
        position (zero in the padding), lets the 3x3 conv run on C channels instead of R."""
        if input_map is None:
            a = self.filter_gate_conv(h, bias=gate_bias)
        else:
            a = self.filter_gate_conv(conv_input, bias=gate_bias, input_map=input_map)
        a += cond  # in place: the convolution's backward does not need its output
        return fused_res_skip(GatedActivation.apply(a), h, out_weight, out_bias, residual_keep)


class ResidualBlocks(nn.ModuleList):
    """The estimator's residual blocks: an `nn.ModuleList` whose items read as `ResidualBlock`s."""

    def __iter__(self) -> Iterator[ResidualBlock]:
        return cast(Iterator[ResidualBlock], super().__iter__())

    def __getitem__(self, index: int) -> ResidualBlock:  # only integer indices are taken
        return cast(ResidualBlock, super().__getitem__(index))


class WaveNet2D(nn.Module):
    """The density estimator of WaveFlow/NanoFlow: a 2-D WaveNet, causal along height.

    `front_conv` (1x1, 1 -> R), then `n_layer` residual blocks with dilation
    `(2 ** (j % n_layer_per_cycle), 2 ** j)`, whose skips feed the flow's projection to
    `(log_s, t)`. NanoFlow shares one instance across flows and passes each flow's
    embedding-dependent biases and gates (`gate_biases`, `multgate`) with every call.
    Training runs channels-last, where the dilated convolutions are fastest on CPU.
    """

    def __init__(
        self, res_channels: int, cin_channels: int, n_layer: int, n_layer_per_cycle: int, size_flow_embed: int = 0
    ):
        super().__init__()
        self.res_channels = res_channels
        self.front_conv = nn.Sequential(HeightCausalConv2d(1, res_channels, 1))
        self.res_blocks = ResidualBlocks(
            ResidualBlock(
                res_channels,
                cin_channels,
                (2 ** (j % n_layer_per_cycle), 2**j),
                size_flow_embed,
                is_last=j == n_layer - 1,
            )
            for j in range(n_layer)
        )

    def condition(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every block's conditioning projection, without bias: `c [B, cin, H, W] -> L x [B, 2R, H, W]`.

        Independent of the flow embedding, and a 1x1 conv commutes with permuting rows, so a
        shared estimator computes it once per row order, not once per flow.
        """
        return tuple(conv1x1(c, block.filter_gate_conv_c.normed_weight(), None) for block in self.res_blocks)

    def gate_biases(self, flow_embed: torch.Tensor | None) -> torch.Tensor:
        """`[L, 2R]`: each block's position-independent gate input for this flow."""
        return torch.stack([block.gate_bias(flow_embed) for block in self.res_blocks])

    def output_weights(
        self, multgate: torch.Tensor | None, projection_weight: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
        """Every block's `output_weights` for one flow, and what the residual stream keeps per layer.

        NanoFlow: `h + res * multgate[j]`; otherwise WaveFlow's `(h + res) * sqrt(0.5)`.
        """
        weights = []
        for j, block in enumerate(self.res_blocks):
            res_scale = (
                multgate[j] if multgate is not None else projection_weight.new_full((self.res_channels,), SQRT_HALF)
            )
            weights.append(block.output_weights(res_scale, projection_weight))
        return weights, (1.0 if multgate is not None else SQRT_HALF)

    def front_map(self) -> torch.Tensor:
        """`front_conv` (1x1, 1 -> R) as a map from `[x, 1]`: `[2, R]`, weight row then bias row."""
        conv = cast(HeightCausalConv2d, self.front_conv[0]).conv
        return torch.stack([conv.normed_weight().flatten(), conv_bias(conv)])

    def forward(
        self,
        x: torch.Tensor,
        cond: tuple[torch.Tensor, ...],
        gate_biases: torch.Tensor,
        multgate: torch.Tensor | None,
        projection_weight: torch.Tensor,
        projection_bias: torch.Tensor,
    ) -> torch.Tensor:
        """The flow's `(log_s, t)`: `x [B, 1, H, W]` (already shifted), `cond` L x `[B, 2R, H, W]`
        (`self.condition(c)`), `gate_biases [L, 2R]`, `multgate [L, R]` or None, the flow's
        projection `[2, R]`, `[2]` -> `log_s_t [B, 2, H, W]`. Row h depends on rows <= h of `x`."""
        weights, keep = self.output_weights(multgate, projection_weight)
        front_map = self.front_map()
        h = (x.permute(0, 2, 3, 1) * front_map[0] + front_map[1]).permute(0, 3, 1, 2)  # front_conv, channels last
        # The first 3x3 conv reads front_conv(x), which is affine in x: it runs on [x, 1] instead
        # (2 channels, not R) with front_conv folded into its weight. The 1 is 0 in the padding.
        front_input = torch.cat([x, torch.ones_like(x)], dim=1).contiguous(memory_format=torch.channels_last)
        log_s_t = projection_bias.view(1, 2, 1, 1)
        for j, block in enumerate(self.res_blocks):
            folded = (front_input, front_map) if j == 0 else (None, None)
            h, share = block(h, cond[j], gate_biases[j], *weights[j], keep, *folded)
            log_s_t = log_s_t + share
        return log_s_t
