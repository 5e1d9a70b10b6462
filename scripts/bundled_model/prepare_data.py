"""Synthesize the ASR training set and cache the frozen audio tower's outputs.

Each clip: consecutive sentences of one training document (or, for a few clips, a random word list), spoken by a
random training voice setting, augmented, then encoded by the Whisper tiny.en tower on its valid frames. Clip
lengths are mixed (short, medium and many 20-30 s clips) because long-form transcription matters most.
A small held-out monitoring set (held-out documents and voices, no augmentation) is cached alongside.

Output (``--out``): ``train-NNN.npy`` (float16 [sum rows, D]) + ``train-NNN.jsonl`` (one line per clip with
offset, n_tokens (rows), text, seconds, voice, effects), same for ``heldout-NNN``. Seeded: the same seed and
installed files give the same clips. ``--tower base --stop-layer 4`` caches Whisper base's hidden states after
layer 4 (50 rows per second, before the pool) for the ``small`` model, whose training runs the top layers itself.

Usage: python scripts/bundled_model/prepare_data.py --out .build/data --num-train 9000 --num-heldout 150
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402
from speech import MAX_SECONDS, SAMPLE_RATE, VoiceSetting, augment, sample_voice, synthesize  # noqa: E402

LENGTH_BUCKETS = ((0.30, 1.5, 10.0), (0.25, 10.0, 20.0), (0.45, 20.0, 29.5))  # (share, min s, max s)
WORDLIST_SHARE = 0.05
AUGMENT_SHARE = 0.75


def corpus_cached(cache: Path) -> tuple[list[corpus.Document], list[corpus.Document]]:
    if cache.exists():
        data = json.loads(cache.read_text())
    else:
        train, heldout = corpus.build_corpus()
        data = {
            "train": [[d.doc_id, list(d.sentences)] for d in train],
            "heldout": [[d.doc_id, list(d.sentences)] for d in heldout],
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, cache)
    load = lambda rows: [corpus.Document(i, tuple(s)) for i, s in rows]  # noqa: E731
    return load(data["train"]), load(data["heldout"])


def words_per_second(setting: VoiceSetting) -> float:
    if setting.engine == "espeak":
        return setting.rate / 60.0 * 0.85
    return 2.6 / setting.rate


class SentenceStream:
    """Walks the documents in a seeded order, handing out consecutive sentences without reuse (wraps around)."""

    def __init__(self, docs: list[corpus.Document], rng: random.Random):
        self.docs = docs[:]
        rng.shuffle(self.docs)
        self.doc_index, self.sentence_index = 0, 0
        self.rng = rng

    def take(self, n_words: int) -> str:
        words: list[str] = []
        while len(words) < n_words:
            doc = self.docs[self.doc_index % len(self.docs)]
            if self.sentence_index >= len(doc.sentences):
                self.doc_index += 1
                self.sentence_index = 0
                if words and len(words) >= 0.6 * n_words:
                    break  # end clips at a document boundary rather than mixing documents when close enough
                continue
            words += doc.sentences[self.sentence_index].split()
            self.sentence_index += 1
        return " ".join(words[:n_words]).rstrip(",;:")


def plan_jobs(docs: list[corpus.Document], n: int, heldout: bool, seed: int, buckets=LENGTH_BUCKETS) -> list[dict]:
    """Seeded clip plans: text, voice setting (from the requested side of the split), augmentation flag."""
    rng = random.Random(seed)
    stream = SentenceStream(docs, random.Random(seed + 1))
    vocabulary = sorted({w.strip(".,;:!?'") for d in docs[:4000] for s in d.sentences for w in s.split()})
    vocabulary = [w for w in vocabulary if w.isalpha() and len(w) > 1]
    jobs = []
    for i in range(n):
        voice = sample_voice(rng, heldout=heldout)
        share = rng.random()
        for bucket_share, lo, hi in buckets:
            if share < bucket_share:
                break
            share -= bucket_share
        seconds = rng.uniform(lo, hi)
        n_words = max(2, int(round(seconds * words_per_second(voice))))
        if not heldout and rng.random() < WORDLIST_SHARE:
            text = " ".join(rng.choice(vocabulary) for _ in range(n_words))
        else:
            text = stream.take(n_words)
        jobs.append(
            {
                "index": i,
                "text": text,
                "voice": voice.describe(),
                "augment": (not heldout) and rng.random() < AUGMENT_SHARE,
                "seed": rng.randrange(2**31),
            }
        )
    return jobs


_TOWER = None
_FE = None
_STOP_LAYER = None


def _init_worker(tower: str, stop_layer: int | None) -> None:
    global _TOWER, _FE, _STOP_LAYER
    import torch

    torch.set_num_threads(1)
    from audio_tower import build_tower, feature_extractor

    _TOWER, _FE, _STOP_LAYER = build_tower(tower), feature_extractor(), stop_layer


def speak_within_limit(text: str, voice: VoiceSetting, limit: float = MAX_SECONDS - 0.5) -> tuple[str, np.ndarray]:
    """Synthesize; if longer than ``limit`` seconds, drop words from the end and try again."""
    for _ in range(4):
        audio = synthesize(text, voice)
        seconds = len(audio) / SAMPLE_RATE
        if seconds <= limit:
            return text, audio
        words = text.split()
        keep = max(1, int(len(words) * limit / seconds * 0.95))
        text = " ".join(words[:keep]).rstrip(",;:")
    raise RuntimeError("could not fit clip under the length limit")


def _run_job(job: dict) -> tuple[dict, np.ndarray] | None:
    from audio_tower import encode_valid

    try:
        voice = VoiceSetting(**job["voice"])
        text, audio = speak_within_limit(job["text"], voice)
        effects: list[str] = []
        if job["augment"]:
            audio, effects = augment(audio, random.Random(job["seed"]))
        feats = encode_valid(_TOWER, _FE, audio, _STOP_LAYER).astype(np.float16)
    except Exception as exc:  # one bad clip must not stop the run
        print(f"skip clip {job['index']}: {exc}", file=sys.stderr)
        return None
    meta = {
        "index": job["index"],
        "text": corpus.normalize_transcript(text),
        "spoken": text,
        "seconds": round(len(audio) / SAMPLE_RATE, 3),
        "n_tokens": int(feats.shape[0]),
        "voice": job["voice"],
        "effects": effects,
    }
    return meta, feats


def _write_shard(out: Path, name: str, metas: list[dict], feats: list[np.ndarray]) -> None:
    offset = 0
    for m in metas:
        m["offset"] = offset
        offset += m["n_tokens"]
    array = np.concatenate(feats, axis=0)
    tmp_npy = out / f".{name}.npy.tmp"
    with open(tmp_npy, "wb") as fh:
        np.save(fh, array)
    tmp_meta = out / f".{name}.jsonl.tmp"
    tmp_meta.write_text("".join(json.dumps(m) + "\n" for m in metas))
    os.replace(tmp_npy, out / f"{name}.npy")
    os.replace(tmp_meta, out / f"{name}.jsonl")


def run(jobs: list[dict], out: Path, prefix: str, workers: int, shard_size: int, tower: str = "tiny.en",
        stop_layer: int | None = None, first_shard: int = 0) -> None:
    metas, feats, shard, done = [], [], first_shard, 0
    start = time.time()
    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tower, stop_layer)) as pool:
        for result in pool.imap(_run_job, jobs, chunksize=4):
            done += 1
            if result is not None:
                metas.append(result[0])
                feats.append(result[1])
            if len(metas) >= shard_size:
                _write_shard(out, f"{prefix}-{shard:03d}", metas, feats)
                metas, feats, shard = [], [], shard + 1
            if done % 200 == 0:
                rate = done / (time.time() - start)
                print(f"{prefix}: {done}/{len(jobs)} clips, {rate:.2f}/s, eta {(len(jobs) - done) / rate / 60:.1f} min",
                      flush=True)
    if metas:
        _write_shard(out, f"{prefix}-{shard:03d}", metas, feats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".build/data"))
    parser.add_argument("--corpus-cache", type=Path, default=Path(".build/corpus.json"))
    parser.add_argument("--num-train", type=int, default=9000)
    parser.add_argument("--num-heldout", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower", choices=("tiny.en", "base"), default="tiny.en")
    parser.add_argument("--stop-layer", type=int, default=None, help="cache hidden states after this many layers")
    parser.add_argument("--buckets", default=None,
                        help="clip lengths as share:min:max,... (default 0.30:1.5:10,0.25:10:20,0.45:20:29.5)")
    args = parser.parse_args()
    buckets = LENGTH_BUCKETS
    if args.buckets:
        buckets = tuple(tuple(float(v) for v in b.split(":")) for b in args.buckets.split(","))

    args.out.mkdir(parents=True, exist_ok=True)
    train_docs, heldout_docs = corpus_cached(args.corpus_cache)
    heldout_jobs = plan_jobs(heldout_docs, args.num_heldout, heldout=True, seed=args.seed * 1000 + 7, buckets=buckets)
    train_jobs = plan_jobs(train_docs, args.num_train, heldout=False, seed=args.seed * 1000 + 1, buckets=buckets)
    (args.out / "plan.json").write_text(json.dumps({"seed": args.seed, "num_train": len(train_jobs),
                                                      "num_heldout": len(heldout_jobs)}))
    tower = dict(tower=args.tower, stop_layer=args.stop_layer)
    if not list(args.out.glob("heldout-*.jsonl")):
        run(heldout_jobs, args.out, "heldout", args.workers, args.shard_size, **tower)
    # Resumable: finished shards are kept, and the plan is seeded, so a rerun picks up at the next shard.
    done_shards = len(list(args.out.glob("train-*.jsonl")))
    run(train_jobs[done_shards * args.shard_size:], args.out, "train", args.workers, args.shard_size,
        first_shard=done_shards, **tower)
    (args.out / "DONE").write_text("ok\n")
    print("done", flush=True)


if __name__ == "__main__":
    main()
