"""Running a model under a compression policy: the one path from prepared input to tokens.

    prefill ──▶ compress ──▶ decode
    (one-shot, chunked,   (the session, as the     (greedy, every batch row in lockstep,
     or replayed from a    prefill's attention      over the compressed cache)
     recorded prefill)     calls reach it)

Every greedy run of a model goes through `run`: one clip (`inference.run_clip`), several clips as batch rows
(`batching.run_clips`), several policies on one clip (`evaluation.sweep.run_cell`, `evaluation.cell_batch`), the
benchmark (`benchmark`) and the compressed side of the masked-dense reference (`testing_masked`). What differs
between them is the session (the attention handler that decides what each row keeps) and the inputs; the steps,
their timing and the rule that says which attention call is the prefill (`is_prefill_call`) are here once.
Whisper's long-form windows (`longform.decode_windows`) sample with logits processors and temperature fallbacks and
profile capture records attention while teacher forcing; both prefill through a session of their own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from audiokv_cli.runtime.attention import is_prefill_call, sdpa_attention, use_attention_handler
from audiokv_cli.compression.policy import CompressionPolicy
from audiokv_cli.runtime.decoding import advancing_positions, decode_rows, prefill, synchronize
from audiokv_cli.errors import AudiokvError

__all__ = [
    "PlainSession", "PrefillRecord", "RunOutput", "fill_from_record", "is_prefill_call", "record_prefill", "run",
    "scorer_key",
]


# ------------------------------------------------------------------------------------------- a recorded prefill




def scorer_key(policy: CompressionPolicy) -> str | None:
    """Policies whose scorers are equal (same class and parameters) share one precomputed score tensor."""
    return repr(policy.scorer) if policy.evicts else None


@dataclass
class LayerRecord:
    index: int  # the decoder layer whose cache this is
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PrefillRecord:
    """What every cell of one clip needs from its (policy-independent) prefill."""

    layers: list[LayerRecord]
    first_logits: torch.Tensor
    seconds: float


class PrefillRecorder:
    """Attention handler for the shared prefill: full attention, plus each layer's dense K/V and raw scores."""

    def __init__(self, prompt_tokens: int, scorers: Mapping[str, object], owners: set[int]):
        self.prompt_tokens = prompt_tokens
        self.scorers = scorers
        self.owners = owners  # layers that own a cache; a layer sharing another's has nothing to record
        self.layers: dict[int, LayerRecord] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        output = sdpa_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        prefill = is_prefill_call(query.shape[-2], key.shape[-2], self.prompt_tokens, cross_attention=False)
        if prefill and module.layer_idx in self.owners:
            # The same calls a live session makes on the same tensors, so the scores are bit-identical; H2O needs
            # every query row, which is why scores are computed here and the queries are not kept.
            scores = {name: scorer.score(query, key, scaling) for name, scorer in self.scorers.items()}
            self.layers[module.layer_idx] = LayerRecord(module.layer_idx, key, value, scaling, scores)
        return output


def record_prefill(adapter, prepared, policies: Sequence[CompressionPolicy]) -> PrefillRecord:
    """Run the full-cache prefill of ``prepared`` once, keeping what ``policies`` need to compress its cache."""
    from audiokv_cli.compression.cache import RaggedKVCache

    scorers = {scorer_key(p): p.scorer for p in policies if p.evicts}
    owners = adapter.compressed_layers()
    recorder = PrefillRecorder(prepared.prompt_tokens, scorers, set(owners))
    cache = RaggedKVCache(adapter.geometry.num_layers)
    synchronize(adapter.device)
    start = time.perf_counter()
    with use_attention_handler(adapter, recorder), torch.no_grad():
        logits = adapter.next_token_logits(prepared.inputs, cache)
    synchronize(adapter.device)
    seconds = time.perf_counter() - start
    missing = [i for i in owners if i not in recorder.layers]
    if missing:
        raise AudiokvError(f"prefill did not reach decoder layers {missing}; the model's attention is not routed")
    return PrefillRecord([recorder.layers[i] for i in sorted(recorder.layers)], logits, seconds)


# ------------------------------------------------------------------------------------------------------- the run


class PlainSession:
    """A run that compresses nothing: ``handler`` (e.g. profile capture's attention recorder) sees every attention
    call, over transformers' own cache."""

    def __init__(self, adapter, handler):
        from transformers import DynamicCache

        self.handler = handler
        self.model_cache = adapter.model_cache(DynamicCache())

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        return self.handler(module, query, key, value, attention_mask, scaling, **kwargs)

    def kept_bytes_per_row(self) -> list[int]:
        return [0]  # nothing is compressed: no compressed cache to count


@dataclass
class RunOutput:
    """Tokens per batch row (EOS excluded), each row's kept bytes after the prefill, and where the time went."""

    tokens: list[list[int]]
    kept_bytes: list[int]
    seconds_prefill: float
    seconds_decode: float
    #: compression's share of the prefill (measured by the session where it keeps count, else 0)
    seconds_compress: float = 0.0
    #: next-token logits after the prefill and after every decode step, when ``keep_logits`` asked for them
    logits: list[torch.Tensor] = field(default_factory=list)


def fill_from_record(session, record) -> float:
    """Replay a recorded full-cache prefill (`record_prefill`) into ``session``'s cache, each layer compressed from
    the recorded scores; a session of several rows (`row_policies`: one policy per row, the same prompt) gets one
    copy per row. Seconds taken."""
    row_policies = getattr(session, "row_policies", None)
    rows = len(row_policies) if row_policies else 1
    start = time.perf_counter()
    with torch.no_grad():
        for layer in record.layers:
            keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            values = layer.values.expand(rows, *layer.values.shape[1:])
            # update() keeps references; compression builds new tensors, so the record stays intact for later cells.
            session.cache.layers[layer.index].update(keys, values)
            if not session.compresses:
                continue
            if row_policies:
                scores = [layer.scores.get(scorer_key(policy)) for policy in row_policies]
            else:
                scores = layer.scores.get(scorer_key(session.requested_policy))
            session.compress_layer(layer.index, None, keys, layer.scaling, scores=scores)
    return time.perf_counter() - start


def run(
    adapter,
    session,
    inputs: dict | None,
    max_new_tokens: int,
    *,
    record=None,
    positions: torch.Tensor | None = None,
    stop_at_eos: bool = True,
    on_token: Callable[[list[list[int]]], None] | None = None,
    keep_logits: bool = False,
    forward: Callable | None = None,
    choose: Callable | None = None,
    step_inputs: Callable | None = None,
) -> RunOutput:
    """Prefill ``inputs`` through ``session`` (chunk by chunk for a chunked session; from ``record`` instead of
    running the model when given), then decode every row greedily over the compressed cache.

    ``positions`` [B, 1]: each row's first decode position (left-padded batches); ``stop_at_eos=False`` decodes
    ``max_new_tokens`` whatever comes (benchmarks); ``on_token`` sees every row's ids after each step;
    ``keep_logits`` keeps the logits of every step (the masked-dense comparison reads them). ``forward``,
    ``choose`` and ``step_inputs`` replace the prefill's forward, the greedy choice and the step inputs
    (`decoding.decode_rows`; Whisper's long-form windows sample under timestamp rules); ``max_new_tokens`` may be
    one limit per row.
    """
    from audiokv_cli.compression.chunked import ChunkedSession, chunked_prefill

    if record is not None:
        rows = len(getattr(session, "row_policies", None) or [session.requested_policy])
        seconds_compress = fill_from_record(session, record)
        logits, seconds_prefill = record.first_logits.expand(rows, *record.first_logits.shape[1:]), 0.0
    elif isinstance(session, ChunkedSession):
        logits, seconds_prefill = chunked_prefill(adapter, session.prepared, session)
        seconds_compress = getattr(session, "seconds_compress", 0.0)
    else:
        with use_attention_handler(adapter, session), torch.no_grad():
            logits, seconds_prefill = prefill(adapter, inputs, session.model_cache, forward)
        seconds_compress = getattr(session, "seconds_compress", 0.0)
    kept = session.kept_bytes_per_row()
    kept_logits = [logits] if keep_logits else []
    with use_attention_handler(adapter, session), torch.no_grad():
        if keep_logits:
            tokens, seconds_decode = _decode_keeping_logits(adapter, session, logits, max_new_tokens, kept_logits)
        else:
            if positions is not None and step_inputs is None:
                step_inputs = advancing_positions(positions)
            tokens, seconds_decode = decode_rows(
                adapter, session.model_cache, logits, max_new_tokens, choose=choose, step_inputs=step_inputs,
                stop_at_eos=stop_at_eos, on_token=on_token,
            )
    return RunOutput(tokens, kept, seconds_prefill, seconds_decode, seconds_compress, kept_logits)


def _decode_keeping_logits(adapter, session, logits, steps: int, kept: list) -> tuple[list[list[int]], float]:
    """``steps`` greedy tokens of one row, EOS included (a comparison runs a fixed number of steps), every step's
    logits appended to ``kept``."""
    tokens: list[int] = []
    synchronize(adapter.device)
    start = time.perf_counter()
    for _ in range(steps):
        token = logits.argmax(-1)[:, None]
        tokens.append(int(token[0, 0]))
        logits = adapter.next_token_logits({"input_ids": token}, session.model_cache)
        kept.append(logits)
    synchronize(adapter.device)
    return [tokens], time.perf_counter() - start
