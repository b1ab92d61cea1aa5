"""image_density_experiments/train.py: the checkpoints to resume from are checked before any work."""

import os
import subprocess
import sys

from test_image_density import IMAGE_DIR, write_fake_cifar10


def run_train(*args):
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=IMAGE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_a_missing_checkpoint_or_one_that_fresh_would_delete_is_a_one_line_error(tmp_path):
    write_fake_cifar10(str(tmp_path / "data" / "CIFAR10"), images_per_batch=16, as_archive=True)
    output = tmp_path / "run"
    common = ["--dataroot", str(tmp_path), "--output_dir", str(output), "--n_workers", "0", "--no_cuda"]
    missing = run_train(*common, "--saved_model", str(tmp_path / "glow_model_3.pth"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == f"error: {tmp_path / 'glow_model_3.pth'}: checkpoint not found"
    assert not output.exists()
    output.mkdir()
    (output / "glow_model_3.pth").write_bytes(b"a checkpoint")
    fresh = run_train(*common, "--fresh", "--saved_model", str(output / "glow_model_3.pth"))
    assert fresh.returncode != 0 and fresh.stderr.strip() == (
        f"error: --fresh would delete {output / 'glow_model_3.pth'}, the checkpoint to resume from; resume into "
        f"another --output_dir"
    )
    assert (output / "glow_model_3.pth").read_bytes() == b"a checkpoint"
