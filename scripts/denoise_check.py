"""The denoiser's effect on the speech measures of `train.py -v`, on the demo's held-out sentences.

    python scripts/denoise_check.py --strengths 0 0.05 0.2

Each sentence is synthesized once (the demo model, fp32, temperature 0.8 and the seed of the
config, as `-v` does), denoised at each strength, and measured against its recording (metrics.py:
log-mel L1, multi-resolution STFT, F0 error, V/UV F1, periodicity); the table gives the means.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from config import ConfigError, check_positive, load_config  # noqa: E402
from data import DataError, MelSpectrogram, load_audio, read_file_list  # noqa: E402
from denoiser import Denoiser, check_strength  # noqa: E402
from metrics import MEASURES, measure, summarize  # noqa: E402
from model import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("-c", "--config", default=os.path.join(ROOT, "configs", "demo.json"))
    parser.add_argument("--checkpoint_path", default=os.path.join(ROOT, "pretrained", "nanoflow-demo.pt"))
    parser.add_argument("--files", default=os.path.join(ROOT, "data", "demo", "heldout", "test_files.txt"))
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        check_positive({"--temperature": [args.temperature], "--threads": [args.threads]})
        for strength in args.strengths:
            try:
                check_strength(strength)
            except ValueError as error:
                raise ConfigError(f"--strengths: {error}") from None
        config = load_config(args.config)
        model = build_model(config.waveflow)
        load_checkpoint(args.checkpoint_path, model)
        lines = read_file_list(args.files)  # paths as the list resolves them
        torch.set_num_threads(args.threads)
        model = model.remove_weight_norm().eval()
        denoiser = Denoiser.from_config(model, config.data)
        mel_spectrogram = MelSpectrogram.from_config(config.data)
        results: dict[float, list] = {strength: [] for strength in args.strengths}
        data = config.data
        for line in lines:
            reference = load_audio(line, data.sampling_rate, resample=data.resample, downmix=data.downmix)
            mel = mel_spectrogram(reference)
            generator = torch.Generator().manual_seed(config.train.seed)
            audio = model.infer(mel[None], sigma=args.temperature, generator=generator)
            for strength in args.strengths:
                denoised = denoiser(audio, strength)[0]
                results[strength].append(measure(denoised, reference, data.sampling_rate, data.hop_length))
            print(f"{line}: measured", file=sys.stderr, flush=True)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    names = [name for name in MEASURES if name != "pesq_wb"]
    print(f"{len(results[args.strengths[0]])} sentences of {args.files}, temperature {args.temperature}")
    print("| strength | " + " | ".join(MEASURES[name][0] for name in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for strength, clips in results.items():
        summary = summarize(clips)
        means = [summary[name]["mean"] for name in names]  # None: defined on no sentence
        print(f"| {strength:g} | " + " | ".join("-" if mean is None else f"{mean:.4f}" for mean in means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
