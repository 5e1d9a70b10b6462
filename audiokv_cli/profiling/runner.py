"""The profiling loop: decode each clip with attention capture, score the steps, checkpoint, resume.

A run is resumable: every ``checkpoint_every`` clips (and when interrupted) the partial statistics, the list of
finished clips and the run's configuration are written atomically to ``NAME.partial.safetensors/.json``. Started
again with the same output path and configuration, the run skips the finished clips; the final profile is then
identical to an uninterrupted run's (the sums are exact, see statistics.py). The partial files go at the end.

With sensitivity settings, the head sensitivity table (sensitivity.py) is measured after the last clip on the first
clips of the data and stored in the same profile; an interrupted measurement starts over on resume.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.profiling.alignment import Aligner, Clip, WordTiming, data_digest, incremental_pieces
from audiokv_cli.profiling.capture import AttentionRecorder
from audiokv_cli.profiling.sensitivity import SensitivitySettings, measure_sensitivity
from audiokv_cli.profiling.profile_file import (
    HeadProfile,
    ProfileError,
    audiokv_version,
    load_profile,
    partial_paths,
    remove_profile_files,
    save_profile,
    utc_now,
)
from audiokv_cli.profiling.statistics import HeadStatistics, align_tokens_to_words, word_token_span

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileSettings:
    """What changes the statistic; two runs with equal settings (and model, dtype) are resumable/mergeable."""

    aligner: str = "manifest"
    top_k: int = 24
    min_confidence: float = 0.95
    max_new_tokens: int = 128
    # Feed the reference transcript instead of the model's own greedy tokens (every step then lies on a word).
    teacher_forcing: bool = False

    @property
    def statistic(self) -> str:
        return "audio_mass" if self.aligner == "none" else "topk_hits"

    @property
    def decoding(self) -> str:
        return "teacher_forced" if self.teacher_forcing else "greedy"

    def validate(self) -> None:
        if self.top_k < 1:
            raise AudiokvError(f"--top-k must be at least 1, got {self.top_k}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise AudiokvError(f"--min-confidence must be in [0, 1], got {self.min_confidence:g}")
        if self.max_new_tokens < 1:
            raise AudiokvError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.teacher_forcing and self.aligner == "none":
            raise AudiokvError("teacher forcing needs transcripts; it cannot be used with --aligner none")


@dataclass
class ClipOutcome:
    clip_id: str
    decode_steps: int = 0
    scored_steps: int = 0
    words: int = 0
    words_aligned: int = 0
    text: str = ""


@dataclass
class RunCounters:
    clips: int = 0
    words: int = 0
    words_aligned: int = 0
    scored_steps: int = 0
    decode_steps: int = 0
    data: list[list[str]] = field(default_factory=list)

    def add(self, clip: Clip, outcome: ClipOutcome) -> None:
        self.clips += 1
        self.words += outcome.words
        self.words_aligned += outcome.words_aligned
        self.scored_steps += outcome.scored_steps
        self.decode_steps += outcome.decode_steps
        self.data.append([clip.clip_id, clip.audio_sha256])


class ProgressSink(Protocol):
    def start(self, total: int, done: int) -> None: ...

    def advance(self, outcome: ClipOutcome) -> None: ...


# ------------------------------------------------------------------------------------------------------ one clip


def _decode_with_capture(
    adapter, prepared, recorder: AttentionRecorder, max_new_tokens: int, forced: Sequence[int] | None
) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Greedy (or forced) decoding through the runtime with the recorder as the attention handler; returns
    generated ids (EOS excluded) and, per id, the attention record of the forward pass whose logits chose it."""
    from audiokv_cli import runtime

    limit = min(max_new_tokens, len(forced)) if forced is not None else max_new_tokens
    if limit == 0:
        return [], []
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def choose(logits, tokens, done) -> list[int]:
        topk, mass = recorder.take()  # what the forward pass that made these logits attended to
        records.append((topk.to(torch.int32), mass))
        return [int(forced[len(tokens[0])])] if forced is not None else logits.argmax(-1).tolist()

    output = runtime.run(
        adapter, runtime.PlainSession(adapter, recorder), prepared.inputs, limit, choose=choose,
        stop_at_eos=forced is None,
    )
    tokens = output.tokens[0]
    return tokens, records[: len(tokens)]


def profile_clip(
    adapter,
    audio,
    words: list[WordTiming] | None,
    settings: ProfileSettings,
    clip_id: str = "clip",
    transcript: str | None = None,
) -> tuple[HeadStatistics, ClipOutcome]:
    """Decode one clip with capture and score its steps. ``words`` None selects the alignment-free statistic."""
    geometry = adapter.geometry
    prepared = adapter.prepare(audio)
    if not prepared.audio_spans:
        raise AudiokvError(f"clip {clip_id!r}: the prompt holds no audio tokens")
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    forced = None
    if settings.teacher_forcing:
        if not transcript:
            raise AudiokvError(f"clip {clip_id!r}: teacher forcing needs the clip's text")
        forced = tokenizer(transcript, add_special_tokens=False)["input_ids"]
    recorder = AttentionRecorder(
        geometry.num_layers, settings.top_k, prepared.audio_spans, layer_index=adapter.profile_layer_index
    )
    tokens, records = _decode_with_capture(adapter, prepared, recorder, settings.max_new_tokens, forced)
    stats = HeadStatistics.zeros(geometry.num_layers, geometry.num_query_heads, settings.top_k)
    pieces = incremental_pieces(tokenizer, tokens)
    outcome = ClipOutcome(clip_id=clip_id, decode_steps=len(tokens), text="".join(pieces).strip())
    whole_audio = (prepared.audio_spans[0][0], prepared.audio_spans[-1][1])
    if words is None:
        for (topk, mass), piece in zip(records, pieces):
            if piece.strip():  # special tokens decode to nothing and say nothing about speech
                stats.add_step(topk, mass, whole_audio)
                outcome.scored_steps += 1
        return stats, outcome
    kept = [w for w in words if w.confidence >= settings.min_confidence]
    outcome.words = len(kept)
    aligned = align_tokens_to_words(pieces, words, settings.min_confidence)
    used: set[int] = set()
    # The audio may come as several spans (segments, time markers between them): words are placed on the audio
    # tokens in order, then mapped back to prompt positions.
    audio_positions = [p for start, end in prepared.audio_spans for p in range(start, end)]
    for (topk, mass), word in zip(records, aligned):
        if word is None:
            continue
        first, end = word_token_span(
            word.start, word.end, (0, len(audio_positions)), adapter.seconds_per_audio_token, prepared.audio_seconds
        )
        span = (audio_positions[first], audio_positions[end - 1] + 1)
        stats.add_step(topk, mass, span)
        outcome.scored_steps += 1
        used.add(id(word))
    outcome.words_aligned = len(used)
    return stats, outcome


# --------------------------------------------------------------------------------------------------------- the run


def run_config(adapter, settings: ProfileSettings, sensitivity: SensitivitySettings | None = None) -> dict:
    """Everything a resumed run must share with the interrupted one."""
    config = {
        "fingerprint": adapter.fingerprint(),
        "settings": asdict(settings),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "audio_token_map": _audio_token_map(adapter),
    }
    if sensitivity is not None:
        # Listed so a JSON round trip (the checkpoint) compares equal.
        config["sensitivity"] = {"strengths": list(sensitivity.strengths), "clips": sensitivity.clips}
    return config


def _audio_token_map(adapter) -> str:
    spt = adapter.seconds_per_audio_token
    return f"exact:{spt:g}s" if spt else "uniform"


def _provenance(adapter, settings: ProfileSettings, counters: RunCounters) -> dict:
    return {
        "statistic": settings.statistic,
        "aligner": settings.aligner,
        "top_k": settings.top_k,
        "min_confidence": settings.min_confidence,
        "decoding": settings.decoding,
        "max_new_tokens": settings.max_new_tokens,
        "audio_token_map": _audio_token_map(adapter),
        "clips": counters.clips,
        "words": counters.words,
        "words_aligned": counters.words_aligned,
        "scored_steps": counters.scored_steps,
        "decode_steps": counters.decode_steps,
        "data": [list(entry) for entry in counters.data],
        "data_digest": data_digest([tuple(entry) for entry in counters.data]),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "device": str(adapter.device.type),
        "audiokv_version": audiokv_version(),
        "created": utc_now(),
    }


def _resume_state(adapter, clips: Sequence[Clip], out, config: dict, geometry, top_k: int):
    partial, _ = partial_paths(out)
    if not partial.exists():
        return HeadStatistics.zeros(geometry.num_layers, geometry.num_query_heads, top_k), RunCounters()
    try:
        previous = load_profile(partial)
    except ProfileError as error:
        raise ProfileError(f"{error}; delete {partial} to start over") from None
    if previous.extra.get("checkpoint", {}).get("config") != config:
        raise ProfileError(
            f"{partial}: an unfinished run with different settings or model writes to this output; "
            f"use the same options to resume, or delete {partial} (and its .json) to start over"
        )
    done = previous.provenance.get("data", [])
    if len(done) > len(clips):
        raise ProfileError(f"{partial}: the unfinished run had more clips than this data holds; delete it to start over")
    for (clip_id, sha), clip in zip(done, clips):
        if clip.clip_id != clip_id or clip.audio_sha256 != sha:
            raise ProfileError(
                f"{partial}: the data changed since the unfinished run (clip {clip_id!r}); delete it to start over"
            )
    p = previous.provenance
    counters = RunCounters(
        clips=p["clips"],
        words=p["words"],
        words_aligned=p["words_aligned"],
        scored_steps=p["scored_steps"],
        decode_steps=p["decode_steps"],
        data=[list(entry) for entry in done],
    )
    return previous.stats, counters


def run_profile(
    adapter,
    clips: Sequence[Clip],
    aligner: Aligner,
    settings: ProfileSettings,
    out: str | os.PathLike,
    checkpoint_every: int = 25,
    progress: ProgressSink | None = None,
    after_clip: Callable[[int, Clip, ClipOutcome], None] | None = None,
    load_audio: Callable | None = None,
    sensitivity: SensitivitySettings | None = None,
    sensitivity_progress: Callable[[int, int], None] | None = None,
    sensitivity_data: Sequence[Clip] | None = None,
) -> HeadProfile:
    """Profile ``clips`` and write the profile to ``out`` (resuming an unfinished run there if one exists).

    ``after_clip(index, clip, outcome)`` runs after each clip is counted (tests use it to interrupt a run).
    ``sensitivity``: also measure the head sensitivity table, on the first clips of ``sensitivity_data`` (default:
    ``clips``; a rank of a distributed run passes all the data), ``sensitivity_progress(done, total)`` per clip.
    """
    from audiokv_cli.io.audio import SilentAudioWarning
    from audiokv_cli.io.audio import load_audio as default_load_audio

    settings.validate()
    if settings.aligner != aligner.name:
        raise AudiokvError(f"settings name aligner {settings.aligner!r} but {aligner.name!r} was given")
    if checkpoint_every < 1:
        raise AudiokvError(f"--checkpoint-every must be at least 1, got {checkpoint_every}")
    if not clips:
        raise AudiokvError("no clips to profile")
    read_audio = load_audio or default_load_audio
    geometry = adapter.geometry
    if sensitivity is not None:
        sensitivity.validate()
    config = run_config(adapter, settings, sensitivity)
    stats, counters = _resume_state(adapter, clips, out, config, geometry, settings.top_k)
    start = counters.clips
    if start:
        logger.info("resuming: %d of %d clips already profiled", start, len(clips))
    if progress is not None:
        progress.start(len(clips), start)

    measured = None

    def snapshot() -> HeadProfile:
        return HeadProfile(stats, adapter.fingerprint(), _provenance(adapter, settings, counters), sensitivity=measured)

    def checkpoint() -> None:
        partial = snapshot()
        partial.extra["checkpoint"] = {"config": config}
        save_profile(partial, partial_paths(out)[0])

    since_checkpoint = 0
    try:
        for index in range(start, len(clips)):
            clip = clips[index]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SilentAudioWarning)
                audio = read_audio(clip.audio_path, max_seconds=adapter.max_audio_seconds)
            words = aligner.align(clip, audio)
            clip_stats, outcome = profile_clip(adapter, audio, words, settings, clip.clip_id, clip.text)
            stats.add(clip_stats)
            counters.add(clip, outcome)
            since_checkpoint += 1
            if progress is not None:
                progress.advance(outcome)
            if since_checkpoint >= checkpoint_every and index + 1 < len(clips):
                checkpoint()
                since_checkpoint = 0
            if after_clip is not None:
                after_clip(index, clip, outcome)
        if sensitivity is not None:
            measured = measure_sensitivity(
                adapter, sensitivity_data if sensitivity_data is not None else clips, sensitivity,
                settings.max_new_tokens, read_audio, sensitivity_progress,
            )
    except BaseException:
        # Keep what finished (Ctrl-C, a bad file, a crash) so the same command resumes from here.
        if since_checkpoint:
            checkpoint()
        raise
    profile = snapshot()
    if settings.statistic == "topk_hits" and counters.scored_steps == 0:
        logger.warning("no decoding step matched a word of the transcripts; every head score is 0")
    save_profile(profile, out)
    remove_profile_files(partial_paths(out)[0])
    return profile
