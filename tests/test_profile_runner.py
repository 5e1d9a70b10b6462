"""Capture and the profiling loop on a tiny random Qwen2-Audio: correctness against eager attention, every aligner
path, merge exactness, resume equivalence."""

import json

import numpy as np
import pytest
import soundfile
import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.profiling.alignment import (
    Clip,
    ManifestAligner,
    NoAligner,
    WordTiming,
    make_aligner,
    read_data,
    write_manifest,
)
from audiokv_cli.profiling.capture import AttentionRecorder
from audiokv_cli.profiling.profile_file import load_profile, partial_paths, profile_paths
from audiokv_cli.profiling.runner import ProfileSettings, _decode_with_capture, profile_clip, run_profile
from audiokv_cli.profiling.statistics import text_words

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Five 1-1.6 s clips with made-up word timings (the statistic needs times, not intelligible speech)."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    clips = []
    for index in range(5):
        seconds = 1.0 + 0.15 * index
        t = np.arange(int(seconds * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (150 + 40 * index) * t) + 0.02 * rng.standard_normal(t.shape)
        path = folder / f"clip{index}.wav"
        soundfile.write(str(path), audio.astype(np.float32), 16000)
        chosen = [WORDS[(index + k) % len(WORDS)] for k in range(3)]
        words = [WordTiming(w, 0.1 + 0.3 * k, 0.35 + 0.3 * k, 1.0 if k != 1 else 0.5) for k, w in enumerate(chosen)]
        clips.append(Clip(f"clip{index}", path, " ".join(chosen), words))
    write_manifest(folder / "manifest.jsonl", clips, relative_to=folder)
    return folder


FORCED = ProfileSettings(aligner="manifest", top_k=4, max_new_tokens=12, teacher_forcing=True)


def test_capture_matches_eager_attention_and_leaves_decoding_unchanged(random_adapter, random_model_dir):
    from transformers import Qwen2AudioForConditionalGeneration

    from transformers import DynamicCache

    from audiokv_cli.runtime.decoding import greedy_generate

    t = np.arange(16000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    prepared = random_adapter.prepare(audio)
    top_k = 5
    recorder = AttentionRecorder(random_adapter.geometry.num_layers, top_k, prepared.audio_spans)
    tokens, records = _decode_with_capture(random_adapter, prepared, recorder, 6, None)
    plain = greedy_generate(random_adapter, prepared.inputs, DynamicCache(), 6)
    assert tokens == plain.token_ids[:6]  # the handler does not change what the model says

    eager = Qwen2AudioForConditionalGeneration.from_pretrained(random_model_dir, attn_implementation="eager").eval()
    ids = torch.cat([prepared.input_ids, torch.tensor([tokens[:-1]])], dim=1)
    inputs = dict(prepared.inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    start, end = prepared.audio_spans[0]
    prompt = prepared.input_ids.shape[1]
    for step, (topk, mass) in enumerate(records):
        for layer, weights in enumerate(attentions):
            row = weights[0, :, prompt - 1 + step, : prompt + step]  # the row whose logits chose token `step`
            assert torch.allclose(mass[layer], row[:, start:end].sum(-1), atol=1e-5)
            expected = row.topk(top_k, dim=-1).indices.sort(dim=-1).values
            assert torch.equal(topk[layer].long().sort(dim=-1).values, expected)


def test_manifest_aligner_with_teacher_forcing_scores_confident_words(random_adapter, clip_dir, tmp_path):
    clips = read_data(clip_dir)
    profile = run_profile(random_adapter, clips, ManifestAligner(), FORCED, tmp_path / "p")
    p = profile.provenance
    assert p["clips"] == 5 and p["words"] == 10  # the 0.5-confidence middle word of each clip is dropped
    assert p["decode_steps"] == 5 * 12 and 0 < p["scored_steps"] < p["decode_steps"]
    assert profile.stats.steps.eq(p["scored_steps"]).all()
    assert (profile.score >= 0).all() and (profile.score <= 1).all() and profile.score.sum() > 0
    loaded = load_profile(tmp_path / "p.safetensors", expect_fingerprint=random_adapter.fingerprint())
    assert torch.equal(loaded.score, profile.score)
    assert not partial_paths(tmp_path / "p")[0].exists()


def test_greedy_decoding_aligns_to_a_transcript_of_what_the_model_said(random_adapter, clip_dir):
    audio = soundfile.read(str(clip_dir / "clip0.wav"), dtype="float32")[0]
    settings = ProfileSettings(aligner="manifest", top_k=4, max_new_tokens=16)
    _, free = profile_clip(random_adapter, audio, None, ProfileSettings(aligner="none", top_k=4, max_new_tokens=16))
    decoded = text_words(free.text)
    if not decoded:
        pytest.skip("the random model produced no word-like text")
    words = [WordTiming(w, 0.05 * k, 0.05 * k + 0.1, 1.0) for k, (w, _, _) in enumerate(decoded)]
    stats, outcome = profile_clip(random_adapter, audio, words, settings)
    assert outcome.text == free.text
    assert outcome.words_aligned == len(words)
    # Character tokenizer: every letter or digit of a word is one word-aligned step; spaces and punctuation are not.
    assert outcome.scored_steps == sum(ch.isalnum() for ch in free.text)
    assert stats.steps.eq(outcome.scored_steps).all()


def test_aligner_none_scores_audio_mass_and_says_so(random_adapter, clip_dir, tmp_path):
    clips = read_data(clip_dir)[:2]
    settings = ProfileSettings(aligner="none", top_k=4, max_new_tokens=8)
    profile = run_profile(random_adapter, clips, NoAligner(), settings, tmp_path / "none")
    meta = json.loads(profile_paths(tmp_path / "none")[1].read_text())
    assert meta["provenance"]["aligner"] == "none" and meta["provenance"]["statistic"] == "audio_mass"
    assert torch.allclose(profile.score, profile.stats.audio_mass / profile.stats.steps)
    assert ((profile.score > 0) & (profile.score < 1)).all()


def test_merged_shards_equal_one_run_bit_for_bit(random_adapter, clip_dir, tmp_path):
    from audiokv_cli.profiling.profile_file import merge_profiles, save_profile

    clips = read_data(clip_dir)
    whole = run_profile(random_adapter, clips, ManifestAligner(), FORCED, tmp_path / "all")
    first = run_profile(random_adapter, clips[:2], ManifestAligner(), FORCED, tmp_path / "a")
    second = run_profile(random_adapter, clips[2:], ManifestAligner(), FORCED, tmp_path / "b")
    save_profile(merge_profiles([load_profile(tmp_path / "a.safetensors"), load_profile(tmp_path / "b.safetensors")]), tmp_path / "m")
    merged = load_profile(tmp_path / "m.safetensors")
    for name, tensor in whole.tensors().items():
        assert torch.equal(merged.tensors()[name], tensor), name
    for key in ("clips", "words", "words_aligned", "scored_steps", "decode_steps", "data", "data_digest"):
        assert merged.provenance[key] == whole.provenance[key], key
    assert first.provenance["clips"] + second.provenance["clips"] == 5


def test_interrupted_run_resumes_to_the_same_profile(random_adapter, clip_dir, tmp_path):
    clips = read_data(clip_dir)
    reference = run_profile(random_adapter, clips, ManifestAligner(), FORCED, tmp_path / "ref")

    class Killed(Exception):
        pass

    def die_after_third(index, clip, outcome):
        if index == 2:
            raise Killed()

    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_profile(random_adapter, clips, ManifestAligner(), FORCED, out, checkpoint_every=2, after_clip=die_after_third)
    partial = partial_paths(out)[0]
    assert partial.exists() and not profile_paths(out)[0].exists()
    assert load_profile(partial).provenance["clips"] == 3  # the clip that finished before the crash is kept

    with pytest.raises(AudiokvError, match="different settings"):
        run_profile(random_adapter, clips, ManifestAligner(), ProfileSettings(**{**FORCED.__dict__, "top_k": 5}), out)
    seen = []
    resumed = run_profile(random_adapter, clips, ManifestAligner(), FORCED, out, after_clip=lambda i, c, o: seen.append(i))
    assert seen == [3, 4]  # only the unfinished clips ran
    for name, tensor in reference.tensors().items():
        assert torch.equal(resumed.tensors()[name], tensor), name
    assert resumed.provenance["data_digest"] == reference.provenance["data_digest"]
    assert not partial.exists() and not partial_paths(out)[1].exists()


def test_resume_refuses_changed_data(random_adapter, clip_dir, tmp_path):
    clips = read_data(clip_dir)
    out = tmp_path / "run"

    def stop(index, clip, outcome):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_profile(random_adapter, clips, ManifestAligner(), FORCED, out, after_clip=stop)
    with pytest.raises(AudiokvError, match="data changed"):
        run_profile(random_adapter, clips[1:], ManifestAligner(), FORCED, out)


def test_manifest_without_words_needs_another_aligner(random_adapter, tmp_path, clip_dir):
    bare = [Clip("x", clip_dir / "clip0.wav", "alpha")]
    with pytest.raises(AudiokvError, match="no 'words'"):
        run_profile(random_adapter, bare, ManifestAligner(), FORCED, tmp_path / "x")
    with pytest.raises(AudiokvError, match="unknown aligner"):
        make_aligner("wav2vec")


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory):
    from audiokv_cli.testing.aligner_whisper import build_aligner_whisper

    return build_aligner_whisper(tmp_path_factory.mktemp("aligner-whisper"))


def test_whisper_aligner_gives_well_formed_timings_and_profiles(random_adapter, tiny_whisper_dir, clip_dir, tmp_path):
    aligner = make_aligner(f"whisper:{tiny_whisper_dir}")
    aligner.max_new_tokens = 24
    assert aligner.name == f"whisper:{tiny_whisper_dir}"
    clips = read_data(clip_dir)[:2]
    for clip in clips:
        audio = soundfile.read(str(clip.audio_path), dtype="float32")[0]
        words = aligner.align(clip, audio)
        assert words, "the random Whisper emits some text"
        duration = len(audio) / 16000
        for word in words:
            assert word.word.strip() == word.word and word.word
            assert 0.0 <= word.start <= word.end <= duration + 1e-6
            assert 0.0 <= word.confidence <= 1.0
    settings = ProfileSettings(aligner=aligner.name, top_k=4, max_new_tokens=8, min_confidence=0.0)
    profile = run_profile(random_adapter, clips, aligner, settings, tmp_path / "w")
    assert profile.provenance["aligner"].startswith("whisper:") and profile.provenance["words"] > 0


def test_whisper_aligner_loads_local_files_only(tmp_path):
    with pytest.raises(AudiokvError, match="only local files"):
        make_aligner(f"whisper:{tmp_path / 'nowhere'}")


KILL_SCRIPT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from audiokv_cli.models import load_adapter
from audiokv_cli.profiling.alignment import ManifestAligner, read_data
from audiokv_cli.profiling.runner import ProfileSettings, run_profile

model, data, out = sys.argv[1:4]
adapter = load_adapter(model, device="cpu", dtype="float32")
settings = ProfileSettings(aligner="manifest", top_k=4, max_new_tokens=12, teacher_forcing=True)

def kill_after_third(index, clip, outcome):
    if index == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all: only periodic checkpoints survive

run_profile(adapter, read_data(data), ManifestAligner(), settings, out, checkpoint_every=2, after_clip=kill_after_third)
"""


def test_killed_run_resumes_from_its_last_checkpoint(random_adapter, random_model_dir, clip_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(random_model_dir), str(clip_dir), str(out)], env=env, capture_output=True
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    partial = partial_paths(out)[0]
    assert load_profile(partial).provenance["clips"] == 2  # the checkpoint after clip 2; clip 3 was lost
    clips = read_data(clip_dir)
    resumed = run_profile(random_adapter, clips, ManifestAligner(), FORCED, out)
    reference = run_profile(random_adapter, clips, ManifestAligner(), FORCED, tmp_path / "reference")
    for name, tensor in reference.tensors().items():
        assert torch.equal(resumed.tensors()[name], tensor), name
    assert not partial.exists()


def test_words_of_a_long_clip_land_in_their_own_segment(random_adapter, monkeypatch):
    """A 45 s clip is two audio items in the prompt; a word spoken at 40 s is scored against the second item's
    tokens, at 40 ms per token from the first item's start (the text between the items is skipped)."""
    from audiokv_cli.profiling.statistics import HeadStatistics

    spans = []
    monkeypatch.setattr(HeadStatistics, "add_step", lambda self, topk, mass, span: spans.append(span))
    audio = (np.random.default_rng(0).standard_normal(45 * 16000) * 0.1).astype(np.float32)
    words = [WordTiming("alpha", 1.0, 1.4, 1.0), WordTiming("bravo", 40.0, 40.4, 1.0)]
    settings = ProfileSettings(aligner="manifest", top_k=4, max_new_tokens=16, teacher_forcing=True)
    profile_clip(random_adapter, audio, words, settings, "long", "alpha bravo")
    prepared = random_adapter.prepare(audio)
    (first_start, first_end), (second_start, _) = prepared.audio_spans
    assert spans and spans[0] == (first_start + 25, first_start + 35)
    offset = 1000 - (first_end - first_start)  # token 1000 (40 s) counted across the items
    assert spans[-1] == (second_start + offset, second_start + offset + 10)
