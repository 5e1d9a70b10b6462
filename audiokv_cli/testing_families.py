"""Tiny random-weight audio LMs of the families served by `models/audio_lm.py`, from the real config classes.

Each builder saves a checkpoint directory (config, weights, processor files) that the adapter loads exactly as it
loads a released one; the geometry helpers are the ones the Qwen2-Audio and Omni test models use.
"""

from __future__ import annotations

from pathlib import Path

# ChatML with an audio item rendered as the family's placeholder: the released Qwen-based templates, trimmed to what
# an audio prompt uses.
CHATML_AUDIO_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' %}{AUDIO}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_template(audio_markup: str) -> str:
    return CHATML_AUDIO_TEMPLATE.replace("{AUDIO}", audio_markup)


def _finish(model, tokenizer, processor, out_dir: Path, seed: int) -> Path:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _text_config(tokenizer, model_type: str, num_layers: int, num_heads: int, num_kv_heads: int, hidden: int, **extra):
    from audiokv_cli.testing import tiny_text_geometry

    return {
        "model_type": model_type,
        **tiny_text_geometry(len(tokenizer), hidden, num_layers, num_heads, num_kv_heads),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        **extra,
    }


def build_tiny_audio_flamingo3(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64
) -> Path:
    """A random AudioFlamingo3ForConditionalGeneration (Whisper-style encoder, Qwen2 decoder) and its processor."""
    import torch
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        WhisperFeatureExtractor,
    )

    from audiokv_cli.testing import build_character_tokenizer, tiny_audio_encoder_config

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", with_newline=True,
    )
    processor = AudioFlamingo3Processor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80, return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=chatml_template("<sound>"),
        max_audio_len=90,
    )
    encoder = tiny_audio_encoder_config(32)
    config = AudioFlamingo3Config(
        audio_config={"model_type": "audioflamingo3_encoder", **encoder},
        text_config=_text_config(tokenizer, "qwen2", num_layers, num_heads, num_kv_heads, hidden),
        audio_token_id=tokenizer.convert_tokens_to_ids("<sound>"),
    )
    torch.manual_seed(seed)
    model = AudioFlamingo3ForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)


# Qwen3-ASR's audio tokens and the transcript marker, named as in the released tokenizer.
QWEN3_ASR_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
                    "<asr_text>"]


def build_tiny_qwen3_asr(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64
) -> Path:
    """A random Qwen3ASRForConditionalGeneration (chunked encoder, Qwen3 decoder) and its processor."""
    import torch
    from transformers import (
        Qwen3ASRConfig,
        Qwen3ASRFeatureExtractor,
        Qwen3ASRForConditionalGeneration,
        Qwen3ASRProcessor,
    )

    from audiokv_cli.testing import build_character_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        QWEN3_ASR_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", with_newline=True,
        extra_special_tokens={
            "audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
        },
    )
    processor = Qwen3ASRProcessor(
        feature_extractor=Qwen3ASRFeatureExtractor(feature_size=80),
        tokenizer=tokenizer,
        chat_template=chatml_template("<|audio_start|><|audio_pad|><|audio_end|>"),
    )
    config = Qwen3ASRConfig(
        audio_config={
            "num_mel_bins": 80, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
            "d_model": 32, "output_dim": hidden, "downsample_hidden_size": 8,
        },
        text_config=_text_config(tokenizer, "qwen3", num_layers, num_heads, num_kv_heads, hidden, head_dim=hidden // num_heads),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)
