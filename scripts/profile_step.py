"""Where one training step spends its time: the step of train.py, timed and profiled per kernel.

    python scripts/profile_step.py -c configs/nanoflow-h16-r128-emb512.json --device cuda --precision bf16
    python scripts/profile_step.py -c configs/demo.json --device cuda --compile --batch 8 --segment 8192

Runs train.py's training step (`TrainingStep`: the forward under autocast, compiled with --compile,
the loss, the backward, gradient clipping, the skip checks and Adam, as training runs them) on random
audio and mel of `--batch x --segment`:
`--warmup` untimed steps (cuDNN's algorithm search, compilation), then the median of `--steps` timed
steps, then one step under `torch.profiler` whose kernels are listed by their own device time
(CUDA kernels on a GPU, operators on a CPU). Run one precision per process: cuDNN's plan cache and
`cudnn.benchmark` choices are per process. `--json PATH` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import check_training_segment, synchronize
from config import ConfigError, check_model_rules, load_config
from storage import StorageError, check_output_file, write_atomically
from train import Runtime, TrainingStep, build_training, resolve_device, training_precision

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--device", default=None, help="default: a GPU when there is one, else the CPU")
    parser.add_argument(
        "--precision",
        choices=sorted(AMP_DTYPES),
        default=None,
        help="default: the config's (fp16_run, bf16_run) as train.py runs it here",
    )
    parser.add_argument("--batch", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--segment", type=int, default=None, help="default: the config's segment_length")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    parser.add_argument("--compile", action="store_true", help="as train.py --compile: the step's forward compiled")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "segment", "steps", "top"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device, None)
        if args.json:
            check_output_file(args.json, "JSON file")
        config = load_config(args.config)
        # The config's own segment_length is checked as training checks it; the flag's against n_height.
        check_model_rules(config, training=args.segment is None)
        if args.segment is not None:
            check_training_segment(args.segment, config, "--segment")
    except (ConfigError, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.compile:
        config.train.compile = True
    if args.precision is None:  # the config's, as train.py chooses it on this device
        amp_dtype, why_not = training_precision(config.train, device)
        if why_not is not None:
            print(f"warning: {why_not}", file=sys.stderr)
        args.precision = next(name for name, dtype in AMP_DTYPES.items() if dtype == amp_dtype)
    if args.precision == "fp16" and device.type != "cuda":
        print("error: fp16 training needs a CUDA device (bf16 runs on CPUs)", file=sys.stderr)
        return 1
    runtime = Runtime(device=device, amp_dtype=AMP_DTYPES[args.precision])
    training = build_training(config, runtime)
    batch = args.batch or config.train.batch_size
    segment = args.segment or config.data.segment_length
    generator = torch.Generator().manual_seed(0)
    audio = (torch.rand(batch, segment, generator=generator) * 2 - 1) * 0.5  # [B, T]
    mel = torch.randn(batch, config.waveflow.cin_channels, segment // config.data.hop_length + 1, generator=generator)

    training_step = TrainingStep(training, runtime, config)  # compiled as train.py compiles it, if asked

    def step() -> dict:
        return training_step((mel, audio))

    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    times, skipped = [], 0
    for _ in range(args.steps):
        synchronize(device)
        started = time.perf_counter()
        metrics = step()
        synchronize(device)
        times.append(time.perf_counter() - started)
        skipped += metrics["skipped"] is not None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=args.top, max_name_column_width=70)
    seconds = statistics.median(times)
    figures = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "compile": args.compile,
        "batch": batch,
        "segment": segment,
        "warmup_steps": args.warmup,
        "warmup_seconds": warmup_seconds,
        "step_seconds": seconds,
        "steps_per_second": 1 / seconds,
        "samples_per_second": batch * segment / seconds,
        "step_times": times,
        "skipped_steps": skipped,
    }
    print(
        f"{args.config} on {figures['device']}, {args.precision}{', compiled' if args.compile else ''}, "
        f"batch {batch} x {segment}: {seconds:.4f} s per step (median of {len(times)}; "
        f"{1 / seconds:.1f} it/s, {batch * segment / seconds / 1000:.0f} kHz), "
        f"{args.warmup} warm-up steps took {warmup_seconds:.1f} s, {skipped} steps skipped"
    )
    print(table)
    if args.json:
        write_atomically(args.json, json.dumps(figures, indent=2).encode(), durable=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
