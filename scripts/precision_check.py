"""How far reduced-precision synthesis is from fp32 on a trained model, with the same noise.

    python scripts/precision_check.py -c configs/demo.json --checkpoint_path pretrained/nanoflow-demo.pt
    python scripts/precision_check.py -c config.json --checkpoint_path ckpt --precision fp16 --device cuda

Synthesizes every test clip twice from the same `z` (temperature `-t`, seed of the config):
once with the estimator in fp32, once in `--precision`, and prints per clip the mean
absolute difference of their log-mels (natural log of Tacotron 2's 80-band mel of
magnitudes floored at 1e-2, as metrics.log_mel_l1 computes it) and the largest sample
difference. The flow's state, log_s and the affine update are fp32 in both.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import CheckpointError, load_checkpoint
from config import ConfigError, check_positive, load_config
from data import DataError
from mel2samp import Mel2Samp
from metrics import log_mel_l1
from model import build_model, synthesis_length
from synthesis import PRECISIONS as SYNTHESIS_PRECISIONS
from synthesis import synthesis_precision
from train import resolve_device

PRECISIONS = {name: dtype for name, dtype in SYNTHESIS_PRECISIONS.items() if dtype != torch.float32}  # against fp32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Reduced-precision synthesis against fp32 with the same noise.")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--checkpoint_path", required=True)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("-t", "--temp", type=float, default=0.8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        check_positive({"-t/--temp": [args.temp]})
        device = resolve_device(args.device, None)
        config = load_config(args.config, sections=("train_config", "data_config", "waveflow_config"))
        synthesis_precision(config, args.precision, device)  # refuses fp16 off CUDA, as train.py -s does
        model = build_model(config.waveflow)
        load_checkpoint(args.checkpoint_path, model)
        model = model.to(device).eval().remove_weight_norm()
        reduced_model = copy.deepcopy(model).to(PRECISIONS[args.precision])
        clips = Mel2Samp.from_config(config.data, mode="synthesis", seed=config.train.seed)
        differences = []
        for index, path in enumerate(clips.files):
            mel = clips[index][0][None].to(device)
            samples = synthesis_length(mel.shape[-1], config.data.hop_length)
            if samples <= config.data.filter_length // 2:  # what the log-mel needs
                print(
                    f"{path}: its synthesis of {max(samples, 0)} samples is too short to compare (need more "
                    f"than {config.data.filter_length // 2}): left out",
                    file=sys.stderr,
                )
                continue
            generator = torch.Generator().manual_seed(config.train.seed + index)
            height = config.waveflow.n_height
            z = torch.randn(1, 1, height, samples // height, generator=generator) * args.temp
            z = z.to(device)
            reference = model.infer(mel, z=z)[0].cpu()
            reduced = reduced_model.infer(mel, z=z)[0].cpu()
            difference = log_mel_l1(
                reduced.numpy(), reference.numpy(), config.data.sampling_rate, config.data.hop_length
            )
            differences.append(difference)
            print(
                f"{os.path.basename(path)}: mean |log-mel difference| {difference:.4f}, "
                f"largest sample difference {(reduced - reference).abs().max().item():.4f}"
            )
        if not differences:
            raise DataError(f"{config.data.test_files}: no test clip is long enough to compare")
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"{args.precision} against fp32 over {len(differences)} clips: mean |log-mel difference| "
        f"{statistics.mean(differences):.4f} (largest {max(differences):.4f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
