"""One attention entry point for the text decoder, through transformers' AttentionInterface.

The function registered here receives the query and key *after* rotary embedding and after the cache update, so
scorers see exactly what the model attends with (M-RoPE included) and no per-model forward is patched. What it does
is decided by the handler installed with `use_attention_handler`: compression, profiling capture, or plain SDPA.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Protocol

import torch

ATTENTION_NAME = "audiokv"


class AttentionHandler(Protocol):
    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


_UNSET = object()
_active_handler: ContextVar = ContextVar("audiokv_attention_handler", default=_UNSET)

# A thread started inside the block (generate behind a TextIteratorStreamer) does not inherit the ContextVar, yet
# its attention modules read the config the block switched to "audiokv": the handler is found through that config.
_handler_by_config: dict[int, AttentionHandler | None] = {}
_config_lock = threading.Lock()


def active_handler(module) -> AttentionHandler | None:
    """This context's handler, else the one installed for the config ``module`` attends with."""
    handler = _active_handler.get()
    if handler is _UNSET:
        handler = _handler_by_config.get(id(getattr(module, "config", None)))
    return handler


def is_prefill_call(query_length: int, key_length: int, cached_length: int, cross_attention: bool) -> bool:
    """The one rule for which attention call is the prefill, the call that fills a layer's cache with the whole
    prompt: its keys are all ``cached_length`` entries (the prompt, or the encoder frames of a cross-attention
    cache) and, for self-attention, every prompt position is a query too (a decode step has one query; a
    cross-attention prefill has the decoder prompt's). Handlers of a batch pass the batch's padded length."""
    if key_length != cached_length:
        return False
    return cross_attention or query_length == key_length


def sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """Full attention (transformers' SDPA path); causal from the shapes when no mask is given."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("dropout", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)


def audiokv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    handler = active_handler(module)
    if handler is None:
        return sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)
    return handler(module, query, key, value, attention_mask, scaling, **kwargs)


def register() -> None:
    """Make "audiokv" a valid attention implementation (idempotent), with SDPA's masks: without a mask function
    transformers builds no mask at all, and sliding-window layers would attend to the whole prompt."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, audiokv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def use_attention_handler(adapter, handler: AttentionHandler | Callable | None) -> Iterator[None]:
    """Route the adapter's text-decoder attention through ``handler`` for the duration of the block."""
    register()
    text_config = adapter.text_config
    previous = text_config._attn_implementation
    text_config._attn_implementation = ATTENTION_NAME
    token = _active_handler.set(handler)
    key = id(text_config)
    with _config_lock:
        had_outer, outer = key in _handler_by_config, _handler_by_config.get(key)
        _handler_by_config[key] = handler
    try:
        yield
    finally:
        _active_handler.reset(token)
        with _config_lock:
            if had_outer:
                _handler_by_config[key] = outer
            else:
                _handler_by_config.pop(key, None)
        text_config._attn_implementation = previous
