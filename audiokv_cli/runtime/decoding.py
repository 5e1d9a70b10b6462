"""Greedy decoding in two timed phases: prefill of the prompt, then one token at a time over the cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

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


def prefill(adapter, inputs: dict, cache, forward: Callable | None = None) -> tuple[torch.Tensor, float]:
    """Run the whole prompt through the model; returns next-token logits [B, vocab] and seconds taken.
    ``forward(inputs, cache)`` replaces `adapter.next_token_logits` where a caller needs more of the prefill."""
    synchronize(adapter.device)
    start = time.perf_counter()
    with torch.no_grad():
        logits = (forward or adapter.next_token_logits)(inputs, cache)
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

    ``positions`` [B, 1]: the first decode step's position per row (left-padded batches), advanced by one each
    step; None lets the model count positions from its cache. ``on_token`` sees every row's ids after each step.
    """
    return decode_rows(adapter, cache, first_logits, max_new_tokens, stop_at_eos=stop_at_eos, on_token=on_token,
                       step_inputs=advancing_positions(positions) if positions is not None else None)


def advancing_positions(positions: torch.Tensor) -> Callable[[torch.Tensor], dict]:
    """``step_inputs`` for left-padded batches: each step's ids with every row's own position ``[B, 1]`` (starting
    at ``positions``, one more each step)."""
    state = {"positions": positions}

    def step_inputs(ids: torch.Tensor) -> dict:
        step = {"input_ids": ids, "position_ids": state["positions"]}
        state["positions"] = state["positions"] + 1
        return step

    return step_inputs


def decode_rows(
    adapter,
    cache,
    first_logits: torch.Tensor,
    max_new_tokens: int | Sequence[int],
    *,
    choose: Callable[[torch.Tensor, list[list[int]], list[bool]], list[int]] | None = None,
    step_inputs: Callable[[torch.Tensor], dict] | None = None,
    stop_at_eos: bool = True,
    on_token: Callable[[list[list[int]]], None] | None = None,
) -> tuple[list[list[int]], float]:
    """The decoding loop: every batch row in lockstep until each has met EOS or its limit; returns each row's ids
    (EOS excluded) and seconds.

    A row stops at EOS or its limit (``max_new_tokens``, one for all rows or one per row); finished rows keep being
    fed (their tokens ignored) so the batch stays rectangular. ``choose(logits, tokens, done)`` picks every row's
    next token from the step's logits ``[B, vocab]`` (default: argmax; Whisper's long-form windows apply timestamp
    rules and sample). ``step_inputs(ids)`` turns the chosen ids ``[B, 1]`` into the model's inputs for the next
    step (default: the ids alone; left-padded batches add positions and masks).
    """
    eos = set(adapter.eos_token_ids) if stop_at_eos else set()
    rows = first_logits.shape[0]
    limits = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    logits = first_logits
    synchronize(adapter.device)
    start = time.perf_counter()
    with torch.no_grad():
        while True:
            chosen = choose(logits, tokens, done) if choose is not None else logits.argmax(-1).tolist()
            grew = False
            for row, token in enumerate(chosen):
                if done[row]:
                    continue
                if token in eos:
                    done[row] = True
                    continue
                tokens[row].append(token)
                grew = True
                done[row] = len(tokens[row]) >= limits[row]
            if on_token is not None and grew:
                on_token(tokens)
            if all(done):
                break
            ids = torch.tensor(chosen, dtype=torch.long, device=logits.device)[:, None]
            step = step_inputs(ids) if step_inputs is not None else {"input_ids": ids}
            logits = adapter.next_token_logits(step, cache)
    synchronize(adapter.device)
    return tokens, time.perf_counter() - start


def greedy_generate(adapter, inputs: dict, cache, max_new_tokens: int, stop_at_eos: bool = True) -> Generation:
    logits, seconds_prefill = prefill(adapter, inputs, cache)
    tokens, seconds_decode, hit_limit = decode_greedy(adapter, cache, logits, max_new_tokens, stop_at_eos)
    return Generation(tokens, seconds_prefill, seconds_decode, hit_limit)
