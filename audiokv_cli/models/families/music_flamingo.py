"""Music Flamingo (NVIDIA): Audio Flamingo 3's encoder with rotary time embeddings, for music and sound, feeding a
Qwen2.5 decoder; each clip's audio tokens sit between `<|sound_bos|>` and `<|sound_eos|>`."""

from __future__ import annotations

from audiokv_cli.models.audio_lm import AudioLMAdapter


class MusicFlamingoAdapter(AudioLMAdapter):
    family = "Music Flamingo"
    model_types = ("musicflamingo",)
    random_model = "audiokv_cli.testing.families:build_random_music_flamingo"
    model_class = "MusicFlamingoForConditionalGeneration"
    # Audio Flamingo 3's tower: 10 ms mel frames, a stride-2 convolution, stride-2 average pooling: 40 ms per token.
    # The instruction before the audio, as Audio Flamingo 3's transcription request orders them.
    audio_first = False
    seconds_per_audio_token = 0.04
    # The processor encodes up to 40 windows of 30 s (its `max_audio_len`) and drops the rest with a warning.
    max_audio_seconds = 1200.0

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        limit = getattr(processor, "max_audio_len", None)
        if limit:
            self.max_audio_seconds = float(limit)
