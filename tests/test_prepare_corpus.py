"""scripts/prepare_corpus.py on small corpora made here in the layouts of VCTK 0.92, VCTK 0.80 and LibriTTS.

The speakers are the demo corpus's espeak-ng voice at three pitches (each clip played 0.8, 1 and 1.25 times
as fast, then resampled to the layout's own rate: 48 kHz for VCTK, 24 kHz for LibriTTS)."""

import importlib.util
import json
import os

import numpy as np
import pytest
import soundfile
import soxr
import torch

import train
from conftest import ROOT
from data import read_file_list_entries
from test_train import write_config

RATE = 22050
SPEAKERS = {"a": 1.0, "b": 1.25, "c": 0.8}  # name -> pitch factor
UTTERANCES = 3

spec = importlib.util.spec_from_file_location("prepare_corpus", os.path.join(ROOT, "scripts", "prepare_corpus.py"))
assert spec is not None and spec.loader is not None
prepare_corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_corpus)


def voice(speaker, utterance, rate):
    """0.7 s of demo clip `utterance`, spoken by `speaker` (a pitch), at `rate`."""
    audio, demo_rate = soundfile.read(os.path.join(ROOT, "data", "demo", "wavs", f"demo_{utterance:03d}.wav"))
    audio = audio[int(0.2 * demo_rate) : int(0.9 * demo_rate)].astype(np.float32)
    return soxr.resample(audio, demo_rate * SPEAKERS[speaker], rate, quality="VHQ")


def make_vctk(folder, version):
    """VCTK 0.92 (flac, two microphones, wav48_silence_trimmed/) or 0.80 (wav, wav48/); one text missing."""
    names = {name: f"p{225 + index}" for index, name in enumerate(SPEAKERS)}
    for speaker, vctk_name in names.items():
        audio_folder = folder / ("wav48_silence_trimmed" if version == "0.92" else "wav48") / vctk_name
        audio_folder.mkdir(parents=True)
        (folder / "txt" / vctk_name).mkdir(parents=True)
        for utterance in range(1, UTTERANCES + 1):
            clip = f"{vctk_name}_{utterance:03d}"
            audio = voice(speaker, utterance, 48000)
            if version == "0.92":
                for mic in ("mic1", "mic2"):
                    soundfile.write(str(audio_folder / f"{clip}_{mic}.flac"), audio, 48000, subtype="PCM_16")
            else:
                soundfile.write(str(audio_folder / f"{clip}.wav"), audio, 48000, subtype="PCM_16")
            if clip != "p227_003":
                (folder / "txt" / vctk_name / f"{clip}.txt").write_text(f"Sentence {utterance} of {vctk_name}.\n")
    return sorted(names.values())


def make_libritts(folder):
    """LibriTTS: SPEAKER/CHAPTER/SPEAKER_CHAPTER_x_y.wav at 24 kHz with .normalized.txt, below a subset folder."""
    names = {name: str(19 + 7 * index) for index, name in enumerate(SPEAKERS)}
    for speaker, number in names.items():
        chapter = folder / "train-clean-100" / number / "198"
        chapter.mkdir(parents=True)
        for utterance in range(1, UTTERANCES + 1):
            clip = f"{number}_198_000000_{utterance:06d}"
            soundfile.write(str(chapter / f"{clip}.wav"), voice(speaker, utterance, 24000), 24000, subtype="PCM_16")
            (chapter / f"{clip}.normalized.txt").write_text(f"Sentence {utterance} | of {number}.")
            (chapter / f"{clip}.original.txt").write_text("not this one")
    return sorted(names.values())


def make(layout, folder):
    corpus = folder / "corpus"
    speakers = make_libritts(corpus) if layout == "libritts" else make_vctk(corpus, layout.split("-")[1])
    return corpus, speakers


def prepare(tmp_path, corpus):
    base = write_config(str(tmp_path), "base.json", train_config__iters_per_checkpoint=2)
    output = tmp_path / "lists"
    args = ["--corpus", str(corpus), "--output-dir", str(output), "--config", base]
    assert prepare_corpus.main([*args, "--test-speakers", "1", "--test-utterances", "1"]) == 0
    return output


@pytest.mark.parametrize("layout", ["vctk-0.92", "vctk-0.80", "libritts"])
def test_lists_hold_out_utterances_and_speakers_and_name_each_speaker(tmp_path, capsys, layout):
    corpus, speakers = make(layout, tmp_path)
    output = prepare(tmp_path, corpus)
    out = capsys.readouterr().out
    assert f"9 clips of 3 speakers at {24000 if layout == 'libritts' else 48000} Hz" in out
    lists = {name: read_file_list_entries(str(output / f"{name}.txt")) for name in ("train_files", "test_files")}
    lists["unseen"] = read_file_list_entries(str(output / "test_unseen_speakers.txt"))
    assert [len(entries) for entries in lists.values()] == [4, 2, 1]
    held_out = {speaker for _, speaker in lists["unseen"]}
    assert len(held_out) == 1 and held_out < set(speakers)
    assert {speaker for _, speaker in lists["train_files"]} == {speaker for _, speaker in lists["test_files"]}
    assert {speaker for _, speaker in lists["train_files"]} == set(speakers) - held_out
    paths = [path for entries in lists.values() for path, _ in entries]
    assert len(set(paths)) == len(paths)  # no clip in two lists
    for path, speaker in (entry for entries in lists.values() for entry in entries):
        assert speaker is not None and os.path.basename(path).startswith(speaker + "_") and "mic2" not in path
    text = (output / "train_files.txt").read_text().splitlines()
    assert text[0] == "# path|speaker|text" and not text[1].startswith("/")  # paths relative to the list
    if layout == "libritts":
        assert text[1].split("|")[2].startswith("Sentence ") and "|of" not in text[1]  # the `|` of a text is a space
    config = json.load(open(output / "config.json"))
    unseen = json.load(open(output / "config_unseen_speakers.json"))
    assert config["data_config"]["resample"] is True and config["data_config"]["sampling_rate"] == RATE
    assert config["data_config"]["test_files"] == str(output / "test_files.txt")
    assert unseen["data_config"]["test_files"] == str(output / "test_unseen_speakers.txt")
    assert {**unseen["data_config"], "test_files": None} == {**config["data_config"], "test_files": None}
    assert config["waveflow_config"]["model_name"] == "tiny-corpus"
    # The same seed gives the same lists.
    before = (output / "train_files.txt").read_text()
    prepare(tmp_path, corpus)
    assert (output / "train_files.txt").read_text() == before


def test_a_folder_of_another_layout_or_too_few_speakers_is_refused_in_one_line(tmp_path, capsys):
    base = write_config(str(tmp_path), "base.json")
    (tmp_path / "empty").mkdir()
    assert (
        prepare_corpus.main(["--corpus", str(tmp_path / "empty"), "--output-dir", str(tmp_path), "--config", base]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'empty'}: no clips found") and "\n" not in err
    corpus, _ = make("vctk-0.80", tmp_path)
    output = tmp_path / "lists"
    assert prepare_corpus.main(["--corpus", str(corpus), "--output-dir", str(output), "--config", base]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: the corpus has 3 speakers, too few to hold out 4 (--test-speakers)"
    )
    assert not output.exists()


@pytest.mark.parametrize("layout", ["vctk-0.80", "libritts"])
def test_clips_named_in_upper_case_or_converted_to_stereo_flac_are_found(tmp_path, capsys, layout):
    """A corpus as people pass it around: one speaker's clips named `.WAV`, another's converted to flac in
    stereo; with the base config's downmix on, every clip of every speaker is in the lists."""
    corpus, speakers = make(layout, tmp_path)
    clips = sorted(path for path in corpus.rglob("*") if path.suffix == ".wav")
    for path in clips:
        speaker = path.name.split("_")[0]
        if speaker == speakers[0]:
            path.rename(path.with_suffix(".WAV"))
        elif speaker == speakers[1]:
            audio, rate = soundfile.read(str(path), dtype="int16")
            soundfile.write(str(path.with_suffix(".flac")), np.stack([audio, audio], axis=1), rate)
            path.unlink()
    base = write_config(str(tmp_path), "base.json", data_config__downmix=True)
    output = tmp_path / "lists"
    args = ["--corpus", str(corpus), "--output-dir", str(output), "--config", base, "--test-speakers", "1"]
    assert prepare_corpus.main([*args, "--test-utterances", "1"]) == 0, capsys.readouterr().err
    assert "9 clips of 3 speakers" in capsys.readouterr().out
    assert json.load(open(output / "config.json"))["data_config"]["downmix"] is True


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["vctk-0.92", "libritts"])
def test_a_prepared_corpus_trains_and_v_gives_a_table_per_speaker(tmp_path, capsys, layout):
    corpus, _ = make(layout, tmp_path)
    output = prepare(tmp_path, corpus)
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = str(output / "config.json")
        assert train.main(["-c", config, "--max_iterations", "2"]) == 0
        checkpoint = str(tmp_path / "exp" / "tiny-corpus" / "waveflow_2")
        assert os.path.isfile(checkpoint)
        capsys.readouterr()
        status = train.main(["-v", "-c", config, "--checkpoint_path", checkpoint, "--json", str(tmp_path / "v.json")])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert status == 0, err
    speakers = [speaker for _, speaker in read_file_list_entries(str(output / "test_files.txt"))]
    table = out[out.index("per speaker:") :].splitlines()
    assert table[1].split()[:2] == ["speaker", "clips"] and "log-mel L1" in table[1]
    assert [line.split()[0] for line in table[2 : 2 + len(speakers)]] == speakers
    assert all(line.split()[1] == "1" for line in table[2 : 2 + len(speakers)])
    document = json.load(open(tmp_path / "v.json"))
    assert list(document["speakers"]) == speakers
    for speaker, clip in zip(speakers, document["clips"], strict=True):
        assert clip["speaker"] == speaker
        assert document["speakers"][speaker]["log_mel_l1"] == pytest.approx(clip["log_mel_l1"])
