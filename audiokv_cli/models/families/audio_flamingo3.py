"""Audio Flamingo 3 (NVIDIA): a Whisper-large-style encoder over 30 s windows feeding a Qwen2.5 decoder."""

from __future__ import annotations

from audiokv_cli.models.audio_lm import AudioLMAdapter


class AudioFlamingo3Adapter(AudioLMAdapter):
    family = "Audio Flamingo 3"
    model_types = ("audioflamingo3",)
    random_model = "audiokv_cli.testing.families:build_random_audio_flamingo3"
    model_class = "AudioFlamingo3ForConditionalGeneration"
    # 10 ms mel frames, a stride-2 convolution, then stride-2 average pooling: 40 ms per token, as Qwen2-Audio.
    # The instruction comes before the audio, as the processor's `apply_transcription_request` orders them.
    audio_first = False
    seconds_per_audio_token = 0.04
    # The processor encodes up to 20 windows of 30 s per clip (its `max_audio_len`) and drops the rest with a warning.
    max_audio_seconds = 600.0
    asr_instruction = "Transcribe the input speech."

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        limit = getattr(processor, "max_audio_len", None)
        if limit:
            self.max_audio_seconds = float(limit)
