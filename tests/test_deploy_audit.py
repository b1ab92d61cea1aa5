"""Deployment features on the cases their own tests leave out: a stream used after it has finished, mels that
`infer` cannot synthesize, and the measuring scripts (bench_onnx, streaming_check) at another rate and hop."""

import json
import os
import re

import pytest
import torch

from conftest import ROOT
from denoiser import Denoiser
from model import synthesis_length
from streaming import StreamingSynthesis
from test_model import random_model, tiny_config
from test_scripts import script

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here: see conftest.one_thread


def small(**overrides):
    return random_model(tiny_config("nanoflow", n_height=8, n_layer=2, n_flow=2, **overrides)).remove_weight_norm()


def tiny_config_file(tmp_path, name: str) -> str:
    """configs/NAME with a tiny model of its hop: 16 channels, 2 blocks, 2 flows."""
    with open(os.path.join(ROOT, "configs", name)) as f:
        config = json.load(f)
    config["waveflow_config"].update(res_channels=16, n_layer=2, n_flow=2, size_flow_embed=8)
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def test_a_finished_stream_returns_nothing_more_and_refuses_more_frames():
    """finish() again gave nothing (right) but a push after it went on synthesizing from the 3 trimmed frames."""
    model = small()
    mel = torch.randn(2, 80, 13)
    synthesis = StreamingSynthesis(model, chunk_frames=4, lookahead_frames=3, context_frames=2)
    chunks = [audio for size in (0, 5, 1, 7) for audio in synthesis.push(mel[:, :, :size])]
    chunks += synthesis.finish()
    assert sum(audio.shape[1] for audio in chunks) == synthesis_length(13, 256)
    assert synthesis.finish() == []
    with pytest.raises(ValueError, match=r"pushed after finish\(\): the stream has ended"):
        synthesis.push(mel[:, :, :4])
    assert synthesis.finish() == []


def test_a_stream_refuses_frames_of_another_shape_in_one_line():
    synthesis = StreamingSynthesis(small(), chunk_frames=4)
    for mel in (torch.randn(80, 10), torch.randn(1, 40, 10)):
        with pytest.raises(ValueError, match=r"mel frames must be \[B, 80, n\], got shape"):
            synthesis.push(mel)


@pytest.mark.parametrize("length", [300, 3000], ids=["shorter-than-half-a-window", "longer"])
def test_a_finished_denoiser_stream_returns_nothing_more_and_refuses_more_audio(length):
    """finish() again returned the reflected end of the clip (or a short clip all over again)."""
    denoiser = Denoiser(small())
    audio = torch.randn(2, length, generator=torch.Generator().manual_seed(0))
    stream = denoiser.stream(0.5)
    chunks = [out for piece in audio.split(700, dim=1) for out in stream.push(piece)] + stream.finish()
    assert (torch.cat(chunks, dim=1) - denoiser(audio, 0.5)).abs().max() <= 1e-5
    assert stream.finish() == []
    with pytest.raises(ValueError, match=r"pushed after finish\(\): the stream has ended"):
        stream.push(audio)


def test_infer_refuses_a_mel_it_cannot_synthesize_in_one_line():
    """An empty mel crashed in the upsampler's transposed conv, a 2-D mel or one of other bands in a matrix
    product deep in synthesis."""
    model = small()
    cases = {
        (1, 80, 0): "a mel of 0 frames is too short to synthesize (need at least 4)",
        (1, 80, 1): "a mel of 1 frame is too short to synthesize (need at least 4)",
        (80, 10): r"mel must be [B, 80, F] with B >= 1, got shape (80, 10)",
        (1, 40, 10): r"mel must be [B, 80, F] with B >= 1, got shape (1, 40, 10)",
        (0, 80, 10): r"mel must be [B, 80, F] with B >= 1, got shape (0, 80, 10)",
    }
    for shape, message in cases.items():
        with pytest.raises(ValueError) as error:
            model.infer(torch.randn(shape))
        assert str(error.value) == message
    assert model.infer(torch.randn(1, 80, 4)).shape == (1, 256)


def test_bench_onnx_measures_audio_at_the_configs_rate_and_hop(tmp_path, capsys):
    """It took every config for 22,050 Hz and hop 256: at 44.1 kHz and hop 512 its audio, and so its
    real-time factors, were twice what they were."""
    pytest.importorskip("onnxruntime")
    config = tiny_config_file(tmp_path, "nanoflow-44k-hop512.json")
    argv = ["-c", config, "--seconds", "0.05", "--repeats", "1", "--threads", "1"]
    assert script("bench_onnx").main(argv) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| nanoflow-44k"))
    samples = 512 * 5  # ceil(0.05 s * 44,100 / 512) frames, 3 more trimmed
    assert row.split("|")[3].strip() == f"{samples / 44100:.2f} s"


def test_streaming_check_runs_its_default_lookaheads_at_the_configs_rate(tmp_path, capsys):
    """Its default lookaheads began at 1, which a stream refuses (a traceback), and it took 22,050 Hz and
    hop 256 for any config."""
    config = tiny_config_file(tmp_path, "nanoflow-24k-hop300.json")
    script("streaming_check").main(["lookahead", "-c", config, "--frames", "24", "--chunk", "5", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row.split("|")[1]) for row in rows] == [3, 4, 6, 8, 12, 16]
    assert "| 3 | 8 |" in rows[0] and "(100 + " in rows[0]  # 8 frames of 300 samples at 24 kHz: 100 ms
