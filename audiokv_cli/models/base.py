"""What audiokv needs to know about an audio-language model, whatever its family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE
from audiokv_cli.compat import cache_kwargs
from audiokv_cli.models.checkpoint_signature import weights_signature

ASR_INSTRUCTION = "Detect the language and recognize the speech: <|en|>"


def audio_spans(input_ids: torch.Tensor, audio_token_id: int) -> list[tuple[int, int]]:
    """Contiguous runs of the audio placeholder token, as [start, end) index pairs."""
    is_audio = (input_ids.reshape(-1) == audio_token_id).tolist()
    spans: list[tuple[int, int]] = []
    start = None
    for index, flag in enumerate(is_audio + [False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            spans.append((start, index))
            start = None
    return spans


@dataclass(frozen=True)
class AttentionGeometry:
    """Shape of the text decoder's attention, the part whose KV cache audiokv compresses."""

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    #: layers that own a cache, where some layers read another layer's (Gemma-3n); None: all of them.
    num_cache_layers: int | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head; query head h reads KV head h // group_size."""
        return self.num_query_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one prompt token occupies in a dense cache (keys and values, every layer and KV head)."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * (self.num_cache_layers or self.num_layers) * self.num_kv_heads * self.head_dim * element


@dataclass
class PreparedInput:
    """Model-ready tensors for one clip plus where its audio sits in the token sequence."""

    inputs: dict[str, torch.Tensor]
    input_ids: torch.Tensor
    audio_spans: list[tuple[int, int]]
    audio_seconds: float
    prompt: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: entries per head of the cache audiokv compresses, when it is not the prompt (Whisper: encoder frames).
    cached_length: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def compressed_length(self) -> int:
        """Prompt entries per head in the compressed cache: the prompt tokens, or the audio frames of a
        cross-attention cache."""
        return self.cached_length if self.cached_length is not None else self.prompt_tokens

    @property
    def audio_tokens(self) -> int:
        return sum(end - start for start, end in self.audio_spans)


class ModelAdapter(ABC):
    """Loads one model family and speaks its prompt format; everything downstream is family-agnostic."""

    #: transformers `model_type` values this adapter serves.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: seconds of audio per audio token when the family has an exact frame rate, else None.
    seconds_per_audio_token: ClassVar[float | None] = None
    #: the longest clip one prompt can hold.
    max_audio_seconds: ClassVar[float] = 30.0
    #: whose KV cache is compressed: the decoder's self-attention over the prompt ("self"), or an
    #: encoder-decoder's cross-attention over the encoded audio ("cross", Whisper).
    compressed_attention: ClassVar[str] = "self"

    def __init__(self, model: torch.nn.Module, processor: Any, name: str, revision: str | None = None):
        self.model = model
        self.processor = processor
        self.name = name
        self.revision = revision

    @classmethod
    @abstractmethod
    def load(cls, path: str, *, device: torch.device, dtype: torch.dtype, trust_remote_code: bool, name: str):
        """Build the adapter with model and processor from a local directory or cached Hub id."""

    @staticmethod
    def pretrained(model_class, path: str, *, device: torch.device, dtype: torch.dtype, device_map=None, **kwargs):
        """``model_class.from_pretrained`` in eval mode: on ``device``, or spread by accelerate's ``device_map``
        (``auto``: over the visible GPUs, then CPU and disk offload) when one is given. ``device_map`` is a name or
        the placement keywords themselves (``{"device_map": "auto", "max_memory": {...}}``, a torchrun rank's GPUs)."""
        if device_map is not None:
            placement = device_map if isinstance(device_map, dict) else {"device_map": device_map}
            return model_class.from_pretrained(path, dtype=dtype, **placement, **kwargs).eval()
        return model_class.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    @abstractmethod
    def text_config(self) -> Any:
        """Config of the text decoder whose cache is compressed."""

    @property
    def geometry(self) -> AttentionGeometry:
        cfg = self.text_config
        heads = cfg.num_attention_heads
        return AttentionGeometry(
            num_layers=cfg.num_hidden_layers,
            num_query_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
        )

    @abstractmethod
    def decoder_layers(self) -> list[torch.nn.Module]:
        """The text decoder's attention modules, in layer order."""

    def cache_layer_index(self, module: torch.nn.Module) -> int | None:
        """Layer of the compressed cache that attention `module` reads; None for attention audiokv leaves alone
        (full SDPA: an encoder's, or a decoder's self-attention when the cross-attention cache is compressed)."""
        return module.layer_idx

    def profile_layer_index(self, module: torch.nn.Module) -> int | None:
        """Row of the head profile that attention `module`'s query heads fill; None for attention not profiled.
        The compressed cache's layer, except where a layer reads another layer's cache: it has heads of its own."""
        return self.cache_layer_index(module)

    def cache_sources(self) -> list[int]:
        """Per decoder layer, the layer whose cache it attends over: itself, except where layers share one
        (Gemma-3n's last layers reuse an earlier layer's keys and values)."""
        return list(range(self.geometry.num_layers))

    def compressed_layers(self) -> list[int]:
        """The layers that own a cache, each compressed once."""
        return sorted(set(self.cache_sources()))

    def sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of a sliding-window layer (a query at t sees keys after t - window), else None."""
        return None

    def model_cache(self, compressed_cache):
        """The cache object the model's forward takes, built around the cache audiokv compresses."""
        return compressed_cache

    def latent_projections(self):
        """Per compressed layer, the `compression.latent.LatentProjection` that makes its keys and values from the
        encoder output, where every layer's are such maps of one tensor (``--cross-store latent``); else None."""
        return None

    @abstractmethod
    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        """Tokenize one clip with an ASR prompt (prompt None) or a free-form instruction."""

    def prepared_from_inputs(self, inputs: dict) -> PreparedInput:
        """A prompt the caller tokenized with the model's own processor (the Python API's `compress`): its audio
        found by the audio placeholder token."""
        from audiokv_cli.errors import AudiokvError

        token = getattr(self, "audio_token_id", None)
        if token is None or "input_ids" not in inputs:
            raise AudiokvError(f"{self.name}: compress() cannot find the audio in this family's inputs yet")
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise AudiokvError(f"compress() takes one prompt, got a batch of {input_ids.shape[0]}")
        spans = audio_spans(input_ids, int(token))
        if not spans:
            raise AudiokvError(f"{self.name}: the inputs hold no audio tokens (id {int(token)})")
        tokens = sum(end - start for start, end in spans)
        return PreparedInput(
            inputs=dict(inputs), input_ids=input_ids, audio_spans=spans,
            audio_seconds=tokens * (self.seconds_per_audio_token or 0.0),
        )

    def prepared_input(self, batch, audio: np.ndarray, text: str, audio_token_id: int) -> PreparedInput:
        """Processor output moved to the model (floating tensors in its dtype) with the audio spans located."""
        inputs: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or key == "num_audio_tokens":
                continue
            value = value.to(self.device)
            inputs[key] = value.to(self.dtype) if value.is_floating_point() else value
        return PreparedInput(
            inputs=inputs,
            input_ids=inputs["input_ids"],
            audio_spans=audio_spans(inputs["input_ids"], audio_token_id),
            audio_seconds=len(audio) / SAMPLE_RATE,
            prompt=text,
        )

    @property
    @abstractmethod
    def eos_token_ids(self) -> list[int]:
        """Token ids that end generation."""

    def next_token_logits(self, inputs: dict, cache) -> torch.Tensor:
        """Logits for the position after the last input token, ``[batch, vocab]``, extending ``cache``."""
        return self.model(**inputs, **cache_kwargs(self.model, cache), use_cache=True).logits[:, -1]

    def decode(self, token_ids) -> str:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the attention geometry a profile must match, and of the weights (`checkpoint_signature`)."""
        geometry = self.geometry
        if getattr(self, "_weights_signature", None) is None:
            self._weights_signature = weights_signature(self.model)
        return {
            "model_type": getattr(self.model.config, "model_type", None),
            "name_or_path": self.name,
            "revision": self.revision,
            "num_layers": geometry.num_layers,
            "num_query_heads": geometry.num_query_heads,
            "num_kv_heads": geometry.num_kv_heads,
            "head_dim": geometry.head_dim,
            "hidden_size": geometry.hidden_size,
            "weights": dict(self._weights_signature),
        }
