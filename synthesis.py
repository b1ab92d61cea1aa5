"""Synthesis and its measures: `train.py -s` and `-v`, and what training reports at each checkpoint.

    synthesize(config, args, device)            # -s: the test clips (or --mels) to .wav files
    evaluate(config, args, device, amp_dtype)   # -v: test log-likelihood and the speech measures
    CheckpointReport(config, device, amp_dtype) # training: test loss and measures of a few clips

The estimator's precision in synthesis is data (`synthesis_precision`): the same
`model.infer` runs in fp32, bf16 or fp16, on a CPU or a GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time

import soundfile
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import (
    average_checkpoints,
    check_same_features,
    check_same_model,
    list_checkpoints,
    load_checkpoint,
    load_weights,
)
from config import Config, ConfigError
from cuda_graphs import CudaGraphCache
from data import (
    LOG_FLOOR,
    MEL_FILE_EXTENSIONS,
    DataError,
    MelSpectrogram,
    audio_length,
    load_audio,
    load_mel,
    mel_frame_count,
    read_file_list,
    read_file_list_entries,
    refuse_shared_names,
)
from denoiser import Denoiser
from mel2samp import Mel2Samp, check_mel_fits_audio, collate
from mel_scale import MelConversion
from metrics import MEASURES, format_table, measure, min_samples, summarize
from model import SYNTHESIS_TRIM_FRAMES, WaveFlow, build_model, negative_log_likelihood, synthesis_length
from runtime import has_bf16_matrix_units
from storage import StorageError, TrainingLogs, describe, first_line, warn, write_atomically
from streaming import stream

# The speech measures synthesize at this temperature unless -t says otherwise (-s keeps the original's 1.0).
MEASURE_TEMPERATURE = 0.8
MEASURED_CLIPS = 3  # the first test clips, measured at every checkpoint
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Below this width the estimator's matrices are too small for bf16 to pay for its conversions on a CPU
# (the measurements that set it are in the documentation of synthesis speed).
BF16_MIN_CHANNELS = 64
PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}


def samples_dir(config: Config) -> str:
    return os.path.join(config.train.output_directory, "samples", config.waveflow.model_name)


def synthesis_precision(config: Config, choice: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype of the estimator in synthesis for `--precision choice`, and a line saying why."""
    if choice != "auto":
        if choice == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
        return PRECISIONS[choice], f"synthesis in {choice} (--precision)"
    if config.train.fp16_run and device.type == "cuda":
        return torch.float16, "synthesis in fp16 (fp16_run; --precision fp32 for full precision)"
    channels = config.waveflow.res_channels
    if not has_bf16_matrix_units(device):
        return torch.float32, f"synthesis in fp32 (this {device.type} has no bf16 matrix units)"
    if channels < BF16_MIN_CHANNELS:
        return torch.float32, (
            f"synthesis in fp32 (res_channels {channels} < {BF16_MIN_CHANNELS}: bf16 is not "
            f"faster for so small a model; --precision bf16 to try)"
        )
    return torch.bfloat16, (
        f"synthesis in bf16 (this {device.type} has bf16 matrix units; --precision fp32 for full precision)"
    )


def trained_model(config: Config, args: argparse.Namespace, device: torch.device) -> WaveFlow:
    """The model of checkpoint_path (or the average of its newest -a N checkpoints), for evaluation and synthesis."""
    path = config.train.checkpoint_path
    if not path:
        # The run folder (run_folder.run_dir, whose module imports this one) of a training run of this config.
        folder = os.path.join(config.train.output_directory, config.waveflow.model_name)
        trained = list_checkpoints(folder)
        example = ""
        if trained:
            example = (
                f", e.g. --checkpoint_path {folder}, this config's run folder"
                if args.average_checkpoint
                else f", e.g. --checkpoint_path {trained[-1][1]}, the newest of this config's run"
            )
        raise ConfigError(
            f"{args.config}: train_config.checkpoint_path is empty; name a checkpoint "
            f"(or with -a N a folder of checkpoints) to evaluate or synthesize{example}"
        )
    model = build_model(config.waveflow)
    if args.average_checkpoint:
        weights, newest = average_checkpoints(path, args.average_checkpoint, args.epsilon)
        check_same_model(model, newest, path)
        check_same_features(config.data, newest, path)
        load_weights(model, weights, path)
    else:
        check_same_features(config.data, load_checkpoint(path, model), path)
    return model.to(device).eval()


@torch.no_grad()
def test_loss(
    model: WaveFlow,
    dataset: Mel2Samp,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    sigma: float,
    batch_size: int,
) -> tuple[float, int]:
    """Mean negative log-likelihood per sample over `dataset`, and the number of samples."""
    model.eval()
    total, count = 0.0, 0
    for mel, audio in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        mel, audio = mel.to(device), audio.to(device)
        audio = audio[:, : audio.shape[1] // model.config.n_height * model.config.n_height]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            z, logdet = model(audio, mel)
        total += negative_log_likelihood(z, logdet, sigma).item() * audio.numel()
        count += audio.numel()
    return total / count, count


def unsynthesizable(frames: int, hop_length: int) -> str | None:
    """Why a mel of `frames` frames of `hop_length` samples cannot be synthesized; None when it can."""
    if synthesis_length(frames, hop_length) <= 0:
        plural = "s" if frames != 1 else ""
        return f"a mel of {frames} frame{plural} is too short to synthesize (need at least {SYNTHESIS_TRIM_FRAMES + 1})"
    return None


def unmeasurable(frames: int, hop_length: int, sampling_rate: int) -> str | None:
    """Why a mel of `frames` frames of `hop_length` samples cannot be synthesized and measured against its
    recording at `sampling_rate` (its synthesis has `synthesis_length(frames, hop_length)` samples); None
    when it can."""
    reason = unsynthesizable(frames, hop_length)
    samples, needed = synthesis_length(frames, hop_length), min_samples(sampling_rate)
    if reason is None and samples < needed:
        reason = f"its synthesis of {samples} samples is too short to measure (need at least {needed})"
    return reason


def too_short(length: int, config: Config, measured: bool) -> str | None:
    """Why a clip of `length` samples cannot be synthesized from its mel (and, when `measured`, measured
    against itself); None when it can."""
    hop, frames = config.data.hop_length, 1 + length // config.data.hop_length
    reason = unmeasurable(frames, hop, config.data.sampling_rate) if measured else unsynthesizable(frames, hop)
    if reason is None and length <= config.data.filter_length // 2:
        reason = (
            f"a clip of {length} samples is too short for a mel spectrogram "
            f"(need more than {config.data.filter_length // 2})"
        )
    return reason


def synthesize_clip(
    model: WaveFlow, mel: torch.Tensor, temperature: float, seed: int, device: torch.device
) -> torch.Tensor:
    """mel [n_mels, F] -> audio [synthesis_length(F, hop_length)] float32 on the CPU, from noise fixed by
    `seed`, so that a clip gets the same noise at every checkpoint and in -v."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return model.infer(mel[None].to(device), sigma=temperature, generator=generator)[0].float().cpu()


def stem(path: str) -> str:
    """`LJ001-0001.wav.pt` -> `LJ001-0001`."""
    name = os.path.basename(path)
    for suffix in MEL_FILE_EXTENSIONS + (".wav", ".flac"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def write_wav(path: str, audio: torch.Tensor, sampling_rate: int) -> None:
    """16-bit PCM, written atomically: a failed write (OSError) leaves no half-written file."""
    pcm = (audio.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).numpy()
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, sampling_rate, subtype="PCM_16", format="WAV")
    write_atomically(path, buffer.getbuffer(), durable=False)


def mel_figure(synthesized: torch.Tensor, target: torch.Tensor, hop_length: int):
    """The recording's mel [n_mels, F] above the synthesis's [n_mels, F'], on one colour scale (the log
    floor to the louder's peak) and the same labelled axes, as scripts/plot_synthesis.py draws them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = math.log(LOG_FLOOR)
    high = max(float(target.max()), float(synthesized.max()), low + 1.0)
    figure, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True, layout="constrained")
    for axis, mel, title in zip(axes, (target, synthesized), ("recording", "synthesis"), strict=True):
        image = axis.imshow(mel.numpy(), origin="lower", aspect="auto", interpolation="none", vmin=low, vmax=high)
        axis.set_title(f"{title}: log-mel")
        axis.set_ylabel("mel band")
    axes[1].set_xlabel(f"frame ({hop_length} samples)")
    figure.colorbar(image, ax=list(axes), label="ln magnitude")
    return figure


class CheckpointReport:
    """At each checkpoint: the test-set loss on first segments, and the first `MEASURED_CLIPS` test clips
    long enough to synthesize and measure, synthesized and measured against their recordings (metrics.py);
    the first is kept as a sample. The clip lengths are known when the run starts, so the clips too short
    are named then, once; a measure that fails at a checkpoint is a warning. The datasets, the measured
    clips and the mel spectrogram are read and built once, with the training run."""

    def __init__(self, config: Config, device: torch.device, amp_dtype: torch.dtype | None):
        self.config, self.device, self.amp_dtype = config, device, amp_dtype
        self.eval_set = Mel2Samp.from_config(config.data, mode="eval", seed=config.train.seed)
        hop_length = config.data.hop_length
        measured = []
        # The clip lengths are known now: the clips too short are named once, here.
        for path, length in zip(self.eval_set.files, self.eval_set.lengths, strict=True):
            if len(measured) == MEASURED_CLIPS:
                break
            reason = unmeasurable(1 + length // hop_length, hop_length, config.data.sampling_rate)
            if reason is None:
                measured.append(path)
            else:
                warn(f"{path}: a clip of {length} samples, {reason}: left out of the checkpoint reports")
        if not measured:
            warn(
                f"{config.data.test_files}: no test clip is long enough to synthesize and measure: the checkpoint "
                f"reports give the test loss only, and no sample is written"
            )
        clips = Mel2Samp.from_config(config.data, mode="synthesis", seed=config.train.seed, file_list=measured)
        self.clips = [(stem(path), *clips[index]) for index, path in enumerate(clips.files)]
        self.mel_spectrogram = MelSpectrogram.from_config(config.data)

    def __call__(self, model: WaveFlow, logs: TrainingLogs | None, iteration: int, temperature: float) -> None:
        config = self.config
        loss, _ = test_loss(
            model, self.eval_set, self.device, self.amp_dtype, config.train.sigma, config.train.batch_size
        )
        print(f"iteration {iteration}: test loss {loss:.4f}")
        rate = config.data.sampling_rate
        started = time.perf_counter()
        results = []
        for index, (name, mel, reference) in enumerate(self.clips):
            audio = synthesize_clip(model, mel, temperature, config.train.seed, self.device)
            if index == 0:
                path = os.path.join(samples_dir(config), f"{name}_iter{iteration}.wav")
                try:
                    write_wav(path, audio, rate)
                except OSError as error:
                    warn(f"{path}: cannot write the sample ({describe(error)}); training goes on")
                if logs is not None:
                    logs.add("audio", "eval/sample", audio.clamp(-1, 1), iteration, sample_rate=rate)
                    logs.add(
                        "figure",
                        "eval/mel",
                        mel_figure(self.mel_spectrogram(audio), mel, config.data.hop_length),
                        iteration,
                    )
            try:
                results.append(measure(audio, reference, rate, config.data.hop_length))
            except Exception as error:  # a measure is a report: whatever its failure, training goes on
                warn(
                    f"iteration {iteration}: {name}: cannot measure the synthesis "
                    f"({first_line(error)}); training goes on"
                )
        summary = summarize(results)
        defined = {name: entry["mean"] for name, entry in summary.items() if entry["mean"] is not None}
        if results:
            print(
                f"iteration {iteration}: {len(results)} test clips at temperature {temperature} "
                f"({time.perf_counter() - started:.1f} s): "
                + ", ".join(f"{MEASURES[name][0]} {value:.3f}" for name, value in defined.items())
            )
        if logs is not None:
            logs.add("scalar", "eval/loss", loss, iteration)
            for name, value in defined.items():
                logs.add("scalar", f"eval/{name}", value, iteration)


def evaluate(config: Config, args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """The test-set log-likelihood (not with --mels: a TTS model's mel has no audio of its own to score), then
    every clip synthesized at -t with the seed of the config and measured against its recording; a clip too
    short for either is left out with a warning. Where the test list names speakers, a table per speaker."""
    dtype, precision = synthesis_precision(config, args.precision, device)
    model = trained_model(config, args, device)
    human = sys.stderr if args.json == "-" else sys.stdout  # with --json -, stdout holds only the JSON
    if args.json and args.json != "-":  # a path that cannot be written is said before the measuring, not after
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise StorageError(f"{args.json}: cannot write the measures there (a folder, or no writable folder)")
    likelihood, speakers = None, {}
    if args.mels:
        inputs = evaluation_inputs(config, args)
    else:
        speakers = {path: speaker for path, speaker in read_file_list_entries(config.data.test_files) if speaker}
        inputs = synthesis_inputs(config, args, measured=True)
        likelihood = test_likelihood(model, config, device, amp_dtype)
    print(precision, file=human)
    model = model.remove_weight_norm().to(dtype)  # the fast synthesis path, as -s runs it
    results, left_out = [], []
    for name, source, reason, read in tqdm(inputs, desc="measures", unit="clip", disable=None):
        if reason is not None:
            warn(f"{source}: {reason}: left out of the measures")
            left_out.append({"name": name, "file": source, "reason": reason})
            continue
        mel, reference = read()
        audio = synthesize_clip(model, mel, args.temp, config.train.seed, device)
        speaker = {"speaker": speakers[source]} if source in speakers else {}
        rate, hop = config.data.sampling_rate, config.data.hop_length
        results.append({"name": name, **speaker, **measure(audio, reference, rate, hop)})
    summary = summarize(results)
    print(
        f"{len(results)} clips synthesized at temperature {args.temp} (seed {config.train.seed}) and measured "
        f"against their recordings{f' ({len(left_out)} too short, left out)' if left_out else ''}:\n"
        f"{format_table(summary, len(results))}",
        file=human,
    )
    by_speaker = speaker_summaries(results)
    if by_speaker:
        print(f"per speaker:\n{format_speaker_table(by_speaker)}", file=human)
    if likelihood is not None:
        print(
            f"{likelihood['clips']} test clips, {likelihood['samples']} samples: negative log-likelihood "
            f"{likelihood['negative_log_likelihood']:.4f} nats per sample, log-likelihood (LL) "
            f"{likelihood['log_likelihood']:.4f}",
            file=human,
        )
    if args.json:
        document = {
            "config": args.config,
            "checkpoint": config.train.checkpoint_path,
            "precision": PRECISION_NAMES[dtype],
            "average_checkpoint": args.average_checkpoint,
            "temperature": args.temp,
            "seed": config.train.seed,
            "log_likelihood": likelihood,
            "measures": summary,
            **({"speakers": by_speaker} if by_speaker else {}),
            "left_out": left_out,
            "clips": [
                {
                    key: None if isinstance(value, float) and math.isnan(value) else value
                    for key, value in result.items()
                }
                for result in results
            ],
        }  # NaN is not JSON
        text = json.dumps(document, indent=2)
        if args.json == "-":
            print(text)
        else:
            write_atomically(args.json, (text + "\n").encode(), durable=False)
            print(f"wrote {args.json}", file=human)


def test_likelihood(
    model: WaveFlow, config: Config, device: torch.device, amp_dtype: torch.dtype | None
) -> dict | None:
    """The log-likelihood of the whole test clips that have a mel (those too short for one are left out,
    as from the measures); None, with a warning, when none has."""
    clips = Mel2Samp.from_config(config.data, mode="synthesis", seed=config.train.seed)
    long_enough = [
        path for path, length in zip(clips.files, clips.lengths, strict=True) if length > config.data.filter_length // 2
    ]
    if not long_enough:
        warn(f"{config.data.test_files}: no test clip is long enough for a mel: no log-likelihood")
        return None
    # With `dequantize`, scored as training and its test loss score: the audio plus its noise.
    clips = Mel2Samp.from_config(
        config.data, mode="synthesis", seed=config.train.seed, file_list=long_enough, dequantize=config.data.dequantize
    )
    nll, samples = test_loss(model, clips, device, amp_dtype, config.train.sigma, batch_size=1)
    return {"clips": len(clips), "samples": samples, "negative_log_likelihood": nll, "log_likelihood": -nll}


def speaker_summaries(results: list[dict]) -> dict[str, dict]:
    """{speaker: {"clips": n, measure: mean or None, ...}} over the clips of each speaker, in order of first
    appearance; empty when no clip names a speaker."""
    grouped: dict[str, list[dict]] = {}
    for result in results:
        if "speaker" in result:
            grouped.setdefault(result["speaker"], []).append(result)
    return {
        speaker: {"clips": len(clips), **{name: entry["mean"] for name, entry in summarize(clips).items()}}
        for speaker, clips in grouped.items()
    }


def format_speaker_table(by_speaker: dict[str, dict]) -> str:
    """A plain-text table of `speaker_summaries`: one row per speaker, the mean of each measure defined."""
    names = [name for name in MEASURES if any(entry[name] is not None for entry in by_speaker.values())]
    width = max(len("speaker"), *(len(speaker) for speaker in by_speaker)) + 2
    lines = [f"{'speaker':<{width}}{'clips':>6}" + "".join(f"{MEASURES[name][0]:>24}" for name in names)]
    for speaker, entry in by_speaker.items():
        values = "".join(f"{'-' if entry[name] is None else f'{entry[name]:.3f}':>24}" for name in names)
        lines.append(f"{speaker:<{width}}{entry['clips']:>6}{values}")
    return "\n".join(lines)


def mel_files(paths: list[str]) -> list[str]:
    """The mel files (.pt, .npy) named on the command line, folders expanded in sorted order; a folder's
    other files are named in a warning, as left out, but hidden ones and the recordings that -v measures
    the mels against (.wav, .flac beside them)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name)))
            files += [os.path.join(path, name) for name in names if name.lower().endswith(MEL_FILE_EXTENSIONS)]
            others = [
                name
                for name in names
                if not name.lower().endswith((*MEL_FILE_EXTENSIONS, ".wav", ".flac")) and name[0] != "."
            ]
            if others:
                shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                warn(
                    f"{path}: {len(others)} file{'s' if len(others) != 1 else ''} not .pt or .npy left out of "
                    f"--mels: {shown}"
                )
        else:
            files.append(path)
    if not files:
        raise DataError(f"{', '.join(paths)}: no mel files (.pt, .npy) found")
    return files


def mel_conversion(config: Config, args: argparse.Namespace) -> MelConversion:
    """What --mel_scale and --mel_stats make of each mel of --mels (mel_scale.py): converted to the ln mel,
    and a warning for one that does not look like it."""
    return MelConversion(getattr(args, "mel_scale", "ln"), getattr(args, "mel_stats", None), config.data.n_mel_channels)


def evaluation_inputs(config: Config, args: argparse.Namespace):
    """`(name, mel file, why it is too short or None, read)` for every mel of --mels,
    `read() -> (mel [80, F], audio [T])`.

    The audio of `NAME.pt` or `NAME.npy` is the file `NAME` (mel2samp.py writes the mel of
    `LJ001-0001.wav` as `LJ001-0001.wav.pt`), or `NAME.wav` or `NAME.flac` when NAME has no
    audio extension; it is looked for beside the mel file, then among the test list's files.
    """
    test_files: dict[str, list[str]] | None = None
    inputs = []
    convert = mel_conversion(config, args)
    for path in mel_files(args.mels):
        name = os.path.basename(path)[: -len(os.path.splitext(path)[1])]
        candidates = [name] if name.lower().endswith((".wav", ".flac")) else [name + ".wav", name + ".flac"]
        found = [
            os.path.join(os.path.dirname(path), candidate)
            for candidate in candidates
            if os.path.isfile(os.path.join(os.path.dirname(path), candidate))
        ]
        if not found:
            if test_files is None:
                test_files = {}
                for audio in read_file_list(config.data.test_files):  # base name -> every test clip of that name
                    test_files.setdefault(os.path.basename(audio), []).append(audio)
            for candidate in candidates:
                clips = sorted(set(test_files.get(candidate, [])))
                if len(clips) > 1:
                    raise DataError(
                        f"{path}: its audio is ambiguous: {config.data.test_files} holds {clips[0]} and {clips[1]}; "
                        f"put the audio beside the mel"
                    )
                found += clips
        if not found:
            raise DataError(
                f"{path}: no audio to measure it against: looked for {' or '.join(candidates)} beside "
                f"it and in {config.data.test_files}"
            )
        frames = mel_frame_count(path, config.data.n_mel_channels)
        data = config.data
        length = audio_length(found[0], data.sampling_rate, resample=data.resample, downmix=data.downmix)
        check_mel_fits_audio(path, frames, found[0], length, data.hop_length)
        inputs.append(
            (
                stem(path),
                path,
                unmeasurable(frames, data.hop_length, data.sampling_rate),
                lambda path=path, audio=found[0]: (
                    convert(load_mel(path, config.data.n_mel_channels), path),
                    load_audio(
                        audio, config.data.sampling_rate, resample=config.data.resample, downmix=config.data.downmix
                    ),
                ),
            )
        )
    return inputs


def synthesis_inputs(config: Config, args: argparse.Namespace, measured: bool = False):
    """`(name, source file, why it is too short or None, read)` for every clip to synthesize (and, when
    `measured`, to measure: see `too_short`), `read() -> (mel [80, F], audio [T] or None)`: the mels given
    with --mels (no audio), or the test list's clips. Only the headers are read here."""
    if not args.mels:
        clips = Mel2Samp.from_config(config.data, mode="synthesis", seed=config.train.seed)
        return [
            (stem(path), path, too_short(length, config, measured), lambda index=index: clips[index])
            for index, (path, length) in enumerate(zip(clips.files, clips.lengths, strict=True))
        ]
    convert = mel_conversion(config, args)
    hop, rate = config.data.hop_length, config.data.sampling_rate
    frames = {path: mel_frame_count(path, config.data.n_mel_channels) for path in mel_files(args.mels)}
    return [
        (
            stem(path),
            path,
            unmeasurable(count, hop, rate) if measured else unsynthesizable(count, hop),
            lambda path=path: (convert(load_mel(path, config.data.n_mel_channels), path), None),
        )
        for path, count in frames.items()
    ]


def synthesize(config: Config, args: argparse.Namespace, device: torch.device) -> None:
    """Every clip of the test list (or mel of --mels) to a .wav file; one too short to synthesize is left out
    with a warning, and when every one is, that is an error naming the first."""
    folder = args.output_dir or samples_dir(config)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise StorageError(f"{folder}: not a folder; the audio goes into a folder (-o/--output_dir)")
    inputs = synthesis_inputs(config, args)
    sources = [source for _, source, _, _ in inputs]
    refuse_shared_names(sources, lambda path: f"{stem(path)}_synthesis.wav", "would both be written to")
    too_short_inputs = [(source, reason) for _, source, reason, _ in inputs if reason is not None]
    if len(too_short_inputs) == len(inputs):
        source, reason = too_short_inputs[0]
        others = {1: "", 2: " (as is the other)"}.get(len(inputs), f" (as are the {len(inputs) - 1} others)")
        raise DataError(f"{source}: {reason}{others}")
    dtype, precision = synthesis_precision(config, args.precision, device)
    model = trained_model(config, args, device).remove_weight_norm().to(dtype)
    print(precision)  # once the checkpoint loaded: a command it stops says only why
    rate = config.data.sampling_rate
    graphs = CudaGraphCache() if device.type == "cuda" else None  # clips of a length seen before replay a graph
    denoiser = Denoiser.from_config(model, config.data) if args.denoise else None
    try:  # before synthesizing anything: a folder that cannot be made is said at once
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise StorageError(f"{folder}: cannot make the folder for the audio ({describe(error)})") from None
    if args.chunk_frames:
        print(
            f"streaming: chunks of {args.chunk_frames} frames, each after {args.lookahead_frames} frames more "
            f"(context {args.context_frames})" + (f", denoised at strength {args.denoise}" if denoiser else "")
        )
    for name, source, reason, read in inputs:
        if reason is not None:
            warn(f"{source}: {reason}: left out of the synthesis")
            continue
        mel, _ = read()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        first = 0.0  # streaming: the compute time of the first chunk
        if args.chunk_frames:
            # as an acoustic model would give them: chunk_frames at a time; the noise fixed by the seed
            pieces = mel[None].to(device).split(args.chunk_frames, dim=2)
            denoise = denoiser.stream(args.denoise) if denoiser else None
            chunks = []
            for chunk in stream(
                model,
                pieces,
                args.chunk_frames,
                args.lookahead_frames,
                args.context_frames,
                args.temp,
                config.train.seed,
                denoise,
            ):
                if not chunks:
                    first = time.perf_counter() - started
                chunks.append(chunk)
            audio = torch.cat(chunks, dim=1)[0]
        else:
            generator = torch.Generator(device=device).manual_seed(config.train.seed)  # reproducible
            audio = model.infer(mel[None].to(device), sigma=args.temp, generator=generator, cuda_graphs=graphs)
            audio = (denoiser(audio, args.denoise) if denoiser else audio)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        path = os.path.join(folder, f"{name}_synthesis.wav")
        if not bool(torch.isfinite(audio).all()):
            raise DataError(f"{source}: the synthesized audio holds NaN or infinite samples; {path} not written")
        try:
            write_wav(path, audio.float().cpu(), rate)
        except OSError as error:
            raise StorageError(f"{path}: cannot write ({describe(error)})") from None
        seconds = audio.shape[-1] / rate
        print(
            f"{path}: {seconds:.2f} s of audio in {elapsed:.2f} s, {audio.shape[-1] / elapsed / 1000:.1f} kHz, "
            f"{seconds / elapsed:.2f}x real time"
            + (f", first chunk computed in {first:.2f} s" if args.chunk_frames else "")
        )
