"""The profile file: round trip, JSON twin, validation of damaged files, fingerprints, merge rules, discovery."""

import json
import logging
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from audiokv_cli.errors import AudiokvError
from audiokv_cli.profiling.alignment import data_digest
from audiokv_cli.profiling.profile_file import (
    HeadProfile,
    ProfileError,
    find_profile,
    load_head_scores,
    load_profile,
    merge_profiles,
    partial_paths,
    profile_paths,
    read_metadata,
    require_profile,
    save_profile,
)
from audiokv_cli.profiling.statistics import HeadStatistics

FINGERPRINT = {
    "model_type": "qwen2_audio",
    "name_or_path": "tiny",
    "revision": None,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "hidden_size": 64,
}


class FakeAdapter:
    def __init__(self, **changes):
        self.name = changes.get("name_or_path", FINGERPRINT["name_or_path"])
        self._fingerprint = {**FINGERPRINT, **changes}

    def fingerprint(self):
        return dict(self._fingerprint)


def make_profile(seed=0, clip_ids=("a", "b"), top_k=4, aligner="manifest", fingerprint=FINGERPRINT):
    torch.manual_seed(seed)
    stats = HeadStatistics.zeros(2, 4, top_k)
    for _ in range(5):
        stats.add_step(torch.randint(0, 20, (2, 4, top_k)), torch.rand(2, 4), (3, 9))
    data = [[c, "0" * 64] for c in clip_ids]
    provenance = {
        "statistic": "topk_hits",
        "aligner": aligner,
        "top_k": top_k,
        "min_confidence": 0.95,
        "decoding": "greedy",
        "clips": len(clip_ids),
        "words": 7,
        "words_aligned": 6,
        "scored_steps": 5,
        "decode_steps": 9,
        "data": data,
        "data_digest": data_digest([tuple(d) for d in data]),
    }
    return HeadProfile(stats, dict(fingerprint), provenance)


def test_round_trip_and_json_twin(tmp_path):
    profile = make_profile()
    path = save_profile(profile, tmp_path / "p")
    assert path == tmp_path / "p.safetensors" and (tmp_path / "p.json").is_file()
    loaded = load_profile(path, expect_fingerprint=FINGERPRINT)
    assert torch.equal(loaded.score, profile.score)
    assert torch.equal(loaded.stats.hit_counts, profile.stats.hit_counts)
    twin = json.loads((tmp_path / "p.json").read_text())
    assert twin["fingerprint"] == FINGERPRINT and twin["schema_version"] == 2
    assert torch.equal(torch.tensor(twin["score"], dtype=torch.float64), profile.score)
    # Readable with safetensors + json alone, as docs/profile-format.md shows.
    raw = load_file(str(path))
    assert set(raw) >= {"hits", "steps", "audio_mass", "score"} and raw["hits"].dtype == torch.float64
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    assert load_head_scores(path, FakeAdapter()).dtype == torch.float32


def test_fingerprint_mismatch_is_one_clear_error_and_another_checkpoint_needs_consent(tmp_path, caplog):
    path = save_profile(make_profile(), tmp_path / "p.safetensors")
    with pytest.raises(ProfileError, match=r"another model \(num_layers 2 != 3\)") as caught:
        load_profile(path, expect_fingerprint={**FINGERPRINT, "num_layers": 3})
    assert "\n" not in str(caught.value)
    with pytest.raises(AudiokvError, match="another model"):
        load_head_scores(path, FakeAdapter(num_kv_heads=4))
    # Without weight signatures (profiles from before them) the checkpoint is told by its name.
    with pytest.raises(ProfileError, match="another checkpoint .*--allow-profile-mismatch") as caught:
        load_profile(path, expect_fingerprint={**FINGERPRINT, "name_or_path": "other/name"})
    assert "\n" not in str(caught.value)
    with caplog.at_level(logging.WARNING):
        load_profile(path, expect_fingerprint={**FINGERPRINT, "name_or_path": "other/name"}, allow_mismatch=True)
    assert "other/name" in caplog.text


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 20])
    elif how == "header-cut":
        path.write_bytes(data[:30])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\x00\x01not a profile at all" * 10)
    elif how == "plain-safetensors":
        save_file({"hits": torch.zeros(2, 4, dtype=torch.float64)}, str(path))


@pytest.mark.parametrize("how", ["truncated", "header-cut", "empty", "garbage", "plain-safetensors"])
def test_damaged_files_are_rejected_with_one_line(tmp_path, how):
    path = save_profile(make_profile(), tmp_path / "p")
    _damage(path, how)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def _rewrite(path, tensors=None, meta_change=None):
    """Re-save a valid profile with edited tensors or metadata."""
    meta = read_metadata(path)
    data = load_file(str(path))
    if tensors:
        data.update(tensors)
        for name in [n for n, t in tensors.items() if t is None]:
            del data[name]
    if meta_change:
        meta_change(meta)
    save_file(data, str(path), metadata={"audiokv": json.dumps(meta)})


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"steps": None}, "lacks the 'steps' tensor"),
        ({"score": torch.zeros(3, 4, dtype=torch.float64)}, "tensor 'score' is (3, 4)"),
        ({"steps": torch.zeros(2, 4, dtype=torch.float32)}, "tensor 'steps'"),
        ({"score": torch.full((2, 4), 0.5, dtype=torch.float64)}, "does not match hits / steps"),
        ({"audio_mass": torch.full((2, 4), float("nan"), dtype=torch.float64)}, "NaN"),
    ],
)
def test_missing_or_wrong_tensors_are_rejected(tmp_path, edit, message):
    path = save_profile(make_profile(), tmp_path / "p")
    _rewrite(path, tensors=edit)
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_profile(path)


def test_unknown_schema_version_is_rejected(tmp_path):
    path = save_profile(make_profile(), tmp_path / "p")
    _rewrite(path, meta_change=lambda m: m.update(schema_version=99))
    with pytest.raises(ProfileError, match="schema version 99"):
        load_profile(path)


def test_merge_adds_statistics_and_combines_provenance():
    a, b = make_profile(0, ("a", "b")), make_profile(1, ("c",))
    merged = merge_profiles([a, b])
    assert torch.equal(merged.stats.hit_counts, a.stats.hit_counts + b.stats.hit_counts)
    assert torch.equal(merged.stats.steps, a.stats.steps + b.stats.steps)
    p = merged.provenance
    assert p["clips"] == 3 and p["scored_steps"] == 10 and p["words"] == 14
    assert p["data"] == [["a", "0" * 64], ["b", "0" * 64], ["c", "0" * 64]]
    assert p["data_digest"] == data_digest([("a", "0" * 64), ("b", "0" * 64), ("c", "0" * 64)])


@pytest.mark.parametrize(
    "other,message",
    [
        (make_profile(1, ("c",), top_k=8), "top_k"),
        (make_profile(1, ("c",), aligner="none"), "aligner"),
        (make_profile(1, ("c",), fingerprint={**FINGERPRINT, "num_kv_heads": 4}), "different model"),
        (make_profile(1, ("b",)), "already in another profile"),
    ],
)
def test_merge_refuses_incompatible_profiles(other, message):
    with pytest.raises(ProfileError, match=message):
        merge_profiles([make_profile(0, ("a", "b")), other])


def test_find_profile_prefers_exact_match_and_skips_others(tmp_path, monkeypatch):
    import audiokv_cli.profiling.profile_file as profile_file

    monkeypatch.setattr(profile_file, "default_profile_dirs", lambda: [])  # only the folder under test
    folder = tmp_path / "profiles"
    assert find_profile(FakeAdapter(), folder) is None  # a missing folder is simply empty
    folder.mkdir()
    save_profile(make_profile(fingerprint={**FINGERPRINT, "num_layers": 2, "hidden_size": 128}), folder / "wrong")
    (folder / "junk.safetensors").write_bytes(b"junk")
    assert find_profile(FakeAdapter(), folder) is None
    with pytest.raises(ProfileError, match="audiokv probe-set .* audiokv profile"):
        require_profile(FakeAdapter(), folder)
    renamed = save_profile(make_profile(fingerprint={**FINGERPRINT, "name_or_path": "elsewhere"}), folder / "renamed")
    assert find_profile(FakeAdapter(), folder) == renamed
    exact = save_profile(make_profile(), folder / "exact")
    save_profile(make_profile(), partial_paths(folder / "unfinished")[0])  # partial checkpoints never count
    assert find_profile(FakeAdapter(), folder) == exact


def test_profile_paths_accept_any_suffix(tmp_path):
    assert profile_paths(tmp_path / "x") == (tmp_path / "x.safetensors", tmp_path / "x.json")
    assert profile_paths(tmp_path / "x.json") == (tmp_path / "x.safetensors", tmp_path / "x.json")
    assert partial_paths(tmp_path / "x.safetensors")[0] == tmp_path / "x.partial.safetensors"


def test_header_size_larger_than_file_is_truncation(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ProfileError, match="truncated"):
        load_profile(path)
