"""Training under conditions users meet that the other tests leave out: warm starts and averages from
diverged checkpoints, the learning rate the logs report, and what resuming says."""

import json
import os

import torch

import train
from checkpoint import list_checkpoints
from config import load_config
from mel2samp import Mel2Samp, collate
from model import build_model
from runtime import Runtime
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


def one_step(tmp_path, **changes):
    make_corpus(str(tmp_path), n_train=2, n_test=1)
    config = load_config(write_config(str(tmp_path), **changes))
    runtime = Runtime(device=torch.device("cpu"))
    training = train.build_training(config, runtime)
    train_set = Mel2Samp.from_config(config.data, mode="train", seed=config.train.seed)
    batch = collate([train_set[0], train_set[1]])
    return lambda: train.train_step(
        training.model, batch, training.optimizer, training.scheduler, training.scaler, runtime, config
    )


def test_the_learning_rate_reported_for_a_step_is_the_one_it_used(tmp_path, one_thread):
    """StepLR is stepped after each update: the rate read after it is the next step's. With the rate halved
    every 2 iterations, steps 1 and 2 use 1e-3 and steps 3 and 4 5e-4; the logs said 5e-4 for step 2."""
    step = one_step(tmp_path, train_config__lr_decay_step=2, train_config__lr_decay_gamma=0.5)
    assert [step()["learning_rate"] for _ in range(4)] == [1e-3, 1e-3, 5e-4, 5e-4]


def test_a_config_with_the_originals_boolean_strings_resumes_and_synthesizes(tmp_path, capsys, one_thread):
    """`"bipartize": "True"` is a boolean as the original wrote them: the checkpoint stores the string, which the
    check for another model compared with the parsed `true` and refused its own run's checkpoints."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    config = write_config(folder, waveflow_config__bipartize="True", train_config__iters_per_checkpoint=100)
    status, _, err = run_here(capsys, "-c", config, "--max_iterations", "1")
    assert status == 0, err
    status, out, err = run_here(capsys, "-c", config, "--max_iterations", "2")
    assert status == 0 and "resumed from" in out and "training finished at iteration 2" in out, err
    checkpoint = os.path.join(folder, "exp", "tiny", "waveflow_2")
    status, out, err = run_here(capsys, "-s", "-c", config, "--checkpoint_path", checkpoint)
    assert status == 0 and "clip02_synthesis.wav" in out, err
    plain = write_config(folder, "plain.json", waveflow_config__bipartize=False)
    status, _, err = run_here(capsys, "-s", "-c", plain, "--checkpoint_path", checkpoint)
    assert status == 1 and "bipartize true where this config has false" in err


def test_averaging_checkpoints_of_models_that_differ_beyond_their_shapes_is_refused(tmp_path, capsys):
    """A run folder can hold checkpoints of two configs (a warm start with `bipartize` on from the folder's own
    checkpoint numbers on into it): their tensors have the same names and shapes, their average is no model."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    sources = tmp_path / "sources"
    sources.mkdir()
    for iteration, bipartize in ((2, False), (4, "True")):
        config = json.load(open(write_config(folder, f"{iteration}.json", waveflow_config__bipartize=bipartize)))
        state = build_model(config["waveflow_config"]).state_dict()
        torch.save({"model": state, "iteration": iteration, "config": config}, sources / f"waveflow_{iteration}")
    config = write_config(folder, train_config__iters_per_checkpoint=100)
    for option in (["-s"], ["--max_iterations", "5"]):
        status, _, err = run_here(capsys, "-a", "2", *option, "-c", config, "--checkpoint_path", str(sources))
        assert status == 1 and err.strip() == (
            f"error: {sources / 'waveflow_4'}: trained with waveflow_config bipartize true where "
            f"{sources / 'waveflow_2'} has bipartize false; cannot average checkpoints of different models"
        )


def test_a_run_that_diverges_before_its_first_checkpoint_names_the_one_it_started_from(tmp_path, capsys, one_thread):
    """It named `<run folder>/waveflow_<start iteration>`, a file that does not exist when the run started from
    a checkpoint elsewhere."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    config = write_config(
        folder, train_config__iters_per_checkpoint=100, train_config__max_bad_steps=2, train_config__epochs=10
    )
    model = build_model(load_config(config).waveflow)
    state = model.state_dict()
    for name in state:  # finite weights whose exp(log_s) overflows: every loss is inf
        if "proj_log_s_t" in name and name.endswith("bias"):
            state[name].fill_(1e30)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    source = str(tmp_path / "diverging_2")
    torch.save(
        {"model": state, "iteration": 2, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        source,
    )
    for option in ([], ["-w"]):
        status, _, err = run_here(capsys, *option, "-c", config, "--checkpoint_path", source)
        assert status == 1 and err.strip().splitlines()[-1] == (
            "error: 2 steps in a row skipped for a non-finite loss or gradient at iteration 4: training stopped; "
            f"the last good checkpoint is {source}"
        )


def test_resuming_a_warm_started_run_under_another_schedule_says_its_iteration_and_the_schedules_step(
    tmp_path, capsys, one_thread
):
    """A warm start's schedule counts from its source's iteration: after `-w` from iteration 2 and 2 steps, the
    checkpoint is iteration 4 and the schedule at its step 2. The line said "at iteration 2"."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    source = str(tmp_path / "source_2")
    torch.save({"model": build_model(load_config(write_config(folder)).waveflow).state_dict(), "iteration": 2}, source)
    config = write_config(folder, train_config__iters_per_checkpoint=100, train_config__epochs=10)
    status, out, err = run_here(capsys, "-w", "-c", config, "--checkpoint_path", source, "--max_iterations", "4")
    assert status == 0 and "training finished at iteration 4" in out, err
    faster = write_config(folder, "faster.json", train_config__learning_rate=2e-3, train_config__epochs=10)
    status, out, err = run_here(capsys, "-c", faster, "--max_iterations", "5")
    assert status == 0, err
    said = "following the config's, learning rate 0.002 at iteration 4 (its step 2: the schedule counts from 2)"
    assert said + "\n" in out


def test_resuming_with_another_batch_size_or_segment_length_says_the_data_order_is_not_the_same(
    tmp_path, capsys, one_thread
):
    """A changed learning rate was said in one line, a changed batch size, seed, training list or segment length
    not at all (unless the checkpoint's place in its epoch no longer existed): the resume is not exact."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=4, n_test=1)
    config = write_config(folder, train_config__iters_per_checkpoint=100, train_config__epochs=10)
    status, _, err = run_here(capsys, "-c", config, "--max_iterations", "1")
    assert status == 0, err
    status, out, err = run_here(capsys, "-c", config, "--max_iterations", "2")  # the same config: nothing said
    assert status == 0 and "resumed from" in out and "data order" not in out, err
    changed = write_config(
        folder, "changed.json", train_config__batch_size=1, data_config__segment_length=4096, train_config__epochs=10
    )
    status, out, err = run_here(capsys, "-c", changed, "--max_iterations", "3")
    assert status == 0, err
    assert (
        "the checkpoint's run had train_config.batch_size 2 where the config has 1, data_config.segment_length "
        "2048 where the config has 4096: training goes on at the checkpoint's place in the config's data order, "
        "not exactly where that run stopped\n" in out
    )


def test_a_warm_start_into_a_folder_holding_another_run_is_refused_before_writing(tmp_path, capsys, one_thread):
    """`-w` (or `-a`) into a run folder that held another run's checkpoints wrote its own beside them,
    silently: the next resume took the newest of either, and `-a` averaged across the two runs."""
    folder = str(tmp_path)
    make_corpus(folder, n_train=2, n_test=1)
    config = write_config(folder, train_config__iters_per_checkpoint=2)
    run_folder = os.path.join(folder, "exp", "tiny")
    status, _, err = run_here(capsys, "-c", config, "--max_iterations", "2")  # a run of its own
    assert status == 0, err

    def written():  # but the run lock, which each command takes
        return {
            name: os.path.getmtime(os.path.join(run_folder, name))
            for name in os.listdir(run_folder)
            if name != "train.lock"
        }

    before = written()
    source = tmp_path / "pretrained_40"
    torch.save({"model": build_model(load_config(config).waveflow).state_dict(), "iteration": 40}, source)
    sources = tmp_path / "sources"
    sources.mkdir()
    torch.save(
        {"model": build_model(load_config(config).waveflow).state_dict(), "iteration": 40}, sources / "waveflow_40"
    )
    for option, start in ((["-w"], source), (["-a", "1"], sources)):
        status, _, err = run_here(
            capsys, *option, "-c", config, "--checkpoint_path", str(start), "--max_iterations", "42"
        )
        assert status == 1 and len(err.strip().splitlines()) == 1, err
        assert f"{run_folder} already holds another run's checkpoints (waveflow_2)" in err
        assert written() == before
    # from the folder's own checkpoints (or their average, as training.md describes) the run goes on in it
    status, out, err = run_here(
        capsys, "-w", "-c", config, "--checkpoint_path", os.path.join(run_folder, "waveflow_2"), "--max_iterations", "4"
    )
    assert status == 0 and "warm start from" in out, err
    status, out, err = run_here(
        capsys, "-a", "2", "-c", config, "--checkpoint_path", run_folder, "--max_iterations", "6"
    )
    assert status == 0 and "warm start from the average of the newest 2" in out, err
    assert [iteration for iteration, _ in list_checkpoints(run_folder)] == [2, 4, 6]
