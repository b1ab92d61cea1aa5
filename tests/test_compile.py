"""train_config.compile (`--compile`): the compiled training step against the eager one, resumption, and the
fallback to eager where compiling fails. Compiling the tiny model takes 10-40 s on a 2-core CPU the first
time; the compiled tests share one compilation (same model shapes, one process)."""

import os

import pytest
import torch

import train
from config import load_config
from test_train import assert_same_weights, make_corpus, run_here, weights, write_config

ITERATIONS = 20


def config_file(folder, name="config.json", **changes) -> str:
    """A config that trains the tiny corpus (3 batches per epoch) for up to 30 iterations, a checkpoint every 10."""
    return write_config(folder, name, train_config__epochs=10, train_config__iters_per_checkpoint=10, **changes)


@pytest.mark.slow
def test_compiled_steps_give_the_eager_losses_and_weights(tmp_path, capsys, one_thread):
    config = load_config(write_config(str(tmp_path), train_config__lr_decay_step=1000))  # weights that move
    runtime = train.Runtime(device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 80, 9, generator=generator), 0.1 * torch.randn(2, 2048, generator=generator))]
    batches *= ITERATIONS
    runs = {}
    for compiled in (False, True):
        config.train.compile = compiled
        training = train.build_training(config, runtime)
        step = train.TrainingStep(training, runtime, config)
        losses = [step(batch)["loss"] for batch in batches]
        assert (step.forward.compiled is not None) == compiled  # compiled, not fallen back
        runs[compiled] = losses, training.model.state_dict()
    assert "warning" not in capsys.readouterr().err
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs[False], runs[True]
    for eager, compiled in zip(eager_losses, compiled_losses, strict=True):
        assert abs(compiled - eager) <= 1e-4 * abs(eager)
    assert_same_weights(compiled_weights, eager_weights)
    model = train.build_training(config, runtime).model  # as both runs started
    assert max((eager_weights[name] - initial).abs().max() for name, initial in model.state_dict().items()) > 1e-2
    # One graph: a graph break would leave part of the forward to eager, and split it for CUDA graphs.
    explanation = torch._dynamo.explain(model)(batches[0][1], batches[0][0])
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly_and_its_checkpoints_load_into_an_eager_run(tmp_path, capsys, one_thread):
    folder = str(tmp_path)
    make_corpus(folder)
    config = config_file(folder)
    status, _, err = run_here(capsys, "-c", config, "--compile", "--max_iterations", str(ITERATIONS))
    assert status == 0 and "warning" not in err, err
    uninterrupted = os.path.join(folder, "exp", "tiny")
    interrupted = config_file(folder, "interrupted.json", train_config__output_directory=str(tmp_path / "again"))
    for stop in (10, ITERATIONS):  # the same command again resumes from the newest checkpoint
        status, _, err = run_here(capsys, "-c", interrupted, "--compile", "--max_iterations", str(stop))
        assert status == 0 and "warning" not in err, err
    resumed = os.path.join(folder, "again", "tiny")
    assert_same_weights(
        weights(os.path.join(resumed, "waveflow_20")), weights(os.path.join(uninterrupted, "waveflow_20"))
    )
    # The checkpoints hold the model's own names (no `_orig_mod.`): an eager run resumes from them.
    eager = config_file(
        folder,
        "eager.json",
        train_config__output_directory=str(tmp_path / "eager"),
        train_config__checkpoint_path=os.path.join(uninterrupted, "waveflow_10"),
    )
    status, out, err = run_here(capsys, "-c", eager, "--max_iterations", str(ITERATIONS))
    assert status == 0 and "resumed from" in out, err
    assert_same_weights(
        weights(os.path.join(folder, "eager", "tiny", "waveflow_20")),
        weights(os.path.join(uninterrupted, "waveflow_20")),
        atol=1e-4,
    )


@pytest.mark.parametrize("where", ["at torch.compile", "at the first call"])
def test_where_compiling_fails_one_warning_names_the_cause_and_the_run_trains_eagerly(
    tmp_path, capsys, monkeypatch, one_thread, where
):
    folder = str(tmp_path)
    make_corpus(folder)
    status, _, err = run_here(capsys, "-c", config_file(folder), "--max_iterations", "4")
    assert status == 0, err
    eager = weights(os.path.join(folder, "exp", "tiny", "waveflow_4"))
    calls = []

    def failing_compile(function, **options):
        if where == "at torch.compile":
            raise RuntimeError("torch.compile is not supported on this platform")

        def compiled(*args):
            calls.append(args)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(a long explanation)")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    again = config_file(
        folder, "again.json", train_config__output_directory=str(tmp_path / "again"), train_config__compile=True
    )
    status, _, err = run_here(capsys, "-c", again, "--max_iterations", "4")
    assert status == 0, err
    cause = (
        "RuntimeError: torch.compile is not supported on this platform"
        if where == "at torch.compile"
        else "the first compiled training step failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found)"
    )
    assert err.count("warning:") == 1
    assert f"warning: train_config.compile: {cause}; training without torch.compile\n" in err
    assert len(calls) == (where == "at the first call")  # never tried again
    # The failed step was redone eagerly, not skipped or made twice: the eager run's weights, exactly.
    assert_same_weights(weights(os.path.join(folder, "again", "tiny", "waveflow_4")), eager, atol=0)


def test_compile_goes_with_training(capsys):
    for command in ("-s", "-v"):
        with pytest.raises(SystemExit):
            train.parse_args(["-c", "config.json", command, "--compile"])
        assert "--compile goes with training" in capsys.readouterr().err
