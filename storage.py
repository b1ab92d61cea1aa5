"""What training writes to disk, made to survive the faults of long runs.

- `write_atomically`: every file (checkpoint, sample, mel, config copy) is written
  to `<name>.partial` and renamed, so a crash, a SIGKILL or a full disk leaves
  the previous file or the new one, never half of one; a failed write removes
  its partial file, and a run started again removes those a killed run left
  (`remove_partial_files`).
- `RunLock`: one training process per run folder. A POSIX lock, which the
  operating system releases when its process ends however it ends, so a killed
  run never leaves it stuck.
- `TrainingLogs`: TensorBoard logs whose failure (a full disk kills the
  writer's thread) becomes one warning while training goes on without logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading

PARTIAL_SUFFIX = ".partial"
LOCK_FILE = "train.lock"


class StorageError(RuntimeError):
    """A run folder or an output file that cannot be used (locked by another process, unwritable, a folder
    where a file goes); the message is one line."""


def check_output_file(path: str, what: str) -> None:
    """Refuse, before the work that fills it, an output file (`what`: "PNG file") that cannot be
    written: one in a folder that does not exist, or a name that is a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StorageError(f"{path}: folder {os.path.dirname(path) or folder} does not exist")
    if os.path.isdir(path):
        raise StorageError(f"{path}: is a folder; name the {what} to write")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def describe(error: OSError) -> str:
    """`[Errno 28] No space left on device` without the file name, which messages give themselves."""
    return f"[Errno {error.errno}] {error.strerror}" if error.strerror else str(error)


def first_sentence(error: Exception) -> str:
    """The first sentence of `error`'s message on one line (at most 160 characters), or its type's name."""
    text = " ".join(str(error).split())
    return (text.split(". ")[0][:160] or type(error).__name__).rstrip(".")


def first_line(error: Exception) -> str:
    """`error` in one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def read_text(path: str) -> str:
    """The text of a UTF-8 file, as other tools write it: a byte-order mark (Windows editors) is dropped,
    and UTF-16 with its mark (Windows PowerShell's `>`) is read too. Text in another encoding is a
    ValueError whose one-line message says where (the caller names the file)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    if encoding != "utf-16" and b"\0" in data:  # no text holds NUL; UTF-16 puts one beside each ASCII letter
        raise ValueError("not UTF-8 text (it holds NUL bytes: UTF-16 without its byte-order mark?); save it as UTF-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"not UTF-8 text (line {line}: byte 0x{data[error.start]:02x}); save it as UTF-8") from None


def write_atomically(path: str, data: bytes | memoryview, durable: bool = True) -> None:
    """Write `data` to `path` through `path + '.partial'` and a rename. A failure (OSError: ENOSPC,
    EACCES, EROFS, ...) removes the partial file and leaves `path` as it was. `durable` syncs the
    data and the folder first, so that the renamed file is whole even after the machine itself stops."""
    write_all_atomically({path: data}, durable)


def write_all_atomically(contents: dict[str, bytes | memoryview], durable: bool = False) -> None:
    """Write each `path: data` of `contents` through `path + '.partial'`, all before any is renamed over its
    file: a failed write (a full disk, a folder in the way) removes the partial files and leaves every path
    as it was, so that files read together (a corpus's lists and configs) never mix two runs. `durable` as
    for `write_atomically`."""
    partials = []
    try:
        for path, data in contents.items():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            partials.append(path + PARTIAL_SUFFIX)
            with open(partials[-1], "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        for path in contents:
            os.replace(path + PARTIAL_SUFFIX, path)
    except BaseException:  # a second Ctrl-C included: no partial file is left behind
        for partial in partials:
            with contextlib.suppress(OSError):
                os.remove(partial)
        raise
    if durable:
        for folder in {os.path.dirname(os.path.abspath(path)) for path in contents}:
            _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems cannot sync a folder; the file itself is synced
        pass
    finally:
        os.close(descriptor)


def remove_partial_files(folder: str, contains: str = "") -> list[str]:
    """Remove the `*.partial` files (whose names hold `contains`) that a killed process left in `folder`."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(PARTIAL_SUFFIX) and contains in name:
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


class RunLock:
    """Held while one process trains into `folder`; a second process is refused with a one-line error.

    `fcntl.lockf` on `<folder>/train.lock`, which names the holder. A POSIX lock belongs to its
    process: DataLoader workers forked from it do not hold it, so it goes the moment the training
    process dies, even by SIGKILL, and a rerun never finds it stuck. The file stays in the folder.
    """

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, LOCK_FILE)
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise StorageError(
                f"{folder}: another training process ({holder}) is writing to this run folder; "
                f"wait for it to end, or choose another output_directory or model_name"
            ) from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            self.file.flush()
        except OSError:
            self.file.close()
            raise

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing the file releases the lock


class TrainingLogs:
    """TensorBoard's `SummaryWriter` in `folder`, or nothing when it fails.

    The writer writes from a thread; on a full disk that thread dies with an OSError, which the
    next call (or `close`) raises again. The first failure is one warning and ends the logs;
    training goes on. While the logs are open, the writer thread's own traceback is kept off
    the terminal (`threading.excepthook`), since the warning says it in one line.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.writer = None
        self._threads: set[threading.Thread] = set()
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_failed
        before = set(threading.enumerate())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(folder)
        except OSError as error:
            self._fail(error)
        self._threads = set(threading.enumerate()) - before

    def _thread_failed(self, failure) -> None:
        if failure.thread not in self._threads or not isinstance(failure.exc_value, OSError):
            self._previous_hook(failure)

    def _fail(self, error: OSError) -> None:
        warn(f"{self.folder}: TensorBoard logs stopped ({describe(error)}); training goes on without logs")
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()

    def add(self, kind: str, *args, **kwargs) -> None:
        """`writer.add_<kind>(*args, **kwargs)`, e.g. `add("scalar", "training/loss", 1.2, 100)`."""
        if self.writer is None:
            return
        try:
            getattr(self.writer, f"add_{kind}")(*args, **kwargs)
        except OSError as error:
            self._fail(error)

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError as error:
            self._fail(error)
        finally:
            self.writer = None
            threading.excepthook = self._previous_hook
