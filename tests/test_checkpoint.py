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
