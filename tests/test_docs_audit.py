"""The documentation as a new user follows it, beyond tests/test_docs.py: the commands of
image_density_experiments/README.md against that folder's own `train.py`, every `--flag` the pages name
in prose, the Python blocks of README.md and docs/deploy.md run as written (given the names they take as
given), `scripts/gpu_check.sh` on a machine without a GPU, the README's `-s -c config.json` with a config
that trained, and streaming's window flags without `--chunk_frames`."""

import glob
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

import train
from conftest import ROOT
from test_docs import DOCUMENTS, FENCED_BLOCK, INLINE_CODE, accepted_flags, commands, option_strings, read
from test_train import make_corpus, run_here, write_config

IMAGE_DIR = os.path.join(ROOT, "image_density_experiments")


def test_the_image_readme_commands_use_flags_of_its_own_train_py():
    """Its commands run `train.py` in image_density_experiments/, not the vocoder's (which test_docs checks)."""
    flags = option_strings(image_help())
    found = [
        command for command in commands("image_density_experiments/README.md") if command[:2] == ["python", "train.py"]
    ]
    assert len(found) >= 9  # --download, the original's six, the quick run, --help
    unknown = [
        f"{shlex.join(command)}: no option {token}"
        for command in found
        for token in command[2:]
        if re.match(r"--?[A-Za-z]", token) and token.split("=", 1)[0] not in flags
    ]
    assert unknown == []


# Flags the pages name that belong to other programs: pytest, TensorBoard, torchrun, HiFi-GAN's train.py.
OTHER_PROGRAMS_FLAGS = {"--durations", "--logdir", "--master_addr", "--master_port", "--max-restarts", "--nnodes"}
OTHER_PROGRAMS_FLAGS |= {"--node_rank", "--fine_tuning"}


def test_every_flag_the_pages_name_in_prose_is_a_flag_of_a_project_command():
    """test_docs checks the flags of whole commands; the prose names many more (`--sha256 HEX`, `--mic`,
    `--lookahead_frames`, `--override`, ...): each must still be a flag of one of the project's commands."""
    mentioned: dict[str, set[str]] = {}
    for document in DOCUMENTS + ["image_density_experiments/README.md"]:
        text = read(document)
        spans = INLINE_CODE.findall(FENCED_BLOCK.sub("", text)) + [block for _, block in FENCED_BLOCK.findall(text)]
        for span in spans:
            for flag in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", span):
                mentioned.setdefault(flag, set()).add(document)
    scripts = ["train.py", "mel2samp.py", "export.py", "bench.py", *sorted(glob.glob("scripts/*.py", root_dir=ROOT))]
    known = set().union(*(accepted_flags(script) for script in scripts))
    known |= set().union(*(accepted_flags(script) for script in glob.glob("scripts/*.sh", root_dir=ROOT)))
    known |= option_strings(image_help())
    unknown = {flag: sorted(pages) for flag, pages in mentioned.items() if flag not in known | OTHER_PROGRAMS_FLAGS}
    assert unknown == {}
    assert len(mentioned) > 60  # the extraction found them


def image_help() -> str:
    return subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=IMAGE_DIR, capture_output=True, text=True, timeout=120, check=True
    ).stdout


def python_blocks(document: str) -> list[str]:
    return [block for language, block in FENCED_BLOCK.findall(read(document)) if language.strip() == "python"]


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# What the README's and deploy.md's Python blocks take as given: a config, a checkpoint, audio and a
# mel of the demo, a loaded model, an acoustic model that gives mel frames a few at a time, a player.
GIVEN = """
import json
import torch
from checkpoint import read_checkpoint
from config import load_config
from data import MelSpectrogram, load_audio
from model import build_model

path = "pretrained/nanoflow-demo.pt"
config = json.load(open("configs/demo.json"))
audio = load_audio("data/demo/wavs/demo_001.wav", 22050)[None, :8192]
mel = MelSpectrogram.from_config(load_config("configs/demo.json").data)(audio)
"""
GIVEN_DEPLOY = """
import torch
from checkpoint import read_checkpoint
from config import load_config
from data import MelSpectrogram, load_audio
from model import build_model

config = load_config("configs/demo.json")
model = build_model(config.waveflow)
model.load_state_dict(read_checkpoint("pretrained/nanoflow-demo.pt")["model"])
mel = MelSpectrogram.from_config(config.data)(load_audio("data/demo/wavs/demo_001.wav", 22050)[None, :12000])
mel_pieces = [mel[:, :, start : start + 5] for start in range(0, mel.shape[2], 5)]
acoustic_model_frames = lambda: iter(mel_pieces)
played = []
play = played.append
"""


def test_the_readmes_python_block_runs_as_written():
    (block,) = python_blocks("README.md")
    checks = """
hop = 256
assert z.shape == (1, 1, 64, 8192 // 64) and logdet.shape == (1,), (z.shape, logdet.shape)
assert torch.isfinite(loss)
assert audio.shape == (1, hop * (mel.shape[2] - 3)), audio.shape
print("ok")
"""
    result = run_python(GIVEN + block + checks)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_python_blocks_of_deploy_md_run_as_written():
    """The streaming block and the denoiser's, each on its own (the ONNX block needs an exported file: see
    the slow test below)."""
    streaming, denoising = [block for block in python_blocks("docs/deploy.md") if "onnxruntime" not in block]
    streaming_checks = """
from model import synthesis_length
length = synthesis_length(sum(piece.shape[2] for piece in mel_pieces), 256)
assert sum(piece.shape[1] for piece in played) == length, [piece.shape for piece in played]
assert audio.shape == (1, length) and torch.allclose(audio, torch.cat(played, dim=1), atol=1e-4)
print("ok")
"""
    denoising_checks = """
assert audio.shape == (1, 256 * (mel.shape[2] - 3)) and torch.isfinite(audio).all()
assert len(pieces) > 1 and torch.allclose(streamed, audio, atol=1e-6), (len(pieces), (streamed - audio).abs().max())
print("ok")
"""
    for block, checks in ((streaming, streaming_checks), (denoising, denoising_checks)):
        result = run_python(GIVEN_DEPLOY + block + checks)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_the_onnx_block_of_deploy_md_runs_on_the_documented_export(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    (block,) = [block for block in python_blocks("docs/deploy.md") if "onnxruntime" in block]
    export = [command for command in commands("docs/deploy.md") if command[:2] == ["python", "export.py"]][0]
    onnx_path = str(tmp_path / "nanoflow-demo.onnx")
    export = [sys.executable, *export[1:]]
    export[export.index("-o") + 1] = onnx_path
    subprocess.run(
        [token for token in export if token != "--check"], cwd=ROOT, capture_output=True, timeout=600, check=True
    )
    given = f"""
import numpy as np
import torch
from config import load_config
from data import MelSpectrogram, load_audio
audio = load_audio("data/demo/wavs/demo_001.wav", 22050)
mel = MelSpectrogram.from_config(load_config("configs/demo.json").data)(audio)
np.save({str(tmp_path / "mel.npy")!r}, mel.numpy())
"""
    code = block.replace('"nanoflow-demo.onnx"', repr(onnx_path)).replace('"mel.npy"', repr(str(tmp_path / "mel.npy")))
    checks = "\nassert audio.shape == (1, hop * (frames - 3)), audio.shape\nprint('ok')\n"
    result = run_python(given + code + checks)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_gpu_check_on_a_machine_without_a_gpu_stops_at_once_in_one_line(tmp_path):
    """docs/gpu.md's `bash scripts/gpu_check.sh OUT_DIR`: without a CUDA device its CUDA tests skip themselves
    and, before, it went on to train the demo on the CPU for hours."""
    out = tmp_path / "out"
    process = subprocess.Popen(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out)],
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a run that goes on can be stopped with all its children
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("scripts/gpu_check.sh went on without a GPU")
    assert process.returncode == 1
    assert stderr.startswith("error: no CUDA device") and len(stderr.strip().splitlines()) == 1, stderr
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize("command", ["-s", "-v"])
def test_synthesis_from_a_training_config_names_the_newest_checkpoint_of_its_run(tmp_path, capsys, command):
    """The README's `python train.py -s -c config.json` with the config that trained (checkpoint_path empty, as
    in every shipped config but demo-long.json) is refused, naming the checkpoint to give."""
    make_corpus(str(tmp_path))
    config = write_config(str(tmp_path))
    status, _, err = run_here(capsys, command, "-c", config)
    assert status == 1 and "train_config.checkpoint_path is empty" in err and "e.g." not in err
    run = tmp_path / "exp" / "tiny"
    run.mkdir(parents=True)
    for iteration in (2, 10):
        (run / f"waveflow_{iteration}").write_bytes(b"")
    status, _, err = run_here(capsys, command, "-c", config)
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert f"--checkpoint_path {run / 'waveflow_10'}, the newest of this config's run" in err
    status, _, err = run_here(capsys, command, "-a", "2", "-c", config)
    assert status == 1 and f"--checkpoint_path {run}, this config's run folder" in err


@pytest.mark.parametrize("args", [("--lookahead_frames", "12"), ("--context_frames", "0"), ("--lookahead_frames", "8")])
def test_stream_windows_without_chunk_frames_are_refused_not_ignored(args, capsys):
    """`-s --lookahead_frames 12` without `--chunk_frames` synthesized whole clips, the flag silently unused."""
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["-s", "-c", "config.json", *args])
    assert exit_info.value.code == 2
    assert "--lookahead_frames and --context_frames go with --chunk_frames" in capsys.readouterr().err
    streamed = train.parse_args(["-s", "-c", "config.json", "--chunk_frames", "32", *args])
    assert (streamed.lookahead_frames, streamed.context_frames) == {
        "--lookahead_frames": (int(args[1]), 8),
        "--context_frames": (8, int(args[1])),
    }[args[0]]
    defaults = train.parse_args(["-s", "-c", "config.json", "--chunk_frames", "32"])
    assert (defaults.lookahead_frames, defaults.context_frames) == (8, 8)
