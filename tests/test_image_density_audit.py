"""image_density_experiments/: damaged datasets, flags and checkpoints that the first tests did not cover."""

import hashlib
import os
import pathlib
import sys
from typing import cast

import numpy as np
import pytest
import scipy.io
import torch

from test_image_density import CLI_TINY, IMAGE_DIR, TINY, image_train_module, refused, saved_state, write_fake_cifar10

if IMAGE_DIR not in sys.path:  # appended, not prepended: the vocoder at the root has its own train.py
    sys.path.append(IMAGE_DIR)

import image_datasets
from glow_model import FlowStep, Glow
from glow_modules import ActNorm2d
from image_datasets import DatasetNotFoundError, load_cifar10, load_svhn


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("dataroot"))
    write_fake_cifar10(os.path.join(root, "data", "CIFAR10"), images_per_batch=16, as_archive=True)
    return root


def one_line_error(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message and all(part in message for part in parts), message


@pytest.mark.parametrize("as_archive", [False, True])
def test_a_missing_or_damaged_cifar10_batch_is_an_error_naming_it(tmp_path, as_archive):
    write_fake_cifar10(str(tmp_path), images_per_batch=2, as_archive=as_archive)
    if as_archive:
        archive = tmp_path / "cifar-10-python.tar.gz"
        archive.write_bytes(archive.read_bytes()[:200])  # a truncated download
        with pytest.raises(DatasetNotFoundError) as error:
            load_cifar10(str(tmp_path), download_missing=False)
        one_line_error(error, str(archive), "--download")
        archive.write_bytes(b"not a gzip file")
        with pytest.raises(DatasetNotFoundError) as error:
            load_cifar10(str(tmp_path), download_missing=False)
        one_line_error(error, str(archive), "not a readable archive")
    else:
        folder = tmp_path / "cifar-10-batches-py"
        (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
        with pytest.raises(DatasetNotFoundError) as error:
            load_cifar10(str(tmp_path), download_missing=False)
        one_line_error(error, str(folder), "test_batch")
        os.remove(folder / "data_batch_3")
        with pytest.raises(DatasetNotFoundError) as error:
            load_cifar10(str(tmp_path), download_missing=False)
        one_line_error(error, str(folder), "data_batch_3")


def test_a_failed_download_leaves_no_partial_file_nor_the_folders_made_for_it(tmp_path, monkeypatch):
    def interrupted(url, filename):
        pathlib.Path(filename).write_bytes(b"half an archive")
        raise OSError("connection reset")

    monkeypatch.setattr(image_datasets.urllib.request, "urlretrieve", interrupted)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("a user's file")
    with pytest.raises(DatasetNotFoundError, match="could not download .*connection reset"):
        load_cifar10(str(tmp_path / "root" / "data"), download_missing=True)
    assert sorted(os.listdir(tmp_path)) == ["kept"]  # root/data/ and what was under it: gone
    with pytest.raises(DatasetNotFoundError, match="could not download"):
        load_svhn(str(tmp_path / "kept"), download_missing=True)
    assert sorted(os.listdir(tmp_path / "kept")) == ["other.txt"]  # a folder that was there stays


def test_download_fetches_again_an_archive_with_a_wrong_checksum(tmp_path, monkeypatch):
    good = tmp_path / "good"
    write_fake_cifar10(str(good), images_per_batch=2, as_archive=True)
    payload = (good / "cifar-10-python.tar.gz").read_bytes()
    monkeypatch.setattr(image_datasets, "CIFAR10_URL", (good / "cifar-10-python.tar.gz").as_uri())
    monkeypatch.setattr(image_datasets, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    archive = tmp_path / "root" / "data" / "CIFAR10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(payload[: len(payload) // 2])  # an interrupted copy
    splits = load_cifar10(str(tmp_path / "root"), download_missing=True)
    assert len(splits["train"][0]) == 10 and archive.read_bytes() == payload


def write_svhn(folder: pathlib.Path, **mat) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        scipy.io.savemat(folder / f"{split}_32x32.mat", mat)


def test_a_damaged_svhn_file_is_an_error_naming_it(tmp_path):
    svhn = tmp_path / "data" / "SVHN"
    write_svhn(svhn, X=np.zeros((32, 32, 3, 2), np.uint8), y=np.array([[10], [3]]))
    (svhn / "train_32x32.mat").write_bytes(b"junk")
    with pytest.raises(DatasetNotFoundError) as error:
        load_svhn(str(tmp_path), download_missing=False)
    one_line_error(error, str(svhn / "train_32x32.mat"), "--download")
    write_svhn(svhn, images=np.zeros((32, 32, 3, 2), np.uint8))  # no X, no y
    with pytest.raises(DatasetNotFoundError) as error:
        load_svhn(str(tmp_path), download_missing=False)
    one_line_error(error, str(svhn / "train_32x32.mat"), "'X'")
    write_svhn(svhn, X=np.zeros((2, 3, 32, 32), np.uint8), y=np.array([[10], [3]]))  # [N, C, H, W]: not SVHN's
    with pytest.raises(DatasetNotFoundError) as error:
        load_svhn(str(tmp_path), download_missing=False)
    one_line_error(error, str(svhn / "train_32x32.mat"), "[32, 32, 3, N]")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
        (["--temperature", "nan"], "error: --temperature must be >= 0, got nan"),
        (["--temperature", "-1"], "error: --temperature must be >= 0, got -1"),
        (["--y_weight", "nan"], "error: --y_weight must be >= 0, got nan"),
        (["--max_grad_clip", "nan"], "error: --max_grad_clip must be >= 0, got nan"),
        (["--max_grad_norm", "-1"], "error: --max_grad_norm must be >= 0, got -1"),
    ],
)
def test_more_flags_out_of_range_are_refused_in_one_line(flags, message, cifar_root, tmp_path):
    output_dir = tmp_path / "run"
    common = ["--dataroot", cifar_root, "--output_dir", str(output_dir), *CLI_TINY, "--batch_size", "8"]
    common += ["--subset", "16", "--n_workers", "0", "--n_init_batches", "1", "--no_cuda", "--epochs", "1"]
    assert refused([*common, *flags]) == message
    assert not output_dir.exists()


def test_resuming_a_checkpoint_already_at_epochs_is_refused(cifar_root, tmp_path):
    checkpoint = saved_state(tmp_path / "glow_model_3.pth", Glow((32, 32, 3), model_type="glow", **TINY))
    output_dir = tmp_path / "run"
    common = ["--dataroot", cifar_root, "--output_dir", str(output_dir), *CLI_TINY, "--batch_size", "8"]
    common += ["--subset", "16", "--n_workers", "0", "--n_init_batches", "1", "--no_cuda"]
    message = refused([*common, "--epochs", "3", "--saved_model", checkpoint])
    assert message == f"error: --epochs 3: {checkpoint} is already at epoch 3; resume to a later --epochs"
    assert not output_dir.exists()


def test_fresh_refuses_to_delete_the_dataset_or_the_program(tmp_path):
    write_fake_cifar10(str(tmp_path / "data" / "CIFAR10"), images_per_batch=16, as_archive=True)
    common = [*CLI_TINY, "--batch_size", "8", "--subset", "16", "--n_workers", "0", "--no_cuda", "--epochs", "1"]
    message = refused(["--dataroot", str(tmp_path), "--output_dir", str(tmp_path / "data"), "--fresh", *common])
    archive = tmp_path / "data" / "CIFAR10" / "cifar-10-python.tar.gz"
    assert message == f"error: --fresh would delete {archive}, the dataset; give another --output_dir"
    assert archive.is_file()
    # The program's own folder, moved into tmp_path so that no version of this test can delete the real one.
    train = image_train_module()
    program = tmp_path / "program"
    program.mkdir()
    train.__file__ = str(program / "train.py")
    args = train.parse_args(["--dataroot", str(program / "no_data"), "--output_dir", str(tmp_path), "--fresh"])
    with pytest.raises(SystemExit) as stopped:
        train.check_fresh(args)
    assert str(stopped.value.code).startswith(f"error: --fresh would delete {program}, this program's folder")


def test_the_output_folder_is_checked_before_a_download(tmp_path, monkeypatch):
    """A download takes minutes (163 MB): --fresh would then delete a dataset fetched into --output_dir, and a
    non-empty --output_dir would be refused only after it."""
    monkeypatch.setattr(image_datasets.urllib.request, "urlretrieve", lambda *args: pytest.fail("downloaded"))
    common = [*CLI_TINY, "--batch_size", "8", "--subset", "16", "--n_workers", "0", "--no_cuda", "--download"]
    output_dir = tmp_path / "run"
    message = refused(["--dataroot", str(output_dir), "--output_dir", str(output_dir), "--fresh", *common])
    assert message.startswith(f"error: --fresh would delete {output_dir / 'data' / 'CIFAR10'}")
    output_dir.mkdir()
    (output_dir / "earlier.txt").write_text("a run")
    message = refused(["--dataroot", str(tmp_path / "data"), "--output_dir", str(output_dir), *common])
    assert message == f"error: {output_dir} is not empty; give a new or empty --output_dir, or --fresh"


@pytest.mark.parametrize("case", ["file", "under_a_file", "link", "empty"])
def test_an_output_folder_that_cannot_be_one_is_refused_in_one_line(case, cifar_root, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "glow_model_1.pth").write_text("a run's")
    os.symlink(tmp_path / "run", tmp_path / "link")
    output_dir, expected = {
        "file": (tmp_path / "afile", f"error: --output_dir {tmp_path / 'afile'} is a file, not a folder"),
        "under_a_file": (tmp_path / "afile" / "sub", f"error: --output_dir {tmp_path / 'afile' / 'sub'}: Not a dir"),
        "link": (tmp_path / "link", f"error: --fresh would empty {tmp_path / 'link'}, a link to {tmp_path / 'run'}"),
        "empty": ("", "error: --output_dir is empty"),
    }[case]
    common = ["--dataroot", cifar_root, *CLI_TINY, "--batch_size", "8", "--subset", "16", "--n_workers", "0"]
    message = refused([*common, "--no_cuda", "--epochs", "1", "--output_dir", str(output_dir), "--fresh"])
    assert message.startswith(expected) and "\n" not in message, message
    assert (tmp_path / "run" / "glow_model_1.pth").read_text() == "a run's"


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_refused_in_one_line(seed, cifar_root, tmp_path):
    message = refused(["--dataroot", cifar_root, "--output_dir", str(tmp_path / "run"), "--seed", seed])
    assert message == f"error: --seed must be in [0, 2**32 - 1], got {seed}"


def test_the_flow_embedding_actnorm_takes_actnorm_scale_and_the_embedding_defaults_to_the_originals():
    model = Glow((32, 32, 3), 8, 1, 2, actnorm_scale=0.5, model_type="nanoflow", flow_embed_dim=1)
    step = model.flow.layers[1]
    assert isinstance(step, FlowStep)
    assert step.actnorm.scale == cast(ActNorm2d, step.actnorm_embed).scale == 0.5
    assert image_train_module().parse_args([]).flow_embed_dim == 512


def test_an_original_checkpoint_of_the_reverse_permutation_loads(tmp_path):
    """The original kept Permute2d's indices out of the state dict; a reversal needs none."""
    train = image_train_module()
    trained = Glow((32, 32, 3), model_type="nanoflow", flow_permutation="reverse", **TINY)
    original = {name: value for name, value in trained.state_dict().items() if ".indices" not in name}
    path = str(tmp_path / "glow_model_4.pth")
    torch.save(original, path)
    model = Glow((32, 32, 3), model_type="nanoflow", flow_permutation="reverse", **TINY)
    optimizer = torch.optim.Adamax(model.parameters())
    assert train.load_checkpoint(model, optimizer, path, "", torch.device("cpu")) == 4
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    shuffled = Glow((32, 32, 3), model_type="glow", flow_permutation="shuffle", **TINY)
    torch.save({name: value for name, value in shuffled.state_dict().items() if ".indices" not in name}, path)
    with pytest.raises(train.CheckpointError, match="tensors missing"):
        train.load_checkpoint(shuffled, torch.optim.Adamax(shuffled.parameters()), path, "", torch.device("cpu"))
