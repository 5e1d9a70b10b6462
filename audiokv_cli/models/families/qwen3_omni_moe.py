"""Qwen3-Omni (MoE), text and audio in, text out: only the thinker (audio tower + MoE decoder with M-RoPE) is loaded.

The thinker is laid out as Qwen2.5-Omni's (`model.language_model`, `get_rope_index`, M-RoPE positions), so the
adapter is that one with Qwen3-Omni's classes, tokens and audio rate: the audio tower encodes 1 s chunks into 13
tokens each and takes audio of any length (its feature extractor pads to the longest clip and never cuts).
The talker and code2wav (speech output) never touch the thinker's cache and are not loaded.
"""

from __future__ import annotations

from audiokv_cli.models.families.qwen2_5_omni import OmniAudioProcessor, Qwen2_5OmniAdapter, thinker_config_from

# Qwen's speech-recognition wording for Qwen3-Omni (its audio cookbook puts the instruction after the audio).
ASR_INSTRUCTION_QWEN3_OMNI = "Transcribe the English audio into text."
AUDIO_TOKEN = "<|audio_pad|>"


def audio_token_count(feature_frames: int, n_window: int = 50) -> int:
    """Audio tokens for ``feature_frames`` mel frames: 13 per full chunk of ``2 n_window`` frames, and the last
    partial chunk through three stride-2 convolutions (transformers' `_get_feat_extract_output_lengths`)."""
    chunk = 2 * n_window
    rest = feature_frames % chunk
    after_first = (rest - 1) // 2 + 1
    return ((after_first - 1) // 2 + 1 - 1) // 2 + 1 + (feature_frames // chunk) * 13


class Qwen3OmniAudioProcessor(OmniAudioProcessor):
    """Qwen3-Omni's processor for audio-only prompts (the stock one needs torchvision for its video part)."""

    family = "Qwen3-Omni"
    # As the stock processor: pad to the clip itself, never cut at the extractor's 30 s window.
    feature_options = {"padding": True, "truncation": False}
    token_count = staticmethod(audio_token_count)

    def __init__(self, feature_extractor, tokenizer, chat_template: str | None):
        super().__init__(feature_extractor, tokenizer, chat_template)
        self.audio_token = getattr(tokenizer, "audio_token", None) or AUDIO_TOKEN


def load_qwen3_omni_processor(path: str, **kwargs):
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen3OmniMoeProcessor

        return Qwen3OmniMoeProcessor.from_pretrained(path, **kwargs)
    return Qwen3OmniAudioProcessor.from_pretrained(path, **kwargs)


def load_thinker_config(path: str, **kwargs):
    """The thinker's config from a full Qwen3-Omni checkpoint or a thinker-only one."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig

    return thinker_config_from(path, "qwen3_omni_moe", Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig, **kwargs)


class Qwen3OmniMoeAdapter(Qwen2_5OmniAdapter):
    family = "Qwen3-Omni-MoE thinker"
    model_types = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")
    random_model = "audiokv_cli.testing.families:build_random_qwen3_omni_thinker"
    seconds_per_audio_token = 1.0 / 13
    # No window cuts the audio; this bounds one prompt at about 15,600 audio tokens.
    max_audio_seconds = 1200.0

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        # The parent reads the limit from the extractor's padding window, which this family does not cut at.
        self.max_audio_seconds = type(self).max_audio_seconds

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, device_map=None, **kwargs):
        from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

        common = dict(trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        thinker_config = load_thinker_config(path, **common)
        # A full checkpoint stores the thinker under `thinker.`; loading the thinker class from it reads only those.
        model = cls.pretrained(
            Qwen3OmniMoeThinkerForConditionalGeneration, path, config=thinker_config, device=device, dtype=dtype, device_map=device_map, **common
        )
        return cls(model, load_qwen3_omni_processor(path, **common), name, revision)

    def conversation(self, prompt: str | None) -> list[dict]:
        instruction = ASR_INSTRUCTION_QWEN3_OMNI if prompt is None else prompt
        return [
            {
                "role": "user",
                "content": [{"type": "audio", "audio_url": "clip.wav"}, {"type": "text", "text": instruction}],
            },
        ]
