"""Config files: every original config parses; bad ones are refused with the key named."""

import copy
import glob
import json
import math
import os
import re

import pytest

from config import ConfigError, check_model_rules, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo() -> dict:
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        return json.load(f)


def test_every_bundled_config_parses():
    for path in glob.glob(os.path.join(ROOT, "configs", "*.json")):
        config = load_config(path)
        check_model_rules(config, training=True)
        named = re.search(r"-(16|24|44)k", os.path.basename(path))  # the configs of other rates name theirs
        rate = {"16": 16000, "24": 24000, "44": 44100}[named.group(1)] if named else 22050
        assert config.train.learning_rate > 0 and config.data.sampling_rate == rate
        assert isinstance(config.waveflow.use_weightnorm_embed, bool)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda c: c.update(train_confg=c.pop("train_config")),
            "unknown section 'train_confg'; did you mean 'train_config'",
        ),
        (lambda c: c.pop("data_config"), "missing section 'data_config'"),
        (lambda c: c["data_config"].update(win_length=2048), r"win_length \(2048\) must not exceed filter_length"),
        (lambda c: c["data_config"].update(mel_fmax=20000.0), "mel_fmax"),
        (lambda c: c["train_config"].update(fp16_run=True, bf16_run=True), "fp16_run and bf16_run cannot both be on"),
        (lambda c: c["train_config"].update(batch_size=0), r"train_config\.batch_size must be at least 1"),
        (lambda c: c["data_config"].update(num_workers=100000), r"data_config\.num_workers must be in \[0, 256\]"),
        (
            lambda c: c["train_config"].update(learning_rate="fast"),
            r"train_config\.learning_rate must be a finite number",
        ),
        (lambda c: c["train_config"].update(max_minutes=-1), r"train_config\.max_minutes must be >= 0 \(0: no limit\)"),
        (lambda c: c["train_config"].update(sigma=math.inf), r"train_config\.sigma must be a finite number, got inf"),
        (lambda c: c["train_config"].update(seed=-1), r"train_config\.seed must be in \[0, 2\*\*63\)"),
        (lambda c: c["waveflow_config"].update(model_name=" "), r"waveflow_config\.model_name must name the run's"),
        (lambda c: c["waveflow_config"].update(model_name="/tmp/run"), r"model_name must name the run's folder under"),
        (lambda c: c["train_config"].update(seed=2**64), r"train_config\.seed must be a 64-bit integer"),
        (lambda c: c["waveflow_config"].update(res_channels=10**20), r"waveflow_config\.res_channels must be a 64-bit"),
        (lambda c: c["data_config"].update(segment_length=1e20), r"data_config\.segment_length must be a 64-bit"),
        (
            lambda c: c["train_config"].update(with_tensorboard="maybe"),
            r"train_config\.with_tensorboard must be a boolean",
        ),
    ],
)
def test_bad_configs_name_the_problem(change, message):
    config = copy.deepcopy(demo())
    change(config)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(config, "demo.json")


def test_a_null_mel_fmax_is_the_nyquist_frequency():
    # WaveGlow's and HiFi-GAN's configs write "mel_fmax": null for librosa's fmax=None, sampling_rate / 2
    import torch

    from data import MelSpectrogram

    config = demo()
    config["data_config"]["mel_fmax"] = None
    data = config_from_dict(config).data
    assert data.mel_fmax == data.sampling_rate / 2
    config["data_config"]["mel_fmax"] = data.sampling_rate / 2
    explicit = config_from_dict(config).data
    audio = torch.sin(torch.arange(4096) * 0.3)[None]
    assert torch.equal(MelSpectrogram.from_config(data)(audio), MelSpectrogram.from_config(explicit)(audio))
    for key in ("mel_fmin", "sampling_rate", "hop_length"):  # null means nothing for the others
        config = demo()
        config["data_config"][key] = None
        with pytest.raises(ConfigError, match=rf"data_config\.{key} must be .*got None"):
            config_from_dict(config)


def test_dist_config_is_optional_and_files_are_checked(tmp_path):
    config = demo()
    del config["dist_config"]
    assert config_from_dict(config).dist.dist_backend == "nccl"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(tmp_path / "broken.json"))


def test_a_command_reads_only_the_sections_it_asks_for():
    config = demo()
    del config["train_config"]["epochs"]
    config.pop("waveflow_config")
    with pytest.raises(ConfigError, match="missing required key 'epochs'"):
        config_from_dict(config, "demo.json")
    parsed = config_from_dict(config, "demo.json", sections=("data_config",))
    assert parsed.data.hop_length == 256 and parsed.train_section is None and parsed.waveflow_section is None
    with pytest.raises(ConfigError, match="demo.json: section 'waveflow_config' was not read"):
        parsed.waveflow  # noqa: B018 -- the property raises
    config["data_config"]["hop_lenght"] = 256
    with pytest.raises(ConfigError, match="did you mean 'hop_length'"):  # the sections asked for are still checked
        config_from_dict(config, "demo.json", sections=("data_config",))


@pytest.mark.parametrize(
    "changes,training,message",
    [
        (
            {"data_config": {"segment_length": 8200}, "waveflow_config": {"n_height": 16}},
            True,
            r"data_config\.segment_length \(8200\) must be a multiple of waveflow_config\.n_height \(16\)",
        ),
        (
            {"waveflow_config": {"cin_channels": 64}},
            False,
            r"data_config\.n_mel_channels \(80\) and waveflow_config\.cin_channels \(64\) must be equal",
        ),
        (
            {"data_config": {"hop_length": 200}},
            False,
            r"data_config\.hop_length \(200\) must equal the product of waveflow_config\.upsample_factors "
            r"\(16 x 16 = 256\)",
        ),
        (
            {"data_config": {"hop_length": 256}, "waveflow_config": {"upsample_factors": [15, 20], "n_height": 10}},
            False,
            r"data_config\.hop_length \(256\) must equal the product of waveflow_config\.upsample_factors "
            r"\(15 x 20 = 300\)",
        ),
        (
            {"waveflow_config": {"n_height": 24}, "data_config": {"segment_length": 8208}},
            False,
            r"waveflow_config\.n_height \(24\) must divide the hop of waveflow_config\.upsample_factors "
            r"\(16 x 16 = 256\)",
        ),
        (
            {"data_config": {"hop_length": 300}, "waveflow_config": {"upsample_factors": [15, 20]}},
            False,
            r"waveflow_config\.n_height \(64\) must divide the hop of waveflow_config\.upsample_factors "
            r"\(15 x 20 = 300\)",
        ),
        (
            {"waveflow_config": {"upsample_factors": [16, 0]}},
            False,
            r"waveflow_config\.upsample_factors must be a non-empty list of positive integers, got \[16, 0\]",
        ),
        (
            {"waveflow_config": {"upsample_factors": [16, 16.5]}},
            False,
            r"waveflow_config\.upsample_factors\[1\] must be an integer, got 16\.5",
        ),
        (
            {"waveflow_config": {"upsample_factors": 256}},
            False,
            r"waveflow_config\.upsample_factors must be a list of integers, got 256",
        ),
        (
            {"data_config": {"segment_length": 512}},
            True,
            r"data_config\.segment_length \(512\) must exceed data_config\.filter_length / 2 \(512\)",
        ),
    ],
)
def test_rules_between_sections_name_both_keys(changes, training, message):
    config = copy.deepcopy(demo())
    for section, values in changes.items():
        config[section].update(values)
    with pytest.raises(ConfigError, match=f"demo.json: {message}"):
        check_model_rules(config_from_dict(config, "demo.json"), training=training)


def test_synthesis_does_not_need_the_training_crop_rules():
    config = demo()
    config["data_config"]["segment_length"] = 8200
    check_model_rules(config_from_dict(config, "demo.json"), training=False)
    config["data_config"]["segment_length"] = 256  # no crop of whole clips needs it
    check_model_rules(config_from_dict(config, "demo.json"), training=False)
    check_model_rules(config_from_dict(demo(), "demo.json"), training=True)
