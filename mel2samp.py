"""Mel2Samp: the (mel, audio) dataset, and the command that precomputes mel spectrograms.

The name and the command come from NVIDIA's WaveGlow (Prenger et al., ICASSP 2019),
which the original NanoFlow code followed; users of either know them. Every item
is ``(mel [n_mels, F], audio [T])`` with ``F = 1 + T // hop_length``:

- ``mode="train"``: a random ``segment_length`` crop, zero-padded at the end when
  the clip is shorter, and the mel of that crop (as WaveGlow does), so the frames
  the model sees are aligned with the samples it models. The crop depends only on
  ``(seed, epoch, index)``: resuming at an epoch gives the same crops, whatever
  the number of DataLoader workers. The epoch is the one ``set_epoch`` chose, or
  travels with the index: ``dataset[epoch, index]``, so that one DataLoader whose
  sampler runs over several epochs keeps its workers and prefetches across epochs.
- ``mode="eval"``: the first ``segment_length`` samples, padded the same way.
- ``dequantize``: in training and evaluation, uniform noise of one 16-bit step
  (``U(-0.5, 0.5) / 32768``, drawn from ``(seed, epoch, index)``) is added to the
  audio after its mel is computed: the standard treatment of discrete data in flows
  (Theis et al., ICLR 2016), which bounds the density a continuous model can put on
  the 65,536 values 16-bit audio takes. Off by default, as in the original. Whole
  clips get it only when asked (``from_config(..., dequantize=True)``: the test
  log-likelihood of ``-v``), so that a recording a synthesis is measured against
  stays the recording.
- ``mode="synthesis"``: the mel of the whole clip (exactly what the command below
  writes and what Tacotron 2 is trained on) and the clip cut to
  ``hop_length * (F - 1)`` samples, a whole number of frames. A clip too short
  for a mel is a `DataError` when it is read, not when the list is: -v and -s
  leave such clips out with a warning.
- ``resample``, ``downmix``: clips at another rate are resampled, and the channels
  of a clip with several averaged, as they are read (``data.load_audio``); a
  training crop is then cut from the whole resampled clip.
- ``mel_directory``: fine-tuning on an acoustic model's own mels (ground-truth
  aligned, from teacher forcing), HiFi-GAN's convention. Each clip's mel is read
  from ``<mel_directory>/<audio file name>.pt`` (or ``.npy``, or the file name
  without its extension: ``LJ001-0001.npy``) instead of computed. The mel of a
  clip of T samples should have ``1 + T // hop_length`` frames; up to
  ``MEL_FRAME_TOLERANCE`` more or fewer are cut or repeat the last frame, more is
  an error naming both files. Training crops then start on a frame
  (``start = hop_length * f``) and take frames ``f .. f + segment_length //
  hop_length``, the frames the crop's own mel would have; past the end of a
  clip shorter than a segment (zero-padded audio) the mel is silence,
  ``log(1e-5)``.

The mel is computed per item on the CPU in ``__getitem__``, so DataLoader workers
compute it in parallel with the training step; a crop costs an STFT and an
[80, 513] matrix product, and only the crop is read from disk.

As a command, ``python mel2samp.py -f filelist.txt -c config.json -o out_dir``
writes ``out_dir/<audio file name>.pt`` (``LJ001-0001.wav.pt``, WaveGlow's naming)
holding the whole clip's mel as a float32 tensor [n_mels, F].
"""

from __future__ import annotations

import io
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from config import CommandParser, ConfigError, DataConfig, load_config
from data import (
    LOG_FLOOR,
    MAX_WAV_VALUE,
    MEL_FILE_EXTENSIONS,
    DataError,
    MelSpectrogram,
    audio_length,
    load_audio,
    load_mel,
    mel_filter_warning,
    mel_frame_count,
    read_file_list,
    refuse_shared_names,
)
from storage import warn, write_atomically

MODES = ("train", "eval", "synthesis")
MEL_FRAME_TOLERANCE = 2  # frames a stored mel may differ from 1 + T // hop_length (other STFT paddings)


def check_mel_fits_audio(mel_path: str, frames: int, audio_path: str, length: int, hop_length: int) -> None:
    """Refuse a stored mel of `frames` frames as the mel of `length` samples of audio, which has
    `1 + length // hop_length` (up to `MEL_FRAME_TOLERANCE` apart): another clip's, or another hop's."""
    expected = 1 + length // hop_length
    if abs(frames - expected) > MEL_FRAME_TOLERANCE:
        raise DataError(
            f"{mel_path}: mel has {frames} frames, its audio {audio_path} ({length} samples) has {expected} "
            f"(1 + samples // hop_length {hop_length}); not the mel of that clip, or made with another hop length?"
        )


class Mel2Samp(Dataset):
    """(mel [n_mels, F], audio [T]) pairs from the audio files of a file list; see the module docstring."""

    def __init__(
        self,
        *,
        file_list: str | list[str],
        mode: str,
        segment_length: int,
        sampling_rate: int,
        filter_length: int,
        hop_length: int,
        win_length: int,
        mel_fmin: float,
        mel_fmax: float,
        n_mel_channels: int = 80,
        seed: int = 1234,
        dequantize: bool = False,
        mel_directory: str = "",
        resample: bool = False,
        downmix: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        if mode != "synthesis" and segment_length <= filter_length // 2:  # whole clips need no crop
            raise ConfigError(
                f"data_config.segment_length ({segment_length}) must exceed filter_length / 2 "
                f"({filter_length // 2}) for the mel spectrogram's reflect padding"
            )
        self.mode = mode
        self.segment_length = segment_length
        self.sampling_rate = sampling_rate
        self.hop_length = hop_length
        self.n_mel_channels = n_mel_channels
        self.seed = seed
        self.dequantize = dequantize
        self.audio_options = {"resample": resample, "downmix": downmix}  # how data.load_audio reads a clip
        self.epoch = 0
        self.mel = MelSpectrogram(
            sampling_rate=sampling_rate,
            filter_length=filter_length,
            hop_length=hop_length,
            win_length=win_length,
            n_mel_channels=n_mel_channels,
            mel_fmin=mel_fmin,
            mel_fmax=mel_fmax,
        )
        self.files = read_file_list(file_list) if isinstance(file_list, str) else list(file_list)
        # Checking every header now reports a bad file before training starts, not in a worker hours later.
        self.lengths = [audio_length(path, sampling_rate, **self.audio_options) for path in self.files]
        self.mel_files = self._find_mels(mel_directory) if mel_directory else []  # empty: mels computed from the audio

    def _find_mels(self, mel_directory: str) -> list[str]:
        """The stored mel of every clip, each checked against its clip's length before any work."""
        if not os.path.isdir(mel_directory):
            raise DataError(f"{mel_directory}: mel_directory not found")
        found = []
        for audio_path, length in zip(self.files, self.lengths, strict=True):
            name = os.path.basename(audio_path)
            candidates = [
                os.path.join(mel_directory, base + extension)
                for base in (name, os.path.splitext(name)[0])
                for extension in MEL_FILE_EXTENSIONS
            ]
            mel_path = next((path for path in candidates if os.path.isfile(path)), None)
            if mel_path is None:
                raise DataError(
                    f"{candidates[0]}: mel file not found (the mel of {audio_path}; also looked for "
                    f"{', '.join(os.path.basename(path) for path in candidates[1:])})"
                )
            check_mel_fits_audio(
                mel_path, mel_frame_count(mel_path, self.n_mel_channels), audio_path, length, self.hop_length
            )
            found.append(mel_path)
        mel_of = dict(zip(self.files, found, strict=True))
        refuse_shared_names(self.files, mel_of.__getitem__, "both find their mel in")  # mels go by file name
        return found

    @classmethod
    def from_config(
        cls,
        data: DataConfig,
        *,
        mode: str,
        seed: int = 1234,
        file_list: str | list[str] | None = None,
        dequantize: bool | None = None,
    ) -> Mel2Samp:
        """The dataset for `mode` of `file_list` (a file list's path, or the audio paths themselves); by
        default `data.training_files` for training and `data.test_files` otherwise. `dequantize` defaults
        to `data.dequantize` for training and evaluation crops, and to off for whole clips, whose audio is
        then the recording a synthesis is measured against (the whole-clip log-likelihood asks for it)."""
        if file_list is None:
            file_list = data.training_files if mode == "train" else data.test_files
        if dequantize is None:
            dequantize = data.dequantize and mode != "synthesis"
        return cls(
            file_list=file_list,
            mode=mode,
            segment_length=data.segment_length,
            sampling_rate=data.sampling_rate,
            filter_length=data.filter_length,
            hop_length=data.hop_length,
            win_length=data.win_length,
            mel_fmin=data.mel_fmin,
            mel_fmax=data.mel_fmax,
            n_mel_channels=data.n_mel_channels,
            seed=seed,
            dequantize=dequantize,
            mel_directory=data.mel_directory,
            resample=data.resample,
            downmix=data.downmix,
        )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops `dataset[index]` returns; call before iterating a DataLoader.

        DataLoader workers receive a copy of the dataset when an iteration starts,
        so this must not be combined with ``persistent_workers=True``: ask for
        ``dataset[epoch, index]`` instead.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def crop_start(self, index: int, epoch: int | None = None) -> int:
        """First sample of item `index`'s segment: random in training, a function of (seed, epoch, index)
        (by default the epoch `set_epoch` chose); with stored mels, the first sample of a frame."""
        max_start = self.lengths[index] - self.segment_length
        if self.mode != "train" or max_start <= 0:
            return 0
        # A generator per item, rather than one per worker, is what makes crops independent of worker count.
        generator = np.random.default_rng([self.seed % 2**64, self.epoch if epoch is None else epoch, index])
        if self.mel_files:
            return self.hop_length * int(generator.integers(0, max_start // self.hop_length + 1))
        return int(generator.integers(0, max_start + 1))

    def stored_mel(self, index: int, first: int = 0, count: int | None = None) -> torch.Tensor:
        """Frames `first .. first + count - 1` of item `index`'s stored mel -> mel [n_mels, count],
        fitted to `1 + T // hop_length` frames for its T samples and silence past them."""
        mel = load_mel(self.mel_files[index], self.n_mel_channels)  # [n_mels, F']
        frames = 1 + self.lengths[index] // self.hop_length
        if mel.shape[1] < frames:  # a frame or two short: repeat the last
            mel = torch.cat([mel, mel[:, -1:].expand(-1, frames - mel.shape[1])], dim=1)
        mel = mel[:, :frames]  # [n_mels, F]
        if count is None:
            return mel
        mel = mel[:, first : first + count]
        return F.pad(mel, (0, count - mel.shape[1]), value=math.log(LOG_FLOOR))  # [n_mels, count]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `index` of the epoch `set_epoch` chose (`key = index`) or of `epoch` (`key = (epoch, index)`)
        -> (mel [n_mels, F], audio [T]) with F = 1 + T // hop_length in training and evaluation."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        path = self.files[index]
        if self.mode == "synthesis":
            audio = load_audio(path, self.sampling_rate, **self.audio_options)  # [T]
            if audio.shape[0] <= self.mel.filter_length // 2:
                raise DataError(
                    f"{path}: clip of {audio.shape[0]} samples is too short for a mel spectrogram "
                    f"(need more than {self.mel.filter_length // 2})"
                )
            mel = self.stored_mel(index) if self.mel_files else self.mel(audio)  # [n_mels, 1 + T // hop]
            return mel, self.dequantized(audio[: self.hop_length * (mel.shape[-1] - 1)], epoch, index)
        start = self.crop_start(index, epoch)
        audio = load_audio(path, self.sampling_rate, start=start, length=self.segment_length, **self.audio_options)
        audio = F.pad(audio, (0, self.segment_length - audio.shape[0]))  # [segment_length]
        if self.mel_files:
            mel = self.stored_mel(index, start // self.hop_length, 1 + self.segment_length // self.hop_length)
        else:
            mel = self.mel(audio)
        return mel, self.dequantized(audio, epoch, index)

    def dequantized(self, audio: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        """`audio [T]` of item `index`, plus its dequantization noise when `dequantize` is on: drawn from
        `(seed, epoch, index)`, the epoch only in training (evaluation scores the same audio every time)."""
        if not self.dequantize:
            return audio
        generator = np.random.default_rng([self.seed % 2**64, epoch if self.mode == "train" else 0, index, 1])
        noise = generator.random(audio.shape[0], dtype=np.float32) - 0.5
        return audio + torch.from_numpy(noise) / MAX_WAV_VALUE


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack equal-length items: -> (mel [B, n_mels, F], audio [B, T])."""
    lengths = {audio.shape[-1] for _, audio in items}
    if len(lengths) > 1:
        raise ValueError(
            f"cannot batch clips of different lengths {sorted(lengths)}: use batch_size 1 for synthesis items"
        )
    mels, audios = zip(*items, strict=True)
    return torch.stack(mels), torch.stack(audios)


def mel_file_name(audio_path: str) -> str:
    """The name the command gives the mel of `audio_path`: WaveGlow's ``<audio file name>.pt``."""
    return os.path.basename(audio_path) + ".pt"


def write_mels(file_list: str, config_path: str, output_dir: str) -> int:
    """Write the mel [n_mels, F] of every clip in `file_list` to `output_dir`; returns the number written."""
    data = load_config(config_path, sections=("data_config",)).data
    if (message := mel_filter_warning(data)) is not None:
        warn(message)
    paths = read_file_list(file_list)
    refuse_shared_names(paths, mel_file_name, "would both be written to", file_list)
    outputs = {mel_file_name(path): path for path in paths}
    options = {"resample": data.resample, "downmix": data.downmix}
    for path in paths:  # every header before any work, so a bad file costs no time
        length = audio_length(path, data.sampling_rate, **options)
        if length <= data.filter_length // 2:
            raise DataError(
                f"{path}: clip of {length} samples is too short for a mel spectrogram "
                f"(need more than {data.filter_length // 2})"
            )
    mel_spectrogram = MelSpectrogram.from_config(data)
    os.makedirs(output_dir, exist_ok=True)
    for name, path in tqdm(outputs.items(), desc="mel", unit="file", disable=None):
        with torch.no_grad():
            mel = mel_spectrogram(load_audio(path, data.sampling_rate, **options))  # [n_mels, F]
        buffer = io.BytesIO()
        torch.save(mel.contiguous(), buffer)
        write_atomically(os.path.join(output_dir, name), buffer.getbuffer(), durable=False)
    return len(outputs)


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description="Precompute Tacotron 2 mel spectrograms of the clips in a file list.")
    parser.add_argument(
        "-f", "--filelist_path", required=True, help="file list: one audio path (or path|text) per line"
    )
    parser.add_argument("-c", "--config", required=True, help="JSON config whose data_config sets the mel parameters")
    parser.add_argument("-o", "--output_dir", required=True, help="folder for the <audio file name>.pt mel files")
    args = parser.parse_args(argv)
    try:
        count = write_mels(args.filelist_path, args.config, args.output_dir)
    except (DataError, ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} mel spectrograms to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
