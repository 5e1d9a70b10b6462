"""Voxtral (Mistral): a Whisper-large-style encoder over 30 s chunks, 4 frames stacked per token, a Llama-style decoder.

Prompts are Mistral's instruct format, built here from the tokenizer's control tokens rather than through
`mistral-common` (which transformers' `VoxtralProcessor` needs to render any prompt):
transcription `<s>[INST][BEGIN_AUDIO][AUDIO]x N[/INST]lang:en[TRANSCRIBE]` as `TranscriptionRequest` encodes it,
a free-form prompt `<s>[INST][BEGIN_AUDIO][AUDIO]x N{prompt}[/INST]`. The audio is padded to a whole number of 30 s
chunks (the released processor's `pad_to_multiple_of` 480,000 samples), and every chunk gives 375 tokens, padding
included: a 2 s clip costs as many tokens as a 30 s one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE, check_length
from audiokv_cli.models.audio_lm import AudioLMAdapter
from audiokv_cli.models.base import PreparedInput

ASR_LANGUAGE = "en"
CHUNK_SECONDS = 30


class VoxtralAudioProcessor:
    """Log-mel features in 30 s chunks and Mistral-format prompts for one clip."""

    def __init__(self, feature_extractor, tokenizer):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str, **kwargs):
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        hub = {key: kwargs[key] for key in ("revision", "local_files_only") if key in kwargs}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        except ImportError as error:
            from audiokv_cli.errors import AudiokvError

            raise AudiokvError(f"{path}: Voxtral's tokenizer needs `pip install mistral-common` ({error})") from None
        return cls(WhisperFeatureExtractor.from_pretrained(path, **hub), tokenizer)

    def token_id(self, token: str) -> int:
        value = self.tokenizer.convert_tokens_to_ids(token)
        if value is None or value == self.tokenizer.unk_token_id:
            raise ValueError(f"the Voxtral tokenizer has no {token} token")
        return int(value)

    def features(self, audio: np.ndarray) -> torch.Tensor:
        """``[chunks, mel bins, 3000]``: the clip padded to whole 30 s chunks, one batch row per chunk."""
        window = CHUNK_SECONDS * SAMPLE_RATE
        padded = np.zeros(max(1, math.ceil(len(audio) / window)) * window, dtype=np.float32)
        padded[: len(audio)] = audio
        chunks = [padded[start : start + window] for start in range(0, len(padded), window)]
        return self.feature_extractor(
            chunks, sampling_rate=SAMPLE_RATE, padding="max_length", return_tensors="pt"
        )["input_features"]

    def input_ids(self, audio_tokens: int, prompt: str | None, audio_token_id: int) -> list[int]:
        head = [self.token_id("<s>"), self.token_id("[INST]"), self.token_id("[BEGIN_AUDIO]")]
        head += [audio_token_id] * audio_tokens
        text = lambda value: self.tokenizer.encode(value, add_special_tokens=False)  # noqa: E731
        if prompt is None:
            return head + [self.token_id("[/INST]")] + text(f"lang:{ASR_LANGUAGE}") + [self.token_id("[TRANSCRIBE]")]
        return head + text(prompt) + [self.token_id("[/INST]")]


class VoxtralAdapter(AudioLMAdapter):
    family = "Voxtral"
    model_types = ("voxtral",)
    random_model = "audiokv_cli.testing.families:build_random_voxtral"
    model_class = "VoxtralForConditionalGeneration"
    # 20 ms encoder frames, four stacked per token: 80 ms (375 tokens per 30 s chunk).
    seconds_per_audio_token = 0.08
    # Mistral's documented limit for transcription (40 min for understanding): 60 chunks, 22,500 audio tokens.
    max_audio_seconds = 1800.0

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, device_map=None, **kwargs):
        from transformers import VoxtralForConditionalGeneration

        common = dict(trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        model = cls.pretrained(
            VoxtralForConditionalGeneration, path, device=device, dtype=dtype, device_map=device_map, **common
        )
        return cls(model, VoxtralAudioProcessor.from_pretrained(path, **common), name, revision)

    @property
    def tokens_per_chunk(self) -> int:
        audio = self.model.config.audio_config
        frames = audio.max_source_positions  # encoder frames per 30 s chunk
        return frames * audio.hidden_size // audio.intermediate_size

    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        check_length(audio, self.max_audio_seconds)
        features = self.processor.features(audio)
        ids = self.processor.input_ids(features.shape[0] * self.tokens_per_chunk, prompt, self.audio_token_id)
        input_ids = torch.tensor([ids])
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "input_features": features}
        # The prompt as text, with the audio run shown as one placeholder.
        text = self.processor.tokenizer.decode(
            self.processor.input_ids(1, prompt, self.audio_token_id), skip_special_tokens=False
        )
        return self.prepared_input(batch, audio, text, self.audio_token_id)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = super().eos_token_ids
        return sorted(set(ids) | {self.processor.token_id("</s>")})
