"""The model on a CUDA GPU: the original's numbers, exact fast inference, the CUDA graph path,
mixed-precision training steps and agreement with the CPU. Skipped where no GPU is present
(`scripts/gpu_check.sh` runs these on a GPU machine)."""

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import inference
from cuda_graphs import CudaGraphCache
from model import build_model, negative_log_likelihood, unsqueeze
from test_model import (
    FIXTURES,
    VARIANTS,
    poison_uninitialised_memory,
    random_model,
    slow_inverse,
    tiny_config,
    weight_normed_embedding,
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 rounds fp32 matmuls and convolutions to 10 bits of mantissa: off for exactness tests."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", ["waveflow-small", "nanoflow-naive-small", "nanoflow-decomp-small", "nanoflow-small"])
def test_reference_fixture_on_cuda(name):
    fixture = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=False)
    model = build_model(fixture["waveflow_config"])
    model.load_state_dict(fixture["checkpoint"]["model"])
    model = model.to(CUDA).eval()
    forward = fixture["forward"]
    with torch.no_grad():
        z, logdet = model(forward["audio"].to(CUDA), forward["mel"].to(CUDA))
        loss = negative_log_likelihood(z, logdet)
    assert torch.allclose(z.cpu(), forward["z"], atol=TOLERANCE, rtol=0)
    assert abs(logdet.sum().item() - forward["logdet_sum"].item()) <= TOLERANCE * max(
        1.0, abs(forward["logdet_sum"].item())
    )
    assert abs(loss.item() - forward["loss"]) <= TOLERANCE
    infer = fixture["infer"]
    graphs = CudaGraphCache()
    for _ in range(3):  # eager, then captured as a CUDA graph, then replayed
        audio = model.infer(infer["mel"].to(CUDA), z=infer["z"].to(CUDA), cuda_graphs=graphs)
        assert torch.allclose(audio.cpu(), infer["audio"], atol=TOLERANCE, rtol=0)
    assert len(graphs.graphs) == 1


@pytest.mark.parametrize(
    "variant,overrides",
    [(variant, {}) for variant in VARIANTS]
    + [
        ("nanoflow", {"n_layer_per_cycle": 3, "n_layer": 5, "bipartize": True}),
        ("waveflow", {"n_height": 32, "n_flow": 2, "n_layer": 7}),
    ],
)
def test_fast_inference_is_the_exact_inverse_on_cuda(variant, overrides):
    model = random_model(tiny_config(variant, **overrides)).to(CUDA)
    height, frames = model.config.n_height, 7
    mel = torch.randn(2, 80, frames, device=CUDA)
    z = torch.randn(2, 1, height, 256 * (frames - 3) // height, device=CUDA)
    with torch.no_grad():
        expected = slow_inverse(model, mel, z)
    graphs = CudaGraphCache()
    for cache in (None, graphs, graphs, graphs):  # eager; eager, captured, replayed through the cache
        audio = model.infer(mel, z=z, cuda_graphs=cache)
        assert torch.allclose(audio, expected, atol=TOLERANCE, rtol=0)
    assert len(graphs.graphs) == 1
    with torch.no_grad():
        z_back, _ = model(audio, mel)
    assert torch.allclose(z_back, z, atol=TOLERANCE, rtol=0)
    assert (unsqueeze(z).squeeze(1) - audio).abs().max() > 0.1


def test_cuda_graphs_follow_new_weights_and_inputs():
    model = random_model(tiny_config("nanoflow")).to(CUDA)
    mel, z = torch.randn(1, 80, 6, device=CUDA), torch.randn(1, 1, 16, 48, device=CUDA)
    graphs = CudaGraphCache()
    for _ in range(3):
        model.infer(mel, z=z, cuda_graphs=graphs)
    assert len(graphs.graphs) == 1
    other = random_model(tiny_config("nanoflow"), seed=5)
    model.load_state_dict(other.state_dict())  # in-place copies: same storage, new version
    assert torch.allclose(
        model.infer(mel, z=z, cuda_graphs=graphs).cpu(), other.infer(mel.cpu(), z=z.cpu()), atol=TOLERANCE
    )
    mel2, z2 = torch.randn_like(mel), torch.randn_like(z)
    for _ in range(2):
        assert torch.allclose(
            model.infer(mel2, z=z2, cuda_graphs=graphs).cpu(), other.infer(mel2.cpu(), z=z2.cpu()), atol=TOLERANCE
        )
    model.remove_weight_norm()  # new parameters: the old graphs must not be replayed
    assert torch.allclose(
        model.infer(mel2, z=z2, cuda_graphs=graphs).cpu(), other.infer(mel2.cpu(), z=z2.cpu()), atol=TOLERANCE
    )


def test_threads_share_one_cuda_graph_cache():
    model = random_model(tiny_config("nanoflow")).to(CUDA)
    requests = [
        (torch.randn(2, 80, 7, device=CUDA), torch.randn(2, 1, 16, 64, device=CUDA)),
        (torch.randn(1, 80, 6, device=CUDA), torch.randn(1, 1, 16, 48, device=CUDA)),
    ]
    alone = [model.infer(mel, z=z) for mel, z in requests]
    graphs = CudaGraphCache()
    start = threading.Barrier(len(requests))

    def synthesize(request):
        start.wait()
        return [model.infer(request[0], z=request[1], cuda_graphs=graphs) for _ in range(4)]  # eager, capture, replays

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(synthesize, requests))
    torch.cuda.synchronize()
    for expected, results in zip(alone, together, strict=True):
        for audio in results:
            assert torch.allclose(audio, expected, atol=TOLERANCE, rtol=0)
    # One length is captured at a time, the other running eagerly meanwhile: each has been captured,
    # or is captured now, on its next call.
    for (mel, z), expected in zip(requests, alone, strict=True):
        assert torch.allclose(model.infer(mel, z=z, cuda_graphs=graphs), expected, atol=TOLERANCE, rtol=0)
    assert len(graphs.graphs) == len(requests)


def test_threads_on_their_own_streams_each_get_their_own_audio():
    """Two threads replay one graph with different inputs, each on its own stream, while a third captures
    another length on a third: every result is its own input's, however the streams' work interleaves."""
    model = random_model(tiny_config("nanoflow")).to(CUDA)
    same_length = [(torch.randn(1, 80, 6, device=CUDA), torch.randn(1, 1, 16, 48, device=CUDA)) for _ in range(2)]
    requests = [*same_length, (torch.randn(2, 80, 7, device=CUDA), torch.randn(2, 1, 16, 64, device=CUDA))]
    alone = [model.infer(mel, z=z) for mel, z in requests]
    graphs = CudaGraphCache()
    for _ in range(2):  # eager, captured: the first two threads only replay
        model.infer(same_length[0][0], z=same_length[0][1], cuda_graphs=graphs)
    assert len(graphs.graphs) == 1
    torch.cuda.synchronize()  # the threads' streams do not wait on the default stream's work above
    start = threading.Barrier(len(requests))

    def synthesize(request):
        stream = torch.cuda.Stream()
        start.wait()
        with torch.cuda.stream(stream):
            audio = [model.infer(request[0], z=request[1], cuda_graphs=graphs) for _ in range(20)]
        stream.synchronize()
        return audio

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(synthesize, requests))
    torch.cuda.synchronize()
    assert len(graphs.graphs) == 2
    for expected, results in zip(alone, together, strict=True):
        for audio in results:
            assert torch.allclose(audio, expected, atol=TOLERANCE, rtol=0)


class RefusedCapture(torch.cuda.CUDAGraph):
    def capture_begin(self, *args, **kwargs):
        raise RuntimeError("capture refused (a stand-in)")


@pytest.mark.parametrize("failure", ["capture_begin raises", "out of memory while capturing"])
def test_a_failed_capture_falls_back_to_eager_with_one_warning(monkeypatch, failure):
    model = random_model(tiny_config("nanoflow")).to(CUDA)
    mel, z = torch.randn(1, 80, 6, device=CUDA), torch.randn(1, 1, 16, 48, device=CUDA)
    expected = model.infer(mel, z=z)
    if failure == "capture_begin raises":
        monkeypatch.setattr(torch.cuda, "CUDAGraph", RefusedCapture)
    else:
        reverse_flows = inference.reverse_flows

        def out_of_memory_while_capturing(*args, **kwargs):
            x = reverse_flows(*args, **kwargs)  # the whole synthesis is captured before it fails
            if torch.cuda.is_current_stream_capturing():
                raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
            return x

        monkeypatch.setattr(inference, "reverse_flows", out_of_memory_while_capturing)
    graphs = CudaGraphCache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # eager; the capture fails, eager; eager twice, without another attempt
            audio = model.infer(mel, z=z, cuda_graphs=graphs)
            assert torch.allclose(audio, expected, atol=TOLERANCE, rtol=0)
    ours = [str(warning.message) for warning in caught if "CUDA graph capture failed" in str(warning.message)]
    assert len(ours) == 1 and "stand-in" in ours[0]
    assert not graphs.graphs
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the capture stream was left
    assert not torch.cuda.is_current_stream_capturing()
    monkeypatch.undo()
    # The device is as it was: another length is captured and replayed through the same cache.
    mel, z = torch.randn(1, 80, 7, device=CUDA), torch.randn(1, 1, 16, 64, device=CUDA)
    expected = model.infer(mel, z=z)
    for _ in range(3):  # eager, captured, replayed
        assert torch.allclose(model.infer(mel, z=z, cuda_graphs=graphs), expected, atol=TOLERANCE, rtol=0)
    assert len(graphs.graphs) == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_remove_weight_norm_on_cuda(variant):
    model = random_model(tiny_config(variant, **weight_normed_embedding(variant))).to(CUDA)
    mel, z = torch.randn(1, 80, 6, device=CUDA), torch.randn(1, 1, 16, 48, device=CUDA)
    graphs = CudaGraphCache()
    audio = model.infer(mel, z=z, cuda_graphs=graphs)
    model.remove_weight_norm()
    for _ in range(3):  # new parameters: eager, captured, replayed
        assert torch.allclose(model.infer(mel, z=z, cuda_graphs=graphs), audio, atol=1e-5)


def test_cpu_and_cuda_give_the_same_z_and_audio():
    model = random_model(tiny_config("nanoflow", n_layer_per_cycle=2))
    audio, mel = torch.randn(2, 1024).clamp(-1, 1), torch.randn(2, 80, 5)
    z_mel, z = torch.randn(2, 80, 7), torch.randn(2, 1, 16, 64)
    with torch.no_grad():
        z_cpu, logdet_cpu = model(audio, mel)
    audio_cpu = model.infer(z_mel, z=z)
    model = model.to(CUDA)
    with torch.no_grad():
        z_cuda, logdet_cuda = model(audio.to(CUDA), mel.to(CUDA))
    assert torch.allclose(z_cuda.cpu(), z_cpu, atol=TOLERANCE, rtol=0)
    assert torch.allclose(logdet_cuda.cpu(), logdet_cpu, atol=TOLERANCE * 100, rtol=1e-6)
    assert torch.allclose(model.infer(z_mel.to(CUDA), z=z.to(CUDA)).cpu(), audio_cpu, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_training_step(dtype):
    torch.manual_seed(0)
    model = build_model(tiny_config("nanoflow")).to(CUDA).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    audio = (torch.rand(2, 2048, device=CUDA) * 2 - 1) * 0.5
    mel = torch.randn(2, 80, 9, device=CUDA)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            z, logdet = model(audio, mel)
            loss = negative_log_likelihood(z, logdet)
        assert z.dtype == logdet.dtype == loss.dtype == torch.float32
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_synthesis_returns_fp32_close_to_fp32(dtype):
    model = random_model(tiny_config("nanoflow")).to(CUDA)
    mel, z = torch.randn(1, 80, 6, device=CUDA), torch.randn(1, 1, 16, 48, device=CUDA)
    reference = model.infer(mel, z=z)
    model = model.remove_weight_norm().to(dtype)
    graphs = CudaGraphCache()
    for _ in range(3):  # eager, captured, replayed
        audio = model.infer(mel, z=z, cuda_graphs=graphs)
        assert audio.dtype == torch.float32
        assert (audio - reference).abs().max() < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_synthesis_on_cuda_never_reads_memory_it_did_not_write(monkeypatch, dtype):
    """As on the CPU (tests/test_model.py): memory a synthesis takes uninitialised, here from the caching
    allocator, filled with NaN, must not change the audio, eager or captured and replayed."""
    # Two eager runs are compared bitwise: cuDNN's transposed convs (the mel upsampler) may otherwise pick an
    # algorithm that sums with atomics, in another order each run.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model = random_model(tiny_config("nanoflow")).to(CUDA).remove_weight_norm().to(dtype)
    mel, z = torch.randn(2, 80, 6, device=CUDA), torch.randn(2, 1, 16, 48, device=CUDA)
    expected = model.infer(mel, z=z)
    poison_uninitialised_memory(monkeypatch)
    assert torch.isfinite(expected).all()
    assert torch.equal(model.infer(mel, z=z), expected)
    graphs = CudaGraphCache()
    for _ in range(3):  # eager, captured, replayed
        audio = model.infer(mel, z=z, cuda_graphs=graphs)
        assert torch.isfinite(audio).all() and torch.allclose(audio, expected, atol=1e-3, rtol=0)


def test_a_model_on_a_gpu_draws_its_noise_from_a_cpu_generator_as_on_the_cpu():
    """`infer(mel, generator=torch.Generator())` on a GPU model: the noise is drawn on the generator's device
    (it failed: "Expected a 'cuda' device type for generator"), so the same seed gives the CPU's audio."""
    model = random_model(tiny_config("nanoflow")).remove_weight_norm()
    mel = torch.randn(2, 80, 6)
    expected = model.infer(mel, sigma=0.8, generator=torch.Generator().manual_seed(3))
    audio = model.to(CUDA).infer(mel, sigma=0.8, generator=torch.Generator().manual_seed(3))
    assert audio.device.type == "cuda" and torch.allclose(audio.cpu(), expected, atol=1e-4, rtol=0)
