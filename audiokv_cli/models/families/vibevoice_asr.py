"""VibeVoice-ASR (Microsoft): two convolutional audio tokenizers (acoustic and semantic, 24 kHz, 3,200 samples per
token) feeding a Qwen2.5 decoder that writes a speaker-diarized transcript as JSON segments.

What is compressed: the self-attention cache of the Qwen2.5 decoder, every layer.
Prompt: the checkpoint's chat template: its system turn, then the audio and `This is a N seconds audio, please
transcribe it with these keys: Start time, End time, Speaker ID, Content`. The template opens no assistant turn: the
model writes `<|im_start|>assistant` itself. A `--prompt` is the template's "extra info" (hot words, topic), as the
processor's `apply_transcription_request(prompt=...)` places it; the instruction stays.
Audio: resampled from audiokv's 16 kHz to the tokenizers' 24 kHz (the band above 8 kHz stays empty); 133.3 ms per
token (7.5 per second), the clip padded to whole tokens. The tokenizers encode 60 s chunks with their convolution
state carried across, so any length is one prompt. Limit: 60 minutes, VibeVoice-ASR's documented single-pass length.
The acoustic latents' σ-VAE noise is switched off (`vae_std` 0), so every run of a clip sees the same audio
embeddings: comparing eviction methods needs that.
Output: `decode` keeps the segments' `Content` (the processor's `extract_transcription`), which is what WER compares.
"""

from __future__ import annotations

import numpy as np

from audiokv_cli.io.audio import SAMPLE_RATE, check_length
from audiokv_cli.models.audio_lm import AudioLMAdapter, extract_transcription
from audiokv_cli.models.base import PreparedInput


class VibeVoiceAsrAdapter(AudioLMAdapter):
    family = "VibeVoice-ASR"
    model_types = ("vibevoice_asr",)
    random_model = "audiokv_cli.testing.families:build_random_vibevoice_asr"
    model_class = "VibeVoiceAsrForConditionalGeneration"
    # The tokenizers' strides multiply to 3,200 samples at 24 kHz.
    seconds_per_audio_token = 3200 / 24000
    max_audio_seconds = 3600.0

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        # Every forward adds Gaussian noise to the acoustic latents, its scale drawn from N(0, vae_std); at 0 a clip
        # gives the same embeddings in every run, `generate` included.
        model.config.acoustic_tokenizer_encoder_config.vae_std = 0.0

    def conversation(self, prompt: str | None) -> list[dict]:
        # The template supplies the instruction; a text item is context for it, not a replacement.
        content = [{"type": "audio", "audio": "clip.wav"}]
        if prompt is not None:
            content.append({"type": "text", "text": prompt})
        return [{"role": "user", "content": content}]

    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        import librosa

        check_length(audio, self.max_audio_seconds)
        rate = self.processor.feature_extractor.sampling_rate
        resampled = librosa.resample(audio, orig_sr=SAMPLE_RATE, target_sr=rate) if rate != SAMPLE_RATE else audio
        text = self.prompt_text(prompt)
        batch = self.processor(text=text, audio=[resampled], sampling_rate=rate, return_tensors="pt")
        return self.prepared_input(batch, audio, text, self.audio_token_id)

    def decode(self, token_ids) -> str:
        return extract_transcription(self.processor, super().decode(token_ids))
