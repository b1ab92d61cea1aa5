"""What `data_config.resample` costs a training item: one crop read from a clip at the config's rate, against
the same crop from the clip at another rate (read whole and resampled with soxr), timed in interleaved pairs.

    python scripts/time_resample.py data/demo/wavs/demo_001.wav --rate 48000 --format flac

The clip (at 22,050 Hz) is first resampled to `--rate` and written as `--format` in a scratch folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import soundfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from config import ConfigError, check_positive
from data import DataError, load_audio, resample_audio

SEGMENT = 16000  # samples of a training crop (the original configs' segment_length), or the whole of a shorter clip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time a training crop read with and without resampling.")
    parser.add_argument("clip", help="a mono clip at 22,050 Hz")
    parser.add_argument("--rate", type=int, default=48000, help="the other rate the clip is written at")
    parser.add_argument("--format", choices=["wav", "flac"], default="flac")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        check_positive({"--rate": [args.rate], "--repeats": [args.repeats]})
        audio = load_audio(args.clip, 22050).numpy()
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    crop = min(SEGMENT, audio.shape[0])
    with tempfile.TemporaryDirectory() as folder:
        same = os.path.join(folder, f"same.{args.format}")
        other = os.path.join(folder, f"other.{args.format}")
        soundfile.write(same, audio, 22050, subtype="PCM_16")
        soundfile.write(other, resample_audio(audio, 22050, args.rate), args.rate, subtype="PCM_16")
        start = (audio.shape[0] - crop) // 2
        times: dict[str, list[float]] = {"same rate": [], "resampled": []}
        for _ in range(args.repeats):
            for name, path, resample in (("same rate", same, False), ("resampled", other, True)):
                started = time.perf_counter()
                load_audio(path, 22050, start=start, length=crop, resample=resample)
                times[name].append(time.perf_counter() - started)
    clip = f"{audio.shape[0]} samples ({audio.shape[0] / 22050:.2f} s)"
    print(f"a crop of {crop} samples from a clip of {clip} ({args.format}), median of {args.repeats}:")
    for name, values in times.items():
        print(f"  {name:<10} {1000 * statistics.median(values):7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
