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
    from audiokv_cli.testing.qwen2_audio import tiny_text_geometry

    return {
        "model_type": model_type,
        **tiny_text_geometry(len(tokenizer), hidden, num_layers, num_heads, num_kv_heads),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        **extra,
    }


def build_random_audio_flamingo3(
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

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer, tiny_audio_encoder_config

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


def build_random_qwen3_asr(
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

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

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
        text_config=_text_config(
            tokenizer, "qwen3", num_layers, num_heads, num_kv_heads, hidden, head_dim=hidden // num_heads
        ),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)


# Qwen3-Omni's special tokens for audio and vision, named as in the released tokenizer.
QWEN3_OMNI_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
                     "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build_random_qwen3_omni_thinker(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    hidden: int = 64, full_omni: bool = False,
) -> Path:
    """A random Qwen3-Omni-MoE thinker (chunked audio tower, MoE decoder with M-RoPE) and its processor files.

    ``full_omni=True`` saves a `qwen3_omni_moe` checkpoint with the thinker's weights under `thinker.` and no talker.
    """
    import json

    import torch
    from transformers import (
        Qwen3OmniMoeConfig,
        Qwen3OmniMoeForConditionalGeneration,
        Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer, tiny_text_geometry

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        QWEN3_OMNI_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", with_newline=True,
        extra_special_tokens={
            "audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
        },
    )
    token = tokenizer.convert_tokens_to_ids
    head_dim = hidden // num_heads
    half = head_dim // 2
    spatial = (half - half // 4) // 2
    thinker_config = Qwen3OmniMoeThinkerConfig(
        audio_config={
            "num_mel_bins": 80, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
            "d_model": 32, "output_dim": hidden, "downsample_hidden_size": 8,
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden,
            "deepstack_visual_indexes": [0], "num_position_embeddings": 16,
        },
        text_config={
            **tiny_text_geometry(len(tokenizer), hidden, num_layers, num_heads, num_kv_heads),
            "head_dim": head_dim,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": [half - 2 * spatial, spatial, spatial], "mrope_interleaved": True},
            "eos_token_id": token("<|im_end|>"),
            "pad_token_id": token("<|endoftext|>"),
        },
        audio_token_id=token("<|audio_pad|>"),
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        audio_start_token_id=token("<|audio_start|>"),
        vision_start_token_id=token("<|vision_start|>"),
    )
    torch.manual_seed(seed)
    if full_omni:
        config = Qwen3OmniMoeConfig(thinker_config=thinker_config.to_dict(), enable_audio_output=False)
        model = Qwen3OmniMoeForConditionalGeneration(config).eval()
        targets = (model.thinker.generation_config, model.generation_config)
    else:
        model = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_config).eval()
        targets = (model.generation_config,)
    for target in targets:
        target.eos_token_id = tokenizer.eos_token_id
        target.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    preprocessor = WhisperFeatureExtractor(feature_size=80, return_attention_mask=True).to_dict()
    preprocessor["processor_class"] = "Qwen3OmniMoeProcessor"
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True))
    template = chatml_template("<|audio_start|><|audio_pad|><|audio_end|>")
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    return out_dir


# Mistral's control tokens a Voxtral prompt uses, as in the released tokenizer.
VOXTRAL_TOKENS = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[BEGIN_AUDIO]", "[AUDIO]", "[TRANSCRIBE]"]


def build_random_voxtral(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64
) -> Path:
    """A random VoxtralForConditionalGeneration (Whisper-style encoder, Llama decoder), feature extractor, tokenizer."""
    import torch
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer, tiny_audio_encoder_config

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(VOXTRAL_TOKENS, eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    audio_hidden = 32
    config = VoxtralConfig(
        # The projector stacks four encoder frames per token: intermediate_size is 4 x d_model, as released.
        audio_config={"model_type": "voxtral_encoder", **tiny_audio_encoder_config(audio_hidden),
                      "encoder_ffn_dim": 4 * audio_hidden},
        text_config=_text_config(tokenizer, "llama", num_layers, num_heads, num_kv_heads, hidden,
                                 bos_token_id=tokenizer.bos_token_id, head_dim=hidden // num_heads),
        audio_token_id=tokenizer.convert_tokens_to_ids("[AUDIO]"),
    )
    torch.manual_seed(seed)
    model = VoxtralForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out_dir)
    return out_dir


def build_random_glm_asr(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64
) -> Path:
    """A random GlmAsrForConditionalGeneration (rotary Whisper-style encoder, Llama decoder) and its processor."""
    import torch
    from transformers import GlmAsrConfig, GlmAsrForConditionalGeneration, GlmAsrProcessor, WhisperFeatureExtractor

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|pad|>"],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", with_newline=True,
    )
    processor = GlmAsrProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80, return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=chatml_template("<|begin_of_audio|><|pad|><|end_of_audio|>"),
        max_audio_len=90,
    )
    audio_hidden = 32
    config = GlmAsrConfig(
        # The projector merges four encoder frames per token: intermediate_size is 4 x hidden_size, as released.
        audio_config={
            "model_type": "glmasr_encoder", "hidden_size": audio_hidden, "intermediate_size": 4 * audio_hidden,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_mel_bins": 80,
        },
        text_config=_text_config(
            tokenizer, "llama", num_layers, num_heads, num_kv_heads, hidden, head_dim=hidden // num_heads
        ),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|pad|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GlmAsrForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)


def build_random_music_flamingo(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64
) -> Path:
    """A random MusicFlamingoForConditionalGeneration (AF3 encoder + rotary time embedding, Qwen2 decoder)."""
    import torch
    from transformers import (
        MusicFlamingoConfig,
        MusicFlamingoForConditionalGeneration,
        MusicFlamingoProcessor,
        WhisperFeatureExtractor,
    )

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer, tiny_audio_encoder_config

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>", "<|sound_bos|>", "<|sound_eos|>"],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", with_newline=True,
    )
    processor = MusicFlamingoProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80, return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=chatml_template("<sound>"),
        max_audio_len=90,
    )
    token = tokenizer.convert_tokens_to_ids
    config = MusicFlamingoConfig(
        audio_config={"model_type": "audioflamingo3_encoder", **tiny_audio_encoder_config(32)},
        text_config=_text_config(tokenizer, "qwen2", num_layers, num_heads, num_kv_heads, hidden),
        audio_token_id=token("<sound>"),
        audio_bos_token_id=token("<|sound_bos|>"),
        audio_eos_token_id=token("<|sound_eos|>"),
    )
    torch.manual_seed(seed)
    model = MusicFlamingoForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)


# Omnilingual ASR's chat template, trimmed to one audio item and its language marker: the audio placeholder, the
# language token, then the BOS the transcript is decoded from.
OMNIASR_TEMPLATE = (
    "{% for message in messages %}{% for item in message['content'] %}{% if item['type'] == 'audio' %}<extra_id_1>"
    "{% elif item['type'] == 'language' %}<|lang:{{ item['language'] }}|>{% endif %}{% endfor %}{% endfor %}<s>"
)


def build_random_omniasr(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64
) -> Path:
    """A random OmniASRForConditionalGeneration (wav2vec2-style encoder, Llama decoder) and its processor."""
    import torch
    from transformers import (
        OmniASRConfig,
        OmniASRFeatureExtractor,
        OmniASRForConditionalGeneration,
        OmniASRProcessor,
    )

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        ["<s>", "<pad>", "</s>", "<extra_id_1>", "<|lang:eng_latn|>", "<|lang:auto|>"],
        eos_token="</s>", pad_token="<pad>", bos_token="<s>",
    )
    processor = OmniASRProcessor(
        feature_extractor=OmniASRFeatureExtractor(), tokenizer=tokenizer, chat_template=OMNIASR_TEMPLATE
    )
    config = OmniASRConfig(
        audio_config={
            "model_type": "omniasr_audio", "hidden_size": 32, "conv_dim": [16] * 7, "num_attention_heads": 2,
            "num_hidden_layers": 1, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2,
            "intermediate_size": 64,
        },
        text_config=_text_config(
            tokenizer, "llama", num_layers, num_heads, num_kv_heads, hidden, head_dim=hidden // num_heads,
            bos_token_id=tokenizer.bos_token_id,
        ),
        audio_token_id=tokenizer.convert_tokens_to_ids("<extra_id_1>"),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = OmniASRForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)


WHISPER_SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]


def build_random_whisper(out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, hidden: int = 64) -> Path:
    """A random WhisperForConditionalGeneration (English-only prompt) and its processor; the encoder keeps Whisper's
    real window (3,000 mel frames -> 1,500 encoder frames), the decoder is small."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor
    from transformers import WhisperTokenizerFast

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

    out_dir = Path(out_dir)
    generic = build_character_tokenizer(WHISPER_SPECIAL_TOKENS)
    tokenizer = WhisperTokenizerFast(
        tokenizer_object=generic.backend_tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
    )
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=hidden,
        encoder_layers=1,
        decoder_layers=num_layers,
        encoder_attention_heads=2,
        decoder_attention_heads=num_heads,
        encoder_ffn_dim=2 * hidden,
        decoder_ffn_dim=2 * hidden,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        # Whisper never emits its task tokens in a transcript; suppressing them makes the random model write text.
        suppress_tokens=[vocab[token] for token in WHISPER_SPECIAL_TOKENS[1:]],
        begin_suppress_tokens=[vocab[" "]],
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    processor.save_pretrained(out_dir)
    return out_dir


# Gemma-3n's special tokens. The multimodal ones come last, as in the released vocabulary: the start-of-image and
# start-of-audio markers are text tokens, the rest fall in the vision and audio embedders' id ranges.
GEMMA3N_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
GEMMA3N_MEDIA_TOKENS = {
    "boi_token": "<start_of_image>", "boa_token": "<start_of_audio>",
    "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
    "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>",
}
GEMMA3N_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' %}<audio_soft_token>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)


def build_random_gemma3n(
    out_dir: str | Path, seed: int = 0, num_layers: int = 6, num_heads: int = 4, num_kv_heads: int = 2,
    hidden: int = 64, sliding_window: int = 512, num_kv_shared_layers: int = 2,
) -> Path:
    """A random Gemma3nForConditionalGeneration (conformer audio encoder; decoder alternating sliding-window and
    global layers, the last ``num_kv_shared_layers`` reading earlier layers' caches), built and saved without its
    vision tower, and its processor files."""
    import torch
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nConfig, Gemma3nForConditionalGeneration

    from audiokv_cli.models.families.gemma3n import gemma3n_processor, without_vision_tower
    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        GEMMA3N_TOKENS, eos_token="<end_of_turn>", pad_token="<pad>", bos_token="<bos>", with_newline=True,
        extra_special_tokens=GEMMA3N_MEDIA_TOKENS, chat_template=GEMMA3N_TEMPLATE,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3N_MEDIA_TOKENS.items()}
    vision_offset, audio_offset = ids["eoi_token"], ids["eoa_token"]
    processor = gemma3n_processor(Gemma3nAudioFeatureExtractor(), tokenizer, chat_template=GEMMA3N_TEMPLATE)
    head_dim = hidden // num_heads
    config = Gemma3nConfig(
        text_config={
            **_text_config(tokenizer, "gemma3n_text", num_layers, num_heads, num_kv_heads, hidden, head_dim=head_dim),
            "vocab_size_per_layer_input": vision_offset,
            "hidden_size_per_layer_input": 8,
            "laurel_rank": 8,
            "altup_num_inputs": 2,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            "sliding_window": sliding_window,
            "num_kv_shared_layers": num_kv_shared_layers,
            "activation_sparsity_pattern": [0.0] * num_layers,
            "bos_token_id": tokenizer.bos_token_id,
        },
        audio_config={
            "hidden_size": 32, "conf_num_attention_heads": 2, "conf_num_hidden_layers": 1,
            "sscp_conv_channel_size": [8, 8], "vocab_size": len(tokenizer) - audio_offset, "vocab_offset": audio_offset,
        },
        vision_config={"hidden_size": 16, "vocab_size": audio_offset - vision_offset, "vocab_offset": vision_offset},
        boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"], image_token_id=ids["image_token"],
        boa_token_id=ids["boa_token"], eoa_token_id=ids["eoa_token"], audio_token_id=ids["audio_token"],
    )
    torch.manual_seed(seed)
    with without_vision_tower():
        model = Gemma3nForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<eos>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# MOSS-Transcribe-Diarize's trained instruction, added by the released chat template whenever the user turn holds
# audio; a text item becomes a context line before it.
MOSS_TRANSCRIBE_DIARIZE_INSTRUCTION = (
    "请将音频转写为文本，每一段需以起始时间戳和说话人编号（[S01]、[S02]、[S03]…）开头，正文为对应的语音内容，"
    "并在段末标注结束时间戳，以清晰标明该段语音范围。"
)
# The released chat template, trimmed to its default system turn and user turns with audio.
MOSS_TRANSCRIBE_DIARIZE_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% set context = message['content'] | selectattr('type', 'equalto', 'text') | list %}"
    "{% for item in message['content'] %}{% if item['type'] == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>\n"
    "{% endif %}{% endfor %}{% if context %}补充信息：{{ context[0]['text'] }}\n\n{% endif %}"
    + MOSS_TRANSCRIBE_DIARIZE_INSTRUCTION
    + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_random_moss_transcribe_diarize(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64
) -> Path:
    """A random MossTranscribeDiarizeForConditionalGeneration (Whisper-style encoder, four frames merged per token,
    Qwen3 decoder) and its processor, which writes time markers every 2 s into the audio span."""
    import torch
    from transformers import (
        MossTranscribeDiarizeConfig,
        MossTranscribeDiarizeFeatureExtractor,
        MossTranscribeDiarizeForConditionalGeneration,
        MossTranscribeDiarizeProcessor,
    )

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer, tiny_audio_encoder_config

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", with_newline=True,
    )
    processor = MossTranscribeDiarizeProcessor(
        feature_extractor=MossTranscribeDiarizeFeatureExtractor(return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=MOSS_TRANSCRIBE_DIARIZE_TEMPLATE,
    )
    config = MossTranscribeDiarizeConfig(
        audio_config={"model_type": "moss_transcribe_diarize_audio", **tiny_audio_encoder_config(32)},
        text_config=_text_config(
            tokenizer, "qwen3", num_layers, num_heads, num_kv_heads, hidden, head_dim=hidden // num_heads
        ),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MossTranscribeDiarizeForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)


# VibeVoice-ASR's chat template as the transformers conversion writes it: a system turn, then per user turn the audio
# and an instruction naming its duration (the processor fills in <|AUDIO_DURATION|>), with the first text item as
# extra info; no assistant turn is opened.
VIBEVOICE_ASR_TEMPLATE = """{%- set system_prompt = system_prompt | default("You are a helpful assistant that transcribes audio input into text output in JSON format.") -%}
<|im_start|>system
{{ system_prompt }}<|im_end|>
{%- set audio_token = audio_token | default("<|box_start|>") -%}
{%- set audio_start_token = "<|object_ref_start|>" -%}
{%- set audio_end_token = "<|object_ref_end|>" -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
{{ '\\n' }}<|im_start|>user{{ '\\n' }}{%- set text_items = message['content'] | selectattr('type', 'equalto', 'text') | list -%}
        {%- set context_text = text_items[0]['text'] if text_items else none -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'audio' -%}
{{ audio_start_token }}{{ audio_token }}{{ audio_end_token }}{{ "\\n" }}{%- if context_text -%}
This is a <|AUDIO_DURATION|> seconds audio, with extra info: {{ context_text }}

Please transcribe it with these keys: Start time, End time, Speaker ID, Content{%- else -%}
This is a <|AUDIO_DURATION|> seconds audio, please transcribe it with these keys: Start time, End time, Speaker ID, Content{%- endif -%}
            {%- endif -%}
        {%- endfor -%}
<|im_end|>{{ '\\n' }}
    {%- endif -%}
{%- endfor -%}"""


def build_random_vibevoice_asr(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    hidden: int = 64, chunk_seconds: float = 4.0,
) -> Path:
    """A random VibeVoiceAsrForConditionalGeneration (acoustic and semantic convolutional tokenizers with the
    released 3,200-sample stride, Qwen2 decoder) and its processor. The tokenizers encode ``chunk_seconds`` chunks
    (60 s released) so short test clips cross a chunk boundary."""
    import torch
    from transformers import (
        VibeVoiceAcousticTokenizerFeatureExtractor,
        VibeVoiceAsrConfig,
        VibeVoiceAsrForConditionalGeneration,
        VibeVoiceAsrProcessor,
    )

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>"],
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", with_newline=True,
    )
    feature_extractor = VibeVoiceAcousticTokenizerFeatureExtractor()
    processor = VibeVoiceAsrProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=VIBEVOICE_ASR_TEMPLATE
    )
    # The released strides reordered to downsample first, and ConvNeXt blocks only at the lowest rate: the same
    # 3,200-sample hop at a fraction of the compute. Random convolutions at the released initializer range (0.01)
    # shrink the signal to ~1e-10 over seven layers, leaving every audio embedding alike; 0.1 keeps them apart.
    tokenizer_encoder = {
        "model_type": "vibevoice_acoustic_tokenizer_encoder", "num_filters": 2,
        "downsampling_ratios": [8, 5, 5, 4, 2, 2], "depths": [0, 0, 0, 0, 0, 0, 1], "initializer_range": 0.1,
    }
    token = tokenizer.convert_tokens_to_ids
    config = VibeVoiceAsrConfig(
        acoustic_tokenizer_encoder_config={**tokenizer_encoder, "hidden_size": 8},
        semantic_tokenizer_encoder_config={**tokenizer_encoder, "hidden_size": 16},
        text_config=_text_config(tokenizer, "qwen2", num_layers, num_heads, num_kv_heads, hidden),
        audio_token_id=token("<|box_start|>"),
        audio_bos_token_id=token("<|object_ref_start|>"),
        audio_eos_token_id=token("<|object_ref_end|>"),
        acoustic_tokenizer_chunk_size=int(chunk_seconds * feature_extractor.sampling_rate),
    )
    torch.manual_seed(seed)
    model = VibeVoiceAsrForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)


# Cohere ASR's decoder-prompt tokens (as `CohereAsrProcessor.get_decoder_prompt_ids` names them) and its text markers.
COHERE_ASR_TOKENS = [
    "<pad>", "<|endoftext|>", "<|startoftranscript|>", "<|startofcontext|>", "<|emo:undefined|>", "<|en|>", "<|pnc|>",
    "<|nopnc|>", "<|noitn|>", "<|notimestamp|>", "<|nodiarize|>", "▁",
]


def build_random_cohere_asr(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, hidden: int = 64
) -> Path:
    """A random CohereAsrForConditionalGeneration (one-layer Parakeet encoder, Transformer decoder with
    cross-attention) and its processor (the released 128-bin feature extractor)."""
    import torch
    from transformers import (
        CohereAsrConfig,
        CohereAsrFeatureExtractor,
        CohereAsrForConditionalGeneration,
        CohereAsrProcessor,
    )

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        COHERE_ASR_TOKENS, eos_token="<|endoftext|>", pad_token="<pad>", bos_token="<|startoftranscript|>"
    )
    feature_extractor = CohereAsrFeatureExtractor()
    processor = CohereAsrProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    config = CohereAsrConfig(
        # At the released initializer range (0.02) the random encoder's output shrinks to ~1e-4 and is alike in
        # every frame, so evicting frames would change nothing; 0.5 keeps the frames apart.
        encoder_config={
            "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "num_mel_bins": feature_extractor.feature_size, "subsampling_conv_channels": 8, "initializer_range": 0.5,
        },
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=2 * hidden,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = CohereAsrForConditionalGeneration(config).eval()
    return _finish(model, tokenizer, processor, out_dir, seed)


# Granite's chat turns, trimmed from the released template to what an audio prompt uses (the adapter always gives
# the system turn, so the released template's dated default system turn is left out).
GRANITE_SPEECH_TEMPLATE = (
    "{% for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>{{ message['content'] }}"
    "<|end_of_text|>\n{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)
# Granite Speech's preprocessor_config.json in the layout GraniteSpeechFeatureExtractor saves, with its defaults, which
# the released checkpoints use (transformers' processor tests on granite-speech-3.3-8b: 269,920 samples give 844
# frames of 160 values and 171 audio tokens).
GRANITE_SPEECH_PREPROCESSOR = {
    "feature_extractor_type": "GraniteSpeechFeatureExtractor",
    "melspec_kwargs": {"hop_length": 160, "n_fft": 512, "n_mels": 80, "sample_rate": 16000, "win_length": 400},
    "processor_class": "GraniteSpeechProcessor",
    "projector_downsample_rate": 5,
    "projector_window_size": 15,
    "sampling_rate": 16000,
}


def build_random_granite_speech(
    out_dir: str | Path, seed: int = 0, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    hidden: int = 64,
) -> Path:
    """A random GraniteSpeechForConditionalGeneration (two-layer conformer, one-layer Q-Former with the released
    15-frame windows and 5x downsampling, Granite decoder) with its tokenizer and the released preprocessor config,
    written as files rather than through `GraniteSpeechFeatureExtractor`, which cannot be built without torchaudio.
    No speech LoRA (`has_lora_adapter` false): transformers 5.24 loads one only with peft >= 0.22.0, and PyPI's
    newest peft was 0.21.2 when this was written."""
    import json

    import torch
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    from audiokv_cli.testing.qwen2_audio import build_character_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer(
        ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|audio|>"],
        eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", with_newline=True,
    )
    tokenizer.chat_template = GRANITE_SPEECH_TEMPLATE
    mel_bins = GRANITE_SPEECH_PREPROCESSOR["melspec_kwargs"]["n_mels"]
    config = GraniteSpeechConfig(
        # 50-frame attention blocks (200 released), so the 2-3 s test clips span several blocks.
        encoder_config={
            "input_dim": 2 * mel_bins, "num_layers": 2, "hidden_dim": 32, "num_heads": 2, "output_dim": 8,
            "context_size": 50, "conv_kernel_size": 5,
        },
        projector_config={
            "model_type": "blip_2_qformer", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "encoder_hidden_size": 32, "cross_attention_frequency": 1,
        },
        # Granite scales attention scores by `attention_multiplier` (1 / head size in the released models), not by
        # 1 / sqrt(head size): set so, the compressed path is checked with the module's own scaling.
        text_config=_text_config(
            tokenizer, "granite", num_layers, num_heads, num_kv_heads, hidden, attention_multiplier=num_heads / hidden
        ),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"),
        window_size=GRANITE_SPEECH_PREPROCESSOR["projector_window_size"],
        downsample_rate=GRANITE_SPEECH_PREPROCESSOR["projector_downsample_rate"],
        has_lora_adapter=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(GRANITE_SPEECH_PREPROCESSOR, indent=2) + "\n")
    return out_dir
