"""Add a low, deterministic noise floor to 16-bit PCM audio files (wav, flac), in place.

Synthetic speech (espeak-ng, and some TTS outputs) holds long runs of exact digital
silence, which no recording has: a continuous density such as a flow's can grow
without bound on samples that are exactly 0, and its training loss then stops
meaning anything (and in low precision diverges). Real recordings always carry some
room and microphone noise; this gives such a corpus the same, well below the speech.

    python scripts/add_noise_floor.py data/demo/wavs/*.wav            # -70 dBFS, the demo corpus's floor
    python scripts/add_noise_floor.py --level_db -60 --seed 7 a.wav b.wav

The noise is white Gaussian with the given RMS relative to full scale, drawn from a
generator seeded by `--seed` and the file's name, so the same files always get the
same noise. Files must be 16-bit PCM (wav, flac, or another format libsndfile writes);
the result is rounded and clipped to 16 bits and keeps the file's format. Every file is
checked before any is changed, and all are written to `<name>.partial` before any is
renamed over its original, so a bad file or a failed write (a full disk) changes none. A
symbolic link stays a link: the file it points to gets the floor.

Run it once per corpus: a file that already has a floor cannot be told from a recording
with its own noise, and a second run adds the same noise again (6 dB louder in all).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zlib

import numpy as np
import soundfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import DataError, audio_length
from storage import PARTIAL_SUFFIX, describe


def check(path: str) -> tuple[str, str, str]:
    """`(format, subtype, endian)` of a file the floor can be added to and written back in its own format."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: not found")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file")
    try:
        info = soundfile.info(path)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        message = " ".join(getattr(error, "error_string", str(error)).split())
        raise ValueError(f"{path}: cannot read audio ({message})") from None
    if info.subtype != "PCM_16":
        raise ValueError(f"{path}: expected 16-bit PCM, got {info.subtype}")
    if not soundfile.check_format(info.format, info.subtype, info.endian):
        raise ValueError(f"{path}: cannot write 16-bit PCM back in its format ({info.format})")
    try:  # the training data's header checks: empty, truncated (libsndfile reads such a file short, silently)
        audio_length(path, info.samplerate, downmix=True)
    except DataError as error:
        raise ValueError(str(error)) from None
    return info.format, info.subtype, info.endian


def target(path: str) -> str:
    """The file that `path` names: a symbolic link's target (so the link stays a link), else `path`."""
    return os.path.realpath(path) if os.path.islink(path) else path


def write_with_floor(path: str, kind: tuple[str, str, str], level_db: float, seed: int) -> float:
    """Write `path` with the floor added to `target(path) + '.partial'`, in its own format, subtype and byte
    order (`kind`, as `check` gives them); returns the fraction of samples that were exactly zero. The noise
    is seeded by the name `path` gives, a link's included."""
    file_format, subtype, endian = kind
    try:
        audio, rate = soundfile.read(path, dtype="int16", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot read audio ({' '.join(str(error).split())})") from None
    generator = np.random.default_rng([seed, zlib.crc32(os.path.basename(path).encode())])
    noise = generator.standard_normal(audio.shape) * (32768.0 * 10 ** (level_db / 20))
    noisy = np.clip(np.round(audio.astype(np.float64) + noise), -32768, 32767).astype(np.int16)
    try:
        with open(target(path) + PARTIAL_SUFFIX, "wb") as partial:
            soundfile.write(partial, noisy, rate, subtype=subtype, format=file_format, endian=endian)
    except OSError as error:
        raise ValueError(f"{target(path) + PARTIAL_SUFFIX}: cannot write ({describe(error)})") from None
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"{target(path) + PARTIAL_SUFFIX}: cannot write ({' '.join(str(error).split())})") from None
    return float(np.mean(audio == 0))


def add_noise_floor(paths: list[str], level_db: float, seed: int) -> list[float]:
    """Add the floor to every file in place; returns the fraction of each file's samples that were exactly
    zero before. Every file is checked, then every one written to `<name>.partial`, and only then are they
    renamed over the originals: a bad file or a failed write changes none of them."""
    seen, kinds = {}, []
    for path in paths:
        kinds.append(check(path))
        stat = os.stat(path)
        identity = (stat.st_dev, stat.st_ino)  # the same file by another name or link too
        if identity in seen:
            raise ValueError(f"{path}: listed twice (also as {seen[identity]})")
        seen[identity] = path
    written = []
    try:
        zeros = []
        for path, kind in zip(paths, kinds, strict=True):
            written.append(target(path) + PARTIAL_SUFFIX)
            zeros.append(write_with_floor(path, kind, level_db, seed))
        for path in paths:
            os.replace(target(path) + PARTIAL_SUFFIX, target(path))
    except BaseException:  # Ctrl-C included: no partial file is left behind
        for partial in written:
            if os.path.isfile(partial):
                os.remove(partial)
        raise
    return zeros


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Add a low deterministic noise floor to 16-bit PCM audio, in place.")
    parser.add_argument("files", nargs="+", help="16-bit PCM audio files (wav, flac)")
    parser.add_argument("--level_db", type=float, default=-70.0, help="noise RMS in dB relative to full scale")
    parser.add_argument("--seed", type=int, default=0, help="combined with each file's name to seed its noise")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.level_db) and args.level_db < 0):
        parser.error(f"--level_db {args.level_db:g}: must be a negative number (dB below full scale)")
    try:
        zeros = add_noise_floor(args.files, args.level_db, args.seed)
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
