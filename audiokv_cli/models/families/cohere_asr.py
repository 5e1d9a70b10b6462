"""Cohere Transcribe (`cohere_asr`): a FastConformer (Parakeet) encoder, one frame per 80 ms of audio, and a
Transformer decoder that reads it through cross-attention, like Whisper (models/encoder_decoder.py).

What is compressed: the decoder's cross-attention K/V over the encoder frames, every decoder layer (the config's
defaults: 8 layers of 8 heads, head size 128); retention counts the clip's frames.
Prompt: the decoder prompt the processor builds for English with punctuation
(`▁<|startofcontext|><|startoftranscript|><|emo:undefined|><|en|><|en|><|pnc|><|noitn|><|notimestamp|><|nodiarize|>`),
after the decoder start token where `generate` would put one; no `--prompt`: the model transcribes.
Audio: 10 ms mel frames, three stride-2 convolutions: 80 ms per frame, every frame the clip's own (no padding
window as in Whisper). Limit: the feature extractor's `max_audio_clip_s` (35 s released); a longer clip would be cut
into chunks transcribed one by one, so it is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE, check_length
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.base import PreparedInput
from audiokv_cli.models.encoder_decoder import EncoderDecoderAdapter

ASR_LANGUAGE = "en"


class CohereAsrAdapter(EncoderDecoderAdapter):
    family = "Cohere ASR"
    model_types = ("cohere_asr",)
    random_model = "audiokv_cli.testing.families:build_random_cohere_asr"
    seconds_per_audio_token = 0.08
    max_audio_seconds = 35.0

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        ids = list(processor.get_decoder_prompt_ids(language=ASR_LANGUAGE, punctuation=True))
        # The prompt as `generate` runs it: the decoder start token (else BOS) goes first unless the processor's
        # prompt already starts with it.
        generation = model.generation_config
        start = generation.decoder_start_token_id
        start = generation.bos_token_id if start is None else start
        self.prompt_ids = ([int(start)] if start is not None and ids[0] != start else []) + ids
        limit = getattr(processor.feature_extractor, "max_audio_clip_s", None)
        if limit:
            self.max_audio_seconds = float(limit)

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, device_map=None, **kwargs):
        from transformers import CohereAsrForConditionalGeneration, CohereAsrProcessor

        common = dict(revision=revision, **kwargs)
        processor = CohereAsrProcessor.from_pretrained(path, **common)
        model = cls.pretrained(
            CohereAsrForConditionalGeneration, path, device=device, dtype=dtype, device_map=device_map, **common
        )
        return cls(model, processor, name, revision)

    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        if prompt is not None:
            raise AudiokvError(f"{self.name}: Cohere ASR transcribes speech; it takes no --prompt")
        # Over the limit the feature extractor splits the clip into chunks the model transcribes one at a time.
        check_length(audio, self.max_audio_seconds)
        features = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        mask = features["attention_mask"]
        # The encoder's own length arithmetic for its subsampling convolutions: the frames the cache will hold.
        frames = int(self.model.model.encoder._get_subsampling_output_length(mask.sum(-1))[0])
        input_ids = torch.tensor([self.prompt_ids], device=self.device)
        inputs = {
            "input_features": features["input_features"].to(self.device, self.dtype),
            "input_features_mask": mask.to(self.device),
            "input_ids": input_ids,
        }
        return PreparedInput(
            inputs=inputs,
            input_ids=input_ids,
            audio_spans=[(0, frames)],
            audio_seconds=len(audio) / SAMPLE_RATE,
            prompt=self.processor.tokenizer.decode(self.prompt_ids),
            cached_length=frames,
        )

    def encode(self, inputs: dict) -> torch.Tensor:
        features = inputs["input_features"]
        encoded = self.model.model.encoder(features, attention_mask=inputs["input_features_mask"][: features.shape[0]])
        # Frames past the clip (the STFT's last) are masked in the encoder; keeping only the clip's frames spares the
        # cross-attention a mask.
        return encoded.last_hidden_state[:, : int(encoded.attention_mask[0].sum())]

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        for value in (self.model.generation_config.eos_token_id, self.model.config.eos_token_id):
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
        return sorted({int(i) for i in ids if i is not None})
