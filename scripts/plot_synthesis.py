"""A picture of a recording's mel spectrogram beside the synthesis of its mel, as a PNG.

    python scripts/plot_synthesis.py -c configs/demo.json --checkpoint_path pretrained/nanoflow-demo.pt \
        data/demo/heldout/wavs/demo_002.wav -o pretrained/nanoflow-demo.png

The recording's Tacotron 2 mel is synthesized at temperature `-t` (0.8) with the config's seed,
and both mels are drawn one above the other on the same axes, with the measures of metrics.py
in the title.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import CheckpointError, load_checkpoint
from config import ConfigError, check_positive, load_config
from data import DataError, MelSpectrogram, load_audio
from metrics import measure
from model import build_model
from storage import StorageError, check_output_file
from synthesis import unmeasurable


def describe_measures(result: dict[str, float]) -> str:
    """The title's measures; the pitch measures undefined on a clip (NaN) say why instead of "nan"."""
    f0 = result["f0_rmse_cents"]
    vuv = result["vuv_f1"]
    return (
        f"log-mel L1 {result['log_mel_l1']:.2f}, "
        + ("no frame voiced in both, no F0 error" if math.isnan(f0) else f"F0 error {f0:.0f} cents")
        + (", no frame voiced in either, no V/UV F1" if math.isnan(vuv) else f", V/UV F1 {vuv:.2f}")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mel of a recording beside the synthesis of that mel, as a PNG.")
    parser.add_argument("audio", help="a recording (wav or flac at the config's rate)")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--checkpoint_path", required=True)
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.add_argument("-t", "--temp", type=float, default=0.8)
    args = parser.parse_args(argv)
    try:
        check_positive({"-t/--temp": [args.temp]})
        check_output_file(args.output, "PNG file")
        config = load_config(args.config, sections=("train_config", "data_config", "waveflow_config"))
        model = build_model(config.waveflow)
        load_checkpoint(args.checkpoint_path, model)
        model = model.eval().remove_weight_norm()
        rate = config.data.sampling_rate
        recording = load_audio(args.audio, rate, resample=config.data.resample, downmix=config.data.downmix)
        hop_length = config.data.hop_length
        reason = unmeasurable(1 + recording.shape[0] // hop_length, hop_length, rate)
        if reason is not None:
            raise DataError(f"{args.audio}: a recording of {recording.shape[0]} samples, {reason}")
        mel_spectrogram = MelSpectrogram.from_config(config.data)
        mel = mel_spectrogram(recording)  # [80, F]
        generator = torch.Generator().manual_seed(config.train.seed)
        audio = model.infer(mel[None], sigma=args.temp, generator=generator)[0]
    except (ConfigError, DataError, CheckpointError, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    result = measure(audio, recording, rate, config.data.hop_length)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synthesized = mel_spectrogram(audio)
    figure, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    frames = synthesized.shape[-1]
    for axis, image, title in (
        (axes[0], mel[:, :frames], f"recording: {os.path.basename(args.audio)}"),
        (axes[1], synthesized, f"synthesis at temperature {args.temp:g}"),
    ):
        axis.imshow(image.numpy(), origin="lower", aspect="auto", interpolation="none", vmin=-11.5, vmax=2)
        axis.set_title(title)
        axis.set_ylabel("mel band")
    axes[1].set_xlabel(f"frame ({config.data.hop_length} samples)")
    figure.suptitle(f"{os.path.basename(args.checkpoint_path)}: {describe_measures(result)}")
    figure.tight_layout()
    partial = args.output + ".partial.png"
    figure.savefig(partial, dpi=80)
    os.replace(partial, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
