"""OpenAI Whisper (`WhisperForConditionalGeneration`): its audio KV cache is the decoder's cross-attention
(models/encoder_decoder.py).

Every decoder layer reads the encoded audio (1,500 frames of 20 ms, a 30 s window) through cross-attention: the
part of Whisper's decoding memory that grows with the audio. Retention counts all 1,500 frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from audiokv_cli.audio import SAMPLE_RATE
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.base import AttentionGeometry, PreparedInput
from audiokv_cli.models.encoder_decoder import EncoderDecoderAdapter


class WhisperAdapter(EncoderDecoderAdapter):
    model_types = ("whisper",)
    # The encoder's two convolutions give one frame per 20 ms; 1,500 frames are one 30 s window.
    seconds_per_audio_token = 0.02
    max_audio_seconds = 30.0
    tiny_model = "audiokv_cli.testing_families:build_tiny_whisper"

    def __init__(self, model, processor, name, revision=None, language: str = "en"):
        super().__init__(model, processor, name, revision)
        self.language = language
        tokenizer = processor.tokenizer
        self.end_of_text = int(model.config.eos_token_id)
        self.multilingual = model.config.vocab_size >= 51865
        self._suppress = torch.tensor(sorted(set(model.config.suppress_tokens or [])), dtype=torch.long)
        self._suppress_first = torch.tensor(sorted(set(model.config.begin_suppress_tokens or [])), dtype=torch.long)
        ids = [int(model.config.decoder_start_token_id)]
        if self.multilingual:
            language_id = tokenizer.convert_tokens_to_ids(f"<|{language}|>")
            if not isinstance(language_id, int) or language_id == tokenizer.unk_token_id:
                raise AudiokvError(f"{name}: unknown language {language!r}")
            ids += [language_id, tokenizer.convert_tokens_to_ids("<|transcribe|>")]
        ids.append(tokenizer.convert_tokens_to_ids("<|notimestamps|>"))
        self.prompt_ids = ids

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, device_map=None, **kwargs):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        common = dict(revision=revision, **kwargs)
        processor = WhisperProcessor.from_pretrained(path, **common)
        model = cls.pretrained(
            WhisperForConditionalGeneration, path, device=device, dtype=dtype, device_map=device_map, **common
        )
        return cls(model, processor, name, revision)

    @property
    def geometry(self) -> AttentionGeometry:
        cfg = self.model.config
        heads = cfg.decoder_attention_heads
        return AttentionGeometry(
            num_layers=cfg.decoder_layers,
            num_query_heads=heads,
            num_kv_heads=heads,
            head_dim=cfg.d_model // heads,
            hidden_size=cfg.d_model,
        )

    @property
    def frames(self) -> int:
        return int(self.model.config.max_source_positions)

    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        if prompt is not None:
            raise AudiokvError("Whisper transcribes speech; it takes no --prompt")
        seconds = len(audio) / SAMPLE_RATE
        if seconds > self.max_audio_seconds:
            raise AudiokvError(f"Whisper hears at most {self.max_audio_seconds:.0f} s per clip; this one is {seconds:.1f} s")
        features = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        input_ids = torch.tensor([self.prompt_ids], device=self.device)
        inputs = {
            "input_features": features.input_features.to(self.device, self.dtype),
            "input_ids": input_ids,
        }
        # Every frame of the window is cached; the clip's own frames are the audio, the rest is the silence
        # padding Whisper reads to find where speech ends (evictable, but not audio).
        speech_frames = min(self.frames, math.ceil(seconds / self.seconds_per_audio_token))
        return PreparedInput(
            inputs=inputs,
            input_ids=input_ids,
            audio_spans=[(0, speech_frames)],
            audio_seconds=seconds,
            prompt=self.processor.tokenizer.decode(self.prompt_ids),
            cached_length=self.frames,
        )

    def encode(self, inputs: dict) -> torch.Tensor:
        return self.model.model.encoder(inputs["input_features"]).last_hidden_state

    def next_token_logits(self, inputs: dict, cache) -> torch.Tensor:
        """Whisper's own decoding rules apply: its suppressed tokens never, its first-step ones not first."""
        logits = super().next_token_logits(inputs, cache).float()
        logits[:, self._suppress.to(logits.device)] = float("-inf")
        if "input_features" in inputs:
            logits[:, self._suppress_first.to(logits.device)] = float("-inf")
        return logits

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.end_of_text]
