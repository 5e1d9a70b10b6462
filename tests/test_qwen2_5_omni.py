"""The Qwen2.5-Omni thinker adapter on tiny random models: loading, prompts, M-RoPE positions, compressed inference."""

import json
import numpy as np
import pytest
import torch
from transformers import DynamicCache

from audiokv_cli.attention import sdpa_attention, use_attention_handler
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.decoding import greedy_generate, prefill
from audiokv_cli.inference import run_clip
from audiokv_cli.models.qwen2_5_omni import (
    ASR_INSTRUCTION_OMNI,
    ASR_SYSTEM_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    Qwen2_5OmniAdapter,
    audio_token_count,
)
from audiokv_cli.testing_omni import build_tiny_qwen2_5_omni_thinker


def _load(path):
    return Qwen2_5OmniAdapter.load(
        str(path), device=torch.device("cpu"), dtype=torch.float32, trust_remote_code=False, name=str(path),
        local_files_only=True,
    )


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    return build_tiny_qwen2_5_omni_thinker(tmp_path_factory.mktemp("tiny-omni-thinker"), seed=0)


@pytest.fixture(scope="module")
def omni(omni_dir):
    return _load(omni_dir)


def _clip(seconds, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_adapter_describes_the_thinker(omni):
    geometry = omni.geometry
    assert (geometry.num_layers, geometry.num_query_heads, geometry.num_kv_heads, geometry.head_dim) == (2, 4, 2, 16)
    assert geometry.group_size == 2
    layers = omni.decoder_layers()
    assert len(layers) == 2 and [layer.layer_idx for layer in layers] == [0, 1]
    # The attention switch flips this config, so it must be the one the decoder's attention modules read.
    assert all(layer.config is omni.text_config for layer in layers)
    assert omni.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    im_end = omni.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in omni.eos_token_ids
    assert omni.seconds_per_audio_token == 0.04
    assert omni.max_audio_seconds == 30.0  # the tiny extractor's window; the released one is 300 s
    assert omni.fingerprint()["model_type"] == "qwen2_5_omni_thinker"
    assert omni.model.config.model_type in Qwen2_5OmniAdapter.model_types


@pytest.fixture(scope="module")
def full_omni_dir(tmp_path_factory):
    return build_tiny_qwen2_5_omni_thinker(tmp_path_factory.mktemp("tiny-omni-full"), seed=0, full_omni=True)


def test_full_omni_checkpoint_loads_only_the_thinker(omni, full_omni_dir):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(full_omni_dir)).model_type == "qwen2_5_omni"
    adapter = _load(full_omni_dir)
    assert type(adapter.model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    # Same seed, same thinker weights: any weight left unread would be freshly (differently) initialised.
    expected = omni.model.state_dict()
    loaded = adapter.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_thinker_loads_without_its_vision_blocks(omni, omni_dir):
    from safetensors import safe_open

    # the checkpoint has vision blocks; the loaded thinker does not (audio and text only)
    with safe_open(str(next(omni_dir.glob("*.safetensors"))), "pt") as handle:
        assert any(".blocks." in name for name in handle.keys() if "visual" in name)
    assert omni.model.config.vision_config.depth == 0
    assert not any(".blocks." in name for name in omni.model.state_dict() if "visual" in name)


def test_registry_picks_the_adapter_by_model_type(full_omni_dir, monkeypatch):
    from audiokv_cli.models import registry

    monkeypatch.setattr(registry, "ADAPTERS", registry.ADAPTERS + (Qwen2_5OmniAdapter,))
    adapter = registry.load_adapter(str(full_omni_dir), device="cpu", dtype="float32")
    assert isinstance(adapter, Qwen2_5OmniAdapter)
    assert adapter.prepare(_clip(1.0)).audio_tokens == 25


@pytest.mark.parametrize("seconds, expected_tokens", [(2.0, 50), (6.3, 157)])
def test_prepare_marks_the_audio_placeholders(omni, seconds, expected_tokens):
    prepared = omni.prepare(_clip(seconds))
    frames = int(prepared.inputs["feature_attention_mask"].sum())
    assert frames == round(seconds * 100)  # 10 ms mel hop
    assert audio_token_count(frames) == expected_tokens  # 40 ms per audio token
    assert prepared.audio_spans == [(prepared.audio_spans[0][0], prepared.audio_spans[0][0] + expected_tokens)]
    start, end = prepared.audio_spans[0]
    ids = prepared.input_ids[0].tolist()
    token = omni.processor.tokenizer.convert_tokens_to_ids
    assert ids[start - 1] == token("<|audio_bos|>") and ids[end] == token("<|audio_eos|>")
    assert ids.count(omni.audio_token_id) == expected_tokens
    assert ASR_SYSTEM_PROMPT in prepared.prompt and ASR_INSTRUCTION_OMNI in prepared.prompt
    assert prepared.prompt.endswith("<|im_start|>assistant\n")
    assert prepared.audio_seconds == pytest.approx(seconds)


def test_free_form_prompt_and_long_clip(omni):
    prepared = omni.prepare(_clip(30.0), prompt="What is the speaker's mood?")
    assert "What is the speaker's mood?" in prepared.prompt and DEFAULT_SYSTEM_PROMPT in prepared.prompt
    assert ASR_SYSTEM_PROMPT not in prepared.prompt
    assert prepared.audio_seconds == 30.0 and prepared.audio_tokens == 750
    # Beyond the feature extractor's window the clip is refused, never cut.
    from audiokv_cli.audio import AudioError

    with pytest.raises(AudioError, match="longer than this model's limit of 30 s"):
        omni.prepare(_clip(31.0))


def test_greedy_decoding_matches_generate(omni):
    prepared = omni.prepare(_clip(3.0, seed=1))
    steps = 12
    ours = greedy_generate(omni, prepared.inputs, DynamicCache(), steps, stop_at_eos=False).token_ids
    with torch.no_grad():
        reference = omni.model.generate(**prepared.inputs, max_new_tokens=steps, do_sample=False)
    generated = reference[0, prepared.prompt_tokens :].tolist()
    assert len(generated) >= 1
    # generate stops at the configured EOS; up to there both must agree token for token.
    assert ours[: len(generated)] == generated
    if len(generated) < steps:
        assert generated[-1] in omni.eos_token_ids
    stopping = greedy_generate(omni, prepared.inputs, DynamicCache(), steps).token_ids
    eos = set(omni.eos_token_ids)
    assert stopping == [t for t in generated if t not in eos][: len(stopping)]


def test_decode_positions_continue_from_the_prompt_offset(omni, monkeypatch):
    """A prompt whose M-RoPE positions end ahead of its length (as vision prompts do) shifts every later step."""
    prepared = omni.prepare(_clip(2.0))
    length = prepared.prompt_tokens
    offset = 7
    original = omni.model.get_rope_index

    def shifted(*args, **kwargs):
        positions, deltas = original(*args, **kwargs)
        return positions + offset, deltas + offset

    monkeypatch.setattr(omni.model, "get_rope_index", shifted)
    cache = DynamicCache()
    with torch.no_grad():
        first = omni.next_token_logits(prepared.inputs, cache)
        token = first.argmax(-1)[:, None]
        step = omni.next_token_logits({"input_ids": token}, cache)
        # Reference: one forward over prompt + token, positions given explicitly as offset + 0..length.
        inputs = dict(prepared.inputs)
        inputs["input_ids"] = torch.cat([prepared.input_ids, token], dim=-1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        positions = (torch.arange(length + 1) + offset).view(1, 1, -1).expand(3, 1, -1)
        whole = omni.model(**inputs, position_ids=positions).logits[:, -1]
        # What a step that ignored the offset would compute: the new token right after the prompt's length.
        stale = positions.clone()
        stale[..., -1] = length
        ignoring_offset = omni.model(**inputs, position_ids=stale).logits[:, -1]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=0)
    assert not torch.allclose(step, ignoring_offset, atol=1e-4)  # the offset matters: the check above is not vacuous


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def test_attention_handler_gets_post_rotary_states(omni):
    """Queries and keys reaching the handler are RoPE-rotated at the prompt positions (naive reference, layer 0)."""
    prepared = omni.prepare(_clip(2.0))
    captured, layer_inputs = {}, {}
    layer0 = omni.decoder_layers()[0]

    def handler(module, query, key, value, attention_mask, scaling, **kwargs):
        captured.setdefault(module.layer_idx, (query.clone(), key.clone()))
        return sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)

    def grab_normed(module, args, kwargs):
        layer_inputs["hidden"] = kwargs.get("hidden_states", args[0] if args else None).clone()

    hook = layer0.register_forward_pre_hook(grab_normed, with_kwargs=True)
    try:
        with use_attention_handler(omni, handler):
            prefill(omni, prepared.inputs, DynamicCache())
    finally:
        hook.remove()
    assert sorted(captured) == [0, 1]
    query, key = captured[0]
    hidden = layer_inputs["hidden"]
    length, dim = prepared.prompt_tokens, omni.geometry.head_dim
    with torch.no_grad():
        raw_q = layer0.q_proj(hidden).view(1, length, -1, dim).transpose(1, 2)
        raw_k = layer0.k_proj(hidden).view(1, length, -1, dim).transpose(1, 2)
    theta = omni.text_config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    # Audio-only prompts put the same position on the temporal, height and width axes: plain RoPE at 0..L-1.
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    want_q = raw_q.double() * cos + _rotate_half(raw_q.double()) * sin
    want_k = raw_k.double() * cos + _rotate_half(raw_k.double()) * sin
    assert query.shape == (1, 4, length, dim) and key.shape == (1, 2, length, dim)
    torch.testing.assert_close(query.double(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(key.double(), want_k, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(key.double(), raw_k.double(), atol=1e-3)


def _head_scores(adapter):
    geometry = adapter.geometry
    scores = torch.arange(geometry.num_layers * geometry.num_query_heads, dtype=torch.float32)
    return scores.reshape(geometry.num_layers, geometry.num_query_heads).flip(-1)


def test_compressed_inference_on_the_mrope_model(omni):
    audio = _clip(6.0, seed=2)
    steps = 8
    full = run_clip(omni, audio, build_policy("full"), max_new_tokens=steps, stop_at_eos=False)
    assert full.generated_tokens == steps and full.audio_tokens == 150
    options = MethodOptions(window=8, head_scores=_head_scores(omni))
    for method in ("snapkv", "audiokv"):
        lossless = run_clip(omni, audio, build_policy(method, 1.0, options), max_new_tokens=steps, stop_at_eos=False)
        assert lossless.token_ids == full.token_ids, method
        assert lossless.kept_per_head["kept"] == [[full.prompt_tokens] * 2] * 2
        compressed = run_clip(omni, audio, build_policy(method, 0.4, options), max_new_tokens=steps, stop_at_eos=False)
        assert compressed.generated_tokens == steps
        assert 0.38 * full.kv_bytes_full <= compressed.kv_bytes_kept <= 0.41 * full.kv_bytes_full, method
        kept = torch.tensor(compressed.kept_per_head["kept"])
        assert kept.shape == (2, 2)
        assert int(kept.sum()) == round(0.4 * compressed.prompt_tokens) * kept.numel()


def test_registry_finds_the_omni_adapter(omni_dir, full_omni_dir, tmp_path):
    from audiokv_cli.models.registry import load_adapter

    for directory in (omni_dir, full_omni_dir):
        adapter = load_adapter(str(directory), device="cpu", dtype="float32")
        assert isinstance(adapter, Qwen2_5OmniAdapter)
    # The CLI drives it like any other model.
    from typer.testing import CliRunner

    from audiokv_cli.cli import app
    from tests.conftest import write_tone

    clip = write_tone(tmp_path / "clip.wav", seconds=3.0)
    result = CliRunner().invoke(
        app, ["infer", str(clip), "--model", str(omni_dir), "--json", "--max-new-tokens", "3",
              "--method", "snapkv", "--retention", "0.5"],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["audio_tokens"] == 75
    assert 0.49 <= record["kv_bytes_kept"] / record["kv_bytes_full"] <= 0.51


@pytest.mark.parametrize("method", ["snapkv", "audiokv"])
def test_compressed_logits_equal_the_masked_dense_model(omni, method):
    from audiokv_cli.testing_masked import assert_matches_masked_dense

    prepared = omni.prepare(_clip(3.0, seed=3))
    policy = build_policy(method, 0.4, MethodOptions(window=8, head_scores=_head_scores(omni)))
    result = assert_matches_masked_dense(omni, prepared, policy, steps=4)
    assert 0.55 < result.evicted_fraction < 0.65
