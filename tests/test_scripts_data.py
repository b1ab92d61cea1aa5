"""Bad input to the data scripts (add_noise_floor.py, prepare_corpus.py, prepare_ljspeech.py): refused in one
line before anything is written, and nothing already there is changed."""

import importlib.util
import os

import numpy as np
import pytest
import soundfile

from conftest import ROOT

RATE = 22050


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


add_noise_floor = load_script("add_noise_floor")


def write_clip(path, file_format="WAV"):
    pcm = np.zeros(2000, dtype=np.int16)
    pcm[1000:] = 3000
    soundfile.write(str(path), pcm, RATE, subtype="PCM_16", format=file_format)
    return path.read_bytes()


@pytest.mark.parametrize("level", ["nan", "inf", "0"])
def test_noise_floor_refuses_a_level_that_is_not_a_negative_number(tmp_path, capsys, level):
    clip = tmp_path / "a.wav"
    before = write_clip(clip)
    with pytest.raises(SystemExit) as stopped:
        add_noise_floor.main([f"--level_db={level}", str(clip)])
    assert stopped.value.code == 2 and "--level_db" in capsys.readouterr().err
    assert clip.read_bytes() == before


def test_noise_floor_checks_every_file_before_changing_any(tmp_path, capsys):
    clip = tmp_path / "a.wav"
    before = write_clip(clip)
    (tmp_path / "junk.wav").write_text("not audio\n")
    os.symlink(clip, tmp_path / "link.wav")
    for other, problem in (
        ("missing.wav", "missing.wav: not found"),
        ("junk.wav", "junk.wav: cannot read audio"),
        ("a.wav", "listed twice"),
        ("link.wav", "link.wav: listed twice"),
    ):
        assert add_noise_floor.main([str(clip), str(tmp_path / other)]) == 1
        error = capsys.readouterr().err
        assert problem in error and error.count("\n") == 1, error
        assert clip.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.wav", "junk.wav", "link.wav"]


def test_noise_floor_keeps_a_flac_file_flac(tmp_path):
    clip = tmp_path / "a.flac"
    before = write_clip(clip, "FLAC")
    assert add_noise_floor.main([str(clip)]) == 0
    assert clip.read_bytes()[:4] == b"fLaC" and clip.read_bytes() != before
    info = soundfile.info(str(clip))
    assert (info.format, info.subtype, info.frames) == ("FLAC", "PCM_16", 2000)


def test_noise_floor_failed_write_changes_no_file(tmp_path, capsys):
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    before = write_clip(first), write_clip(second)
    (tmp_path / "b.wav.partial").mkdir()
    assert add_noise_floor.main([str(first), str(second)]) == 1
    error = capsys.readouterr().err
    assert "b.wav.partial: cannot write" in error and error.count("\n") == 1, error
    assert (first.read_bytes(), second.read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["a.wav", "b.wav", "b.wav.partial"]
