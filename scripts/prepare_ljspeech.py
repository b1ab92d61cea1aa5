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
import os
import shutil
import sys
import tarfile
import urllib.request

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


def extract(archive: str, data_dir: str) -> str:
    """Extract the archive's LJSpeech-1.1 folder into `data_dir`; returns the corpus folder.

    Extraction goes to a scratch folder that is renamed only when complete, so
    a corpus folder that exists was fully extracted.
    """
    corpus = os.path.join(data_dir, CORPUS_FOLDER)
    scratch = os.path.join(data_dir, f".{CORPUS_FOLDER}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            stray = [m.name for m in members if m.name.split("/")[0] != CORPUS_FOLDER]
            if stray or not members:
                raise DataError(
                    f"{archive}: not an {CORPUS_FOLDER} archive ({'it holds ' + stray[0] if stray else 'it is empty'})"
                )
            tar.extractall(scratch, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        shutil.rmtree(scratch, ignore_errors=True)
        raise DataError(f"{archive}: cannot extract ({error})") from None
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
        audio_length(wav, SAMPLING_RATE)
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
    try:
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
