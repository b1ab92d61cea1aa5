"""checkpoint.py: weights load whichever weight-norm layout the checkpoint and the model are in."""

import pytest
import torch

from checkpoint import (
    average_checkpoints,
    checkpoint_path,
    load_checkpoint,
    load_weights,
    rerun_checkpoint,
    save_checkpoint,
    warm_start,
)
from model import build_model
from test_model import random_model, tiny_config

# Small, with a weight-normed flow embedding: every kind of weight-normed tensor the model has.
CONFIG = tiny_config(
    "nanoflow", res_channels=8, n_height=8, n_layer=2, n_flow=2, size_flow_embed=4, use_weightnorm_embed=True
)


def trained_model(seed):
    """A model whose every weight differs from a fresh one's."""
    return random_model(CONFIG, seed)


def save(model, path):
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    save_checkpoint(
        str(path),
        model_state=model.state_dict(),
        iteration=1,
        optimizer=optimizer,
        scheduler=scheduler,
        learning_rate=1e-3,
        config={},
        epoch=0,
        batch_in_epoch=1,
    )


def outputs(model):
    torch.manual_seed(1)
    mel, audio = torch.randn(1, 80, 5), 0.1 * torch.randn(1, 1024)
    with torch.no_grad():
        return model.eval()(audio, mel)


def assert_same_function(a, b):
    for x, y in zip(outputs(a), outputs(b), strict=True):
        assert torch.allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("source_folded, target_folded", [(False, True), (True, False)])
def test_a_checkpoint_loads_into_a_model_of_either_weight_norm_layout(tmp_path, source_folded, target_folded):
    source = trained_model(0)
    if source_folded:
        source.remove_weight_norm()
    save(source, tmp_path / "waveflow_1")
    target = build_model(CONFIG)
    if target_folded:
        target.remove_weight_norm()
    load_checkpoint(str(tmp_path / "waveflow_1"), target)
    assert_same_function(target, source)
    assert any(name.endswith("weight_g") for name in target.state_dict()) != target_folded


def test_averaged_weights_and_warm_start_load_across_layouts(tmp_path):
    for seed, iteration in ((0, 1), (2, 2)):
        save(trained_model(seed), checkpoint_path(str(tmp_path), iteration))
    average, _ = average_checkpoints(str(tmp_path), 2)
    folded = build_model(CONFIG).remove_weight_norm()
    load_weights(folded, average, str(tmp_path))
    normed = build_model(CONFIG)
    normed.load_state_dict(average)
    assert_same_function(folded, normed)
    # Warm start: folded weights into a weight-normed model, every tensor loaded.
    fresh = build_model(CONFIG)
    loaded, skipped = warm_start(fresh, folded.state_dict())
    assert not skipped and len(loaded) == len(folded.state_dict())
    assert_same_function(fresh, folded)


def test_a_rerun_goes_on_from_the_run_folders_newest_checkpoint_when_its_run_started_from_the_requested_one(
    tmp_path,
):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    run_dir.mkdir()
    other.mkdir()
    source, unrelated = str(other / "start.pt"), str(other / "waveflow_2")
    for iteration, start in ((6, source), (8, source)):
        torch.save(
            {"model": {}, "config": {"train_config": {"checkpoint_path": start}}}, run_dir / f"waveflow_{iteration}"
        )
    newest = str(run_dir / "waveflow_8")
    assert rerun_checkpoint(str(run_dir), source) == newest  # the same command again
    assert rerun_checkpoint(str(run_dir), str(tmp_path / "other" / ".." / "other" / "start.pt")) == newest
    assert rerun_checkpoint(str(run_dir), unrelated) is None  # another starting point: used as it is
    assert rerun_checkpoint(str(run_dir), str(run_dir / "waveflow_6")) == newest
    assert rerun_checkpoint(str(run_dir), newest) is None and rerun_checkpoint(str(run_dir), "") == newest
    assert rerun_checkpoint(str(tmp_path / "empty"), source) is None


def test_a_damaged_or_cut_short_checkpoint_is_refused_in_one_line(tmp_path):
    """torch.load reads a tensor whose bytes changed without a word: the zip's CRC-32s catch it."""
    import struct
    import zipfile

    from checkpoint import CheckpointError, read_checkpoint

    path = tmp_path / "good.pt"
    save(trained_model(0), path)
    data = path.read_bytes()
    assert read_checkpoint(str(path))["iteration"] == 1

    def damaged(name: str, content: bytes) -> str:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as error:
            read_checkpoint(str(tmp_path / name))
        assert "\n" not in str(error.value) and str(error.value).startswith(str(tmp_path / name))
        return str(error.value)

    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
    tensor = max((name for name in members if "/data/" in name), key=lambda name: members[name].file_size)
    for member in (tensor, next(name for name in members if name.endswith(".pkl"))):
        start = members[member].header_offset
        name_length, extra_length = struct.unpack("<HH", data[start + 26 : start + 30])
        at = start + 30 + name_length + extra_length + members[member].file_size // 2  # in the member's bytes
        flipped = data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
        assert f"a damaged checkpoint ({member} fails its checksum)" in damaged("flipped.pt", flipped)
    assert "a damaged or incomplete checkpoint" in damaged("cut.pt", data[: len(data) // 2])
    assert "not a checkpoint (an empty file)" in damaged("empty.pt", b"")
    assert "not a checkpoint (not a file written by torch.save)" in damaged("text.pt", b"weights")
