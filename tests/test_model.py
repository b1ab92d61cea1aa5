"""The model family against the original's numbers, and the properties every flow must have."""

import functools
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import pytest
import torch
import torch.nn.functional as F

import inference
from config import ConfigError
from cuda_graphs import CudaGraphCache
from model import SYNTHESIS_TRIM_FRAMES, WaveFlow, build_model, negative_log_likelihood, squeeze, unsqueeze
from modules import PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS, DilatedConv2d, HeightCausalConv2d, WaveNet2D
from streaming import stream

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures")
VARIANTS = ["waveflow", "nanoflow_naive", "nanoflow_decomp", "nanoflow"]
TOLERANCE = 1e-4


def tiny_config(coupling_type: str, **overrides) -> dict:
    config = {
        "model_name": "tiny",
        "cin_channels": 80,
        "res_channels": 16,
        "n_height": 16,
        "n_layer": 3,
        "n_flow": 4,
        "n_layer_per_cycle": 1,
        "coupling_type": coupling_type,
    }
    if coupling_type == "nanoflow":  # the other coupling types have no flow embedding
        config.update(size_flow_embed=8, use_weightnorm_embed="False")
    config.update(overrides)
    return config


def weight_normed_embedding(coupling_type: str) -> dict:
    """The override that weight-norms the flow embedding, where the coupling type has one."""
    return {"use_weightnorm_embed": True} if coupling_type == "nanoflow" else {}


def random_model(config: dict, seed: int = 0) -> WaveFlow:
    """A model whose every parameter matters: the near-zero initialisation of the projections
    would otherwise make each flow almost the identity."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def slow_inverse(model: WaveFlow, mel: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The exact inverse the definition gives: every row recomputed with a full estimator pass."""
    height, n_flow = model.config.n_height, model.config.n_flow
    c = squeeze(model.upsample(mel)[..., : -SYNTHESIS_TRIM_FRAMES * model.config.hop_length], height)
    conditions = []
    for flow in range(n_flow):
        c = model.permute(flow, c)
        conditions.append(c)
    x = z
    for flow in reversed(range(n_flow)):
        y = torch.zeros_like(x)
        for h in range(height):
            log_s, t = model.coupling_params(flow, y, conditions[flow])
            y[:, :, h] = (x[:, :, h] - t[:, :, h]) * torch.exp(-log_s[:, :, h])
        x = model.permute(flow, y)
    return unsqueeze(x).squeeze(1)


# ----------------------------------------------------------------------------- reference fixtures


@pytest.mark.parametrize("name", ["waveflow-small", "nanoflow-naive-small", "nanoflow-decomp-small", "nanoflow-small"])
def test_reference_fixture(name):
    fixture = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=False)
    model = build_model(fixture["waveflow_config"])
    model.load_state_dict(fixture["checkpoint"]["model"])  # strict, original weight_g/weight_v layout
    model.eval()
    forward = fixture["forward"]
    with torch.no_grad():
        z, logdet = model(forward["audio"], forward["mel"])
        loss = negative_log_likelihood(z, logdet)
    assert logdet.shape == (forward["audio"].shape[0],)
    assert torch.allclose(z, forward["z"], atol=TOLERANCE, rtol=0)
    assert abs(logdet.sum().item() - forward["logdet_sum"].item()) <= TOLERANCE * max(
        1.0, abs(forward["logdet_sum"].item())
    )
    assert abs(loss.item() - forward["loss"]) <= TOLERANCE
    infer = fixture["infer"]
    audio = model.infer(infer["mel"], z=infer["z"])
    assert audio.shape == infer["audio"].shape
    assert torch.allclose(audio, infer["audio"], atol=TOLERANCE, rtol=0)


def test_state_dict_layout_and_parameter_counts_of_the_original_configs():
    reference = json.load(open(os.path.join(FIXTURES, "state_dicts.json")))
    expected_counts = {
        "waveflow-h16-r64": 5_950_180,
        "waveflow-h16-r128": 22_385_892,
        "nanoflow-naive-h16-r128": 2_798_408,
        "nanoflow-decomp-h16-r128": 2_800_228,
        "nanoflow-h16-r128-emb512": 3_865_188,
        "nanoflow-h16-r128-emb1024-f16": 4_936_324,
    }
    for name, count in expected_counts.items():
        with open(os.path.join(ROOT, "configs", f"{name}.json")) as f:
            project_config = json.load(f)
        assert project_config["waveflow_config"] == reference[name]["waveflow_config"]
        model = build_model(project_config["waveflow_config"])
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
        assert reference[name]["trainable_parameters_with_weight_norm"] == count
        # Same names, shapes and order as the original, so its checkpoints and Adam states load.
        assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == reference[name]["state_dict"]


def test_inference_parameter_count_matches_the_paper():
    with open(os.path.join(ROOT, "configs", "nanoflow-h16-r128-emb512.json")) as f:
        model = build_model(json.load(f)["waveflow_config"])
    assert model.parameter_count(inference=True) == 2_818_530
    with open(os.path.join(ROOT, "configs", "waveflow-h16-r64.json")) as f:
        model = build_model(json.load(f)["waveflow_config"])
    assert model.parameter_count(inference=True) == 5_925_090


# ----------------------------------------------------------------------------- flow properties

INVERTIBILITY_CASES = [(variant, {}) for variant in VARIANTS] + [
    ("nanoflow", {"n_height": 8}),
    ("waveflow", {"n_height": 32, "n_flow": 2, "n_layer": 7}),  # width dilations up to 64, rows 32 wide
    ("nanoflow", {"n_layer_per_cycle": 3, "n_layer": 5, "bipartize": "True"}),
    ("nanoflow_naive", {"n_layer_per_cycle": 3, "n_layer": 4, "bipartize": True}),
    ("nanoflow_decomp", {"n_height": 32, "n_layer_per_cycle": 2, "n_layer": 4}),
    ("nanoflow", {"use_weightnorm_embed": "True", "n_height": 8, "n_layer_per_cycle": 2}),
]


@pytest.mark.parametrize("variant,overrides", INVERTIBILITY_CASES)
def test_fast_inference_is_the_exact_inverse(variant, overrides):
    model = random_model(tiny_config(variant, **overrides))
    height = model.config.n_height
    frames = 7
    mel = torch.randn(2, 80, frames)
    z = torch.randn(2, 1, height, 256 * (frames - 3) // height)
    audio = model.infer(mel, z=z)
    assert audio.shape == (2, 256 * (frames - 3))
    with torch.no_grad():
        assert torch.allclose(audio, slow_inverse(model, mel, z), atol=TOLERANCE, rtol=0)
        z_back, _ = model(audio, mel)
    assert torch.allclose(z_back, z, atol=TOLERANCE, rtol=0)
    # Not trivially true: the flows change their input.
    assert (unsqueeze(z).squeeze(1) - audio).abs().max() > 0.1


@pytest.mark.parametrize("hop,height", [(256, 16), (300, 20)])  # rows of 48 and of 45 columns
def test_synthesis_options_give_the_same_audio(monkeypatch, hop, height):
    """The same audio to rounding: a batch's products and one item's may sum in another order (at odd
    widths, about 1e-7 apart), the mel projected in the queues' products another (about 2e-6)."""
    factors = {256: [16, 16], 300: [15, 20]}[hop]
    config = tiny_config("nanoflow", n_layer_per_cycle=2, bipartize=True, n_height=height, upsample_factors=factors)
    model = random_model(config)
    width = 3 * hop // height
    mel, z = torch.randn(3, 80, 6), torch.randn(3, 1, height, width)
    whole = model.infer(mel, z=z)
    same = functools.partial(torch.allclose, whole, atol=1e-6, rtol=0)
    # Past the conditioning cache's budget: on a CPU the mel rows go in the queues, on a GPU each row is
    # projected when it is needed.
    made = memories_made(monkeypatch)
    past_budget = model.infer(mel, z=z, condition_cache_bytes=0)
    assert [memory.mel_channels for memory in made] == [80]
    assert torch.allclose(past_budget, whole, atol=1e-5, rtol=0)
    with monkeypatch.context() as patch:
        patch.setattr(inference, "conditioning_in_queue", lambda c, cache_fits=True: False)  # as on a GPU
        assert same(model.infer(mel, z=z, condition_cache_bytes=0))
    assert same(model.infer(mel, z=z, max_cpu_columns=2 * width))  # groups of two items, then one
    assert same(model.infer(mel, z=z, max_cpu_columns=1))  # one item at a time
    alone = torch.cat([model.infer(mel[item : item + 1], z=z[item : item + 1]) for item in range(3)])
    assert same(alone)  # each item as a batch of one
    graphs = CudaGraphCache()
    assert torch.equal(model.infer(mel, z=z, cuda_graphs=graphs), whole)  # CUDA graphs are for CUDA tensors only
    assert not graphs.seen and not graphs.graphs


def test_a_float64_model_synthesizes_in_float64():
    """A float64 model's synthesis keeps float64 through the flows (`inference.synthesis_dtype`): the
    exact inverse to 1e-12, where fp32 state would leave about 1e-7."""
    model = random_model(tiny_config("waveflow", n_height=8, n_layer=3, n_flow=3)).double()
    mel = torch.randn(2, 80, 6, dtype=torch.float64)
    z = torch.randn(2, 1, 8, 96, dtype=torch.float64)
    audio = model.infer(mel, z=z)
    assert audio.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(audio, slow_inverse(model, mel, z), atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["nanoflow", "waveflow"])  # one estimator shared by all flows, one per flow
def test_threads_synthesizing_with_one_model_get_what_each_gets_alone(variant):
    """A service's threads share one loaded model: their syntheses must share no state."""
    model = random_model(tiny_config(variant, n_layer_per_cycle=2))
    requests = [
        (torch.randn(2, 80, 7), torch.randn(2, 1, 16, 64)),  # different batch sizes and lengths
        (torch.randn(1, 80, 5), torch.randn(1, 1, 16, 32)),
        (torch.randn(3, 80, 6), torch.randn(3, 1, 16, 48)),
    ]
    alone = [model.infer(mel, z=z) for mel, z in requests]
    start = threading.Barrier(len(requests))

    def synthesize(request):
        start.wait()
        return [model.infer(request[0], z=request[1]) for _ in range(3)]

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(synthesize, requests))
    for expected, results in zip(alone, together, strict=True):
        for audio in results:
            assert torch.equal(audio, expected)


def test_the_model_holds_no_synthesis_state():
    """Synthesis keeps its queues and folded weights to itself: the model after it is the model before."""
    model = random_model(tiny_config("nanoflow", n_layer_per_cycle=2))

    def attributes():
        return {name: sorted(vars(module)) for name, module in model.named_modules()}

    before, state = attributes(), {key: value.clone() for key, value in model.state_dict().items()}
    for _ in range(2):
        assert not any(module._buffers for module in model.modules())  # not even buffers set to None
        for module in model.modules():  # no tensors but the parameters, nor lists of them
            values = [value for value in vars(module).values() if not isinstance(value, dict)]
            values += [item for value in values if isinstance(value, (list, tuple)) for item in value]
            assert not any(isinstance(value, torch.Tensor) for value in values)
        model.infer(torch.randn(2, 80, 6), z=torch.randn(2, 1, 16, 48))
        assert attributes() == before
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())


def test_logdet_equals_brute_force_jacobian():
    for variant in VARIANTS:
        model = random_model(
            tiny_config(variant, n_height=4, n_flow=3, res_channels=8, n_layer=2, n_layer_per_cycle=2, bipartize=True),
            seed=1,
        ).double()
        mel = torch.randn(1, 80, 1, dtype=torch.float64)
        audio = torch.randn(1, 24, dtype=torch.float64)
        with torch.no_grad():
            _, logdet = model(audio, mel)
        jacobian = torch.autograd.functional.jacobian(
            lambda a, model=model, mel=mel: model(a, mel)[0].flatten(), audio
        ).reshape(24, 24)
        sign, logabsdet = torch.linalg.slogdet(jacobian)
        assert sign != 0
        assert abs(logdet.item() - logabsdet.item()) < 1e-6, variant
        assert abs(logdet.item()) > 0.1  # the flows really scale


def plain_coupling_params(model: WaveFlow, flow: int, x: torch.Tensor, c: torch.Tensor):
    """`(log_s, t)` written out as the paper and the original define them, with none of the
    folding (front conv, skip projection, gates, biases) that the model does for speed."""
    net, coupling, embedding = model.flow_parts(flow)
    channels = net.res_channels
    front = cast(HeightCausalConv2d, net.front_conv[0]).conv
    h = F.conv2d(F.pad(x, (0, 0, 1, 0))[:, :, :-1], front.normed_weight(), front.bias)  # shifted down one row
    skip = torch.zeros(())
    for j, block in enumerate(net.res_blocks):
        conv = block.filter_gate_conv
        a = F.conv2d(
            F.pad(h, (conv.pad_side, conv.pad_side, conv.pad_top, 0)),
            conv.conv.normed_weight(),
            conv.conv.bias,
            dilation=conv.conv.dilation,
        )
        a = a + F.conv2d(c, block.filter_gate_conv_c.normed_weight(), block.filter_gate_conv_c.bias)
        if embedding is not None:
            embed = block.filter_gate_conv_h
            assert embed is not None
            a = a + F.conv2d(embedding, embed.normed_weight(), embed.bias)
        gated = torch.tanh(a[:, :channels]) * torch.sigmoid(a[:, channels:])
        res_skip = F.conv2d(gated, block.res_skip_conv.normed_weight(), block.res_skip_conv.bias)
        if hasattr(coupling, "multgate"):
            h = h + res_skip[:, :channels] * coupling.multgate[j].view(1, -1, 1, 1)
        else:
            h = (h + res_skip[:, :channels]) * math.sqrt(0.5)
        skip = skip + res_skip[:, channels:]
    proj = coupling.proj_log_s_t
    return (F.conv2d(skip, proj.conv.weight, proj.conv.bias) * torch.exp(3 * proj.scale)).chunk(2, dim=1)


@pytest.mark.parametrize(
    "variant,overrides",
    [
        ("nanoflow", {}),
        ("waveflow", {"n_layer_per_cycle": 2}),
        ("nanoflow_decomp", {}),
        ("nanoflow", {"res_channels": PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS}),  # weight gradients by products
    ],
)
def test_estimator_and_its_gradients_equal_the_plain_definition(variant, overrides):
    model = random_model(tiny_config(variant, n_layer=4, **overrides)).train()
    x, c = torch.randn(2, 1, 16, 24), torch.randn(2, 80, 16, 24)
    params = [p for p in model.parameters() if p.requires_grad]
    for flow in (0, model.config.n_flow - 1):
        fast, plain = model.coupling_params(flow, x, c), plain_coupling_params(model, flow, x, c)
        weights = torch.randn(2, *x.shape)
        loss_fast = sum(((w * out).sum() for w, out in zip(weights, fast, strict=True)), torch.zeros(()))
        loss_plain = sum(((w * out).sum() for w, out in zip(weights, plain, strict=True)), torch.zeros(()))
        assert torch.allclose(loss_fast, loss_plain, atol=1e-4, rtol=1e-5)
        for a, b in zip(fast, plain, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
        grads_fast = torch.autograd.grad(loss_fast, params, allow_unused=True)
        grads_plain = torch.autograd.grad(loss_plain, params, allow_unused=True)
        used = 0
        for p, a, b in zip(params, grads_fast, grads_plain, strict=True):
            if b is None:
                assert a is None or not a.any()
                continue
            used += 1
            assert a is not None and torch.allclose(a, b, atol=1e-4, rtol=1e-4), [
                n for n, q in model.named_parameters() if q is p
            ]
        assert used > 10


@pytest.mark.parametrize(
    "batch,kernel,dilation,channels_last,bias",
    [(1, 3, (1, 1), True, True), (3, 3, (2, 8), True, True), (2, 3, (1, 4), False, False), (2, 1, (1, 1), True, True)],
)
def test_weight_gradient_by_products_equals_the_library(batch, kernel, dilation, channels_last, bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 8, 6 + 2 * dilation[0], 10 + 2 * dilation[1], generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(12, 8, kernel, kernel, generator=generator)
    b = torch.randn(12, generator=generator) if bias else None
    inputs = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    reference = F.conv2d(x, weight, b, dilation=dilation)
    ours = cast(torch.Tensor, DilatedConv2d.apply(x, weight, b, dilation))
    assert torch.equal(ours, reference)
    grad = torch.randn(reference.shape, generator=generator)
    for expected, got in zip(
        torch.autograd.grad(reference, inputs, grad), torch.autograd.grad(ours, inputs, grad), strict=True
    ):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_wide_fp32_training_on_a_cpu_takes_the_weight_gradient_by_products_and_autocast_does_not():
    wide = HeightCausalConv2d(PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS, 8, 3, (1, 2))
    x = torch.randn(1, PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS, 4, 8)
    assert "DilatedConv2d" in wide(x).grad_fn.name()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "DilatedConv2d" not in wide(x).grad_fn.name()
    with torch.no_grad():
        assert wide(x).grad_fn is None
    narrow = HeightCausalConv2d(PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS // 2, 8, 3, (1, 2))
    assert "DilatedConv2d" not in narrow(x[:, : PRODUCT_WEIGHT_GRADIENT_MIN_CHANNELS // 2]).grad_fn.name()


def test_estimator_is_causal_along_height():
    torch.manual_seed(0)
    net = WaveNet2D(res_channels=8, cin_channels=80, n_layer=4, n_layer_per_cycle=2).eval()
    x, c = torch.randn(1, 1, 8, 10), torch.randn(1, 80, 8, 10)
    cond, biases, projection = net.condition(c), net.gate_biases(None), (torch.randn(2, 8), torch.randn(2))
    out = net(x, cond, biases, None, *projection)
    for h in range(8):
        changed = x.clone()
        changed[:, :, h:] += torch.randn_like(changed[:, :, h:])
        new = net(changed, cond, biases, None, *projection)
        assert torch.equal(new[:, :, :h], out[:, :, :h]), f"rows < {h} saw rows >= {h}"
        assert not torch.allclose(new[:, :, h], out[:, :, h])  # row h does see row h


def test_dilations_follow_the_original_cycle():
    net = WaveNet2D(res_channels=4, cin_channels=80, n_layer=5, n_layer_per_cycle=3)
    dilations = [block.filter_gate_conv.conv.dilation for block in net.res_blocks]
    assert dilations == [(1, 1), (2, 2), (4, 4), (1, 8), (2, 16)]
    assert [block.filter_gate_conv.pad_top for block in net.res_blocks] == [2, 4, 8, 2, 4]


def test_coupling_row_depends_only_on_rows_above():
    model = random_model(tiny_config("nanoflow", n_height=8, bipartize=True))
    x, c = torch.randn(1, 1, 8, 12), torch.randn(1, 80, 8, 12)
    with torch.no_grad():
        for flow in range(model.config.n_flow):
            log_s, t = model.coupling_params(flow, x, c)
            for h in range(1, 8):
                changed = x.clone()
                changed[:, :, h:] += 1.0
                new_log_s, new_t = model.coupling_params(flow, changed, c)
                assert torch.equal(new_log_s[:, :, : h + 1], log_s[:, :, : h + 1])
                assert torch.equal(new_t[:, :, : h + 1], t[:, :, : h + 1])
                if h < 7:
                    assert not torch.allclose(new_t[:, :, h + 1], t[:, :, h + 1])


def test_bipartized_permutation_flips_halves_in_the_second_half_of_flows():
    model = build_model(tiny_config("waveflow", n_flow=4, n_height=8, bipartize=True))
    rows = torch.arange(8).view(1, 1, 8, 1)
    assert model.permute(0, rows).flatten().tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert model.permute(1, rows).flatten().tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert model.permute(2, rows).flatten().tolist() == [3, 2, 1, 0, 7, 6, 5, 4]
    assert model.permute(3, rows).flatten().tolist() == [3, 2, 1, 0, 7, 6, 5, 4]
    plain = build_model(tiny_config("waveflow", n_flow=4, n_height=8))
    assert plain.permute(3, rows).flatten().tolist() == [7, 6, 5, 4, 3, 2, 1, 0]


def test_sampling_uses_sigma_and_generator():
    model = random_model(tiny_config("nanoflow"))
    mel = torch.randn(1, 80, 6)
    first = model.infer(mel, sigma=0.5, generator=torch.Generator().manual_seed(3))
    second = model.infer(mel, sigma=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    z = torch.randn(1, 1, 16, 256 * 3 // 16, generator=torch.Generator().manual_seed(3)) * 0.5
    assert torch.allclose(first, model.infer(mel, z=z), atol=1e-6)
    with pytest.raises(ValueError, match="z must have shape"):
        model.infer(mel, z=torch.randn(1, 1, 16, 5))
    z[0, 0, 3, 7] = float("nan")
    with pytest.raises(ValueError, match="z holds NaN or infinite values"):
        model.infer(mel, z=z)


# ----------------------------------------------------------------------------- weight norm


@pytest.mark.parametrize("variant", VARIANTS)
def test_remove_weight_norm_keeps_the_model_usable(variant):
    model = random_model(tiny_config(variant, **weight_normed_embedding(variant)))
    mel, z = torch.randn(1, 80, 6), torch.randn(1, 1, 16, 48)
    audio = model.infer(mel, z=z)
    with torch.no_grad():
        z_normed, logdet_normed = model(audio, mel)
    state = model.state_dict()
    assert model.remove_weight_norm() is model
    assert not any(k.endswith("weight_g") for k in model.state_dict())
    assert torch.allclose(model.infer(mel, z=z), audio, atol=1e-5)
    with torch.no_grad():
        z_folded, logdet_folded = model(audio, mel)
    assert torch.allclose(z_folded, z_normed, atol=1e-5)
    assert torch.allclose(logdet_folded, logdet_normed, atol=1e-4)
    # A weight-normed checkpoint loads strictly into the folded model, and the other way round.
    model.load_state_dict(state)
    assert torch.allclose(model.infer(mel, z=z), audio, atol=1e-5)
    fresh = build_model(tiny_config(variant, **weight_normed_embedding(variant)))
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(fresh.eval().infer(mel, z=z), audio, atol=1e-5)


def test_weight_normed_embedding_uses_the_original_names():
    model = build_model(tiny_config("nanoflow", use_weightnorm_embed="True", n_flow=5, size_flow_embed=6))
    state = model.state_dict()
    assert state["flow_embedding.weight_g"].shape == (5, 1)
    assert state["flow_embedding.weight_v"].shape == (5, 6)
    assert "flow_embedding.weight" not in state


# ----------------------------------------------------------------------------- precision and memory


def test_autocast_keeps_logdet_and_loss_in_fp32():
    model = random_model(tiny_config("nanoflow"))
    audio, mel = torch.randn(2, 512).clamp(-1, 1), torch.randn(2, 80, 3)
    with torch.no_grad():
        z_ref, logdet_ref = model(audio, mel)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, logdet = model(audio, mel)
            loss = negative_log_likelihood(z, logdet)
    assert logdet.dtype == torch.float32 and z.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.allclose(logdet, logdet_ref, rtol=0.05, atol=1.0)


def test_half_precision_inference_runs_and_is_close():
    model = random_model(tiny_config("nanoflow"))
    mel, z = torch.randn(1, 80, 6), torch.randn(1, 1, 16, 48)
    reference = model.infer(mel, z=z)
    audio = model.to(torch.bfloat16).infer(mel, z=z)
    assert audio.dtype == torch.float32
    assert (audio - reference).abs().max() < 0.2


def poison_uninitialised_memory(monkeypatch) -> None:
    """Fill every floating-point tensor that `Tensor.new_empty` and `torch.empty_like` hand out with NaN,
    for the rest of the test: what freed memory may hold."""
    new_empty, empty_like = torch.Tensor.new_empty, torch.empty_like

    def poisoned(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poisoned(new_empty(self, *a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_synthesis_never_reads_memory_it_did_not_write(monkeypatch, dtype, batch):
    """Memory a synthesis takes uninitialised may hold anything, NaN included (a process's freed
    memory does): the audio must not change when it does. bf16 matrix kernels read the alignment
    padding of a row past its last column, so padding must be written (zeros) too."""
    model = random_model(tiny_config("nanoflow")).to(dtype)
    mel, z = torch.randn(batch, 80, 6), torch.randn(batch, 1, 16, 48)
    expected = model.infer(mel, z=z)
    poison_uninitialised_memory(monkeypatch)
    audio = model.infer(mel, z=z)
    assert torch.isfinite(expected).all()
    assert torch.equal(audio, expected)


def memories_made(monkeypatch) -> list[inference.RowMemory]:
    """-> every `RowMemory` synthesis makes from now on, in order."""
    made = []
    make = inference.RowMemory.__init__

    def spy(memory, *args, **kwargs):
        make(memory, *args, **kwargs)
        made.append(memory)

    monkeypatch.setattr(inference.RowMemory, "__init__", spy)
    return made


def with_mel_in_queue(monkeypatch, in_queue: bool) -> list[inference.RowMemory]:
    """Synthesis with the mel rows in the queues (`inference.conditioning_in_queue`) or projected apart,
    whatever the dtype: -> the `RowMemory`s it then makes (`memories_made`)."""
    monkeypatch.setattr(inference, "conditioning_in_queue", lambda c, cache_fits=True: in_queue)
    return memories_made(monkeypatch)


@pytest.mark.parametrize("batch,frames", [(1, 4), (2, 6), (1, 9)])
@pytest.mark.parametrize("variant,layers_per_cycle", [("nanoflow", 1), ("nanoflow", 3), ("waveflow", 2)])
def test_the_mel_in_the_queue_gives_the_audio_of_its_projection_apart(
    monkeypatch, batch, frames, variant, layers_per_cycle
):
    """The mel row held in every queue row and projected by the centre tap's product (`BlockQueue`) adds
    the conditioning that the projection built apart (`condition_rows`) adds: the same audio to rounding
    in fp32 and in float64."""
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = random_model(tiny_config(variant, n_layer_per_cycle=layers_per_cycle, n_layer=4)).to(dtype)
        mel = torch.randn(batch, 80, frames, dtype=dtype)
        z = torch.randn(batch, 1, 16, (frames - SYNTHESIS_TRIM_FRAMES) * 256 // 16, dtype=dtype)
        audio = {}
        for in_queue in (False, True):
            with monkeypatch.context() as patch:
                made = with_mel_in_queue(patch, in_queue)
                audio[in_queue] = model.infer(mel, z=z)
            assert [memory.mel_channels for memory in made] == [80 if in_queue else 0]
        assert torch.isfinite(audio[False]).all()
        assert torch.allclose(audio[True], audio[False], atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype,in_queue", [(torch.bfloat16, True), (torch.float32, False)])
def test_bf16_synthesis_on_a_cpu_holds_the_mel_in_its_queues(monkeypatch, dtype, in_queue):
    """No conditioning cache in bf16 on a CPU (900 MB of 1.1 GB at 10 s of audio); fp32, slower with the
    mel in its queues, keeps it within its budget, and past it holds the mel in its queues too (faster on a
    CPU than each row projected when it is needed)."""
    made = memories_made(monkeypatch)
    model = random_model(tiny_config("nanoflow")).to(dtype)
    mel, z = torch.randn(1, 80, 6, dtype=dtype), torch.randn(1, 1, 16, 48)
    audio = model.infer(mel, z=z)
    past_budget = model.infer(mel, z=z, condition_cache_bytes=0)
    assert [memory.mel_channels for memory in made] == [80 if in_queue else 0, 80]
    if in_queue:
        assert torch.equal(past_budget, audio)
    else:
        assert torch.allclose(past_budget, audio, atol=1e-5, rtol=0)


@pytest.mark.parametrize("in_queue", [False, True])
@pytest.mark.parametrize("batch,layers_per_cycle", [(1, 1), (2, 1), (1, 3)])
def test_the_first_rows_of_a_flow_read_only_rows_written(monkeypatch, batch, layers_per_cycle, in_queue):
    """The first two rows of each phase of a queue (row r, dilation dh: r < 2 dh) have the conv's zero
    padding for their earlier rows, and their products skip it (`inference.BlockQueue`): with the queues
    filled with NaN where no row has been written yet, the audio is the same (with the mel in the queues,
    each row's is written before its product). In fp32: oneDNN's bf16 products may read a row's other
    columns, times nothing (at 16 channels all of a queue row's 64, a NaN anywhere in it giving NaN); the
    queues hold zeros there when `take` has emptied them."""
    model = random_model(tiny_config("nanoflow", n_layer_per_cycle=layers_per_cycle))
    mel, z = torch.randn(batch, 80, 6), torch.randn(batch, 1, 16, 48)
    with_mel_in_queue(monkeypatch, in_queue)
    expected = model.infer(mel, z=z)

    def take_poisoned(memory: inference.RowMemory) -> inference.RowMemory:
        for queue in memory.queues:
            queue[..., :-1].fill_(float("nan"))  # every row a flow reads is written before it is read
        return memory

    monkeypatch.setattr(inference.RowMemory, "take", take_poisoned)
    audio = model.infer(mel, z=z)
    assert torch.isfinite(expected).all()
    assert torch.equal(audio, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    audio, mel = torch.randn(2, 512), torch.randn(2, 80, 3)
    gradients = []
    for enabled in (False, True):
        model = random_model(tiny_config("nanoflow", gradient_checkpointing=enabled)).train()
        loss = negative_log_likelihood(*model(audio, mel))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        gradients.append(torch.cat([cast(torch.Tensor, p.grad).flatten() for p in model.parameters()]))
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"coupling_type": "nanoflow_fancy"},
            r"coupling_type must be one of waveflow, nanoflow_naive, nanoflow_decomp, nanoflow",
        ),
        ({"n_layer": "8"}, r"waveflow_config\.n_layer must be an integer"),
        ({"res_channel": 16}, r"unknown key 'res_channel'; did you mean 'res_channels'"),
        ({"use_weightnorm_embed": "yes"}, r"waveflow_config\.use_weightnorm_embed must be a boolean"),
        ({"n_height": 0}, r"waveflow_config\.n_height must be at least"),
        ({"size_flow_embed": 0}, r"size_flow_embed must be a positive integer"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(change, message):
    config = tiny_config("nanoflow")
    config.update(change)
    with pytest.raises(ValueError, match=message):
        build_model(config)


@pytest.mark.parametrize("coupling_type", ["waveflow", "nanoflow_naive", "nanoflow_decomp"])
@pytest.mark.parametrize("key,value,shown", [("size_flow_embed", 512, "512"), ("use_weightnorm_embed", "True", "True")])
def test_a_flow_embedding_key_outside_nanoflow_is_named_as_ignored(capsys, coupling_type, key, value, shown):
    """The original took them for every coupling type; they build nothing outside nanoflow: a one-line
    warning naming the key, and the model of the config without it."""
    model = build_model(tiny_config(coupling_type, **{key: value}))
    assert capsys.readouterr().err == (
        f"warning: waveflow_config.{key} ({shown}) is ignored: only coupling_type 'nanoflow' has a flow "
        f"embedding, this config's is '{coupling_type}'\n"
    )
    expected = build_model(tiny_config(coupling_type))
    assert model.state_dict().keys() == expected.state_dict().keys()


def test_nanoflow_and_the_defaults_warn_of_nothing(capsys):
    build_model(tiny_config("nanoflow", use_weightnorm_embed="True"))
    build_model(tiny_config("waveflow", size_flow_embed=0, use_weightnorm_embed="False"))
    assert capsys.readouterr().err == ""


def test_missing_key_is_named():
    config = tiny_config("waveflow")
    del config["n_flow"]
    with pytest.raises(ConfigError, match="missing required key 'n_flow'"):
        build_model(config)


def test_string_booleans_of_the_original_configs_are_accepted():
    model = build_model(tiny_config("nanoflow", use_weightnorm_embed="False", bipartize="True"))
    assert model.config.use_weightnorm_embed is False and model.config.bipartize is True


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_synthesis_under_a_callers_autocast_runs_in_the_models_dtype(model_dtype, autocast_dtype):
    """A TTS service may call infer inside its own autocast: the model's dtype still sets the precision
    (the conditioning's projection in bf16 beside fp32 queues failed with a dtype error). Streaming too."""
    model = random_model(tiny_config("nanoflow")).remove_weight_norm().to(model_dtype)
    mel, z = torch.randn(2, 80, 6), torch.randn(2, 1, 16, 48)
    expected = model.infer(mel, z=z)
    with torch.autocast("cpu", dtype=autocast_dtype):
        audio = model.infer(mel, z=z)
        streamed = torch.cat(list(stream(model, mel.split(2, dim=2), 1, 3, 3, seed=4)), dim=1)
    assert torch.equal(audio, expected)
    assert torch.equal(streamed, torch.cat(list(stream(model, mel.split(2, dim=2), 1, 3, 3, seed=4)), dim=1))


def test_the_mel_upsampler_computes_in_fp32_whatever_the_dtype_or_autocast():
    """Its transposed convs have one channel: a CPU's bf16 one ran 5-7x slower than fp32 (docs/speed.md).
    Under autocast it gives the fp32 result; a bf16 model's is fp32 arithmetic on its bf16 weights,
    rounded to bf16 after each layer."""
    model = random_model(tiny_config("nanoflow")).remove_weight_norm()
    torch.manual_seed(1)
    mel = torch.randn(2, 80, 7)
    reference = model.upsample(mel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.upsample(mel)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, reference)

    model = model.to(torch.bfloat16)
    x = mel.to(torch.bfloat16).unsqueeze(1)
    expected = x
    for layer in model.upsample_conv:
        if isinstance(layer, torch.nn.ConvTranspose2d):
            expected = F.conv_transpose2d(
                expected.float(),
                layer.weight.float(),
                cast(torch.Tensor, layer.bias).float(),
                layer.stride,
                cast(tuple[int, int], layer.padding),
                layer.output_padding,
            ).to(torch.bfloat16)
        else:
            expected = layer(expected)
    upsampled = model.upsample(mel.to(torch.bfloat16))
    assert upsampled.dtype == torch.bfloat16
    assert torch.equal(upsampled, expected.squeeze(1))
