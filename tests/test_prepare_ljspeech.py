"""scripts/prepare_ljspeech.py on fake corpora in the LJSpeech-1.1 layout (no download)."""

import importlib.util
import os
import subprocess
import sys
import tarfile

import numpy as np
import soundfile

from conftest import ROOT
from data import read_file_list

SCRIPT = os.path.join(ROOT, "scripts", "prepare_ljspeech.py")
spec = importlib.util.spec_from_file_location("prepare_ljspeech", SCRIPT)
assert spec is not None and spec.loader is not None, SCRIPT
prepare_ljspeech = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_ljspeech)


def clip_ids(count):
    """LJSpeech-style ids over several chapters, e.g. LJ001-0001."""
    return [f"LJ{1 + i // 500:03d}-{1 + i % 500:04d}" for i in range(count)]


def make_corpus(folder, count):
    """An LJSpeech-1.1 folder of `count` tiny clips; metadata.csv deliberately not in sorted order."""
    corpus = folder / "LJSpeech-1.1"
    (corpus / "wavs").mkdir(parents=True)
    ids = clip_ids(count)
    silence = np.zeros(16, np.int16)
    for clip_id in ids:
        soundfile.write(str(corpus / "wavs" / f"{clip_id}.wav"), silence, 22050, subtype="PCM_16")
    rows = [f"{clip_id}|Text {clip_id}.|Text {clip_id}.\n" for clip_id in ids]
    (corpus / "metadata.csv").write_text("".join(rows[1:] + rows[:1]))
    return corpus, ids


def make_archive(folder, count):
    corpus, ids = make_corpus(folder / "source", count)
    archive = folder / "LJSpeech-1.1.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        tar.add(corpus, arcname="LJSpeech-1.1")
    return archive, ids


def listed_ids(list_path):
    return [os.path.basename(path)[: -len(".wav")] for path in read_file_list(str(list_path))]


def test_archive_is_extracted_and_split_into_disjoint_lists(tmp_path, monkeypatch):
    archive, ids = make_archive(tmp_path, 12)
    monkeypatch.chdir(tmp_path)
    code = prepare_ljspeech.main(
        [
            "--archive",
            str(archive),
            "--data-dir",
            "data",
            "--expected-clips",
            "12",
            "--test-clips",
            "3",
            "--train-list",
            "lists/train.txt",
            "--test-list",
            "lists/test.txt",
        ]
    )
    assert code == 0
    assert sorted(os.listdir(tmp_path / "data")) == ["LJSpeech-1.1"]  # no scratch folder left behind
    test, train = listed_ids(tmp_path / "lists/test.txt"), listed_ids(tmp_path / "lists/train.txt")
    assert test == ids[:3] and train == ids[3:]
    assert (tmp_path / "lists/test.txt").read_text().startswith("../data/LJSpeech-1.1/wavs/LJ001-0001.wav\n")


def test_1310_test_clips_and_no_clip_in_both_lists(tmp_path):
    corpus, ids = make_corpus(tmp_path, 1400)
    train_list, test_list = tmp_path / "train_files.txt", tmp_path / "test_files.txt"
    code = prepare_ljspeech.main(
        [
            "--corpus",
            str(corpus),
            "--expected-clips",
            "1400",
            "--train-list",
            str(train_list),
            "--test-list",
            str(test_list),
        ]
    )
    assert code == 0
    test, train = listed_ids(test_list), listed_ids(train_list)
    assert len(test) == 1310 and len(train) == 90
    assert not set(test) & set(train)
    assert test + train == sorted(ids)
    assert test[-1] == ids[1309] and train[0] == ids[1310]  # the clip the original README put in both


def test_incomplete_corpora_and_foreign_archives_are_refused(tmp_path, capsys):
    corpus, ids = make_corpus(tmp_path, 6)
    lists = ["--train-list", str(tmp_path / "train.txt"), "--test-list", str(tmp_path / "test.txt")]
    assert prepare_ljspeech.main(["--corpus", str(corpus), *lists]) == 1
    assert "lists 6 clips, expected 13100" in capsys.readouterr().err
    os.remove(corpus / "wavs" / f"{ids[4]}.wav")
    assert prepare_ljspeech.main(["--corpus", str(corpus), "--expected-clips", "0", "--test-clips", "2", *lists]) == 1
    assert f"{ids[4]}.wav: audio file not found" in capsys.readouterr().err
    assert not (tmp_path / "train.txt").exists()
    foreign = tmp_path / "other.tar.bz2"
    with tarfile.open(foreign, "w:bz2") as tar:
        tar.add(corpus / "metadata.csv", arcname="metadata.csv")
    code = prepare_ljspeech.main(["--archive", str(foreign), "--data-dir", str(tmp_path / "data"), *lists])
    assert code == 1
    assert "not an LJSpeech-1.1 archive" in capsys.readouterr().err
    assert not (tmp_path / "data" / "LJSpeech-1.1").exists()


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    archive, _ = make_archive(tmp_path, 4)
    command = [
        sys.executable,
        SCRIPT,
        "--archive",
        str(archive),
        "--data-dir",
        str(tmp_path / "data"),
        "--sha256",
        "0" * 64,
        "--train-list",
        str(tmp_path / "train.txt"),
        "--test-list",
        str(tmp_path / "test.txt"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {archive}: sha256 is ")


def test_too_few_clips_to_hold_out_the_test_set(tmp_path, capsys):
    corpus, _ = make_corpus(tmp_path, 3)
    lists = ["--train-list", str(tmp_path / "train.txt"), "--test-list", str(tmp_path / "test.txt")]
    assert prepare_ljspeech.main(["--corpus", str(corpus), "--expected-clips", "0", *lists]) == 1
    assert "too few to hold out 1310" in capsys.readouterr().err
