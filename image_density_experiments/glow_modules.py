"""Building blocks of Glow (Kingma & Dhariwal, "Glow: Generative Flow with Invertible
1x1 Convolutions", NeurIPS 2018, sec. 3) and the estimator of NanoFlow's image density
experiments (Lee, Kim, Yoon, NeurIPS 2020).

Invertible pieces have `forward(x) -> (y, logdet [B])` and `inverse(y) -> x`. Module and
tensor names follow the Glow-PyTorch port that the original NanoFlow code forked, so
that its checkpoints load.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The zero-initialised output convs scale their output by exp(LOGSCALE_FACTOR * logs):
# a larger factor lets the learned scale move faster than the conv weights (Glow code).
LOGSCALE_FACTOR = 3.0
# NanoFlow's estimator: the first conv maps the input to hidden channels, the rest
# are hidden to hidden; each owns an ActNorm, and NanoFlow's gates act on each.
N_ESTIMATOR_CONVS = 6


def gaussian_log_p(mean: torch.Tensor, logs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(logs)^2) summed over all but the batch dimension: [B]."""
    log_p = -0.5 * (math.log(2 * math.pi) + 2.0 * logs + (x - mean) ** 2 * torch.exp(-2.0 * logs))
    return log_p.flatten(1).sum(1)


def gaussian_sample(mean: torch.Tensor, logs: torch.Tensor, temperature: float) -> torch.Tensor:
    """A draw from N(mean, (temperature * exp(logs))^2); temperature < 1 trades diversity for fidelity."""
    return mean + torch.exp(logs) * temperature * torch.randn_like(mean)


def split_halves(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second half of the channels."""
    half = h.shape[1] // 2
    return h[:, :half], h[:, half:]


def split_interleaved(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Even and odd channels: the layout of every (mean, log-std) or (shift, scale) pair
    that a network predicts here, except the top prior's (see `Glow.prior`)."""
    return h[:, 0::2], h[:, 1::2]


class ActNorm2d(nn.Module):
    """Per-channel `(x + bias) * exp(logs)`, initialised from the first batch it sees so
    that its output has zero mean and `scale` standard deviation (Glow sec. 3.1).

    Whether it is initialised is a plain attribute, not a buffer, so that checkpoints
    keep the original's layout; `Glow.set_actnorm_init` marks a loaded model.
    """

    def __init__(self, num_features: int, scale: float = 1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = scale
        self.inited = False

    @torch.no_grad()
    def initialize_parameters(self, x: torch.Tensor) -> None:
        if not self.training:
            raise RuntimeError("ActNorm is not initialised; run a training-mode batch through the model first")
        mean = x.mean(dim=[0, 2, 3], keepdim=True)
        std = ((x - mean) ** 2).mean(dim=[0, 2, 3], keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(self.scale / (std + 1e-6)))
        self.inited = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W] -> (y [B, C, H, W], logdet [B])"""
        if not self.inited:
            self.initialize_parameters(x)
        height, width = x.shape[2:]
        logdet = self.logs.sum() * height * width
        return (x + self.bias) * torch.exp(self.logs), logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


class Conv2d(nn.Module):
    """Conv with "same" padding followed by ActNorm, which makes a bias redundant."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.conv.weight.data.normal_(mean=0.0, std=0.05)
        self.actnorm = ActNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actnorm(self.conv(x))[0]


class Conv2dZeros(nn.Module):
    """Zero-initialised conv, the last layer of every network in the flow, so that each
    coupling starts as the identity and each prior as N(0, 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        for parameter in self.conv.parameters():  # weight and bias
            nn.init.zeros_(parameter)
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.logs * LOGSCALE_FACTOR)


class LinearZeros(nn.Module):
    """Zero-initialised linear layer, for the class-conditional prior and classifier."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.linear.weight.data.zero_()
        self.linear.bias.data.zero_()
        self.logs = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.exp(self.logs * LOGSCALE_FACTOR)


class InvertibleConv1x1(nn.Module):
    """Invertible 1x1 convolution (Glow sec. 3.2), from a random rotation.

    LU-decomposed (the default): W = P L (U + diag(sign_s * exp(log_s))), with P and
    sign_s fixed, so that log|det W| = sum(log_s) costs nothing.
    """

    # Buffers (registered in __init__ when LU_decomposed), declared for the type checker.
    p: torch.Tensor
    sign_s: torch.Tensor
    l_mask: torch.Tensor
    eye: torch.Tensor

    def __init__(self, num_channels: int, LU_decomposed: bool = True):
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(num_channels, num_channels))[0]
        self.LU_decomposed = LU_decomposed
        if not LU_decomposed:
            self.weight = nn.Parameter(rotation)
            return
        p, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.lower = nn.Parameter(lower)
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(diagonal))
        # The masks keep `lower` unit-lower- and `upper` strictly-upper-triangular
        # whatever the optimiser does to the masked-out entries.
        self.register_buffer("l_mask", torch.tril(torch.ones(num_channels, num_channels), -1), persistent=False)
        self.register_buffer("eye", torch.eye(num_channels), persistent=False)

    def weight_and_logdet(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """W [C, C] and its log|det| for an H x W image (the same W acts on each pixel)."""
        if not self.LU_decomposed:
            return self.weight, torch.slogdet(self.weight)[1] * height * width
        lower = self.lower * self.l_mask + self.eye
        upper = self.upper * self.l_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper, self.log_s.sum() * height * width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W] -> (y [B, C, H, W], logdet [B])"""
        weight, logdet = self.weight_and_logdet(*x.shape[2:])
        return F.conv2d(x, weight[:, :, None, None]), logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        weight, _ = self.weight_and_logdet(*y.shape[2:])
        return F.conv2d(y, torch.inverse(weight)[:, :, None, None])


class Permute2d(nn.Module):
    """A fixed channel permutation: reversal, or a random shuffle (Glow sec. 3.2's
    baselines). The permutation is a buffer so that a reloaded model keeps its shuffle."""

    indices: torch.Tensor
    indices_inverse: torch.Tensor

    def __init__(self, num_channels: int, shuffle: bool):
        super().__init__()
        indices = torch.randperm(num_channels) if shuffle else torch.arange(num_channels - 1, -1, -1)
        self.register_buffer("indices", indices)
        self.register_buffer("indices_inverse", torch.argsort(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.indices], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.indices_inverse]


class SqueezeLayer(nn.Module):
    """Space-to-depth by 2x2 (RealNVP's multi-scale architecture, used by Glow); volume-preserving."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W] -> (y [B, 4C, H/2, W/2], logdet [B])"""
        batch, channels, height, width = x.shape
        x = x.view(batch, channels, height // 2, 2, width // 2, 2)
        x = x.permute(0, 1, 3, 5, 2, 4)  # [B, C, 2, 2, H/2, W/2]
        return x.reshape(batch, channels * 4, height // 2, width // 2), x.new_zeros(batch)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = y.shape
        y = y.view(batch, channels // 4, 2, 2, height, width)
        y = y.permute(0, 1, 4, 2, 5, 3)  # [B, C/4, H, 2, W, 2]
        return y.reshape(batch, channels // 4, height * 2, width * 2)


class Split2d(nn.Module):
    """Multi-scale factor-out (Glow sec. 3): half the channels leave the flow, modelled
    by a Gaussian whose mean and log-std a zero-initialised conv predicts from the kept half."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.conv = Conv2dZeros(num_channels // 2, num_channels)

    def prior(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_interleaved(self.conv(kept))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, C, H, W] -> (kept [B, C/2, H, W], factored_out [B, C/2, H, W], log p(factored_out) [B])"""
        kept, factored_out = split_halves(x)
        mean, logs = self.prior(kept)
        return kept, factored_out, gaussian_log_p(mean, logs, factored_out)

    def inverse(self, kept: torch.Tensor, factored_out: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """Rejoins `factored_out`, or a draw from its prior at `temperature` when it is None."""
        if factored_out is None:
            factored_out = gaussian_sample(*self.prior(kept), temperature)
        return torch.cat([kept, factored_out], dim=1)


def glow_block(in_channels: int, out_channels: int, hidden_channels: int) -> nn.Sequential:
    """Glow's coupling network: 3x3 conv, 1x1 conv, zero-initialised 3x3 conv."""
    return nn.Sequential(
        Conv2d(in_channels, hidden_channels),
        nn.ReLU(),
        Conv2d(hidden_channels, hidden_channels, kernel_size=1),
        nn.ReLU(),
        Conv2dZeros(hidden_channels, out_channels),
    )


class Estimator(nn.Module):
    """NanoFlow's density estimator for images: six 3x3 conv + ActNorm +
    ReLU layers, deeper than Glow's block because one serves many flow steps.

    With `out_channels` it ends in its own zero-initialised 1x1 projection (`conv_proj`,
    NanoFlow-naive); without, it returns hidden features that each step projects itself.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int | None = None):
        super().__init__()
        for i in range(1, N_ESTIMATOR_CONVS + 1):
            self.add_module(f"conv{i}", Conv2d(in_channels if i == 1 else hidden_channels, hidden_channels))
        if out_channels is not None:
            self.conv_proj = Conv2dZeros(hidden_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C_in, H, W], gates [6, hidden, 1, 1] or None -> [B, hidden or out, H, W]"""
        h = x
        for i in range(N_ESTIMATOR_CONVS):
            h = getattr(self, f"conv{i + 1}")(h)
            if gates is not None:
                # A positive per-channel gain commutes with the ReLU, so where it acts
                # relative to the ReLU does not matter.
                h = h * gates[i]
            h = F.relu(h)
        return self.conv_proj(h) if hasattr(self, "conv_proj") else h
