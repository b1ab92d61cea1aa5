"""Download, verify and extract LJSpeech-1.1, and write its train and test file lists.

LJSpeech-1.1 (Ito and Johnson, 2017) is 13,100 clips of one speaker at 22,050 Hz,
the corpus NanoFlow (Lee, Kim, Yoon, NeurIPS 2020) and WaveFlow are trained on.
As in the original README, the first 1310 clips in sorted order (10 %) are the
test set and the rest the training set. The README's commands
(``ls | head -n1310`` and ``ls | tail -n+1310``) put clip 1310 in both lists;
here the two lists are disjoint.

    python scripts/prepare_ljspeech.py                        # download into the working directory
    python scripts/prepare_ljspeech.py --archive LJSpeech-1.1.tar.bz2
    python scripts/prepare_ljspeech.py --corpus /datasets/LJSpeech-1.1

Verification: every clip listed in ``metadata.csv`` must exist as a 22,050 Hz mono
wav, and there must be 13,100 of them (``--expected-clips`` changes that). The
archive's SHA-256 is printed; ``--sha256`` checks it against a known digest.
File lists hold one path per line, relative to the list's own folder.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import shutil
import sys
import tarfile
import urllib.request
import zlib
from typing import Literal

import soundfile
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, for data.py
from data import DataError, audio_length, write_file_list
from storage import read_text

URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"
ARCHIVE_NAME = "LJSpeech-1.1.tar.bz2"
CORPUS_FOLDER = "LJSpeech-1.1"
LJSPEECH_CLIPS = 13100
TEST_CLIPS = 1310
SAMPLING_RATE = 22050
COMPRESSIONS = {b"BZh": "bz2", b"\x1f\x8b": "gz", b"\xfd7zXZ\x00": "xz"}  # first bytes -> tarfile's method
COMPRESSION_NAMES = {"bz2": "bzip2", "gz": "gzip", "xz": "xz", "": "tar"}
READ_MODES: dict[str, Literal["r:", "r:bz2", "r:gz", "r:xz"]] = {"": "r:", "bz2": "r:bz2", "gz": "r:gz", "xz": "r:xz"}


def download(url: str, target: str) -> None:
    """Fetch `url` to `target` through a ``.partial`` file, so an interrupted download is never taken as whole."""
    partial = target + ".partial"
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            size = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(target), disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        raise DataError(f"{url}: download failed ({error})") from None
    os.replace(partial, target)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def compression(archive: str) -> str:
    """tarfile's name for the compression that `archive`'s first bytes show ('' for none). The archive is
    opened with that method alone, so that a damaged one gives that method's one-line reason, not the
    reasons of every method tarfile would try."""
    with open(archive, "rb") as f:
        start = f.read(6)
    return next((method for magic, method in COMPRESSIONS.items() if start.startswith(magic)), "")


def extract(archive: str, data_dir: str) -> str:
    """Extract the archive's LJSpeech-1.1 folder into `data_dir`; returns the corpus folder.

    Extraction goes to a scratch folder that is renamed only when complete, so
    a corpus folder that exists was fully extracted.
    """
    corpus = os.path.join(data_dir, CORPUS_FOLDER)
    scratch = os.path.join(data_dir, f".{CORPUS_FOLDER}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    method = compression(archive)
    try:
        with tarfile.open(archive, READ_MODES[method]) as tar:
            members = tar.getmembers()
            stray = [m.name for m in members if m.name.split("/")[0] != CORPUS_FOLDER]
            if stray or not members:
                raise DataError(
                    f"{archive}: not an {CORPUS_FOLDER} archive ({'it holds ' + stray[0] if stray else 'it is empty'})"
                )
            tar.extractall(scratch, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        shutil.rmtree(scratch, ignore_errors=True)
        reason = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, OSError) and error.errno is not None:  # writing the files: a full disk, permissions
            raise DataError(f"{archive}: cannot extract ({reason})") from None
        if str(error) == "invalid header":  # the first member's header: no tar archive (inside the compression)
            problem = "not a tar archive" + (
                f" (a {COMPRESSION_NAMES[method]} file of something else)" if method else ""
            )
        else:
            problem = f"damaged {COMPRESSION_NAMES[method]} archive"
            problem += "" if reason.startswith("not a") else f" ({reason})"  # "not a bzip2 file" after BZh: damaged
        raise DataError(f"{archive}: cannot extract: {problem}") from None
    os.replace(os.path.join(scratch, CORPUS_FOLDER), corpus)
    os.rmdir(scratch)
    return corpus


def verify_corpus(corpus: str, expected_clips: int) -> list[str]:
    """The wav paths of the clips in `corpus`/metadata.csv, sorted, after checking every one."""
    metadata = os.path.join(corpus, "metadata.csv")
    if not os.path.isfile(metadata):
        raise DataError(f"{corpus}: no metadata.csv, not an {CORPUS_FOLDER} folder")
    try:
        lines = read_text(metadata).splitlines()
    except ValueError as error:  # not UTF-8
        raise DataError(f"{metadata}: {error}") from None
    clip_ids = sorted({line.split("|", 1)[0].strip() for line in lines if line.strip()})  # a clip listed twice once
    if expected_clips and len(clip_ids) != expected_clips:
        raise DataError(
            f"{metadata}: lists {len(clip_ids)} clips, expected {expected_clips} "
            f"(an incomplete copy? --expected-clips 0 accepts any number)"
        )
    wavs = [os.path.join(corpus, "wavs", f"{clip_id}.wav") for clip_id in clip_ids]
    for wav in tqdm(wavs, desc="checking clips", unit="clip", disable=None):
        audio_length(wav, SAMPLING_RATE, resample=True, downmix=True)  # a missing, empty or damaged file
        info = soundfile.info(wav)
        if info.samplerate != SAMPLING_RATE or info.channels != 1:
            found = [f"sampling rate is {info.samplerate} Hz"] if info.samplerate != SAMPLING_RATE else []
            found += [f"has {info.channels} channels"] if info.channels != 1 else []
            raise DataError(
                f"{wav}: {' and '.join(found)}, expected {CORPUS_FOLDER}'s {SAMPLING_RATE} Hz mono "
                f"(a converted copy? Use the original corpus: extract {ARCHIVE_NAME} again)"
            )
    return wavs


def split(wavs: list[str], test_clips: int) -> tuple[list[str], list[str]]:
    """(train, test): the first `test_clips` clips in sorted order are the test set, with no clip in both."""
    if len(wavs) <= test_clips:
        raise DataError(f"the corpus has {len(wavs)} clips, too few to hold out {test_clips} for testing")
    return wavs[test_clips:], wavs[:test_clips]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare LJSpeech-1.1 and its train/test file lists.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", help=f"an already downloaded {ARCHIVE_NAME} (default: download it)")
    source.add_argument("--corpus", help=f"an already extracted {CORPUS_FOLDER} folder")
    parser.add_argument(
        "--data-dir",
        default=".",
        help=f"where the archive is downloaded and {CORPUS_FOLDER}/ extracted (default: the working directory)",
    )
    parser.add_argument("--train-list", default="train_files.txt", help="training file list to write")
    parser.add_argument("--test-list", default="test_files.txt", help="test file list to write")
    parser.add_argument("--test-clips", type=int, default=TEST_CLIPS, help="clips held out for testing")
    parser.add_argument(
        "--expected-clips", type=int, default=LJSPEECH_CLIPS, help="clips metadata.csv must list (0: any number)"
    )
    parser.add_argument("--sha256", help="refuse an archive whose SHA-256 differs from this")
    args = parser.parse_args(argv)
    if args.test_clips < 1:
        parser.error(f"--test-clips {args.test_clips}: must be at least 1")
    if args.expected_clips < 0:
        parser.error(f"--expected-clips {args.expected_clips}: must be at least 1 (or 0: any number)")
    if os.path.realpath(args.train_list) == os.path.realpath(args.test_list):
        parser.error(f"--train-list and --test-list are the same file ({args.train_list})")
    try:
        for option, path in (("--train-list", args.train_list), ("--test-list", args.test_list)):
            if os.path.isdir(path):
                raise DataError(f"{path}: is a folder, not a file list ({option})")
        corpus = args.corpus
        if corpus is None:
            corpus = os.path.join(args.data_dir, CORPUS_FOLDER)
            if os.path.isdir(corpus):
                print(f"{corpus} already extracted")
            else:
                archive = args.archive or os.path.join(args.data_dir, ARCHIVE_NAME)
                if args.archive is None and not os.path.isfile(archive):
                    os.makedirs(args.data_dir, exist_ok=True)
                    print(f"downloading {URL}")
                    download(URL, archive)
                if not os.path.isfile(archive):
                    raise DataError(f"{archive}: archive not found")
                digest = sha256_of(archive)
                print(f"{archive}: sha256 {digest}")
                if args.sha256 and digest != args.sha256.lower():
                    raise DataError(f"{archive}: sha256 is {digest}, expected {args.sha256}")
                print(f"extracting {archive} into {args.data_dir}")
                corpus = extract(archive, args.data_dir)
        wavs = verify_corpus(corpus, args.expected_clips)
        train, test = split(wavs, args.test_clips)
        write_file_list(args.train_list, [[wav] for wav in train])
        write_file_list(args.test_list, [[wav] for wav in test])
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(train)} training clips in {args.train_list}, {len(test)} test clips in {args.test_list}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
