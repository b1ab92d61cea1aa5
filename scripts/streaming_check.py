"""Streaming synthesis against whole-utterance synthesis: the lookahead table and the memory of a stream.

    python scripts/streaming_check.py lookahead -c configs/demo.json --checkpoint_path pretrained/nanoflow-demo.pt
    python scripts/streaming_check.py lookahead -c configs/nanoflow-h16-r128-emb512.json   # random weights
    python scripts/streaming_check.py memory -c configs/demo.json --checkpoint_path pretrained/nanoflow-demo.pt

`lookahead`: for each lookahead (context equal to it), the latency to the first sample (the frames
waited for at `hop / sampling_rate` each, plus the measured compute time of the first chunk)
and the log-mel L1 (metrics.py) of the streamed audio against whole-utterance synthesis with the
same noise (`ColumnNoise`), on the mel of a held-out demo sentence. Without a checkpoint the weights
are random, with every parameter perturbed so that each flow matters (as the tests' models).
`memory`: the peak RSS of streaming `--seconds` of mel (each length in its own subprocess, with the
same `--threads` and `--sigma`), and the elements the stream holds between chunks.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from config import ConfigError, DataConfig, check_positive, load_config  # noqa: E402
from data import DataError, MelSpectrogram, load_audio, read_file_list  # noqa: E402
from metrics import log_mel_l1  # noqa: E402
from model import SYNTHESIS_TRIM_FRAMES, WaveFlow, build_model, synthesis_length  # noqa: E402
from streaming import ColumnNoise, StreamingSynthesis  # noqa: E402

HELDOUT = os.path.join(ROOT, "data", "demo", "heldout", "test_files.txt")


def load_model(config_path: str, checkpoint_path: str | None, overrides: list[str] | None = None) -> WaveFlow:
    config = load_config(config_path)
    section = dict(config.raw["waveflow_config"])
    for override in overrides or []:  # KEY=VALUE, an integer of waveflow_config
        key, _, value = override.partition("=")
        try:
            section[key] = int(value)
        except ValueError:
            raise ConfigError(f"--override {override}: not KEY=VALUE with an integer VALUE") from None
    torch.manual_seed(0)
    model = build_model(section)
    if checkpoint_path:
        load_checkpoint(checkpoint_path, model)
    else:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.remove_weight_norm().eval()


def heldout_mel(frames: int, data: DataConfig) -> torch.Tensor:
    """The mel of held-out demo sentences (resampled to the config's rate), end to end until `frames` frames,
    with the config's mel settings: `[1, n_mel_channels, frames]`."""
    mels, total = [], 0
    mel_spectrogram = MelSpectrogram.from_config(data)
    while total < frames:
        for line in read_file_list(HELDOUT):
            mel = mel_spectrogram(load_audio(os.path.join(ROOT, line), data.sampling_rate, resample=True))
            mels.append(mel)
            total += mel.shape[-1]
            if total >= frames:
                break
    return torch.cat(mels, dim=1)[None, :, :frames]


def streamed(model: WaveFlow, mel: torch.Tensor, chunk: int, lookahead: int, context: int, sigma: float):
    """The stream's audio `[T]` and the compute time of its first chunk (s)."""
    synthesis = StreamingSynthesis(model, chunk, lookahead, context, sigma, seed=1)
    chunks, first = [], None
    started = time.perf_counter()
    for piece in mel.split(1, dim=2):  # a frame at a time, as an acoustic model makes them
        chunks += synthesis.push(piece)
        if chunks and first is None:
            first = time.perf_counter() - started
    chunks += synthesis.finish()
    if first is None:
        first = time.perf_counter() - started
    return torch.cat(chunks, dim=1)[0], first


def lookahead_table(args: argparse.Namespace) -> None:
    model = load_model(args.config, args.checkpoint_path)
    height, hop = model.config.n_height, model.config.hop_length
    data = load_config(args.config).data
    mel = heldout_mel(args.frames, data)
    width = synthesis_length(mel.shape[-1], hop) // height
    whole = model.infer(mel, z=ColumnNoise(1, height, args.sigma, seed=1, hop_length=hop).take(0, width))[0]
    rate = data.sampling_rate
    print(f"{args.config}, {mel.shape[-1]} frames, chunks of {args.chunk} frames, sigma {args.sigma}")
    print("| lookahead (frames) | frames waited | latency to the first sample (ms) | log-mel L1 vs whole | max abs |")
    print("|---|---|---|---|---|")
    other = model.infer(mel, z=ColumnNoise(1, height, args.sigma, seed=2, hop_length=hop).take(0, width))[0]
    print(f"| (whole, other noise) | | | {log_mel_l1(other.numpy(), whole.numpy(), rate, hop):.4f} | |")
    for lookahead in args.lookaheads:
        audio, first = streamed(model, mel, args.chunk, lookahead, lookahead, args.sigma)
        waited = args.chunk + lookahead
        latency = 1000 * (waited * hop / rate + first)
        print(
            f"| {lookahead} | {waited} | {latency:.0f} ({waited * hop / rate * 1000:.0f} + {1000 * first:.0f}) "
            f"| {log_mel_l1(audio.numpy(), whole.numpy(), rate, hop):.4f} | {(audio - whole).abs().max().item():.2e} |",
            flush=True,
        )


def memory_child(args: argparse.Namespace) -> None:
    model = load_model(args.config, args.checkpoint_path, args.override)
    data = load_config(args.config).data
    frames = round(args.seconds[0] * data.sampling_rate / data.hop_length)
    generator = torch.Generator().manual_seed(0)
    synthesis = StreamingSynthesis(model, args.chunk, args.lookaheads[0], args.lookaheads[0], args.sigma)
    held, samples = 0, 0
    for start in range(0, frames, args.chunk):  # a mel made a chunk at a time, never held whole
        piece = torch.randn(1, model.config.cin_channels, min(args.chunk, frames - start), generator=generator) - 5
        for audio in synthesis.push(piece):
            samples += audio.shape[-1]
            held = max(held, synthesis.state_elements())
    samples += sum(audio.shape[-1] for audio in synthesis.finish())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {args.seconds[0]:g} | {samples} | {peak:.0f} | {held} |", flush=True)


def memory_table(args: argparse.Namespace) -> int:
    load_model(args.config, args.checkpoint_path, args.override)  # its errors here, not in each subprocess
    print(
        f"{args.config} {' '.join(args.override or [])}, chunks of {args.chunk} frames, "
        f"lookahead and context {args.lookaheads[0]}"
    )
    print("| mel (s) | samples streamed | peak RSS (MiB) | elements held between chunks |")
    print("|---|---|---|---|")
    for seconds in args.seconds:
        command = [sys.executable, __file__, "memory", "--child", "-c", args.config, "--seconds", str(seconds)]
        command += ["--chunk", str(args.chunk), "--lookaheads", str(args.lookaheads[0])]
        command += ["--threads", str(args.threads), "--sigma", repr(args.sigma)]
        if args.checkpoint_path:
            command += ["--checkpoint_path", args.checkpoint_path]
        if args.override:
            command += ["--override", *args.override]
        child = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(child.stderr)  # the child's one-line error, where it failed
        if child.returncode != 0:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("what", choices=["lookahead", "memory"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # memory: one length, measured
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--checkpoint_path", default=None, help="default: random weights")
    parser.add_argument("--chunk", type=int, default=32, help="chunk_frames")
    parser.add_argument(
        "--lookaheads", type=int, nargs="+", default=[3, 4, 6, 8, 12, 16], help="lookahead frames (at least 3)"
    )
    parser.add_argument("--frames", type=int, default=200, help="lookahead: mel frames synthesized")
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 60], help="memory: lengths of mel")
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument(
        "--override",
        nargs="+",
        metavar="KEY=VALUE",
        help="memory: integer waveflow_config keys to change (random weights)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        check_positive(
            {
                "--chunk": [args.chunk],
                "--frames": [args.frames],
                "--seconds": args.seconds,
                "--sigma": [args.sigma],
                "--threads": [args.threads],
            }
        )
        if min(args.lookaheads) < SYNTHESIS_TRIM_FRAMES:
            raise ConfigError(
                f"--lookaheads must be at least {SYNTHESIS_TRIM_FRAMES} (streaming.StreamingSynthesis), "
                f"got {min(args.lookaheads)}"
            )
        torch.set_num_threads(args.threads)
        if args.what == "lookahead":
            lookahead_table(args)
        elif args.child:
            memory_child(args)
        else:
            return memory_table(args)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
