"""bench.py runs and reports what it promises (speed itself is never asserted in tests)."""

import json
import os
import subprocess
import sys
import time
from typing import cast

import pytest
import torch

import bench
from runtime import has_bf16_matrix_units

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.json")


@pytest.mark.slow  # bench.py end to end, in a subprocess
def test_bench_reports_every_case_as_json(tmp_path):
    with open(os.path.join(ROOT, "configs", "demo.json")) as f:
        config = json.load(f)
    config["waveflow_config"].update(res_channels=8, n_layer=2, n_flow=2)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench.py"),
            "-c",
            str(path),
            "--json",
            "--seconds",
            "0.1",
            "--batches",
            "1",
            "2",
            "--train_batch",
            "2",
            "--segment_length",
            "2048",
            "--repeats",
            "2",
            "--loader_workers",
            "0",
            "1",
            "--matmul_size",
            "256",  # a quick yardstick: the default's readings took 10 of this test's 20 s
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["matmul_size"] == 256 and report["matmul_gflops"] > 0
    assert report["allocator"] == bench.allocator()  # the test runs under the same allocator as its child
    # The bf16 yardstick where the processor has bf16 matrix units (AMX, AVX-512 bf16), none elsewhere.
    bf16_units = has_bf16_matrix_units(torch.device("cpu"))
    assert (report["bf16_matmul_gflops"] is not None) == bf16_units
    cases = {item["case"]: item for item in report["results"]}
    assert set(cases) == {
        "synthesis 0.1 s x 1",
        "synthesis 0.1 s x 2",
        "training 2 x 2048",
        "training 2 x 2048 checkpointed",
        "data loading 2 x 2048",
        "data loader 2 x 2048, 0 workers",
        "data loader 2 x 2048, 1 worker",
    }
    # The fastest runs, against the yardstick's fastest: what a machine whose speed swings gives in a fast spell.
    assert report["best_matmul_gflops"] >= report["matmul_gflops"]
    assert (report["best_bf16_matmul_gflops"] is not None) == bf16_units
    for name, item in cases.items():
        assert item["seconds"] > 0 and item["runs"] >= 1
        if not name.startswith("data"):
            assert 0 < item["fraction_of_matmul"] and ("fraction_of_bf16_matmul" in item) == bf16_units
            assert item.get("fraction_of_bf16_matmul", 1) > 0
            assert item["gflops"] > 0 and item["peak_memory_mb"] >= 0
            assert 0 < item["best_seconds"] <= item["seconds"]
            assert item["best_kHz"] == pytest.approx(item["kHz"] * item["seconds"] / item["best_seconds"])
            best_gflops = item["gflops"] * item["seconds"] / item["best_seconds"]
            assert item["best_fraction_of_matmul"] == pytest.approx(best_gflops / report["best_matmul_gflops"])
            if bf16_units:
                best_bf16 = report["best_bf16_matmul_gflops"]
                assert item["best_fraction_of_bf16_matmul"] == pytest.approx(best_gflops / best_bf16)
            assert item["paired_fraction_of_matmul"] > 0
    assert cases["synthesis 0.1 s x 2"]["kHz"] > 0 and cases["synthesis 0.1 s x 1"]["real_time_factor"] > 0
    assert 0 < cases["data loading 2 x 2048"]["percent_of_training_step"]
    for workers in ("0 workers", "1 worker"):
        loader = cases[f"data loader 2 x 2048, {workers}"]
        assert loader["batches_per_second"] > 0 and loader["runs"] >= 30


def test_each_run_is_paired_with_the_yardstick_read_just_before_and_after_it():
    events = []

    class Recording:
        readings = iter([10.0, 30.0, 10.0, 99.0])

        def reading(self) -> float:
            events.append("reading")
            return next(self.readings)

    durations = iter([0.02, 0.04])

    def run():
        events.append("run")
        time.sleep(next(durations, 0.0))

    yardstick = cast(bench.Yardstick, Recording())
    times, readings = bench.paired_timed(run, torch.device("cpu"), 2, 0, 60.0, yardstick)
    assert events == ["reading", "run", "reading", "run", "reading"] and readings == [10.0, 30.0, 10.0]
    # 20 GFLOP a run: 20 / t GFLOP/s against the mean of the readings around each run, the median of those.
    result = bench.with_paired({"gflops": 10.0, "seconds": 2.0}, [2.0, 4.0], readings)
    assert result["paired_fraction_of_matmul"] == pytest.approx((0.5 + 0.25) / 2)
    assert len(times) == 2 and times[1] > times[0]


def test_the_allocator_is_named_from_the_libraries_the_process_has_mapped():
    """A preloaded malloc is named by its library (Debian's libjemalloc.so.2, tcmalloc's minimal build);
    else the C library's, whose name alone says nothing of the allocator."""
    lines = [
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6",
        "7f02-7f03 r--p 00000000 00:00 0 [heap]",
        "7f04-7f05 rw-p 00000000 00:00 0",
    ]
    assert bench.allocator("\n".join(lines)) == "the C library's"
    jemalloc = "7f06-7f07 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    assert bench.allocator("\n".join([lines[0], jemalloc, *lines[1:]])) == "jemalloc"
    tcmalloc = "7f08-7f09 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10"
    assert bench.allocator("\n".join([tcmalloc, *lines])) == "tcmalloc"
    this_process = bench.allocator()
    assert this_process in (*bench.ALLOCATORS, "the C library's")
    preloaded = os.environ.get("LD_PRELOAD", "")
    assert (this_process != "the C library's") == any(name in preloaded for name in bench.ALLOCATORS)


def test_the_yardstick_reads_the_matmuls_rate_without_allocating():
    cpu = torch.device("cpu")
    assert bench.matmul_size(cpu) == 2048 and bench.matmul_size(torch.device("cuda")) == 8192
    yardstick = bench.Yardstick(cpu, torch.float32, size=512)
    assert yardstick.a.shape == (512, 512) and yardstick.flops == 2 * 512**3
    out = yardstick.out
    assert yardstick.reading() > 0 and yardstick.out is out
    assert torch.allclose(out, yardstick.a @ yardstick.b)


def demo_config_with(tmp_path, section: str, **changes) -> str:
    with open(DEMO_CONFIG) as f:
        config = json.load(f)
    config[section].update(changes)
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seconds", "0"], "error: --seconds must be positive, got 0"),
        (["--seconds", "1", "-1"], "error: --seconds must be positive, got -1"),
        (["--seconds", "0.0001"], "error: --seconds 0.0001 gives 0 samples, which must be positive and a multiple of"),
        (["--batches", "0"], "error: --batches must be positive, got 0"),
        (["--repeats", "0"], "error: --repeats must be positive, got 0"),
        (["--matmul_size", "0"], "error: --matmul_size must be positive, got 0"),
        (["--train_batch", "0"], "error: --train_batch must be positive, got 0"),
        (["--train_batch", "100"], f"error: {bench.DEMO_LIST}: its 26 clips cannot fill a training batch of 100"),
        (["--segment_length", "-16000"], "error: --segment_length must be positive, got -16000"),
        (["--segment_length", "1000"], "error: --segment_length 1000 must be a multiple of waveflow_config.n_height"),
        (["--segment_length", "256", "--skip", "training"], "error: --segment_length 256 must exceed data_config.fil"),
        (["--warmup", "-1"], "error: --warmup must be >= 0, got -1"),
        (["--loader_workers", "0", "-1"], "error: --loader_workers must be >= 0, got -1"),
        (["--max_seconds", "-1"], "error: --max_seconds must be >= 0, got -1"),
        (["--device", "cpu", "--dtype", "fp16"], "error: --dtype fp16 needs a CUDA device"),
        (["--device", "cuda"], "error: --device cuda: this machine has no CUDA device that PyTorch can use"),
        (["--device", "gpu0"], "error: --device gpu0: not a device name"),
    ],
)
def test_a_bad_flag_is_a_one_line_error_before_any_work(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cuda as on a CPU-only build

    def no_work(*args):
        raise AssertionError("bench.py measured before checking its flags")

    monkeypatch.setattr(bench, "matmul_gflops", no_work)
    status = bench.main(["-c", DEMO_CONFIG, *flags])
    out, err = capsys.readouterr()
    assert status == 1 and out == "" and err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "section, changes, message",
    [
        ("train_config", {"learning_rte": 1e-3}, "train_config: unknown key 'learning_rte'; did you mean"),
        ("data_config", {"n_mel_channels": 40}, "data_config.n_mel_channels (40) and waveflow_config.cin_channels"),
        ("data_config", {"segment_length": 16001}, "data_config.segment_length (16001) must be a multiple of"),
    ],
)
def test_a_bad_config_is_a_one_line_error(tmp_path, section, changes, message, capsys):
    path = demo_config_with(tmp_path, section, **changes)
    assert bench.main(["-c", path]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {path}: {message}") and err.count("\n") == 1, err


def test_a_missing_config_ends_the_command_in_one_line(tmp_path):
    missing = str(tmp_path / "nonexistent.json")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), "-c", missing],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: {missing}: config file not found\n"
