"""Omnilingual ASR LLM (Meta, `omniasr`): a wav2vec2-style encoder (one token per 20 ms of audio) feeding a Llama
decoder that writes the transcript.

A transcription model with no instruction: the user turn holds the audio and, for ASR, the language marker
`<|lang:eng_latn|>`, as the processor's `apply_transcription_request(language="en")` builds it. A free-form
`--prompt` has no place in its prompt and is refused.
"""

from __future__ import annotations

from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.audio_lm import AudioLMAdapter

ASR_LANGUAGE = "en"  # the processor maps it to the `<|lang:eng_latn|>` token


class OmniASRAdapter(AudioLMAdapter):
    family = "Omnilingual ASR LLM"
    model_types = ("omniasr",)
    random_model = "audiokv_cli.testing.families:build_random_omniasr"
    model_class = "OmniASRForConditionalGeneration"
    # The convolutional feature encoder strides 5 x 2^6 = 320 samples: 20 ms per token (1,500 per 30 s).
    seconds_per_audio_token = 0.02
    # The encoder attends over the whole clip at once; this bounds one prompt at 6,000 audio tokens, inside the
    # decoder's 8,192 positions.
    max_audio_seconds = 120.0

    def conversation(self, prompt: str | None) -> list[dict]:
        if prompt is not None:
            raise AudiokvError(f"{self.name}: this transcription model takes no instruction; run it without --prompt")
        content = [{"type": "audio", "audio": "clip.wav"}, {"type": "language", "language": ASR_LANGUAGE}]
        return [{"role": "user", "content": content}]
