"""Greedy decoding in two timed phases: prefill of the prompt, then one token at a time over the cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Generation:
    token_ids: list[int]
    seconds_prefill: float
    seconds_decode: float
    hit_token_limit: bool


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(adapter, inputs: dict, cache) -> tuple[torch.Tensor, float]:
    """Run the whole prompt through the model; returns next-token logits [B, vocab] and seconds taken."""
    synchronize(adapter.device)
    start = time.perf_counter()
    with torch.no_grad():
        logits = adapter.next_token_logits(inputs, cache)
    synchronize(adapter.device)
    return logits, time.perf_counter() - start


def decode_greedy(
    adapter,
    cache,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    stop_at_eos: bool = True,
    on_token: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], float, bool]:
    """Greedy tokens of a one-row prompt after prefill until EOS or the limit; returns ids (EOS excluded), seconds,
    limit reached. A batch goes to `decode_greedy_rows`, which reads every row.

    ``stop_at_eos=False`` always decodes ``max_new_tokens`` (benchmarks need a fixed amount of work).
    ``on_token`` sees the ids so far after each new one (streaming output).
    """
    if first_logits.shape[0] != 1:
        raise ValueError(f"decode_greedy decodes one row, got {first_logits.shape[0]}: use decode_greedy_rows")
    rows, seconds = decode_greedy_rows(
        adapter, cache, first_logits, max_new_tokens, stop_at_eos=stop_at_eos,
        on_token=(lambda rows: on_token(rows[0])) if on_token is not None else None,
    )
    return rows[0], seconds, len(rows[0]) >= max_new_tokens


def decode_greedy_rows(
    adapter,
    cache,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    positions: torch.Tensor | None = None,
    stop_at_eos: bool = True,
    on_token: Callable[[list[list[int]]], None] | None = None,
) -> tuple[list[list[int]], float]:
    """Greedy decoding of every batch row in lockstep; returns each row's ids (EOS excluded) and seconds.

    A row stops at EOS or the limit; finished rows keep being fed (their tokens ignored) so the batch stays
    rectangular. ``positions`` [B, 1]: the first decode step's position per row (left-padded batches), advanced by
    one each step; None lets the model count positions from its cache. ``on_token`` sees every row's ids after
    each step.
    """
    eos = set(adapter.eos_token_ids) if stop_at_eos else set()
    tokens: list[list[int]] = [[] for _ in range(first_logits.shape[0])]
    done = [False] * len(tokens)
    logits = first_logits
    synchronize(adapter.device)
    start = time.perf_counter()
    with torch.no_grad():
        while True:
            next_token = logits.argmax(-1)
            grew = False
            for row, token in enumerate(next_token.tolist()):
                if done[row]:
                    continue
                if token in eos:
                    done[row] = True
                    continue
                tokens[row].append(token)
                grew = True
                done[row] = len(tokens[row]) >= max_new_tokens
            if on_token is not None and grew:
                on_token(tokens)
            if all(done):
                break
            step = {"input_ids": next_token[:, None]}
            if positions is not None:
                step["position_ids"] = positions
                positions = positions + 1
            logits = adapter.next_token_logits(step, cache)
    synchronize(adapter.device)
    return tokens, time.perf_counter() - start


def greedy_generate(adapter, inputs: dict, cache, max_new_tokens: int, stop_at_eos: bool = True) -> Generation:
    logits, seconds_prefill = prefill(adapter, inputs, cache)
    tokens, seconds_decode, hit_limit = decode_greedy(adapter, cache, logits, max_new_tokens, stop_at_eos)
    return Generation(tokens, seconds_prefill, seconds_decode, hit_limit)
