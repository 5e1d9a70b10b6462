"""What compressing one head alone costs: the sensitivity half of a head profile.

For every (cache layer, KV head) and every strength g, the head's prompt entries are cut to one in g (evenly spaced,
the same bit-reversal order `stride` and AudioKV's coverage keep) and every evicted entry is merged into a kept
neighbour (`--merge mean`), while every other head keeps everything. The cost is the mean KL divergence
KL(full || compressed) of the next-token distributions over the teacher-forced reference transcript (end token
included), averaged over the positions of the first clips of the probe data.

Everything runs through the machinery `infer` uses: a `CompressionPolicy` whose allocator gives one head the nominal
budget and the others all their entries, applied by a `CompressionSession` on a `RaggedKVCache`. The reference is
the same policy with no head compressed, so the ragged decode kernels are on both sides of the divergence and a head
compressed losslessly costs exactly 0. An encoder-decoder model encodes each clip once and runs its decoder twice
per (head, strength): the prompt (which compresses the cache) and the whole transcript as one multi-token step.
A decoder-only model prefills its prompt and feeds the transcript through the adapter's own decode step.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from audiokv_cli.runtime.attention import use_attention_handler
from audiokv_cli.compat import cache_kwargs
from audiokv_cli.compression.budgets import BudgetContext
from audiokv_cli.compression.cache import RaggedKVCache
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession
from audiokv_cli.compression.scorers import StrideScorer
from audiokv_cli.errors import AudiokvError

logger = logging.getLogger(__name__)

DEFAULT_STRENGTHS = (2, 4, 8, 16)
DEFAULT_CLIPS = 16
# What the table measures and how a head is compressed for it, recorded in the profile's metadata.
MEASURE = "mean_kl_next_token"
COMPRESSION = "evenly_spaced_merge_mean"
# The observation window decoder-only methods force (MethodOptions.window); cross-attention caches force nothing.
WINDOW = 32


@dataclass(frozen=True)
class SensitivitySettings:
    """How the sensitivity table is measured: merge strengths (one entry kept per g) and how many clips."""

    strengths: tuple[int, ...] = DEFAULT_STRENGTHS
    clips: int = DEFAULT_CLIPS

    def validate(self) -> None:
        if not self.strengths or any(int(g) != g or g < 2 for g in self.strengths):
            raise AudiokvError(f"sensitivity strengths must be integers >= 2, got {list(self.strengths)}")
        if list(self.strengths) != sorted(set(self.strengths)):
            raise AudiokvError(f"sensitivity strengths must be increasing, got {list(self.strengths)}")
        if self.clips < 1:
            raise AudiokvError(f"--sensitivity-clips must be at least 1, got {self.clips}")


@dataclass
class HeadSensitivity:
    """``table[layer, kv_head, s]``: mean KL per teacher-forced position when only that head of that cache layer
    keeps one entry in ``strengths[s]`` (the rest merged into it); float64, layers as in the head profile (a layer
    that reads another layer's cache owns none and its row stays 0)."""

    table: torch.Tensor
    strengths: tuple[int, ...]
    positions: int
    clips: int

    def __post_init__(self) -> None:
        self.table = self.table.to(torch.float64)
        self.strengths = tuple(int(g) for g in self.strengths)
        if self.table.dim() != 3 or self.table.shape[-1] != len(self.strengths):
            raise AudiokvError(
                f"sensitivity table {tuple(self.table.shape)} does not match {len(self.strengths)} strengths"
            )

    def metadata(self) -> dict:
        return {
            "measure": MEASURE,
            "compression": COMPRESSION,
            "strengths": list(self.strengths),
            "positions": self.positions,
            "clips": self.clips,
        }

    @classmethod
    def from_metadata(cls, meta: dict, table: torch.Tensor) -> "HeadSensitivity":
        return cls(table, tuple(meta["strengths"]), int(meta["positions"]), int(meta["clips"]))

    @staticmethod
    def combined(parts: Sequence["HeadSensitivity"]) -> "HeadSensitivity":
        """Several measurements on different clips as one: means weighted by their positions."""
        first = parts[0]
        if any(p.strengths != first.strengths or p.table.shape != first.table.shape for p in parts):
            raise AudiokvError("sensitivity tables measured at different strengths or shapes cannot be combined")
        positions = sum(p.positions for p in parts)
        weighted = sum(p.table * p.positions for p in parts)
        table = weighted / positions if positions else torch.zeros_like(first.table)
        return HeadSensitivity(table, first.strengths, positions, sum(p.clips for p in parts))


@dataclass(eq=False)
class OneHeadBudget:
    """Allocator for the measurement: every head keeps all its entries, except head ``kv_head`` of budget layer
    ``layer``, which keeps the nominal per-head budget (None: no head is cut, the reference)."""

    layer: int | None
    kv_head: int = 0
    name: str = dataclasses.field(default="one-head", init=False)

    def allocate(self, layer: int, scores: torch.Tensor | None, ctx: BudgetContext) -> torch.Tensor:
        budgets = torch.full((ctx.num_kv_heads,), ctx.prompt_len, dtype=torch.long)
        if layer == self.layer:
            budgets[self.kv_head] = ctx.per_head
        return budgets.to(scores.device if scores is not None else "cpu")


def one_head_policy(layer: int | None, kv_head: int, strength: int) -> CompressionPolicy:
    """Head (``layer`` as a budget rank, ``kv_head``) keeps every ``strength``-th entry evenly spaced, the evicted ones
    merged into their kept neighbours; every other head keeps all (and so does every head when ``layer`` is None)."""
    return CompressionPolicy(
        name=f"sensitivity-{strength}",
        scorer=StrideScorer(),
        budget=OneHeadBudget(layer, kv_head),
        retention=1.0 if layer is None else 1.0 / strength,
        window=WINDOW,
        merge="mean",
    )


# ------------------------------------------------------------------------------------------- teacher-forced logits


def transcript_tokens(adapter, transcript: str, limit: int, first_logits: torch.Tensor | None = None) -> list[int]:
    """The reference transcript as the tokens the model should produce (at most ``limit``), then its end token.

    Tokenizers that mark word starts with a space (Whisper's) encode "The" and " The" differently, and a model
    begins its transcript one way; with ``first_logits`` (the full cache's prediction of the first token) the
    spelling whose first token the model prefers is taken, so the forced text is the model's own way of writing it.
    """
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    text = transcript.strip()
    spellings = [tokenizer(text, add_special_tokens=False)["input_ids"][:limit]]
    if first_logits is not None:
        spaced = tokenizer(" " + text, add_special_tokens=False)["input_ids"][:limit]
        if spaced and spellings[0] and float(first_logits[spaced[0]]) > float(first_logits[spellings[0][0]]):
            spellings[0] = spaced
    return [int(t) for t in spellings[0]] + [int(adapter.eos_token_ids[0])]


def _one_pass_decoder_only(adapter) -> bool:
    """Whether the transcript can go through a decoder-only model in one forward: its adapter decodes with the plain
    forward (no family-specific positions or logit rules) and no layer slides a window (one token per step there)."""
    from audiokv_cli.models.base import ModelAdapter
    from audiokv_cli.models.families.qwen2_audio import Qwen2AudioAdapter

    plain = type(adapter).next_token_logits in (ModelAdapter.next_token_logits, Qwen2AudioAdapter.next_token_logits)
    sliding = any(adapter.sliding_window(layer) is not None for layer in adapter.compressed_layers())
    return plain and not sliding


class ClipRuns:
    """Teacher-forced runs of one clip under different policies. An encoder-decoder clip is encoded once and its
    dense cross-attention keys and values computed once; every run starts from a cache holding them, which the
    policy then compresses on the prompt's pass, exactly as in a run from scratch."""

    def __init__(self, adapter, prepared):
        self.adapter = adapter
        self.prepared = prepared
        self.cross = adapter.compressed_attention == "cross"
        self.encoded = None
        self.cross_entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.cross:
            with torch.inference_mode():
                self.encoded = adapter.encode(prepared.inputs)
                dense = RaggedKVCache(adapter.geometry.num_layers)
                pair = adapter.model_cache(dense)
                pair.encoder_hidden_states = self.encoded
                adapter.hidden_states({"input_ids": prepared.inputs["input_ids"]}, pair)
            self.cross_entries = [(layer.keys, layer.values) for layer in dense.layers]

    def first_logits(self) -> torch.Tensor:
        """The full cache's logits for the first transcript token, float32 ``[vocab]``."""
        return self.logits(one_head_policy(None, 0, 2), [0])[0]

    def logits(self, policy: CompressionPolicy, tokens: list[int]) -> torch.Tensor:
        """float32 ``[len(tokens), vocab]``: the logits that predict each of ``tokens`` when the prompt's cache is
        compressed by ``policy`` (row i is conditioned on tokens[:i])."""
        adapter = self.adapter
        cache = RaggedKVCache(adapter.geometry.num_layers)
        for layer, (keys, values) in zip(cache.layers, self.cross_entries):
            layer.update(keys, values)  # uncompressed: the session compresses it on the prompt's pass
        session = CompressionSession(policy, adapter, self.prepared, cache=cache)
        context = torch.tensor([tokens[:-1]], dtype=torch.long, device=adapter.device)
        with use_attention_handler(adapter, session), torch.inference_mode():
            cache = session.model_cache
            if self.cross:
                # The transcript's queries all read the compressed frames at once (cross-attention has no causal
                # mask; the decoder's own self-attention cache stays dense).
                cache.encoder_hidden_states = self.encoded
                head = adapter.model.proj_out
                rows = [head(adapter.hidden_states({"input_ids": self.prepared.inputs["input_ids"]}, cache)[:, -1])]
                if context.shape[1]:
                    rows.append(head(adapter.hidden_states({"input_ids": context}, cache)[0]))
                return torch.cat(rows).float()
            rows = [adapter.next_token_logits(self.prepared.inputs, cache)]
            if context.shape[1] and _one_pass_decoder_only(adapter):
                rows.append(adapter.model(input_ids=context, **cache_kwargs(adapter.model, cache), use_cache=True).logits[0])
            else:  # the adapter's own decode step, one token at a time
                for token in tokens[:-1]:
                    step = torch.tensor([[token]], dtype=torch.long, device=adapter.device)
                    rows.append(adapter.next_token_logits({"input_ids": step}, cache))
            return torch.cat(rows).float()


def kl_per_position(reference: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
    """KL(reference || compressed) of each row's softmax, float64 ``[positions]`` (never below 0: rounding)."""
    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(compressed.double(), dim=-1)
    # Tokens the model never emits (-inf on both sides) contribute nothing rather than NaN.
    difference = torch.where(torch.isfinite(log_p), log_p - log_q, torch.zeros_like(log_p))
    return (log_p.exp() * difference).sum(-1).clamp(min=0.0)


# ------------------------------------------------------------------------------------------------------- measuring


def clip_sensitivity(adapter, audio, transcript: str, strengths: Sequence[int], max_tokens: int) -> tuple[torch.Tensor, int]:
    """Summed KL ``[layers, kv_heads, strengths]`` (float64) over one clip's teacher-forced positions, and their count."""
    geometry = adapter.geometry
    runs = ClipRuns(adapter, adapter.prepare(audio))
    tokens = transcript_tokens(adapter, transcript, max_tokens, runs.first_logits())
    reference = runs.logits(one_head_policy(None, 0, 2), tokens)
    sums = torch.zeros(geometry.num_layers, geometry.num_kv_heads, len(strengths), dtype=torch.float64)
    for rank, layer in enumerate(adapter.compressed_layers()):
        for kv_head in range(geometry.num_kv_heads):
            for index, strength in enumerate(strengths):
                logits = runs.logits(one_head_policy(rank, kv_head, strength), tokens)
                sums[layer, kv_head, index] = kl_per_position(reference, logits).sum()
    return sums, len(tokens)


def measure_sensitivity(
    adapter,
    clips,
    settings: SensitivitySettings,
    max_tokens: int,
    load_audio: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> HeadSensitivity:
    """The sensitivity table over the first ``settings.clips`` of ``clips`` (each needs its reference text).
    ``progress(done, total)`` after each clip."""
    from audiokv_cli.io.audio import SilentAudioWarning
    from audiokv_cli.io.audio import load_audio as default_load_audio

    settings.validate()
    read_audio = load_audio or default_load_audio
    chosen = list(clips[: settings.clips])
    missing = [clip.clip_id for clip in chosen if not (clip.text or "").strip()]
    if missing:
        raise AudiokvError(
            f"head sensitivity is measured on reference transcripts; clip {missing[0]!r} has none "
            "(use data with a manifest's text, or --no-sensitivity)"
        )
    geometry = adapter.geometry
    sums = torch.zeros(geometry.num_layers, geometry.num_kv_heads, len(settings.strengths), dtype=torch.float64)
    positions = 0
    for done, clip in enumerate(chosen, start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SilentAudioWarning)
            audio = read_audio(clip.audio_path, max_seconds=adapter.max_audio_seconds)
        clip_sums, clip_positions = clip_sensitivity(adapter, audio, clip.text, settings.strengths, max_tokens)
        sums += clip_sums
        positions += clip_positions
        if progress is not None:
            progress(done, len(chosen))
    return HeadSensitivity(sums / max(positions, 1), settings.strengths, positions, len(chosen))
