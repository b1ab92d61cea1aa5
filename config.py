"""Configuration: the original NanoFlow JSON configs, parsed into one dataclass per section.

A config file has the sections of the original code (``train_config``,
``data_config``, ``waveflow_config`` and optionally ``dist_config``) with the
same keys and meanings. Every section rejects unknown and missing keys with a
``ValueError`` that names the section and the key, so a misspelt key never
silently falls back to a default. The original wrote booleans as the strings
``"True"``/``"False"``; both those and real JSON booleans are accepted.

A command reads only the sections it uses (``load_config(path, sections)``:
``mel2samp.py`` needs only ``data_config``), and the commands that run the
model check the rules between sections (``check_model_rules``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field

from storage import read_text, warn


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose error for an unknown option names the closest known one, as a misspelt config
    key gets "did you mean": `--checkpoint_pth x` -> "unrecognized arguments: --checkpoint_pth x; did you mean
    --checkpoint_path?"."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
            for word in message.partition(":")[2].split():
                name = word.partition("=")[0]
                if name.startswith("--") and (close := difflib.get_close_matches(name, known, n=1, cutoff=0.7)):
                    message += f"; did you mean {close[0]}?"
                    break
        super().error(message)


COUPLING_TYPES = ("waveflow", "nanoflow_naive", "nanoflow_decomp", "nanoflow")
MAX_NUM_WORKERS = 256  # DataLoader processes: more than any one machine feeds usefully, and each costs memory
# The original's upsampler: two transposed convs, each stretching time 16 times, so that one mel frame
# becomes 256 samples, the hop of its 22,050 Hz Tacotron 2 mels. waveflow_config.upsample_factors defaults to it.
UPSAMPLE_FACTORS = (16, 16)
HOP_LENGTH = math.prod(UPSAMPLE_FACTORS)  # the original's hop: the default of the mel spectrogram's


class ConfigError(ValueError):
    """A config value that is missing, misspelt, of the wrong type or out of range."""


def check_positive(flags: dict[str, list]) -> None:
    """Refuse a command-line value (`{"--repeats": [0]}`; None is a flag left out) that is not a finite
    positive number, naming its flag."""
    for flag, values in flags.items():
        for value in values:
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be positive, got {value:g}")


def _as_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f'{where} must be a boolean (true/false or "True"/"False"), got {value!r}')


def _coerce(value, kind, where: str):
    """Check `value` against the annotated type `kind` and convert where that is lossless."""
    if kind is bool:
        return _as_bool(value, where)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        if not -(2**63) <= value < 2**63:  # what a tensor's size or torch's integers hold
            raise ConfigError(f"{where} must be a 64-bit integer (below 2**63 in size), got {value}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")  # JSON's Infinity, NaN, 1e400
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(kind) is tuple:  # tuple[int, ...]: a JSON list of integers
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        return tuple(_coerce(item, int, f"{where}[{index}]") for index, item in enumerate(value))
    raise TypeError(f"unsupported config field type {kind!r}")  # a bug in this file, not in the config


def _reject_unknown(keys, allowed, where: str, kind: str) -> None:
    """Refuse the first of `keys` not in `allowed`, suggesting the closest valid name."""
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed {kind}s: {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown {kind} '{key}'{hint}")


def parse_section(cls, raw, section: str):
    """Build dataclass `cls` from the dict `raw`, naming `section` in every error; the section's
    `__post_init__` checks and converts the values (`_coerce_fields`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section} must be a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, list(fields), section, "key")
    for name, f in fields.items():
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{section}: missing required key '{name}'")
    return cls(**raw)


def _coerce_fields(section, name: str) -> None:
    """Check and convert every field of the dataclass `section` to its annotated type, naming `name.field`
    in the error, whether the section came from a file (`parse_section`) or was built directly
    (`WaveFlowConfig(**raw)`): the original's "False" would otherwise be a truthy string. A null where the
    field's metadata gives null a meaning stays None for the section's `__post_init__` to resolve."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if not (value is None and f.metadata.get("null")):
            setattr(section, f.name, _coerce(value, hints[f.name], f"{name}.{f.name}"))


def parse_value(cls, name: str, value):
    """`value` of key `name` of section dataclass `cls` as a config gives it (`"True"` -> `True`, a list ->
    a tuple), e.g. a value a checkpoint's stored config holds; a ConfigError when the key would refuse it."""
    return _coerce(value, typing.get_type_hints(cls)[name], f"{cls.__name__}.{name}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class WaveFlowConfig:
    """``waveflow_config``: the model. See model.py for what each key builds."""

    model_name: str
    cin_channels: int
    res_channels: int
    n_height: int
    n_layer: int
    n_flow: int
    n_layer_per_cycle: int
    coupling_type: str
    size_flow_embed: int = 0
    use_weightnorm_embed: bool = False
    bipartize: bool = False
    gradient_checkpointing: bool = False
    upsample_factors: tuple[int, ...] = UPSAMPLE_FACTORS  # one transposed conv per factor; their product: the hop

    @property
    def hop_length(self) -> int:
        """Audio samples per mel frame: the product of the upsampler's factors."""
        return math.prod(self.upsample_factors)

    def __post_init__(self):
        s = "waveflow_config"
        _coerce_fields(self, s)
        _require(
            len(self.upsample_factors) >= 1 and all(factor >= 1 for factor in self.upsample_factors),
            f"{s}.upsample_factors must be a non-empty list of positive integers, got {list(self.upsample_factors)}",
        )
        _require(
            1 not in self.upsample_factors,
            f"{s}.upsample_factors must not hold a factor of 1 (its transposed conv stretches nothing and cannot "
            f"keep the length; leave it out), got {list(self.upsample_factors)}",
        )
        _require(
            self.coupling_type in COUPLING_TYPES,
            f"{s}.coupling_type must be one of {', '.join(COUPLING_TYPES)}, got '{self.coupling_type}'",
        )
        _require(
            bool(self.model_name.strip()) and not os.path.isabs(self.model_name),
            f"{s}.model_name must name the run's folder under output_directory, got {self.model_name!r}",
        )
        for key in ("cin_channels", "res_channels", "n_height", "n_layer", "n_flow", "n_layer_per_cycle"):
            _require(getattr(self, key) >= 1, f"{s}.{key} must be at least 1, got {getattr(self, key)}")
        _require(self.n_height >= 2, f"{s}.n_height must be at least 2, got {self.n_height}")
        if self.coupling_type == "nanoflow":
            _require(
                self.size_flow_embed >= 1,
                f"{s}.size_flow_embed must be a positive integer when coupling_type is 'nanoflow'",
            )
        else:
            for key, inert in (("size_flow_embed", 0), ("use_weightnorm_embed", False)):
                if getattr(self, key) != inert:
                    # The original took these for every coupling type and its configs carry them: a warning, not
                    # a refusal, so that such a config still loads.
                    warn(
                        f"{s}.{key} ({getattr(self, key)}) is ignored: only coupling_type 'nanoflow' has a flow "
                        f"embedding, this config's is '{self.coupling_type}'"
                    )
        if self.bipartize:
            _require(self.n_height % 2 == 0, f"{s}.n_height must be even when bipartize is on")
        _require(
            self.hop_length % self.n_height == 0,
            f"{s}.n_height ({self.n_height}) must divide the hop of {s}.upsample_factors "
            f"({' x '.join(map(str, self.upsample_factors))} = {self.hop_length}): synthesis makes that many "
            f"samples per mel frame, in columns of n_height",
        )


@dataclass
class DataConfig:
    """``data_config``: file lists and the Tacotron 2 mel spectrogram parameters."""

    training_files: str
    test_files: str
    segment_length: int
    sampling_rate: int
    filter_length: int
    hop_length: int
    win_length: int
    mel_fmin: float
    # null, as WaveGlow's, HiFi-GAN's and librosa's fmax=None: the Nyquist frequency, sampling_rate / 2
    mel_fmax: float = field(metadata={"null": "sampling_rate / 2"})
    n_mel_channels: int = 80
    num_workers: int = 2
    dequantize: bool = False
    mel_directory: str = ""
    resample: bool = False  # resample clips at another rate on load (data.resample_audio) instead of refusing them
    downmix: bool = False  # average the channels of a multi-channel clip instead of refusing it

    def __post_init__(self):
        s = "data_config"
        _coerce_fields(self, s)
        for key in ("segment_length", "sampling_rate", "filter_length", "hop_length", "win_length", "n_mel_channels"):
            _require(getattr(self, key) >= 1, f"{s}.{key} must be at least 1, got {getattr(self, key)}")
        _require(
            0 <= self.num_workers <= MAX_NUM_WORKERS,
            f"{s}.num_workers must be in [0, {MAX_NUM_WORKERS}] (each is a process holding a copy of the dataset), "
            f"got {self.num_workers}",
        )
        _require(
            self.win_length <= self.filter_length,
            f"{s}.win_length ({self.win_length}) must not exceed filter_length ({self.filter_length})",
        )
        if self.mel_fmax is None:  # null in the JSON (parse_section)
            self.mel_fmax = self.sampling_rate / 2
        _require(
            0 <= self.mel_fmin < self.mel_fmax <= self.sampling_rate / 2,
            f"{s}: need 0 <= mel_fmin < mel_fmax <= sampling_rate / 2, "
            f"got mel_fmin={self.mel_fmin}, mel_fmax={self.mel_fmax}",
        )


@dataclass
class TrainConfig:
    """``train_config``: optimisation, checkpoints and logging."""

    output_directory: str
    epochs: int
    learning_rate: float
    lr_decay_step: int
    lr_decay_gamma: float
    sigma: float
    iters_per_checkpoint: int
    batch_size: int
    seed: int
    checkpoint_path: str
    with_tensorboard: bool
    fp16_run: bool = False
    bf16_run: bool = False
    grad_clip_thresh: float = 5.0
    max_bad_steps: int = 10
    max_iterations: int = 0
    max_minutes: float = 0.0
    compile: bool = False  # torch.compile the training step's forward (train.py's `TrainingStep`)

    def __post_init__(self):
        s = "train_config"
        _coerce_fields(self, s)
        for key in ("epochs", "lr_decay_step", "iters_per_checkpoint", "batch_size", "max_bad_steps"):
            _require(getattr(self, key) >= 1, f"{s}.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("learning_rate", "lr_decay_gamma", "sigma", "grad_clip_thresh"):
            _require(getattr(self, key) > 0, f"{s}.{key} must be positive, got {getattr(self, key)}")
        _require(self.max_iterations >= 0, f"{s}.max_iterations must be >= 0 (0: no limit), got {self.max_iterations}")
        _require(self.max_minutes >= 0, f"{s}.max_minutes must be >= 0 (0: no limit), got {self.max_minutes}")
        _require(not (self.fp16_run and self.bf16_run), f"{s}: fp16_run and bf16_run cannot both be on")
        _require(0 <= self.seed < 2**63, f"{s}.seed must be in [0, 2**63), got {self.seed}")  # torch.manual_seed's


@dataclass
class DistConfig:
    """``dist_config``: kept for the original configs; torchrun's environment takes precedence."""

    dist_backend: str = "nccl"
    dist_url: str = "tcp://localhost:54321"

    def __post_init__(self):
        _coerce_fields(self, "dist_config")


@dataclass
class Config:
    """The parsed sections. A section the command did not ask for (`load_config`) is not read:
    asking for it is a `ConfigError` naming the section, so a command's code never sees None."""

    train_section: TrainConfig | None = None
    data_section: DataConfig | None = None
    waveflow_section: WaveFlowConfig | None = None
    dist: DistConfig = field(default_factory=DistConfig)
    raw: dict = field(default_factory=dict)  # the JSON as read, stored in checkpoints
    source: str = "config"  # the file name, which every error names

    def _section(self, value, name: str):
        if value is None:
            raise ConfigError(f"{self.source}: section '{name}' was not read by this command")
        return value

    @property
    def train(self) -> TrainConfig:
        return self._section(self.train_section, "train_config")

    @property
    def data(self) -> DataConfig:
        return self._section(self.data_section, "data_config")

    @property
    def waveflow(self) -> WaveFlowConfig:
        return self._section(self.waveflow_section, "waveflow_config")


SECTIONS = {
    "train_config": ("train_section", TrainConfig),
    "data_config": ("data_section", DataConfig),
    "waveflow_config": ("waveflow_section", WaveFlowConfig),
    "dist_config": ("dist", DistConfig),
}


MODEL_SECTIONS = ("train_config", "data_config", "waveflow_config", "dist_config")


def config_from_dict(raw: dict, source: str = "config", sections: tuple[str, ...] = MODEL_SECTIONS) -> Config:
    """Parse the `sections` of a config dict (the others are neither read nor checked; `dist_config`
    may be absent); `source` (usually the file name) prefixes every error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    _reject_unknown(raw, list(SECTIONS), source, "section")
    parsed = {}
    for section in sections:
        name, cls = SECTIONS[section]
        if section not in raw:
            if section == "dist_config":
                continue
            raise ConfigError(f"{source}: missing section '{section}'")
        try:
            parsed[name] = parse_section(cls, raw[section], section)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    return Config(raw=raw, source=source, **parsed)


def check_model_rules(config: Config, training: bool) -> None:
    """The rules between keys of different sections that running the model needs, each refused in one
    line naming both keys; `training` adds those of the training crops."""
    data, model = config.data, config.waveflow
    where = f"{config.source}: "
    _require(
        data.n_mel_channels == model.cin_channels,
        f"{where}data_config.n_mel_channels ({data.n_mel_channels}) and waveflow_config.cin_channels "
        f"({model.cin_channels}) must be equal: the model reads every band of the mel",
    )
    _require(
        data.hop_length == model.hop_length,
        f"{where}data_config.hop_length ({data.hop_length}) must equal the product of "
        f"waveflow_config.upsample_factors ({' x '.join(map(str, model.upsample_factors))} = {model.hop_length}): "
        f"the upsampler turns each mel frame into that many samples",
    )
    if training:
        _require(
            data.segment_length > data.filter_length // 2,
            f"{where}data_config.segment_length ({data.segment_length}) must exceed data_config.filter_length / 2 "
            f"({data.filter_length // 2}) for the mel spectrogram's reflect padding of a training crop",
        )
        _require(
            data.segment_length % model.n_height == 0,
            f"{where}data_config.segment_length ({data.segment_length}) must be a multiple of "
            f"waveflow_config.n_height ({model.n_height}): the model folds the audio into n_height rows",
        )


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; a key given twice (of which JSON would keep the last, silently) is a
    ValueError naming it."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key '{key}' appears twice in one object; JSON would keep only the last")
        result[key] = value
    return result


def load_config(path: str, sections: tuple[str, ...] = MODEL_SECTIONS) -> Config:
    """Read a JSON config file and validate its `sections`."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = json.loads(read_text(path), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    except ValueError as error:  # not UTF-8, or a key given twice
        raise ConfigError(f"{path}: {error}") from None
    return config_from_dict(raw, source=path, sections=sections)
