"""MOSS-Transcribe-Diarize (OpenMOSS): a Whisper-medium encoder over 30 s windows, four frames merged per token,
feeding a Qwen3 decoder that writes a speaker-diarized transcript with timestamps (`[0.48][S01]text[1.66]...`).

What is compressed: the Qwen3 decoder's self-attention cache, every layer (the config's defaults: 28 layers, 16 query
and 8 KV heads of 128).
Prompt: the checkpoint's chat template with the audio alone in the user turn; the template appends the model's
trained instruction (transcribe, each segment opened by its start time and speaker `[S01]`, closed by its end time).
A `--prompt` becomes the template's context line (`补充信息：...`) before that instruction, as the processor's
`apply_transcription_request(prompt=...)` places it.
Audio: 80 ms per token (12.5 per second); every 30 s window is rounded up to whole tokens on its own. The processor
writes the elapsed seconds as text (`2`, `4`, ...) after every 2 s of audio tokens (its `time_marker_every_seconds`),
so a clip is many short audio spans with these markers between them. Limit: the processor takes any length
(consecutive 30 s windows); 60 minutes is a bound chosen here.
Output: `decode` keeps the segments' text, without timestamps and speaker tags (the processor's
`extract_transcription`), which is what WER compares.
"""

from __future__ import annotations

from audiokv_cli.models.audio_lm import AudioLMAdapter, extract_transcription


class MossTranscribeDiarizeAdapter(AudioLMAdapter):
    family = "MOSS-Transcribe-Diarize"
    model_types = ("moss_transcribe_diarize",)
    random_model = "audiokv_cli.testing.families:build_random_moss_transcribe_diarize"
    model_class = "MossTranscribeDiarizeForConditionalGeneration"
    # 10 ms mel frames, a stride-2 convolution, then four frames merged: 80 ms per token.
    seconds_per_audio_token = 0.08
    # 45,000 audio tokens plus 1,800 time markers: well inside the Qwen3 decoder's 131,072 positions, with room for
    # the diarized transcript of an hour.
    max_audio_seconds = 3600.0

    def conversation(self, prompt: str | None) -> list[dict]:
        # The template supplies the instruction; a text item is context for it, not a replacement.
        content = [{"type": "audio", "audio": "clip.wav"}]
        if prompt is not None:
            content.append({"type": "text", "text": prompt})
        return [{"role": "user", "content": content}]

    def decode(self, token_ids) -> str:
        return extract_transcription(self.processor, super().decode(token_ids))
