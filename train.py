"""Train, evaluate and synthesize with WaveFlow / NanoFlow, driven by the original's JSON configs.

    python train.py -c configs/nanoflow-h16-r128-emb512.json   # train (again: resumes from the newest checkpoint)
    python train.py -v -c config.json [--json results.json]      # test-set log-likelihood and speech measures
    python train.py -v --mels mels/ -c config.json               # the measures for mels beside their audio
    python train.py -s -c config.json [-t 0.8]                   # synthesize the test clips
    python train.py -s --mels mels/ -c config.json               # synthesize precomputed mels (.pt, .npy)
    python train.py -s --mels mels/ --mel_scale log10 --mel_stats stats.npy -c config.json  # ... another model's
    python train.py -a 10 -s -c config.json                      # ... with the newest 10 checkpoints averaged
    python train.py -w -c config.json                            # warm start: weights only, fresh optimizer
    python train.py -c config.json --max_minutes 55              # stop, with a checkpoint, before 55 minutes
    torchrun --nproc_per_node=N train.py -c config.json          # DistributedDataParallel, one GPU per process

`main` dispatches to `train`, or to `evaluate` and `synthesize` (synthesis.py); bad input ends the
command with a one-line `error:` message and exit status 1. Training survives
what long runs meet: the same command after a crash or a preemption resumes
from the run folder's newest checkpoint; one process at a time trains into a
run folder; a full disk ends it in one line naming the newest intact
checkpoint, failing logs or samples are warnings. The run folder's machinery is
in run_folder.py, stopping and exact resumption in resumption.py, the files in
storage.py; this file reads as setup, the loop, the checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import (
    CheckpointError,
    average_checkpoints,
    check_same_features,
    checkpoint_path,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    warm_start,
)
from config import (
    SECTIONS,
    CommandParser,
    Config,
    ConfigError,
    TrainConfig,
    check_model_rules,
    load_config,
    parse_value,
)
from data import DataError, mel_filter_warning
from mel2samp import Mel2Samp
from mel_scale import MEL_SCALES
from model import SYNTHESIS_TRIM_FRAMES, WaveFlow, build_model, negative_log_likelihood
from resumption import EpochSampler, StopRequest, WallClockLimit, training_batches
from run_folder import claim_run_folder, refuse_overwriting, run_dir, write_on_main
from runtime import Runtime, global_any, has_bf16_matrix_units
from storage import StorageError, TrainingLogs, describe, first_line, warn, write_atomically
from streaming import CONTEXT_FRAMES, LOOKAHEAD_FRAMES
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


# ----------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandParser(description="WaveFlow / NanoFlow vocoder: train, evaluate, synthesize.")
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
        "--mel_scale",
        choices=list(MEL_SCALES),
        default="ln",
        help="with --mels: the log of the given mels; log10 (ESPnet, ParallelWaveGAN) and db are converted to the "
        "natural-log mel the vocoder takes (default ln: taken as they are)",
    )
    parser.add_argument(
        "--mel_stats",
        metavar="FILE",
        help="with --mels: the mels are normalised with these per-band statistics (ESPnet's feats_stats.npz, "
        "ParallelWaveGAN's stats.npy or stats.h5): undone before --mel_scale",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="with -v: also write the results as JSON to PATH ('-': to stdout, the table to stderr)",
    )
    parser.add_argument(
        "-o",
        "--output_dir",
        metavar="DIR",
        help="with -s: write the audio to DIR, made if missing "
        "(default: <train_config.output_directory>/samples/<model_name>/)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", *PRECISIONS],
        default="auto",
        help="with -s or -v: the estimator's precision in synthesis (the flow's state, log_s and "
        "the affine update stay fp32). auto (default): fp16 with fp16_run on a GPU, else bf16 "
        f"where the device has bf16 matrix units and res_channels >= {BF16_MIN_CHANNELS}, else fp32",
    )
    parser.add_argument(
        "--chunk_frames",
        type=int,
        default=0,
        metavar="N",
        help="with -s: streaming synthesis, the mel fed N frames at a time and the audio made in chunks of N "
        "frames, each once --lookahead_frames more have arrived (0, the default: whole clips at once)",
    )
    parser.add_argument(
        "--lookahead_frames",
        type=int,
        default=None,
        metavar="N",
        help=f"with --chunk_frames: mel frames waited for beyond a chunk (default {LOOKAHEAD_FRAMES})",
    )
    parser.add_argument(
        "--context_frames",
        type=int,
        default=None,
        metavar="N",
        help=f"with --chunk_frames: mel frames before a chunk synthesized again with it (default {CONTEXT_FRAMES})",
    )
    parser.add_argument(
        "--denoise",
        type=float,
        default=0.0,
        metavar="STRENGTH",
        help="with -s: subtract STRENGTH times the model's bias spectrum (its output for a silent mel) from "
        "the synthesis' magnitude spectrum (0, the default: off; WaveGlow's denoiser used 0.1)",
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
        "--max_minutes",
        type=float,
        default=None,
        metavar="M",
        help="override train_config.max_minutes: stop training, with a checkpoint, before M minutes have "
        "passed since the command started (0: no limit); the same command goes on",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device: cpu, cuda:N, or cuda, the current GPU (under torchrun, LOCAL_RANK's) "
        "(default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="override train_config.compile: compile the training step's forward with torch.compile",
    )
    args = parser.parse_args(argv)
    if args.evaluate and args.synthesize:
        parser.error("choose one of -v/--evaluate and -s/--synthesize")
    if args.mels and not (args.synthesize or args.evaluate):
        parser.error("--mels goes with -s/--synthesize or -v/--evaluate")
    if (args.mel_scale != "ln" or args.mel_stats) and not args.mels:
        parser.error("--mel_scale and --mel_stats go with --mels")
    if args.precision != "auto" and not (args.synthesize or args.evaluate):
        parser.error("--precision goes with -s/--synthesize or -v/--evaluate (training uses fp16_run/bf16_run)")
    if (args.synthesize or args.evaluate) and (
        args.warm_start or args.max_iterations is not None or args.max_minutes is not None
    ):
        parser.error("-w/--warm_start, --max_iterations and --max_minutes go with training, not -s or -v")
    if args.compile and (args.synthesize or args.evaluate):
        parser.error("--compile goes with training (-s and -v run the model uncompiled)")
    if (args.chunk_frames or args.denoise) and not args.synthesize:
        parser.error("--chunk_frames and --denoise go with -s/--synthesize")
    if args.chunk_frames < 0:
        parser.error("--chunk_frames must be >= 0")
    if (args.lookahead_frames is not None or args.context_frames is not None) and not args.chunk_frames:
        parser.error("--lookahead_frames and --context_frames go with --chunk_frames (streaming synthesis)")
    args.lookahead_frames = LOOKAHEAD_FRAMES if args.lookahead_frames is None else args.lookahead_frames
    args.context_frames = CONTEXT_FRAMES if args.context_frames is None else args.context_frames
    if args.lookahead_frames < SYNTHESIS_TRIM_FRAMES or args.context_frames < 0:
        parser.error(
            f"--lookahead_frames must be >= {SYNTHESIS_TRIM_FRAMES} (synthesis drops the last {SYNTHESIS_TRIM_FRAMES} "
            "frames' samples, which a stream knows only that far ahead) and --context_frames >= 0"
        )
    if not args.denoise >= 0 or math.isinf(args.denoise):  # NaN fails the first test
        parser.error("--denoise must be a number >= 0")
    if args.json and not args.evaluate:
        parser.error("--json goes with -v/--evaluate")
    if args.output_dir is not None and not args.synthesize:
        parser.error("-o/--output_dir goes with -s/--synthesize")
    if args.output_dir == "":
        parser.error("-o/--output_dir needs a folder")
    if args.epsilon is not None and not args.average_checkpoint:
        parser.error("-e/--epsilon goes with -a/--average_checkpoint")
    if args.temp is None:
        args.temp = 1.0 if args.synthesize else MEASURE_TEMPERATURE
    if not 0 < args.temp < math.inf:  # NaN fails it too
        parser.error("-t/--temp must be a positive number")
    if args.max_iterations is not None and args.max_iterations < 0:
        parser.error("--max_iterations must be >= 0")
    if args.max_minutes is not None and not 0 <= args.max_minutes < math.inf:
        parser.error("--max_minutes must be a number >= 0")
    return args


def resolve_device(name: str | None, local_rank: int | None) -> torch.device:
    """The device `--device` names (None: a GPU when there is one, else the CPU), a GPU with its
    index, as `torch.cuda.set_device` and DistributedDataParallel's `device_ids` need it: `cuda`
    alone is the process's own GPU under torchrun (`local_rank`), else the current one. A name
    that is no device, or a GPU this machine does not have, is a ConfigError."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device name (cpu, cuda, cuda:0, ...)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device {name}: not supported; the commands run on cpu or cuda")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device that PyTorch can use")
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if local_rank is None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        rank_note = f" (LOCAL_RANK {local_rank})" if device.index is None and local_rank is not None else ""
        raise ConfigError(
            f"--device {name}: no cuda:{index}{rank_note} on this machine, which has {count} CUDA "
            f"device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


TORCHRUN_VARIABLE = "TORCHELASTIC_RUN_ID"  # set by torchrun in every process it starts


def setup_runtime(config: Config, device_name: str | None, training: bool = True) -> Runtime:
    """Pick the device and precision; join the process group when launched by torchrun. Only training
    warns about a precision the device does not run (-v computes in the same precision, silently)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torchrun's processes join its group even when there is one (--nproc_per_node=1): the same DDP path as
    # several, which is how a machine of one GPU checks NCCL and DDP (scripts/gpu_check.sh).
    if (world_size > 1 or TORCHRUN_VARIABLE in os.environ) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    amp_dtype, why_not = training_precision(config.train, device)
    if why_not is not None and rank == 0 and training:
        warn(why_not)
    return Runtime(
        device=device, rank=rank, world_size=world_size, amp_dtype=amp_dtype, process_group=dist.is_initialized()
    )


def training_precision(train: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """The autocast dtype of training on `device` (None: fp32), and a warning when the config asked for
    a precision this device does not run: fp16 off CUDA, or bf16 on a CPU without bf16 instructions,
    where autocast emulates it about 11x slower than fp32 (demo step, 2-core AVX2 AMD EPYC)."""
    if train.fp16_run:
        if device.type == "cuda":
            return torch.float16, None
        return None, "fp16_run needs a CUDA device; training in fp32 on the CPU (bf16_run works on bf16 CPUs)"
    if train.bf16_run:
        if device.type == "cpu" and not has_bf16_matrix_units(device):
            return None, (
                "bf16_run: this CPU has no bf16 instructions (AVX-512 bf16 or AMX), where bf16 is emulated "
                "and several times slower than fp32; training in fp32"
            )
        return torch.bfloat16, None
    return None, None


# ----------------------------------------------------------------------------- training


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
    learning_rate = optimizer.param_groups[0]["lr"]  # this step's: after the schedule's step it is the next one's
    if skipped is None:
        scheduler.step()
    else:
        advance_schedule(scheduler)  # the schedule counts iterations, updates made or not
    return {
        "loss": loss_value.item(),
        "grad_norm": grad_norm.item(),
        "skipped": skipped,
        "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
        "learning_rate": learning_rate,
        "samples": audio.numel() * runtime.world_size,
    }


def advance_schedule(scheduler: torch.optim.lr_scheduler.StepLR) -> None:
    """Move the schedule one iteration on after a skipped update, exactly as `scheduler.step()` would (StepLR's
    own arithmetic: the rate times gamma every `step_size` iterations), but without stepping a scheduler whose
    optimizer made no step: PyTorch warns of that order when the first step of a run is skipped."""
    state = scheduler.state_dict()
    iteration = state["last_epoch"] + 1
    groups = scheduler.optimizer.param_groups
    rates = [group["lr"] * state["gamma"] if iteration % state["step_size"] == 0 else group["lr"] for group in groups]
    scheduler.load_state_dict(dict(state, last_epoch=iteration, _step_count=state["_step_count"] + 1, _last_lr=rates))
    for group, rate in zip(groups, rates, strict=True):
        group["lr"] = rate


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


# ----------------------------------------------------------------------------- starting point


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


def restore(
    training: Training,
    path: str,
    args: argparse.Namespace,
    verbose: bool,
    config: Config | None = None,
    world_size: int = 1,
) -> tuple[int, int, int]:
    """Load what checkpoint `path` (or with -a the folder) asks for; returns `(iteration, epoch,
    batch_in_epoch)` to start from (epoch -1 when the checkpoint does not record it), the batch counted
    in steps of this run (`world_size` processes of `config`'s batch size, `steps_taken`). A resume under a
    `config` whose data order differs from the checkpoint's run is said in one line."""
    if not path:
        return 0, 0, 0
    if not (args.warm_start or args.average_checkpoint):
        configured = training.scheduler.state_dict()
        checkpoint = load_checkpoint(path, training.model, training.optimizer, training.scheduler, training.scaler)
        if config is not None:
            check_same_features(config.data, checkpoint, path)
        changed = follow_the_configs_schedule(training, configured, checkpoint["iteration"])
        if verbose:
            print(f"resumed from {path} at iteration {checkpoint['iteration']}")
            if changed:
                print(changed)
            if config is not None and (reordered := data_order_changes(checkpoint, config, world_size)):
                print(reordered)
        epoch, batch_in_epoch = checkpoint.get("epoch", -1), checkpoint.get("batch_in_epoch", -1)
        if config is not None and epoch >= 0:
            batch_in_epoch, moved = steps_taken(checkpoint, config, world_size)
            if verbose and moved:
                print(moved)
        return (checkpoint["iteration"], epoch, batch_in_epoch)
    if args.average_checkpoint:
        weights, newest = average_checkpoints(path, args.average_checkpoint, args.epsilon)
        source = f"the average of the newest {args.average_checkpoint} checkpoints of {path}"
    else:
        newest = read_checkpoint(path)
        weights, source = newest["model"], path
    loaded, skipped = warm_start(training.model, weights, source)
    if verbose:
        print(
            f"warm start from {source}: {len(loaded)} tensors loaded, {len(skipped)} not"
            + "".join(f"\n  not loaded: {line}" for line in skipped)
        )
    # Numbering goes on from the source so that no checkpoint beside it is overwritten.
    return newest.get("iteration", 0), 0, 0


SCHEDULE_KEYS = ("base_lrs", "step_size", "gamma")  # what StepLR's state takes from the config


def follow_the_configs_schedule(training: Training, configured: dict, iteration: int) -> str | None:
    """After a resume from checkpoint `iteration`: the config's learning-rate schedule (`configured`, StepLR's
    state as built from it) at the step the stored schedule had reached, where the checkpoint stored another
    one; the stored state is kept when it is the config's, so that resuming stays exact. Returns the line that
    says which was used, or None. The schedule's steps are the iterations, except after -w or -a, whose
    fresh schedule counts from the source's iteration."""
    stored = training.scheduler.state_dict()
    if all(stored[key] == configured[key] for key in SCHEDULE_KEYS):
        return None
    steps = stored["last_epoch"]
    rates = [base * configured["gamma"] ** (steps // configured["step_size"]) for base in configured["base_lrs"]]
    training.scheduler.load_state_dict(dict(stored, **{key: configured[key] for key in SCHEDULE_KEYS}, _last_lr=rates))
    for group, base, rate in zip(training.optimizer.param_groups, configured["base_lrs"], rates, strict=True):
        group["initial_lr"], group["lr"] = base, rate
    counted = "" if steps == iteration else f" (its step {steps}: the schedule counts from {iteration - steps})"
    return (
        f"the checkpoint's learning-rate schedule ({describe_schedule(stored)}) is not the config's "
        f"({describe_schedule(configured)}): following the config's, learning rate {rates[0]:g} at iteration "
        f"{iteration}{counted}"
    )


DATA_ORDER_KEYS = (  # what fixes the batches of an epoch and their crops
    ("train_config", "batch_size"),
    ("train_config", "seed"),
    ("data_config", "training_files"),
    ("data_config", "segment_length"),
)


def stored_setting(checkpoint: dict, section: str, key: str):
    """Key `key` of section `section` of the config a checkpoint stores, as a config would parse it (2.0 is the
    batch size 2), or None where it stores none, or a value the key would refuse."""
    stored = checkpoint.get("config")
    values = stored.get(section) if isinstance(stored, dict) else None
    if not isinstance(values, dict) or values.get(key) is None:
        return None
    try:
        return parse_value(SECTIONS[section][1], key, values[key])
    except ConfigError:
        return None


def data_order_changes(checkpoint: dict, config: Config, world_size: int = 1) -> str | None:
    """The line that says a resume is not exact because `config` orders or crops the data otherwise than the
    checkpoint's stored config (the original's store none) did, or None. The batch counts as the clips a step
    takes, `batch_size x` processes: 2 processes of batch 4 take the clips of 1 process of batch 8."""
    differ = []
    for section, key in DATA_ORDER_KEYS:
        theirs, ours = stored_setting(checkpoint, section, key), getattr(getattr(config, SECTIONS[section][0]), key)
        if key == "batch_size" and theirs is not None:
            if theirs * checkpoint.get("world_size", world_size) == ours * world_size:
                continue
        if theirs is not None and theirs != ours:
            differ.append(f"{section}.{key} {json.dumps(theirs)} where the config has {json.dumps(ours)}")
    if not differ:
        return None
    return (
        f"the checkpoint's run had {', '.join(differ)}: training goes on at the checkpoint's place in the "
        "config's data order, not exactly where that run stopped"
    )


def steps_taken(checkpoint: dict, config: Config, world_size: int) -> tuple[int, str | None]:
    """The checkpoint's place in its epoch as steps of this run, and the line that says so where it moved.

    Every step takes the next `batch_size x world_size` clips of the epoch's order (`EpochSampler`: rank r
    the r-th of every `world_size`), so a run that took another number a step (its stored `batch_size`
    and `world_size`; a checkpoint that records neither took this run's) had taken `batch_in_epoch` times
    its number: this run goes on after as many whole steps of its own, at most a step's clips seen twice."""
    batch_in_epoch, now = checkpoint["batch_in_epoch"], config.train.batch_size * world_size
    stored_batch = stored_setting(checkpoint, "train_config", "batch_size")
    then_batch = stored_batch if isinstance(stored_batch, int) else config.train.batch_size
    then_world = checkpoint.get("world_size", world_size)
    then = then_batch * then_world
    if then == now or batch_in_epoch <= 0:
        return batch_in_epoch, None
    taken = batch_in_epoch * then
    steps = taken // now
    again = f"; the last {taken - steps * now} come again" if taken > steps * now else ""

    def clips_a_step(batch: int, processes: int) -> str:
        clips = "clip" if batch * processes == 1 else "clips"
        return f"{batch * processes} {clips} a step ({batch} x {processes} process{'es' if processes != 1 else ''})"

    return steps, (
        f"the checkpoint's run took {clips_a_step(then_batch, then_world)}, this one takes "
        f"{clips_a_step(config.train.batch_size, world_size)}: epoch {checkpoint['epoch']} goes on at step {steps}, "
        f"after the {taken} clips of its order that run had taken{again}"
    )


def describe_schedule(state: dict) -> str:
    """StepLR's state in the config's words."""
    return (
        f"learning_rate {state['base_lrs'][0]:g}, lr_decay_step {state['step_size']}, lr_decay_gamma {state['gamma']:g}"
    )


def resume_position(
    iteration: int, epoch: int, batch_in_epoch: int, batches_per_epoch: int, tc: TrainConfig
) -> tuple[int, int, int]:
    """Where the data order stands at `iteration`, and where the run ends: -> `(epoch, batch_in_epoch,
    last iteration)`. A checkpoint of the original code (epoch -1) records only its iteration, which
    then says where the data stood; a warm start counts epochs from 0 while its iterations go on from
    the source's numbering."""
    if epoch < 0:
        epoch, batch_in_epoch = divmod(iteration, batches_per_epoch)
    elif batch_in_epoch > batches_per_epoch:
        raise ConfigError(
            f"the checkpoint stopped after batch {batch_in_epoch} of epoch {epoch}, but an epoch has "
            f"{batches_per_epoch} batches now (train_config.batch_size or data_config.training_files changed): "
            "go on from it with -w/--warm_start, or restore them"
        )
    first_iteration = iteration - (epoch * batches_per_epoch + batch_in_epoch)
    total = first_iteration + tc.epochs * batches_per_epoch
    if tc.max_iterations:
        total = min(total, tc.max_iterations)
    return epoch, batch_in_epoch, total


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


def worker_message(error: Exception) -> str:
    """The message of `error`; for one raised in a DataLoader worker, which PyTorch raises again in the
    main process with the worker's traceback in its message, the worker's own (one-line) message."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    return re.sub(r"^[\w.]*: ", "", text.rstrip().splitlines()[-1], count=1)  # "data.DataError: <message>"


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
        limit: WallClockLimit,
        start: str = "",
    ):
        """`start`: the checkpoint the run starts from (empty: none; with -a, the folder averaged)."""
        self.training, self.train_set, self.sampler = training, train_set, sampler
        self.config, self.args, self.runtime, self.limit = config, args, runtime, limit
        self.folder = run_dir(config)
        self.report = CheckpointReport(config, runtime.device, runtime.amp_dtype) if runtime.is_main else None
        self.skipped_steps = SkippedSteps(config.train.max_bad_steps)
        self.logs: TrainingLogs | None = None
        self.loader: Generator[tuple[torch.Tensor, torch.Tensor], None, None] | None = None  # see `batches`
        self.saved_at = 0
        if not start:
            self.last_good = "none"
        elif args.average_checkpoint:
            averaged = f"the newest {args.average_checkpoint} of {start}"
            self.last_good = f"none (the run started from the average of {averaged})"
        else:
            self.last_good = start  # until this run writes one: where it started, which may be elsewhere

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
                world_size=self.runtime.world_size,
                scaler=training.scaler,
            )
            print(f"saved {path}")

        with self.limit.timing("save"):
            write_on_main(write, f"checkpoint {os.path.basename(path)}", self.folder, self.runtime)
        self.saved_at, self.last_good = iteration, path

    def checkpoint(self, iteration: int, epoch: int, batch_in_epoch: int) -> None:
        """Save, then report the test loss and measures (rank 0) while the other ranks wait."""
        self.save(iteration, epoch, batch_in_epoch)
        with self.limit.timing("report"):
            if self.report is not None:
                self.report(self.training.model, self.logs, iteration, self.args.temp)
            if self.runtime.distributed:
                dist.barrier()
        self.training.model.train()

    def record(self, metrics: dict, iteration: int, seconds: float, progress: tqdm) -> None:
        """A step's metrics to the progress bar and the logs; a skipped update warned and counted."""
        if metrics["skipped"] and self.runtime.is_main:
            warn(skipped_step_warning(metrics, iteration))
        self.skipped_steps.record(metrics["skipped"], iteration, self.last_good)
        if self.runtime.is_main:
            speed = metrics["samples"] / seconds / 1000
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", kHz=f"{speed:.1f}", refresh=False)
            progress.update()
            if self.logs is not None:
                for key in ("loss", "grad_norm", "learning_rate"):
                    self.logs.add("scalar", f"training/{key}", metrics[key], iteration)

    def unsaved_streak(self, iteration: int) -> bool:
        """Whether `iteration` ends a streak of skipped steps, which no checkpoint is written in the middle of
        (resumed, it would start the streak's count again); the line that says so, on rank 0."""
        streak = self.skipped_steps.in_a_row
        if streak and self.runtime.is_main:
            warn(
                f"no checkpoint at iteration {iteration}: its last {streak} step{'s' if streak != 1 else ''} "
                f"were skipped for a non-finite loss or gradient; the last good checkpoint is {self.last_good}"
            )
        return streak > 0

    def stop_early(self, iteration: int, epoch: int, batch_in_epoch: int, out_of_time: bool, progress: tqdm) -> None:
        """Stop after `iteration` (a signal, or the wall-clock limit when `out_of_time`) with its checkpoint."""
        if self.saved_at != iteration and not self.unsaved_streak(iteration):
            self.save(iteration, epoch, batch_in_epoch)
        if out_of_time and self.runtime.is_main:
            progress.close()
            print(
                f"wall-clock limit: stopped at iteration {iteration} after {self.limit.elapsed() / 60:.2f} of "
                f"{self.config.train.max_minutes:g} min; the same command resumes"
            )

    def run(self, iteration: int, start_epoch: int, batch_in_epoch: int, total: int) -> None:
        """Train from `iteration` (batch `batch_in_epoch` of `start_epoch`) to iteration `total`, or until
        Ctrl-C, SIGTERM or the wall-clock limit; a checkpoint every `iters_per_checkpoint` iterations and
        one at the end."""
        tc, runtime, training, limit = self.config.train, self.runtime, self.training, self.limit
        self.saved_at = iteration
        if runtime.is_main and tc.with_tensorboard:
            self.logs = TrainingLogs(os.path.join(self.folder, "logs"))
        progress = tqdm(
            total=total, initial=min(iteration, total), unit="it", disable=not runtime.is_main, dynamic_ncols=True
        )
        step = TrainingStep(training, runtime, self.config)
        stop = StopRequest()
        position = (start_epoch, batch_in_epoch)  # (epoch, batches done in it) after the last step
        limit.begin_steps()
        try:
            for epoch in range(start_epoch, tc.epochs):
                for batch in self.batches(epoch, batch_in_epoch):
                    started = time.perf_counter()
                    metrics = step(batch)
                    iteration, batch_in_epoch = iteration + 1, batch_in_epoch + 1
                    position = (epoch, batch_in_epoch)
                    self.record(metrics, iteration, time.perf_counter() - started, progress)
                    limit.step_done()
                    diverging = self.skipped_steps.in_a_row > 0  # no checkpoint in the middle of a streak
                    if iteration % tc.iters_per_checkpoint == 0 and not diverging:
                        self.checkpoint(iteration, epoch, batch_in_epoch)
                    if iteration >= total:
                        break
                    reports_next = (iteration + 1) % tc.iters_per_checkpoint == 0 or iteration + 1 >= total
                    out_of_time = limit.leaves_no_time(with_report=reports_next)
                    if global_any(stop.requested or out_of_time, runtime):
                        self.stop_early(iteration, epoch, batch_in_epoch, global_any(out_of_time, runtime), progress)
                        return
                if iteration >= total:
                    break
                batch_in_epoch = 0
            if self.saved_at != iteration and not self.unsaved_streak(iteration):
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
            if self.loader is not None:
                self.loader.close()  # its workers end with it
                self.loader = None
            stop.restore()
            progress.close()
            if self.logs is not None:
                self.logs.close()

    def batches(self, epoch: int, skip_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` after the first `skip_batches`, in the order fixed by (seed, epoch): the
        first call starts `training_batches` for the rest of the run, each later call (epoch after
        epoch) reads on."""
        if self.loader is None:
            self.loader = training_batches(
                self.train_set,
                self.sampler,
                (epoch, skip_batches),
                self.config.train.epochs,
                self.config.data.num_workers,
                pin_memory=self.runtime.device.type == "cuda",
            )
        self.training.model.train()
        return itertools.islice(self.loader, self.sampler.batches_per_epoch - skip_batches)


def train(config: Config, args: argparse.Namespace, runtime: Runtime, limit: WallClockLimit) -> None:
    """Train into the run folder, which rank 0 holds locked until the run ends."""
    if (args.warm_start or args.average_checkpoint) and not config.train.checkpoint_path:
        option = "-w/--warm_start needs a checkpoint" if args.warm_start else "-a needs a folder of checkpoints"
        raise ConfigError(
            f"{config.source}: {option} to start from: train_config.checkpoint_path is empty "
            f"(or give --checkpoint_path)"
        )
    # The data first: a file list that cannot train is said before the run folder is made.
    tc, dc = config.train, config.data
    train_set = Mel2Samp.from_config(dc, mode="train", seed=tc.seed)
    sampler = EpochSampler(len(train_set), tc.batch_size, tc.seed, runtime.rank, runtime.world_size)
    if sampler.batches_per_epoch == 0:
        raise DataError(
            f"{dc.training_files}: {len(train_set)} clip{'s' if len(train_set) != 1 else ''} cannot fill one "
            f"batch of {tc.batch_size} per process ({runtime.world_size} "
            f"process{'es' if runtime.world_size != 1 else ''})"
        )
    lock, start = claim_run_folder(config, args, runtime)
    try:
        train_from(start, config, args, runtime, limit, train_set, sampler)
    finally:
        if lock is not None:
            lock.release()


def train_from(
    start: str,
    config: Config,
    args: argparse.Namespace,
    runtime: Runtime,
    limit: WallClockLimit,
    train_set: Mel2Samp,
    sampler: EpochSampler,
) -> None:
    """Training from checkpoint `start` (none when empty) on `train_set` in `sampler`'s order (at least one
    batch an epoch): the model, where it and the data stand, the loop."""
    tc = config.train
    training = build_training(config, runtime)
    iteration, epoch, batch_in_epoch = restore(training, start, args, runtime.is_main, config, runtime.world_size)
    run = TrainingRun(training, train_set, sampler, config, args, runtime, limit, start)
    batches_per_epoch = sampler.batches_per_epoch
    try:
        epoch, batch_in_epoch, total = resume_position(iteration, epoch, batch_in_epoch, batches_per_epoch, tc)
    except ConfigError as error:
        raise ConfigError(f"{start}: {error}") from None
    refuse_overwriting(run.folder, iteration, start if args.warm_start or args.average_checkpoint else None)
    config_copy = json.dumps(config.raw, indent=4).encode()
    write_on_main(
        lambda: write_atomically(os.path.join(run.folder, "config.json"), config_copy),
        "config.json",
        run.folder,
        runtime,
    )
    if iteration >= total:
        if runtime.is_main:
            numbered = (
                f"; -w and -a number on from their source's iteration {iteration}: an end past it trains"
                if args.warm_start or args.average_checkpoint
                else ""
            )
            print(
                f"nothing to train: the run is at iteration {iteration}, its end is iteration {total} "
                f"(train_config.epochs, max_iterations){numbered}"
            )
        return
    if global_any(limit.passed(), runtime):
        if runtime.is_main:
            print(
                f"wall-clock limit: {config.train.max_minutes:g} min passed before the first step (setup took "
                f"{limit.elapsed() / 60:.2f} min); nothing trained"
            )
        return
    run.run(iteration, epoch, batch_in_epoch, total)


# ----------------------------------------------------------------------------- entry point


def read_config(path: str) -> Config:
    """`load_config`, its warnings said once: under torchrun every process reads the config, and only rank 0's
    go to stderr (an error is every process's)."""
    if os.environ.get("RANK", "0") == "0":
        return load_config(path)
    with contextlib.redirect_stderr(io.StringIO()):
        return load_config(path)


def main(argv: list[str] | None = None, clock: Callable[[], float] = time.monotonic) -> int:
    started = clock()  # --max_minutes counts from here
    args = parse_args(argv)
    runtime = None
    try:
        config = read_config(args.config)
        if args.checkpoint_path is not None:
            config.train.checkpoint_path = args.checkpoint_path
        if args.max_iterations is not None:
            config.train.max_iterations = args.max_iterations
        if args.max_minutes is not None:
            config.train.max_minutes = args.max_minutes
        if args.compile:
            config.train.compile = True
        check_model_rules(config, training=not (args.synthesize or args.evaluate))
        runtime = setup_runtime(config, args.device, training=not (args.synthesize or args.evaluate))
        if runtime.is_main and (message := mel_filter_warning(config.data)) is not None:
            warn(message)
        if args.synthesize or args.evaluate:
            if runtime.is_main:
                if args.synthesize:
                    synthesize(config, args, runtime.device)
                else:
                    evaluate(config, args, runtime.device, runtime.amp_dtype)
        else:
            train(config, args, runtime, WallClockLimit(config.train.max_minutes, started, clock))
    except (ConfigError, DataError, CheckpointError, TrainingStopped, StorageError) as error:
        print(f"error: {worker_message(error)}", file=sys.stderr)
        return 1
    except OSError as error:  # a file the command could not read or write, beyond those named above
        print(f"error: {'' if error.filename is None else f'{error.filename}: '}{describe(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training's own handler (setup), in -s or -v, or a second one
        print("interrupted (Ctrl-C); files written so far are whole", file=sys.stderr)
        return 130
    finally:
        if runtime is not None and runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
