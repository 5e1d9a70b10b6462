"""`audiokv eval` rows for clips longer than one Whisper window: each cell transcribes the clip with the long-form
path (`longform.transcribe_files`: consecutive 30 s windows, each window's cross-attention cache compressed by the
cell's policy), and the row has the fields of a one-window row plus what long-form adds.

Field meanings on a long row: ``kv_bytes_full`` is one window's full cross-attention cache and ``kv_bytes_kept`` the
largest window's kept cache (as `infer --format json` reports them); ``kv_bytes_kept_total`` sums the windows;
``seconds_prefill`` / ``seconds_decode`` sum the windows (compression happens inside each window's prefill, so
``seconds_compress`` is 0); ``seconds_total`` is the whole transcription, ``real_time_factor`` that over the audio
length; ``windows``, ``fallbacks``, ``skipped_windows``, ``rewound_windows`` as in the long-form JSON. A long clip is decoded once per
cell (a window's start depends on the previous window's tokens, so cells share nothing), in the calling process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from audiokv_cli.evaluation.metrics import is_degenerate
from audiokv_cli.evaluation.sweep import byte_fields, scored_row


def takes_long_audio(adapter_or_family) -> bool:
    """Whether the model family transcribes audio longer than its window as consecutive windows (Whisper)."""
    return hasattr(adapter_or_family, "prepare_window")


def clip_seconds(path) -> float:
    """The clip's length from its header, or (mp3 and the like) by decoding it."""
    from audiokv_cli.runtime.longform import AudioStream, probe_seconds

    seconds = probe_seconds(path)
    if seconds is None:
        stream = AudioStream(path)
        seconds = stream.seconds
        stream.close()
    return seconds


def split_long(adapter, examples: Sequence) -> tuple[list, list]:
    """(examples one window takes, examples longer than the model's window) for a long-form family; otherwise all
    examples are short (and an over-long one is refused when it is read)."""
    if not takes_long_audio(adapter):
        return list(examples), []
    short, long = [], []
    for example in examples:
        (long if clip_seconds(example.audio_path) > adapter.max_audio_seconds + 1e-6 else short).append(example)
    return short, long


def long_row(adapter, example, cell, transcript) -> dict:
    """One eval row from a long-form transcript (the fields of `sweep.run_sweep`'s rows, plus long-form's)."""
    # A loop in any window, not only at the end of the file (each window's text tokens, timestamps left out).
    windows: dict[int, list[int]] = {}
    for segment in transcript.segments:
        windows.setdefault(segment.window, []).extend(t for t in segment.tokens if t < adapter.end_of_text)
    text_tokens = [token for tokens in windows.values() for token in tokens]
    degenerate = is_degenerate(text_tokens, bool(transcript.hit_token_limit), strip_ids=adapter.eos_token_ids) or any(
        is_degenerate(tokens, strip_ids=adapter.eos_token_ids) for tokens in windows.values()
    )
    row = scored_row(example, cell, transcript.text)
    row.update(
        {
            "degenerate": degenerate,
            "hit_token_limit": bool(transcript.hit_token_limit),
            "generated_tokens": transcript.generated_tokens,
            "audio_seconds": transcript.audio_seconds,
            "prompt_tokens": len(adapter.timestamp_prompt_ids),
            "audio_tokens": adapter.frames,
            **byte_fields(transcript.kv_bytes_full, transcript.kv_bytes_kept_max, transcript.kv_bytes_full_16bit),
            # the policy as the windows ran it (a byte budget's retention, bits and merging filled in)
            "kv_bits": transcript.kv_bits,
            "kv_budget": transcript.kv_budget,
            "merge": transcript.merge,
            "cross_store": transcript.cross_store,
            "retention_run": transcript.retention,
            "seconds_prefill": transcript.seconds_prefill,
            "seconds_compress": 0.0,
            "seconds_decode": transcript.seconds_decode,
            # what long-form adds
            "longform": True,
            "windows": transcript.windows,
            "kv_bytes_kept_total": transcript.kv_bytes_kept_total,
            "seconds_total": transcript.seconds_total,
            "real_time_factor": round(transcript.real_time_factor, 4),
            "fallbacks": transcript.fallbacks,
            "skipped_windows": transcript.skipped_windows,
            "rewound_windows": transcript.rewound_windows,
        }
    )
    return row


def run_long_clips(
    adapter,
    examples: Sequence,
    cells: Sequence,
    *,
    options=None,
    on_step: Callable | None = None,
    on_row: Callable[[dict], None] | None = None,
    done: Mapping[tuple, dict] | None = None,
) -> list[dict]:
    """Rows for every (long clip, cell), clip order then cell order; ``done`` rows (resume) are taken as they are.

    ``options``: `longform.LongformOptions` (default: openai-whisper's; `audiokv eval` caps each window's tokens
    at --max-new-tokens, as `infer` does).
    """
    from audiokv_cli.runtime.longform import transcribe_files

    done = done or {}
    rows: list[dict] = []
    for example in examples:
        for cell in cells:
            key = (example.id, *cell.key)
            if key in done:
                rows.append(done[key])
                continue
            transcript = next(iter(transcribe_files(
                adapter, [str(example.audio_path)], cell.policy, options, names=[example.id]
            )))
            row = long_row(adapter, example, cell, transcript)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if on_step is not None:
                on_step(example.id, cell)
    return rows
