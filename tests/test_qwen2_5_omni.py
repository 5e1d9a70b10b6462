"""The Qwen2.5-Omni thinker adapter on tiny random models: loading, prompts, post-rotary states
(thinker-only loading, M-RoPE positions and the checks every family passes: test_families.py)."""

import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from audiokv_cli.runtime.attention import sdpa_attention, use_attention_handler
from audiokv_cli.runtime.decoding import prefill
from audiokv_cli.models.families.qwen2_5_omni import (
    ASR_INSTRUCTION_OMNI,
    ASR_SYSTEM_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    Qwen2_5OmniAdapter,
    audio_token_count,
)


@pytest.fixture(scope="module")
def omni_dir(family_models):
    return family_models.directory(Qwen2_5OmniAdapter)


@pytest.fixture(scope="module")
def omni(family_models):
    return family_models.adapter(Qwen2_5OmniAdapter)


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


def test_thinker_loads_without_its_vision_blocks(omni, omni_dir):
    from safetensors import safe_open

    # the checkpoint has vision blocks; the loaded thinker does not (audio and text only)
    with safe_open(str(next(omni_dir.glob("*.safetensors"))), "pt") as handle:
        assert any(".blocks." in name for name in handle.keys() if "visual" in name)
    assert omni.model.config.vision_config.depth == 0
    assert not any(".blocks." in name for name in omni.model.state_dict() if "visual" in name)


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
    from audiokv_cli.io.audio import AudioError

    with pytest.raises(AudioError, match="longer than this model's limit of 30 s"):
        omni.prepare(_clip(31.0))


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


def test_the_cli_drives_the_thinker_like_any_other_model(omni_dir, tmp_path):
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
