"""Add a low, deterministic noise floor to 16-bit wav files, in place.

Synthetic speech (espeak-ng, and some TTS outputs) holds long runs of exact digital
silence, which no recording has: a continuous density such as a flow's can grow
without bound on samples that are exactly 0, and its training loss then stops
meaning anything (and in low precision diverges). Real recordings always carry some
room and microphone noise; this gives such a corpus the same, well below the speech.

    python scripts/add_noise_floor.py data/demo/wavs/*.wav            # -70 dBFS, the demo corpus's floor
    python scripts/add_noise_floor.py --level_db -60 --seed 7 a.wav b.wav

The noise is white Gaussian with the given RMS relative to full scale, drawn from a
generator seeded by `--seed` and the file's name, so the same files always get the
same noise. Files must be 16-bit PCM; the result is rounded and clipped to 16 bits.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import numpy as np
import soundfile


def add_noise_floor(path: str, level_db: float, seed: int) -> float:
    """Add the floor to one file in place (written to a temporary name, then renamed); returns
    the fraction of samples that were exactly zero before."""
    try:
        info = soundfile.info(path)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot read audio ({error})") from None
    if info.subtype != "PCM_16":
        raise ValueError(f"{path}: expected 16-bit PCM, got {info.subtype}")
    audio, rate = soundfile.read(path, dtype="int16", always_2d=False)
    generator = np.random.default_rng([seed, zlib.crc32(os.path.basename(path).encode())])
    noise = generator.standard_normal(audio.shape) * (32768.0 * 10 ** (level_db / 20))
    noisy = np.clip(np.round(audio.astype(np.float64) + noise), -32768, 32767).astype(np.int16)
    partial = path + ".partial"
    soundfile.write(partial, noisy, rate, subtype="PCM_16", format="WAV")
    os.replace(partial, path)
    return float(np.mean(audio == 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Add a low deterministic noise floor to 16-bit wav files, in place.")
    parser.add_argument("files", nargs="+", help="16-bit PCM wav files")
    parser.add_argument("--level_db", type=float, default=-70.0, help="noise RMS in dB relative to full scale")
    parser.add_argument("--seed", type=int, default=0, help="combined with each file's name to seed its noise")
    args = parser.parse_args(argv)
    if args.level_db >= 0:
        parser.error("--level_db must be negative (dB below full scale)")
    try:
        zeros = [add_noise_floor(path, args.level_db, args.seed) for path in args.files]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"added a {args.level_db:g} dBFS noise floor to {len(zeros)} files "
        f"({100 * np.mean(zeros):.1f}% of their samples were exactly 0)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
