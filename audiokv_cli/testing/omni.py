"""Tiny random-weight Qwen2.5-Omni thinkers built from the real config classes, for offline tests.

The processor files are written one by one rather than through `Qwen2_5OmniProcessor.save_pretrained`: that class
cannot be built without torchvision (its video processor needs it), and an audio-only test machine has none. The files
have the layout of the released checkpoints (one `preprocessor_config.json` holding the Whisper feature extractor and
the image processor, a `chat_template.json`, the tokenizer), so the stock processor reads them wherever torchvision is
installed and the adapter's audio-only processor reads them everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

# The special tokens Qwen2.5-Omni's processor and chat template use, in the order of the released tokenizer.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
]

# Named special tokens the processor looks up on the tokenizer (`tokenizer.audio_token` and so on).
EXTRA_SPECIAL_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}

# Qwen2.5-Omni's released chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-VL image processor settings of the released checkpoints; unused by audio prompts but part of the processor.
IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


def build_omni_character_tokenizer():
    """A character-level tokenizer (newline included: the chat template emits it) with Qwen2.5-Omni's tokens."""
    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

    return build_character_tokenizer(
        SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        with_newline=True,
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
    )


def tiny_thinker_config(
    tokenizer,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden: int = 64,
    audio_hidden: int = 32,
):
    """A Qwen2_5OmniThinkerConfig with tiny audio, vision and text parts (GQA, M-RoPE) for ``tokenizer``."""
    from transformers import Qwen2_5OmniThinkerConfig

    from audiokv_cli.testing.qwen2_audio import tiny_audio_encoder_config, tiny_text_geometry

    head_dim = hidden // num_heads
    # M-RoPE splits the head_dim / 2 rotary frequencies into temporal, height and width sections, in the released
    # model's 16:24:24 proportion.
    half = head_dim // 2
    spatial = (half - half // 4) // 2
    mrope_section = [half - 2 * spatial, spatial, spatial]
    token = tokenizer.convert_tokens_to_ids
    return Qwen2_5OmniThinkerConfig(
        audio_config={**tiny_audio_encoder_config(audio_hidden), "n_window": 100, "output_dim": hidden},
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            **tiny_text_geometry(len(tokenizer), hidden, num_layers, num_heads, num_kv_heads),
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": mrope_section},
            "eos_token_id": token("<|im_end|>"),
            "pad_token_id": token("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        audio_token_index=token("<|AUDIO|>"),
        image_token_index=token("<|IMAGE|>"),
        video_token_index=token("<|VIDEO|>"),
        audio_start_token_id=token("<|audio_bos|>"),
        audio_end_token_id=token("<|audio_eos|>"),
        vision_start_token_id=token("<|vision_bos|>"),
        vision_end_token_id=token("<|vision_eos|>"),
    )


def save_omni_processor_files(out_dir: str | Path, tokenizer) -> None:
    """Write the processor files of a Qwen2.5-Omni checkpoint (tokenizer, preprocessor config, chat template)."""
    from transformers import WhisperFeatureExtractor

    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    preprocessor = WhisperFeatureExtractor(feature_size=80, return_attention_mask=True).to_dict()
    preprocessor.update(IMAGE_PROCESSOR_CONFIG)
    preprocessor["processor_class"] = "Qwen2_5OmniProcessor"
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def build_random_qwen2_5_omni_thinker(
    out_dir: str | Path,
    seed: int = 0,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden: int = 64,
    full_omni: bool = False,
) -> Path:
    """Save a random Qwen2.5-Omni thinker plus its processor files to ``out_dir``.

    ``full_omni=True`` saves it the way the released checkpoints are laid out: a `qwen2_5_omni` config whose weights
    sit under `thinker.` (the talker and vocoder are left out, as with `enable_audio_output=False`).
    """
    import torch
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    out_dir = Path(out_dir)
    tokenizer = build_omni_character_tokenizer()
    thinker_config = tiny_thinker_config(tokenizer, num_layers, num_heads, num_kv_heads, hidden)
    torch.manual_seed(seed)
    if full_omni:
        config = Qwen2_5OmniConfig(thinker_config=thinker_config.to_dict(), enable_audio_output=False)
        model = Qwen2_5OmniForConditionalGeneration(config).eval()
        generation_config = model.thinker.generation_config
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config).eval()
        generation_config = model.generation_config
    for target in (generation_config, model.generation_config):
        target.eos_token_id = tokenizer.eos_token_id
        target.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    save_omni_processor_files(out_dir, tokenizer)
    return out_dir
