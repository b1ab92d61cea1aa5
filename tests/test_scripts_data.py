"""Bad input to the data scripts (add_noise_floor.py, prepare_corpus.py, prepare_ljspeech.py): refused in one
line before anything is written, and nothing already there is changed."""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile

from conftest import ROOT
from test_prepare_ljspeech import make_archive, make_corpus
from test_scripts import script
from test_train import write_config

RATE = 22050


add_noise_floor = script("add_noise_floor")
prepare_corpus = script("prepare_corpus")
prepare_ljspeech = script("prepare_ljspeech")


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


def test_noise_floor_refuses_a_truncated_file_and_changes_none(tmp_path, capsys):
    whole, cut = tmp_path / "a.wav", tmp_path / "b.wav"
    before = write_clip(whole)
    cut.write_bytes(write_clip(cut)[:-1000])  # a copy cut short: libsndfile reads it, silently shorter
    before_cut = cut.read_bytes()
    assert add_noise_floor.main([str(whole), str(cut)]) == 1
    error = capsys.readouterr().err
    assert "b.wav: is truncated" in error and error.count("\n") == 1, error
    assert (whole.read_bytes(), cut.read_bytes()) == (before, before_cut)
    assert sorted(os.listdir(tmp_path)) == ["a.wav", "b.wav"]


def test_noise_floor_through_a_link_changes_the_file_and_keeps_the_link(tmp_path):
    (tmp_path / "store").mkdir()
    clip, link = tmp_path / "store" / "a.wav", tmp_path / "a.wav"
    before = write_clip(clip)
    os.symlink(clip, link)
    assert add_noise_floor.main([str(link)]) == 0
    assert os.path.islink(link) and os.readlink(link) == str(clip)
    assert clip.read_bytes() != before and soundfile.info(str(clip)).frames == 2000
    assert sorted(os.listdir(tmp_path / "store")) == ["a.wav"]


def make_vctk(folder, speakers=4, utterances=3):
    """A VCTK 0.80 folder (wav48/SPEAKER/SPEAKER_xxx.wav) of the demo's clips, at their 22,050 Hz."""
    demo = sorted(os.listdir(os.path.join(ROOT, "data", "demo", "wavs")))
    for speaker in range(speakers):
        (folder / "wav48" / f"p{speaker}").mkdir(parents=True)
        for utterance in range(utterances):
            name = demo[(speaker * utterances + utterance) % len(demo)]
            shutil.copy(
                os.path.join(ROOT, "data", "demo", "wavs", name),
                folder / "wav48" / f"p{speaker}" / f"p{speaker}_{utterance:03d}.wav",
            )
    return folder


def test_prepare_corpus_checks_the_whole_base_config_before_writing_a_list(tmp_path, capsys):
    corpus = make_vctk(tmp_path / "VCTK")
    base = write_config(str(tmp_path), "base.json")
    output = tmp_path / "lists"
    args = ["--corpus", str(corpus), "--output-dir", str(output), "--test-speakers", "1", "--test-utterances", "1"]
    assert prepare_corpus.main([*args, "--config", base]) == 0
    before = {name: (output / name).read_bytes() for name in os.listdir(output)}
    assert len(before) == 5
    config = json.load(open(base))
    config["train_config"]["learning_rte"] = config["train_config"].pop("learning_rate")
    json.dump(config, open(tmp_path / "misspelt.json", "w"))
    capsys.readouterr()
    assert prepare_corpus.main([*args, "--config", str(tmp_path / "misspelt.json"), "--seed", "7"]) == 1
    error = capsys.readouterr().err
    assert "learning_rte" in error and error.count("\n") == 1, error
    assert {name: (output / name).read_bytes() for name in os.listdir(output)} == before


def test_prepare_corpus_failed_write_leaves_all_five_outputs_as_they_were(tmp_path, capsys):
    corpus = make_vctk(tmp_path / "VCTK")
    base = write_config(str(tmp_path), "base.json")
    output = tmp_path / "lists"
    args = ["--corpus", str(corpus), "--output-dir", str(output), "--config", base, "--test-utterances", "1"]
    assert prepare_corpus.main([*args, "--test-speakers", "1"]) == 0
    before = {name: (output / name).read_bytes() for name in os.listdir(output)}
    assert len(before) == 5
    (output / "config_unseen_speakers.json.partial").mkdir()  # the last file's write fails, as on a full disk
    capsys.readouterr()
    assert prepare_corpus.main([*args, "--test-speakers", "2", "--seed", "7"]) == 1  # other lists, had it written
    error = capsys.readouterr().err
    assert "config_unseen_speakers.json.partial" in error and error.count("\n") == 1, error
    assert {name: (output / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(output)) == sorted([*before, "config_unseen_speakers.json.partial"])


def test_prepare_corpus_output_dir_that_is_a_file_or_an_output_that_is_a_folder_is_refused_in_one_line(
    tmp_path, capsys
):
    corpus = make_vctk(tmp_path / "VCTK")
    (tmp_path / "a_file").write_text("kept\n")
    args = ["--corpus", str(corpus), "--output-dir", str(tmp_path / "a_file"), "--test-speakers", "1"]
    assert prepare_corpus.main([*args, "--test-utterances", "1"]) == 1
    error = capsys.readouterr().err
    assert "a_file: not a folder" in error and error.count("\n") == 1, error
    assert (tmp_path / "a_file").read_text() == "kept\n"
    output = tmp_path / "lists"
    (output / "config_unseen_speakers.json").mkdir(parents=True)
    assert prepare_corpus.main([*args[:3], str(output), *args[4:], "--test-utterances", "1"]) == 1
    error = capsys.readouterr().err
    assert "config_unseen_speakers.json: is a folder, not a file" in error and error.count("\n") == 1, error
    assert os.listdir(output) == ["config_unseen_speakers.json"]  # no list written beside it


def test_prepare_corpus_default_config_is_the_repositorys_from_any_working_directory(tmp_path, capsys, monkeypatch):
    corpus = make_vctk(tmp_path / "VCTK")
    monkeypatch.chdir(tmp_path)  # no configs/ here
    args = ["--corpus", str(corpus), "--output-dir", "lists", "--test-speakers", "1", "--test-utterances", "1"]
    assert prepare_corpus.main(args) == 0, capsys.readouterr().err
    config = json.load(open(tmp_path / "lists" / "config.json"))
    default = json.load(open(os.path.join(ROOT, "configs", "nanoflow-h16-r128-emb512.json")))
    assert config["waveflow_config"]["model_name"] == default["waveflow_config"]["model_name"] + "-vctk"


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--test-clips", "-3"], "--test-clips -3: must be at least 1"),
        (["--test-clips", "0"], "--test-clips 0: must be at least 1"),
        (["--expected-clips", "-1"], "--expected-clips -1: must be at least 1"),
        (["--test-list", "{tmp}/lists/../train.txt"], "--train-list and --test-list are the same file"),
    ],
)
def test_prepare_ljspeech_refuses_nonsense_split_options_before_writing(tmp_path, capsys, options, problem):
    corpus, _ = make_corpus(tmp_path, 6)
    (tmp_path / "lists").mkdir()
    (tmp_path / "train.txt").write_text("kept\n")
    args = ["--corpus", str(corpus), "--expected-clips", "0", "--train-list", str(tmp_path / "train.txt")]
    with pytest.raises(SystemExit) as stopped:
        prepare_ljspeech.main(
            [*args, "--test-list", str(tmp_path / "test.txt")] + [o.format(tmp=tmp_path) for o in options]
        )
    assert stopped.value.code == 2 and problem in capsys.readouterr().err
    assert (tmp_path / "train.txt").read_text() == "kept\n" and not (tmp_path / "test.txt").exists()


def split_lists(tmp_path, corpus) -> int:
    """prepare_ljspeech.py's exit status for `corpus`, 2 test clips, the lists train.txt and test.txt in tmp_path."""
    lists = ["--train-list", str(tmp_path / "train.txt"), "--test-list", str(tmp_path / "test.txt")]
    return prepare_ljspeech.main(["--corpus", str(corpus), "--expected-clips", "0", "--test-clips", "2", *lists])


def test_prepare_ljspeech_list_that_is_a_folder_is_refused_in_one_line(tmp_path, capsys):
    corpus, _ = make_corpus(tmp_path, 6)
    (tmp_path / "train.txt").mkdir()
    assert split_lists(tmp_path, corpus) == 1
    error = capsys.readouterr().err
    assert "train.txt: is a folder, not a file list (--train-list)" in error and error.count("\n") == 1, error
    assert not (tmp_path / "test.txt").exists()


def test_prepare_ljspeech_damaged_or_foreign_archive_is_one_line(tmp_path, capsys):
    archive, _ = make_archive(tmp_path, 4)
    whole = archive.read_bytes()
    (tmp_path / "cut.tar.bz2").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.tar.bz2").write_text("not an archive\n" * 100)
    lists = ["--train-list", str(tmp_path / "train.txt"), "--test-list", str(tmp_path / "test.txt")]
    for name, problem in (
        ("cut.tar.bz2", "cannot extract: damaged bzip2 archive"),
        ("text.tar.bz2", "cannot extract: not a tar archive"),
    ):
        code = prepare_ljspeech.main(["--archive", str(tmp_path / name), "--data-dir", str(tmp_path / "data"), *lists])
        error = capsys.readouterr().err
        assert code == 1 and f"{name}: {problem}" in error and error.count("\n") == 1, error
        assert not (tmp_path / "data").exists() and not (tmp_path / "train.txt").exists()


def test_prepare_ljspeech_wrong_rate_clip_advice_is_for_this_script(tmp_path, capsys):
    corpus, ids = make_corpus(tmp_path, 6)
    soundfile.write(str(corpus / "wavs" / f"{ids[2]}.wav"), np.zeros(16, np.int16), 16000, subtype="PCM_16")
    assert split_lists(tmp_path, corpus) == 1
    error = capsys.readouterr().err
    assert f"{ids[2]}.wav: sampling rate is 16000 Hz, expected LJSpeech-1.1's 22050 Hz mono" in error
    assert "data_config" not in error and error.count("\n") == 1, error
