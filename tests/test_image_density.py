"""Tests of image_density_experiments/: Glow and the NanoFlow variants on CIFAR-10-format data.

The reference (`fixtures/image_density_state_dicts.json`) is the original code's tensor
names, shapes and parameter counts, copied from the project's reference material.
"""

import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tarfile
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import scipy.io
import torch

IMAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "image_density_experiments")
# Appended, not prepended: the vocoder at the root has its own train.py.
if IMAGE_DIR not in sys.path:
    sys.path.append(IMAGE_DIR)

from glow_model import MODEL_TYPES, Glow  # noqa: E402
from image_datasets import DatasetNotFoundError, download, get_datasets, random_translate  # noqa: E402

ROOT = os.path.dirname(IMAGE_DIR)
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "image_density_state_dicts.json")
# The original README's commands (all --hidden_channels 256) and their parameter counts.
README_COMMANDS = [
    ("glow", 32, 1, 15_972_912),
    ("glow_large", 32, 1, 287_488_560),
    ("nanoflow_naive", 32, 1, 9_263_064),
    ("nanoflow_decomp", 32, 1, 9_934_896),
    ("nanoflow", 32, 1, 10_113_264),
    ("nanoflow", 48, 3, 10_718_544),
]
TINY: dict[str, Any] = dict(hidden_channels=8, K=2, L=2, flow_embed_dim=2)
CLI_TINY = ["--hidden_channels", "8", "--K", "2", "--L", "2", "--flow_embed_dim", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy machine, where idle
    worker threads spin; restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(model_type: str, image_shape=(8, 8, 3), **options) -> Glow:
    return Glow(image_shape, model_type=model_type, **{**TINY, **options})


def initialise(model: Glow, image_shape=(8, 8, 3)) -> Glow:
    """ActNorm's data-dependent init, then every parameter perturbed, so that the
    zero-initialised layers (which make couplings start near the identity) are not zero."""
    height, width, channels = image_shape
    model.train()
    with torch.no_grad():
        y_onehot = torch.eye(10, dtype=model.prior_h.dtype)[torch.arange(16) % 10] if model.y_condition else None
        model(torch.rand(16, channels, height, width, dtype=model.prior_h.dtype) - 0.5, y_onehot)
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("model_type, K, flow_embed_dim, expected", README_COMMANDS)
def test_parameter_counts_of_the_readme_commands(model_type, K, flow_embed_dim, expected):
    # On the meta device: the real classes, without allocating glow_large's 1.1 GB.
    with torch.device("meta"):
        model = Glow((32, 32, 3), 256, K, 3, model_type=model_type, flow_embed_dim=flow_embed_dim)
    assert model.num_parameters() == expected


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_state_dict_matches_the_original_layout(model_type):
    with open(REFERENCE) as file:
        reference = json.load(file)
    config = reference["small_config"]
    model = Glow(
        tuple(config["image_shape"]),
        config["hidden_channels"],
        config["K"],
        config["L"],
        flow_permutation=config["flow_permutation"],
        flow_coupling=config["flow_coupling"],
        LU_decomposed=config["LU_decomposed"],
        y_classes=config["y_classes"],
        learn_top=config["learn_top"],
        y_condition=config["y_condition"],
        model_type=model_type,
        flow_embed_dim=config["flow_embed_dim"],
    )
    expected = reference["models"][model_type]
    assert [[name, list(tensor.shape)] for name, tensor in model.state_dict().items()] == expected["state_dict"]
    assert model.num_parameters() == expected["trainable_parameters"]


@pytest.mark.parametrize(
    "model_type, options",
    [(model_type, {}) for model_type in MODEL_TYPES]
    + [
        ("glow", dict(flow_coupling="additive", flow_permutation="shuffle")),
        ("nanoflow", dict(flow_coupling="additive", flow_permutation="reverse", LU_decomposed=False)),
        ("glow", dict(y_condition=True, learn_top=False)),
    ],
)
def test_inverse_of_forward_is_the_identity(model_type, options):
    torch.manual_seed(0)
    model = initialise(tiny_model(model_type, **options))
    x = torch.rand(4, 3, 8, 8) - 0.5
    with torch.no_grad():
        flow = model.flow(x)
        reconstruction = model.inverse(flow.z, flow.split_latents)
    assert flow.z.shape == (4, 24, 2, 2) and torch.isfinite(flow.logdet).all()
    assert not torch.allclose(flow.z.flatten(), x.flatten()[: flow.z.numel()])
    torch.testing.assert_close(reconstruction, x, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "model_type, options",
    [(model_type, {}) for model_type in MODEL_TYPES] + [("glow", dict(flow_coupling="additive", LU_decomposed=False))],
)
def test_logdet_matches_a_brute_force_jacobian(model_type, options):
    torch.manual_seed(0)
    model = initialise(tiny_model(model_type, **options).double())
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64) - 0.5

    def all_latents(x_flat: torch.Tensor) -> torch.Tensor:
        flow = model.flow(x_flat.view(1, 3, 8, 8))
        return torch.cat([flow.z.flatten()] + [latent.flatten() for latent in flow.split_latents])

    jacobian = torch.autograd.functional.jacobian(all_latents, x.flatten(), vectorize=True)  # [192, 192]
    with torch.no_grad():
        logdet = model.flow(x).logdet
    assert torch.isfinite(logdet).all()
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jacobian)[1].view(1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_bits_per_dim_decreases_when_training_on_a_fixed_batch(model_type):
    torch.manual_seed(0)
    model = tiny_model(model_type)
    x = (torch.randint(0, 256, (16, 3, 8, 8)) // 64 * 64).float() / 256 - 0.5  # few colours: easy to learn
    model.train()
    with torch.no_grad():
        model(x)
    optimizer = torch.optim.Adamax(model.parameters(), lr=5e-3)

    def bits_per_dim() -> float:
        torch.manual_seed(1)  # the same dequantisation noise each time
        with torch.no_grad():
            return model(x)[1].mean().item()

    before = bits_per_dim()
    for _ in range(15):
        optimizer.zero_grad()
        model(x)[1].mean().backward()
        optimizer.step()
    after = bits_per_dim()
    assert math.isfinite(before) and after < before - 0.1


def test_sampling_is_finite_and_temperature_scales_the_noise():
    torch.manual_seed(0)
    model = initialise(tiny_model("nanoflow"))
    samples = model.sample(5, temperature=1.0)
    assert samples.shape == (5, 3, 8, 8) and torch.isfinite(samples).all()
    # At temperature 0 every latent is its prior's mean: sampling becomes deterministic.
    torch.testing.assert_close(model.sample(3, temperature=0.0), model.sample(3, temperature=0.0))
    assert not torch.allclose(model.sample(3, temperature=1.0), model.sample(3, temperature=1.0))


def write_fake_cifar10(folder: str, images_per_batch: int, as_archive: bool) -> None:
    """A CIFAR-10 in the real format: pickled dicts of uint8 [N, 3072] data and labels."""
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # Smooth images (a random colour per quadrant) so that there is something to learn.
        quadrants = rng.integers(0, 256, (images_per_batch, 3, 2, 2), dtype=np.uint8)
        data = quadrants.repeat(16, axis=2).repeat(16, axis=3).reshape(images_per_batch, 3072)
        labels = rng.integers(0, 10, images_per_batch).tolist()
        batches[name] = pickle.dumps({b"data": data, b"labels": labels})
    os.makedirs(folder, exist_ok=True)
    if as_archive:
        with tarfile.open(os.path.join(folder, "cifar-10-python.tar.gz"), "w:gz") as tar:
            for name, payload in batches.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        os.makedirs(os.path.join(folder, "cifar-10-batches-py"))
        for name, payload in batches.items():
            with open(os.path.join(folder, "cifar-10-batches-py", name), "wb") as file:
                file.write(payload)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> str:
    """A dataroot holding a fake archive where the original kept CIFAR-10 (data/CIFAR10/)."""
    root = str(tmp_path_factory.mktemp("dataroot"))
    write_fake_cifar10(os.path.join(root, "data", "CIFAR10"), images_per_batch=16, as_archive=True)
    return root


def printed(pattern: str, output: str) -> str:
    """The first group of `pattern` in a command's `output`."""
    match = re.search(pattern, output)
    assert match, f"{pattern!r} not in the output:\n{output}"
    return match.group(1)


def run_train(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # see `one_thread`
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=IMAGE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def train_command(cifar_root: str, output_dir: str, model_type: str) -> list[str]:
    return [
        "--dataroot", cifar_root, "--output_dir", output_dir, "--model_type", model_type, *CLI_TINY,
        "--batch_size", "8", "--eval_batch_size", "16", "--subset", "32", "--n_init_batches", "2",
        "--n_workers", "0", "--epochs", "1", "--no_cuda",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_command_line_trains_each_model_type(model_type, cifar_root, tmp_path):
    output_dir = str(tmp_path / "run")
    result = run_train(*train_command(cifar_root, output_dir, model_type))
    assert result.returncode == 0, result.stderr
    num_param = int(printed(r"num_param: (\d+)", result.stdout))
    assert num_param == Glow((32, 32, 3), model_type=model_type, **TINY).num_parameters()
    bits_per_dim = float(printed(r"bits/dim: ([\d.eE+-]+|nan|inf)", result.stdout))
    assert math.isfinite(bits_per_dim) and 0 < bits_per_dim < 9
    state_dict = torch.load(os.path.join(output_dir, "glow_model_1.pth"))
    Glow((32, 32, 3), model_type=model_type, **TINY).load_state_dict(state_dict)  # strict: same layout
    assert "state" in torch.load(os.path.join(output_dir, "glow_optimizer_1.pth"))
    samples = matplotlib.image.imread(os.path.join(output_dir, "samples_1.png"))
    assert samples.shape[:2] == (8 * 32, 8 * 32) and samples.std() > 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(output_dir))


@pytest.mark.slow
def test_command_line_resumes_and_refuses_to_clobber(cifar_root, tmp_path):
    first = str(tmp_path / "first")
    assert run_train(*train_command(cifar_root, first, "glow")).returncode == 0

    clobber = run_train(*train_command(cifar_root, first, "glow"))
    assert clobber.returncode != 0 and "--fresh" in clobber.stderr and "Traceback" not in clobber.stderr

    resumed_dir = str(tmp_path / "resumed")
    resumed = run_train(
        *train_command(cifar_root, resumed_dir, "glow"),
        "--epochs", "2",
        "--saved_model", os.path.join(first, "glow_model_1.pth"),
        "--saved_optimizer", os.path.join(first, "glow_optimizer_1.pth"),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "Epoch 2 " in resumed.stdout and "Epoch 1 " not in resumed.stdout
    assert os.listdir(resumed_dir).count("glow_model_2.pth") == 1


def test_missing_dataset_is_a_one_line_error(tmp_path):
    result = run_train("--dataroot", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--n_workers", "0")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert os.path.join(str(tmp_path), "data", "CIFAR10") in result.stderr and "--download" in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_cifar10_folder_layout_and_preprocessing(tmp_path):
    write_fake_cifar10(str(tmp_path), images_per_batch=4, as_archive=False)
    image_shape, num_classes, train, test = get_datasets("cifar10", str(tmp_path), False, download_missing=False)
    assert (image_shape, num_classes, len(train), len(test)) == ((32, 32, 3), 10, 20, 4)
    x, label = train[0]
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    expected = torch.from_numpy(batch[b"data"][0].reshape(3, 32, 32)).float() / 256 - 0.5
    assert torch.equal(x, expected) and label == batch[b"labels"][0]


def test_svhn_labels_and_layout(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)  # [H, W, C, N]
    for split in ("train", "test"):
        os.makedirs(tmp_path / "data" / "SVHN", exist_ok=True)
        labels = np.array([[10], [1], [9]])  # [N, 1]
        scipy.io.savemat(tmp_path / "data" / "SVHN" / f"{split}_32x32.mat", {"X": images, "y": labels})
    _, _, train, _ = get_datasets("svhn", str(tmp_path), augment=False, download_missing=False)
    assert [train[i][1] for i in range(3)] == [0, 1, 9]
    assert torch.equal(train[2][0], torch.from_numpy(images[..., 2]).permute(2, 0, 1).float() / 256 - 0.5)


def test_augmentation_translates_by_at_most_ten_percent():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, 16, 16] = 255
    shifts = set()
    for _ in range(200):
        moved = random_translate(image, 0.1)
        ys, xs = torch.nonzero(moved[0], as_tuple=True)
        assert moved.shape == image.shape and len(ys) == 1
        shifts.add((int(ys[0]) - 16, int(xs[0]) - 16))
    assert max(max(abs(dy), abs(dx)) for dy, dx in shifts) == 3 and len(shifts) > 20


def test_download_verifies_the_checksum(tmp_path):
    source = tmp_path / "archive.bin"
    source.write_bytes(b"not really cifar")
    target = str(tmp_path / "data" / "archive.bin")
    with pytest.raises(DatasetNotFoundError, match="MD5"):
        download(source.as_uri(), target, "0" * 32)
    assert not os.path.exists(target)
    download(source.as_uri(), target, hashlib.md5(b"not really cifar").hexdigest())
    with open(target, "rb") as file:
        assert file.read() == b"not really cifar"


def image_train_module():
    """image_density_experiments/train.py under another name than the vocoder's train.py."""
    spec = importlib.util.spec_from_file_location("image_density_train", os.path.join(IMAGE_DIR, "train.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(argv: list[str]) -> str:
    """The one `error:` line that `main(argv)` ends with (Python prints it to stderr and exits with 1)."""
    with pytest.raises(SystemExit) as stopped:
        image_train_module().main(argv)
    message = stopped.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "0"], "error: --batch_size must be >= 1, got 0"),
        (["--batch_size", "-1"], "error: --batch_size must be >= 1, got -1"),
        (["--eval_batch_size", "0"], "error: --eval_batch_size must be >= 1, got 0"),
        (["--n_workers", "-1"], "error: --n_workers must be >= 0, got -1"),
        (["--hidden_channels", "0"], "error: --hidden_channels must be >= 1, got 0"),
        (["--n_init_batches", "0"], "error: --n_init_batches must be >= 1, got 0"),
        (["--K", "0"], "error: --K must be >= 1, got 0"),
        (["--L", "0"], "error: --L must be >= 1, got 0"),
        (["--L", "6"], "error: --L 6: each level halves the side of the 32 x 32 images, which allow at most 5 levels"),
        (["--subset", "-1"], "error: --subset must be >= 0, got -1"),
        (["--flow_embed_dim", "-1"], "error: --flow_embed_dim must be >= 0, got -1"),
        (["--lr", "0"], "error: --lr must be positive, got 0"),
        (["--lr", "-0.001"], "error: --lr must be positive, got -0.001"),
        (["--warmup", "-1"], "error: --warmup must be >= 0, got -1"),
        (["--actnorm_scale", "0"], "error: --actnorm_scale must be positive, got 0"),
        (["--saved_optimizer", "glow_optimizer_1.pth"], "error: --saved_optimizer goes with --saved_model"),
    ],
)
def test_a_flag_out_of_range_is_refused_in_one_line_before_anything_is_written(flags, message, cifar_root, tmp_path):
    output_dir = tmp_path / "run"
    common = ["--dataroot", cifar_root, "--output_dir", str(output_dir), "--no_cuda", "--subset", "32"]
    assert refused([*common, *flags]).startswith(message)
    assert not output_dir.exists()


def saved_state(path, module: torch.nn.Module | torch.optim.Optimizer) -> str:
    torch.save(module.state_dict(), path)
    return str(path)


def adamax_after_one_step(model: Glow) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adamax(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    return optimizer


def test_a_checkpoint_of_another_model_or_no_checkpoint_is_refused_before_the_output_folder(cifar_root, tmp_path):
    glow = Glow((32, 32, 3), model_type="glow", **TINY)
    nanoflow = saved_state(tmp_path / "glow_model_1.pth", Glow((32, 32, 3), model_type="nanoflow", **TINY))
    wider = Glow((32, 32, 3), model_type="glow", **{**TINY, "hidden_channels": 16})
    wider_model = saved_state(tmp_path / "wider_model_1.pth", wider)
    wider_optimizer = saved_state(tmp_path / "wider_optimizer_1.pth", adamax_after_one_step(wider))
    glow_model = saved_state(tmp_path / "glow_model_2.pth", glow)
    vocoder = os.path.join(ROOT, "tests", "fixtures", "waveflow-small.pt")
    wav = os.path.join(ROOT, "data", "demo", "wavs", "demo_001.wav")
    output_dir = tmp_path / "run"
    common = ["--dataroot", cifar_root, "--output_dir", str(output_dir), *CLI_TINY, "--batch_size", "8"]
    common += ["--subset", "32", "--n_workers", "0", "--no_cuda"]
    another = "not a checkpoint of the model these flags describe"
    cases = [
        (["--saved_model", nanoflow], f"error: {nanoflow}: {another}", "unexpected (flow.layers.1.multgate"),
        (["--saved_model", wider_model], f"error: {wider_model}: {another}", "of another shape"),
        (["--saved_model", vocoder], f"error: {vocoder}: {another}", "unexpected (name, waveflow_config"),
        (["--saved_model", wav], f"error: {wav}: not a checkpoint written by torch.save", ""),
        (
            ["--saved_model", glow_model, "--saved_optimizer", glow_model],
            f"error: {glow_model}: not the optimizer state of {glow_model}'s model",
            "",
        ),
        (
            ["--saved_model", glow_model, "--saved_optimizer", wider_optimizer],
            f"error: {wider_optimizer}: not the optimizer state of {glow_model}'s model",
            "a state of shape",
        ),
    ]
    for flags, start, detail in cases:
        message = refused([*common, *flags])
        assert message.startswith(start) and detail in message, message
        assert not output_dir.exists()


def test_a_refused_checkpoint_ends_the_command_in_one_line_and_writes_nothing(cifar_root, tmp_path):
    output_dir = tmp_path / "run"
    wrong = saved_state(tmp_path / "glow_model_1.pth", Glow((32, 32, 3), model_type="nanoflow", **TINY))
    result = run_train(*train_command(cifar_root, str(output_dir), "glow"), "--saved_model", wrong)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {wrong}: not a checkpoint of") and result.stderr.count("\n") == 1
    assert not output_dir.exists()


def test_evaluate_prints_a_checkpoints_test_bits_per_dim_and_writes_nothing(cifar_root, tmp_path):
    model = initialise(Glow((32, 32, 3), model_type="nanoflow", **TINY), (32, 32, 3))
    checkpoint = saved_state(tmp_path / "glow_model_7.pth", model)
    output_dir = tmp_path / "run"
    flags = ["--dataroot", cifar_root, "--output_dir", str(output_dir), "--model_type", "nanoflow", *CLI_TINY]
    flags += ["--subset", "12", "--eval_batch_size", "8", "--n_workers", "0", "--no_cuda", "--seed", "3"]
    result = run_train(*flags, "--evaluate", "--saved_model", checkpoint)
    assert result.returncode == 0, result.stderr
    assert f"{checkpoint} (epoch 7), 12 test images: bits/dim: " in result.stdout
    printed_bits = float(printed(r"test images: bits/dim: ([\d.]+)", result.stdout))
    # The same in this process: the test set in order (batches of 8 and 4, each image counted once), the
    # dequantization noise drawn from --seed.
    _, _, _, test_set = get_datasets("cifar10", cifar_root, False, False, 12)
    torch.manual_seed(3)
    with torch.no_grad():
        bits = [model(x, None)[1] for x, _ in torch.utils.data.DataLoader(test_set, batch_size=8)]
    assert printed_bits == pytest.approx(torch.cat(bits).mean().item(), abs=2e-4)
    assert not output_dir.exists()
    # A checkpoint of another model is refused as when resuming; and flags that would write or train.
    glow = saved_state(tmp_path / "glow_model_1.pth", Glow((32, 32, 3), model_type="glow", **TINY))
    message = refused([*flags, "--evaluate", "--saved_model", glow])
    assert message.startswith(f"error: {glow}: not a checkpoint of the model these flags describe")
    assert refused([*flags, "--evaluate"]) == "error: --evaluate needs --saved_model, the checkpoint to evaluate"
    for extra in (["--fresh"], ["--saved_optimizer", checkpoint]):
        message = refused([*flags, "--evaluate", "--saved_model", checkpoint, *extra])
        assert message == f"error: --evaluate reads only the model and writes no --output_dir; leave out {extra[0]}"
    assert not output_dir.exists()
