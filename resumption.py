"""What lets a training run stop early and go on exactly where it stopped: the data order fixed by
(seed, epoch) and the position in it (`EpochSampler`; `training_batches` loads it for the rest of the
run), a stop after the current step on Ctrl-C or
SIGTERM (`StopRequest`) or before a wall-clock limit (`WallClockLimit`), and DataLoader workers that
outlive those signals until the checkpoint is written (`ignore_stop_signals`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Generator, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from mel2samp import Mel2Samp, collate

# What a checkpoint report (the test loss, synthesis and measures of synthesis.CheckpointReport) counts for
# in the wall-clock margin until this process has timed one: far more than a step, safely more than the
# reports of the configs here take (docs/training.md); a guess errs on the side of stopping early.
UNMEASURED_REPORT_SECONDS = 60.0


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


def training_batches(
    train_set: Mel2Samp,
    sampler: EpochSampler,
    start: tuple[int, int],
    epochs: int,
    num_workers: int,
    pin_memory: bool,
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """Every batch from batch `start[1]` of epoch `start[0]` to the end of epoch `epochs - 1`, each epoch
    in the order fixed by (seed, epoch), from one DataLoader: (mel [B, n_mels, F], audio [B, T]). Its
    workers start once and load the next epoch's first batches while this epoch's last ones train; a
    small corpus's epoch is a few batches, less than starting workers costs (docs/gpu.md)."""
    first_epoch, skip_batches = start

    def items() -> Iterator[tuple[int, int]]:  # the epoch travels with each index to the workers
        for epoch in range(first_epoch, epochs):
            sampler.set_epoch(epoch, skip_batches if epoch == first_epoch else 0)
            yield from ((epoch, index) for index in sampler)

    loader = DataLoader(
        train_set,
        batch_size=sampler.batch_size,
        sampler=items(),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        worker_init_fn=ignore_stop_signals,
    )
    return _shut_down_when_done(iter(loader))


def _shut_down_when_done(batches: Iterator) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """`batches`, whose workers are shut down as soon as it ends, fails (an error raised in a worker passes
    through here) or is closed. Left to the garbage collector, a failed iterator can outlive the error:
    its workers ignore SIGTERM (`ignore_stop_signals`), so the process would hang at exit joining them."""
    try:
        yield from batches
    finally:
        shut_down = getattr(batches, "_shutdown_workers", None)  # DataLoader's; none without workers
        if shut_down is not None:
            shut_down()


def ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C (and a scheduler's SIGTERM) reach the whole process group; the workers must outlive
    # them until the checkpoint is written. They still end with the loader, or when the parent dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class WallClockLimit:
    """Training stops before `minutes` have passed since `started` (0: no limit): after the last step
    whose successor, and the checkpoint that may follow it, would still end in time. The margin is
    measured in this process: the longest step after the first (the first also compiles, tunes cuDNN,
    starts the data workers), the last checkpoint save and the last checkpoint report. Until one has
    been measured, a save counts as a step and a report as `UNMEASURED_REPORT_SECONDS`. `clock` is
    injected for the tests."""

    def __init__(self, minutes: float, started: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.started, self.clock = 60.0 * minutes, started, clock
        self.first_step: float | None = None
        self.longest_step: float | None = None  # of the steps after the first
        self.checkpoint_seconds: dict[str, float] = {}  # the last "save" and "report"
        self.step_began = started

    def elapsed(self) -> float:
        """Seconds since the command started."""
        return self.clock() - self.started

    def passed(self) -> bool:
        return self.seconds > 0 and self.elapsed() >= self.seconds

    def begin_steps(self) -> None:
        self.step_began = self.clock()

    def step_done(self) -> None:
        """A step ended: its time, from the end of the step or checkpoint before it, is measured."""
        now = self.clock()
        seconds, self.step_began = now - self.step_began, now
        if self.first_step is None:
            self.first_step = seconds
        else:
            self.longest_step = max(self.longest_step or 0.0, seconds)

    @contextlib.contextmanager
    def timing(self, part: str) -> Iterator[None]:
        """Measure a checkpoint's "save" or "report", which the next step's time then leaves out."""
        began = self.clock()
        yield
        self.step_began = self.clock()
        self.checkpoint_seconds[part] = self.step_began - began

    def leaves_no_time(self, with_report: bool) -> bool:
        """Whether one more step and a checkpoint save after it (with its report, when the next
        iteration reports) would end past the limit."""
        if self.seconds <= 0:
            return False
        step = self.longest_step if self.longest_step is not None else self.first_step or 0.0
        needed = step + self.checkpoint_seconds.get("save", step)
        if with_report:
            needed += self.checkpoint_seconds.get("report", UNMEASURED_REPORT_SECONDS)
        return self.elapsed() + needed > self.seconds
