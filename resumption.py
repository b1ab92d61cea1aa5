"""What lets a training run stop early and go on exactly where it stopped: the data order fixed by
(seed, epoch) and the position in it (`EpochSampler`), a stop after the current step on Ctrl-C or
SIGTERM (`StopRequest`), and DataLoader workers that outlive those signals until the checkpoint is
written (`ignore_stop_signals`).
"""

from __future__ import annotations

import signal
import sys

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """The shuffled indices of one epoch, fixed by (seed, epoch), this rank's share of them,
    starting after `skip_batches` batches: what exact resumption needs."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip_batches = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.world_size // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)[self.rank :: self.world_size]
        used = order[self.skip_batches * self.batch_size : self.batches_per_epoch * self.batch_size]
        return iter(used.tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C (and a scheduler's SIGTERM) reach the whole process group; the workers must outlive
    # them until the checkpoint is written. They still end with the loader, or when the parent dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
