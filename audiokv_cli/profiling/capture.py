"""Record, per layer and query head, where the newest token's attention goes, without changing the model's output.

Installed as the text decoder's attention handler. Each call still runs the normal attention (SDPA) for its output;
alongside it the recorder computes only the last query row's softmax ([query_heads, kv_len], never a full attention
matrix) and keeps its top-K key positions and its mass on the audio tokens. On the prefill call the last row is the
one that predicts the first generated token; on each decode call (one query) it is the row of that step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from audiokv_cli.runtime.attention import sdpa_attention
from audiokv_cli.errors import AudiokvError


def last_row_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of the last query position over all keys: float32 [query_heads, kv_len] (batch 1).

    ``query`` [1, Hq, q_len, D]; ``key`` [1, Hkv, kv_len, D] (expanded to the query heads as ``repeat_kv`` does:
    query head h reads KV head h // group). ``attention_mask`` is additive float or boolean (True = may attend),
    [1, 1 or H, q_len, kv_len], or None for plain causal attention (the last row then sees every key).
    """
    if query.shape[0] != 1:
        raise AudiokvError("head profiling runs one clip at a time (batch size 1)")
    q = query[0, :, -1, :].float()  # [Hq, D]
    k = key[0].float()  # [Hkv, kv_len, D]
    group = q.shape[0] // k.shape[0]
    if group * k.shape[0] != q.shape[0]:
        raise AudiokvError(f"{q.shape[0]} query heads do not divide into {k.shape[0]} KV heads")
    # Query head h reads KV head h // group: group the queries instead of copying the keys per query head.
    logits = torch.einsum("ngd,nkd->ngk", q.view(k.shape[0], group, -1), k).reshape(q.shape[0], -1) * scaling
    if attention_mask is not None:
        row = attention_mask[0, :, -1, -logits.shape[1] :]  # [1 or Hq, kv_len]
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.float()
    return torch.softmax(logits, dim=-1)


class AttentionRecorder:
    """Attention handler that keeps the top-K positions and audio mass of each layer's newest attention row."""

    def __init__(
        self,
        num_layers: int,
        top_k: int,
        audio_spans: Sequence[tuple[int, int]],
        layer_index: Callable[[torch.nn.Module], int | None] = lambda module: module.layer_idx,
    ):
        if top_k < 1:
            raise AudiokvError("--top-k must be at least 1")
        # Which attention calls fill which row of the profile (the adapter's profile_layer_index); others pass.
        self.layer_index = layer_index
        self.num_layers = num_layers
        self.top_k = top_k
        self.audio_spans = list(audio_spans)
        self._topk: list[torch.Tensor | None] = [None] * num_layers
        self._mass: list[torch.Tensor | None] = [None] * num_layers

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer = self.layer_index(module)
        if layer is None:
            return sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        with torch.no_grad():
            probabilities = last_row_attention(query, key, attention_mask, scaling)
            k = min(self.top_k, probabilities.shape[-1])
            indices = probabilities.topk(k, dim=-1).indices
            if k < self.top_k:  # fewer keys than K: pad with -1, which never counts as a hit
                pad = indices.new_full((indices.shape[0], self.top_k - k), -1)
                indices = torch.cat([indices, pad], dim=-1)
            mass = torch.zeros(probabilities.shape[0], dtype=torch.float32, device=probabilities.device)
            for start, end in self.audio_spans:
                mass += probabilities[:, start:end].sum(dim=-1)
            self._topk[layer] = indices
            self._mass[layer] = mass
        return sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows recorded by the last forward pass: top-K indices int64 [L, Hq, K] and audio mass float32 [L, Hq]
        (on the CPU); clears them so a missed layer is caught on the next step."""
        missing = [i for i, t in enumerate(self._topk) if t is None]
        if missing:
            raise AudiokvError(f"attention capture saw no call for decoder layers {missing}; the model is not supported")
        topk = torch.stack(self._topk).cpu()  # type: ignore[arg-type] - one device sync per step, not per layer
        mass = torch.stack(self._mass).cpu()  # type: ignore[arg-type]
        self._topk = [None] * self.num_layers
        self._mass = [None] * self.num_layers
        return topk, mass
