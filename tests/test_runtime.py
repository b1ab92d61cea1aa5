"""train.py's choice of device, on the CPU: `torch.cuda` is stood in for by a machine of two GPUs
(or none), so that what `--device` resolves to and what it refuses is tested without a GPU."""

import os

import pytest
import torch

import train
from config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo.json")


@pytest.fixture
def two_gpus(monkeypatch):
    """A stand-in `torch.cuda` with two GPUs, the second current (as `torch.cuda.set_device(1)` leaves
    it): -> the list of devices `set_device` was given."""
    chosen = []

    def set_device(device: torch.device) -> None:
        if device.index is None:  # as PyTorch refuses it
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        chosen.append(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return chosen


@pytest.mark.parametrize(
    "name,local_rank,expected",
    [
        ("cuda", None, "cuda:1"),  # the current GPU
        ("cuda", "0", "cuda:0"),  # under torchrun: the process's own GPU
        (None, None, "cuda:1"),  # the default with a GPU
        (None, "0", "cuda:0"),
        ("cuda:0", "1", "cuda:0"),  # an index is taken as given
        ("cpu", None, "cpu"),
    ],
)
def test_a_gpu_without_an_index_is_the_local_ranks_or_the_current_one(
    two_gpus, monkeypatch, name, local_rank, expected
):
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    runtime = train.setup_runtime(load_config(CONFIG), name)
    assert runtime.device == torch.device(expected)
    # set_device refuses a device without an index; DistributedDataParallel takes device.index.
    assert two_gpus == ([torch.device(expected)] if expected != "cpu" else [])


@pytest.mark.parametrize(
    "name,gpus,local_rank,message",
    [
        ("cdua", 2, None, "error: --device cdua: not a device name (cpu, cuda, cuda:0, ...)"),
        ("cuda:x", 2, None, "error: --device cuda:x: not a device name"),
        ("cuda:3", 2, None, "error: --device cuda:3: no cuda:3 on this machine, which has 2 CUDA devices"),
        ("cuda", 2, "2", "error: --device cuda: no cuda:2 (LOCAL_RANK 2) on this machine, which has 2 CUDA devices"),
        ("cuda", 0, None, "error: --device cuda: this machine has no CUDA device that PyTorch can use"),
        ("meta", 2, None, "error: --device meta: not supported; the commands run on cpu or cuda"),
        ("mps", 2, None, "error: --device mps: not supported"),
    ],
)
def test_a_device_that_is_not_there_is_a_one_line_error(two_gpus, monkeypatch, capsys, name, gpus, local_rank, message):
    if gpus == 0:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert train.main(["-c", CONFIG, "--device", name]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1
    assert two_gpus == []


def test_one_process_under_torchrun_joins_a_process_group_and_trains_under_ddp(monkeypatch):
    """`torchrun --nproc_per_node=1` (WORLD_SIZE 1) is still DDP, as with several processes: the way a machine
    of one GPU checks NCCL and DDP (scripts/gpu_check.sh). Without torchrun there is no group."""
    import socket

    import torch.distributed as dist

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", train.TORCHRUN_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    alone = train.setup_runtime(load_config(CONFIG), "cpu")
    assert not alone.distributed and not dist.is_initialized()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    variables = dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name, value in {**variables, train.TORCHRUN_VARIABLE: "test"}.items():
        monkeypatch.setenv(name, value)
    try:
        runtime = train.setup_runtime(load_config(CONFIG), "cpu")
        assert runtime.distributed and dist.is_initialized() and dist.get_world_size() == 1
        model = train.data_parallel(torch.nn.Linear(2, 2), runtime)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
