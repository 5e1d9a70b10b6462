"""Gemma-3n (Google): a USM-style conformer audio encoder, 188 soft tokens per clip, and a decoder whose layers
mix sliding-window and global attention and whose last layers share an earlier layer's keys and values.

What audiokv does with it:
- **KV sharing.** The last `num_kv_shared_layers` decoder layers (10 of 30 in E2B, 15 of 35 in E4B) compute no keys
  or values: each reads the cache of the last earlier layer of its kind. Only the cache-owning layers are
  compressed (`compressed_layers`), each once; a sharing layer attends over its source's dense keys in prefill and
  over its source's compressed cache afterwards (`cache_sources`), so it always sees what the source kept.
- **Sliding windows.** Four of every five layers attend to the last `sliding_window` (512) positions. Such a layer
  is compressed among the prompt entries the first generated token still sees, and its compressed cache drops
  entries as the window moves on (`sliding_window`; `compression.cache.RaggedLayer.expire`).
- **Audio.** The processor always inserts 188 audio soft tokens (30 s at 160 ms each); a shorter clip's features
  are followed by padding embeddings inside that span. Clips over 30 s are refused (the feature extractor would cut
  them without a word).
- **No vision tower.** audiokv feeds audio and text only, so the model is built without its timm vision tower
  (`without_vision_tower`): timm is not needed and the tower's weights (MobileNet-V5, about 0.3 B parameters) are
  skipped when loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from audiokv_cli.models.audio_lm import AudioLMAdapter

ASR_INSTRUCTION = "Transcribe the following speech segment in English:"


class _NoVisionTower(torch.nn.Module):
    """Stands in for the vision tower: no parameters, and a clear error if an image ever reaches it."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("audiokv loads Gemma-3n without its vision tower; images are not supported")


@contextlib.contextmanager
def without_vision_tower() -> Iterator[None]:
    """Build Gemma-3n models in the block with a parameterless stand-in for the vision tower."""
    from transformers.models.gemma3n import modeling_gemma3n

    auto_model = modeling_gemma3n.AutoModel

    class _AutoModelWithoutVision:
        @staticmethod
        def from_config(config, *args, **kwargs):
            if getattr(config, "model_type", None) == "gemma3n_vision":
                return _NoVisionTower()
            return auto_model.from_config(config, *args, **kwargs)

    modeling_gemma3n.AutoModel = _AutoModelWithoutVision
    try:
        yield
    finally:
        modeling_gemma3n.AutoModel = auto_model


def gemma3n_processor(feature_extractor, tokenizer, chat_template: str | None = None):
    """The stock `Gemma3nProcessor` with a placeholder image processor: audiokv sends no images, and the released
    one needs torchvision."""
    from transformers import Gemma3nProcessor

    try:
        from transformers import SiglipImageProcessorPil as ImageProcessor
    except ImportError:  # transformers before the torchvision/PIL split: the plain class is the PIL one
        from transformers import SiglipImageProcessor as ImageProcessor

    return Gemma3nProcessor(
        feature_extractor=feature_extractor, image_processor=ImageProcessor(), tokenizer=tokenizer,
        chat_template=chat_template if chat_template is not None else tokenizer.chat_template,
    )


class Gemma3nAdapter(AudioLMAdapter):
    family = "Gemma-3n"
    model_types = ("gemma3n",)
    random_model = "audiokv_cli.testing.families:build_random_gemma3n"
    model_class = "Gemma3nForConditionalGeneration"
    asr_instruction = ASR_INSTRUCTION
    audio_first = False
    # 10 ms mel frames, two stride-2 convolutions, then a 4x reduction in the conformer: 160 ms per soft token.
    seconds_per_audio_token = 0.16
    # The feature extractor's window (480,000 samples) and the model's 188 soft tokens.
    max_audio_seconds = 30.0

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, device_map=None, **kwargs):
        from transformers import AutoTokenizer, Gemma3nAudioFeatureExtractor, Gemma3nForConditionalGeneration

        common = dict(trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        hub = {key: common[key] for key in ("revision", "local_files_only") if key in common}
        processor = gemma3n_processor(
            Gemma3nAudioFeatureExtractor.from_pretrained(path, **hub), AutoTokenizer.from_pretrained(path, **hub)
        )
        with without_vision_tower():
            model = cls.pretrained(
                Gemma3nForConditionalGeneration, path, device=device, dtype=dtype, device_map=device_map, **common
            )
        return cls(model, processor, name, revision)

    @property
    def geometry(self):
        return dataclasses.replace(super().geometry, num_cache_layers=len(self.compressed_layers()))

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        config = self.text_config
        kinds = config.layer_types
        first_shared = config.num_hidden_layers - (config.num_kv_shared_layers or 0)
        # A sharing layer reads the last layer of its kind before the sharing ones. Computed once: every attention
        # call of every decode step looks it up.
        self._sources = tuple(
            layer if layer < first_shared else max(i for i in range(first_shared) if kinds[i] == kinds[layer])
            for layer in range(config.num_hidden_layers)
        )

    def cache_sources(self) -> list[int]:
        return list(self._sources)

    def cache_layer_index(self, module: torch.nn.Module) -> int | None:
        return self._sources[module.layer_idx]

    def profile_layer_index(self, module: torch.nn.Module) -> int | None:
        return module.layer_idx

    def sliding_window(self, layer_idx: int) -> int | None:
        config = self.text_config
        return config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

    def next_token_logits(self, inputs: dict, cache) -> torch.Tensor:
        logits = super().next_token_logits(inputs, cache)
        cap = self.text_config.final_logit_softcapping
        # The model's own head squashes logits into (-cap, cap); greedy choices do not change, log-probs do.
        return torch.tanh(logits / cap) * cap if cap is not None else logits
