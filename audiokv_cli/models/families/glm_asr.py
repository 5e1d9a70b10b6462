"""GLM-ASR (Z.ai): a Whisper-style encoder with rotary positions over 30 s windows, four frames merged per token,
feeding a Llama-style decoder."""

from __future__ import annotations

from audiokv_cli.models.audio_lm import AudioLMAdapter


class GlmAsrAdapter(AudioLMAdapter):
    family = "GLM-ASR"
    model_types = ("glmasr",)
    random_model = "audiokv_cli.testing.families:build_random_glm_asr"
    model_class = "GlmAsrForConditionalGeneration"
    # 10 ms mel frames, a stride-2 convolution, then four frames merged: 80 ms per token.
    seconds_per_audio_token = 0.08
    # The processor's `max_audio_len` (about 8,192 tokens, the decoder's context); it cuts beyond with a log line.
    max_audio_seconds = 655.0
    asr_instruction = "Please transcribe this audio into text"

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        limit = getattr(processor, "max_audio_len", None)
        if limit:
            self.max_audio_seconds = float(limit)
