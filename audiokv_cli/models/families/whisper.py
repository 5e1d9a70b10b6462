"""OpenAI Whisper (`WhisperForConditionalGeneration`): its audio KV cache is the decoder's cross-attention
(models/encoder_decoder.py).

Every decoder layer reads the encoded audio (1,500 frames of 20 ms, a 30 s window) through cross-attention: the
part of Whisper's decoding memory that grows with the audio. Retention counts all 1,500 frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.base import AttentionGeometry, PreparedInput
from audiokv_cli.models.encoder_decoder import EncoderDecoderAdapter


class WhisperAdapter(EncoderDecoderAdapter):
    model_types = ("whisper",)
    # The encoder's two convolutions give one frame per 20 ms; 1,500 frames are one 30 s window.
    seconds_per_audio_token = 0.02
    max_audio_seconds = 30.0
    latent_cross_attention = True
    random_model = "audiokv_cli.testing.families:build_random_whisper"

    def __init__(self, model, processor, name, revision=None, language: str = "en"):
        super().__init__(model, processor, name, revision)
        self.language = language
        tokenizer = processor.tokenizer
        self.end_of_text = int(model.config.eos_token_id)
        self.multilingual = model.config.vocab_size >= 51865
        self._suppress = torch.tensor(sorted(set(model.config.suppress_tokens or [])), dtype=torch.long)
        self._suppress_first = torch.tensor(sorted(set(model.config.begin_suppress_tokens or [])), dtype=torch.long)
        self.start_of_transcript = int(model.config.decoder_start_token_id)
        self.no_timestamps = int(tokenizer.convert_tokens_to_ids("<|notimestamps|>"))
        # Timestamp tokens <|0.00|> ... <|30.00|> follow <|notimestamps|> in every Whisper vocabulary.
        self.timestamp_begin = self.no_timestamps + 1
        self.start_of_previous = self._special_id(tokenizer, "<|startofprev|>")
        self.no_speech = self._special_id(tokenizer, "<|nospeech|>", "<|nocaptions|>")
        self.set_language(language)

    @staticmethod
    def _special_id(tokenizer, *names: str) -> int | None:
        """The id of the first of ``names`` the vocabulary has (the English-only and multilingual ones differ)."""
        for token in names:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                return int(token_id)
        return None

    def language_ids(self) -> dict[str, int]:
        """``{"en": id of <|en|>, ...}``: the language tokens of a multilingual vocabulary (empty for .en models)."""
        if not self.multilingual:
            return {}
        tokenizer = self.processor.tokenizer
        codes = getattr(self.model.generation_config, "lang_to_id", None) or {}
        if codes:
            return {token[2:-2]: int(token_id) for token, token_id in codes.items()}
        found = {}
        for token, token_id in tokenizer.get_vocab().items():
            code = token[2:-2]
            if token.startswith("<|") and token.endswith("|>") and 2 <= len(code) <= 3 and code.isalpha() and code.islower():
                found[code] = int(token_id)
        return found

    def set_language(self, language: str) -> None:
        """The language written into the prompt (multilingual checkpoints); ``auto`` is resolved per clip by
        `detect_language`. English-only checkpoints take ``en`` (or ``auto``) only."""
        tokenizer = self.processor.tokenizer
        if not self.multilingual:
            if language not in ("en", "auto"):
                raise AudiokvError(f"{self.name} is an English-only model; --language {language} needs a multilingual one")
            language = "en"
        elif language != "auto" and language not in self.language_ids():
            raise AudiokvError(f"{self.name}: unknown language {language!r} (use a code such as en, de, fr, or auto)")
        self.language = language
        ids = [self.start_of_transcript]
        if self.multilingual:
            # `auto` before detection: English (run_clip and the long-form path detect and set it per clip)
            code = "en" if language == "auto" else language
            ids += [self.language_ids()[code], int(tokenizer.convert_tokens_to_ids("<|transcribe|>"))]
        #: the long-form prompt: Whisper writes timestamp tokens after it
        self.timestamp_prompt_ids = list(ids)
        self.prompt_ids = ids + [self.no_timestamps]

    def detect_language(self, audio: np.ndarray) -> str:
        """Whisper's language identification: the most likely language token after <|startoftranscript|> for the
        first 30 s of ``audio``. Sets and returns the code."""
        if not self.multilingual:
            return "en"
        features = self.processor.feature_extractor(
            audio[: int(self.max_audio_seconds * SAMPLE_RATE)], sampling_rate=SAMPLE_RATE, return_tensors="pt"
        )
        languages = self.language_ids()
        with torch.no_grad():
            encoded = self.model.model.encoder(features.input_features.to(self.device, self.dtype)).last_hidden_state
            hidden = self.model.model.decoder(
                input_ids=torch.tensor([[self.start_of_transcript]], device=self.device),
                encoder_hidden_states=encoded, use_cache=False,
            ).last_hidden_state[:, -1]
            logits = self.model.proj_out(hidden)[0].float()
        codes = list(languages)
        best = int(logits[torch.tensor([languages[c] for c in codes], device=logits.device)].argmax())
        language = self.language
        self.set_language(codes[best])
        self.language = language if language == "auto" else codes[best]
        return codes[best]

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

    def prepare_window(self, audio: np.ndarray, prompt_ids: list[int]) -> PreparedInput:
        """One 30 s window of a long recording (models/../longform.py): ``audio`` at most 30 s, decoded after
        ``prompt_ids`` (the previous text and the timestamp prompt) instead of the clip prompt."""
        seconds = len(audio) / SAMPLE_RATE
        features = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        input_ids = torch.tensor([prompt_ids], device=self.device)
        speech_frames = max(1, min(self.frames, math.ceil(seconds / self.seconds_per_audio_token)))
        return PreparedInput(
            inputs={"input_features": features.input_features.to(self.device, self.dtype), "input_ids": input_ids},
            input_ids=input_ids,
            audio_spans=[(0, speech_frames)],
            audio_seconds=seconds,
            prompt=self.processor.tokenizer.decode(prompt_ids),
            cached_length=self.frames,
        )

    def prepared_from_inputs(self, inputs: dict) -> PreparedInput:
        """The feature extractor's output for one clip (the Python API's `compress`): every encoder frame of the
        window is cached; how much of it is speech is not known here, so all of it counts as audio."""
        features = inputs.get("input_features")
        if features is None:
            raise AudiokvError("compress() needs the feature extractor's input_features for Whisper")
        if features.shape[0] != 1:
            raise AudiokvError(f"compress() takes one clip, got a batch of {features.shape[0]}")
        prompt = inputs.get("decoder_input_ids")
        input_ids = prompt if prompt is not None else torch.tensor([self.prompt_ids], device=features.device)
        return PreparedInput(
            inputs=dict(inputs), input_ids=input_ids, audio_spans=[(0, self.frames)],
            audio_seconds=self.frames * self.seconds_per_audio_token, cached_length=self.frames,
        )

    def window_logits(self, inputs: dict, cache, sot_index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill of a window batch: the next-token logits ``[B, vocab]`` (suppression applied, as
        `next_token_logits`) and the raw logits at each row's <|startoftranscript|> ``[B, vocab]`` (where Whisper
        predicts <|nospeech|>)."""
        hidden = self.hidden_states(inputs, cache)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at_sot = self.model.proj_out(hidden[rows, torch.tensor(sot_index, device=hidden.device)]).float()
        logits = self.model.proj_out(hidden[:, -1]).float()
        logits[:, self._suppress.to(logits.device)] = float("-inf")
        logits[:, self._suppress_first.to(logits.device)] = float("-inf")
        return logits, at_sot

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
