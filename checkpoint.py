"""Checkpoints: one writer, one reader, averaging and warm start.

The layout is the original code's, so checkpoints go both ways: a dict
`{model, iteration, optimizer, scheduler, learning_rate}` saved with
`torch.save` as `<output_directory>/<model_name>/waveflow_<iteration>`. Ours add
`config` (the JSON the run used), `epoch` and `batch_in_epoch` (where the data
order stands, for exact resumption), `world_size` (the processes that trained it,
each step taking `batch_size` clips per process) and `scaler` (mixed precision). Model
weights keep the original names, including the `weight_g`/`weight_v` of weight
norm; a `module.` prefix left by DataParallel and an `_orig_mod.` left by
torch.compile are removed on reading.

The original also leaves one entry in `model` that is no weight of the model:
its training loop synthesizes a test clip at every checkpoint after the first,
and for NanoFlow that synthesis stores the cached flow-embedding projections on
the model as a parameter `h_cache` (`[n_flow, n_layer, 2 * res_channels, 1, 1]`),
so every later checkpoint, the published ones included, holds it. Its own
loaders delete it; so does `read_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import zipfile

import torch

from config import ConfigError, WaveFlowConfig, parse_value
from storage import first_sentence, write_atomically

CHECKPOINT_PREFIX = "waveflow_"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
ORIGINAL_CACHE_ENTRIES = ("h_cache",)  # what the original leaves in `model` besides the weights
# What wrappers of the model put before its weights' names: DataParallel's and DDP's, torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another model; the message is one line."""


def checkpoint_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, f"{CHECKPOINT_PREFIX}{iteration}")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """`(iteration, path)` of every `waveflow_<iteration>` file in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isfile(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def checkpoint_iteration(path: str) -> int | None:
    """The iteration in a checkpoint's name (`waveflow_1200` -> 1200), None for another name."""
    match = _CHECKPOINT_NAME.match(os.path.basename(path))
    return int(match.group(1)) if match else None


def rerun_checkpoint(run_dir: str, requested: str) -> str | None:
    """The checkpoint that a rerun of an interrupted training command continues from: the newest
    of its run folder, when `requested` (train_config.checkpoint_path) is empty, names an older
    checkpoint of that folder, or names the checkpoint elsewhere that the newest one's run started
    from (the config stored in the newest names it: the same command again). None when the folder
    holds none, or `requested` is to be used as it is (another checkpoint from elsewhere, or the
    newest itself)."""
    available = list_checkpoints(run_dir)
    if not available:
        return None
    newest_iteration, newest = available[-1]
    if not requested:
        return newest
    requested_iteration = checkpoint_iteration(requested)
    same_folder = os.path.realpath(os.path.dirname(os.path.abspath(requested))) == os.path.realpath(run_dir)
    if same_folder and requested_iteration is not None and requested_iteration < newest_iteration:
        return newest
    if not same_folder and started_from(newest) == os.path.realpath(requested):
        return newest
    return None


def started_from(path: str) -> str | None:
    """The real path of the `train_config.checkpoint_path` in the config that checkpoint `path` stores: where
    the run that wrote it started. None when it names none or the checkpoint cannot be read."""
    try:
        config = read_checkpoint(path).get("config")
    except CheckpointError:
        return None
    section = config.get("train_config") if isinstance(config, dict) else None
    start = section.get("checkpoint_path") if isinstance(section, dict) else None
    return os.path.realpath(start) if isinstance(start, str) and start else None


def save_checkpoint(
    path: str,
    *,
    model_state: dict,
    iteration: int,
    optimizer: torch.optim.Optimizer,
    scheduler,
    learning_rate: float,
    config: dict,
    epoch: int,
    batch_in_epoch: int,
    world_size: int = 1,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write a checkpoint atomically and durably: a crash, a kill or a full disk leaves the previous file
    or the new one, never half of one. A failed write raises the OSError (ENOSPC, EACCES, EROFS, ...)."""
    checkpoint = {
        "model": model_state,
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "learning_rate": learning_rate,
        "config": config,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "world_size": world_size,
    }
    if scaler is not None and scaler.is_enabled():
        checkpoint["scaler"] = scaler.state_dict()
    # torch.save reports a failed file write as an opaque RuntimeError; serialized in memory and
    # written here, a full disk is the OSError it is.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomically(path, buffer.getbuffer())


def check_zip_checksums(path: str) -> None:
    """Refuse a torch.save zip file whose members fail their CRC-32 (a file of the older format passes)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        damaged = first_sentence(error)
    if damaged is not None:
        raise CheckpointError(
            f"{path}: a damaged checkpoint ({damaged} fails its checksum); copy or download it again"
        ) from None


def read_checkpoint(path: str) -> dict:
    """Read a checkpoint (ours or the original's) with the model weights' wrapper prefixes (`module.`,
    `_orig_mod.`) and the original's `h_cache` removed."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        raise CheckpointError(
            f"{path}: is a folder; name a checkpoint file, or average the folder's newest checkpoints with -a N"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        check_zip_checksums(path)  # torch.load reads tensors without their CRC: a flipped byte loads silently
    except CheckpointError:
        raise
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        check_zip_checksums(path)
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as file:
                head = file.read(4)
            if not head:
                raise CheckpointError(f"{path}: not a checkpoint (an empty file)") from None
            if head == b"PK\x03\x04":  # torch.save's zip, without its end: the central directory comes last
                raise CheckpointError(
                    f"{path}: a damaged or incomplete checkpoint (torch.save's zip file, cut short or corrupted); "
                    f"copy or download it again"
                ) from None
            raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save)") from None
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({first_sentence(error)}); only files "
            f"of tensors, numbers and strings are read, never pickled code"
        ) from None
    if isinstance(checkpoint, dict) and "model" not in checkpoint:
        # weights saved by hand: torch.save(model.state_dict(), path), or under "state_dict"
        weights = checkpoint.get("state_dict", checkpoint)
        if isinstance(weights, dict) and weights and all(isinstance(value, torch.Tensor) for value in weights.values()):
            checkpoint = {"model": weights}
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path}: not a NanoFlow checkpoint (no 'model' weights)")
    state = {
        name: value for name, value in checkpoint["model"].items() if _unwrapped(name) not in ORIGINAL_CACHE_ENTRIES
    }
    while state and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {key[len(prefix) :]: value for key, value in state.items()}
    checkpoint["model"] = state
    return checkpoint


def _unwrapped(name: str) -> str:
    """A weight's name without the prefixes of the wrappers around the model (`WRAPPER_PREFIXES`)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _describe(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def architecture(state: dict) -> str:
    """What model a state dict holds, read from its tensor names and shapes, as a phrase for error messages:
    "a nanoflow (res_channels 64, ...) model", or "no WaveFlow/NanoFlow model"."""
    names = list(state)
    if any(name.startswith("flow_embedding.") for name in names):
        kind = "nanoflow"
    elif any(name.startswith("flow.coupling.") for name in names):
        kind = "nanoflow_naive"
    elif any(name.startswith("estimator.") for name in names):
        kind = "nanoflow_decomp"
    elif any(name.startswith("flows.") for name in names):
        kind = "waveflow"
    else:
        return "no WaveFlow/NanoFlow model"
    flows = {name.split(".")[1] for name in names if name.startswith("flows.")}
    fronts = [value for name, value in state.items() if name.endswith("front_conv.0.conv.bias")]
    layers = {name.split("res_blocks.")[1].split(".")[0] for name in names if "res_blocks." in name}
    # Each upsampling conv's kernel is twice its factor along time: their product is the hop.
    factors = [
        value.shape[-1] // 2
        for name, value in state.items()
        if name.startswith("upsample_conv.") and name.endswith(("weight_v", "weight"))
    ]
    details = [
        f"res_channels {fronts[0].shape[0]}" if fronts else None,
        f"n_layer {len(layers)}" if layers else None,
        f"n_flow {len(flows)}" if flows else None,
        f"hop {math.prod(factors)}" if factors else None,
    ]
    return f"a {kind} ({', '.join(detail for detail in details if detail)}) model"


WEIGHT_NORM_NAMES = ("weight_g", "weight_v")  # weight norm's pair, folded into `weight` by remove_weight_norm()


def _folded_name(name: str) -> str:
    """`conv.weight_g` and `conv.weight_v` -> `conv.weight`: the name of the weight after folding."""
    prefix, _, last = name.rpartition(".")
    return f"{prefix}{'.' if prefix else ''}weight" if last in WEIGHT_NORM_NAMES else name


def _folded_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `state` as a model with weight norm folded holds them (`weight_v` has the
    weight's shape): what two state dicts must share to load into each other in either layout."""
    return {_folded_name(name): tuple(value.shape) for name, value in state.items() if not name.endswith("weight_g")}


def check_fits(model: torch.nn.Module, state: dict, path: str) -> None:
    """Refuse, in one line, weights whose names or shapes differ from `model`'s. Weight norm's layout
    does not count: `weight_g`/`weight_v` load into a folded `weight` and back (modules.WeightNormMixin)."""
    expected, found = _folded_shapes(model.state_dict()), _folded_shapes(state)
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    reshaped = [
        f"{name} {list(found[name])} vs {list(shape)}"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    ]
    halves = [
        name
        for name in state
        if name.rpartition(".")[2] in WEIGHT_NORM_NAMES
        and name[:-1] + ("v" if name.endswith("g") else "g") not in state
    ]
    if missing or unexpected or reshaped or halves:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing ({_describe(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_describe(unexpected)})")
        if reshaped:
            problems.append(f"{len(reshaped)} of another shape ({_describe(reshaped)})")
        if halves:
            problems.append(f"{len(halves)} weight-norm tensors without their other half ({_describe(halves)})")
        raise CheckpointError(
            f"{path}: checkpoint holds {architecture(state)}, waveflow_config "
            f"describes {architecture(model.state_dict())}: " + "; ".join(problems)
        )


# waveflow_config keys that change what the weights compute without changing their names or shapes
SHAPELESS_KEYS = ("n_height", "n_layer_per_cycle", "bipartize", "upsample_factors")


def stored_shapeless_settings(checkpoint: dict) -> dict | None:
    """The SHAPELESS_KEYS of the waveflow_config a checkpoint stores, as the config parses them (the original's
    `"True"` is `True`, a list a tuple; a key not stored takes its default), or None where it stores none (the
    original's)."""
    stored = checkpoint.get("config")
    section = stored.get("waveflow_config") if isinstance(stored, dict) else None
    if not isinstance(section, dict):
        return None
    settings = {}
    for field in dataclasses.fields(WaveFlowConfig):
        if field.name not in SHAPELESS_KEYS:
            continue
        value = section.get(field.name, field.default)
        if value is dataclasses.MISSING:
            continue  # not stored, no default: unknown
        try:
            value = parse_value(WaveFlowConfig, field.name, value)
        except ConfigError:
            pass  # not a value the config takes: it differs from any the model has
        settings[field.name] = value
    return settings


def _as_json(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def check_same_model(model: torch.nn.Module, checkpoint: dict, path: str) -> None:
    """Refuse, in one line, a checkpoint whose weights do not fit the model (`check_fits`, the keys below
    added to its line), or whose stored config (ours; the original's store none) differs from the model's in
    a key that the shapes of the weights do not show: n_height, say, where the same tensors would compute
    another model."""
    stored = stored_shapeless_settings(checkpoint)
    config = getattr(model, "config", None)
    differ = (
        []
        if stored is None or not isinstance(config, WaveFlowConfig)
        else [
            f"{key} {_as_json(theirs)} where this config has {_as_json(getattr(config, key))}"
            for key, theirs in stored.items()
            if theirs != getattr(config, key)
        ]
    )
    try:  # weights of other shapes first: the architecture they describe says more than the keys alone
        check_fits(model, checkpoint["model"], path)
    except CheckpointError as error:
        if differ:
            raise CheckpointError(f"{error}; and it was trained with waveflow_config {', '.join(differ)}") from None
        raise
    if differ:
        raise CheckpointError(
            f"{path}: checkpoint was trained with waveflow_config " + ", ".join(differ) + "; its weights "
            "would compute another model (use its config, or -w/--warm_start to fine-tune from it)"
        )


# data_config keys that set what a model was trained on: its audio's rate and its mel spectrogram. A checkpoint
# used under a config that sets them otherwise gets mels of another analysis (and writes audio at another rate).
FEATURE_KEYS = ("sampling_rate", "filter_length", "win_length", "mel_fmin", "mel_fmax")


def _features(section: dict) -> dict:
    """FEATURE_KEYS of a data_config (a dict, or a DataConfig's fields) as numbers, mel_fmax's null resolved
    to the Nyquist frequency; a key not set or not a number is left out (unknown)."""
    features = {}
    for key in FEATURE_KEYS:
        value = section.get(key)
        if key == "mel_fmax" and value is None and isinstance(section.get("sampling_rate"), (int, float)):
            value = section["sampling_rate"] / 2
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            features[key] = float(value)
    return features


def check_same_features(data, checkpoint: dict, path: str) -> None:
    """Refuse, in one line, a checkpoint whose stored data_config (ours; the original's store none) trained
    it on another rate or mel analysis than `data` (the config's DataConfig) sets; -w/--warm_start may
    start from it."""
    stored = checkpoint.get("config")
    section = stored.get("data_config") if isinstance(stored, dict) else None
    if not isinstance(section, dict):
        return
    theirs, mine = _features(section), _features(dataclasses.asdict(data))
    differ = [key for key in FEATURE_KEYS if key in theirs and key in mine and theirs[key] != mine[key]]
    if differ:
        raise CheckpointError(
            f"{path}: checkpoint was trained on data_config "
            + ", ".join(f"{key} {theirs[key]:g}" for key in differ)
            + " where this config has "
            + ", ".join(f"{mine[key]:g}" for key in differ)
            + ": other audio and mels than it learned (use its config, or -w/--warm_start to fine-tune from it)"
        )


def shapeless_differences(checkpoint: dict, other: dict) -> tuple[list[str], list[str]]:
    """`key value` of each of SHAPELESS_KEYS that the two checkpoints' stored configs set differently, as
    `checkpoint` and as `other` have it: weights of the same names and shapes that compute different models."""
    mine, theirs = stored_shapeless_settings(checkpoint) or {}, stored_shapeless_settings(other) or {}
    keys = [key for key in mine if key in theirs and mine[key] != theirs[key]]
    return [f"{key} {_as_json(mine[key])}" for key in keys], [f"{key} {_as_json(theirs[key])}" for key in keys]


def check_finite(state: dict, path: str) -> None:
    """Refuse weights holding NaN or infinite values (a run that diverged), naming the first such tensor."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: weight {name} holds NaN or infinite values (a run that diverged?)")


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load weights strictly, in either weight-norm layout, after refusing in one line those of another
    model or not finite (`source` names them)."""
    check_fits(model, state, source)
    check_finite(state, source)
    model.load_state_dict(state)


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """Load a checkpoint's weights (strictly) and, when given, optimizer, scheduler and scaler states."""
    checkpoint = read_checkpoint(path)
    if optimizer is not None and not {"iteration", "optimizer"} <= checkpoint.keys():
        raise CheckpointError(
            f"{path}: holds no iteration and optimizer state to resume training from (weights "
            f"only?); use -w/--warm_start to start from its weights"
        )
    check_same_model(model, checkpoint, path)
    load_weights(model, checkpoint["model"], path)
    try:
        if optimizer is not None and "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and "scheduler" in checkpoint:
            scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and scaler.is_enabled() and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: optimizer state does not fit this model ({first_sentence(error)}); "
            f"use --warm_start to load weights only"
        ) from None
    return checkpoint


def average_checkpoints(folder: str, count: int, epsilon: float | None = None) -> tuple[dict, dict]:
    """Average the weights of the newest `count` checkpoints in `folder`.

    A plain mean, or with `epsilon` Polyak (exponential) averaging from the oldest
    to the newest: `average = epsilon * average + (1 - epsilon) * weights`.
    Returns `(averaged weights, the newest checkpoint)`.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"{folder}: not a folder; -a N averages the newest N checkpoints of the folder that checkpoint_path names"
        )
    if count < 1:
        raise CheckpointError(f"-a must be at least 1, got {count}")
    if epsilon is not None and not 0.0 <= epsilon < 1.0:
        raise CheckpointError(f"-e/--epsilon must be in [0, 1), got {epsilon}")
    available = list_checkpoints(folder)
    if len(available) < count:
        raise CheckpointError(
            f"{folder}: -a {count} needs {count} checkpoints named {CHECKPOINT_PREFIX}<iteration>, "
            f"found {len(available)}"
        )
    paths = [path for _, path in available[-count:]]

    def weights(checkpoint: dict) -> dict:
        return {
            name: value.double() if value.is_floating_point() else value for name, value in checkpoint["model"].items()
        }

    reference_path = paths[0]
    newest = reference = read_checkpoint(reference_path)
    average = weights(newest)
    for index, path in enumerate(paths[1:], start=1):
        newest = read_checkpoint(path)
        state = weights(newest)
        if state.keys() != average.keys() or any(state[k].shape != average[k].shape for k in state):
            raise CheckpointError(
                f"{path}: weights do not match those of {reference_path}; "
                f"cannot average checkpoints of different models"
            )
        differ, reference_has = shapeless_differences(newest, reference)
        if differ:
            raise CheckpointError(
                f"{path}: trained with waveflow_config {', '.join(differ)} where {reference_path} has "
                f"{', '.join(reference_has)}; cannot average checkpoints of different models"
            )
        weight = (1.0 - epsilon) if epsilon is not None else 1.0 / (index + 1)
        for name, value in state.items():
            if value.is_floating_point():
                average[name] = average[name] + weight * (value - average[name])
    dtypes = {name: value.dtype for name, value in newest["model"].items()}
    return {name: value.to(dtypes[name]) for name, value in average.items()}, newest


def warm_start(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> tuple[list[str], list[str]]:
    """Load the tensors of `state` whose names and shapes match `model`'s (weight norm's layout aside, as
    in `check_fits`); returns `(loaded, skipped)` where `skipped` describes every tensor of either side
    that was not loaded. Tensors to load that hold NaN or infinite values (a run that diverged) are
    refused in one line naming `source`, as `load_weights` refuses them."""
    own, offered = _folded_shapes(model.state_dict()), _folded_shapes(state)
    fits = {name for name, shape in offered.items() if own.get(name) == shape}
    loaded = [name for name in state if _folded_name(name) in fits]
    skipped = [
        f"{name} (shape {list(shape)} vs {list(own[name])})"
        for name, shape in offered.items()
        if name in own and own[name] != shape
    ]
    skipped += [f"{name} (not in this model)" for name in offered if name not in own]
    skipped += [f"{name} (not in the checkpoint, kept as initialised)" for name in own if name not in offered]
    check_finite({name: state[name] for name in loaded}, source)
    model.load_state_dict({name: state[name] for name in loaded}, strict=False)
    return loaded, skipped
