"""Whisper on audio of any length: consecutive 30 s windows, each with its own compressed cross-attention cache.

The algorithm is Whisper's sequential long-form transcription (openai-whisper's `transcribe`, which transformers'
`WhisperForConditionalGeneration.generate` reimplements); its rules are taken from transformers rather than
rewritten:

- each window is decoded after the timestamp prompt (`<|startoftranscript|>` [`<|en|><|transcribe|>`], no
  `<|notimestamps|>`), with transformers' `WhisperTimeStampLogitsProcessor` deciding where timestamp tokens may go;
- the window's tokens are cut into segments and the next window's start is found by transformers'
  `WhisperGenerationMixin._retrieve_segment`: after the last complete segment, or a whole window on when the window
  ended with a single timestamp (nothing more was said in it);
- runaway windows are caught by the guards openai-whisper uses: a window whose token compression ratio
  (transformers' `_retrieve_compression_ratio`, zlib over the token bytes) is above 1.35 or whose mean log
  probability is below -1 is decoded again at the next temperature (0.2, 0.4, ... 1.0, sampled with a generator
  seeded from the window's audio, so runs repeat whatever the file is called); a window whose <|nospeech|>
  probability is above 0.6 while its mean log probability is below -1 is silence and skipped;
- the previous windows' tokens (at most 223) go in front as `<|startofprev|>` context, and are dropped after a window
  needed a temperature above 0.5 (carried context spreads a loop).

What audiokv adds: every window is prefilled through a compression session, so its cross-attention cache (1,500
encoder frames per layer and head) is compressed by the chosen method before the window's tokens are decoded; the
audio is read in blocks (soundfile, resampled with soxr as it streams) and only the current window is held, so
memory does not grow with the length of the file; several files decode together as batch rows (one window of each
per step; the windows of one file depend on each other), each row compressed on its own, with the tokens of one
file at a time (tested). Windows that need a temperature fallback are decoded again alone.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from audiokv_cli import runtime
from audiokv_cli.io.audio import SAMPLE_RATE, AudioError, check_complete, check_path, load_audio, promised_seconds
from audiokv_cli.compression.methods import build_policy
from audiokv_cli.compression.policy import CompressionPolicy, CompressionSession, LayerKeepStats, stored_policy
from audiokv_cli.errors import AudiokvError

WINDOW_SECONDS = 30.0
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)
#: audio samples per mel frame (10 ms) and mel frames per encoder frame / timestamp step (20 ms)
HOP = 160
INPUT_STRIDE = 2
TIME_PRECISION = 0.02
#: a tail shorter than this after the last window is not decoded (a few samples make Whisper invent words)
MIN_TAIL_SECONDS = 0.1
#: samples read from the file per block
BLOCK_SAMPLES = 1 << 16


@dataclass
class LongformOptions:
    """openai-whisper's defaults for the guards; transformers' token-based compression ratio threshold."""

    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = 1.35
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    #: tokens one window may generate (Whisper: half its 448-position text context)
    max_new_tokens: int = 224
    seed: int = 0
    #: a segment at least this long that says fewer words per second than `min_words_per_second` skipped speech
    #: (a compressed cache can jump a passage: one short segment stamped across 25 s); the next window starts where
    #: it starts, so the passage is read again at the front of a window. None turns the guard off.
    sparse_segment_seconds: float | None = 8.0
    min_words_per_second: float = 0.5


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    window: int = 0
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass
class Transcript:
    """One file transcribed: text, timed segments, and what each window's compressed cache cost."""

    clip: str
    text: str
    segments: list[Segment]
    model: str
    method: str
    retention: float
    language: str
    audio_seconds: float
    windows: int
    generated_tokens: int
    #: bytes of one window's full cross-attention cache, and of the largest / all windows' compressed caches
    kv_bytes_full: int
    kv_bytes_kept_max: int
    kv_bytes_kept_total: int
    seconds_prefill: float
    seconds_decode: float
    seconds_total: float
    fallbacks: int = 0
    skipped_windows: int = 0
    #: windows cut short at a long, nearly wordless segment (the next window read that passage again)
    rewound_windows: int = 0
    hit_token_limit: int = 0
    #: one window's compressed cache at 16 bits (what --kv-budget is a fraction of), the stored bits, the budget
    #: given and what happened to evicted entries
    kv_bytes_full_16bit: int = 0
    kv_bits: int = 0
    kv_budget: float | None = None
    merge: str = "none"
    #: the cross-attention cache per layer and head ("kv") or the encoder output once ("latent")
    cross_store: str = "kv"

    @property
    def real_time_factor(self) -> float:
        return self.seconds_total / self.audio_seconds if self.audio_seconds else 0.0

    @property
    def token_ids(self) -> list[int]:
        return [token for segment in self.segments for token in segment.tokens]

    def to_json(self, details: bool = False) -> dict:
        record = asdict(self)
        record["real_time_factor"] = round(self.real_time_factor, 4)
        record["kept_ratio_max"] = round(self.kv_bytes_kept_max / self.kv_bytes_full, 6) if self.kv_bytes_full else 1.0
        # the names a one-clip result (`inference.ClipResult`) uses: the largest window's cache
        record["kv_bytes_kept"] = self.kv_bytes_kept_max
        for segment in record["segments"]:
            segment["start"] = round(segment["start"], 3)
            segment["end"] = round(segment["end"], 3)
            if not details:
                segment.pop("tokens")
        return record


# --------------------------------------------------------------------------------------------------- audio input


class AudioStream:
    """A file's samples as 16 kHz mono float32, read in blocks as windows ask for them.

    Only the samples from the current window's start on are held: memory stays at about one window whatever the
    file's length. Formats soundfile cannot read (mp3, ...) are decoded whole by `audio.load_audio` instead.
    """

    def __init__(self, source: str | os.PathLike | np.ndarray, name: str | None = None):
        self.name = name or (str(source) if not isinstance(source, np.ndarray) else "audio")
        self._file = None
        self._resampler = None
        self._buffer = np.zeros(0, dtype=np.float32)
        self._start = 0  # absolute index of self._buffer[0]
        self._eof = False
        if isinstance(source, np.ndarray):
            self._set_whole(np.asarray(source, dtype=np.float32).reshape(-1))
            return
        path = Path(source)
        check_path(path)
        import soundfile

        try:
            self._file = soundfile.SoundFile(str(path))
        except Exception:  # noqa: BLE001 - not a soundfile format: decode it whole (librosa/ffmpeg)
            self._set_whole(load_audio(path))
            return
        rate = self._file.samplerate
        from audiokv_cli.io.audio import MAX_RATE, MIN_RATE

        if not MIN_RATE <= rate <= MAX_RATE:
            self.close()
            raise AudioError(f"{path}: sample rate {rate} Hz is not an audio rate ({MIN_RATE}-{MAX_RATE} Hz)")
        if self._file.frames == 0:
            self.close()
            raise AudioError(f"{path}: zero-length audio")
        self.total_samples = int(round(self._file.frames * SAMPLE_RATE / rate))
        self._path = path
        self._promised = promised_seconds(path)
        if rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")

    def _set_whole(self, samples: np.ndarray) -> None:
        if samples.size == 0:
            raise AudioError(f"{self.name}: zero-length audio")
        if not np.all(np.isfinite(samples)):
            raise AudioError(f"{self.name}: audio contains NaN or infinite samples")
        self._buffer = samples
        self._eof = True
        self.total_samples = samples.shape[0]

    @property
    def seconds(self) -> float:
        return self.total_samples / SAMPLE_RATE

    def _read_block(self) -> None:
        block = self._file.read(BLOCK_SAMPLES, dtype="float32", always_2d=True)
        last = block.shape[0] < BLOCK_SAMPLES
        samples = block.mean(axis=1).astype(np.float32) if block.size else np.zeros(0, dtype=np.float32)
        if not np.all(np.isfinite(samples)):
            raise AudioError(f"{self.name}: audio contains NaN or infinite samples")
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        if samples.size:
            self._buffer = np.concatenate([self._buffer, samples])
        if last:
            self._eof = True
            self.close()
            check_complete(self._path, (self._start + self._buffer.shape[0]) / SAMPLE_RATE, self._promised)

    def window(self, start: int, length: int = WINDOW_SAMPLES) -> np.ndarray:
        """Samples ``[start, start + length)`` (fewer at the end of the file); earlier samples are released."""
        if start > self._start:
            drop = min(start - self._start, self._buffer.shape[0])
            self._buffer = self._buffer[drop:]
            self._start += drop
        while not self._eof and self._start + self._buffer.shape[0] < start + length:
            self._read_block()
        if self._eof:
            self.total_samples = self._start + self._buffer.shape[0]
        begin = max(0, start - self._start)
        return self._buffer[begin : begin + length].copy()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def probe_seconds(path: str | os.PathLike) -> float | None:
    """Seconds of audio from the header alone, or None where only decoding would tell (mp3 ...)."""
    from audiokv_cli.io.audio import audio_duration

    check_path(Path(path))
    return audio_duration(path)


# ----------------------------------------------------------------------------------------------- window decoding


def compression_ratio(tokens: Sequence[int], vocab_size: int) -> float:
    """transformers' `_retrieve_compression_ratio`: raw token bytes over their zlib-compressed size."""
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

    if not tokens:
        return 0.0
    return float(WhisperGenerationMixin._retrieve_compression_ratio(torch.tensor(list(tokens)), vocab_size))


class WindowSession(CompressionSession):
    """One window of each batch row: each row's cross-attention cache compressed by the policy on its own (its
    own audio span and decoder prompt; left padding of shorter prompts is not among the scoring queries)."""

    def __init__(self, policy: CompressionPolicy, adapter, prepared_rows, pads: list[int]):
        super().__init__(policy, adapter, prepared_rows[0])
        self.rows = [CompressionSession(policy, adapter, prepared, cache=self.cache) for prepared in prepared_rows]
        self.pads = pads

    def compress_layer(self, layer_idx: int, queries, keys, scaling: float, scores=None) -> None:
        if self.latent_projections is not None:
            self.compress_to_latent(layer_idx, self.rows)
            return
        keep = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device)
        for row, session in enumerate(self.rows):
            mask = session.layer_keep_mask(
                layer_idx, queries[row : row + 1, :, self.pads[row] :], keys[row : row + 1], scaling
            )
            keep[row] = mask[0]
            audio = session.audio_position_mask(keep.shape[-1], keep.device)
            session.layer_stats[layer_idx] = LayerKeepStats(
                kept=keep[row].sum(-1).tolist(),
                audio_kept=(keep[row] & audio).sum(-1).tolist(),
                text_kept=(keep[row] & ~audio).sum(-1).tolist(),
            )
        quant, merge = self.policy.quant, self.policy.merge_mode
        self.cache.compress_layer(layer_idx, keep, None, quant, merge)

    def kept_bytes_per_row(self) -> list[int]:
        """Each row's kept cross-attention bytes as a window alone holds them (`RaggedKVCache.kept_bytes`); under a
        policy that compresses nothing, the dense window cache."""
        if not self.policy.compresses:
            per_token = self.adapter.geometry.kv_bytes_per_token(self.adapter.dtype)
            return [row.prepared.compressed_length * per_token for row in self.rows]
        return self.cache.kept_bytes()


@dataclass
class WindowInput:
    samples: np.ndarray
    prompt: list[int]
    sot_index: int
    max_new_tokens: int
    seed: int


@dataclass
class WindowOutput:
    tokens: list[int]  # EOS excluded
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    kv_bytes_kept: int
    seconds_prefill: float
    seconds_decode: float
    hit_token_limit: bool


def timestamp_processor(adapter, begin_index: int):
    from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

    config = SimpleNamespace(
        no_timestamps_token_id=adapter.no_timestamps,
        eos_token_id=adapter.end_of_text,
        bos_token_id=adapter.end_of_text,
        # openai-whisper's max_initial_timestamp of 1 s
        max_initial_timestamp_index=int(round(1.0 / TIME_PRECISION)),
        _detect_timestamp_from_logprob=True,
    )
    return WhisperTimeStampLogitsProcessor(config, begin_index=begin_index)


def padded_decoder_steps(mask: torch.Tensor, lengths: list[int]):
    """``step_inputs`` for left-padded decoder prompts: the padding mask grown by one column and every row's own
    position, each step."""
    state = {"mask": mask, "positions": torch.tensor(lengths, device=mask.device)[:, None]}

    def step_inputs(ids: torch.Tensor) -> dict:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=-1)
        step = {"input_ids": ids, "decoder_attention_mask": state["mask"], "decoder_position_ids": state["positions"]}
        state["positions"] = state["positions"] + 1
        return step

    return step_inputs


def decode_windows(
    adapter, windows: Sequence[WindowInput], policy: CompressionPolicy, temperature: float = 0.0
) -> list[WindowOutput]:
    """Decode one window per batch row (left-padded prompts), each row's cache compressed on its own."""
    prepared = [adapter.prepare_window(window.samples, window.prompt) for window in windows]
    lengths = [len(window.prompt) for window in windows]
    longest = max(lengths)
    pads = [longest - length for length in lengths]
    device = adapter.device
    input_ids = torch.tensor(
        [[adapter.end_of_text] * pad + list(window.prompt) for window, pad in zip(windows, pads)], device=device
    )
    inputs = {"input_features": torch.cat([p.inputs["input_features"] for p in prepared]), "input_ids": input_ids}
    mask = None
    if any(pads):
        mask = torch.tensor([[0] * pad + [1] * length for pad, length in zip(pads, lengths)], device=device)
        inputs["decoder_attention_mask"] = mask
        inputs["decoder_position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    session = WindowSession(policy, adapter, prepared, pads)
    rows = len(windows)
    processors = [timestamp_processor(adapter, length) for length in lengths]
    generators = []
    for window in windows:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(window.seed * 1000 + int(round(temperature * 100)))
        generators.append(generator)
    logprob_sums = [0.0] * rows
    counted = [0] * rows
    at_sot: list[torch.Tensor] = []

    def window_prefill(inputs, cache):
        logits, sot_logits = adapter.window_logits(inputs, cache, [pad + w.sot_index for pad, w in zip(pads, windows)])
        at_sot.append(sot_logits)
        return logits

    def choose(logits, tokens, done) -> list[int]:
        """Whisper's timestamp rules on each row's sequence so far, then argmax or a seeded sample."""
        chosen = []
        for row in range(rows):
            if done[row]:
                chosen.append(adapter.end_of_text)
                continue
            sequence = list(windows[row].prompt) + tokens[row]
            row_logits = processors[row](torch.tensor([sequence]), logits[row : row + 1].cpu())
            logprobs = torch.log_softmax(row_logits, dim=-1)[0]
            if temperature > 0:
                probs = torch.softmax(row_logits[0] / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generators[row]))
            else:
                token = int(row_logits[0].argmax())
            logprob_sums[row] += float(logprobs[token])
            counted[row] += 1
            chosen.append(token)
        return chosen

    output = runtime.run(
        adapter, session, inputs, [window.max_new_tokens for window in windows],
        forward=window_prefill, choose=choose,
        step_inputs=padded_decoder_steps(mask, lengths) if mask is not None else None,
    )
    tokens, seconds_prefill, seconds_decode = output.tokens, output.seconds_prefill, output.seconds_decode
    no_speech = (
        torch.softmax(at_sot[0], dim=-1)[:, adapter.no_speech].tolist() if adapter.no_speech is not None else [0.0] * rows
    )
    vocab = int(adapter.model.config.vocab_size)
    return [
        WindowOutput(
            tokens=tokens[row],
            avg_logprob=logprob_sums[row] / max(1, counted[row]),
            no_speech_prob=float(no_speech[row]),
            compression_ratio=compression_ratio(tokens[row], vocab),
            temperature=temperature,
            kv_bytes_kept=output.kept_bytes[row],
            seconds_prefill=seconds_prefill / rows,
            seconds_decode=seconds_decode / rows,
            hit_token_limit=len(tokens[row]) >= windows[row].max_new_tokens,
        )
        for row in range(rows)
    ]


def needs_fallback(output: WindowOutput, options: LongformOptions) -> tuple[bool, bool]:
    """(decode again at the next temperature, skip the window as silence): transformers' `_need_fallback`."""
    fallback = False
    if options.compression_ratio_threshold is not None and output.compression_ratio > options.compression_ratio_threshold:
        fallback = True
    low_logprob = options.logprob_threshold is not None and output.avg_logprob < options.logprob_threshold
    if low_logprob:
        fallback = True
    if options.no_speech_threshold is not None and low_logprob and output.no_speech_prob > options.no_speech_threshold:
        return False, True
    return fallback, False


def window_seed(samples: np.ndarray, seed: int = 0) -> int:
    """The sampling seed of a window's temperature fallback, from its audio: the same recording samples the same
    whatever its file name or manifest id, alone or in a batch. The samples are rounded to 16 bits first, so the
    streamed and the whole-file readers (which may differ in the last float bits) agree."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    return (seed * 1_000_003 + zlib.crc32(pcm.tobytes())) % (2**62)


# ------------------------------------------------------------------------------------------------ one file's state


class FileJob:
    """The sequential state of one file: where the next window starts, the text so far, its segments."""

    def __init__(self, adapter, source, name: str, options: LongformOptions, index: int = 0):
        self.adapter = adapter
        self.name = name
        self.options = options
        self.stream = AudioStream(source, name)
        self.seek = 0
        self.history: list[int] = []
        self.prompt_reset_since = 0
        self.segments: list[Segment] = []
        self.window_index = 0
        self.index = index
        self.done = False
        self.base_prompt: list[int] | None = None
        self.language = getattr(adapter, "language", "en")
        self.kv_max = 0
        self.kv_total = 0
        self.seconds_prefill = 0.0
        self.seconds_decode = 0.0
        self.generated = 0
        self.fallbacks = 0
        self.skipped = 0
        self.hit_limit = 0
        self.rewound = 0
        self.started = time.perf_counter()
        self._pending: np.ndarray | None = None

    @property
    def seconds_done(self) -> float:
        return min(self.seek / SAMPLE_RATE, self.stream.seconds)

    def next_window(self) -> WindowInput | None:
        samples = self.stream.window(self.seek)
        if samples.shape[0] < MIN_TAIL_SECONDS * SAMPLE_RATE:
            self.finish()
            return None
        if self.base_prompt is None:
            if self.adapter.language == "auto":
                self.language = self.adapter.detect_language(samples)
            self.base_prompt = list(self.adapter.timestamp_prompt_ids)
        previous = self.history[self.prompt_reset_since :] if self.options.condition_on_previous_text else []
        prompt = list(self.base_prompt)
        if previous and self.adapter.start_of_previous is not None:
            limit = self.adapter.model.config.max_target_positions // 2 - 1
            prompt = [self.adapter.start_of_previous] + previous[-limit:] + prompt
        sot_index = len(prompt) - len(self.base_prompt)
        room = self.adapter.model.config.max_target_positions - len(prompt)
        self._pending = samples
        return WindowInput(
            samples=samples, prompt=prompt, sot_index=sot_index,
            max_new_tokens=max(1, min(self.options.max_new_tokens, room)),
            seed=window_seed(samples, self.options.seed),
        )

    def window_segments(self, output: WindowOutput) -> tuple[list[dict], int]:
        """transformers' segments of the current window's tokens (absolute times) and the frames to move on."""
        from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

        frames = self._pending.shape[0] // HOP
        if not output.tokens:
            return [], frames
        return WhisperGenerationMixin._retrieve_segment(
            seek_sequence=torch.tensor(output.tokens, dtype=torch.long),
            seek_outputs=[None],
            time_offset=[torch.tensor(self.seek / SAMPLE_RATE, dtype=torch.float64)],
            timestamp_begin=self.adapter.timestamp_begin,
            seek_num_frames=[frames],
            time_precision=TIME_PRECISION,
            time_precision_features=HOP / SAMPLE_RATE,
            input_stride=INPUT_STRIDE,
            prev_idx=0,
            idx=0,
            return_token_timestamps=False,
            decoder_input_ids=torch.zeros(1, 0, dtype=torch.long),
        )

    def starts_sparse(self, output: WindowOutput) -> bool:
        """The window opens with a long, nearly wordless segment: a decoding to try again at the next temperature
        (reading the window again from the same place would repeat it)."""
        offset = self.seek / SAMPLE_RATE
        sparse = self.first_sparse_segment(self.window_segments(output)[0], offset)
        return sparse is not None and sparse["start"] < offset + 1.0

    def accept(self, output: WindowOutput, fallbacks: int, skip: bool) -> None:
        """Take the window's final decoding: its segments, and where the next window starts."""
        samples = self._pending
        segment_samples = samples.shape[0]
        self.kv_max = max(self.kv_max, output.kv_bytes_kept)
        self.kv_total += output.kv_bytes_kept
        self.seconds_prefill += output.seconds_prefill
        self.seconds_decode += output.seconds_decode
        self.generated += len(output.tokens)
        self.fallbacks += fallbacks
        self.hit_limit += int(output.hit_token_limit)
        self.window_index += 1
        if skip:
            self.skipped += 1
            self.seek += segment_samples
            return
        offset_seconds = self.seek / SAMPLE_RATE
        segments, advance_frames = self.window_segments(output)
        window_end = offset_seconds + segment_samples / SAMPLE_RATE
        # A sparse segment at least a second in: keep what came before it, the next window starts there.
        sparse = self.first_sparse_segment(segments, not_before=offset_seconds + 1.0)
        if sparse is not None:
            segments = segments[:sparse["index"]]
            advance_frames = int(round((sparse["start"] - offset_seconds) * SAMPLE_RATE / HOP))
            self.rewound += 1
        for segment in segments:
            token_list = [int(t) for t in segment["tokens"]]
            text = self.adapter.decode([t for t in token_list if t < self.adapter.end_of_text])
            if not text:
                continue
            start = float(segment["start"])
            end = min(float(segment["end"]), window_end)
            self.segments.append(Segment(
                start=start, end=max(start, end), text=text, tokens=token_list, window=self.window_index - 1,
                temperature=output.temperature, avg_logprob=round(output.avg_logprob, 4),
                compression_ratio=round(output.compression_ratio, 4), no_speech_prob=round(output.no_speech_prob, 4),
            ))
            self.history.extend(token_list)
        advance = int(advance_frames) * HOP
        # The window must move on (a window that ends in a timestamp at 0 would be read again forever).
        self.seek += advance if advance > 0 else segment_samples
        if output.temperature > 0.5:
            self.prompt_reset_since = len(self.history)

    def first_sparse_segment(self, segments: list[dict], not_before: float) -> dict | None:
        """The first segment starting at ``not_before`` or later that is long and nearly wordless (see
        `LongformOptions.sparse_segment_seconds`), as {"index", "start"}; None if there is none."""
        limit = self.options.sparse_segment_seconds
        if limit is None:
            return None
        for index, segment in enumerate(segments):
            start, end = float(segment["start"]), float(segment["end"])
            if start < not_before or end - start < limit:
                continue
            token_list = [int(t) for t in segment["tokens"] if int(t) < self.adapter.end_of_text]
            words = len(self.adapter.decode(token_list).split())
            if words / (end - start) < self.options.min_words_per_second:
                return {"index": index, "start": start}
        return None

    def finish(self) -> None:
        self.done = True
        self.stream.close()

    def result(self, policy: CompressionPolicy) -> Transcript:
        adapter = self.adapter
        full = adapter.frames * adapter.geometry.kv_bytes_per_token(adapter.dtype)
        # Every window has the same frames: the sessions' one resolution (store, then budget) holds for all.
        window = SimpleNamespace(compressed_length=adapter.frames, audio_spans=[(0, adapter.frames)])
        policy = stored_policy(policy, adapter, window)
        return Transcript(
            clip=self.name,
            text=" ".join(segment.text for segment in self.segments).strip(),
            segments=self.segments,
            model=adapter.name,
            method=policy.name,
            retention=policy.retention,
            language=self.language,
            audio_seconds=round(self.stream.seconds, 3),
            windows=self.window_index,
            generated_tokens=self.generated,
            kv_bytes_full=full,
            kv_bytes_kept_max=self.kv_max,
            kv_bytes_kept_total=self.kv_total,
            kv_bytes_full_16bit=adapter.frames * adapter.geometry.kv_bytes_per_token(torch.float16),
            kv_bits=policy.stored_bits(adapter.dtype),
            kv_budget=policy.kv_budget,
            merge=policy.merge_mode,
            cross_store=policy.cross_store,
            seconds_prefill=round(self.seconds_prefill, 4),
            seconds_decode=round(self.seconds_decode, 4),
            seconds_total=round(time.perf_counter() - self.started, 4),
            fallbacks=self.fallbacks,
            skipped_windows=self.skipped,
            rewound_windows=self.rewound,
            hit_token_limit=self.hit_limit,
        )


def _decode_with_fallback(adapter, jobs: list[FileJob], windows: list[WindowInput], policy, options) -> None:
    """The first temperature for all rows at once; a row that fails the guards is decoded again alone."""
    outputs = decode_windows(adapter, windows, policy, options.temperatures[0])
    for job, window, output in zip(jobs, windows, outputs):
        fallbacks = 0
        retry, skip = needs_fallback(output, options)
        retry = retry or (not skip and job.starts_sparse(output))
        for temperature in options.temperatures[1:]:
            if not retry:
                break
            fallbacks += 1
            output = decode_windows(adapter, [window], policy, temperature)[0]
            retry, skip = needs_fallback(output, options)
            retry = retry or (not skip and job.starts_sparse(output))
        job.accept(output, fallbacks, skip)


def check_longform(adapter) -> None:
    if not hasattr(adapter, "prepare_window"):
        raise AudiokvError(
            f"{adapter.name}: long audio as consecutive windows is for the Whisper family (--model whisper-base); "
            "this model takes one clip up to its limit"
        )


def transcribe_files(
    adapter,
    sources: Sequence,
    policy: CompressionPolicy | None = None,
    options: LongformOptions | None = None,
    batch_size: int = 1,
    names: Sequence[str] | None = None,
    on_progress: Callable[[int, float, float], None] | None = None,
) -> Iterator[Transcript]:
    """Transcripts of ``sources`` (paths or 16 kHz arrays) in their order. ``batch_size`` files decode together
    (one window of each per step). ``on_progress(index, seconds_done, seconds_total)`` after every window."""
    check_longform(adapter)
    policy = policy or build_policy("full")
    options = options or LongformOptions()
    names = list(names) if names is not None else [
        "audio" if isinstance(source, np.ndarray) else str(source) for source in sources
    ]
    pending = list(range(len(sources)))
    active: list[FileJob] = []
    finished: dict[int, Transcript] = {}
    emitted = 0
    try:
        while pending or active:
            while pending and len(active) < batch_size:
                index = pending.pop(0)
                active.append(FileJob(adapter, sources[index], names[index], options, index))
            jobs, windows = [], []
            for job in list(active):
                window = job.next_window()
                if window is None:
                    active.remove(job)
                    finished[job.index] = job.result(policy)
                    continue
                jobs.append(job)
                windows.append(window)
            if jobs:
                _decode_with_fallback(adapter, jobs, windows, policy, options)
                if on_progress is not None:
                    for job in jobs:
                        on_progress(job.index, job.seconds_done, job.stream.seconds)
            while emitted in finished:
                yield finished.pop(emitted)
                emitted += 1
    finally:
        for job in active:
            job.stream.close()
