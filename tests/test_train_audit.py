"""Training under conditions users meet that the other tests leave out: warm starts and averages from
diverged checkpoints, the learning rate the logs report, and what resuming says."""

import os

import torch

from checkpoint import list_checkpoints
from config import load_config
from model import build_model
from test_train import make_corpus, run_here, write_config


def test_a_warm_start_or_an_average_holding_nan_is_refused_before_training(tmp_path, capsys, one_thread):
    """`-s` and resuming refuse weights holding NaN; `-w` and `-a` loaded them and trained on: every step
    skipped, and a checkpoint of NaN weights written at the end."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    config = write_config(folder, train_config__iters_per_checkpoint=100)
    state = build_model(load_config(config).waveflow).state_dict()
    diverged = dict(state, **{"upsample_conv.0.bias": torch.full_like(state["upsample_conv.0.bias"], float("nan"))})
    torch.save({"model": diverged}, tmp_path / "diverged")
    sources = tmp_path / "sources"
    sources.mkdir()
    torch.save({"model": state, "iteration": 2}, sources / "waveflow_2")
    torch.save({"model": diverged, "iteration": 4}, sources / "waveflow_4")
    for option, source in (
        (["-w"], tmp_path / "diverged"),
        (["-a", "2"], sources),
        (["-a", "2", "-e", "0.5"], sources),
    ):
        status, _, err = run_here(
            capsys, *option, "-c", config, "--checkpoint_path", str(source), "--max_iterations", "8"
        )
        assert status == 1 and "weight upsample_conv.0.bias holds NaN or infinite values" in err, err
        assert len(err.strip().splitlines()) == 1
        assert list_checkpoints(os.path.join(folder, "exp", "tiny")) == []
    # a NaN in a tensor the warm start does not load (another shape here) is no reason to refuse
    other = write_config(
        folder, "other.json", waveflow_config__size_flow_embed=6, train_config__iters_per_checkpoint=100
    )
    nan_embedding = dict(
        state, **{"flow_embedding.weight": torch.full_like(state["flow_embedding.weight"], float("nan"))}
    )
    torch.save({"model": nan_embedding}, tmp_path / "other")
    status, out, err = run_here(
        capsys, "-w", "-c", other, "--checkpoint_path", str(tmp_path / "other"), "--max_iterations", "1"
    )
    assert status == 0 and "flow_embedding.weight (shape [2, 4] vs [2, 6])" in out, err
