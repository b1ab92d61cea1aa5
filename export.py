"""Export synthesis to ONNX: `python export.py -c CONFIG --checkpoint_path CKPT -o model.onnx`.

The exported graph is `model.infer(mel, z=z)` in fp32 (docs/deploy.md):

    mel [B, cin, F], z [B, 1, n_height, hop * (F - 3) / n_height] -> audio [B, hop * (F - 3)]

with the batch and the frames dynamic; `hop` is the config's (`data_config.hop_length`, the product of
`waveflow_config.upsample_factors`: 256 in the original's configs). The noise is an input, as in
NVIDIA's WaveGlow export, so that the caller sets the temperature (`z = sigma * N(0, 1)`) and the seed.

`OnnxSynthesis` is the graph: the row-by-row inverse of `inference.py` written without in-place
updates, unrolled over the `n_height` rows of every flow, since ONNX has no mutable queues. Everything
that does not depend on the input is computed once, here, from the same folding methods synthesis
uses (`WaveNet2D.gate_biases`, `output_weights`, `front_map`, `ProjLogST.affine`) and stored as
constants: weight norm folded, NanoFlow's flow-embedding products (each flow's gate biases), the
multiplicative gates and the projection to `(log_s, t)` folded into each block's output weights.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import sys
import tempfile
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, load_checkpoint
from config import CommandParser, Config, ConfigError, check_model_rules, load_config
from model import SYNTHESIS_TRIM_FRAMES, WaveFlow, build_model, squeeze, synthesis_length, unsqueeze
from modules import WeightNormMixin
from storage import StorageError, check_output_file, describe, write_atomically

OPSET = 17  # ONNX opset of the exported graph: every operator it uses is older; TensorRT 8.6+ reads it
MIN_OPSET = 9  # below it the exporter writes ConstantFill, which onnxruntime no longer runs


def _max_opset() -> int:
    """The TorchScript-based exporter's highest opset (20 in torch 2.13): torch's own (private) constant, as it
    moves with torch; OPSET where a torch lacks it."""
    try:
        constants = importlib.import_module("torch.onnx._constants")
    except ImportError:
        return OPSET
    return int(getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", OPSET))


MAX_OPSET = _max_opset()
INPUT_NAMES = ("mel", "z")
OUTPUT_NAMES = ("audio",)
DYNAMIC_AXES = {
    "mel": {0: "batch", 2: "frames"},
    "z": {0: "batch", 3: "columns"},
    "audio": {0: "batch", 1: "samples"},
}


class ExportError(ValueError):
    """What keeps a model from being exported (a missing package, an output path that cannot be written)."""


def noise_shape(model: WaveFlow, batch: int, frames: int) -> tuple[int, int, int, int]:
    """The shape of `z` for a mel of `frames` frames: `[B, 1, n_height, hop * (frames - 3) / n_height]`."""
    height = model.config.n_height
    return (batch, 1, height, synthesis_length(frames, model.config.hop_length) // height)


class OnnxSynthesis(nn.Module):
    """`model.infer(mel, z=z)` as a graph without state: `forward(mel [B, cin, F], z [B, 1, H, W]) -> audio [B, H * W]`.

    Holds the model's folded weights as buffers, shared where the model shares them (one estimator's
    convolutions for all NanoFlow flows); the model itself is left as it is. Row h of flow k is computed
    from the rows above it, kept as a list of tensors per block: the queue of `inference.BlockQueue`
    without the ring, since every row of an unrolled graph has a name of its own.
    """

    def __init__(self, model: WaveFlow):
        super().__init__()
        config = self.config = model.config
        self.upsample_conv = copy.deepcopy(model.upsample_conv).float()
        for module in self.upsample_conv.modules():
            if isinstance(module, WeightNormMixin):
                module.remove_weight_norm()
        self.row_orders = model.row_orders
        # permutations[k][p]: the row of flow k's inverse that is row p after the flow's permutation.
        order = torch.arange(config.n_height).view(1, 1, -1, 1)
        self.permutations = tuple(tuple(model.permute(k, order).flatten().tolist()) for k in range(config.n_flow))
        self.dilations = [block.filter_gate_conv.conv.dilation for block in model.flow_parts(0)[0].res_blocks]
        self.res_channels = config.res_channels
        # estimator_of[k] / weights_of[k]: the index of the estimator and of the folded per-flow weights flow k uses.
        estimators: dict[int, int] = {}
        parts: dict[tuple[int, int, int], int] = {}
        self.estimator_of: list[int] = []
        self.weights_of: list[int] = []
        self.keeps: list[float] = []  # what the residual stream keeps per block, per weights index
        with torch.no_grad():
            for flow in range(config.n_flow):
                net, coupling, embedding = model.flow_parts(flow)
                if id(net) not in estimators:
                    estimators[id(net)] = index = len(estimators)
                    self._register_estimator(index, net)
                key = (id(net), id(coupling), flow if embedding is not None else -1)
                if key not in parts:
                    parts[key] = index = len(parts)
                    self.keeps.append(self._register_flow(index, net, coupling, embedding))
                self.estimator_of.append(estimators[id(net)])
                self.weights_of.append(parts[key])

    def _register_estimator(self, index: int, net) -> None:
        """The weights of estimator `index` that every flow using it shares."""
        blocks = list(net.res_blocks)
        # The conditioning of all blocks in one 1x1 conv: [L * 2R, cin, 1].
        condition = torch.cat([block.filter_gate_conv_c.normed_weight().flatten(1) for block in blocks])
        self.register_buffer(f"condition_{index}", condition.float()[..., None].clone())
        front_map = net.front_map().float()  # [2, R]: [x, 1] -> front_conv(x)
        self.register_buffer(f"front_{index}", front_map.t()[..., None].clone())  # [R, 2, 1]
        for j, block in enumerate(blocks):
            weight = block.filter_gate_conv.conv.normed_weight().float()  # [2R, C, 3 (height), 3 (width)]
            if j == 0:  # the first conv reads [x, 1], front_conv folded in (as in WaveNet2D.forward)
                weight = torch.einsum("oihw,ci->ochw", weight, front_map)
            # As a 1-D conv over the three rows it reads, concatenated along channels (oldest first): [2R, 3C, 3].
            weight = weight.permute(0, 2, 1, 3).reshape(weight.shape[0], -1, weight.shape[-1])
            self.register_buffer(f"gate_{index}_{j}", weight.clone())

    def _register_flow(self, index: int, net, coupling, embedding) -> float:
        """The weights of one flow that are not its estimator's: its gate biases (the flow embedding's
        products), and each block's output weights with the gates and the projection folded in. Returns what the
        residual stream keeps per block."""
        projection_weight, projection_bias = coupling.proj_log_s_t.affine()
        self.register_buffer(f"gate_bias_{index}", net.gate_biases(embedding).float().flatten().clone())  # [L * 2R]
        self.register_buffer(f"projection_bias_{index}", projection_bias.float().view(1, 2, 1).clone())
        weights, keep = net.output_weights(getattr(coupling, "multgate", None), projection_weight)
        for j, (weight, bias) in enumerate(weights):
            self.register_buffer(f"out_weight_{index}_{j}", weight.float()[..., None].clone())  # [R + 2 or 2, R, 1]
            self.register_buffer(f"out_bias_{index}_{j}", bias.float().clone())
        return keep

    def invert_flow(self, flow: int, z_rows: list[torch.Tensor], c_rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Flow `flow`'s coupling inverted row by row: `z_rows` H x `[B, W]` in the flow's row order,
        `c_rows` H x `[B, cin, W]` unpermuted -> `x_rows` H x `[B, W]` in the flow's row order."""
        estimator, weights = self.estimator_of[flow], self.weights_of[flow]
        keep = self.keeps[weights]
        channels, n_layer = self.res_channels, len(self.dilations)
        condition, gate_bias = self.get_buffer(f"condition_{estimator}"), self.get_buffer(f"gate_bias_{weights}")
        front, projection_bias = self.get_buffer(f"front_{estimator}"), self.get_buffer(f"projection_bias_{weights}")
        inputs: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]  # every block's input rows so far
        zeros: dict[int, torch.Tensor] = {}  # a zero row per block: the causal padding
        x_rows = []
        x_row = torch.zeros_like(z_rows[0])  # the row above row 0 (shift_1d pads with zeros)
        for h, source in enumerate(self.row_orders[flow]):
            cond = F.conv1d(c_rows[source], condition, gate_bias)  # [B, L * 2R, W], every block's gate bias in
            first = torch.stack([x_row, torch.ones_like(x_row)], dim=1)  # [B, 2, W]
            inputs[0].append(first)
            residual = F.conv1d(first, front * keep)  # [B, R, W]: keep * front_conv(x)
            log_s_t = projection_bias  # [1, 2, 1], broadcast
            conds = cond.split([2 * channels] * n_layer, dim=1)  # L x [B, 2R, W]
            for j, (dilation_h, dilation_w) in enumerate(self.dilations):
                if j not in zeros:
                    zeros[j] = torch.zeros_like(inputs[j][0])
                taps = [inputs[j][h - k * dilation_h] if h >= k * dilation_h else zeros[j] for k in (2, 1, 0)]
                gate_weight = self.get_buffer(f"gate_{estimator}_{j}")
                a = F.conv1d(torch.cat(taps, dim=1), gate_weight, None, 1, dilation_w, dilation_w) + conds[j]
                filter_, gate = a.split([channels, channels], dim=1)  # [B, R, W] each (chunk adds shape ops)
                out = F.conv1d(
                    torch.tanh(filter_) * torch.sigmoid(gate),
                    self.get_buffer(f"out_weight_{weights}_{j}"),
                    self.get_buffer(f"out_bias_{weights}_{j}"),
                )  # [B, R + 2, W], the last block [B, 2, W]
                if j + 1 == n_layer:
                    log_s_t = log_s_t + out
                    break
                update, share = out.split([channels, 2], dim=1)
                log_s_t = log_s_t + share
                h_next = update + residual
                inputs[j + 1].append(h_next)
                residual = keep * h_next
            x_row = (z_rows[h] - log_s_t[:, 1]) * torch.exp(-log_s_t[:, 0])  # [B, W]
            x_rows.append(x_row)
        return x_rows

    def forward(self, mel: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """`mel [B, cin, F]`, `z [B, 1, H, hop * (F - 3) / H]` -> `audio [B, hop * (F - 3)]`."""
        height = self.config.n_height
        trim = SYNTHESIS_TRIM_FRAMES * self.config.hop_length
        c = self.upsample_conv(mel.unsqueeze(1)).squeeze(1)[..., :-trim]  # [B, cin, T]
        c = squeeze(c, height)  # [B, cin, H, W]
        c_rows = [c[:, :, h] for h in range(height)]
        rows = [z[:, 0, h] for h in range(height)]  # [B, W] each
        for flow in reversed(range(self.config.n_flow)):
            x_rows = self.invert_flow(flow, rows, c_rows)
            rows = [x_rows[p] for p in self.permutations[flow]]
        return unsqueeze(torch.stack(rows, dim=1).unsqueeze(1)).squeeze(1)  # [B, T]


def example_inputs(model: WaveFlow, batch: int = 2, frames: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A mel and a noise of matching shapes, for tracing and checking."""
    generator = torch.Generator().manual_seed(0)
    mel = torch.randn(batch, model.config.cin_channels, frames, generator=generator)
    return mel, torch.randn(noise_shape(model, batch, frames), generator=generator)


def export_onnx(model: WaveFlow, opset: int = OPSET) -> bytes:
    """The ONNX file of `model`'s synthesis (`OnnxSynthesis`), as bytes.

    The TorchScript-based exporter (`dynamo=False`): the torch.export-based one gives the same graph but
    took some 40 times as long to export on this unrolled loop (docs/deploy.md)."""
    if importlib.util.find_spec("onnx") is None:
        raise ExportError("export needs the onnx package: pip install -r requirements-onnx.txt")
    graph = OnnxSynthesis(model).eval()
    threads = torch.get_num_threads()
    # Tracing runs the graph once on a tiny example, thousands of small operations: more threads only wait
    # on each other (on a busy machine, tens of milliseconds per operation).
    torch.set_num_threads(1)
    try:
        return _export(graph, example_inputs(model), opset)
    finally:
        torch.set_num_threads(threads)


def _export(graph: OnnxSynthesis, example: tuple[torch.Tensor, torch.Tensor], opset: int) -> bytes:
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        # The exporter's notice that it is the TorchScript-based one, chosen above.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(
            graph,
            example,
            path,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=DYNAMIC_AXES,
            opset_version=opset,
            dynamo=False,
        )
        with open(path, "rb") as f:
            return f.read()


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The ONNX file `data` with `metadata` in its `metadata_props` (what the graph cannot say: the audio's
    sampling rate, the mel's settings), as onnxruntime's `get_modelmeta().custom_metadata_map` reads them."""
    onnx = importlib.import_module("onnx")
    proto = onnx.load_from_string(data)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def onnxruntime_module(needed_by: str = "--check"):
    """onnxruntime, which `needed_by` needs; an ExportError where it is not installed."""
    try:  # optional (requirements-onnx.txt), imported by name so that the type checker passes without it
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise ExportError(f"{needed_by} needs the onnxruntime package: pip install -r requirements-onnx.txt") from None


def check_with_onnxruntime(model: WaveFlow, path: str, frames: tuple[int, ...] = (8, 21)) -> float:
    """Largest difference between onnxruntime's audio (CPU) and `model.infer`'s for the same random mel and
    noise, at each of `frames` (batch 2)."""
    session = onnxruntime_module().InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for count in frames:
        mel, z = example_inputs(model, frames=count)
        (audio,) = session.run(None, {"mel": mel.numpy(), "z": z.numpy()})
        worst = max(worst, (torch.from_numpy(audio) - model.infer(mel, z=z)).abs().max().item())
    return worst


def onnx_metadata(config: Config) -> dict[str, str]:
    """What a user of the ONNX file needs to know beside its graph: the audio's rate, and the mel's settings
    (a mel of another analysis gives other audio), from the config exported."""
    data = config.data
    fmax = data.mel_fmax if data.mel_fmax is not None else data.sampling_rate / 2
    return {
        "model_name": config.waveflow.model_name,
        "sampling_rate": str(data.sampling_rate),
        "hop_length": str(data.hop_length),
        "filter_length": str(data.filter_length),
        "win_length": str(data.win_length),
        "n_mel_channels": str(data.n_mel_channels),
        "mel_fmin": f"{data.mel_fmin:g}",
        "mel_fmax": f"{fmax:g}",
        "mel": "natural log of max(Slaney mel of |STFT|, 1e-5), Tacotron 2's",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(description="Export synthesis (mel, noise -> audio) to an ONNX file.")
    parser.add_argument("-c", "--config", required=True, help="JSON config of the model")
    parser.add_argument(
        "--checkpoint_path", default=None, help="checkpoint to export (default: the config's train_config's)"
    )
    parser.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument(
        "--check", action="store_true", help="run the file with onnxruntime and compare its audio with PyTorch's"
    )
    args = parser.parse_args(argv)
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        parser.error(f"--opset {args.opset}: this export supports opsets {MIN_OPSET} to {MAX_OPSET}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_output_file(args.output, "ONNX file")
        if args.check:
            onnxruntime_module()  # before minutes of export, not after
        config = load_config(args.config)
        check_model_rules(config, training=False)
        path = args.checkpoint_path if args.checkpoint_path is not None else config.train.checkpoint_path
        if not path:
            raise ConfigError(f"{args.config}: train_config.checkpoint_path is empty; name a checkpoint to export")
        model = build_model(config.waveflow)
        load_checkpoint(path, model)
        model.remove_weight_norm().eval()
        data = with_metadata(export_onnx(model, args.opset), onnx_metadata(config))
        write_atomically(args.output, data)
        height, samples = config.waveflow.n_height, f"{config.waveflow.hop_length} * (F - {SYNTHESIS_TRIM_FRAMES})"
        print(f"wrote {args.output} ({len(data) / 2**20:.1f} MiB, opset {args.opset})")
        print(
            f"inputs: mel [B, {config.waveflow.cin_channels}, F], z [B, 1, {height}, {samples} / {height}]; "
            f"output: audio [B, {samples}]"
        )
        if args.check:
            print(f"onnxruntime against PyTorch, max abs difference: {check_with_onnxruntime(model, args.output):.2e}")
    except (ConfigError, CheckpointError, ExportError, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {'' if error.filename is None else f'{error.filename}: '}{describe(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
