"""Benchmark: synthesis and training speed against the device's own matrix-multiply throughput.

    python bench.py -c configs/nanoflow-h16-r128-emb512.json               # table
    python bench.py -c configs/nanoflow-h16-r128-emb512.json --json        # JSON
    python bench.py -c config.json --device cuda --dtype fp16              # GPU, half precision

The estimator's convolutions dominate both directions, so the useful arithmetic
per audio sample (a multiply-add counts 2, R = res_channels, L = n_layer,
K = n_flow) is `K * 2 * (R + 20 * L * R^2 + 2 * R) + 2 * 80 * 2 * R * L` in
synthesis (the conditioning projected once), and three times that per sample
in a training step. Every figure is divided by the throughput of a square
matmul in the same dtype (2048 x 2048 on a CPU; 8192 x 8192 on a GPU, where a
smaller one measures the launch, not the tensor cores), and by that of a bf16
one where the device has bf16 matrix units (tensor cores, AMX, AVX-512 bf16),
measured in the same run before and after the workloads. Times are
medians over repeated runs after warm-up runs (synthesis warms up on the
shortest length); cases that take longer than --max_seconds stop repeating.
The `best_` figures are each case's fastest run against the yardstick's fastest
run: on a machine whose speed swings between spells (a shared cloud VM: this
project's 2-core AMX Xeon measured its bf16 yardstick at 311 to 2,816 GFLOP/s
within an hour) they are what it gives in a fast spell, where the medians mix
the spells. `paired_fraction_of_matmul` divides each run by the yardstick read
just before and just after it (a few products of the same square matmul, in the
case's dtype), the median over runs: a share of the machine that does not depend
on the spell the run fell in.
Data loading is the real `Mel2Samp` loader on the bundled demo corpus (for a
config at another rate than the demo's 22,050 Hz, on the config's training list): in the
main process, i.e. the CPU work one batch costs, and as training reads it
(`train.training_batches`, over many of the demo's 3-batch epochs) with each
of --loader_workers worker processes, in batches per second.
`--compile` adds the training step compiled as `train.py --compile` compiles
it, timed alternately with an eager one (`speedup`), and its first step, which
compiles. Bad input (a flag out of range, a config train.py would refuse, fp16 on
a CPU) ends the command in one `error:` line before anything is measured.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import replace

import torch

from config import CommandParser, ConfigError, check_model_rules, check_positive, load_config
from cuda_graphs import CudaGraphCache
from data import DataError
from mel2samp import Mel2Samp, collate
from model import SYNTHESIS_TRIM_FRAMES, build_model, negative_log_likelihood, synthesis_length
from resumption import EpochSampler, training_batches
from runtime import has_bf16_matrix_units
from storage import describe
from train import compile_mode, resolve_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEMO_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo", "train_files.txt")
DEMO_RATE = 22050


def loading_list(config) -> str:
    """The file list the loading cases read: the demo corpus, or the config's own at another rate."""
    return DEMO_LIST if config.data.sampling_rate == DEMO_RATE else config.data.training_files


def loading_dataset(config, segment: int) -> Mel2Samp:
    """The dataset of `loading_list` that the loading cases read, in `segment`-sample crops."""
    data = replace(config.data, segment_length=segment)
    return Mel2Samp.from_config(data, mode="train", file_list=loading_list(config), seed=0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device, repeats: int, warmup: int, max_seconds: float) -> list[float]:
    """Wall times of `run()` after `warmup` untimed calls; fewer repeats for slow cases."""
    for _ in range(warmup):
        run()
    times = []
    while len(times) < repeats:
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if sum(times) > max_seconds:
            break
    return times


def matmul_size(device: torch.device, size: int | None = None) -> int:
    """The side of the square matmul yardstick: `size`, or by default 8192 on a GPU and 2048 on a CPU."""
    if size is not None:
        return size
    return 8192 if device.type == "cuda" else 2048


def with_best(result: dict, times: list[float], samples: int) -> dict:
    """`result` with its fastest run of `times` (`samples` audio samples each): `best_seconds`, `best_kHz`."""
    return {**result, "best_seconds": min(times), "best_kHz": samples / min(times) / 1000}


class Yardstick:
    """A square matmul (`matmul_size`), the yardstick for every figure: `matmul_runs` times it before and
    after the workloads, and `reading()`, the median GFLOP/s of `products` of them (a few tens of
    milliseconds on a CPU), beside each timed run."""

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int | None = None, products: int = 3):
        size = matmul_size(device, size)
        self.device, self.products, self.flops = device, products, 2 * size**3
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.out = self.a @ self.b  # warm; its product written here, so that no reading adds to a peak of memory

    def product(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    def reading(self) -> float:
        times = timed(self.product, self.device, self.products, warmup=0, max_seconds=math.inf)
        return self.flops / statistics.median(times) / 1e9


def matmul_runs(device: torch.device, dtype: torch.dtype, repeats: int = 30, size: int | None = None) -> list[float]:
    """The throughput, in GFLOP/s, of each timed run of the `Yardstick`'s square matmul (`matmul_size`), the
    yardstick for every figure."""
    yardstick = Yardstick(device, dtype, size)
    times = timed(yardstick.product, device, repeats, warmup=5, max_seconds=60)
    return [yardstick.flops / elapsed / 1e9 for elapsed in times]


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 30) -> float:
    """The median of `matmul_runs`."""
    return statistics.median(matmul_runs(device, dtype, repeats))


def paired_timed(
    run, device: torch.device, repeats: int, warmup: int, max_seconds: float, yardstick: Yardstick
) -> tuple[list[float], list[float]]:
    """`timed`, with the yardstick read before every run and after the last: `(times, readings)`,
    `len(readings) == len(times) + 1`."""
    for _ in range(warmup):
        run()
    times, readings = [], [yardstick.reading()]
    while len(times) < repeats:
        times += timed(run, device, 1, 0, max_seconds)
        readings.append(yardstick.reading())
        if sum(times) > max_seconds:
            break
    return times, readings


def with_paired(result: dict, times: list[float], readings: list[float]) -> dict:
    """`result` (its `gflops` at its median `seconds`) with `paired_fraction_of_matmul`: the median over runs
    of each run's GFLOP/s over the mean of the yardstick readings just before and after it."""
    flops = result["gflops"] * result["seconds"]  # GFLOP a run
    shares = [
        flops / t / ((before + after) / 2) for t, before, after in zip(times, readings[:-1], readings[1:], strict=True)
    ]
    return {**result, "paired_fraction_of_matmul": statistics.median(shares)}


def device_name(device: torch.device) -> str:
    """The processor or GPU by name, for the record."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu ({model})" if model else "cpu"


# Allocators that replace the C library's malloc when preloaded (LD_PRELOAD), by the name of their library.
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator(maps: str | None = None) -> str:
    """The memory allocator of this process, for the record: a preloaded one (jemalloc, tcmalloc,
    mimalloc) found among the libraries it has mapped (`maps`: /proc/self/maps by default), else the
    C library's. oneDNN's products take a scratchpad from it on every call: on the 2-core AMX Xeon a
    small bf16 product cost about 29 us a call with glibc's malloc and 18 with jemalloc's."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return "unknown"
    names = {os.path.basename(line.split()[-1]) for line in maps.splitlines() if "/" in line}
    return next((name for name in ALLOCATORS if any(f"lib{name}" in lib for lib in names)), "the C library's")


def synthesis_flops_per_sample(config) -> int:
    r, layers, flows = config.res_channels, config.n_layer, config.n_flow
    return flows * 2 * (r + 20 * layers * r * r + 2 * r) + 2 * config.cin_channels * 2 * r * layers


class PeakMemory:
    """Peak memory of a block: CUDA's allocator statistics, or the growth of the process's resident
    set on CPU (Linux resets its high-water mark through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            # Freed memory that the C allocator keeps would hide a later case's growth: give it back first.
            gc.collect()
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = self._resident()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = self._high_water() - self.base

    @staticmethod
    def _resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def _high_water() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthesis_frames(seconds: float, rate: int, hop_length: int) -> int:
    """Mel frames that synthesize about `seconds` of audio at `rate` Hz."""
    return round(seconds * rate / hop_length) + SYNTHESIS_TRIM_FRAMES


def check_dtype_on(device: torch.device, dtype: torch.dtype) -> None:
    """`--dtype` fp16 only on a CUDA device (a ConfigError): a CPU emulates fp16, minutes a case."""
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(
            "--dtype fp16 needs a CUDA device (a CPU emulates fp16, minutes a case); use fp32, or bf16 on a CPU "
            "with bf16 instructions"
        )


def check_synthesis_seconds(lengths: list[float], config) -> None:
    """Each of `--seconds` (a ConfigError naming it) a synthesis of a positive multiple of n_height samples."""
    model = config.waveflow
    for seconds in lengths:
        samples = synthesis_length(
            synthesis_frames(seconds, config.data.sampling_rate, model.hop_length), model.hop_length
        )
        if samples <= 0 or samples % model.n_height:
            raise ConfigError(
                f"--seconds {seconds:g} gives {samples} samples, which must be positive and a multiple of "
                f"waveflow_config.n_height ({model.n_height})"
            )


def check_training_segment(segment: int, config, flag: str) -> None:
    """A training crop of `segment` samples (`flag` names it in the ConfigError) a multiple of n_height."""
    n_height = config.waveflow.n_height
    if segment % n_height:
        raise ConfigError(
            f"{flag} {segment} must be a multiple of waveflow_config.n_height ({n_height}): "
            f"the model folds the audio into n_height rows"
        )


def check_lengths(args: argparse.Namespace, config, cases: set[str]) -> None:
    """The lengths the flags ask for, against what the model and the mel need (a ConfigError naming the flag):
    each synthesis a positive multiple of n_height samples; the training crop a multiple of n_height (the
    model folds the audio into n_height rows) and longer than the mel's reflect padding."""
    data = config.data
    if "synthesis" in cases:
        check_synthesis_seconds(args.seconds, config)
    segment = args.segment_length
    if segment is not None and "training" in cases:
        check_training_segment(segment, config, "--segment_length")
    if segment is not None and "loading" in cases and segment <= data.filter_length // 2:
        raise ConfigError(
            f"--segment_length {segment} must exceed data_config.filter_length / 2 ({data.filter_length // 2}) "
            f"for the mel spectrogram's reflect padding"
        )


def bench_synthesis(
    model,
    device,
    dtype,
    seconds: float,
    batch: int,
    warmup: int,
    graphs: CudaGraphCache | None,
    rate: int,
    yardstick: Yardstick,
    args,
) -> dict:
    """Synthesis of `seconds` of audio at `rate` Hz, `batch` clips at once."""
    hop_length = model.config.hop_length
    frames = synthesis_frames(seconds, rate, hop_length)
    mel = torch.randn(batch, model.config.cin_channels, frames, device=device, dtype=dtype)
    samples = batch * synthesis_length(frames, hop_length)
    with PeakMemory(device) as memory:
        times, readings = paired_timed(
            lambda: model.infer(mel, cuda_graphs=graphs), device, args.repeats, warmup, args.max_seconds, yardstick
        )
    elapsed = statistics.median(times)
    flops = samples * synthesis_flops_per_sample(model.config)
    result = {
        "case": f"synthesis {seconds:g} s x {batch}",
        "seconds": elapsed,
        "runs": len(times),
        "kHz": samples / elapsed / 1000,
        "real_time_factor": samples / rate / elapsed,
        "gflops": flops / elapsed / 1e9,
        "peak_memory_mb": memory.peak / 2**20,
    }
    return with_paired(with_best(result, times, samples), times, readings)


def training_step(config, device, dtype, batch: int, segment: int, checkpointing: bool, compiled: bool):
    """One training step of a fresh model on a fixed batch, its forward compiled as `train.py --compile`
    compiles it when `compiled`."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train.py does: one segment size
    model = build_model(replace(config.waveflow, gradient_checkpointing=checkpointing)).to(device).train()
    forward = torch.compile(model.forward, dynamic=False, mode=compile_mode(device, False)) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    audio = (torch.rand(batch, segment, device=device) * 2 - 1) * 0.5
    mel = torch.randn(batch, config.waveflow.cin_channels, segment // config.data.hop_length + 1, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            z, logdet = forward(audio, mel)
        scaler.scale(negative_log_likelihood(z, logdet)).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def training_result(name: str, times: list[float], config, batch: int, segment: int) -> dict:
    elapsed = statistics.median(times)
    samples = batch * segment
    flops = 3 * samples * synthesis_flops_per_sample(config.waveflow)
    result = {
        "case": name,
        "seconds": elapsed,
        "runs": len(times),
        "kHz": samples / elapsed / 1000,
        "gflops": flops / elapsed / 1e9,
    }
    return with_best(result, times, samples)


def bench_training(
    config, device, dtype, batch: int, segment: int, checkpointing: bool, yardstick: Yardstick, args
) -> dict:
    step = training_step(config, device, dtype, batch, segment, checkpointing, compiled=False)
    with PeakMemory(device) as memory:
        times, readings = paired_timed(step, device, args.repeats, args.warmup, args.max_seconds, yardstick)
    name = f"training {batch} x {segment}" + (" checkpointed" if checkpointing else "")
    result = with_paired(training_result(name, times, config, batch, segment), times, readings)
    return {**result, "peak_memory_mb": memory.peak / 2**20}


def bench_compiled_training(config, device, dtype, batch: int, segment: int, args) -> dict:
    """The step compiled as `train.py --compile` compiles it, timed alternately with an eager one, so that
    a drifting machine slows both alike (`speedup`: the eager median over the compiled one), and its first
    step, which compiles (`first_step_seconds`)."""
    eager = training_step(config, device, dtype, batch, segment, False, compiled=False)
    compiled = training_step(config, device, dtype, batch, segment, False, compiled=True)
    first = timed(compiled, device, 1, 0, args.max_seconds)[0]
    warmup = max(args.warmup, 2 if device.type == "cuda" else 1)  # CUDA graphs are recorded at the second call
    for step in (eager, compiled):
        timed(step, device, 0, warmup, args.max_seconds)  # warm-up runs only
    eager_times, compiled_times = [], []
    while len(compiled_times) < args.repeats and sum(eager_times + compiled_times) <= args.max_seconds:
        eager_times += timed(eager, device, 1, 0, args.max_seconds)
        compiled_times += timed(compiled, device, 1, 0, args.max_seconds)
    result = training_result(f"training {batch} x {segment} compiled", compiled_times, config, batch, segment)
    result["speedup"] = statistics.median(eager_times) / result["seconds"]
    result["first_step_seconds"] = first
    return result


def bench_loading(dataset: Mel2Samp, batch: int, args) -> dict:
    indices = [i % len(dataset) for i in range(batch)]
    times = timed(
        lambda: collate([dataset[i] for i in indices]),
        torch.device("cpu"),
        max(args.repeats, 10),
        args.warmup,
        args.max_seconds,
    )
    return {
        "case": f"data loading {batch} x {dataset.segment_length}",
        "seconds": statistics.median(times),
        "runs": len(times),
    }


def bench_loader(dataset: Mel2Samp, device, batch: int, workers: int, args) -> dict:
    """Batches per second from the loader training reads, with nothing else running: what it can feed."""
    sampler = EpochSampler(len(dataset), batch, seed=0)
    count = max(10 * args.repeats, 3 * sampler.batches_per_epoch, 30)
    batches = training_batches(dataset, sampler, (0, 0), 2**31, workers, pin_memory=device.type == "cuda")
    next(batches)  # the workers' start, paid once per run
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    elapsed = time.perf_counter() - start
    del batches  # its workers end with it
    return {
        "case": f"data loader {batch} x {dataset.segment_length}, {workers} worker{'' if workers == 1 else 's'}",
        "seconds": elapsed / count,
        "runs": count,
        "batches_per_second": count / elapsed,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, each value checked: one out of range is a ConfigError naming its flag."""
    parser = CommandParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--device", default=None, help="default: a GPU when there is one, else the CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp16 needs a CUDA device")
    parser.add_argument("--seconds", type=float, nargs="+", default=[1.0, 10.0], help="synthesis lengths")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="synthesis batch sizes")
    parser.add_argument("--train_batch", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--segment_length", type=int, default=None, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max_seconds", type=float, default=60.0, help="stop repeating a case after this long")
    parser.add_argument("--skip", nargs="*", default=[], choices=["synthesis", "training", "checkpointing", "loading"])
    parser.add_argument(
        "--loader_workers",
        type=int,
        nargs="*",
        default=[0, 1, 2],
        metavar="N",
        help="DataLoader worker counts to measure the training loader with",
    )
    parser.add_argument(
        "--matmul_size",
        type=int,
        default=None,
        metavar="N",
        help="side of the square matmul that every figure is measured against (default: 8192 on a GPU, 2048 on "
        "a CPU); a smaller one makes a quick check of the command, its fractions of the matmul not comparable",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--eager", action="store_true", help="synthesis on a GPU without CUDA graphs")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also the training step compiled as train.py --compile compiles it, timed alternately with the "
        "eager one, and its first (compiling) step",
    )
    args = parser.parse_args(argv)
    positive = {
        "--seconds": args.seconds,
        "--batches": args.batches,
        "--train_batch": [] if args.train_batch is None else [args.train_batch],
        "--segment_length": [] if args.segment_length is None else [args.segment_length],
        "--repeats": [args.repeats],
        "--matmul_size": [] if args.matmul_size is None else [args.matmul_size],
    }
    check_positive(positive)
    for flag, values in {"--warmup": [args.warmup], "--loader_workers": args.loader_workers}.items():
        for value in values:
            if value < 0:
                raise ConfigError(f"{flag} must be >= 0, got {value}")
    if not args.max_seconds >= 0:
        raise ConfigError(f"--max_seconds must be >= 0, got {args.max_seconds:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        config = load_config(args.config)
        cases = {"synthesis", "training", "loading"} - set(args.skip)
        # The config's own segment_length is checked as training checks it; the flag's in check_lengths.
        check_model_rules(config, training="training" in cases and args.segment_length is None)
        device, dtype = resolve_device(args.device, None), DTYPES[args.dtype]
        check_dtype_on(device, dtype)
        check_lengths(args, config, cases)
        batch = config.train.batch_size if args.train_batch is None else args.train_batch
        segment = config.data.segment_length if args.segment_length is None else args.segment_length
        dataset = loading_dataset(config, segment) if "loading" in cases else None
        if dataset is not None and args.loader_workers and len(dataset) < batch:
            raise DataError(f"{loading_list(config)}: its {len(dataset)} clips cannot fill a training batch of {batch}")
        run(args, config, device, dtype, batch, segment, dataset)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file the command could not read, beyond those named above
        print(f"error: {'' if error.filename is None else f'{error.filename}: '}{describe(error)}", file=sys.stderr)
        return 1
    return 0


def run(args, config, device, dtype, batch: int, segment: int, dataset: Mel2Samp | None) -> None:
    """Every case not skipped, with the matmul yardsticks before and after them; prints the report."""
    reference = [matmul_runs(device, dtype, size=args.matmul_size)]
    # Tensor cores and CPU matrix engines are rated in bf16: every figure is also given against that, where
    # the device has them. A CPU without them emulates bf16 products, some hundred times slower than fp32:
    # no yardstick, and minutes to measure.
    bf16_units = has_bf16_matrix_units(device)
    bf16_reference = [matmul_runs(device, torch.bfloat16, size=args.matmul_size)] if bf16_units else []
    results = []
    yardstick = Yardstick(device, dtype, args.matmul_size)
    if "synthesis" not in args.skip:
        model = build_model(config.waveflow).to(device).eval().remove_weight_norm().to(dtype)
        graphs = CudaGraphCache() if device.type == "cuda" and not args.eager else None
        for index, seconds in enumerate(sorted(args.seconds)):
            for synth_batch in args.batches:
                # Warm up on the shortest length only: a warm-up run of 10 s x 8 takes minutes on a CPU.
                # A GPU captures a CUDA graph for a length at its second run: two warm-ups for every case.
                warmup = args.warmup if index == 0 else 0
                if device.type == "cuda":
                    warmup = max(warmup, 2)
                results.append(
                    bench_synthesis(
                        model,
                        device,
                        dtype,
                        seconds,
                        synth_batch,
                        warmup,
                        graphs,
                        config.data.sampling_rate,
                        yardstick,
                        args,
                    )
                )
        del model, graphs  # the graphs' memory pools (about 2 GB for 10 s in fp32) are not the training's
    training = None
    if "training" not in args.skip:
        training = bench_training(config, device, dtype, batch, segment, False, yardstick, args)
        results.append(training)
        if args.compile:
            results.append(bench_compiled_training(config, device, dtype, batch, segment, args))
        if "checkpointing" not in args.skip:
            results.append(bench_training(config, device, dtype, batch, segment, True, yardstick, args))
    if dataset is not None:
        loading = bench_loading(dataset, batch, args)
        if training is not None:
            loading["percent_of_training_step"] = 100 * loading["seconds"] / training["seconds"]
        results.append(loading)
        for workers in args.loader_workers:
            results.append(bench_loader(dataset, device, batch, workers, args))
    reference.append(matmul_runs(device, dtype, size=args.matmul_size))
    if bf16_units:
        bf16_reference.append(matmul_runs(device, torch.bfloat16, size=args.matmul_size))
    matmul = statistics.mean(statistics.median(runs) for runs in reference)
    bf16_matmul = statistics.mean(statistics.median(runs) for runs in bf16_reference) if bf16_reference else None
    matmul_best = max(max(runs) for runs in reference)
    bf16_best = max(max(runs) for runs in bf16_reference) if bf16_reference else None
    for result in results:
        if "gflops" in result:
            best_gflops = result["gflops"] * result["seconds"] / result["best_seconds"]
            result["fraction_of_matmul"] = result["gflops"] / matmul
            result["best_fraction_of_matmul"] = best_gflops / matmul_best
            if bf16_matmul is not None and bf16_best is not None:
                result["fraction_of_bf16_matmul"] = result["gflops"] / bf16_matmul
                result["best_fraction_of_bf16_matmul"] = best_gflops / bf16_best

    report = {
        "config": args.config,
        "device": device_name(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "allocator": allocator(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_graphs": device.type == "cuda" and not args.eager,
        "matmul_size": matmul_size(device, args.matmul_size),
        "matmul_gflops": matmul,
        "bf16_matmul_gflops": bf16_matmul,
        "best_matmul_gflops": matmul_best,
        "best_bf16_matmul_gflops": bf16_best,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    bf16_figure = "no bf16 matrix units" if bf16_matmul is None else f"{bf16_matmul:.0f} in bf16, best {bf16_best:.0f}"
    print(
        f"{args.config} on {report['device']} ({torch.get_num_threads()} threads, {report['allocator']} malloc), "
        f"{args.dtype}, "
        f"torch {torch.__version__}: {report['matmul_size']}^2 matmul {matmul:.0f} GFLOP/s "
        f"(best {matmul_best:.0f}; {bf16_figure})"
    )
    columns = [
        ("case", "{}", 32),
        ("seconds", "{:.3f}", 9),
        ("runs", "{}", 5),
        ("kHz", "{:.1f}", 9),
        ("best_kHz", "{:.1f}", 9),
        ("real_time_factor", "{:.2f}", 9),
        ("gflops", "{:.0f}", 7),
        ("fraction_of_matmul", "{:.2f}", 9),
        ("fraction_of_bf16_matmul", "{:.2f}", 9),
        ("paired_fraction_of_matmul", "{:.2f}", 9),
        ("peak_memory_mb", "{:.0f}", 10),
        ("percent_of_training_step", "{:.2f}", 9),
        ("batches_per_second", "{:.0f}", 9),
        ("speedup", "{:.2f}", 8),
        ("first_step_seconds", "{:.1f}", 10),
    ]
    titles = {
        "real_time_factor": "x realtime",
        "best_kHz": "best kHz",
        "gflops": "GFLOP/s",
        "fraction_of_matmul": "of matmul",
        "fraction_of_bf16_matmul": "of bf16 mm",
        "paired_fraction_of_matmul": "paired",
        "peak_memory_mb": "peak MiB",
        "percent_of_training_step": "% of step",
        "batches_per_second": "batches/s",
        "speedup": "x eager",
        "first_step_seconds": "1st step s",
    }
    print("  ".join(titles.get(name, name).ljust(width) for name, _, width in columns))
    for result in results:
        print(
            "  ".join(
                (form.format(result[name]) if name in result else "").ljust(width) for name, form, width in columns
            )
        )


if __name__ == "__main__":
    sys.exit(main())
