"""Paths that used to run and answer wrongly without a word: each test here failed before its fix."""

from __future__ import annotations

import shutil
import warnings

import pytest
import soundfile
import torch
from typer.testing import CliRunner

from audiokv_cli.io.audio import SAMPLE_RATE, TruncatedAudioWarning, load_audio
from audiokv_cli.cli import app
from audiokv_cli.compression.methods import build_policy
from audiokv_cli.errors import AudiokvError
from audiokv_cli.runtime.inference import run_clip
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.profiling.profile_file import HeadProfile, ProfileError, load_head_scores, save_profile
from audiokv_cli.profiling.statistics import HeadStatistics
from audiokv_cli.testing.families import build_random_whisper
from tests.adapter_checks import noise_clip, options

runner = CliRunner()


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return build_random_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="module")
def whisper(whisper_dir):
    return load_adapter(str(whisper_dir), device="cpu", dtype="float32")


# 1. A cross-attention cache holds no text: scope audio there is scope all, and the retention holds.
def test_scope_audio_on_cross_attention_keeps_the_target_share(whisper):
    run_options = options(whisper)
    run_options.scope = "audio"
    result = run_clip(whisper, noise_clip(5.0), build_policy("snapkv", 0.2, run_options), max_new_tokens=2)
    # Before: the 1,250 padding frames were forced as if they were text, 87 % of the cache kept.
    assert result.kept_ratio <= 0.21
    assert result.scope == "all"


# 2. StreamingLLM's "recent" entries on a cross-attention cache are the end of the speech, not the padding.
def test_streamingllm_recency_on_cross_attention_is_the_audio(whisper):
    result = run_clip(whisper, noise_clip(10.0), build_policy("streamingllm", 0.2, options(whisper)), max_new_tokens=2)
    summary = result.kept_per_head
    for kept, audio_kept in zip(summary["kept"], summary["audio_kept"]):
        assert kept == audio_kept  # 300 frames kept per head, all within the clip's 500 (before: 4 sinks only)


# 3. eval --resume refuses a journal made with another head profile, and takes the same file under a new name.
def test_eval_journal_is_keyed_by_the_profile_bytes(random_adapter, tmp_path):
    from audiokv_cli.commands.evaluate import _journal
    from audiokv_cli.compression.methods import MethodOptions, resolve_method
    from audiokv_cli.parallel.ranks import current_ranks
    from audiokv_cli.evaluation.sweep import plan_cells

    run_options = MethodOptions(head_scores=torch.ones(2, 4))
    cells = plan_cells([resolve_method("audiokv")], [0.5], ["all"], run_options)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"profile one")
    second.write_bytes(b"profile two")
    renamed = tmp_path / "same-as-a.safetensors"
    shutil.copy(first, renamed)

    def journal(profile):
        return _journal(tmp_path / "out", random_adapter, tmp_path / "data", cells, 8, run_options, current_ranks(), profile)

    journal(first).append({"clip": "c", "method": "audiokv", "retention": 0.5, "scope": "all"})
    assert len(journal(renamed).read()) == 1
    with pytest.raises(AudiokvError, match="head profile"):
        journal(second).read()


# 4. bench --prompt-tokens on an encoder-decoder is refused: filler text is not the cache being compressed.
def test_prompt_tokens_refused_on_cross_attention(whisper):
    from audiokv_cli.bench.model import prompt_of

    with pytest.raises(AudiokvError, match="--prompt-tokens is for decoder-only models.*--seconds"):
        prompt_of(whisper, 40)


# 5. A profile measured on another checkpoint of the same architecture is refused unless asked for; the same
# weights under another path match.
def _profile_for(adapter) -> HeadProfile:
    geometry = adapter.geometry
    stats = HeadStatistics.zeros(geometry.num_layers, geometry.num_query_heads, 4)
    stats.add_step(torch.randint(0, 20, (geometry.num_layers, geometry.num_query_heads, 4)),
                   torch.rand(geometry.num_layers, geometry.num_query_heads), (0, 50))
    provenance = {"statistic": "topk_hits", "aligner": "manifest", "top_k": 4, "min_confidence": 0.95,
                  "decoding": "greedy", "clips": 1, "scored_steps": 1, "data": [], "data_digest": ""}
    return HeadProfile(stats, adapter.fingerprint(), provenance)


def test_profile_from_another_checkpoint_is_refused(whisper, whisper_dir, tmp_path):
    path = save_profile(_profile_for(whisper), tmp_path / "p")
    other = load_adapter(str(build_random_whisper(tmp_path / "other", seed=1)), device="cpu", dtype="float32")
    with pytest.raises(ProfileError, match="another checkpoint.*--allow-profile-mismatch") as caught:
        load_head_scores(path, other)
    assert "\n" not in str(caught.value)
    assert load_head_scores(path, other, allow_mismatch=True).shape == (2, 4)
    # The same weights copied elsewhere, and loaded in another dtype, are the same checkpoint.
    copy = shutil.copytree(whisper_dir, tmp_path / "copy")
    assert load_head_scores(path, load_adapter(str(copy), device="cpu", dtype="bfloat16")).shape == (2, 4)


def test_allow_profile_mismatch_is_a_cli_option(whisper, whisper_dir, tmp_path):
    path = save_profile(_profile_for(whisper), tmp_path / "p")
    other = build_random_whisper(tmp_path / "other", seed=1)
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, noise_clip(2.0), SAMPLE_RATE)
    base = ["infer", str(clip), "--model", str(other), "--method", "audiokv", "--retention", "0.5",
            "--profile", str(path), "--max-new-tokens", "2", "--device", "cpu"]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 1 and "--allow-profile-mismatch" in refused.output
    assert "Traceback" not in refused.output
    allowed = runner.invoke(app, base + ["--allow-profile-mismatch"])
    assert allowed.exit_code == 0, allowed.output


# 6. Options a method does not use get a one-line warning; defaults do not.
def test_unused_retention_and_profile_warn(random_model_dir, tone_wav, tmp_path):
    common = ["infer", str(tone_wav), "--model", str(random_model_dir), "--max-new-tokens", "2", "--device", "cpu"]
    full = runner.invoke(app, common + ["--method", "full", "--retention", "0.4"])
    assert full.exit_code == 0 and "warning: --method full keeps every entry; --retention 0.4 is ignored" in full.output
    profile = tmp_path / "unused.safetensors"
    snap = runner.invoke(app, common + ["--method", "snapkv", "--retention", "0.5", "--profile", str(profile)])
    assert snap.exit_code == 0 and "takes no head profile" in snap.output
    plain = runner.invoke(app, common + ["--method", "full"])
    assert plain.exit_code == 0 and "warning" not in plain.output


# 7. bench --seconds is honoured with --prompt-tokens, 30 included (it used to be the default's sentinel).
def test_bench_seconds_reaches_the_prompt(monkeypatch, random_model_dir):
    import audiokv_cli.bench.model as benchmark

    seen = []
    real = benchmark.prompt_of

    def spy(adapter, tokens, max_seconds=None):
        seen.append(max_seconds)
        return real(adapter, tokens, max_seconds)

    monkeypatch.setattr(benchmark, "prompt_of", spy)
    args = ["bench", "--model", str(random_model_dir), "--methods", "full", "--prompt-tokens", "60", "--new-tokens", "2",
            "--repeats", "1", "--device", "cpu", "--json"]
    for seconds in ("30", "1"):
        result = runner.invoke(app, args + ["--seconds", seconds])
        assert result.exit_code == 0, result.output
    assert seen == [30.0, 1.0]


# 8. Greedy decoding of a batch reads every row, or refuses.
def test_decode_greedy_refuses_a_batch(random_adapter):
    from audiokv_cli.runtime.decoding import decode_greedy

    # Before: two rows in, row 0's tokens out, and the caller none the wiser.
    with pytest.raises(ValueError, match="one row, got 2: use decode_greedy_rows"):
        decode_greedy(random_adapter, None, torch.zeros(2, 10), 4)


# 9. A truncated recording gets a one-line warning with the seconds read and promised.
def _truncated_wav(tmp_path):
    path = tmp_path / "whole.wav"
    soundfile.write(path, noise_clip(4.0), SAMPLE_RATE, subtype="PCM_16")
    data = path.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    return path, cut


def test_truncated_file_warns(tmp_path):
    whole, cut = _truncated_wav(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_audio(whole)
    assert not [w for w in caught if issubclass(w.category, TruncatedAudioWarning)]
    with pytest.warns(TruncatedAudioWarning, match=r"2\.0 s of audio read, its header promises 4\.0 s"):
        load_audio(cut)


def test_truncated_file_warns_on_the_command_line(tmp_path, whisper_dir):
    _, cut = _truncated_wav(tmp_path)
    for extra in ([], ["--format", "txt"]):  # one clip, and the streamed long-form reader
        result = runner.invoke(app, ["infer", str(cut), "--model", str(whisper_dir), "--max-new-tokens", "2",
                                     "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        lines = [line for line in result.output.splitlines() if "truncated" in line]
        assert lines == [f"warning: {cut}: truncated file: 2.0 s of audio read, its header promises 4.0 s"]
