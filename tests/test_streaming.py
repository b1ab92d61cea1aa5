"""Streaming synthesis (streaming.py) and the denoiser (denoiser.py) against whole-utterance synthesis."""

import json
import os

import numpy as np
import pytest
import soundfile
import torch

from config import HOP_LENGTH
from denoiser import Denoiser
from model import synthesis_length
from streaming import FADE_SAMPLES, ColumnNoise, StreamingSynthesis, receptive_field, stream
from test_model import random_model, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIECES = [1, 2, 5, 3, 7, 1, 4]  # mel frames per push, as an acoustic model might give them


def small(coupling_type: str = "nanoflow", **overrides):
    config = tiny_config(coupling_type, n_height=8, n_layer=2, n_flow=2)
    config.update(overrides)
    return random_model(config).remove_weight_norm()


def pieces(mel: torch.Tensor):
    """mel [B, cin, F] in pieces of PIECES frames, cycling."""
    start, index = 0, 0
    while start < mel.shape[-1]:
        size = PIECES[index % len(PIECES)]
        yield mel[:, :, start : start + size]
        start, index = start + size, index + 1


def whole(model, mel: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    height, hop = model.config.n_height, model.config.hop_length
    width = synthesis_length(mel.shape[-1], hop) // height
    return model.infer(mel, z=ColumnNoise(mel.shape[0], height, sigma, seed, hop_length=hop).take(0, width))


def streamed(model, mel: torch.Tensor, chunk: int, lookahead: int, context: int, sigma: float, seed: int):
    return torch.cat(list(stream(model, pieces(mel), chunk, lookahead, context, sigma, seed)), dim=1)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: small("nanoflow"), id="nanoflow"),
        pytest.param(
            lambda: small("waveflow", n_layer=3, n_layer_per_cycle=2, bipartize=True), id="waveflow-bipartize"
        ),
        pytest.param(lambda: small("nanoflow", upsample_factors=[15, 20], n_height=20), id="nanoflow-hop300"),
        # A hop of 16: the fade's 256 samples reach 16 frames past a chunk, beyond the noise's reach.
        pytest.param(lambda: small("waveflow", upsample_factors=[16], n_layer=1, n_flow=1), id="waveflow-hop16"),
    ],
)
def test_a_lookahead_covering_the_receptive_field_gives_the_whole_utterance(model):
    model = model()
    field = receptive_field(model)
    mel = torch.randn(2, 80, max(20, 2 * field.frames + 12))  # chunks emitted by push, not only by finish
    expected = whole(model, mel, 0.8, seed=5)
    audio = streamed(model, mel, 6, field.frames, field.frames, 0.8, seed=5)
    assert audio.shape == expected.shape
    assert (audio - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunk,frames", [(6, 28), (5, 24), (1, 23), (1, 11)])
def test_the_stream_is_exact_up_to_its_end_one_frame_at_a_time(chunk, frames):
    """The last chunk a push emits, and the tail its next chunk fades from, end a lookahead before the frames
    received, where whole synthesis may end 3 frames before them: the receptive field's frames cover that too."""
    model = small()
    field = receptive_field(model)
    mel = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(frames))
    audio = torch.cat(list(stream(model, mel.split(1, dim=2), chunk, field.frames, field.frames, 0.8, 3)), dim=1)
    assert (audio - whole(model, mel, 0.8, seed=3)).abs().max().item() <= 1e-5


def test_a_float64_model_streams_in_float64():
    model = small().double()
    mel = torch.randn(2, 80, 16, dtype=torch.float64)
    field = receptive_field(model)
    audio = streamed(model, mel, 4, field.frames, field.frames, 0.8, seed=2)
    assert audio.dtype == torch.float64
    assert (audio - whole(model, mel, 0.8, seed=2)).abs().max().item() <= 1e-12


def test_a_short_lookahead_differs_by_a_bounded_amount():
    model = small(n_layer=4)
    mel = torch.randn(1, 80, 40)
    expected = whole(model, mel, 0.8, seed=1)
    audio = streamed(model, mel, 6, 3, 0, 0.8, seed=1)
    difference = audio - expected
    assert difference.abs().max().item() > 1e-3  # the window is too small to be exact ...
    assert difference.pow(2).mean().sqrt() < 0.1 * expected.pow(2).mean().sqrt()  # ... yet close
    seams = torch.zeros(audio.shape[-1], dtype=torch.bool)
    for seam in range(6 * HOP_LENGTH, audio.shape[-1], 6 * HOP_LENGTH):
        seams[seam - HOP_LENGTH : seam + HOP_LENGTH] = True
    # the error sits at the seams, where the window's edges are close
    assert difference[0, seams].abs().mean() > 3 * difference[0, ~seams].abs().mean()


def test_the_receptive_field_bounds_what_a_sample_depends_on():
    model = small("nanoflow_decomp")
    field = receptive_field(model)
    height = model.config.n_height
    mel = torch.randn(1, 80, 30)
    z = torch.randn(1, 1, height, synthesis_length(30, HOP_LENGTH) // height)
    base = model.infer(mel, z=z)
    moved_z = z.clone()
    moved_z[..., 200] += 1
    changed = ((model.infer(mel, z=moved_z) - base).abs() > 0).view(-1, height).any(1).nonzero().flatten()
    assert changed.numel() and 200 - changed.min() <= field.columns and changed.max() - 200 <= field.columns
    moved_mel = mel.clone()
    moved_mel[..., 15] += 1
    changed = ((model.infer(moved_mel, z=z) - base).abs() > 0).flatten().nonzero().flatten()
    left, right = field.upsampler_frames
    assert changed.min() >= (15 - right) * HOP_LENGTH - field.samples - height
    assert changed.max() < (16 + left) * HOP_LENGTH + field.samples + height


def test_the_state_kept_between_chunks_does_not_grow_with_the_utterance():
    model = small()
    synthesis = StreamingSynthesis(model, chunk_frames=4, lookahead_frames=3, context_frames=3, sigma=0.8)
    held, samples = [], 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        for audio in synthesis.push(torch.randn(1, 80, 1, generator=generator)):
            samples += audio.shape[-1]
            assert audio.shape == (1, 4 * HOP_LENGTH)
        held.append(synthesis.state_elements())
    samples += sum(audio.shape[-1] for audio in synthesis.finish())
    assert samples == synthesis_length(120, HOP_LENGTH)
    # mel and noise of at most context + upsampler reach + chunk + lookahead frames
    per_frame = 80 + HOP_LENGTH
    assert max(held) <= (3 + 1 + 4 + 3) * per_frame + FADE_SAMPLES
    assert max(held[60:]) == max(held[:60])


def test_streaming_refuses_what_it_cannot_do():
    model = small()
    with pytest.raises(ValueError, match="lookahead_frames must be at least 3"):
        StreamingSynthesis(model, lookahead_frames=2)
    synthesis = StreamingSynthesis(model, chunk_frames=4)
    synthesis.push(torch.randn(1, 80, 3))
    with pytest.raises(ValueError, match="too short to synthesize"):
        synthesis.finish()


def test_no_click_at_the_seams_with_a_short_lookahead():
    """Where the windows are too short to agree with whole synthesis, the seams add no step: a jump
    from sample to sample at a seam differs from whole synthesis' jump there no more than elsewhere."""
    model = small(n_layer=4)
    mel = torch.randn(1, 80, 32)
    expected = whole(model, mel, 0.8, seed=1)[0]
    audio = streamed(model, mel, 5, 3, 0, 0.8, seed=1)[0]
    jumps = (audio[1:] - audio[:-1]).abs()
    extra = (jumps - (expected[1:] - expected[:-1]).abs()).abs()
    seams = torch.zeros_like(jumps, dtype=torch.bool)
    seams[5 * HOP_LENGTH - 1 :: 5 * HOP_LENGTH] = True
    assert seams.sum() >= 5 and (audio - expected).abs().max() > 0.01
    assert jumps[seams].max() <= jumps[~seams].max()
    assert extra[seams].mean() <= 2 * extra[~seams].mean()  # a hard cut between windows: 10 times


def test_the_denoiser_removes_the_bias_and_streams_as_it_denoises_whole():
    model = small()
    denoiser = Denoiser(model)
    bias = denoiser.bias()
    assert bias.shape == (513,) and denoiser.bias() is bias  # computed once per precision and device
    silent = model.infer(torch.full((1, 80, 40), float(np.log(1e-5))), sigma=0.0)
    spectrum = torch.stft(silent, 1024, 256, window=torch.hann_window(1024), return_complex=True).abs()
    denoised = torch.stft(denoiser(silent, 1.0), 1024, 256, window=torch.hann_window(1024), return_complex=True)
    assert denoised.abs()[..., 4:-4].mean() < 0.2 * spectrum[..., 4:-4].mean()  # the bias, removed
    audio = model.infer(torch.randn(1, 80, 50), sigma=0.8)
    assert (denoiser(audio, 0.0) - audio).abs().max() == 0
    expected = denoiser(audio, 0.5)
    assert 0 < (expected - audio).abs().max()
    assert expected.shape == audio.shape
    streaming = denoiser.stream(0.5)
    chunks = [out for piece in audio.split(300, dim=1) for out in streaming.push(piece)] + streaming.finish()
    assert (torch.cat(chunks, dim=1) - expected).abs().max() <= 1e-5
    assert streaming.buffer is not None and streaming.buffer.shape[1] <= 2 * 1024


def test_the_denoiser_streams_at_a_hop_that_does_not_divide_the_window():
    """24 kHz's settings (n_fft 2048, window 1200, hop 300): the streamed denoising is the whole clip's."""
    model = small("nanoflow", upsample_factors=[15, 20], n_height=20)
    denoiser = Denoiser(model, filter_length=2048, hop_length=300, win_length=1200)
    assert denoiser.bias().shape == (1025,)
    audio = model.infer(torch.randn(1, 80, 30), sigma=0.8)
    expected = denoiser(audio, 0.5)
    assert expected.shape == audio.shape and 0 < (expected - audio).abs().max()
    streaming = denoiser.stream(0.5)
    chunks = [out for piece in audio.split(700, dim=1) for out in streaming.push(piece)] + streaming.finish()
    assert (torch.cat(chunks, dim=1) - expected).abs().max() <= 1e-5


def test_the_denoiser_takes_a_configs_stft_parsed_or_as_the_jsons_dict():
    model = small("nanoflow", upsample_factors=[15, 20], n_height=20)
    with open(os.path.join(ROOT, "configs", "nanoflow-24k-hop300.json")) as f:
        raw = json.load(f)
    for config in (raw, raw["data_config"]):
        denoiser = Denoiser.from_config(model, config)
        assert (denoiser.filter_length, denoiser.hop_length) == (2048, 300)
        assert torch.equal(denoiser.window, Denoiser(model, 2048, 300, 1200).window)


def test_the_denoiser_refuses_a_negative_strength_and_streams_strength_0_unchanged():
    model = small()
    denoiser = Denoiser(model)
    audio = model.infer(torch.randn(1, 80, 30), sigma=0.8)
    for strength in (-0.1, float("nan"), float("inf")):  # a negative one would add the bias
        with pytest.raises(ValueError, match="denoiser strength must be a finite number >= 0"):
            denoiser(audio, strength)
        with pytest.raises(ValueError, match="denoiser strength must be a finite number >= 0"):
            denoiser.stream(strength)
    streaming = denoiser.stream(0.0)  # as the whole clip's: the audio itself, not its STFT round trip
    chunks = [out for piece in audio.split(300, dim=1) for out in streaming.push(piece)] + streaming.finish()
    assert torch.equal(torch.cat(chunks, dim=1), audio)
    with pytest.raises(ValueError, match="audio pushed after finish"):
        streaming.push(audio)


def test_train_py_streams_and_denoises_with_the_seed_of_the_config(tmp_path):
    from train import main

    model_config = tiny_config("nanoflow", n_height=8, n_layer=2, n_flow=2)
    config = json.load(open(os.path.join(ROOT, "configs", "demo.json")))
    config["waveflow_config"] = model_config
    config["train_config"]["output_directory"] = str(tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = random_model(model_config)
    torch.save({"model": model.state_dict(), "iteration": 1}, tmp_path / "model.pt")
    mel = torch.randn(80, 30)
    np.save(tmp_path / "clip.npy", mel.numpy())
    arguments = ["-s", "-c", str(tmp_path / "config.json"), "--checkpoint_path", str(tmp_path / "model.pt")]
    arguments += ["--mels", str(tmp_path / "clip.npy"), "-t", "0.7", "--precision", "fp32"]
    model.remove_weight_norm()
    written = tmp_path / "out" / "samples" / "tiny" / "clip_synthesis.wav"
    field = receptive_field(model)
    assert main(arguments + ["--chunk_frames", "5", "--lookahead_frames", str(field.frames)]) == 0
    expected = whole(model, mel[None], 0.7, seed=config["train_config"]["seed"])[0].clamp(-1, 1)
    assert np.abs(soundfile.read(written, dtype="int16")[0] / 32767 - expected.numpy()).max() <= 1 / 32767
    assert main(arguments + ["--denoise", "0.1"]) == 0
    assert soundfile.read(written)[0].shape == expected.shape
