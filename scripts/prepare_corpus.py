"""File lists and configs for a multi-speaker corpus laid out like VCTK or LibriTTS, given as a local folder.

    python scripts/prepare_corpus.py --corpus VCTK-Corpus-0.92 --output-dir filelists/vctk
    python scripts/prepare_corpus.py --corpus LibriTTS/train-clean-100 --output-dir filelists/libritts

Layouts (``--layout auto`` tells them apart):

- VCTK 0.92 (Yamagishi et al., 2019): ``wav48_silence_trimmed/p225/p225_001_mic1.flac``, the text in
  ``txt/p225/p225_001.txt``; one microphone is taken (``--mic``, mic1 by default). VCTK 0.80:
  ``wav48/p225/p225_001.wav`` and the same ``txt/``. 48 kHz.
- LibriTTS (Zen et al., Interspeech 2019): ``SPEAKER/CHAPTER/SPEAKER_CHAPTER_xxxxxx_xxxxxx.wav`` with
  ``SPEAKER_CHAPTER_xxxxxx_xxxxxx.normalized.txt`` beside it, at any depth below the folder (a subset
  such as ``train-clean-100`` or the folder holding several). 24 kHz.

Nothing is downloaded or copied. The split, fixed by ``--seed``: ``--test-speakers`` speakers are held out
whole (``test_unseen_speakers.txt``, up to ``--test-utterances`` clips of each; their other clips are in
no list), and of every other speaker ``--test-utterances`` clips are held out (``test_files.txt``); the
rest is ``train_files.txt``. Each list starts with the header ``# path|speaker|text``, and each line
names its speaker, which `train.py -v` groups its measures by. ``config.json`` is the base config
(``--config``) with these lists, and ``data_config.resample`` on when a clip's rate is not the config's:
clips are resampled as they are read (data.py). ``config_unseen_speakers.json`` differs only in its
``test_files``, for ``train.py -v`` on the held-out speakers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

import soundfile
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from config import ConfigError, load_config
from data import DataError, audio_length, file_list_text
from storage import read_text, write_all_atomically

LAYOUTS = ("auto", "vctk", "libritts")
VCTK_AUDIO_FOLDERS = ("wav48_silence_trimmed", "wav48")  # VCTK 0.92, VCTK 0.80
LIBRITTS_NAME = re.compile(r"^(\d+)_(\d+)_\d+_\d+\.(wav|flac)$", re.IGNORECASE)
AUDIO_EXTENSIONS = (".wav", ".flac")  # as named in any case: .WAV too
HEADER = "path|speaker|text"
LIST_FILES = {"train": "train_files.txt", "test": "test_files.txt", "unseen": "test_unseen_speakers.txt"}
CONFIG_FILES = {"test": "config.json", "unseen": "config_unseen_speakers.json"}  # by their test_files
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "nanoflow-h16-r128-emb512.json"
)


def transcript(path: str) -> str:
    """A transcript file's text on one line ('' when there is none: VCTK lacks a few); `|` would split a
    file list's line, so it becomes a space."""
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a byte-order mark is not text
        return " ".join(f.read().replace("|", " ").split())


def vctk_clips(corpus: str, mic: str) -> list[tuple[str, str, str]]:
    """`(audio path, speaker, text)` of every clip of a VCTK folder (0.92: the `mic` microphone's flac;
    0.80: wav, or flac where it was converted)."""
    folder = next((name for name in VCTK_AUDIO_FOLDERS if os.path.isdir(os.path.join(corpus, name))), None)
    if folder is None:
        raise DataError(f"{corpus}: no {' or '.join(VCTK_AUDIO_FOLDERS)} folder, not a VCTK corpus")
    clips = []
    for speaker in sorted(os.listdir(os.path.join(corpus, folder))):
        speaker_folder = os.path.join(corpus, folder, speaker)
        if not os.path.isdir(speaker_folder):
            continue
        for name in sorted(os.listdir(speaker_folder)):
            if folder == "wav48_silence_trimmed":
                suffix = f"_{mic}.flac"
                if not name.lower().endswith(suffix.lower()):
                    continue
                utterance = name[: -len(suffix)]
            else:
                if not name.lower().endswith(AUDIO_EXTENSIONS):
                    continue
                utterance = os.path.splitext(name)[0]
            text = transcript(os.path.join(corpus, "txt", speaker, utterance + ".txt"))
            clips.append((os.path.join(speaker_folder, name), speaker, text))
    return clips


def libritts_clips(corpus: str) -> list[tuple[str, str, str]]:
    """`(audio path, speaker, text)` of every `SPEAKER_CHAPTER_x_y.wav` (or .flac) below `corpus`, with its
    normalized text."""
    clips = []
    for folder, folders, names in os.walk(corpus):
        folders.sort()
        for name in sorted(names):
            match = LIBRITTS_NAME.match(name)
            if match:
                text = transcript(os.path.join(folder, os.path.splitext(name)[0] + ".normalized.txt"))
                clips.append((os.path.join(folder, name), match.group(1), text))
    return clips


def find_clips(corpus: str, layout: str, mic: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The layout (`layout`, or the one `corpus` has) and its clips."""
    if not os.path.isdir(corpus):
        raise DataError(f"{corpus}: corpus folder not found")
    if layout == "auto":
        is_vctk = any(os.path.isdir(os.path.join(corpus, name)) for name in VCTK_AUDIO_FOLDERS)
        layout = "vctk" if is_vctk else "libritts"
    clips = vctk_clips(corpus, mic) if layout == "vctk" else libritts_clips(corpus)
    if not clips:
        expected = (
            f"{VCTK_AUDIO_FOLDERS[0]}/SPEAKER/*_{mic}.flac or {VCTK_AUDIO_FOLDERS[1]}/SPEAKER/*.wav"
            if layout == "vctk"
            else "SPEAKER/CHAPTER/SPEAKER_CHAPTER_x_y.wav (LibriTTS) or wav48*/SPEAKER/ (VCTK)"
        )
        raise DataError(f"{corpus}: no clips found, expected {expected}")
    return layout, clips


def split(
    clips: list[tuple[str, str, str]], test_speakers: int, test_utterances: int, seed: int
) -> tuple[list, list, list]:
    """(train, held-out utterances of the training speakers, held-out speakers' utterances), fixed by `seed`."""
    by_speaker: dict[str, list[tuple[str, str, str]]] = {}
    for clip in clips:
        by_speaker.setdefault(clip[1], []).append(clip)
    speakers = sorted(by_speaker)
    if len(speakers) <= test_speakers:
        raise DataError(
            f"the corpus has {len(speakers)} speakers, too few to hold out {test_speakers} (--test-speakers)"
        )
    generator = random.Random(seed)
    unseen = set(generator.sample(speakers, test_speakers))
    train, test, test_unseen = [], [], []
    for speaker in speakers:
        chosen = set(generator.sample(range(len(by_speaker[speaker])), min(test_utterances, len(by_speaker[speaker]))))
        if speaker in unseen:
            test_unseen += [clip for index, clip in enumerate(by_speaker[speaker]) if index in chosen]
            continue
        if len(by_speaker[speaker]) <= test_utterances:
            raise DataError(
                f"speaker {speaker} has {len(by_speaker[speaker])} clips, too few to hold out {test_utterances} "
                f"(--test-utterances) and train on the rest"
            )
        for index, clip in enumerate(by_speaker[speaker]):
            (test if index in chosen else train).append(clip)
    return train, test, test_unseen


def config_texts(base: str, output_dir: str, lists: dict[str, str], resample: bool, name: str) -> dict[str, bytes]:
    """config.json (test_files: held-out utterances) and config_unseen_speakers.json (held-out speakers), by
    path; `base` has been checked by `load_config`."""
    raw = json.loads(read_text(base))
    raw["data_config"]["training_files"] = lists["train"]
    raw["data_config"]["resample"] = resample or raw["data_config"].get("resample", False)
    raw["waveflow_config"]["model_name"] = f"{raw['waveflow_config']['model_name']}-{name}"
    texts = {}
    for key, file_name in CONFIG_FILES.items():
        raw["data_config"]["test_files"] = lists[key]
        texts[os.path.join(output_dir, file_name)] = (json.dumps(raw, indent=4) + "\n").encode()
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="File lists and configs for a VCTK- or LibriTTS-like corpus.")
    parser.add_argument("--corpus", required=True, help="the corpus folder (VCTK's, or a LibriTTS subset's)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="the corpus's layout (default: detected)")
    parser.add_argument("--mic", default="mic1", help="VCTK 0.92's microphone: mic1 (default) or mic2")
    parser.add_argument("--output-dir", required=True, help="folder for the file lists and configs")
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="base config whose model and mel settings the written configs keep (default: the repository's "
        "configs/nanoflow-h16-r128-emb512.json)",
    )
    parser.add_argument("--test-speakers", type=int, default=4, help="speakers held out whole (default 4)")
    parser.add_argument(
        "--test-utterances", type=int, default=5, help="clips held out of each speaker, and of each held-out one"
    )
    parser.add_argument("--seed", type=int, default=1234, help="fixes which speakers and clips are held out")
    args = parser.parse_args(argv)
    if args.test_speakers < 1 or args.test_utterances < 1:
        parser.error("--test-speakers and --test-utterances must be at least 1")
    try:
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            raise DataError(f"{args.output_dir}: not a folder (--output-dir)")
        for file_name in (*LIST_FILES.values(), *CONFIG_FILES.values()):
            if os.path.isdir(os.path.join(args.output_dir, file_name)):
                raise DataError(f"{os.path.join(args.output_dir, file_name)}: is a folder, not a file")
        data = load_config(args.config).data  # the whole config is checked before anything is written
        sampling_rate = data.sampling_rate
        layout, clips = find_clips(args.corpus, args.layout, args.mic)
        train, test, unseen = split(clips, args.test_speakers, args.test_utterances, args.seed)
        rates = set()
        for path, _, _ in tqdm(clips, desc="checking clips", unit="clip", disable=None):
            audio_length(
                path, sampling_rate, resample=True, downmix=data.downmix
            )  # a bad file is named before anything is written
            rates.add(soundfile.info(path).samplerate)
        lists, texts = {}, {}
        for key, chosen in (("train", train), ("test", test), ("unseen", unseen)):
            lists[key] = os.path.join(args.output_dir, LIST_FILES[key])
            texts[lists[key]] = file_list_text(lists[key], [list(clip) for clip in chosen], header=HEADER)
        name = os.path.basename(os.path.normpath(args.corpus)).lower()
        configs = config_texts(args.config, args.output_dir, lists, rates != {sampling_rate}, name)
        write_all_atomically(texts | configs)  # all five or none: the lists and configs belong together
    except (DataError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    speakers = len({clip[1] for clip in clips})
    print(
        f"{layout}: {len(clips)} clips of {speakers} speakers at {', '.join(f'{rate} Hz' for rate in sorted(rates))}\n"
        f"  {len(train)} training clips in {lists['train']}\n"
        f"  {len(test)} held-out clips of the training speakers in {lists['test']}\n"
        f"  {len(unseen)} clips of {args.test_speakers} held-out speakers in {lists['unseen']}\n"
        f"  configs: {', '.join(configs)}"
        + (f" (data_config.resample on: resampled to {sampling_rate} Hz as read)" if rates != {sampling_rate} else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
