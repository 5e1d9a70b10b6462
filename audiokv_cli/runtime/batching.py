"""Several clips in one batch: left padding, a real mask, and every row compressed as if it ran alone.

Prompts are left-padded to the longest and given explicit positions (0 at each row's first real token), so prefill
attention is the masked attention of each row alone. Each layer is then compressed row by row: the policy sees
only that row's real positions, with that row's length, audio spans and budgets, and padding is never kept (the
full cache keeps every real entry and drops the padding the same way). After prefill every layer is ragged, so
decoding reads each row's own entries and needs no mask; each row gets its own next position and stops at its own
EOS. Greedy float32 output is the tokens of batch size 1 (tested for every method).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from audiokv_cli import runtime
from audiokv_cli.runtime.attention import is_prefill_call, sdpa_attention
from audiokv_cli.compression.cache import ragged_decode_attention
from audiokv_cli.compression.methods import build_policy
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession
from audiokv_cli.errors import AudiokvError
from audiokv_cli.runtime.inference import DEFAULT_MAX_NEW_TOKENS, ClipResult

# Inputs laid out one position per token ([1, L]); every other tensor input is per audio item and concatenated.
TOKEN_ALIGNED = ("input_ids", "attention_mask")


def check_batchable(adapter) -> None:
    from audiokv_cli.models.families.qwen2_audio import Qwen2AudioAdapter

    # Other families compute positions inside the model (M-RoPE) or pack audio differently: not checked yet.
    if type(adapter) is not Qwen2AudioAdapter:
        raise AudiokvError(f"--batch-size above 1 supports the Qwen2-Audio family so far, not {adapter.name}")


def collate(adapter, prepared_list) -> tuple[dict, list[int]]:
    """One batch of inputs from single-clip inputs: token inputs left-padded, positions from 0, items concatenated."""
    longest = max(prepared.prompt_tokens for prepared in prepared_list)
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else adapter.eos_token_ids[0]
    pads = [longest - prepared.prompt_tokens for prepared in prepared_list]
    keys = set(prepared_list[0].inputs)
    if any(set(prepared.inputs) != keys for prepared in prepared_list):
        raise AudiokvError("clips in one batch need the same kinds of model input")
    inputs = {}
    for key in keys:
        parts = [prepared.inputs[key] for prepared in prepared_list]
        if key in TOKEN_ALIGNED:
            fill = pad_id if key == "input_ids" else 0
            inputs[key] = torch.cat(
                [torch.nn.functional.pad(part, (pad, 0), value=fill) for part, pad in zip(parts, pads)]
            )
        else:
            inputs[key] = torch.cat(parts)
    mask = torch.cat([
        torch.nn.functional.pad(torch.ones_like(prepared.input_ids), (pad, 0)) for prepared, pad in zip(prepared_list, pads)
    ])
    inputs["attention_mask"] = mask
    inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs, pads


class BatchSession(CompressionSession):
    """Compresses each layer row by row with each row's own prompt (see the module docstring)."""

    def __init__(self, policy: CompressionPolicy, adapter, prepared_list, pads: list[int]):
        super().__init__(policy, adapter, prepared_list[0])
        self.rows = prepared_list
        self.pads = pads
        self.length = max(prepared.prompt_tokens for prepared in prepared_list)
        self._mask: torch.Tensor | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer_idx = module.layer_idx
        if self.cache.is_compressed(layer_idx):
            return ragged_decode_attention(self.cache.layers[layer_idx], query, scaling), None
        prefill = is_prefill_call(query.shape[-2], key.shape[-2], self.length, cross_attention=False)
        if prefill:
            # transformers hands the registered attention no padding mask: build the real one.
            attention_mask = self.prefill_mask(query.device)
        output = sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        if prefill:
            self.compress_rows(layer_idx, query, key, scaling)
        return output

    def kept_bytes_per_row(self) -> list[int]:
        """Each row's kept prompt bytes as a run of that clip alone holds them (`RaggedKVCache.kept_bytes`;
        padding is never kept); under a policy that compresses nothing a lone run keeps its dense prompt cache."""
        if not self.policy.compresses:
            per_token = self.adapter.geometry.kv_bytes_per_token(self.adapter.dtype)
            return [prepared.prompt_tokens * per_token for prepared in self.rows]
        return self.cache.kept_bytes()

    def prefill_mask(self, device) -> torch.Tensor:
        """bool ``[B, 1, L, L]``: causal, padding keys hidden; a padding query sees itself (its output is unused)."""
        if self._mask is None:
            positions = torch.arange(self.length, device=device)
            causal = positions[None, :] <= positions[:, None]
            pads = torch.tensor(self.pads, device=device)
            real_key = positions[None, None, :] >= pads[:, None, None]
            self._mask = ((causal[None] & real_key) | torch.eye(self.length, dtype=torch.bool, device=device))[:, None]
        return self._mask

    def compress_rows(self, layer_idx: int, query, key, scaling: float) -> None:
        batch, kv_heads, length, _ = key.shape
        keep = torch.zeros(batch, kv_heads, length, dtype=torch.bool, device=key.device)
        for row, (prepared, pad) in enumerate(zip(self.rows, self.pads)):
            if not self.policy.evicts:
                keep[row, :, pad:] = True
                continue
            context = replace(
                self.context, prompt_len=prepared.prompt_tokens, audio_spans=tuple(prepared.audio_spans)
            )
            keep[row, :, pad:] = self.policy.keep_mask(
                layer_idx, query[row : row + 1, :, pad:], key[row : row + 1, :, pad:], scaling, context
            )[0]
        self.cache.compress_layer(layer_idx, keep)


def run_clips(
    adapter,
    clips: list[np.ndarray],
    policy: CompressionPolicy | None = None,
    prompt: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    names: list[str] | None = None,
) -> list[ClipResult]:
    """`inference.run_clip` for several clips at once, one batch row each; results in the clips' order."""
    check_batchable(adapter)
    policy = policy or build_policy("full")
    prepared_list = [adapter.prepare(audio, prompt) for audio in clips]
    inputs, pads = collate(adapter, prepared_list)
    session = BatchSession(policy, adapter, prepared_list, pads)
    positions = torch.tensor([p.prompt_tokens for p in prepared_list], device=adapter.device)[:, None]
    output = runtime.run(adapter, session, inputs, max_new_tokens, positions=positions)
    per_token = adapter.geometry.kv_bytes_per_token(adapter.dtype)
    return [
        ClipResult.of(
            adapter, policy, prepared, output.tokens[row], clip=names[row] if names else "",
            kv_bytes_full=prepared.prompt_tokens * per_token, kv_bytes_kept=output.kept_bytes[row],
            seconds_prefill=output.seconds_prefill, seconds_decode=output.seconds_decode,
            hit_token_limit=len(output.tokens[row]) >= max_new_tokens,
        )
        for row, prepared in enumerate(prepared_list)
    ]
