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

Usage: python scripts/bundled_model/train.py --data .build/data --out .build/train --end-utc 05:05
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


def save_checkpoint(model, processor, out: Path, name: str, info: dict) -> None:
    tmp = out / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "training_state.json").write_text(json.dumps(info, indent=1))
    final = out / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


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
    return time.time() + args.minutes * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(".build/data"))
    parser.add_argument("--corpus-cache", type=Path, default=Path(".build/corpus.json"))
    parser.add_argument("--out", type=Path, default=Path(".build/train"))
    parser.add_argument("--end-utc", default=None, help="HH:MM (UTC, today) when training must end")
    parser.add_argument("--minutes", type=float, default=60.0)
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
    parser.add_argument("--init-from", type=Path, default=None, help="checkpoint folder to continue from")
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
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke tests)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    start = time.time()
    end = end_timestamp(args)
    budget = end - start
    args.out.mkdir(parents=True, exist_ok=True)

    if args.init_from:
        # Continue from a checkpoint folder (weights + its tokenizer) with a fresh optimizer and schedule.
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        processor = AutoProcessor.from_pretrained(args.init_from)
        hf_tok = processor.tokenizer
        model = Qwen2AudioForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
        for p in model.model.audio_tower.parameters():
            p.requires_grad_(False)
        print(f"initialized from {args.init_from}", flush=True)
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
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"train clips {len(train.targets)}, heldout clips {len(heldout.targets)}, trainable params {n_params}, "
          f"budget {budget / 60:.1f} min", flush=True)
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

    def lr_at(frac: float) -> float:
        if frac < args.warmup_frac:
            return args.lr * max(frac / args.warmup_frac, 0.02)
        progress = (frac - args.warmup_frac) / (1 - args.warmup_frac)
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    metrics_path = args.out / "metrics.jsonl"
    step, epoch, ema, seen, ctc_ema, guide_ema = 0, 0, None, 0, None, None
    guide_heads = [tuple(int(x) for x in pair.split(":")) for pair in args.guide_heads.split(",")]
    last_save = last_eval = time.time()
    batches: list[list[int]] = []
    phase = None
    while True:
        now = time.time()
        frac = (now - start) / budget
        if frac >= 1.0 or (args.max_steps and step >= args.max_steps):
            break
        want_phase = "short" if frac < args.short_first_frac else "all"
        if not batches or want_phase != phase:
            if want_phase != phase:
                phase = want_phase
            else:
                epoch += 1
            if train.shards.refresh():
                train.sync()
                print(f"train clips now {len(train.targets)}", flush=True)
            all_idx = list(range(len(train.targets)))
            short_idx = [i for i in all_idx if train.shards.metas[i]["seconds"] < args.short_seconds]
            batches = make_batches(train, short_idx if phase == "short" else all_idx, args.token_budget, rng)
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
        guide_ema = moving_average(guide_ema, parts.get("guide"))
        ctc_ema = moving_average(ctc_ema, parts.get("ctc"))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optim.step()
        step += 1
        seen += len(batch)
        loss_value = float(loss.detach())
        ema = moving_average(ema, loss_value)
        if step % 25 == 0:
            print(f"step {step} ep {epoch} {phase} min {(time.time() - start) / 60:.1f} lr {lr:.2e} loss {ema:.3f} "
                  f"gnorm {grad_norm:.2f} clips {seen}" + (f" ctc {ctc_ema:.3f}" if ctc_ema is not None else "")
                  + (f" guide {guide_ema:.3f}" if guide_ema is not None else ""), flush=True)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps({"step": step, "minutes": (time.time() - start) / 60, "lr": lr,
                                     "train_loss": ema, "ctc_loss": ctc_ema, "guide_loss": guide_ema,
                                     "clips_seen": seen}) + "\n")
        if time.time() - last_eval > args.eval_every_min * 60:
            result = evaluate(model, heldout, loss_idx, decode_idx, hf_tok)
            result.update(step=step, minutes=(time.time() - start) / 60, train_loss=ema, clips_seen=seen)
            print("EVAL " + json.dumps(result), flush=True)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(result) + "\n")
            last_eval = time.time()
        if time.time() - last_save > args.save_every_min * 60:
            save_checkpoint(model, processor, args.out, "latest", {"step": step, "epoch": epoch, "clips_seen": seen})
            last_save = time.time()
    save_checkpoint(model, processor, args.out, "final", {"step": step, "epoch": epoch, "clips_seen": seen,
                                                          "args": {k: str(v) for k, v in vars(args).items()}})
    result = evaluate(model, heldout, loss_idx, decode_idx, hf_tok)
    result.update(step=step, minutes=(time.time() - start) / 60, train_loss=ema, clips_seen=seen, final=True)
    print("EVAL " + json.dumps(result), flush=True)
    with open(metrics_path, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    print("done", flush=True)


if __name__ == "__main__":
    main()
