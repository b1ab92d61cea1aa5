"""image_density_experiments/: damaged datasets, flags and checkpoints that the first tests did not cover."""

import hashlib
import os
import pathlib
import sys

import numpy as np
import pytest
import scipy.io

from test_image_density import IMAGE_DIR, write_fake_cifar10

if IMAGE_DIR not in sys.path:  # appended, not prepended: the vocoder at the root has its own train.py
    sys.path.append(IMAGE_DIR)

import image_datasets
from image_datasets import DatasetNotFoundError, load_cifar10, load_svhn


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
