"""Glow (Kingma & Dhariwal, NeurIPS 2018) and the NanoFlow variants of the paper's image
density experiments (Lee, Kim, Yoon, "NanoFlow", NeurIPS 2020).

The five model types are one multi-scale flow that differs only in who owns the
network that predicts each affine coupling's shift and scale: see `MODEL_TYPES`.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn as nn

from glow_modules import (
    N_ESTIMATOR_CONVS,
    ActNorm2d,
    Conv2dZeros,
    Estimator,
    InvertibleConv1x1,
    LinearZeros,
    Permute2d,
    Split2d,
    SqueezeLayer,
    gaussian_log_p,
    gaussian_sample,
    glow_block,
    split_halves,
    split_interleaved,
)

N_BINS = 256  # 8-bit images
# sigmoid(h + 2) starts near 0.88 and stays in (0, 1): a bounded, slightly contracting
# scale keeps early training of deep affine flows stable (as in the Glow code).
SCALE_OFFSET = 2.0


@dataclass(frozen=True)
class Sharing:
    """Who owns each part of the coupling network (NanoFlow sec. 3)."""

    # "glow_block": each step owns Glow's three-conv block; "step" or "level": who owns a six-conv Estimator.
    estimator: str
    # "step": each step owns a 1x1 projection of the estimator's features; "estimator": it comes with it.
    projection: str
    # Each step feeds a learned embedding to the estimator and gates its layers.
    flow_embedding: bool


MODEL_TYPES: dict[str, Sharing] = {
    "glow": Sharing(estimator="glow_block", projection="estimator", flow_embedding=False),
    "glow_large": Sharing(estimator="step", projection="step", flow_embedding=False),
    "nanoflow_naive": Sharing(estimator="level", projection="estimator", flow_embedding=False),
    "nanoflow_decomp": Sharing(estimator="level", projection="step", flow_embedding=False),
    "nanoflow": Sharing(estimator="level", projection="step", flow_embedding=True),
}


class FlowStep(nn.Module):
    """ActNorm, then a channel permutation, then an affine (or additive) coupling that
    transforms the second half of the channels given the first (Glow sec. 3)."""

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        actnorm_scale: float,
        flow_permutation: str,
        flow_coupling: str,
        LU_decomposed: bool,
        sharing: Sharing,
        embed_channels: int,
    ):
        super().__init__()
        self.sharing = sharing
        self.flow_permutation = flow_permutation
        self.flow_coupling = flow_coupling
        coupling_channels = in_channels if flow_coupling == "affine" else in_channels // 2
        if sharing.flow_embedding:
            self.multgate = nn.Parameter(torch.zeros(N_ESTIMATOR_CONVS, hidden_channels, 1, 1))
        self.actnorm = ActNorm2d(in_channels, actnorm_scale)
        if sharing.flow_embedding:
            self.actnorm_embed = ActNorm2d(embed_channels, actnorm_scale)
        if sharing.projection == "step":
            self.conv_proj = Conv2dZeros(hidden_channels, coupling_channels, kernel_size=1)
        if flow_permutation == "invconv":
            permutation = InvertibleConv1x1(in_channels, LU_decomposed)
        else:
            permutation = Permute2d(in_channels, shuffle=flow_permutation == "shuffle")
        # Registered under the option's name ("invconv", "shuffle", "reverse") as the original did.
        self.add_module(flow_permutation, permutation)
        if sharing.estimator == "glow_block":
            self.block = glow_block(in_channels // 2, coupling_channels, hidden_channels)

    def coupling_parameters(
        self, z1: torch.Tensor, estimator: Estimator | None, embedding: torch.Tensor | None
    ) -> torch.Tensor:
        """z1 [B, C/2, H, W] -> shift and scale interleaved [B, C, H, W] (affine) or shift [B, C/2, H, W]"""
        if self.sharing.estimator == "glow_block":
            return self.block(z1)
        assert estimator is not None, "FlowNet.step_inputs gives every step its shared estimator"
        gates = None
        if self.sharing.flow_embedding:
            normed_embedding, _ = self.actnorm_embed(embedding)
            z1 = torch.cat([z1, normed_embedding.expand(z1.shape[0], -1, -1, -1)], dim=1)  # [B, C/2 + E, H, W]
            gates = torch.exp(self.multgate)
        features = estimator(z1, gates)
        return self.conv_proj(features) if self.sharing.projection == "step" else features

    def forward(
        self, z: torch.Tensor, estimator: Estimator | None = None, embedding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, C, H, W] -> (z [B, C, H, W], logdet [B])"""
        z, logdet = self.actnorm(z)
        z, permutation_logdet = getattr(self, self.flow_permutation)(z)
        z1, z2 = split_halves(z)
        h = self.coupling_parameters(z1, estimator, embedding)
        if self.flow_coupling == "additive":
            z2 = z2 + h
            coupling_logdet = 0.0
        else:
            shift, scale = split_interleaved(h)
            scale = torch.sigmoid(scale + SCALE_OFFSET)
            z2 = (z2 + shift) * scale
            coupling_logdet = torch.log(scale).flatten(1).sum(1)
        return torch.cat([z1, z2], dim=1), logdet + permutation_logdet + coupling_logdet

    def inverse(
        self, z: torch.Tensor, estimator: Estimator | None = None, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        z1, z2 = split_halves(z)
        h = self.coupling_parameters(z1, estimator, embedding)
        if self.flow_coupling == "additive":
            z2 = z2 - h
        else:
            shift, scale = split_interleaved(h)
            z2 = z2 / torch.sigmoid(scale + SCALE_OFFSET) - shift
        z = getattr(self, self.flow_permutation).inverse(torch.cat([z1, z2], dim=1))
        return self.actnorm.inverse(z)


class FlowOutput(NamedTuple):
    z: torch.Tensor  # the top latent [B, C', H', W']
    logdet: torch.Tensor  # log|det dz/dx| of the whole flow, factored-out latents included [B]
    split_log_p: torch.Tensor  # log-likelihood of the factored-out latents under their priors [B]
    split_latents: list[torch.Tensor]  # the factored-out latents, one per Split2d, bottom level first


class FlowNet(nn.Module):
    """L levels of squeeze, K flow steps and (except the last level) a split.

    `layers` holds every squeeze, step and split in order; shared estimators live in
    `estimator` and flow embeddings in `embedding`, keyed by the index of the step
    (or level) that owns them, which is the original's checkpoint layout.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        hidden_channels: int,
        K: int,
        L: int,
        actnorm_scale: float,
        flow_permutation: str,
        flow_coupling: str,
        LU_decomposed: bool,
        model_type: str,
        flow_embed_dim: int,
    ):
        super().__init__()
        sharing = MODEL_TYPES[model_type]
        height, width, channels = image_shape
        self.layers = nn.ModuleList()
        self.estimator = nn.ModuleDict()
        self.embedding = nn.ParameterDict()
        self.estimator_key: dict[int, str] = {}  # step index -> key of its estimator
        for level in range(L):
            channels, height, width = channels * 4, height // 2, width // 2
            self.layers.append(SqueezeLayer())
            coupling_channels = channels if flow_coupling == "affine" else channels // 2
            # Channels double at each level (the split halves, the squeeze quadruples), so does the embedding.
            embed_channels = flow_embed_dim * 2**level if sharing.flow_embedding else 0
            # Channels of the estimator's own projection, where it has one (NanoFlow-naive).
            estimator_projection = coupling_channels if sharing.projection == "estimator" else None
            if sharing.estimator == "level":
                self.estimator[str(level)] = Estimator(
                    channels // 2 + embed_channels, hidden_channels, estimator_projection
                )
            for _ in range(K):
                index = len(self.layers)
                if sharing.estimator == "step":
                    self.estimator[str(index)] = Estimator(channels // 2, hidden_channels, estimator_projection)
                if sharing.estimator != "glow_block":
                    self.estimator_key[index] = str(index) if sharing.estimator == "step" else str(level)
                if sharing.flow_embedding:
                    self.embedding[str(index)] = nn.Parameter(torch.randn(1, embed_channels, height, width))
                self.layers.append(
                    FlowStep(
                        channels,
                        hidden_channels,
                        actnorm_scale,
                        flow_permutation,
                        flow_coupling,
                        LU_decomposed,
                        sharing,
                        embed_channels,
                    )
                )
            if level < L - 1:
                self.layers.append(Split2d(channels))
                channels //= 2
        self.output_shape = (channels, height, width)

    def step_inputs(self, index: int) -> tuple[Estimator | None, torch.Tensor | None]:
        """The estimator and flow embedding that the step at `index` uses, if any."""
        # The ModuleDict holds only Estimators, but hands them back typed as nn.Module.
        estimator = cast(Estimator, self.estimator[self.estimator_key[index]]) if index in self.estimator_key else None
        embedding = self.embedding[str(index)] if str(index) in self.embedding else None
        return estimator, embedding

    def forward(self, x: torch.Tensor) -> FlowOutput:
        """x [B, C, H, W] -> FlowOutput"""
        z = x
        logdet = x.new_zeros(x.shape[0])
        split_log_p = x.new_zeros(x.shape[0])
        split_latents = []
        for index, layer in enumerate(self.layers):
            if isinstance(layer, Split2d):
                z, factored_out, log_p = layer(z)
                split_log_p = split_log_p + log_p
                split_latents.append(factored_out)
            elif isinstance(layer, FlowStep):
                z, step_logdet = layer(z, *self.step_inputs(index))
                logdet = logdet + step_logdet
            else:
                z, _ = layer(z)
        return FlowOutput(z, logdet, split_log_p, split_latents)

    def inverse(
        self, z: torch.Tensor, split_latents: list[torch.Tensor] | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """The image [B, C, H, W] of the top latent `z`; without `split_latents`, those are
        drawn from their priors at `temperature`."""
        remaining = list(split_latents) if split_latents is not None else None
        for index in reversed(range(len(self.layers))):
            layer = self.layers[index]
            if isinstance(layer, Split2d):
                z = layer.inverse(z, remaining.pop() if remaining is not None else None, temperature)
            elif isinstance(layer, FlowStep):
                z = layer.inverse(z, *self.step_inputs(index))
            elif isinstance(layer, SqueezeLayer):
                z = layer.inverse(z)
        return z


class Glow(nn.Module):
    """The flow and its top prior; `forward` gives bits per dimension (Glow sec. 3).

    Images are 8-bit values mapped to `x / 256 - 0.5`; `image_shape` is (H, W, C) as in
    the original.
    """

    prior_h: torch.Tensor  # a buffer, registered in __init__

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        hidden_channels: int,
        K: int,
        L: int,
        actnorm_scale: float = 1.0,
        flow_permutation: str = "invconv",
        flow_coupling: str = "affine",
        LU_decomposed: bool = True,
        y_classes: int = 10,
        learn_top: bool = True,
        y_condition: bool = False,
        model_type: str = "glow",
        flow_embed_dim: int = 1,
    ):
        super().__init__()
        self.flow = FlowNet(
            image_shape,
            hidden_channels,
            K,
            L,
            actnorm_scale,
            flow_permutation,
            flow_coupling,
            LU_decomposed,
            model_type,
            flow_embed_dim,
        )
        self.learn_top = learn_top
        self.y_condition = y_condition
        channels, height, width = self.flow.output_shape
        # The top prior's mean and log-std come from a zero input, through a learned conv
        # and/or the class; with neither it is N(0, 1).
        self.register_buffer("prior_h", torch.zeros(1, 2 * channels, height, width))
        if learn_top:
            self.learn_top_fn = Conv2dZeros(2 * channels, 2 * channels)
        if y_condition:
            self.project_ycond = LinearZeros(y_classes, 2 * channels)
            self.project_class = LinearZeros(channels, y_classes)

    def prior(self, batch_size: int, y_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mean, logs [B, C', H', W'] of the top latent."""
        h = self.prior_h.expand(batch_size, -1, -1, -1)
        if self.learn_top:
            h = self.learn_top_fn(h)
        if self.y_condition:
            h = h + self.project_ycond(y_onehot)[:, :, None, None]
        # Unlike the splits' priors, the top prior's mean and log-std are the two halves.
        return split_halves(h)

    def forward(
        self, x: torch.Tensor, y_onehot: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, C, H, W] in [-0.5, 0.5) -> (z [B, C', H', W'], bits/dim [B], class logits [B, classes] or None)"""
        batch_size, channels, height, width = x.shape
        dims = channels * height * width
        # Uniform noise over each 8-bit bin makes the continuous density a bound on the
        # discrete likelihood; the bin width 1/256 costs log(256) nats per dimension.
        x = x + torch.rand_like(x) / N_BINS
        flow = self.flow(x)
        mean, logs = self.prior(batch_size, y_onehot)
        objective = flow.logdet + flow.split_log_p + gaussian_log_p(mean, logs, flow.z) - math.log(N_BINS) * dims
        y_logits = self.project_class(flow.z.mean(dim=[2, 3])) if self.y_condition else None
        return flow.z, -objective / (math.log(2.0) * dims), y_logits

    def inverse(
        self, z: torch.Tensor, split_latents: list[torch.Tensor] | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """Latents -> image [B, C, H, W]; see `FlowNet.inverse`."""
        return self.flow.inverse(z, split_latents, temperature)

    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0, y_onehot: torch.Tensor | None = None) -> torch.Tensor:
        """num_samples images [N, C, H, W] in about [-0.5, 0.5), every latent drawn at `temperature`."""
        mean, logs = self.prior(num_samples, y_onehot)
        return self.flow.inverse(gaussian_sample(mean, logs, temperature), None, temperature)

    def set_actnorm_init(self) -> None:
        """Marks every ActNorm initialised, as after loading a checkpoint."""
        for module in self.modules():
            if isinstance(module, ActNorm2d):
                module.inited = True

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
