"""onnxruntime against PyTorch: the speed of synthesis on the CPU, same model, same inputs, same threads.

    python scripts/bench_onnx.py -c configs/nanoflow-h16-r128-emb512.json configs/demo.json

For each config, a model with random weights (speed does not depend on them) is exported as export.py
exports it; then for each length, batch 1, PyTorch's `model.infer(mel, z=z)` and an onnxruntime CPU
session on the same mel and noise run in turn, in one process, both with `--threads` threads (PyTorch's
intra-op threads; onnxruntime's intra-op pool, one inter-op thread), after one untimed run of each on the
shortest length; a case stops repeating after --max_seconds.
Prints a Markdown table of median wall times, real-time factors (seconds of audio per second), the
ratio (onnxruntime time / PyTorch time) and the largest difference between the two outputs, and how
long the export took.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError, check_model_rules, check_positive, load_config
from export import ExportError, export_onnx, noise_shape, onnxruntime_module
from model import SYNTHESIS_TRIM_FRAMES, build_model


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="onnxruntime against PyTorch, synthesis on the CPU.")
    parser.add_argument("-c", "--configs", nargs="+", required=True)
    parser.add_argument("--seconds", type=float, nargs="+", default=[1.0, 10.0], help="audio lengths")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts, each measured")
    parser.add_argument("--max_seconds", type=float, default=120.0, help="stop repeating a case after this long")
    args = parser.parse_args(argv)
    try:  # every config and flag before the first export, which takes a while
        check_positive({"--seconds": args.seconds, "--repeats": [args.repeats], "--threads": args.threads})
        if not args.max_seconds >= 0:
            raise ConfigError(f"--max_seconds must be >= 0, got {args.max_seconds:g}")
        configs = [(path, load_config(path)) for path in args.configs]
        for _, config in configs:
            check_model_rules(config, training=False)
        onnxruntime = onnxruntime_module("scripts/bench_onnx.py")
        run(args, configs, onnxruntime)
    except (ConfigError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, configs: list, onnxruntime) -> None:
    """The table of every config, length and thread count; then how long each export took."""
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(
        f"batch 1, fp32, median of up to {args.repeats} alternating runs "
        f"(fewer past {args.max_seconds:g} s) after one warm-up run of each on the shortest length\n"
    )
    print("| config | threads | audio | PyTorch | onnxruntime | PyTorch RTF | onnxruntime RTF | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    exports = []
    for path, config in configs:
        rate, hop = config.data.sampling_rate, config.data.hop_length  # the config's, as synthesis runs it
        torch.manual_seed(0)
        model = build_model(config.waveflow).remove_weight_norm().eval()
        started = time.perf_counter()
        data = export_onnx(model)
        exports.append(
            f"{os.path.basename(path)}: export {time.perf_counter() - started:.0f} s, {len(data) / 2**20:.1f} MiB"
        )
        cases = [(threads, seconds) for threads in args.threads for seconds in sorted(args.seconds)]
        for index, (threads, seconds) in enumerate(cases):
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            torch.set_num_threads(threads)
            frames = math.ceil(seconds * rate / hop) + SYNTHESIS_TRIM_FRAMES
            generator = torch.Generator().manual_seed(1)
            mel = torch.randn(1, config.waveflow.cin_channels, frames, generator=generator)
            z = torch.randn(noise_shape(model, 1, frames), generator=generator)
            feeds = {"mel": mel.numpy(), "z": z.numpy()}
            times: dict[str, list[float]] = {"torch": [], "onnx": []}
            outputs = {}
            # One untimed run of each on the first length only (one of 10 s takes minutes on a busy CPU), then
            # alternating timed runs until --repeats or --max_seconds.
            warmup = 1 if index == 0 else 0
            started_case = time.perf_counter()
            for repeat in range(warmup + args.repeats):
                for name in ("torch", "onnx"):
                    started = time.perf_counter()
                    if name == "torch":
                        outputs[name] = model.infer(mel, z=z)
                    else:
                        outputs[name] = torch.from_numpy(session.run(None, feeds)[0])
                    if repeat >= warmup:
                        times[name].append(time.perf_counter() - started)
                if repeat >= warmup and time.perf_counter() - started_case > args.max_seconds:
                    break
            difference = (outputs["onnx"] - outputs["torch"]).abs().max().item()
            audio = outputs["torch"].shape[-1] / rate
            torch_time, onnx_time = statistics.median(times["torch"]), statistics.median(times["onnx"])
            print(
                f"| {os.path.basename(path)} | {threads} | {audio:.2f} s | {torch_time:.2f} s | {onnx_time:.2f} s | "
                f"{audio / torch_time:.2f}x | {audio / onnx_time:.2f}x | {onnx_time / torch_time:.2f} | "
                f"{difference:.1e} |",
                flush=True,
            )
    print()
    for line in exports:
        print(line)


if __name__ == "__main__":
    sys.exit(main())
