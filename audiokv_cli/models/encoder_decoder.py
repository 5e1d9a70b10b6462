"""Encoder-decoder speech models (Whisper, Cohere ASR): the audio KV cache is the decoder's cross-attention.

Every decoder layer reads the encoded audio through cross-attention, whose keys and values are computed once from
the encoder output and held for the whole transcript: per layer and head the object AudioKV evicts in a
decoder-only audio LM. audiokv compresses that cache per head (scored from the decoder prompt's queries); the
decoder's own self-attention cache over the text so far stays dense, and the encoder has no cache.
"""

from __future__ import annotations

import torch

from audiokv_cli.compat import cache_kwargs
from audiokv_cli.models.base import ModelAdapter


def encoder_decoder_cache(compressed_cache):
    """The pair the decoder takes, carrying the encoder output every decoding step must be handed again (the
    decoder runs cross-attention only when it is given one; the keys then come from this cache)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    cache = EncoderDecoderCache(DynamicCache(), compressed_cache)
    cache.encoder_hidden_states = None
    return cache


class EncoderDecoderAdapter(ModelAdapter):
    """A `model.model.encoder` + `model.model.decoder` with `encoder_attn` in every decoder layer, `proj_out` head."""

    compressed_attention = "cross"
    #: every decoder layer's cross-attention keys and values are linear maps of the encoder output the decoder is
    #: given (`k_proj`, `v_proj`), so the cache can hold that output once (`compression.latent`)
    latent_cross_attention = False

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        self._cross_index = {id(layer.encoder_attn): i for i, layer in enumerate(model.model.decoder.layers)}

    @property
    def text_config(self):
        # The top-level config is the decoder's: switching its attention routes the decoder's self- and
        # cross-attention (and, where encoder and decoder share it, the encoder's, which the handler passes through).
        return self.model.config

    def decoder_layers(self) -> list[torch.nn.Module]:
        return [layer.encoder_attn for layer in self.model.model.decoder.layers]

    def cache_layer_index(self, module: torch.nn.Module) -> int | None:
        return self._cross_index.get(id(module))

    def model_cache(self, compressed_cache):
        return encoder_decoder_cache(compressed_cache)

    def latent_projections(self):
        if not self.latent_cross_attention:
            return None
        from audiokv_cli.compression.latent import LatentProjection

        heads = self.geometry.num_kv_heads
        return [LatentProjection.from_linear(attn.k_proj, attn.v_proj, heads) for attn in self.decoder_layers()]

    def capturing_encoder_states(self, cache):
        """A forward pre-hook on the decoder that puts the encoder output it is given on ``cache`` (a latent cache is
        built from it when a caller such as `generate` runs the encoder itself); returns the hook's handle."""

        def capture(module, args, kwargs):
            states = kwargs.get("encoder_hidden_states")
            if states is not None and getattr(cache, "encoder_hidden_states", None) is None:
                cache.encoder_hidden_states = states

        return self.model.model.decoder.register_forward_pre_hook(capture, with_kwargs=True)

    def encode(self, inputs: dict) -> torch.Tensor:
        """``[1, frames, d_model]``: the encoder output the cross-attention cache is computed from."""
        raise NotImplementedError

    def last_hidden_state(self, inputs: dict, cache) -> torch.Tensor:
        """The decoder's hidden state at the last position, ``[batch, d_model]``. Prefill (``input_features``
        present) encodes once and keeps the output on the cache; decode steps reuse it, and several prompts over one
        clip (a batch of eviction cells) share one encoder pass."""
        return self.hidden_states(inputs, cache)[:, -1]

    def hidden_states(self, inputs: dict, cache) -> torch.Tensor:
        """The decoder's hidden states at every position of ``inputs["input_ids"]``, ``[batch, length, d_model]``.
        ``decoder_attention_mask`` / ``decoder_position_ids`` in ``inputs`` (left-padded batches of different
        prompts: longform.py) are the decoder's mask over its text so far and the rows' positions."""
        if "input_features" in inputs:
            cache.encoder_hidden_states = self.encode(inputs).expand(inputs["input_ids"].shape[0], -1, -1)
        decoder = self.model.model.decoder
        extra = {key[len("decoder_"):]: inputs[key] for key in ("decoder_attention_mask", "decoder_position_ids") if key in inputs}
        hidden = decoder(
            input_ids=inputs["input_ids"],
            encoder_hidden_states=cache.encoder_hidden_states,
            use_cache=True,
            **extra,
            **cache_kwargs(decoder, cache),
        ).last_hidden_state
        compressed = getattr(cache, "cross_attention_cache", None)
        if "input_features" in inputs and compressed is not None and all(
            getattr(layer, "compressed", False) for layer in compressed.layers
        ):
            # Every cross-attention layer now reads its compressed cache; the decoder only needs to be handed some
            # encoder output to run cross-attention at all, so the full one is not held through the decode.
            cache.encoder_hidden_states = cache.encoder_hidden_states[:, :1].clone()
        return hidden

    def next_token_logits(self, inputs: dict, cache) -> torch.Tensor:
        return self.model.proj_out(self.last_hidden_state(inputs, cache))

    def fingerprint(self) -> dict:
        record = super().fingerprint()
        record["compressed_attention"] = "cross"
        return record
