"""bench.py runs and reports what it promises (speed itself is never asserted in tests)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from runtime import has_bf16_matrix_units

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # bench.py end to end, in a subprocess


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
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["matmul_size"] == 2048 and report["matmul_gflops"] > 0
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
    for name, item in cases.items():
        assert item["seconds"] > 0 and item["runs"] >= 1
        if not name.startswith("data"):
            assert 0 < item["fraction_of_matmul"] and ("fraction_of_bf16_matmul" in item) == bf16_units
            assert item.get("fraction_of_bf16_matmul", 1) > 0
            assert item["gflops"] > 0 and item["peak_memory_mb"] >= 0
    assert cases["synthesis 0.1 s x 2"]["kHz"] > 0 and cases["synthesis 0.1 s x 1"]["real_time_factor"] > 0
    assert 0 < cases["data loading 2 x 2048"]["percent_of_training_step"]
    for workers in ("0 workers", "1 worker"):
        loader = cases[f"data loader 2 x 2048, {workers}"]
        assert loader["batches_per_second"] > 0 and loader["runs"] >= 30
