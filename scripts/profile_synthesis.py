"""Where synthesis spends its time: `model.infer` timed and profiled per operator, grouped by kind.

    python scripts/profile_synthesis.py -c configs/nanoflow-h16-r128-emb512.json --dtype bf16
    python scripts/profile_synthesis.py -c configs/nanoflow-h16-r128-emb512.json --dtype fp32 --seconds 10 --json p.json

Synthesizes `--seconds` of audio at batch `--batch` from a random mel with the config's model (random
weights, weight norm folded, in `--dtype`, as bench.py does): `--warmup` untimed runs, the median of
`--repeats` timed runs, then one run under `torch.profiler` whose operators are listed by their own
time (CUDA kernels on a GPU) and summed into groups: the matrix products (the row step's width taps,
the output projection, the conditioning), the gate chain (sigmoid and its fused multiply-add), copies,
and the rest. The device's square matmul in the same dtype (`bench.py`'s yardstick) is measured too, so
that the matrix products' share can be read against what the machine's matrix units could do. On a
GPU the timed runs replay a CUDA graph (after at least two warm-up runs) and the profiled run is eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import (
    DTYPES,
    check_dtype_on,
    check_synthesis_seconds,
    device_name,
    matmul_gflops,
    synchronize,
    synthesis_flops_per_sample,
    synthesis_frames,
    timed,
)
from config import ConfigError, check_positive, load_config
from cuda_graphs import CudaGraphCache
from model import build_model, synthesis_length
from storage import StorageError, check_output_file, write_atomically
from train import resolve_device

# Operator names (without "aten::") per group; anything else is "other".
GROUPS = {
    "matrix products": {"baddbmm", "baddbmm_", "bmm", "mm", "addmm", "addmm_", "matmul", "linear"},
    "gate chain": {"sigmoid", "sigmoid_", "tanh", "tanh_", "addcmul", "mul"},
    "copies and fills": {"copy_", "fill_", "cat", "to", "_to_copy", "clone", "zero_"},
}


def group_of(name: str) -> str:
    op = name.removeprefix("aten::")
    return next((group for group, ops in GROUPS.items() if op in ops), "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--seconds", type=float, default=1.0, help="audio synthesized per run")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_positive({"--seconds": [args.seconds], "--threads": [args.threads]})
        device = resolve_device(args.device, None)
        check_dtype_on(device, DTYPES[args.dtype])
        if args.json:
            check_output_file(args.json, "JSON file")
        config = load_config(args.config, sections=("data_config", "waveflow_config"))
        check_synthesis_seconds([args.seconds], config)
    except (ConfigError, StorageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = build_model(config.waveflow).to(device).eval().remove_weight_norm().to(dtype)
    hop_length, rate = config.data.hop_length, config.data.sampling_rate
    frames = synthesis_frames(args.seconds, rate, hop_length)
    mel = torch.randn(args.batch, config.waveflow.cin_channels, frames, device=device, dtype=dtype)
    samples = args.batch * synthesis_length(frames, hop_length)
    graphs = CudaGraphCache() if device.type == "cuda" else None

    def run() -> None:
        model.infer(mel, cuda_graphs=graphs)

    # On a GPU the first run is eager and the second captures the graph that the timed runs replay, as in
    # bench.py; the profiled run is eager, so that its kernels are listed under their operators (a replay
    # shows one graph launch).
    warmup = max(args.warmup, 2) if graphs is not None else args.warmup
    times = timed(run, device, args.repeats, warmup, max_seconds=float("inf"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        model.infer(mel)
        synchronize(device)
    averages = profiler.key_averages()
    own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(event, own) for event in averages) or 1
    groups: dict[str, float] = {}
    for event in averages:
        group = group_of(event.key)
        groups[group] = groups.get(group, 0.0) + getattr(event, own) / total
    seconds = statistics.median(times)
    flops = samples * synthesis_flops_per_sample(model.config)
    yardstick = matmul_gflops(device, dtype, repeats=10)
    figures = {
        "config": args.config,
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "seconds_of_audio": args.seconds,
        "batch": args.batch,
        "seconds": seconds,
        "times": times,
        "kHz": samples / seconds / 1000,
        "gflops": flops / seconds / 1e9,
        "matmul_gflops": yardstick,
        "of_matmul": flops / seconds / 1e9 / yardstick,
        "shares": dict(sorted(groups.items(), key=lambda item: -item[1])),
        "operators": [
            {"name": event.key, "calls": event.count, "share": getattr(event, own) / total}
            for event in sorted(averages, key=lambda event: -getattr(event, own))[: args.top]
        ],
    }
    print(
        f"{args.config} on {figures['device']}, {args.dtype}, {figures['threads']} threads, "
        f"{args.seconds:g} s x {args.batch}: {seconds:.3f} s (median of {len(times)}), "
        f"{figures['kHz']:.1f} kHz, {figures['gflops']:.0f} GFLOP/s = {figures['of_matmul']:.2f} of its "
        f"{yardstick:.0f} GFLOP/s matmul"
    )
    print("shares of the profiled run: " + ", ".join(f"{k} {v:.1%}" for k, v in figures["shares"].items()))
    for op in figures["operators"]:
        print(f"  {op['name']:<28} {op['calls']:>7} calls  {op['share']:6.1%}")
    if args.json:
        write_atomically(args.json, json.dumps(figures, indent=2).encode(), durable=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
