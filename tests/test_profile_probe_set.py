"""Probe clips synthesized word by word: exact timings by construction, clean failure without espeak-ng."""

import json
import shutil

import numpy as np
import pytest
import soundfile

from audiokv_cli.errors import AudiokvError
from audiokv_cli.profiling import probe_set
from audiokv_cli.profiling.alignment import read_data
from audiokv_cli.profiling.probe_set import ProbeOptions, build_probe_set

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@needs_espeak
def test_probe_set_word_times_are_exact(tmp_path):
    options = ProbeOptions(n=2, min_words=2, max_words=3, voices=("en-us", "en-gb"), seed=3)
    clips = build_probe_set(tmp_path / "probes", options)
    assert [c.clip_id for c in clips] == ["probe-3-00000", "probe-3-00001"]
    again = read_data(tmp_path / "probes")
    assert [(c.clip_id, c.text, c.words) for c in again] == [(c.clip_id, c.text, c.words) for c in clips]
    for clip in clips:
        audio, rate = soundfile.read(str(clip.audio_path), dtype="float32", always_2d=True)
        assert rate == 16000 and audio.shape[1] == 1
        audio = audio[:, 0]
        assert clip.text == " ".join(w.word for w in clip.words)
        assert 2 <= len(clip.words) <= 3
        edges = [0] + [round(t * 16000) for w in clip.words for t in (w.start, w.end)] + [len(audio)]
        for index in range(0, len(edges), 2):  # lead-in, gaps, tail: silence by construction
            assert np.abs(audio[edges[index] : edges[index + 1]]).max(initial=0.0) < 2e-4
        for word in clip.words:
            spoken = audio[round(word.start * 16000) : round(word.end * 16000)]
            assert word.confidence == 1.0 and len(spoken) > 800  # > 50 ms of speech
            assert np.abs(spoken[:160]).max() > 1e-3 and np.abs(spoken[-160:]).max() > 1e-3  # trimmed tight
    line = json.loads((tmp_path / "probes" / "manifest.jsonl").read_text().splitlines()[0])
    assert line["audio"] == "probe-3-00000.wav" and line["words"][0]["confidence"] == 1.0
    with pytest.raises(AudiokvError, match="already holds a probe set"):
        build_probe_set(tmp_path / "probes", options)


def test_missing_espeak_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(probe_set.shutil, "which", lambda name: None)
    with pytest.raises(AudiokvError, match="espeak-ng is not installed") as caught:
        build_probe_set(tmp_path / "p", ProbeOptions(n=1))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "p").exists()


def test_text_sources_must_hold_english_words(tmp_path):
    source = tmp_path / "few.txt"
    source.write_text("only a few words here")
    with pytest.raises(AudiokvError, match="too few English words"):
        probe_set.text_words([source])
