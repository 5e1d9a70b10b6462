"""Qwen2-Audio (base and Instruct): a Whisper-style audio tower feeding a Qwen2 text decoder.

The tower encodes one 30 s window per audio item (the feature extractor pads or cuts to it), so a longer clip is
given as consecutive segments of at most 30 s, each its own audio item in the same prompt: nothing is cut.
"""

from __future__ import annotations

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE, check_length, split_audio
from audiokv_cli.compat import cache_kwargs
from audiokv_cli.models.base import ASR_INSTRUCTION, ModelAdapter, PreparedInput

BASE_PROMPT_PREFIX = "<|audio_bos|><|AUDIO|><|audio_eos|>"


class Qwen2AudioAdapter(ModelAdapter):
    family = "Qwen2-Audio"
    model_types = ("qwen2_audio",)
    random_model = "audiokv_cli.testing.qwen2_audio:build_random_qwen2_audio"
    # The tower makes one frame per 20 ms and average-pools by two.
    seconds_per_audio_token = 0.04
    # Longer clips are segmented; this bounds the prompt (15,000 audio tokens) and is checked before loading.
    max_audio_seconds = 600.0

    def __init__(self, model, processor, name, revision=None, prompt_style: str = "auto"):
        super().__init__(model, processor, name, revision)
        has_template = bool(getattr(processor, "chat_template", None))
        self.prompt_style = prompt_style if prompt_style != "auto" else ("chat" if has_template else "raw")

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, prompt_style="auto", device_map=None,
             **kwargs):
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        common = dict(trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        processor = AutoProcessor.from_pretrained(path, **common)
        model = cls.pretrained(
            Qwen2AudioForConditionalGeneration, path, device=device, dtype=dtype, device_map=device_map, **common
        )
        return cls(model, processor, name, revision, prompt_style)

    @property
    def text_config(self):
        return self.model.config.text_config

    def _language_model(self) -> torch.nn.Module:
        inner = getattr(self.model, "model", None)
        # transformers >= 5 nests the decoder as model.model.language_model; keep older layouts working.
        for candidate in (getattr(inner, "language_model", None), getattr(self.model, "language_model", None)):
            if candidate is None:
                continue
            return getattr(candidate, "model", candidate) if not hasattr(candidate, "layers") else candidate
        raise AttributeError("cannot find the Qwen2-Audio text decoder")

    def decoder_layers(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self._language_model().layers]

    def next_token_logits(self, inputs: dict, cache) -> torch.Tensor:
        # Project only the last position: the full [L, vocab] logits of a 7B model's prompt cost hundreds of MB.
        hidden = self.model.model(**inputs, **cache_kwargs(self.model.model, cache), use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[:, -1])

    @property
    def audio_token_id(self) -> int:
        return int(self.model.config.audio_token_id)

    @property
    def segment_seconds(self) -> float:
        """The feature extractor's window: the most audio one audio item holds."""
        extractor = self.processor.feature_extractor
        return extractor.n_samples / extractor.sampling_rate

    def prompt_text(self, prompt: str | None, segments: int = 1) -> str:
        instruction = prompt if prompt is not None else ASR_INSTRUCTION
        if self.prompt_style == "raw":
            return BASE_PROMPT_PREFIX * segments + instruction
        audio_items = [{"type": "audio", "audio_url": f"segment{index}.wav"} for index in range(segments)]
        conversation = [{"role": "user", "content": audio_items + [{"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        check_length(audio, self.max_audio_seconds)
        segments = split_audio(audio, self.segment_seconds)
        text = self.prompt_text(prompt, len(segments))
        batch = self.processor(text=text, audio=segments, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        prepared = self.prepared_input(batch, audio, text, self.audio_token_id)
        prepared.extra["audio_segments"] = len(segments)
        return prepared

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (configured, self.processor.tokenizer.eos_token_id):
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
        im_end = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        unknown = self.processor.tokenizer.unk_token_id
        if isinstance(im_end, int) and im_end != unknown:
            ids.append(im_end)
        return sorted({int(i) for i in ids if i is not None})
