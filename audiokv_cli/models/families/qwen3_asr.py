"""Qwen3-ASR: a chunked Whisper-style encoder (13 tokens per second of audio) feeding a Qwen3 decoder.

It is a transcription model, not an instruction follower: the user turn holds only the audio, a free-form prompt
becomes the system turn (Qwen's "context" for hot words and domain), and the ASR prompt pre-fills the assistant turn
with `language English<asr_text>` as the processor's `apply_transcription_request` does, so the model writes the
transcript alone.
"""

from __future__ import annotations

from audiokv_cli.models.audio_lm import AudioLMAdapter

ASR_LANGUAGE = "English"
ASR_TEXT_MARKER = "<asr_text>"


class Qwen3ASRAdapter(AudioLMAdapter):
    family = "Qwen3-ASR"
    model_types = ("qwen3_asr",)
    random_model = "audiokv_cli.testing.families:build_random_qwen3_asr"
    model_class = "Qwen3ASRForConditionalGeneration"
    # 100 mel frames (1 s) per encoder chunk, three stride-2 convolutions: 13 tokens per full second.
    seconds_per_audio_token = 1.0 / 13
    # The encoder takes any length (8 s attention windows); this bounds one prompt at about 15,600 audio tokens.
    max_audio_seconds = 1200.0

    def conversation(self, prompt: str | None) -> list[dict]:
        messages = []
        if prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": prompt}]})
        messages.append({"role": "user", "content": [{"type": "audio", "audio": "clip.wav"}]})
        if prompt is None:
            prefill = f"language {ASR_LANGUAGE}<asr_text>"
            messages.append({"role": "assistant", "content": [{"type": "text", "text": prefill}]})
        return messages

    def prompt_text(self, prompt: str | None) -> str:
        continuing = prompt is None
        return self.processor.apply_chat_template(
            self.conversation(prompt),
            add_generation_prompt=not continuing,
            continue_final_message=continuing,
            tokenize=False,
        )

    def decode(self, token_ids) -> str:
        # Without a forced language the model writes `language X<asr_text>` before the transcript.
        ids = list(token_ids)
        marker = self.processor.tokenizer.convert_tokens_to_ids(ASR_TEXT_MARKER)
        if marker in ids:
            ids = ids[len(ids) - ids[::-1].index(marker) :]
        return super().decode(ids).split(ASR_TEXT_MARKER, 1)[-1].strip()
