import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiokv_cli.errors import AudiokvError
from audiokv_cli.evaluation.datasets import (
    DatasetError,
    Example,
    detect_layout,
    load_dataset,
    read_librispeech,
    read_manifest,
    read_paired_directory,
)


def write_audio(path: Path, seconds: float = 0.05) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.zeros(int(16000 * seconds), dtype=np.float32)
    soundfile.write(str(path), samples, 16000)
    return path


def write_manifest(path: Path, entries) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [entry if isinstance(entry, str) else json.dumps(entry, ensure_ascii=False) for entry in entries]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert isinstance(excinfo.value, AudiokvError)
    return message


# ------------------------------------------------------------------------------------------------------ manifest


def test_manifest_relative_and_absolute_paths(tmp_path):
    write_audio(tmp_path / "data" / "clips" / "b.wav")
    absolute = write_audio(tmp_path / "elsewhere" / "a.flac")
    manifest = write_manifest(
        tmp_path / "data" / "eval.jsonl",
        [
            {"audio": "clips/b.wav", "text": "second", "lang": "fr", "words": [["second", 0.0, 0.4, 0.99]]},
            "",
            {"audio": str(absolute), "text": "first", "id": "utt-1"},
        ],
    )
    examples = load_dataset(manifest)
    # file order is kept: the manifest's author chose it
    assert examples == [
        Example("clips/b", tmp_path / "data" / "clips" / "b.wav", "second", "fr"),
        Example("utt-1", absolute, "first", "en"),
    ]
    assert examples[0].extra == {"words": [["second", 0.0, 0.4, 0.99]]}
    assert examples[1].extra == {}


def test_directory_with_manifest_jsonl(tmp_path):
    write_audio(tmp_path / "x.wav")
    write_manifest(tmp_path / "manifest.jsonl", [{"audio": "x.wav", "text": "hello"}])
    assert detect_layout(tmp_path) == "manifest"
    assert [example.id for example in load_dataset(tmp_path)] == ["x"]


def test_malformed_manifest_line_names_the_line(tmp_path):
    write_audio(tmp_path / "x.wav")
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"audio": "x.wav", "text": "ok"}, "", '{"audio": "x.wav", "text": oops}']
    )
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(manifest)
    assert f"{manifest}:3: malformed JSON" in one_line_error(excinfo)


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ('["x.wav", "text"]', "expected a JSON object"),
        ({"text": "no audio"}, '"audio"'),
        ({"audio": "x.wav"}, '"text"'),
        ({"audio": "x.wav", "text": "t", "lang": 3}, '"lang"'),
    ],
)
def test_manifest_field_errors(tmp_path, entry, complaint):
    write_audio(tmp_path / "x.wav")
    manifest = write_manifest(tmp_path / "m.jsonl", [entry])
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(manifest)
    message = one_line_error(excinfo)
    assert f"{manifest}:1:" in message and complaint in message


def test_manifest_missing_audio(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "gone.wav", "text": "t"}])
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(manifest)
    message = one_line_error(excinfo)
    assert f"{manifest}:1:" in message and str(tmp_path / "gone.wav") in message and "does not exist" in message


def test_manifest_duplicate_ids(tmp_path):
    write_audio(tmp_path / "x.wav")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio": "x.wav", "text": "a"}, {"audio": "x.wav", "text": "b"}])
    with pytest.raises(DatasetError, match="duplicate id"):
        load_dataset(manifest)


def test_manifest_not_utf8(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"audio": "x.wav", "text": "\xff\xfe"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        list(read_manifest(manifest))


# --------------------------------------------------------------------------------------------------- LibriSpeech


def make_librispeech(root: Path) -> Path:
    split = root / "LibriSpeech" / "test-clean"
    chapters = {
        ("61", "70968"): ["61-70968-0000 HE BEGAN A CONFUSED COMPLAINT", "61-70968-0001 GIVE NOT SO EARNEST A MIND"],
        ("1089", "134686"): ["1089-134686-0000 HE HOPED THERE WOULD BE STEW FOR DINNER"],
    }
    for (speaker, chapter), lines in chapters.items():
        directory = split / speaker / chapter
        for line in lines:
            write_audio(directory / f"{line.split()[0]}.flac")
        (directory / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return split


def test_librispeech_layout(tmp_path):
    split = make_librispeech(tmp_path)
    assert detect_layout(tmp_path) == "librispeech"
    examples = load_dataset(tmp_path)
    # sorted by transcript path: "1089" sorts before "61"
    assert [example.id for example in examples] == ["1089-134686-0000", "61-70968-0000", "61-70968-0001"]
    assert examples[1].text == "HE BEGAN A CONFUSED COMPLAINT"
    assert examples[1].audio_path == split / "61" / "70968" / "61-70968-0000.flac"
    assert {example.lang for example in examples} == {"en"}
    assert [example.id for example in load_dataset(split, limit=2)] == ["1089-134686-0000", "61-70968-0000"]


def test_librispeech_missing_flac(tmp_path):
    split = make_librispeech(tmp_path)
    (split / "61" / "70968" / "61-70968-0001.flac").unlink()
    with pytest.raises(DatasetError) as excinfo:
        list(read_librispeech(tmp_path))
    message = one_line_error(excinfo)
    assert "61-70968.trans.txt:2:" in message and "61-70968-0001.flac does not exist" in message


# ----------------------------------------------------------------------------------------- audio + .txt directory


def test_paired_directory(tmp_path):
    write_audio(tmp_path / "b.wav")
    (tmp_path / "b.txt").write_text("second clip\n", encoding="utf-8")
    write_audio(tmp_path / "a" / "z.flac")
    (tmp_path / "a" / "z.txt").write_text("first\n  clip ", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert detect_layout(tmp_path) == "paired"
    examples = load_dataset(tmp_path, default_lang="de")
    assert examples == [
        Example("a/z", tmp_path / "a" / "z.flac", "first clip", "de"),
        Example("b", tmp_path / "b.wav", "second clip", "de"),
    ]
    assert list(read_paired_directory(tmp_path, "de")) == examples


def test_paired_directory_audio_without_transcript(tmp_path):
    write_audio(tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    write_audio(tmp_path / "b.wav")
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(tmp_path)
    assert "b.wav: no transcript" in one_line_error(excinfo)


# ----------------------------------------------------------------------------------------------- load_dataset


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(tmp_path / "nowhere")
    assert "no such file or directory" in one_line_error(excinfo)


def test_empty_manifest_is_an_empty_dataset(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(manifest)
    assert "empty" in one_line_error(excinfo)


def test_directory_without_dataset(tmp_path):
    write_audio(tmp_path / "lonely.wav")  # no transcript anywhere: not a recognizable layout
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(tmp_path)
    assert "no data set found" in one_line_error(excinfo)


def test_non_manifest_file(tmp_path):
    other = tmp_path / "list.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="not a data set"):
        load_dataset(other)


def test_limit(tmp_path):
    for index in range(5):
        write_audio(tmp_path / f"{index}.wav")
    write_manifest(tmp_path / "m.jsonl", [{"audio": f"{i}.wav", "text": str(i)} for i in range(5)])
    assert [example.text for example in load_dataset(tmp_path / "m.jsonl", limit=3)] == ["0", "1", "2"]
    assert len(load_dataset(tmp_path / "m.jsonl", limit=50)) == 5
    with pytest.raises(DatasetError, match="limit"):
        load_dataset(tmp_path / "m.jsonl", limit=0)
