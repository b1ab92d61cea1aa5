"""CIFAR-10 and SVHN from their standard archives, without torchvision.

Files live where the original (through torchvision) kept them, under
`<dataroot>/data/CIFAR10/` and `<dataroot>/data/SVHN/`; CIFAR-10 is also found directly
in `<dataroot>`. CIFAR-10's python batches are read straight from the archive
(`cifar-10-python.tar.gz`) or from its extracted folder (`cifar-10-batches-py/`).
"""

import functools
import hashlib
import os
import pickle
import tarfile
import urllib.request
import zlib
from collections.abc import Callable
from typing import IO

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_BATCHES = ["test_batch"]
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_MD5 = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b1c6b5ab1d",
}
NUM_CLASSES = 10
# Random translation by up to 10% of the image size, as Glow-PyTorch's RandomAffine did.
MAX_TRANSLATION = 0.1


class DatasetNotFoundError(Exception):
    pass


class ImageDataset(Dataset):
    """8-bit images [N, C, H, W] and labels [N]; items are (x [C, H, W] in [-0.5, 0.5), label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool, flip: bool):
        self.images = images
        self.labels = labels
        self.augment = augment
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            image = random_translate(image, MAX_TRANSLATION)
            if self.flip and torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image.float() / 256 - 0.5, int(self.labels[index])


def random_translate(image: torch.Tensor, fraction: float) -> torch.Tensor:
    """Shift image [C, H, W] by a random whole number of pixels, up to `fraction` of its
    size each way, filling with black: zero padding, then a random crop."""
    _, height, width = image.shape
    pad_y, pad_x = int(fraction * height), int(fraction * width)
    padded = F.pad(image, (pad_x, pad_x, pad_y, pad_y))
    top = int(torch.randint(0, 2 * pad_y + 1, ()))
    left = int(torch.randint(0, 2 * pad_x + 1, ()))
    return padded[:, top : top + height, left : left + width]


def md5sum(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, path: str, md5: str) -> None:
    """Fetch `url` to `path` unless a file with the right checksum is already there."""
    if os.path.isfile(path) and md5sum(path) == md5:
        return
    created = []  # the folders made for it, deepest first: removed again if the download fails
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    print(f"downloading {url} to {path}")
    partial = path + ".part"
    try:
        try:
            urllib.request.urlretrieve(url, partial)
        except OSError as error:  # URLError and HTTPError included
            raise DatasetNotFoundError(f"could not download {url}: {error}") from error
        if md5sum(partial) != md5:
            raise DatasetNotFoundError(f"{url} downloaded with a wrong MD5 checksum (expected {md5})")
    except BaseException:  # Ctrl-C too: leave no partial file, nor the empty folders made for it
        if os.path.exists(partial):
            os.remove(partial)
        for made in created:
            if os.path.isdir(made) and not os.listdir(made):
                os.rmdir(made)
        raise
    os.replace(partial, path)


def read_cifar10_batches(
    names: list[str], open_batch: Callable[[str], IO[bytes]], source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pickled batches `names`, opened by `open_batch` from `source`, the extracted folder or the archive."""
    images, labels = [], []
    for name in names:
        try:
            with open_batch(name) as file:
                batch = pickle.load(file, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # [N, C, H, W]
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except Exception as error:  # a missing or damaged batch; unpickling garbage raises many types
            raise DatasetNotFoundError(
                f"{source}: {name} is not a readable CIFAR-10 batch ({one_line(error)}); delete {source} and "
                "pass --download to fetch CIFAR-10 again"
            ) from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def dataset_paths(dataset: str, dataroot: str) -> list[str]:
    """Where `dataset` is looked for, in order: CIFAR-10 extracted, then its archive, under data/CIFAR10/ then
    in `dataroot`; SVHN's train and test files."""
    if dataset == "svhn":
        return [os.path.join(dataroot, "data", "SVHN", f"{split}_32x32.mat") for split in ("train", "test")]
    roots = (os.path.join(dataroot, "data", "CIFAR10"), dataroot)
    return [os.path.join(root, name) for root in roots for name in (CIFAR10_FOLDER, CIFAR10_ARCHIVE)]


def load_cifar10(dataroot: str, download_missing: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images, labels), "test": (images, labels)}, images uint8 [N, 3, 32, 32]."""
    candidates = dataset_paths("cifar10", dataroot)
    found = next((path for path in candidates if os.path.exists(path)), None)
    if download_missing and (found is None or os.path.isfile(found)):
        # An archive already there is checked too, and fetched again if its checksum is wrong; a new one
        # goes to data/CIFAR10/, where the original kept it.
        found = found or candidates[1]
        download(CIFAR10_URL, found, CIFAR10_MD5)
    if found is None:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: looked for {' or '.join(candidates)}; pass --download to fetch it"
        )
    if os.path.isdir(found):
        return _read_cifar10_splits(functools.partial(_folder_batch, found), found)
    try:
        with tarfile.open(found, "r:gz") as tar:
            return _read_cifar10_splits(functools.partial(_tar_batch, tar), found)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DatasetNotFoundError(
            f"{found}: not a readable archive ({one_line(error)}); delete it and pass --download to fetch it again"
        ) from None


def _folder_batch(folder: str, name: str) -> IO[bytes]:
    return open(os.path.join(folder, name), "rb")


def _tar_batch(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    file = tar.extractfile(f"{CIFAR10_FOLDER}/{name}")  # a KeyError if the archive lacks it
    if file is None:
        raise KeyError(f"{CIFAR10_FOLDER}/{name} is not a file")
    return file


def _read_cifar10_splits(
    open_batch: Callable[[str], IO[bytes]], source: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        "train": read_cifar10_batches(CIFAR10_TRAIN_BATCHES, open_batch, source),
        "test": read_cifar10_batches(CIFAR10_TEST_BATCHES, open_batch, source),
    }


def load_svhn(dataroot: str, download_missing: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images, labels), "test": (images, labels)}, images uint8 [N, 3, 32, 32]."""
    splits = {}
    for split, path in zip(("train", "test"), dataset_paths("svhn", dataroot), strict=True):
        name = os.path.basename(path)
        if download_missing:
            download(SVHN_URL + name, path, SVHN_MD5[name])
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"SVHN not found: looked for {path}; pass --download to fetch it")
        try:
            mat = scipy.io.loadmat(path)
            if mat["X"].shape[:3] != (32, 32, 3) or mat["X"].dtype != np.uint8:
                raise ValueError(f"X is {mat['X'].dtype} {list(mat['X'].shape)}, not uint8 [32, 32, 3, N]")
            images = torch.from_numpy(mat["X"]).permute(3, 2, 0, 1).contiguous()  # [H, W, C, N] -> [N, C, H, W]
            labels = torch.from_numpy(mat["y"].astype(np.int64)).flatten() % 10  # SVHN labels digit 0 as 10
        except Exception as error:  # a damaged file; scipy raises many types
            raise DatasetNotFoundError(
                f"{path}: not a readable SVHN file ({one_line(error)}); delete it and pass --download to fetch it again"
            ) from None
        splits[split] = (images, labels)
    return splits


def get_datasets(
    dataset: str, dataroot: str, augment: bool, download_missing: bool, subset: int = 0
) -> tuple[tuple[int, int, int], int, ImageDataset, ImageDataset]:
    """(image_shape (H, W, C), num_classes, train, test); `subset` > 0 keeps the first
    `subset` images of each split, for quick runs."""
    if dataset == "cifar10":
        splits = load_cifar10(dataroot, download_missing)
    elif dataset == "svhn":
        splits = load_svhn(dataroot, download_missing)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose cifar10 or svhn")
    if subset > 0:
        splits = {split: (images[:subset], labels[:subset]) for split, (images, labels) in splits.items()}
    # Mirrored digits are not digits, so SVHN is only translated, as in Glow-PyTorch.
    flip = dataset == "cifar10"
    train = ImageDataset(*splits["train"], augment=augment, flip=flip)
    test = ImageDataset(*splits["test"], augment=False, flip=False)
    _, channels, height, width = splits["train"][0].shape
    return (height, width, channels), NUM_CLASSES, train, test
