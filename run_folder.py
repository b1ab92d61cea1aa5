"""The run folder `<output_directory>/<model_name>/`, where a training run writes its checkpoints.

One process at a time trains into it (`claim_run_folder`, with storage.RunLock); the same command
again resumes from its newest checkpoint (checkpoint.rerun_checkpoint); a run never overwrites
checkpoints newer than its starting point (`refuse_overwriting`); and a write that fails there (a
full disk, an unwritable folder) stops every rank in one line naming the newest intact checkpoint
(`write_on_main`).
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from checkpoint import CheckpointError, list_checkpoints, rerun_checkpoint
from config import Config
from runtime import Runtime, global_any
from storage import RunLock, StorageError, describe, remove_partial_files
from synthesis import samples_dir


def run_dir(config: Config) -> str:
    return os.path.join(config.train.output_directory, config.waveflow.model_name)


def write_failure(folder: str, what: str, error: OSError) -> StorageError:
    """A failed write in the run folder, as one line naming the folder and the newest intact checkpoint."""
    available = list_checkpoints(folder)
    return StorageError(
        f"{folder}: cannot write {what} ({describe(error)}); the newest intact checkpoint is "
        f"{available[-1][1] if available else 'none'}"
    )


def write_on_main(write, what: str, folder: str, runtime: Runtime) -> None:
    """Rank 0 calls `write()`; a failed write (full disk, unwritable folder) stops every rank."""
    failure = None
    if runtime.is_main:
        try:
            write()
        except OSError as error:
            failure = write_failure(folder, what, error)
    if global_any(failure is not None, runtime):
        raise failure or StorageError(f"{folder}: rank 0 could not write {what}; training stopped")


def claim_run_folder(config: Config, args: argparse.Namespace, runtime: Runtime) -> tuple[RunLock | None, str]:
    """Rank 0 locks the run folder and removes the partial files a killed run left. Returns the lock
    and the checkpoint that every rank starts from: checkpoint_path or, when the same command runs
    again after an interruption, the newest checkpoint of the run folder."""
    folder, start = run_dir(config), config.train.checkpoint_path
    lock, failure = None, None
    if runtime.is_main:
        try:
            lock = RunLock(folder)
            remove_partial_files(folder)
            remove_partial_files(samples_dir(config), contains="_iter")
            newest = None if args.warm_start or args.average_checkpoint else rerun_checkpoint(folder, start)
            if newest is not None:
                older = f" (not {start}: to go back to it, remove the newer ones)" if start else ""
                print(
                    f"{folder} holds this run's checkpoints: resuming from the newest, "
                    f"{os.path.basename(newest)}{older}"
                )
                start = newest
        except OSError as error:
            failure = write_failure(folder, "the run folder", error)
        except StorageError as error:
            failure = error
    if runtime.distributed:  # every rank starts from rank 0's choice, or stops with it
        shared = [start, None if failure is None else str(failure)]
        dist.broadcast_object_list(shared, src=0)
        start, message = shared
        if message is not None and failure is None:
            failure = StorageError(f"rank 0 cannot train: {message}")
    if failure is not None:
        if lock is not None:
            lock.release()
        raise failure
    return lock, start


def refuse_overwriting(folder: str, iteration: int, new_run_from: str | None = None) -> None:
    """Stop before a run from `iteration` overwrites newer checkpoints of its run folder; and before a new
    run from a source outside it (`new_run_from`: -w's checkpoint or -a's folder) puts its checkpoints beside
    another run's, where a resume would take the newest of either and -a would average across the two."""
    checkpoints = list_checkpoints(folder)
    newer = [path for it, path in checkpoints if it > iteration]
    if newer:
        raise CheckpointError(
            f"{folder} already holds checkpoints after iteration {iteration} "
            f"({os.path.basename(newer[-1])}); training would overwrite them. To go on with that "
            f"run, resume from {newer[-1]} (--checkpoint_path, without -w or -a); or choose "
            f"another output_directory or model_name"
        )
    if new_run_from is None or not checkpoints:
        return
    source = os.path.realpath(new_run_from)
    if (source if os.path.isdir(source) else os.path.dirname(source)) == os.path.realpath(folder):
        return  # from this folder's own checkpoints (or their average): the run goes on in it, as documented
    raise CheckpointError(
        f"{folder} already holds another run's checkpoints ({os.path.basename(checkpoints[-1][1])}"
        f"{f' and {len(checkpoints) - 1} more' if len(checkpoints) > 1 else ''}); a run started with -w or -a "
        f"from {new_run_from} would write its own beside them, and a later resume or -a would mix the two. "
        f"Choose another output_directory or model_name, or go on with that run (without -w or -a)"
    )
