"""Train the bundled model's projector + Qwen2 text decoder on cached audio-tower outputs (ASR).

The Qwen2-Audio model is built once with the Whisper tiny.en tower (frozen, unused during training because its
outputs are cached by prepare_data.py) and a small Qwen2 decoder with grouped-query attention. Each example is
exactly what the processor produces at inference:

    <|audio_bos|> <|AUDIO|> x n_tokens <|audio_eos|> Detect the language and recognize the speech: <|en|>
    -> transcript <|endoftext|>

with the loss on the transcript and end token only. One learning-rate schedule (warm-up, cosine decay to zero)
runs over the whole wall-clock budget, so training ends exactly at ``--end-utc`` / after ``--minutes``.
Checkpoints (complete model + processor folders) go to ``<out>/latest`` every ``--save-every-min`` and to
``<out>/final`` at the end; held-out loss / CER / WER are logged to ``<out>/metrics.jsonl``.

Resumable: ``latest`` also holds the training state: ``training_state.json`` (step, epoch, clips seen, elapsed
training seconds and budget, last learning rate, loss averages, the data RNG and the batches left in the current
epoch) and ``optimizer.pt`` (AdamW state, the auxiliary CTC head, the torch RNG; tensors and plain types, read back
with ``weights_only``). ``--resume`` continues from it when it is there and starts normally otherwise, so one
command both starts and continues a run (killed at any moment, machine rebooted). The schedule is a function of the
elapsed training time over the budget: the time the runs' processes ran (set-up, evaluations and saves included, as
in an uninterrupted run); time while no process ran does not count, and the steps after the last save are redone. On
resume ``--minutes`` replaces the saved budget (stretching or shrinking the rest of the schedule) and ``--end-utc``
sets it to end then; ``--max-steps`` counts steps across resumes. Data order: the epoch goes on with its saved
remaining batches and the data RNG continues its stream, so no clip of the epoch is repeated (with the same shards,
the order is that of an uninterrupted run). A checkpoint is written to ``.latest.tmp`` and renamed in, so a kill
during a save leaves the previous ``latest`` (or the new one) complete.

``--init-from FOLDER`` starts from a model folder (a checkpoint, or the exported ``audiokv_cli/assets/tiny`` whose
float16 weights load as float32) with a fresh optimizer, schedule and CTC head (it takes the model weights only).

Usage: python scripts/bundled_model/train.py --data .build/data --out .build/train --end-utc 05:05
       python scripts/bundled_model/train.py --data .build/data --out .build/train --minutes 120 --resume
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from text_side import ASR_PROMPT, ASR_TEXT, AUDIO, AUDIO_BOS, AUDIO_EOS, build_processor, train_tokenizer  # noqa: E402

# Decoder geometry: 8 query heads share 2 KV heads (grouped-query attention, group size 4).
TEXT_CONFIG = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_dropout=0.1,
    use_sliding_window=False,
)


# ----------------------------------------------------------------------------------------------------- data


class Shards:
    """All clips of one split: metadata list and one float16 feature matrix per shard."""

    def __init__(self, data_dir: Path, prefix: str):
        self.data_dir, self.prefix = data_dir, prefix
        self.metas: list[dict] = []
        self.arrays: list[np.ndarray] = []
        self.loaded: set[str] = set()
        self.refresh()

    def refresh(self) -> int:
        """Load shards written since the last call (data preparation may still be running); returns new clips."""
        before = len(self.metas)
        for meta_path in sorted(self.data_dir.glob(f"{self.prefix}-*.jsonl")):
            if meta_path.name in self.loaded:
                continue
            self.loaded.add(meta_path.name)
            array = np.load(meta_path.with_suffix(".npy"))
            shard = len(self.arrays)
            self.arrays.append(array)
            for line in meta_path.read_text().splitlines():
                m = json.loads(line)
                m["shard"] = shard
                self.metas.append(m)
        return len(self.metas) - before

    def features(self, i: int) -> np.ndarray:
        m = self.metas[i]
        return self.arrays[m["shard"]][m["offset"] : m["offset"] + m["n_tokens"]]


def load_corpus_texts(corpus_cache: Path) -> list[str]:
    from corpus import normalize_transcript

    data = json.loads(corpus_cache.read_text())
    return [normalize_transcript(s) for _, sentences in data["train"] for s in sentences]


class Examples:
    """Token ids of prompt and target per clip, built with the exported tokenizer."""

    def __init__(self, shards: Shards, hf_tok, max_target: int = 400):
        self.shards = shards
        self.prompt_tail = hf_tok(ASR_TEXT, add_special_tokens=False).input_ids
        ids = hf_tok.convert_tokens_to_ids
        self.audio_bos, self.audio_eos, self.audio_id = ids(AUDIO_BOS), ids(AUDIO_EOS), ids(AUDIO)
        full = hf_tok(ASR_PROMPT, add_special_tokens=False).input_ids
        assert full == [self.audio_bos, self.audio_id, self.audio_eos] + self.prompt_tail, "prompt tokenization drift"
        self.eos = hf_tok.eos_token_id
        self.hf_tok, self.max_target = hf_tok, max_target
        self.targets: list[list[int]] = []
        # Where each target token sits in its transcript, as a fraction of the characters (token centre): speech runs
        # at a roughly even rate, so this times the number of audio tokens is a rough guess of where it is spoken.
        self.text_fractions: list[np.ndarray] = []
        self.sync()

    def sync(self) -> None:
        """Tokenize targets of clips the shards gained since the last call."""
        for m in self.shards.metas[len(self.targets) :]:
            enc = self.hf_tok(m["text"], add_special_tokens=False, return_offsets_mapping=True)
            ids = enc.input_ids[: self.max_target]
            self.targets.append(ids + [self.eos])
            centres = [(a + b) / 2 for a, b in enc["offset_mapping"][: len(ids)]]
            self.text_fractions.append(np.asarray(centres, dtype=np.float32) / max(1, len(m["text"])))

    def length(self, i: int) -> int:
        return self.shards.metas[i]["n_tokens"] + 2 + len(self.prompt_tail) + len(self.targets[i])


def make_batches(examples: Examples, indices: list[int], token_budget: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches whose padded size stays under ``token_budget``."""
    order = sorted(indices, key=lambda i: (examples.length(i), rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        longest_next = max(longest, examples.length(i))
        if current and longest_next * (len(current) + 1) > token_budget:
            batches.append(current)
            current, longest_next = [], examples.length(i)
        current.append(i)
        longest = longest_next
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def spec_mask(feats: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """SpecAugment-like time masking on cached tower outputs: a few short spans zeroed."""
    n = feats.shape[0]
    for _ in range(n // 60):
        if rng.random() < 0.5:
            width = rng.randint(1, 4)
            start = rng.randrange(0, max(1, n - width))
            feats[start : start + width] = 0
    return feats


def collate(model, examples: Examples, batch: list[int], train: bool, rng: random.Random, feat_dropout: float):
    """inputs_embeds [B, L, H], attention_mask [B, L], labels [B, L] (-100 outside targets), right padded."""
    embed = model.get_input_embeddings()
    projector = model.model.multi_modal_projector
    seqs, labels = [], []
    for i in batch:
        feats = torch.from_numpy(examples.shards.features(i).astype(np.float32))
        if train:
            feats = spec_mask(feats, rng)
            feats = F.dropout(feats, feat_dropout, training=True)
        audio = projector(feats)
        head = embed(torch.tensor([examples.audio_bos]))
        tail_ids = [examples.audio_eos] + examples.prompt_tail + examples.targets[i]
        tail = embed(torch.tensor(tail_ids))
        seqs.append(torch.cat([head, audio, tail], dim=0))
        lab = torch.full((seqs[-1].shape[0],), -100, dtype=torch.long)
        n_target = len(examples.targets[i])
        # position p predicts token p+1: the last prompt token predicts the first target token.
        lab[-n_target - 1 : -1] = torch.tensor(examples.targets[i])
        labels.append(lab)
    longest = max(s.shape[0] for s in seqs)
    hidden = seqs[0].shape[1]
    inputs = torch.zeros(len(batch), longest, hidden)
    mask = torch.zeros(len(batch), longest, dtype=torch.long)
    lab_out = torch.full((len(batch), longest), -100, dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labels)):
        inputs[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = 1
        lab_out[b, : s.shape[0]] = lab
    return inputs, mask, lab_out


def guided_attention_loss(attentions, heads: list[tuple[int, int]], rows: list[tuple[int, np.ndarray, np.ndarray, int]]
                          ) -> torch.Tensor:
    """-log of the attention mass that chosen heads put near where the token they predict is spoken.

    ``rows``: per batch item (b, sequence positions that predict transcript tokens, the guessed audio index of each
    of those tokens, number of audio tokens); audio tokens start at sequence index 1. The window is wide (a Gaussian
    of 4 % of the clip + 4 tokens) because the guess assumes an even speaking rate. A decoder trained from scratch
    otherwise needs a long time to discover the alignment by itself; this only gets the search started and is
    switched off for the last part of training.
    """
    losses = []
    for b, positions, centres, n_audio in rows:
        sigma = 0.04 * n_audio + 4.0
        frames = torch.arange(n_audio, dtype=torch.float32)
        window = torch.exp(-((frames[None, :] - torch.from_numpy(centres)[:, None]) ** 2) / (2 * sigma**2))
        pos = torch.from_numpy(positions)
        for layer, head in heads:
            attn = attentions[layer][b, head, pos, 1 : 1 + n_audio]  # [tokens, audio]
            losses.append(-torch.log((attn * window).sum(-1) + 1e-4))
    return torch.cat(losses).mean()


def forward_loss(model, inputs, mask, labels, smoothing: float, ctc=None, parts: dict | None = None, guide=None
                 ) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on the transcript; plus, when ``ctc`` is given, the auxiliary CTC loss.

    ``ctc`` = (head, layer, weight, blank, audio lengths, targets). The CTC head reads the audio positions of an
    intermediate decoder layer and must spell the transcript from them in order: this makes the audio positions
    carry "which token is said here" early, so the decoder's attention finds the audio much sooner. The head is
    training-only and is not exported.
    """
    out = model.model.language_model(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=ctc is not None,
                                     output_attentions=guide is not None)
    hidden = out.last_hidden_state
    keep = labels != -100
    logits = model.lm_head(hidden[keep])
    loss = F.cross_entropy(logits, labels[keep], label_smoothing=smoothing)
    if ctc is not None:
        head, layer, weight, blank, audio_lengths, targets = ctc
        mid = out.hidden_states[layer]
        longest = max(audio_lengths)
        log_probs = head(mid[:, 1 : 1 + longest]).log_softmax(-1).transpose(0, 1)  # [T, B, C]
        flat = torch.tensor([t for tgt in targets for t in tgt], dtype=torch.long)
        ctc_loss = F.ctc_loss(log_probs, flat, torch.tensor(audio_lengths), torch.tensor([len(t) for t in targets]),
                              blank=blank, zero_infinity=True)
        if parts is not None:
            parts["ctc"] = float(ctc_loss.detach())
        loss = loss + weight * ctc_loss
    if guide is not None:
        guide_loss = guided_attention_loss(out.attentions, *guide[1:])
        if parts is not None:
            parts["guide"] = float(guide_loss.detach())
        loss = loss + guide[0] * guide_loss
    return loss, int(keep.sum())


# ------------------------------------------------------------------------------------------------ decoding


@torch.inference_mode()
def greedy_transcribe(model, examples: Examples, i: int) -> list[int]:
    # ~3 words/s * ~1.5 tokens/word at most; a generous cap keeps repetition loops from eating the eval budget.
    max_new_tokens = int(examples.shards.metas[i]["seconds"] * 8) + 10
    embed = model.get_input_embeddings()
    feats = torch.from_numpy(examples.shards.features(i).astype(np.float32))
    prompt = torch.cat(
        [
            embed(torch.tensor([examples.audio_bos])),
            model.model.multi_modal_projector(feats),
            embed(torch.tensor([examples.audio_eos] + examples.prompt_tail)),
        ]
    )[None]
    from transformers import DynamicCache

    from audiokv_cli.compat import cache_kwargs

    lm = model.model.language_model
    past = DynamicCache()  # filled in place by each call: no cache to read back from the outputs
    out = lm(inputs_embeds=prompt, **cache_kwargs(lm, past), use_cache=True)
    token = int(model.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
    generated = []
    while token != examples.eos and len(generated) < max_new_tokens:
        generated.append(token)
        out = lm(inputs_embeds=embed(torch.tensor([[token]])), **cache_kwargs(lm, past), use_cache=True)
        token = int(model.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
    return generated


def evaluate(model, examples: Examples, loss_idx: list[int], decode_idx: list[int], hf_tok) -> dict:
    import jiwer

    model.eval()
    with torch.inference_mode():
        total, count = 0.0, 0
        for start in range(0, len(loss_idx), 8):
            batch = loss_idx[start : start + 8]
            inputs, mask, labels = collate(model, examples, batch, False, random.Random(0), 0.0)
            loss, n = forward_loss(model, inputs, mask, labels, 0.0)
            total += float(loss) * n
            count += n
    refs, hyps, samples = [], [], []
    for i in decode_idx:
        hyp = hf_tok.decode(greedy_transcribe(model, examples, i), skip_special_tokens=True).strip()
        refs.append(examples.shards.metas[i]["text"])
        hyps.append(hyp)
    model.train()
    long_ids = [k for k, i in enumerate(decode_idx) if examples.shards.metas[i]["seconds"] >= 20]
    short_ids = [k for k, i in enumerate(decode_idx) if examples.shards.metas[i]["seconds"] < 10]
    wer = lambda ks: jiwer.wer([refs[k] for k in ks], [hyps[k] or "-" for k in ks]) if ks else None  # noqa: E731
    return {
        "heldout_loss": total / max(1, count),
        "cer": jiwer.cer(refs, [h or "-" for h in hyps]),
        "wer": wer(range(len(refs))),
        "wer_short": wer(short_ids),
        "wer_long": wer(long_ids),
        "sample_ref": refs[long_ids[0]] if long_ids else refs[0],
        "sample_hyp": hyps[long_ids[0]] if long_ids else hyps[0],
    }


# ---------------------------------------------------------------------------------------------- model


def build_model(vocab_size: int, eos_id: int, pad_id: int, audio_id: int):
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration, Qwen2Config

    from audio_tower import build_tower
    from whisper_weights import whisper_encoder_kwargs

    text_config = Qwen2Config(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=eos_id,
                              **TEXT_CONFIG)
    config = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(**whisper_encoder_kwargs()).to_dict(),
        text_config=text_config.to_dict(),
        audio_token_index=audio_id,
    )
    config.audio_token_id = audio_id
    config.pad_token_id, config.eos_token_id = pad_id, eos_id
    model = Qwen2AudioForConditionalGeneration(config)
    model.model.audio_tower.load_state_dict(build_tower().state_dict())
    for p in model.model.audio_tower.parameters():
        p.requires_grad_(False)
    # Small-init embeddings: the default std 0.02 is fine for the decoder; keep audio projector default init.
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.do_sample = False
    return model


STATE_FILE = "training_state.json"  # counters, loss averages, data RNG, rest of the epoch (JSON); written last
TRAINER_FILE = "optimizer.pt"  # AdamW state, auxiliary CTC head, torch RNG: tensors and plain types only


def fsync_folder(folder: Path) -> None:
    """Flush a folder's files and the folder itself, so a reboot right after the rename finds them complete."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def recover_checkpoint(out: Path, name: str) -> None:
    """Finish a swap that a kill interrupted between its two renames.

    ``name`` missing while ``.name.old`` exists happens only there, and then ``.name.tmp`` is complete (it is renamed
    only once fully written); the check for its state file is a second guard.
    """
    final, tmp, old = out / name, out / f".{name}.tmp", out / f".{name}.old"
    if final.exists() or not old.exists():
        return
    os.replace(tmp if (tmp / STATE_FILE).exists() else old, final)
    print(f"recovered {final} from an interrupted save", flush=True)


def save_checkpoint(model, processor, out: Path, name: str, info: dict, trainer: dict | None = None) -> None:
    """Write ``out/name`` (model + processor, ``info`` as JSON, ``trainer`` with torch.save) so that a kill at any
    moment leaves either the old or the new folder complete: everything goes to ``.name.tmp`` first, then the old
    folder is moved aside and the new one renamed in (a directory cannot be renamed over a non-empty one)."""
    recover_checkpoint(out, name)
    final, tmp, old = out / name, out / f".{name}.tmp", out / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if trainer is not None:
        torch.save(trainer, tmp / TRAINER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(info, indent=1))
    fsync_folder(tmp)
    shutil.rmtree(old, ignore_errors=True)  # only a leftover of a kill during the last line below
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_folder(out)
    shutil.rmtree(old, ignore_errors=True)


def resumable_state(folder: Path) -> dict | None:
    """The training state of a checkpoint folder, or None when it has none (absent, or saved before resume existed)."""
    path = folder / STATE_FILE
    if not path.exists() or not (folder / TRAINER_FILE).exists():
        return None
    state = json.loads(path.read_text())
    return state if "elapsed" in state and "budget" in state else None


def rng_to_json(rng: random.Random) -> list:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def rng_from_json(data: list) -> tuple:
    return (data[0], tuple(data[1]), data[2])


# ---------------------------------------------------------------------------------------------- main


def moving_average(average: float | None, value: float | None) -> float | None:
    """Exponential moving average of a logged loss (0.98 decay); a missing value leaves it unchanged."""
    if value is None:
        return average
    return value if average is None else 0.98 * average + 0.02 * value


def end_timestamp(args) -> float:
    if args.end_utc:
        now = dt.datetime.now(dt.timezone.utc)
        hh, mm = (int(x) for x in args.end_utc.split(":"))
        end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if end <= now:
            raise SystemExit(f"end time {args.end_utc} UTC is in the past")
        return end.timestamp()
    return time.time() + (args.minutes or 60.0) * 60


def load_model_folder(folder: Path):
    """Processor + float32 model from a model folder (checkpoint, or exported with float16 weights on disk)."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters()), f"{folder} did not load as float32"
    for p in model.model.audio_tower.parameters():
        p.requires_grad_(False)
    return processor, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(".build/data"))
    parser.add_argument("--corpus-cache", type=Path, default=Path(".build/corpus.json"))
    parser.add_argument("--out", type=Path, default=Path(".build/train"))
    parser.add_argument("--end-utc", default=None, help="HH:MM (UTC, today) when training must end")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget, the schedule's length (default 60; given on resume, it replaces the "
                             "saved budget)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/latest when it holds a training state (else start normally)")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--token-budget", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup-frac", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--feat-dropout", type=float, default=0.1)
    parser.add_argument("--short-first-frac", type=float, default=0.1,
                        help="budget share trained on short clips only (alignment is found on short clips first)")
    parser.add_argument("--short-seconds", type=float, default=12.0, help="what counts as a short clip")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="model folder to start from (checkpoint or exported model): weights only")
    parser.add_argument("--ctc-weight", type=float, default=0.0, help="auxiliary CTC loss weight (0 = off)")
    parser.add_argument("--ctc-layer", type=int, default=2, help="decoder layer whose audio positions feed CTC")
    parser.add_argument("--guide-weight", type=float, default=0.0, help="guided-attention loss weight (0 = off)")
    parser.add_argument("--guide-until-frac", type=float, default=0.6,
                        help="budget share after which the guided-attention weight has decayed to zero")
    parser.add_argument("--guide-heads", default="2:0,2:1,3:0,3:1", help="layer:head pairs that are guided")
    parser.add_argument("--save-every-min", type=float, default=10.0)
    parser.add_argument("--eval-every-min", type=float, default=8.0)
    parser.add_argument("--eval-decode", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop once the step counter (counted across resumes) reaches this (smoke tests)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    start = time.time()  # elapsed training time = saved elapsed + time since this process started
    budget = end_timestamp(args) - start if args.end_utc else (args.minutes or 60.0) * 60
    args.out.mkdir(parents=True, exist_ok=True)

    latest = args.out / "latest"
    recover_checkpoint(args.out, "latest")
    saved = resumable_state(latest)
    if args.resume and saved is None:
        print(f"nothing to resume in {latest}: starting afresh", flush=True)
    elif not args.resume and saved is not None:
        print(f"note: {latest} holds a resumable state (step {saved['step']}); without --resume this run starts "
              f"afresh and overwrites it", flush=True)
    resuming = args.resume and saved is not None

    if resuming:
        processor, model = load_model_folder(latest)
        hf_tok = processor.tokenizer
        if args.init_from:
            print(f"--init-from {args.init_from} ignored: resuming", flush=True)
    elif args.init_from:
        # Continue from a model folder (weights + its tokenizer) with a fresh optimizer, schedule and CTC head.
        processor, model = load_model_folder(args.init_from)
        hf_tok = processor.tokenizer
        print(f"initialized from {args.init_from}" + (" (model weights only: the auxiliary CTC head starts fresh)"
                                                     if args.ctc_weight > 0 else ""), flush=True)
    else:
        tokenizer = train_tokenizer(load_corpus_texts(args.corpus_cache) + [ASR_TEXT.split("<")[0]] * 50,
                                    args.vocab_size)
        processor = build_processor(tokenizer)
        hf_tok = processor.tokenizer
        ids = hf_tok.convert_tokens_to_ids
        model = build_model(len(hf_tok), hf_tok.eos_token_id, hf_tok.pad_token_id, ids(AUDIO))
    if args.guide_weight > 0:
        model.set_attn_implementation("eager")  # attention weights are needed for the guided-attention loss
    model.train()

    train = Examples(Shards(args.data, "train"), hf_tok)
    heldout = Examples(Shards(args.data, "heldout"), hf_tok)
    ho_rng = random.Random(123)
    ho_all = list(range(len(heldout.targets)))
    loss_idx = ho_rng.sample(ho_all, min(60, len(ho_all)))
    longs = [i for i in ho_all if heldout.shards.metas[i]["seconds"] >= 20]
    shorts = [i for i in ho_all if heldout.shards.metas[i]["seconds"] < 10]
    half = args.eval_decode // 2
    decode_idx = ho_rng.sample(longs, min(half, len(longs))) + ho_rng.sample(shorts, min(half, len(shorts)))

    ctc_head = torch.nn.Linear(TEXT_CONFIG["hidden_size"], len(hf_tok)) if args.ctc_weight > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    if ctc_head is not None:
        params += list(ctc_head.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )

    # Everything a resumed run continues with; the loss averages and the epoch's remaining batches included.
    state = {"step": 0, "epoch": 0, "clips_seen": 0, "elapsed": 0.0, "budget": budget, "lr": None,
             "last_eval": 0.0, "last_save": 0.0, "train_loss": None, "ctc_loss": None, "guide_loss": None,
             "phase": None, "batches": []}

    def lr_at(frac: float) -> float:
        if frac < args.warmup_frac:
            return args.lr * max(frac / args.warmup_frac, 0.02)
        progress = (frac - args.warmup_frac) / (1 - args.warmup_frac)
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    if resuming:
        trainer = torch.load(latest / TRAINER_FILE, weights_only=True)  # tensors and plain types, nothing pickled
        try:
            optim.load_state_dict(trainer["optimizer"])
        except ValueError:  # the parameter set changed (CTC switched on or off): moments cannot be matched
            print("optimizer state does not fit (CTC head switched on/off): fresh optimizer moments", flush=True)
        for group, weight_decay in zip(optim.param_groups, (args.weight_decay, 0.0)):
            group["weight_decay"] = weight_decay  # the flags of this run apply; lr is set every step
        if ctc_head is not None and trainer.get("ctc_head") is not None:
            ctc_head.load_state_dict(trainer["ctc_head"])
        elif ctc_head is not None:
            print("the checkpoint has no CTC head: it starts fresh", flush=True)
        torch.set_rng_state(trainer["torch_rng"])
        rng.setstate(rng_from_json(saved["python_rng"]))
        state.update({k: saved[k] for k in state if k in saved and k != "budget"})
        # Saved clip indices stay valid: shards are read in name order and only appended to.
        kept = ([i for i in batch if i < len(train.targets)] for batch in saved["batches"])
        state["batches"] = [batch for batch in kept if batch]
        state["budget"] = saved["budget"]
        if args.end_utc:  # end at that time: what is left until then, on top of what was trained
            state["budget"] = saved["elapsed"] + end_timestamp(args) - start
        elif args.minutes is not None:
            state["budget"] = args.minutes * 60
        if abs(state["budget"] - saved["budget"]) > 1e-6:
            print(f"budget changed from {saved['budget'] / 60:.2f} to {state['budget'] / 60:.2f} min: the schedule "
                  f"{'stretches' if state['budget'] > saved['budget'] else 'shrinks'} from here", flush=True)
        print(f"resumed from {latest} at step {state['step']}, epoch {state['epoch']} ({len(state['batches'])} "
              f"batches left in it), clips {state['clips_seen']}, elapsed {state['elapsed'] / 60:.2f} of "
              f"{state['budget'] / 60:.2f} min, last lr {state['lr'] or 0:.2e}, lr now "
              f"{lr_at(state['elapsed'] / state['budget']):.2e}", flush=True)
    budget, saved_elapsed, first_step = state["budget"], state["elapsed"], state["step"]
    saved_as = [(first_step, saved["budget"]) if resuming else None]  # what latest holds
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"train clips {len(train.targets)}, heldout clips {len(heldout.targets)}, trainable params {n_params}, "
          f"budget {budget / 60:.1f} min", flush=True)

    def elapsed_now() -> float:
        return saved_elapsed + time.time() - start

    def save_latest() -> None:
        if saved_as[0] == (state["step"], budget):  # nothing new since the last save (it fell on the last step)
            return
        saved_as[0] = (state["step"], budget)
        state["elapsed"] = elapsed_now()
        info = dict(state, python_rng=rng_to_json(rng), args={k: str(v) for k, v in vars(args).items()})
        trainer = {"optimizer": optim.state_dict(), "torch_rng": torch.get_rng_state(),
                   "ctc_head": None if ctc_head is None else ctc_head.state_dict()}
        save_checkpoint(model, processor, args.out, "latest", info, trainer)
        print(f"saved latest: step {state['step']} lr {state['lr'] or 0:.2e} elapsed "
              f"{state['elapsed'] / 60:.2f} of {budget / 60:.2f} min", flush=True)

    metrics_path = args.out / "metrics.jsonl"
    guide_heads = [tuple(int(x) for x in pair.split(":")) for pair in args.guide_heads.split(",")]
    batches: list[list[int]] = state["batches"]  # the same list: saving it saves the rest of the epoch
    while True:
        elapsed = elapsed_now()
        frac = elapsed / budget
        if frac >= 1.0 or (args.max_steps and state["step"] >= args.max_steps):
            break
        want_phase = "short" if frac < args.short_first_frac else "all"
        if not batches or want_phase != state["phase"]:
            if want_phase != state["phase"]:
                state["phase"] = want_phase
            else:
                state["epoch"] += 1
            if train.shards.refresh():
                train.sync()
                print(f"train clips now {len(train.targets)}", flush=True)
            all_idx = list(range(len(train.targets)))
            short_idx = [i for i in all_idx if train.shards.metas[i]["seconds"] < args.short_seconds]
            batches[:] = make_batches(train, short_idx if state["phase"] == "short" else all_idx, args.token_budget,
                                      rng)
            if not batches:  # data preparation has not written a training shard yet
                time.sleep(15)
                continue
        batch = batches.pop()
        lr = lr_at(frac)
        for group in optim.param_groups:
            group["lr"] = lr
        inputs, mask, labels = collate(model, train, batch, True, rng, args.feat_dropout)
        ctc = None
        if ctc_head is not None:
            lengths = [train.shards.metas[i]["n_tokens"] for i in batch]
            targets = [train.targets[i][:-1] or [train.eos] for i in batch]
            ctc = (ctc_head, args.ctc_layer, args.ctc_weight, hf_tok.pad_token_id, lengths, targets)
        guide = None
        guide_weight = args.guide_weight * max(0.0, 1.0 - frac / args.guide_until_frac)
        if guide_weight > 0:
            rows = []
            for b, i in enumerate(batch):
                n_audio = train.shards.metas[i]["n_tokens"]
                n_target = len(train.targets[i])
                # as in collate: position length - n_target - 1 + k predicts target token k; the end token is not guided
                positions = np.arange(n_target - 1) + train.length(i) - n_target - 1
                rows.append((b, positions, train.text_fractions[i] * n_audio, n_audio))
            guide = (guide_weight, guide_heads, rows)
        parts: dict = {}
        loss, _ = forward_loss(model, inputs, mask, labels, args.label_smoothing, ctc, parts, guide)
        state["guide_loss"] = moving_average(state["guide_loss"], parts.get("guide"))
        state["ctc_loss"] = moving_average(state["ctc_loss"], parts.get("ctc"))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optim.step()
        state["step"] += 1
        state["clips_seen"] += len(batch)
        state["lr"] = lr
        state["train_loss"] = moving_average(state["train_loss"], float(loss.detach()))
        step, ema, ctc_ema, guide_ema = state["step"], state["train_loss"], state["ctc_loss"], state["guide_loss"]
        if step == first_step + 1:  # shows where the schedule (re)starts
            print(f"step {step} (first of this run) lr {lr:.2e} elapsed {elapsed / 60:.2f} of {budget / 60:.2f} min "
                  f"loss {ema:.3f}", flush=True)
        if step % 25 == 0:
            print(f"step {step} ep {state['epoch']} {state['phase']} min {elapsed_now() / 60:.1f} lr {lr:.2e} "
                  f"loss {ema:.3f} gnorm {grad_norm:.2f} clips {state['clips_seen']}"
                  + (f" ctc {ctc_ema:.3f}" if ctc_ema is not None else "")
                  + (f" guide {guide_ema:.3f}" if guide_ema is not None else ""), flush=True)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps({"step": step, "minutes": elapsed_now() / 60, "lr": lr,
                                     "train_loss": ema, "ctc_loss": ctc_ema, "guide_loss": guide_ema,
                                     "clips_seen": state["clips_seen"]}) + "\n")
        if elapsed_now() - state["last_eval"] > args.eval_every_min * 60:
            result = evaluate(model, heldout, loss_idx, decode_idx, hf_tok)
            result.update(step=step, minutes=elapsed_now() / 60, train_loss=ema, clips_seen=state["clips_seen"])
            print("EVAL " + json.dumps(result), flush=True)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(result) + "\n")
            state["last_eval"] = elapsed_now()
        if elapsed_now() - state["last_save"] > args.save_every_min * 60:
            state["last_save"] = elapsed_now()
            save_latest()
    # latest too, so that rerunning with --resume finds the run finished instead of redoing its tail
    save_latest()
    save_checkpoint(model, processor, args.out, "final", {
        "step": state["step"], "epoch": state["epoch"], "clips_seen": state["clips_seen"],
        "elapsed": elapsed_now(), "args": {k: str(v) for k, v in vars(args).items()}})
    result = evaluate(model, heldout, loss_idx, decode_idx, hf_tok)
    result.update(step=state["step"], minutes=elapsed_now() / 60, train_loss=state["train_loss"],
                  clips_seen=state["clips_seen"], final=True)
    print("EVAL " + json.dumps(result), flush=True)
    with open(metrics_path, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    print("done", flush=True)


if __name__ == "__main__":
    main()
