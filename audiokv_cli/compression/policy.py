"""A compression policy: scorer -> smoother -> budget allocator -> per-head selection, applied once per layer.

Compression happens inside prefill, right after each layer's full attention: the layer's own output is exact, the
evicted entries are freed before the next layer runs (so the peak holds one full layer, not the whole prompt), and
later layers see the same hidden states as an uncompressed run. Decoding then reads the ragged cache.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from audiokv_cli.runtime.attention import is_prefill_call, sdpa_attention, use_attention_handler
from audiokv_cli.compression import byte_budget, hf_quantized
from audiokv_cli.compression.budgets import BudgetAllocator, BudgetContext, ProfileBudget, UniformBudget
from audiokv_cli.compression.cache import RaggedKVCache, ragged_decode_attention
from audiokv_cli.compression.latent import CROSS_STORES, LatentStore, evenly_spaced_frames
from audiokv_cli.compression.merging import MERGE_MODES
from audiokv_cli.compression.quantization import QuantConfig, check_bits
from audiokv_cli.compression.scorers import Scorer, StreamingScorer, bit_reversal_rank
from audiokv_cli.compression.selection import SCOPES, audio_mask, select_positions
from audiokv_cli.compression.smoothers import NoSmoothing, Smoother
from audiokv_cli.errors import AudiokvError


# Which positions the smoother filters: every evictable one, or only the evictable audio tokens.
SMOOTH_OVER = ("evictable", "audio")


@dataclass
class CompressionPolicy:
    """What to keep. ``scorer=None`` means the full cache (nothing is evicted)."""

    name: str
    scorer: Scorer | None
    smoother: Smoother = field(default_factory=NoSmoothing)
    budget: BudgetAllocator = field(default_factory=UniformBudget)
    retention: float = 1.0
    window: int = 32
    scope: str = "all"
    smooth_over: str = "evictable"
    #: share of each head's evictable budget kept as evenly spaced positions before scores choose the rest.
    coverage: float = 0.0
    #: field values that replace these where the compressed cache is cross-attention over encoder frames.
    cross_attention: dict = field(default_factory=dict)
    #: bits per kept key/value element: None keeps the model's dtype; 16 stores float16; 8, 4, 2 packed codes.
    kv_bits: int | None = None
    #: the byte budget this policy was chosen for (`byte_budget`), None when retention and bits were given.
    kv_budget: float | None = None
    #: what happens to evicted entries: dropped ("none") or folded into kept neighbours (`merging`); None: dropped,
    #: or under a byte budget what the frontier table says.
    merge: str | None = None
    #: transformers' QuantizedCache instead of audiokv's cache (`hf_quantized`: "hf-quanto", "hf-hqq"), a baseline.
    hf_cache: str | None = None
    #: an encoder-decoder's cross-attention cache kept per layer and head ("kv") or once as the encoder output
    #: ("latent", `latent`); "auto": latent under a byte budget where the model allows it, else kv.
    cross_store: str = "kv"

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise ValueError(f"coverage must be in [0, 1], got {self.coverage}")
        if self.smooth_over not in SMOOTH_OVER:
            raise ValueError(f"smooth_over must be one of {', '.join(SMOOTH_OVER)}, got {self.smooth_over!r}")
        if not 0.0 < self.retention <= 1.0:
            raise ValueError(f"retention must be in (0, 1], got {self.retention}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.kv_bits is not None:
            check_bits(self.kv_bits)
        if self.merge is not None and self.merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {', '.join(MERGE_MODES)}, got {self.merge!r}")
        if self.kv_budget is not None and not 0.0 < self.kv_budget <= 1.0:
            raise ValueError(f"kv_budget must be in (0, 1], got {self.kv_budget}")
        if self.cross_store not in CROSS_STORES:
            raise ValueError(f"cross_store must be one of {', '.join(CROSS_STORES)}, got {self.cross_store!r}")

    @property
    def evicts(self) -> bool:
        return self.scorer is not None

    @property
    def quant(self) -> QuantConfig | None:
        return None if self.kv_bits is None else QuantConfig(self.kv_bits)

    @property
    def merge_mode(self) -> str:
        return self.merge or "none"

    def stored_bits(self, dtype: torch.dtype) -> int:
        """Bits per stored element of the kept entries: ``kv_bits``, else the model dtype's."""
        return self.kv_bits or 8 * torch.empty((), dtype=dtype).element_size()

    @property
    def compresses(self) -> bool:
        """Whether the prompt cache is rewritten after prefill (entries evicted, or all kept in fewer bits)."""
        return self.evicts or self.kv_bits is not None or self.kv_budget is not None

    def keep_mask(
        self,
        layer_idx: int,
        queries: torch.Tensor,
        keys: torch.Tensor,
        scaling: float,
        ctx: BudgetContext,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean ``[B, Hkv, L]`` of the prompt entries this layer keeps (batch rows share the same budgets)."""
        if scores is None:
            scores = self.scorer.score(queries, keys, scaling)
        forced = ctx.forced.to(keys.device)
        scores = self.smooth_evictable(scores.float(), self.smoothed_positions(ctx).to(keys.device))
        masks = []
        for row in range(scores.shape[0]):
            budgets = self.budget.allocate(layer_idx, scores[row : row + 1], ctx).to(keys.device)
            head_forced = forced
            if self.coverage > 0:
                head_forced = forced | self.coverage_positions(ctx, budgets).to(keys.device)
            masks.append(select_positions(scores[row], budgets, head_forced))
        return torch.stack(masks)

    def coverage_positions(self, ctx: BudgetContext, budgets: torch.Tensor) -> torch.Tensor:
        """bool[Hkv, L]: per head, `coverage` of its evictable budget as evenly spaced positions among those the
        smoother filters (the evictable ones; only the audio with ``smooth_over="audio"``).

        Scores from a few queries say little about the audio later steps will read (an ASR decoder walks through
        all of it); an evenly spaced share of the budget keeps every stretch of the audio at a coarse resolution,
        and the scores spend the rest. Any prefix of the bit-reversal order is evenly spread, so heads with
        different budgets still get an even spacing.
        """
        evictable = torch.nonzero(self.smoothed_positions(ctx)).flatten()
        count = evictable.numel()
        counts = torch.floor(self.coverage * (budgets.cpu() - ctx.num_forced).clamp(min=0)).to(torch.long)
        counts = counts.clamp(max=count)
        rank = bit_reversal_rank(count)
        chosen = rank[None, :] < counts[:, None]  # [Hkv, evictable]
        mask = torch.zeros(budgets.shape[0], ctx.prompt_len, dtype=torch.bool)
        mask[:, evictable] = chosen
        return mask

    def for_cross_attention(self) -> "CompressionPolicy":
        """This policy with its `cross_attention` settings applied (`profile_floor` sets the profile budget's
        uniform floor; the other keys are fields of the policy)."""
        settings = dict(self.cross_attention)
        floor = settings.pop("profile_floor", None)
        policy = dataclasses.replace(self, **settings, cross_attention={})
        if floor is not None and isinstance(policy.budget, ProfileBudget):
            policy.budget = policy.budget.with_floor(floor)
        return policy

    def on_cross_attention(self, audio_end: int | None = None) -> "CompressionPolicy":
        """This policy as it runs on a cross-attention cache of encoder frames (the clip's, then padding up to the
        window; ``audio_end`` is where the clip's end): its `cross_attention` settings applied; scope ``all``, since
        that cache holds no text to protect and pinning the padding as if it were text would starve the speech; and
        StreamingLLM's recency ending at the clip's last frame rather than in the padding."""
        policy = self.for_cross_attention() if self.cross_attention else self
        if policy.scope != "all":
            policy = dataclasses.replace(policy, scope="all")
        if isinstance(policy.scorer, StreamingScorer) and audio_end is not None:
            policy = dataclasses.replace(policy, scorer=dataclasses.replace(policy.scorer, recent_end=audio_end))
        return policy

    def smoothed_positions(self, ctx: BudgetContext) -> torch.Tensor:
        """bool[L]: the positions whose scores form the sequence the smoother filters.

        Only evictable positions: the forced ones (the window; text under scope audio) are kept whatever their
        score, and left in they dominate the spectrum and the pooling beside them. ``smooth_over="audio"`` also
        leaves text positions (sinks, instruction) out under scope all: they keep their raw scores.
        """
        positions = ~ctx.forced
        if self.smooth_over == "audio":
            positions &= audio_mask(ctx.prompt_len, list(ctx.audio_spans))
        return positions

    def smooth_evictable(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Smooth the scores of ``positions`` as one sequence (gathered in order); the others stay as they are."""
        if positions.all():
            return self.smoother.smooth(scores)
        smoothed = scores.clone()
        smoothed[..., positions] = self.smoother.smooth(scores[..., positions].contiguous())
        return smoothed


@dataclass
class LayerKeepStats:
    """How many prompt entries one layer kept per KV head, split by modality."""

    kept: list[int]
    audio_kept: list[int]
    text_kept: list[int]


class CompressionSession:
    """Binds a policy to one prompt: owns the cache and does the per-layer work during prefill.

    Each layer that owns a cache is compressed once (`adapter.compressed_layers`); a layer that reads another
    layer's cache (`adapter.cache_sources`) attends over that layer's dense keys in prefill and over its compressed
    cache afterwards, so both always see the same entries. Budgets are shared among the cache-owning layers, and a
    head profile's scores of sharing layers count for the cache they read. A sliding-window layer is compressed
    among the prompt entries the first generated token can still see, and its cache drops entries as the window
    moves on (`RaggedLayer.expire`).
    """

    def __init__(self, policy: CompressionPolicy, adapter, prepared, cache: RaggedKVCache | None = None):
        self.adapter = adapter
        self.prepared = prepared
        #: the policy as asked for (``policy`` below is it as it runs here: cache type and byte budget applied);
        #: a recorded prefill's scores are keyed by it
        self.requested_policy = policy
        geometry = adapter.geometry
        self.cache = cache if cache is not None else RaggedKVCache(geometry.num_layers)
        if policy.hf_cache is not None:
            self.cache = hf_quantized.make_cache(policy.hf_cache, adapter, policy.kv_bits or 4)
        # What the model's forward takes: the ragged cache itself, or (encoder-decoder) a pair around it.
        self.model_cache = adapter.model_cache(self.cache)
        self.cross_attention = adapter.compressed_attention == "cross"
        if self.cross_attention:
            policy = policy.on_cross_attention(audio_end=max((end for _, end in prepared.audio_spans), default=None))
        policy = resolve_cross_store(policy, adapter)
        self.latent_projections = adapter.latent_projections() if policy.cross_store == "latent" else None
        self.sources = adapter.cache_sources()
        # Budget allocators count layers 0..K-1 over the K layers that own a cache.
        self.budget_layer = {layer: rank for rank, layer in enumerate(adapter.compressed_layers())}
        if len(self.budget_layer) != geometry.num_layers and isinstance(policy.budget, ProfileBudget):
            policy = dataclasses.replace(policy, budget=policy.budget.for_layers(
                self.owner_head_scores(policy.budget.head_scores), adapter.compressed_layers()
            ))
        policy = spend_budget(policy, adapter, prepared)
        if isinstance(policy.budget, ProfileBudget) and policy.budget.sensitivity is not None and (
            policy.merge_mode == "none" or not self.cross_attention
        ):
            # The sensitivity table measures heads whose evicted entries are merged into their neighbours; a run
            # that drops them splits its entries by the attention profile (eq. 1), as without the table. On a
            # decoder-only prompt cache (text and audio together) the table's split was measured to cost WER
            # (tiny, TTS development set: 82.1 vs 77.9 % at --kv-budget 0.125), so eq. 1 splits there too.
            policy = dataclasses.replace(policy, budget=policy.budget.without_sensitivity())
        self.policy = policy
        self.context = BudgetContext(
            retention=policy.retention,
            prompt_len=prepared.compressed_length,
            # A cross-attention cache holds only audio frames: no observation window among its keys to force.
            window=0 if self.cross_attention else policy.window,
            num_layers=len(self.budget_layer),
            num_kv_heads=geometry.num_kv_heads,
            num_query_heads=geometry.num_query_heads,
            scope=policy.scope,
            audio_spans=tuple(prepared.audio_spans),
        )
        self.layer_stats: dict[int, LayerKeepStats] = {}
        self.full_prompt_bytes = 0
        # Largest cache footprint seen during prefill: compressed layers so far plus the one still dense.
        self.peak_prefill_bytes = 0

    def owner_head_scores(self, head_scores: torch.Tensor) -> torch.Tensor:
        """[K, Hq]: each cache-owning layer's row plus the rows of the layers that read its cache."""
        if head_scores.shape[0] != len(self.sources):
            return head_scores  # the budget reports the shape mismatch
        merged = torch.zeros(len(self.budget_layer), head_scores.shape[1], dtype=head_scores.dtype)
        for layer, source in enumerate(self.sources):
            merged[self.budget_layer[source]] += head_scores[layer].to(merged.device)
        return merged

    def live_start(self, layer_idx: int) -> int:
        """First prompt position the first generated token can see in this layer (0 unless a window cuts it)."""
        window = self.adapter.sliding_window(layer_idx)
        if window is None or self.cross_attention:
            return 0
        return max(0, self.prepared.compressed_length - (window - 1))

    def live_context(self, context: BudgetContext, start: int) -> BudgetContext:
        """``context`` for the prompt suffix from ``start``: the part a sliding-window layer still attends to."""
        spans = tuple((max(a, start) - start, b - start) for a, b in context.audio_spans if b > start)
        return dataclasses.replace(context, prompt_len=context.prompt_len - start, audio_spans=spans)

    def layer_keep_mask(self, layer_idx: int, queries, keys, scaling: float, scores=None) -> torch.Tensor:
        """bool ``[B, Hkv, L]``: what this session's policy keeps of the layer's prompt entries."""
        if not self.policy.evicts:
            return torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device)
        rank = self.budget_layer[layer_idx]
        start = self.live_start(layer_idx)
        if start == 0:
            return self.policy.keep_mask(rank, queries, keys, scaling, self.context, scores=scores)
        if scores is None:
            # Scored over the whole prompt, then cut: the same numbers a recorded prefill replays (evaluation).
            scores = self.policy.scorer.score(queries, keys, scaling)
        keep = torch.zeros(keys.shape[:-1], dtype=torch.bool, device=keys.device)
        keep[..., start:] = self.policy.keep_mask(
            rank, queries, keys[..., start:, :], scaling, self.live_context(self.context, start),
            scores=scores[..., start:],
        )
        return keep

    def audio_position_mask(self, length: int, device) -> torch.Tensor:
        """bool[length]: the audio positions among the first `length` prompt positions (a chunked prefill's part)."""
        spans = [(start, min(end, length)) for start, end in self.prepared.audio_spans if start < length]
        return audio_mask(length, spans, device)

    def compress_layer(self, layer_idx: int, queries, keys, scaling: float, scores=None) -> None:
        layer = self.cache.layers[layer_idx]
        self.full_prompt_bytes += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        self.peak_prefill_bytes = max(self.peak_prefill_bytes, self.cache.physical_bytes(include_tail=False))
        if self.latent_projections is not None:
            self.compress_to_latent(layer_idx, [self])
            return
        keep = self.layer_keep_mask(layer_idx, queries, keys, scaling, scores=scores)
        audio = self.audio_position_mask(keep.shape[-1], keep.device)
        self.layer_stats[layer_idx] = LayerKeepStats(
            kept=keep[0].sum(-1).tolist(),
            audio_kept=(keep[0] & audio).sum(-1).tolist(),
            text_kept=(keep[0] & ~audio).sum(-1).tolist(),
        )
        self.cache.compress_layer(
            layer_idx, keep, self.adapter.sliding_window(layer_idx), self.policy.quant, self.policy.merge_mode
        )

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer_idx = self.adapter.cache_layer_index(module)
        if layer_idx is None or self.policy.hf_cache is not None:
            return sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        sharing = layer_idx != module.layer_idx
        if self.cache.is_compressed(layer_idx) and not (sharing and self.is_prefill(query, key)):
            return self.decode_attention(layer_idx, query, scaling), None
        output = sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        if self.cache.layers[layer_idx].keys is None:
            # A forward that writes no cache (`use_cache=False`: Whisper's generate detects the language so before
            # it decodes): nothing to compress, and the prefill that follows is still the prefill.
            return output
        if self.compresses and not sharing and self.is_prefill(query, key):
            self.compress_layer(layer_idx, query, key, scaling)
        return output

    def latent_frames(self) -> torch.Tensor:
        """bool ``[L]``: the encoder frames this session's row keeps in a latent cache, evenly spaced (every head
        and layer reads the same frames, so there is no per-head choice for scores to make)."""
        length = self.prepared.compressed_length
        return evenly_spaced_frames(length, round(self.policy.retention * length) if self.policy.evicts else length)

    def compress_to_latent(self, layer_idx: int, rows: list["CompressionSession"]) -> None:
        """Layer ``layer_idx`` reads the encoder output, kept once for all layers: built at the first layer from the
        output the decoder was given, batch row i keeping ``rows[i]``'s frames."""

        frames = [row.latent_frames() for row in rows]

        def build() -> LatentStore:
            encoded = getattr(self.model_cache, "encoder_hidden_states", None)
            if encoded is None:
                raise AudiokvError("--cross-store latent needs the encoder output the decoder was given; none was seen")
            keep = torch.stack(frames).to(encoded.device)
            if keep.shape[0] != encoded.shape[0]:  # generate's beams: one prompt, its encoder output repeated
                keep = keep.expand(encoded.shape[0], -1)
            return LatentStore.build(encoded, keep, self.policy.quant, self.policy.merge_mode)

        self.cache.compress_to_latent(layer_idx, build)
        heads = self.adapter.geometry.num_kv_heads
        for row, kept in zip(rows, frames):
            audio_end = max((end for _, end in row.prepared.audio_spans), default=0)
            row.layer_stats[layer_idx] = LayerKeepStats(
                kept=[int(kept.sum())] * heads, audio_kept=[int(kept[:audio_end].sum())] * heads, text_kept=[0] * heads
            )

    def decode_attention(self, layer_idx: int, query, scaling: float) -> torch.Tensor:
        layer = self.cache.layers[layer_idx]
        if layer.reads_latent:
            return self.cache.latent_attention(layer_idx, query, scaling, self.latent_projections[layer_idx])
        if layer.window is not None:
            if query.shape[-2] != 1:
                raise AudiokvError("a compressed sliding-window layer decodes one token at a time")
            layer.expire(layer.get_seq_length() - 1)
        return ragged_decode_attention(layer, query, scaling)

    @property
    def evicts(self) -> bool:
        return self.policy.evicts

    @property
    def compresses(self) -> bool:
        return self.policy.compresses

    def is_prefill(self, query, key) -> bool:
        """The call that fills the layer's cache with the whole prompt (or, cross-attention, all audio frames)."""
        return is_prefill_call(query.shape[-2], key.shape[-2], self.prepared.compressed_length, self.cross_attention)

    def kept_bytes_per_row(self) -> list[int]:
        """`kept_bytes` for each batch row (one here; batched sessions have several)."""
        return [self.kept_bytes()]

    def kept_bytes(self) -> int:
        """Physical bytes of the prompt cache (generated-token tail excluded): what the compressed layers hold
        (`RaggedKVCache.kept_bytes`), or the dense prompt cache of a run that compresses nothing."""
        if self.policy.hf_cache is not None:
            return hf_quantized.kept_bytes(self.cache)
        if not self.compresses:
            return self.cache.physical_bytes(include_tail=False)
        return sum(self.cache.kept_bytes())

    def summary(self) -> dict:
        """Per-layer, per-head counts of kept audio and text entries."""
        return {
            "kept": [self.layer_stats[i].kept for i in sorted(self.layer_stats)],
            "audio_kept": [self.layer_stats[i].audio_kept for i in sorted(self.layer_stats)],
            "text_kept": [self.layer_stats[i].text_kept for i in sorted(self.layer_stats)],
        }


def resolve_cross_store(policy: CompressionPolicy, adapter) -> CompressionPolicy:
    """``policy`` with its cross-attention store decided: "auto" is the latent store under a byte budget on a model
    whose cross-attention allows it, else per layer and head; "latent" on a model that cannot is refused."""
    store = policy.cross_store
    supported = adapter.compressed_attention == "cross" and adapter.latent_projections() is not None
    if store == "auto":
        # kvpress-style value merging keeps keys apart from values: only the per-head cache can hold it
        wanted = policy.kv_budget is not None and policy.hf_cache is None and policy.merge != "values"
        store = "latent" if supported and wanted else "kv"
    elif store == "latent" and not supported:
        raise AudiokvError(
            f"--cross-store latent needs an encoder-decoder whose cross-attention reads the encoder output through "
            f"plain projections (Whisper); {adapter.name} has none"
        )
    if store == "latent" and policy.merge == "values":
        raise AudiokvError("--cross-store latent merges frames as 'mean' only (keys and values are one tensor)")
    return policy if store == policy.cross_store else dataclasses.replace(policy, cross_store=store)


def stored_policy(policy: CompressionPolicy, adapter, prepared) -> CompressionPolicy:
    """How a session on ``prepared`` stores ``policy``'s kept entries: its cross-attention settings, the
    cross-attention store and any byte budget resolved, as `CompressionSession` resolves them."""
    if adapter.compressed_attention == "cross":
        policy = policy.on_cross_attention()
    return spend_budget(resolve_cross_store(policy, adapter), adapter, prepared)


def spend_budget(policy: CompressionPolicy, adapter, prepared) -> CompressionPolicy:
    """``policy`` as it runs on ``prepared``: a byte budget turned into retention, bits and merging
    (`byte_budget.resolve`); a policy without a budget as it is."""
    if policy.kv_budget is None:
        return policy
    cross_attention = adapter.compressed_attention == "cross"
    if policy.cross_store == "latent":
        geometry = adapter.geometry
        full = byte_budget.full_bytes_16bit(
            prepared.compressed_length, len(adapter.compressed_layers()), geometry.num_kv_heads, geometry.head_dim
        )
        dim = adapter.latent_projections()[0].key_weight.shape[-1]
        return byte_budget.resolve_latent(policy, frames=prepared.compressed_length, dim=dim, full_16bit=full)
    forced = BudgetContext(
        retention=1.0, prompt_len=prepared.compressed_length, window=0 if cross_attention else policy.window,
        scope="all" if cross_attention else policy.scope, audio_spans=tuple(prepared.audio_spans),
    ).num_forced
    sliding = any(adapter.sliding_window(layer) is not None for layer in adapter.compressed_layers())
    return byte_budget.resolve(
        policy, length=prepared.compressed_length, head_dim=adapter.geometry.head_dim, forced=forced,
        cross_attention=cross_attention, sliding=sliding,
    )


@contextmanager
def apply_policy(policy: CompressionPolicy, adapter, prepared) -> Iterator[CompressionSession]:
    """Compress the KV cache of ``prepared``'s prompt while the block runs.

    >>> with apply_policy(policy, adapter, prepared) as session:
    ...     adapter.model.generate(**prepared.inputs, **cache_kwargs(adapter.model, session.model_cache), max_new_tokens=64)
    """
    session = CompressionSession(policy, adapter, prepared)
    with use_attention_handler(adapter, session):
        yield session
