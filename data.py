"""Audio files, file lists and the Tacotron 2 mel spectrogram that conditions the vocoder.

NanoFlow (Lee, Kim, Yoon, NeurIPS 2020, Section 5) is trained, like WaveFlow and
WaveGlow, on the 80-band log-mel spectrogram of NVIDIA's Tacotron 2 (Shen et al.,
ICASSP 2018), so that a trained vocoder takes a Tacotron 2 model's output as it is.
`MelSpectrogram` computes exactly that feature; everything here that reads a file
refuses bad input with a one-line `DataError` naming the file and the problem,
because a corpus that is silently resampled, downmixed or skipped trains a
different model from the one the user asked for: audio at another rate is
resampled only when `data_config.resample` asks (`resample_audio`, soxr), and several
channels are averaged only when `data_config.downmix` asks. Lossy formats (MP3,
Ogg) are refused: their decoders give no sample-exact reads from a position.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import zipfile
from collections.abc import Callable

import librosa
import numpy as np
import soundfile
import soxr
import torch
from torch import nn

from config import HOP_LENGTH, DataConfig
from storage import first_sentence, read_text, write_atomically

MEL_FILE_EXTENSIONS = (".pt", ".npy")
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file
# torch.load(weights_only=True) naming what it would not build: a class, or a function it would call
_REFUSED_GLOBAL = re.compile(r"but got <class '([^']+)'>|Unsupported global: GLOBAL (\S+)")
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's format before its zip files
MAX_WAV_VALUE = 32768.0  # 16-bit PCM full scale, as Tacotron 2 scales it
LOG_FLOOR = 1e-5  # Tacotron 2's clamp before the log: silence maps to log(1e-5), about -11.5
# libsndfile's names of the lossy containers: decoding depends on the decoder, and a read from a position
# (a training crop) need not give the samples a read of the whole file gives there.
LOSSY_FORMATS = {"MP3": "MP3", "OGG": "Ogg"}
RESAMPLE_QUALITY = "VHQ"  # soxr's very high quality: a linear-phase filter, about 175 dB of stopband attenuation


class DataError(ValueError):
    """A bad audio file, file list or mel file; the message is one line naming the file."""


def _read_error(path: str, error: Exception) -> DataError:
    # libsndfile's own reason, without soundfile's "Error opening '<path>': " prefix; it may span lines
    reason = " ".join(getattr(error, "error_string", str(error)).split()) or type(error).__name__
    return DataError(f"{path}: cannot read audio ({reason})")


MAX_FLOAT_PEAK = 4.0  # a float file's samples beyond this are not audio in [-1, 1] (a little over is kept)
UNKNOWN_LENGTH = 2**63 - 1  # libsndfile's frame count (SF_COUNT_MAX) for a stream that did not record its length
# A WAV data or AIFF SSND chunk at least this long (in bytes) is a placeholder that a writer to a pipe
# leaves (ffmpeg writes 0xFFFFFFFF, sox 0x7FFFF000), not a length: such a file is read to its end.
STREAMED_CHUNK_SIZE = 0x7FFF0000
TRUNCATION_SLACK_BYTES = 8  # a data chunk this much past the end of the file (a missing pad byte) is not truncation
# libsndfile's header log, e.g. "data : 44100 (should be 22029)": the audio chunk's size as written and as the
# file holds it (WAV, AIFF); a Sony Wave64 file says it of its whole "riff" chunk only.
_CHUNK_SIZE_LOG = re.compile(r"^\s*(data|SSND|riff)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# An RF64 file (a WAV past 4 GiB, its sizes in a "ds64" chunk): "Calculated frame count 3579 does not match
# value from 'ds64' chunk of 6000"
_DS64_FRAMES_LOG = re.compile(r"Calculated frame count (\d+) does not match value from 'ds64' chunk of (\d+)")
# "data : 0" followed by bytes that are no chunk (audio): a writer that left the size for later and stopped
# before writing it
_EMPTY_DATA_LOG = re.compile(r"^\s*data\s*:\s*0\s*$[\s\S]*(?:Unknown chunk marker|Have 0 marker)", re.MULTILINE)


def _truncation(sound: soundfile.SoundFile) -> str | None:
    """What is missing from a WAV, RF64, Wave64 or AIFF file whose header claims more audio than the file
    holds (a copy or download cut short), e.g. "its header claims 12000 bytes of audio and the file holds
    7182 (60%)", else None. libsndfile reads such a file silently as the shorter clip it finds, and reports
    the difference only in its header log."""
    log = sound.extra_info
    for chunk, claimed_text, present_text in _CHUNK_SIZE_LOG.findall(log):
        claimed, present = int(claimed_text), int(present_text)
        if chunk == "riff" and sound.format != "W64":  # a WAV's RIFF size: its data chunk's line tells
            continue
        if claimed < STREAMED_CHUNK_SIZE and claimed - present > TRUNCATION_SLACK_BYTES:
            what = "bytes of audio" if chunk != "riff" else "bytes"
            return f"its header claims {claimed} {what} and the file holds {present} ({100 * present / claimed:.0f}%)"
    match = _DS64_FRAMES_LOG.search(log)
    if match is not None and int(match.group(1)) < int(match.group(2)):
        present, claimed = int(match.group(1)), int(match.group(2))
        return f"its header claims {claimed} samples and the file holds {present} ({100 * present / claimed:.0f}%)"
    return None


def _unreadable_end(sound: soundfile.SoundFile) -> str | None:
    """libsndfile's error on reading a file's last sample, or None when it reads (or the file cannot seek):
    a FLAC cut short keeps its header's sample count and fails only where its audio stops."""
    if not sound.seekable():
        return None
    try:
        sound.seek(sound.frames - 1)
        sound.read(1)
        sound.seek(0)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        return " ".join(getattr(error, "error_string", str(error)).split()) or "a read error"
    return None


def _open_checked(path: str, sampling_rate: int, resample: bool = False, downmix: bool = False) -> soundfile.SoundFile:
    """Open an audio file and check that it is a non-empty lossless file, mono (or `downmix`), at
    `sampling_rate` (or any rate with `resample`)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: audio file not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: audio file is empty (0 bytes)")
    try:
        sound = soundfile.SoundFile(path)
    except (soundfile.LibsndfileError, RuntimeError, UnicodeEncodeError) as error:  # the last: a name not in UTF-8
        raise _read_error(path, error) from None
    problem = None
    if sound.format in LOSSY_FORMATS:
        problem = (
            f"{LOSSY_FORMATS[sound.format]} audio is lossy and cannot be read sample-exactly; "
            f"convert the corpus to wav or flac"
        )
    elif (sound.samplerate != sampling_rate and not resample) or (sound.channels != 1 and not downmix):
        # both named at once where both apply: a stereo 44.1 kHz file needs two settings, not two tries
        problems = []
        if sound.samplerate != sampling_rate and not resample:
            problems.append(
                f"sampling rate is {sound.samplerate} Hz, expected {sampling_rate} Hz "
                f"(set data_config.resample to true, or resample the corpus first, e.g. with sox)"
            )
        if sound.channels != 1 and not downmix:
            problems.append(f"has {sound.channels} channels, expected mono (data_config.downmix: true averages them)")
        problem = "; and it ".join(problems)
    elif sound.frames == 0 and _EMPTY_DATA_LOG.search(sound.extra_info):
        problem = (
            f"its header says it holds no audio (a data chunk of 0 bytes), yet the file is "
            f"{os.path.getsize(path)} bytes long: its writer stopped before it wrote the size? Write it again"
        )
    elif sound.frames == 0:
        problem = "contains no audio samples"
    elif (missing := _truncation(sound)) is not None:
        problem = f"is truncated: {missing}; copy or convert it again"
    elif sound.frames >= UNKNOWN_LENGTH:
        problem = (
            "its header does not say how many samples it holds (a FLAC written to a pipe?), and it cannot be "
            "read in parts; write it again with its length, e.g. `sox in.flac out.flac`"
        )
    elif (failure := _unreadable_end(sound)) is not None:
        problem = (
            f"is truncated or damaged: its header says it holds {sound.frames} samples, and the last cannot be "
            f"read ({failure}); copy or convert it again"
        )
    if problem is not None:
        sound.close()
        raise DataError(f"{path}: {problem}")
    return sound


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """Samples of `frames` samples at `source_rate` resampled to `target_rate`, rounded half up."""
    return (2 * frames * target_rate + source_rate) // (2 * source_rate)


def resample_audio(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """audio [T] float32 at `source_rate` -> [resampled_length(T)] float32 at `target_rate`, with soxr.

    soxr's own length can differ from the rounding by one sample in floating point: the result is cut
    or zero-padded to `resampled_length`, so that a clip's length is known from its header alone."""
    length = resampled_length(audio.shape[0], source_rate, target_rate)
    resampled = soxr.resample(audio, source_rate, target_rate, quality=RESAMPLE_QUALITY)[:length]
    return np.pad(resampled, (0, length - resampled.shape[0])).astype(np.float32, copy=False)


def audio_length(path: str, sampling_rate: int, *, resample: bool = False, downmix: bool = False) -> int:
    """Number of samples in an audio file at `sampling_rate`, after checking its header as `load_audio` does."""
    with _open_checked(path, sampling_rate, resample, downmix) as sound:
        return resampled_length(sound.frames, sound.samplerate, sampling_rate)


def load_audio(
    path: str,
    sampling_rate: int,
    start: int = 0,
    length: int = -1,
    *,
    resample: bool = False,
    downmix: bool = False,
) -> torch.Tensor:
    """Read `length` samples (all when -1) from sample `start` of a mono file: audio [T] float32.

    16-bit PCM is scaled by 1/32768 as Tacotron 2 does; other integer formats are
    scaled to [-1, 1) by libsndfile; float files are taken as they are. With
    `downmix`, the channels of a multi-channel file are averaged; with `resample`,
    a file at another rate is read whole and resampled (`resample_audio`) before the
    samples `start ..` are cut from it, so that a crop is exactly that part of the
    resampled clip. A file libsndfile cannot seek in (GSM 6.10 or G.721 in a WAV) is
    read from its start.
    """
    with _open_checked(path, sampling_rate, resample, downmix) as sound:
        dtype = "int16" if sound.subtype == "PCM_16" else "float32"
        source_rate = sound.samplerate
        try:
            if source_rate == sampling_rate:
                if sound.seekable():
                    sound.seek(start)
                    samples = sound.read(length, dtype=dtype)
                else:  # only reading moves through such a file, and it must be told how far
                    sound.read(start, dtype=dtype)
                    samples = sound.read(length if length >= 0 else max(sound.frames - start, 0), dtype=dtype)
            else:
                samples = sound.read(dtype=dtype)
        except (soundfile.LibsndfileError, RuntimeError) as error:
            raise _read_error(path, error) from None
    samples = samples.astype(np.float32)  # [T] or [T, channels]
    if dtype == "int16":
        samples = samples / np.float32(MAX_WAV_VALUE)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)  # [T]
    if source_rate != sampling_rate:
        samples = resample_audio(samples, source_rate, sampling_rate)[start : start + length if length >= 0 else None]
    audio = torch.from_numpy(np.ascontiguousarray(samples))
    if audio.numel() == 0:
        raise DataError(f"{path}: no audio samples could be read from sample {start}")
    if not torch.isfinite(audio).all():
        raise DataError(f"{path}: contains NaN or infinite samples")
    peak = float(audio.abs().max())
    if peak > MAX_FLOAT_PEAK:  # integer formats are in [-1, 1) here: only float files get this far
        raise DataError(
            f"{path}: float samples reach {peak:.4g}, far outside [-1, 1] (written at 16-bit scale? "
            f"divide them by 32768)"
        )
    return audio


def refuse_shared_names(paths: list[str], name_of: Callable[[str], str], what: str, source: str = "") -> None:
    """A DataError naming two of `paths` (different files) that `name_of` gives one name, e.g. two clips
    `a/x.wav` and `b/x.wav` whose outputs would overwrite each other; `what` says where, as in
    "would both be written to NAME", after `source` (the list they come from) when given; a path listed
    twice is the same file, not a clash."""
    seen: dict[str, str] = {}
    for path in paths:
        name = name_of(path)
        first = seen.setdefault(name, path)
        if os.path.abspath(first) != os.path.abspath(path):
            raise DataError(
                f"{source + ': ' if source else ''}'{first}' and '{path}' {what} {name}; "
                "rename one, or give them in separate runs"
            )


SPEAKER_COLUMN = "speaker"  # the column name, in a file list's header, of the speaker field


def _clip_id_hint(path: str, list_folder: str) -> str:
    """What to do with a clip named by its id alone (``LJ001-0001``), as LJSpeech's metadata.csv and HiFi-GAN's
    lists name clips (HiFi-GAN adds its --input_wavs_dir and ``.wav``), where such a file is found; else ""."""
    if os.path.splitext(path)[1]:
        return ""
    for folder in ("", "wavs"):
        for extension in (".wav", ".flac"):
            candidate = os.path.join(folder, path + extension)
            if os.path.isfile(os.path.join(list_folder, candidate)):
                return (
                    f"; {candidate} is there: this list names clips by id, as LJSpeech's metadata.csv and HiFi-GAN's "
                    f"lists do, and a file list names the audio files (scripts/prepare_ljspeech.py --corpus FOLDER "
                    f"writes such lists for LJSpeech)"
                )
    return ""


def _where_to_look(path: str, list_folder: str) -> list[str]:
    """Where a file list's `path` may be, in order: as written, then beside the list (an absolute path stays as
    it is); then the same for the path with `~` expanded, and with Windows' backslashes as slashes (a list
    written on Windows), where these differ from it."""
    spellings = dict.fromkeys([path, os.path.expanduser(path), path.replace("\\", "/")])
    return [place for spelling in spellings for place in (spelling, os.path.join(list_folder, spelling))]


def read_file_list_entries(list_path: str) -> list[tuple[str, str | None]]:
    """The `(audio path, speaker)` of every line of a file list, in order; speaker None where the list
    names none.

    One entry per line: a path, or a Tacotron 2 / LJSpeech style line
    ``path|text...`` whose first field is the path. Blank lines and lines
    starting with ``#`` (after spaces) are ignored, except a first line ``# path|speaker|text``
    (the fields' names, in their order, as scripts/prepare_corpus.py writes it),
    which says which field holds the speaker. A relative path is taken as
    written (relative to the working directory, as the original code did);
    when no file exists there, relative to the list's own folder, so that a
    list works from any directory; a leading `~` is the home folder and a
    list written on Windows (`wavs\\LJ001-0001.wav`) is read too. A path found in neither place, or a line
    without the speaker field the header names, is an error naming the list
    and the line.
    """
    if os.path.isdir(list_path):
        raise DataError(f"{list_path}: is a folder, not a file list")
    if not os.path.isfile(list_path):
        # A config's lists are read from the working directory (the shipped configs': the repository root).
        where = "" if os.path.isabs(list_path) else f" (relative to the working directory, {os.getcwd()})"
        raise DataError(f"{list_path}: file list not found{where}")
    try:
        lines = read_text(list_path).splitlines()
    except ValueError as error:  # not UTF-8
        raise DataError(f"{list_path}: {error}") from None
    list_folder = os.path.dirname(os.path.abspath(list_path))
    speaker_field = None
    first = next((line for line in lines if line.strip()), "")  # the header may follow blank lines
    if first.startswith("#"):
        names = [name.strip() for name in first[1:].split("|")]
        speaker_field = names.index(SPEAKER_COLUMN) if SPEAKER_COLUMN in names else None
    entries = []
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("#"):  # an indented comment too: no path starts with spaces and a '#'
            continue
        fields = line.split("|")
        path = fields[0].strip()
        if not path:
            continue
        speaker = None
        if speaker_field is not None:
            if len(fields) <= speaker_field or not fields[speaker_field].strip():
                raise DataError(f"{list_path}:{number}: no speaker in field {speaker_field + 1}, as the header says")
            speaker = fields[speaker_field].strip()
        found = next((candidate for candidate in _where_to_look(path, list_folder) if os.path.exists(candidate)), None)
        if found is None:
            raise DataError(
                f"{list_path}:{number}: audio file '{path}' not found "
                f"(looked in the working directory and in {list_folder}){_clip_id_hint(path, list_folder)}"
            )
        entries.append((found, speaker))
    if not entries:
        raise DataError(f"{list_path}: file list is empty")
    return entries


def read_file_list(list_path: str) -> list[str]:
    """The audio paths of a file list, in order (see `read_file_list_entries`)."""
    return [path for path, _ in read_file_list_entries(list_path)]


def file_list_text(list_path: str, rows: list[list[str]], header: str | None = None) -> bytes:
    """A file list that `read_file_list_entries` reads, to be written at `list_path`: one row per line, its
    fields joined by ``|``, the first an audio path written relative to the list's folder (so that the list
    works from any directory); `header` (e.g. ``path|speaker|text``) as a first line ``# header``."""
    folder = os.path.dirname(os.path.abspath(list_path))
    lines = [f"# {header}\n"] if header else []
    lines += ["|".join([os.path.relpath(os.path.abspath(row[0]), folder), *row[1:]]) + "\n" for row in rows]
    return "".join(lines).encode()


def write_file_list(list_path: str, rows: list[list[str]], header: str | None = None) -> None:
    """Write `file_list_text(list_path, rows, header)` at `list_path`, atomically."""
    write_atomically(list_path, file_list_text(list_path, rows, header), durable=False)


def _starts_with(path: str, prefix: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(prefix)) == prefix
    except OSError:
        return False


def holds_pickled_objects(path: str) -> bool:
    """Whether a .npy file's header says it holds pickled Python objects; False for a damaged header, which
    np.load then reports."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return header(f)[2].hasobject
    except (ValueError, OSError):
        return False


def _numpy_arrays_allowed() -> contextlib.AbstractContextManager:
    """Where `torch.load(weights_only=True)` may build a numpy array of floats, as `torch.save(mel.numpy(),
    path)` writes it: numpy's array constructor (under its numpy 1 and 2 names from torch 2.6, which takes a
    name with it), the array and dtype classes. Nothing else: an array of objects still needs globals it is
    refused. Before torch 2.5 (no `safe_globals`) such a file is refused, naming what it holds."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        return contextlib.nullcontext()
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it
    if tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6):
        names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
        constructors = [(reconstruct, name) for name in names]
    else:
        constructors = [reconstruct]
    dtypes = {type(np.dtype(kind)) for kind in (np.float16, np.float32, np.float64)} - {np.dtype}
    return safe_globals([*constructors, np.ndarray, np.dtype, *dtypes])


def _torch_load_mel(path: str, mmap: bool):
    """`torch.load` of a mel file, tensors and numpy arrays of floats only; a file that is not torch.save's
    gets a DataError saying what it is."""
    try:
        with warnings.catch_warnings(), _numpy_arrays_allowed():
            warnings.simplefilter("ignore")  # torch's warnings about a plain pickle's protocol: the error says it
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # a file in torch's legacy format
    except Exception as error:  # torch.load raises many types for a damaged file
        with open(path, "rb") as file:
            head = file.read(16)
        refused = _REFUSED_GLOBAL.search(str(error))
        if not head:
            what = "an empty file"
        elif refused is not None:
            what = f"it holds a {refused.group(1) or refused.group(2)}; a mel file holds a tensor or an array of floats"
        elif head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
            what = "torch.save's zip file, cut short or damaged"
        elif head.startswith((b"PK\x03\x04", TORCH_LEGACY_MAGIC)):
            what = f"a torch.save file torch.load cannot read ({first_sentence(error)})"
        elif head.startswith(b"\x80"):
            what = "a Python pickle, not a file torch.save wrote; save the mel with torch.save or np.save"
        else:
            what = "not a file torch.save wrote"
        raise DataError(f"{path}: cannot read mel: {what}") from None


def _read_mel(path: str, n_mel_channels: int, mmap: bool):
    """A mel file's array [n_mels, F], its shape checked; with `mmap` only what the header says is read."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: mel file not found")
    extension = os.path.splitext(path)[1].lower()
    if extension not in MEL_FILE_EXTENSIONS:
        archive = " (an archive of arrays, np.savez's: save the mel alone with np.save)" if extension == ".npz" else ""
        raise DataError(
            f"{path}: unknown mel file type '{extension}', expected one of {', '.join(MEL_FILE_EXTENSIONS)}{archive}"
        )
    if extension == ".npy" and not _starts_with(path, NPY_MAGIC):  # numpy would call it "pickled (object) data"
        raise DataError(f"{path}: not a .npy file (it does not start with numpy's header)")
    if extension == ".npy" and holds_pickled_objects(path):
        raise DataError(
            f"{path}: holds pickled Python objects (np.save of a dict, a list or an object array), not an array "
            f"of numbers; save the mel array itself"
        )
    if extension == ".npy":
        try:
            mel = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except Exception as error:  # np.load raises many types for a damaged file
            raise DataError(f"{path}: cannot read mel ({first_sentence(error)})") from None
    else:
        mel = _torch_load_mel(path, mmap)
    if not isinstance(mel, (np.ndarray, torch.Tensor)):
        found = type(mel).__name__
        if isinstance(mel, dict):
            found += f" with keys {', '.join(repr(key) for key in list(mel)[:4])}{', ...' if len(mel) > 4 else ''}"
        elif isinstance(mel, (list, tuple)):
            found += f" of {len(mel)} item{'s' if len(mel) != 1 else ''}"
        raise DataError(f"{path}: expected a tensor, found a {found}; save the mel tensor itself")
    batched = mel.ndim == 3 and mel.shape[0] == 1
    if batched:
        mel = mel[0]
    if mel.ndim != 2 or mel.shape[0] != n_mel_channels:
        hint = ""
        if mel.ndim == 2 and mel.shape[1] == n_mel_channels:  # a square mel could be either way: taken as it is
            first = "[0]" if batched else ""
            transpose = (
                f"np.save({path!r}, np.load({path!r}){first}.T)"
                if extension == ".npy"
                else f"torch.save(torch.load({path!r}){first}.T, {path!r})"
            )
            # [F, n] with F frames, as ESPnet, ParallelWaveGAN and Coqui save mels; or F bands, another model's
            hint = (
                f"; if it is {mel.shape[0]} frames of {n_mel_channels} bands (frames first, as ESPnet, "
                f"ParallelWaveGAN and Coqui save mels), transpose it: {transpose}; {mel.shape[0]} bands are "
                f"another model's mel"
            )
        raise DataError(f"{path}: mel has shape {list(mel.shape)}, expected [{n_mel_channels}, frames]{hint}")
    floating = mel.is_floating_point() if isinstance(mel, torch.Tensor) else np.issubdtype(mel.dtype, np.floating)
    if not floating:  # known from the header: -s and -v refuse such a mel before any work
        raise DataError(f"{path}: mel has dtype {mel.dtype}, expected a floating point log-mel")
    return mel


def mel_frame_count(path: str, n_mel_channels: int = 80) -> int:
    """The number of frames of a saved mel [n_mels, F], read without loading the values."""
    return int(_read_mel(path, n_mel_channels, mmap=True).shape[1])


def load_mel(path: str, n_mel_channels: int = 80) -> torch.Tensor:
    """A saved mel spectrogram as mel [n_mels, F] float32.

    Reads ``.pt`` files written by ``mel2samp.py`` (or any ``torch.save`` of a
    tensor) and ``.npy`` files. A leading batch dimension of 1, as a Tacotron 2
    model's output has, is dropped.
    """
    read = _read_mel(path, n_mel_channels, mmap=False)
    if isinstance(read, np.ndarray):
        read = torch.from_numpy(read.astype(read.dtype.newbyteorder("="), copy=False))  # torch reads native order
    # a tensor saved from a TTS model's output may require grad: a DataLoader worker cannot send such a tensor
    # (and the training loop would wait for it forever), and backward would reach into it
    read = read.detach()
    if not torch.isfinite(read).all():
        raise DataError(f"{path}: mel contains NaN or infinite values")
    mel = read.float().contiguous()
    if not torch.isfinite(mel).all():  # a float64 mel beyond float32's range
        raise DataError(f"{path}: mel holds values up to {read.abs().max().item():.3g}, beyond float32; not a log-mel")
    return mel


def mel_filterbank(
    sampling_rate: int, filter_length: int, n_mel_channels: int, mel_fmin: float, mel_fmax: float
) -> np.ndarray:
    """librosa's Slaney mel filterbank [n_mels, filter_length // 2 + 1], without librosa's multi-line warning
    for channels that cover no STFT bin (`empty_mel_channels` says which, `mel_filter_warning` says it once)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Empty filters detected", category=UserWarning)
        return librosa.filters.mel(
            sr=sampling_rate, n_fft=filter_length, n_mels=n_mel_channels, fmin=mel_fmin, fmax=mel_fmax
        )


def empty_mel_channels(data: DataConfig) -> list[int]:
    """The mel channels of `data`'s filterbank that no STFT bin falls in (too many mel channels for
    the FFT's resolution at low frequencies): they hold the log floor whatever the audio."""
    filterbank = mel_filterbank(
        data.sampling_rate, data.filter_length, data.n_mel_channels, data.mel_fmin, data.mel_fmax
    )  # [n_mels, filter_length // 2 + 1]
    return [int(channel) for channel in np.flatnonzero(filterbank.max(axis=1) <= 0)]


def mel_filter_warning(data: DataConfig) -> str | None:
    """One line saying which of `data`'s mel channels are empty and how to avoid it, or None when none is."""
    empty = empty_mel_channels(data)
    if not empty:
        return None
    shown = ", ".join(str(channel) for channel in empty[:8]) + (", ..." if len(empty) > 8 else "")
    return (
        f"data_config: {len(empty)} of {data.n_mel_channels} mel channels ({shown}) cover no STFT bin at "
        f"filter_length {data.filter_length} and sampling_rate {data.sampling_rate}, and hold the log floor "
        f"whatever the audio; fewer n_mel_channels, a larger filter_length or a higher mel_fmin avoids it"
    )


class MelSpectrogram(nn.Module):
    """Tacotron 2's log-mel spectrogram: audio [B, T] -> mel [B, n_mels, 1 + T // hop_length].

    STFT with a periodic Hann window centred with reflect padding, magnitude,
    librosa's Slaney-normalised mel filterbank, then ``log(clamp(x, min=log_floor))``
    (Tacotron 2's 1e-5 by default; the log-mel distance of metrics.py floors at 1e-2).
    The window and filterbank are non-persistent buffers, so ``.to(device)``
    moves them and they never enter a checkpoint. Always computes in float32:
    half precision loses the quiet bands that the log floor is about.
    """

    mel_basis: torch.Tensor  # [n_mels, filter_length // 2 + 1]
    window: torch.Tensor  # [win_length]

    def __init__(
        self,
        *,
        sampling_rate: int = 22050,
        filter_length: int = 1024,
        hop_length: int = HOP_LENGTH,
        win_length: int = 1024,
        n_mel_channels: int = 80,
        mel_fmin: float = 0.0,
        mel_fmax: float = 8000.0,
        log_floor: float = LOG_FLOOR,
    ):
        super().__init__()
        self.filter_length = filter_length
        self.hop_length = hop_length
        self.win_length = win_length
        self.log_floor = log_floor
        filterbank = mel_filterbank(sampling_rate, filter_length, n_mel_channels, mel_fmin, mel_fmax)
        self.register_buffer("mel_basis", torch.from_numpy(filterbank).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)

    @classmethod
    def from_config(cls, data: DataConfig) -> MelSpectrogram:
        return cls(
            sampling_rate=data.sampling_rate,
            filter_length=data.filter_length,
            hop_length=data.hop_length,
            win_length=data.win_length,
            n_mel_channels=data.n_mel_channels,
            mel_fmin=data.mel_fmin,
            mel_fmax=data.mel_fmax,
        )

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop_length

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, T] (or [T]) in [-1, 1] -> mel [B, n_mels, F] (or [n_mels, F]), F = 1 + T // hop."""
        if audio.shape[-1] <= self.filter_length // 2:
            raise ValueError(
                f"audio of {audio.shape[-1]} samples is too short for the mel spectrogram's "
                f"reflect padding: need more than {self.filter_length // 2}"
            )
        # float32 even after .half() or .double() on an enclosing model: the features must not depend on it
        spectrum = torch.stft(
            audio.float(),
            n_fft=self.filter_length,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.float(),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # [B, n_fft // 2 + 1, F]
        mel = torch.matmul(self.mel_basis.float(), spectrum.abs())  # [B, n_mels, F]
        return torch.log(torch.clamp(mel, min=self.log_floor))
