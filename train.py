"""Train, evaluate and synthesize with WaveFlow / NanoFlow, driven by the original's JSON configs.

    python train.py -c configs/nanoflow-h16-r128-emb512.json   # train (again: resumes from the newest checkpoint)
    python train.py -v -c config.json [--json results.json]      # test-set log-likelihood and speech measures
    python train.py -v --mels mels/ -c config.json               # the measures for mels beside their audio
    python train.py -s -c config.json [-t 0.8]                   # synthesize the test clips
    python train.py -s --mels mels/ -c config.json               # synthesize precomputed mels (.pt, .npy)
    python train.py -a 10 -s -c config.json                      # ... with the newest 10 checkpoints averaged
    python train.py -w -c config.json                            # warm start: weights only, fresh optimizer
    torchrun --nproc_per_node=N train.py -c config.json          # DistributedDataParallel, one GPU per process

`main` dispatches to `train`, or to `evaluate` and `synthesize` (synthesis.py); bad input ends the
command with a one-line `error:` message and exit status 1. Training survives
what long runs meet: the same command after a crash or a preemption resumes
from the run folder's newest checkpoint; one process at a time trains into a
run folder; a full disk ends it in one line naming the newest intact
checkpoint, failing logs or samples are warnings (see storage.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from checkpoint import (
    CheckpointError,
    average_checkpoints,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    rerun_checkpoint,
    save_checkpoint,
    warm_start,
)
from config import Config, ConfigError, TrainConfig, check_model_rules, load_config
from data import DataError
from mel2samp import Mel2Samp, collate
from model import WaveFlow, build_model, negative_log_likelihood
from storage import RunLock, StorageError, TrainingLogs, describe, remove_partial_files, warn, write_atomically
from synthesis import (
    BF16_MIN_CHANNELS,
    MEASURE_TEMPERATURE,
    PRECISIONS,
    CheckpointReport,
    evaluate,
    samples_dir,
    synthesize,
)


class TrainingStopped(RuntimeError):
    """Training cannot go on (the loss diverged); the last good checkpoint is intact."""


@dataclass
class Runtime:
    """Where and how this process runs: passed explicitly, never global."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # None: fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ----------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="WaveFlow / NanoFlow vocoder: train, evaluate, synthesize.")
    parser.add_argument("-c", "--config", required=True, help="JSON config file")
    parser.add_argument(
        "-w",
        "--warm_start",
        action="store_true",
        help="load the weights of checkpoint_path that fit, start a fresh optimizer and schedule",
    )
    parser.add_argument(
        "-v",
        "--evaluate",
        action="store_true",
        help="test-set log-likelihood on full clips and the speech measures of metrics.py",
    )
    parser.add_argument("-s", "--synthesize", action="store_true", help="write audio for the test clips")
    parser.add_argument(
        "-t",
        "--temp",
        type=float,
        default=None,
        help=f"sampling temperature (default 1.0 with -s; {MEASURE_TEMPERATURE} for the measures "
        f"of -v and for the checkpoint reports in training)",
    )
    parser.add_argument(
        "-a",
        "--average_checkpoint",
        type=int,
        default=0,
        metavar="N",
        help="average the newest N checkpoints of the folder checkpoint_path names",
    )
    parser.add_argument(
        "-e",
        "--epsilon",
        type=float,
        default=None,
        help="with -a: Polyak averaging, average = eps * average + (1 - eps) * newer",
    )
    parser.add_argument(
        "--mels",
        nargs="+",
        metavar="PATH",
        help="with -s or -v: mel files [80, F] (.pt, .npy) or folders of them, instead of the test "
        "list; with -v, NAME.pt or NAME.npy is measured against the audio file NAME "
        "(or NAME.wav, NAME.flac) beside it or in the test list",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="with -v: also write the results as JSON to PATH ('-': to stdout, the table to stderr)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", *PRECISIONS],
        default="auto",
        help="with -s or -v: the estimator's precision in synthesis (the flow's state, log_s and "
        "the affine update stay fp32). auto (default): fp16 with fp16_run on a GPU, else bf16 "
        f"where the device has bf16 matrix units and res_channels >= {BF16_MIN_CHANNELS}, else fp32",
    )
    parser.add_argument("--checkpoint_path", default=None, help="override train_config.checkpoint_path")
    parser.add_argument(
        "--max_iterations",
        type=int,
        default=None,
        metavar="N",
        help="override train_config.max_iterations: stop training at iteration N (0: no limit)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="override train_config.compile: compile the training step's forward with torch.compile",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.evaluate and args.synthesize:
        parser.error("choose one of -v/--evaluate and -s/--synthesize")
    if args.mels and not (args.synthesize or args.evaluate):
        parser.error("--mels goes with -s/--synthesize or -v/--evaluate")
    if args.precision != "auto" and not (args.synthesize or args.evaluate):
        parser.error("--precision goes with -s/--synthesize or -v/--evaluate (training uses fp16_run/bf16_run)")
    if args.compile and (args.synthesize or args.evaluate):
        parser.error("--compile goes with training (-s and -v run the model uncompiled)")
    if args.json and not args.evaluate:
        parser.error("--json goes with -v/--evaluate")
    if args.epsilon is not None and not args.average_checkpoint:
        parser.error("-e/--epsilon goes with -a/--average_checkpoint")
    if args.temp is None:
        args.temp = 1.0 if args.synthesize else MEASURE_TEMPERATURE
    if args.temp <= 0:
        parser.error("-t/--temp must be positive")
    if args.max_iterations is not None and args.max_iterations < 0:
        parser.error("--max_iterations must be >= 0")
    return args


def setup_runtime(config: Config, device_name: str | None) -> Runtime:
    """Pick the device and precision; join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name:
        device = torch.device(device_name)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    amp_dtype = None
    if config.train.fp16_run:
        if device.type == "cuda":
            amp_dtype = torch.float16
        elif rank == 0:
            warn("fp16_run needs a CUDA device; running in fp32 on the CPU (bf16_run works on CPUs)")
    elif config.train.bf16_run:
        amp_dtype = torch.bfloat16
    return Runtime(device=device, rank=rank, world_size=world_size, amp_dtype=amp_dtype)


def run_dir(config: Config) -> str:
    return os.path.join(config.train.output_directory, config.waveflow.model_name)


# ----------------------------------------------------------------------------- training


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


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C (and a scheduler's SIGTERM) reach the whole process group; the workers must outlive
    # them until the checkpoint is written. They still end with the loader, or when the parent dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _global_any(flag: bool, runtime: Runtime) -> bool:
    if not runtime.distributed:
        return flag
    value = torch.tensor([float(flag)], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# Why `train_step` skipped an update; the first two count towards `max_bad_steps`.
NON_FINITE_LOSS = "non-finite loss"
NON_FINITE_GRADIENT = "non-finite gradient"
GRADIENT_OVERFLOW = "fp16 gradient overflow"  # the GradScaler's calibration of its loss scale, not divergence


def train_step(model: torch.nn.Module, batch, optimizer, scheduler, scaler, runtime: Runtime, config: Config) -> dict:
    """One optimisation step; a non-finite loss or gradient skips the update. Returns metrics, with
    `skipped` the reason for a skipped update (None when it was made)."""
    mel, audio = (tensor.to(runtime.device, non_blocking=True) for tensor in batch)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(
        runtime.device.type, dtype=runtime.amp_dtype or torch.float32, enabled=runtime.amp_dtype is not None
    ):
        z, logdet = model(audio, mel)
    loss = negative_log_likelihood(z, logdet, config.train.sigma)
    # Backward even on a bad loss: under DDP every rank must join the gradient all-reduce,
    # after which all ranks see the same gradient norm and the same mean loss, and skip together.
    scaler.scale(loss).backward()
    loss_value = loss.detach()
    if runtime.distributed:
        dist.all_reduce(loss_value)
        loss_value /= runtime.world_size
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip_thresh)
    skipped = None if bool(torch.isfinite(loss_value)) else NON_FINITE_LOSS
    if scaler.is_enabled():
        scale = scaler.get_scale()
        if skipped is None:
            scaler.step(optimizer)  # skips the update itself when the fp16 gradients overflowed
        scaler.update()
        if skipped is None and scaler.get_scale() < scale:  # the scaler lowers its scale when, and only when, it skips
            # Above 1 the scale amplifies the gradients and an overflow says it is too large: lowering it
            # is the scaler's normal calibration. At 1 or below, the gradient itself is not finite.
            skipped = GRADIENT_OVERFLOW if scale > 1 else NON_FINITE_GRADIENT
    elif skipped is None:
        if bool(torch.isfinite(grad_norm)):
            optimizer.step()
        else:
            skipped = NON_FINITE_GRADIENT
    scheduler.step()
    return {
        "loss": loss_value.item(),
        "grad_norm": grad_norm.item(),
        "skipped": skipped,
        "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
        "learning_rate": optimizer.param_groups[0]["lr"],
        "samples": audio.numel() * runtime.world_size,
    }


def skipped_step_warning(metrics: dict, iteration: int) -> str:
    """One line saying why the update of `iteration` was skipped."""
    if metrics["skipped"] == NON_FINITE_LOSS:
        return f"iteration {iteration}: loss is {metrics['loss']}, step skipped"
    if metrics["skipped"] == NON_FINITE_GRADIENT:
        return (
            f"iteration {iteration}: gradient norm is {metrics['grad_norm']} (loss {metrics['loss']:.4f}), step skipped"
        )
    return (
        f"iteration {iteration}: fp16 gradient overflow, step skipped; the loss scale drops to "
        f"{metrics['loss_scale']:g}"
    )


class SkippedSteps:
    """Updates skipped in a row for a non-finite loss or gradient; `limit` of them stop training. The fp16
    scaler's overflows (`GRADIENT_OVERFLOW`) neither count nor end a streak: lowering its loss scale after
    one is how the scaler calibrates itself, and a run with fp16_run meets a few at its start and one each
    time the scaler tries a larger scale."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def record(self, skipped: str | None, iteration: int, last_good: str) -> None:
        if skipped is None:
            self.in_a_row = 0
        elif skipped != GRADIENT_OVERFLOW:
            self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"{self.in_a_row} steps in a row skipped for a non-finite loss or gradient at "
                f"iteration {iteration}: training stopped; the last good checkpoint is {last_good}"
            )


# ----------------------------------------------------------------------------- run folder and starting point


def write_failure(folder: str, what: str, error: OSError) -> StorageError:
    """A failed write in the run folder, as one line naming the folder and the newest intact checkpoint."""
    available = list_checkpoints(folder)
    return StorageError(
        f"{folder}: cannot write {what} ({describe(error)}); the newest intact checkpoint is "
        f"{available[-1][1] if available else 'none'}"
    )


def write_on_main(write, what: str, folder: str, runtime: Runtime) -> None:
    """Rank 0 calls `write()`; a failed write (full disk, unwritable folder) stops every rank."""
    failure = None
    if runtime.is_main:
        try:
            write()
        except OSError as error:
            failure = write_failure(folder, what, error)
    if _global_any(failure is not None, runtime):
        raise failure or StorageError(f"{folder}: rank 0 could not write {what}; training stopped")


def claim_run_folder(config: Config, args: argparse.Namespace, runtime: Runtime) -> tuple[RunLock | None, str]:
    """Rank 0 locks the run folder and removes the partial files a killed run left. Returns the lock
    and the checkpoint that every rank starts from: checkpoint_path or, when the same command runs
    again after an interruption, the newest checkpoint of the run folder."""
    folder, start = run_dir(config), config.train.checkpoint_path
    lock, failure = None, None
    if runtime.is_main:
        try:
            lock = RunLock(folder)
            remove_partial_files(folder)
            remove_partial_files(samples_dir(config), contains="_iter")
            newest = None if args.warm_start or args.average_checkpoint else rerun_checkpoint(folder, start)
            if newest is not None:
                older = f" (not {start}: to go back to it, remove the newer ones)" if start else ""
                print(
                    f"{folder} holds this run's checkpoints: resuming from the newest, "
                    f"{os.path.basename(newest)}{older}"
                )
                start = newest
        except OSError as error:
            failure = write_failure(folder, "the run folder", error)
        except StorageError as error:
            failure = error
    if runtime.distributed:  # every rank starts from rank 0's choice, or stops with it
        shared = [start, None if failure is None else str(failure)]
        dist.broadcast_object_list(shared, src=0)
        start, message = shared
        if message is not None and failure is None:
            failure = StorageError(f"rank 0 cannot train: {message}")
    if failure is not None:
        if lock is not None:
            lock.release()
        raise failure
    return lock, start


@dataclass
class Training:
    """What training updates: the model, its optimizer, learning-rate schedule and loss scaler."""

    model: WaveFlow
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler


def build_training(config: Config, runtime: Runtime) -> Training:
    """A fresh model (initialised from `train_config.seed`), Adam, the step schedule and the fp16 loss
    scaler (disabled unless training in fp16)."""
    tc = config.train
    torch.manual_seed(tc.seed)
    if runtime.device.type == "cuda":
        # Training segments have one size: let cuDNN time its algorithms once. Its default choice for the
        # dilated convolutions in half precision can be many times slower than fp32.
        torch.backends.cudnn.benchmark = True
    model = build_model(config.waveflow).to(runtime.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.learning_rate)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=tc.lr_decay_step, gamma=tc.lr_decay_gamma)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    return Training(model, optimizer, scheduler, scaler)


def restore(training: Training, path: str, args: argparse.Namespace, verbose: bool) -> tuple[int, int, int]:
    """Load what checkpoint `path` (or with -a the folder) asks for; returns `(iteration, epoch,
    batch_in_epoch)` to start from (epoch -1 when the checkpoint does not record it)."""
    if not path:
        return 0, 0, 0
    if not (args.warm_start or args.average_checkpoint):
        checkpoint = load_checkpoint(path, training.model, training.optimizer, training.scheduler, training.scaler)
        if verbose:
            print(f"resumed from {path} at iteration {checkpoint['iteration']}")
        return (checkpoint["iteration"], checkpoint.get("epoch", -1), checkpoint.get("batch_in_epoch", -1))
    if args.average_checkpoint:
        weights, newest = average_checkpoints(path, args.average_checkpoint, args.epsilon)
        source = f"the average of the newest {args.average_checkpoint} checkpoints of {path}"
    else:
        newest = read_checkpoint(path)
        weights, source = newest["model"], path
    loaded, skipped = warm_start(training.model, weights)
    if verbose:
        print(
            f"warm start from {source}: {len(loaded)} tensors loaded, {len(skipped)} not"
            + "".join(f"\n  not loaded: {line}" for line in skipped)
        )
    # Numbering goes on from the source so that no checkpoint beside it is overwritten.
    return newest.get("iteration", 0), 0, 0


def resume_position(
    iteration: int, epoch: int, batch_in_epoch: int, batches_per_epoch: int, tc: TrainConfig
) -> tuple[int, int, int]:
    """Where the data order stands at `iteration`, and where the run ends: -> `(epoch, batch_in_epoch,
    last iteration)`. A checkpoint of the original code (epoch -1) records only its iteration, which
    then says where the data stood; a warm start counts epochs from 0 while its iterations go on from
    the source's numbering."""
    if epoch < 0:
        epoch, batch_in_epoch = divmod(iteration, batches_per_epoch)
    first_iteration = iteration - (epoch * batches_per_epoch + batch_in_epoch)
    total = first_iteration + tc.epochs * batches_per_epoch
    if tc.max_iterations:
        total = min(total, tc.max_iterations)
    return epoch, batch_in_epoch, total


def refuse_overwriting(folder: str, iteration: int) -> None:
    """Stop before a run from `iteration` overwrites newer checkpoints of its run folder."""
    newer = [path for it, path in list_checkpoints(folder) if it > iteration]
    if newer:
        raise CheckpointError(
            f"{folder} already holds checkpoints after iteration {iteration} "
            f"({os.path.basename(newer[-1])}); training would overwrite them. To go on with that "
            f"run, resume from {newer[-1]} (--checkpoint_path, without -w or -a); or choose "
            f"another output_directory or model_name"
        )


def data_parallel(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """`model` as the training step calls it: under DistributedDataParallel with torchrun, under
    DataParallel on a machine of several GPUs without it, else the model itself."""
    if runtime.distributed:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    if runtime.device.type == "cuda" and torch.cuda.device_count() > 1:
        return torch.nn.DataParallel(model)
    return model


# ----------------------------------------------------------------------------- the compiled step


def compile_mode(device: torch.device, distributed: bool) -> str | None:
    """torch.compile's mode for the training forward: CUDA graphs (`reduce-overhead`) on one GPU, where the
    step is a chain of small kernels whose launches bound its speed; inductor's default under DDP (CUDA
    graphs with DDP meet open PyTorch bugs) and on a CPU (no CUDA graphs). See docs/gpu.md."""
    return "reduce-overhead" if device.type == "cuda" and not distributed else None


def first_line(error: Exception) -> str:
    """`error` in one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def compile_forward(model: WaveFlow, runtime: Runtime) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """`model.forward` compiled with torch.compile for the training step, or None, with one warning, where it
    cannot be compiled here. Training segments have one shape: no dynamic shapes. Compiling itself happens
    at the first call, where most failures come (see `TrainingStep`)."""
    if runtime.device.type == "cuda" and torch.cuda.device_count() > 1 and not runtime.distributed:
        cause = "DataParallel (several GPUs without torchrun) does not take a compiled forward; torchrun does"
    else:
        try:
            return torch.compile(model.forward, dynamic=False, mode=compile_mode(runtime.device, runtime.distributed))
        except Exception as error:  # an unsupported Python or platform
            cause = first_line(error)
    if runtime.is_main:
        warn(f"train_config.compile: {cause}; training without torch.compile")
    return None


class TrainingForward(torch.nn.Module):
    """The model's forward as the training step runs it: `compiled` (`compile_forward`), or the model's own
    when that is None. It holds the model, so that DDP and DataParallel wrap it as they would the model,
    while the model itself, its state_dict and the evaluation paths never run the compiled code."""

    def __init__(self, model: WaveFlow, compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None):
        super().__init__()
        self.model, self.compiled = model, compiled

    def forward(self, audio: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.compiled or self.model)(audio, mel)


class TrainingStep:
    """`train_step` on the model as the loop trains it: its forward compiled when train_config.compile asks,
    under DDP or DataParallel as `data_parallel` gives. A compiled first step that fails (no C compiler,
    an operator the compiler cannot take) warns once, naming the cause, and is redone eagerly, as is the
    rest of the run: the failure comes in the forward or the backward, before anything was updated."""

    def __init__(self, training: Training, runtime: Runtime, config: Config):
        self.training, self.runtime, self.config = training, runtime, config
        compiled = compile_forward(training.model, runtime) if config.train.compile else None
        self.forward = TrainingForward(training.model, compiled)
        self.model = data_parallel(self.forward, runtime)
        self.untried = compiled is not None

    def __call__(self, batch) -> dict:
        if self.untried:
            self.untried = False
            try:
                return self.step(batch)
            except Exception as error:
                if self.runtime.is_main:
                    warn(
                        f"train_config.compile: the first compiled training step failed ({first_line(error)}); "
                        f"training without torch.compile"
                    )
                self.forward.compiled = None
        return self.step(batch)

    def step(self, batch) -> dict:
        training = self.training
        return train_step(
            self.model, batch, training.optimizer, training.scheduler, training.scaler, self.runtime, self.config
        )


# ----------------------------------------------------------------------------- the loop


class TrainingRun:
    """The loop of one training run over its epochs, and its bookkeeping: progress, logs, skipped
    steps, checkpoints and the checkpoint reports."""

    def __init__(
        self,
        training: Training,
        train_set: Mel2Samp,
        sampler: EpochSampler,
        config: Config,
        args: argparse.Namespace,
        runtime: Runtime,
    ):
        self.training, self.train_set, self.sampler = training, train_set, sampler
        self.config, self.args, self.runtime = config, args, runtime
        self.folder = run_dir(config)
        self.report = CheckpointReport(config, runtime.device, runtime.amp_dtype) if runtime.is_main else None
        self.skipped_steps = SkippedSteps(config.train.max_bad_steps)
        self.logs: TrainingLogs | None = None
        self.saved_at = 0

    def save(self, iteration: int, epoch: int, batch_in_epoch: int) -> None:
        """Write checkpoint `iteration` (on rank 0), recording where the data order stands."""
        training, path = self.training, checkpoint_path(self.folder, iteration)
        if batch_in_epoch == self.sampler.batches_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0

        def write() -> None:
            save_checkpoint(
                path,
                model_state=training.model.state_dict(),
                iteration=iteration,
                optimizer=training.optimizer,
                scheduler=training.scheduler,
                learning_rate=self.config.train.learning_rate,
                config=self.config.raw,
                epoch=epoch,
                batch_in_epoch=batch_in_epoch,
                scaler=training.scaler,
            )
            print(f"saved {path}")

        write_on_main(write, f"checkpoint {os.path.basename(path)}", self.folder, self.runtime)
        self.saved_at = iteration

    def checkpoint(self, iteration: int, epoch: int, batch_in_epoch: int) -> None:
        """Save, then report the test loss and measures (rank 0) while the other ranks wait."""
        self.save(iteration, epoch, batch_in_epoch)
        if self.report is not None:
            self.report(self.training.model, self.logs, iteration, self.args.temp)
        if self.runtime.distributed:
            dist.barrier()
        self.training.model.train()

    def record(self, metrics: dict, iteration: int, seconds: float, progress: tqdm) -> None:
        """A step's metrics to the progress bar and the logs; a skipped update warned and counted."""
        if metrics["skipped"] and self.runtime.is_main:
            warn(skipped_step_warning(metrics, iteration))
        last_good = checkpoint_path(self.folder, self.saved_at) if self.saved_at else "none"
        self.skipped_steps.record(metrics["skipped"], iteration, last_good)
        if self.runtime.is_main:
            speed = metrics["samples"] / seconds / 1000
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", kHz=f"{speed:.1f}", refresh=False)
            progress.update()
            if self.logs is not None:
                for key in ("loss", "grad_norm", "learning_rate"):
                    self.logs.add("scalar", f"training/{key}", metrics[key], iteration)

    def run(self, iteration: int, start_epoch: int, batch_in_epoch: int, total: int) -> None:
        """Train from `iteration` (batch `batch_in_epoch` of `start_epoch`) to iteration `total`, or until
        Ctrl-C or SIGTERM; a checkpoint every `iters_per_checkpoint` iterations and one at the end."""
        tc, runtime, training = self.config.train, self.runtime, self.training
        self.saved_at = iteration
        if runtime.is_main and tc.with_tensorboard:
            self.logs = TrainingLogs(os.path.join(self.folder, "logs"))
        progress = tqdm(
            total=total, initial=min(iteration, total), unit="it", disable=not runtime.is_main, dynamic_ncols=True
        )
        step = TrainingStep(training, runtime, self.config)
        stop = StopRequest()
        position = (start_epoch, batch_in_epoch)  # (epoch, batches done in it) after the last step
        try:
            for epoch in range(start_epoch, tc.epochs):
                for batch in self.batches(epoch, batch_in_epoch):
                    started = time.perf_counter()
                    metrics = step(batch)
                    iteration, batch_in_epoch = iteration + 1, batch_in_epoch + 1
                    position = (epoch, batch_in_epoch)
                    self.record(metrics, iteration, time.perf_counter() - started, progress)
                    diverging = self.skipped_steps.in_a_row > 0  # no checkpoint in the middle of a streak
                    if iteration % tc.iters_per_checkpoint == 0 and not diverging:
                        self.checkpoint(iteration, epoch, batch_in_epoch)
                    if iteration >= total:
                        break
                    if _global_any(stop.requested, runtime):
                        if self.saved_at != iteration:
                            self.save(iteration, epoch, batch_in_epoch)
                        return
                if iteration >= total:
                    break
                batch_in_epoch = 0
            if self.saved_at != iteration:
                self.checkpoint(iteration, *position)
            if runtime.is_main:
                progress.close()
                print(
                    f"training finished at iteration {iteration}.\n"
                    f"  checkpoints: {self.folder}/\n"
                    f"  samples:     {samples_dir(self.config)}/ (a test clip at every checkpoint; play the "
                    f".wav files)\n"
                    f"  all test clips from the last checkpoint: python train.py -s -c {self.args.config} "
                    f"--checkpoint_path {checkpoint_path(self.folder, iteration)}"
                )
        finally:
            stop.restore()
            progress.close()
            if self.logs is not None:
                self.logs.close()

    def batches(self, epoch: int, skip_batches: int) -> DataLoader:
        """The batches of `epoch` after the first `skip_batches`, in the order fixed by (seed, epoch)."""
        tc, dc = self.config.train, self.config.data
        self.sampler.set_epoch(epoch, skip_batches)
        self.train_set.set_epoch(epoch)
        self.training.model.train()
        return DataLoader(
            self.train_set,
            batch_size=tc.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=dc.num_workers,
            pin_memory=self.runtime.device.type == "cuda",
            drop_last=True,
            worker_init_fn=_ignore_stop_signals,
        )


def train(config: Config, args: argparse.Namespace, runtime: Runtime) -> None:
    """Train into the run folder, which rank 0 holds locked until the run ends."""
    if (args.warm_start or args.average_checkpoint) and not config.train.checkpoint_path:
        option = "-w/--warm_start needs a checkpoint" if args.warm_start else "-a needs a folder of checkpoints"
        raise ConfigError(
            f"{config.source}: {option} to start from: train_config.checkpoint_path is empty "
            f"(or give --checkpoint_path)"
        )
    lock, start = claim_run_folder(config, args, runtime)
    try:
        train_from(start, config, args, runtime)
    finally:
        if lock is not None:
            lock.release()


def train_from(start: str, config: Config, args: argparse.Namespace, runtime: Runtime) -> None:
    """Training from checkpoint `start` (none when empty): the model, the data, where they stand, the loop."""
    tc, dc = config.train, config.data
    training = build_training(config, runtime)
    iteration, epoch, batch_in_epoch = restore(training, start, args, runtime.is_main)
    train_set = Mel2Samp.from_config(dc, mode="train", seed=tc.seed)
    run = TrainingRun(
        training,
        train_set,
        EpochSampler(len(train_set), tc.batch_size, tc.seed, runtime.rank, runtime.world_size),
        config,
        args,
        runtime,
    )
    batches_per_epoch = run.sampler.batches_per_epoch
    if batches_per_epoch == 0:
        raise DataError(
            f"{dc.training_files}: {len(train_set)} clips cannot fill one batch of "
            f"{tc.batch_size} per process ({runtime.world_size} processes)"
        )
    epoch, batch_in_epoch, total = resume_position(iteration, epoch, batch_in_epoch, batches_per_epoch, tc)
    refuse_overwriting(run.folder, iteration)
    config_copy = json.dumps(config.raw, indent=4).encode()
    write_on_main(
        lambda: write_atomically(os.path.join(run.folder, "config.json"), config_copy),
        "config.json",
        run.folder,
        runtime,
    )
    if iteration >= total:
        if runtime.is_main:
            print(
                f"nothing to train: the run is at iteration {iteration}, its end is iteration {total} "
                f"(train_config.epochs, max_iterations)"
            )
        return
    run.run(iteration, epoch, batch_in_epoch, total)


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtime = None
    try:
        config = load_config(args.config)
        if args.checkpoint_path is not None:
            config.train.checkpoint_path = args.checkpoint_path
        if args.max_iterations is not None:
            config.train.max_iterations = args.max_iterations
        if args.compile:
            config.train.compile = True
        check_model_rules(config, training=not (args.synthesize or args.evaluate))
        runtime = setup_runtime(config, args.device)
        if args.synthesize or args.evaluate:
            if runtime.is_main:
                if args.synthesize:
                    synthesize(config, args, runtime.device)
                else:
                    evaluate(config, args, runtime.device, runtime.amp_dtype)
        else:
            train(config, args, runtime)
    except (ConfigError, DataError, CheckpointError, TrainingStopped, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file the command could not read or write, beyond those named above
        print(f"error: {'' if error.filename is None else f'{error.filename}: '}{describe(error)}", file=sys.stderr)
        return 1
    finally:
        if runtime is not None and runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
