"""export.py: the ONNX graph gives PyTorch's audio for the same noise, for every variant, at any batch and length."""

import importlib.util
import json
import os

import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import export  # noqa: E402
from export import OPSET, export_onnx, main, noise_shape  # noqa: E402
from model import WaveFlow, synthesis_length, unsqueeze  # noqa: E402
from test_model import random_model, tiny_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOLERANCE = 1e-4  # max abs difference, fp32
SIZE_FLOW_EMBED = 24  # a size no other tensor of the tiny models has


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here: see conftest.one_thread


def small_config(coupling_type: str, **overrides) -> dict:
    """Two flows of two blocks over 8 rows; the second block's height dilation 2 reaches the causal padding."""
    config = dict(n_height=8, n_layer=2, n_flow=2, n_layer_per_cycle=2)
    if coupling_type == "nanoflow":
        config.update(size_flow_embed=SIZE_FLOW_EMBED)
    return tiny_config(coupling_type, **{**config, **overrides})


def session(data: bytes):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(onnx_session, mel: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    (audio,) = onnx_session.run(None, {"mel": mel.numpy(), "z": z.numpy()})
    return torch.from_numpy(audio)


def inputs(model: WaveFlow, batch: int, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, model.config.cin_channels, frames, generator=generator)
    return mel, torch.randn(noise_shape(model, batch, frames), generator=generator)


def check_constants(model: WaveFlow, graph) -> None:
    """Weight norm folded, NanoFlow's flow embedding replaced by its products (one gate bias per flow and
    block), and what flows share stored once."""
    config = model.config
    shapes = {tensor.name: tuple(tensor.dims) for tensor in graph.graph.initializer}
    assert not [name for name in shapes if "weight_g" in name or "weight_v" in name or "embed" in name]
    assert not [name for name, shape in shapes.items() if SIZE_FLOW_EMBED in shape]
    gate_biases = [shape for name, shape in shapes.items() if name.startswith("gate_bias_")]
    # Without an embedding, the flows of one estimator have the same gate biases: the exporter stores them once.
    distinct = config.n_flow if config.coupling_type in ("waveflow", "nanoflow") else 1
    assert gate_biases == [(config.n_layer * 2 * config.res_channels,)] * distinct
    estimators = config.n_flow if config.coupling_type == "waveflow" else 1
    assert len([name for name in shapes if name.startswith("condition_")]) == estimators


@pytest.mark.parametrize(
    "coupling_type, overrides",
    [
        ("waveflow", {}),
        ("nanoflow_naive", {}),
        ("nanoflow_decomp", {}),
        ("nanoflow", {"use_weightnorm_embed": True}),
        ("nanoflow", {"bipartize": True, "n_flow": 4}),
        ("nanoflow", {"upsample_factors": [15, 20], "n_height": 20}),  # 24 kHz's hop of 300
    ],
    ids=["waveflow", "nanoflow_naive", "nanoflow_decomp", "nanoflow", "nanoflow-bipartize", "nanoflow-hop300"],
)
def test_onnxruntime_gives_pytorch_audio(coupling_type, overrides):
    model = random_model(small_config(coupling_type, **overrides))
    graph = onnx.load_from_string(export_onnx(model))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version == OPSET
    check_constants(model, graph)
    onnx_session = session(graph.SerializeToString())
    # One file, two batch sizes and two lengths.
    for batch, frames in ((1, 5), (3, 13)):
        mel, z = inputs(model, batch, frames, seed=frames)
        expected = model.infer(mel, z=z)
        audio = run(onnx_session, mel, z)
        assert audio.shape == (batch, synthesis_length(frames, model.config.hop_length))
        assert (audio - expected).abs().max().item() < TOLERANCE
        # The flows change the noise a lot: the agreement is not that of two near-identities.
        assert (expected - unsqueeze(z).squeeze(1)).abs().max().item() > 0.1


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def exported_setup(tmp_path):
    """A config file of a tiny NanoFlow and a checkpoint of it."""
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        config = json.load(f)
    config["waveflow_config"] = small_config("nanoflow")
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(config))
    model = random_model(config["waveflow_config"], seed=3)
    checkpoint = tmp_path / "waveflow_10"
    torch.save({"model": model.state_dict(), "iteration": 10}, checkpoint)
    return config_path, checkpoint, model


def test_command_writes_the_model(exported_setup, tmp_path, capsys):
    config_path, checkpoint, model = exported_setup
    out = tmp_path / "tiny.onnx"
    assert main(["-c", str(config_path), "--checkpoint_path", str(checkpoint), "-o", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "opset 17" in printed and "z [B, 1, 8, 256 * (F - 3) / 8]" in printed
    assert float(printed.split("max abs difference:")[1]) < TOLERANCE
    mel, z = inputs(model, 2, 9, seed=1)
    exported = session(out.read_bytes())
    audio = run(exported, mel, z)
    assert (audio - model.infer(mel, z=z)).abs().max().item() < TOLERANCE
    # What the graph cannot say: the audio's rate and the mel's analysis, from the config.
    metadata = exported.get_modelmeta().custom_metadata_map
    assert metadata["sampling_rate"] == "22050" and metadata["hop_length"] == "256"
    assert (metadata["filter_length"], metadata["mel_fmin"], metadata["mel_fmax"]) == ("1024", "0", "8000")


def test_check_without_onnxruntime_is_refused_before_exporting(exported_setup, tmp_path, capsys, monkeypatch):
    config_path, checkpoint, _ = exported_setup
    import_module = importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError(name)
        return import_module(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxruntime)
    monkeypatch.setattr(export, "export_onnx", lambda *args: pytest.fail("exported before checking"))
    out = tmp_path / "m.onnx"
    assert main(["-c", str(config_path), "--checkpoint_path", str(checkpoint), "-o", str(out), "--check"]) == 1
    one_line_error(capsys, "--check needs the onnxruntime package")
    assert not out.exists()


def one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_missing_checkpoint(exported_setup, tmp_path, capsys):
    config_path, _, _ = exported_setup
    missing = tmp_path / "waveflow_99"
    assert main(["-c", str(config_path), "--checkpoint_path", str(missing), "-o", str(tmp_path / "m.onnx")]) == 1
    one_line_error(capsys, str(missing), "not found")
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_of_another_model_keeps_the_existing_file(exported_setup, tmp_path, capsys):
    config_path, _, _ = exported_setup
    other = tmp_path / "waveflow_5"
    torch.save({"model": random_model(small_config("waveflow")).state_dict()}, other)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    assert main(["-c", str(config_path), "--checkpoint_path", str(other), "-o", str(out)]) == 1
    one_line_error(capsys, str(other), "waveflow", "nanoflow")
    assert out.read_bytes() == b"an earlier export"


def test_output_folder_missing(exported_setup, tmp_path, capsys):
    config_path, checkpoint, _ = exported_setup
    out = tmp_path / "no" / "such" / "m.onnx"
    assert main(["-c", str(config_path), "--checkpoint_path", str(checkpoint), "-o", str(out)]) == 1
    one_line_error(capsys, str(out), "does not exist")
    assert not (tmp_path / "no").exists()


def test_without_onnx_the_command_says_what_to_install(exported_setup, tmp_path, capsys, monkeypatch):
    config_path, checkpoint, _ = exported_setup
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "onnx" else find_spec(name, *args)
    )
    assert main(["-c", str(config_path), "--checkpoint_path", str(checkpoint), "-o", str(tmp_path / "m.onnx")]) == 1
    one_line_error(capsys, "onnx", "requirements-onnx.txt")


@pytest.mark.parametrize("opset", [6, 8, 99])
def test_an_opset_outside_what_the_export_supports_is_refused_before_exporting(
    exported_setup, tmp_path, capsys, monkeypatch, opset
):
    """Below 9 the file has ConstantFill, which onnxruntime cannot load; above the exporter's highest it fails."""
    config_path, checkpoint, _ = exported_setup
    monkeypatch.setattr(export, "export_onnx", lambda *args: pytest.fail("exported"))
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit):
        main(["-c", str(config_path), "--checkpoint_path", str(checkpoint), "-o", str(out), "--opset", str(opset)])
    err = capsys.readouterr().err
    assert f"error: --opset {opset}: this export supports opsets 9 to {export.MAX_OPSET}\n" in err, err
    assert "Traceback" not in err and not out.exists()
