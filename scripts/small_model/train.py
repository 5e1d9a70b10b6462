"""Train the bundled ``small`` model: Whisper base's encoder + SmolLM2-135M-Instruct joined as a Qwen2-Audio.

Frozen: the first ``--tune-from`` tower layers (their outputs are cached by prepare_data.py) and the LLM's weights.
Trained: the tower's top layers and final norm, the projector (512 -> 576), LoRA adapters on the LLM's attention
projections, and the embeddings of ``<|audio_bos|>`` / ``<|audio_eos|>``.

Three losses. The transcript's next-token loss through the LLM (the task); a CTC loss on the projected audio tokens
whose classes are the LLM's own token embeddings (cosine similarity), which pulls each stretch of audio towards the
embedding of the token spoken there and is cheap enough to run alone first (``--ctc-only-frac``); and guided
attention (``--guide-weight``): a few of the LLM's heads are pulled towards the audio where the token they predict is
spoken (guessed from its place in the transcript, speech running at an even rate). Without it the frozen LLM,
whose prior already writes fluent text, keeps ignoring the audio; the guide decays to zero at ``--guide-until-frac``.

Resumable: ``--out/last`` holds the trainable weights, optimizer, step and elapsed time; rerunning the same command
continues the same schedule (also on a fresh machine, given ``--out``). Time-bounded (``--minutes``): the learning
rate follows one warmup + cosine over that budget; a larger ``--minutes`` on resume stretches the schedule.

Usage: python scripts/small_model/train.py --data .build/small-data --out .build/small-train --minutes 120
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bundled_model"))
from audio_tower import build_tower, finish  # noqa: E402
from train import Shards, moving_average  # noqa: E402

from audiokv_cli.models.base import ASR_INSTRUCTION  # noqa: E402
from audiokv_cli.models.assets.small_model import LORA_TARGETS, build_processor, load_smollm2  # noqa: E402


CHARS = " abcdefghijklmnopqrstuvwxyz'0123456789"


def char_ids(text: str) -> list[int]:
    """Transcript as character classes for the character CTC (1-based; 0 is the blank)."""
    text = " ".join("".join(c if c in CHARS else " " for c in text.lower()).split())
    return [CHARS.index(c) + 1 for c in text]


class Trainable(torch.nn.Module):
    """Everything training changes, under the names export.py writes."""

    def __init__(self, tower, tune_from: int, text_hidden: int, lora_rank: int, llm):
        super().__init__()
        self.tune_from = tune_from
        self.top_layers = torch.nn.ModuleList(tower.layers[tune_from:])
        self.layer_norm = tower.layer_norm
        d_model = tower.config.d_model
        self.projector = torch.nn.Linear(d_model, text_hidden)
        self.reset_projector()
        mean_embedding = llm.model.embed_tokens.weight.mean(0)
        self.audio_bos = torch.nn.Parameter(mean_embedding.clone())
        self.audio_eos = torch.nn.Parameter(mean_embedding.clone())
        self.ctc_blank = torch.nn.Parameter(torch.randn(text_hidden) * 0.02)
        self.ctc_scale = torch.nn.Parameter(torch.tensor(10.0))
        # a small character CTC head on the projected audio (a training aid, not shipped): with 39 classes it leaves
        # the all-blank phase quickly and makes the projector spell out what is said
        self.char_head = torch.nn.Linear(text_hidden, len(CHARS) + 1)
        for p in self.parameters():
            p.requires_grad_(True)

    def reset_projector(self) -> None:
        d_model = self.projector.in_features
        with torch.no_grad():
            torch.nn.init.normal_(self.projector.weight, std=0.5 / math.sqrt(d_model))
            torch.nn.init.zeros_(self.projector.bias)

    def audio_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, d_model] cached hidden states (valid frames, T even) -> [B, T/2, hidden] projected audio tokens."""
        return self.projector(finish(self.top_layers, self.layer_norm, frames))


def add_lora(llm, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=list(LORA_TARGETS))
    return get_peft_model(llm, config)


class Batcher:
    """Length-bucketed batches under a token budget; short clips first during the warmup share."""

    def __init__(self, shards: Shards, budget_tokens: int, seed: int):
        self.shards, self.budget, self.rng = shards, budget_tokens, random.Random(seed)

    def next(self, short_only: bool) -> list[int]:
        metas = self.shards.metas
        pool = [i for i, m in enumerate(metas) if not short_only or m["seconds"] < 10]
        anchor = self.rng.choice(pool)
        target = metas[anchor]["n_tokens"]
        near = [i for i in pool if abs(metas[i]["n_tokens"] - target) < 0.15 * target + 40]
        self.rng.shuffle(near)
        batch, longest = [anchor], target
        for i in near:
            if i == anchor:
                continue
            longest2 = max(longest, metas[i]["n_tokens"])
            if (len(batch) + 1) * (longest2 // 2 + 40) > self.budget:
                break
            batch.append(i)
            longest = longest2
        return batch


def token_fractions(tokenizer, text: str) -> np.ndarray:
    """Where each transcript token sits in the text, as a fraction of its characters (token centre)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    centres = [(a + b) / 2 for a, b in encoded["offset_mapping"][:300]]
    return np.asarray(centres, dtype=np.float32) / max(1, len(text))


class Prompt:
    """Token ids around the audio, from the real processor's chat template (what the adapter will send)."""

    def __init__(self, processor):
        tok = processor.tokenizer
        conversation = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                                      {"type": "text", "text": ASR_INSTRUCTION}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")
        bos, eos = tok.convert_tokens_to_ids("<|audio_bos|>"), tok.convert_tokens_to_ids("<|audio_eos|>")
        k = ids.index(audio_id)
        assert ids[k - 1] == bos and ids[k + 1] == eos, text
        self.before, self.after = ids[: k - 1], ids[k + 2 :]
        self.end = tok.convert_tokens_to_ids("<|im_end|>")
        self.tok = tok

    def target(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids[:300] + [self.end]


def frames_of(shards: Shards, i: int) -> torch.Tensor:
    array = np.asarray(shards.features(i), dtype=np.float32)
    return torch.from_numpy(array[: array.shape[0] // 2 * 2])


def build_inputs(parts: Trainable, embed, prompt: Prompt, shards: Shards, batch: list[int], feat_noise: float):
    """Right-padded inputs_embeds, attention mask and labels for a batch; also the audio tokens (for CTC)."""
    frames = [frames_of(shards, i) for i in batch]
    longest = max(f.shape[0] for f in frames)
    padded = torch.stack([F.pad(f, (0, 0, 0, longest - f.shape[0])) for f in frames])
    if feat_noise:
        padded = padded + feat_noise * torch.randn_like(padded) * padded.std()
    # Top layers see each clip's valid frames only (no mask in finish()), so run per clip length group.
    audio = [parts.audio_tokens(padded[k : k + 1, : frames[k].shape[0]])[0] for k in range(len(batch))]
    before = embed(torch.tensor(prompt.before))
    after = embed(torch.tensor(prompt.after))
    rows, labels, targets = [], [], []
    guide_rows = []
    for k, i in enumerate(batch):
        target = prompt.target(shards.metas[i]["spoken"])
        targets.append(target[:-1])
        t_emb = embed(torch.tensor(target))
        seq = torch.cat([before, parts.audio_bos[None], audio[k], parts.audio_eos[None], after, t_emb])
        n_prompt = seq.shape[0] - len(target)
        rows.append(seq)
        labels.append([-100] * n_prompt + target)
        # position n_prompt - 1 + j predicts target token j (the end token is not guided)
        n_audio = audio[k].shape[0]
        centres = token_fractions(prompt.tok, shards.metas[i]["spoken"])[: len(target) - 1] * n_audio
        guide_rows.append((k, np.arange(len(centres)) + n_prompt - 1, centres, len(prompt.before) + 1, n_audio))
    width = max(r.shape[0] for r in rows)
    inputs = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
    mask = torch.tensor([[1] * r.shape[0] + [0] * (width - r.shape[0]) for r in rows])
    label_tensor = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return inputs, mask, label_tensor, audio, targets, guide_rows


def guided_attention_loss(attentions, heads, rows) -> torch.Tensor:
    """-log of the attention mass the guided heads put near where the token they predict is spoken (a Gaussian of
    4 % of the clip + 4 audio tokens around the even-rate guess)."""
    losses = []
    for b, positions, centres, audio_start, n_audio in rows:
        if len(positions) == 0:
            continue
        sigma = 0.04 * n_audio + 4.0
        frames = torch.arange(n_audio, dtype=torch.float32)
        window = torch.exp(-((frames[None, :] - torch.from_numpy(centres)[:, None]) ** 2) / (2 * sigma**2))
        pos = torch.from_numpy(positions)
        for layer, head in heads:
            attn = attentions[layer][b, head, pos, audio_start : audio_start + n_audio].float()
            losses.append(-torch.log((attn * window).sum(-1) + 1e-4))
    return torch.cat(losses).mean() if losses else torch.zeros(())


def ctc_loss(parts: Trainable, table: torch.Tensor, class_of: dict, audio, targets) -> torch.Tensor:
    """CTC over (blank + the tokens the corpus uses), logits = scale * cosine(audio token, token embedding)."""
    classes = torch.cat([parts.ctc_blank[None], table])
    classes = F.normalize(classes, dim=-1)
    losses = []
    for a, t in zip(audio, targets):
        logits = parts.ctc_scale * F.normalize(a, dim=-1) @ classes.T
        ids = torch.tensor([class_of[x] for x in t if x in class_of])
        if len(ids) == 0 or len(ids) * 2 > a.shape[0]:
            continue
        lp = logits.float().log_softmax(-1)[:, None]
        losses.append(F.ctc_loss(lp, ids[None], torch.tensor([a.shape[0]]), torch.tensor([len(ids)]),
                                 reduction="sum", zero_infinity=True) / len(ids))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def char_ctc_loss(parts: Trainable, audio, texts: list[str]) -> torch.Tensor:
    losses = []
    for a, text in zip(audio, texts):
        ids = char_ids(text)
        if not ids or len(ids) > a.shape[0]:
            continue
        lp = parts.char_head(a).float().log_softmax(-1)[:, None]
        losses.append(F.ctc_loss(lp, torch.tensor(ids)[None], torch.tensor([a.shape[0]]), torch.tensor([len(ids)]),
                                 reduction="sum", zero_infinity=True) / len(ids))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def norm_penalty(audio, target_norm: float) -> torch.Tensor:
    """Keep projected audio tokens at the LLM's embedding scale (its layers were trained on that scale)."""
    norms = torch.cat([a.norm(dim=-1) for a in audio])
    return ((norms / target_norm - 1) ** 2).mean()


@torch.no_grad()
def evaluate(parts, llm, prompt, shards: Shards, n_decode: int) -> dict:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    parts.eval(), llm.eval()
    embed = llm.get_input_embeddings()
    order = sorted(range(len(shards.metas)), key=lambda i: shards.metas[i]["seconds"])
    short = [i for i in order if shards.metas[i]["seconds"] < 10][:n_decode]
    long = [i for i in order if shards.metas[i]["seconds"] >= 20][: max(2, n_decode // 4)]
    result = {}
    losses = []
    for group, ids in (("short", short), ("long", long)):
        refs, hyps = [], []
        for i in ids:
            inputs, mask, labels, audio, _, _ = build_inputs(parts, embed, prompt, shards, [i], 0.0)
            losses.append(float(llm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss))
            n_prompt = int((labels[0] == -100).sum())
            out = llm.generate(inputs_embeds=inputs[:, :n_prompt], attention_mask=mask[:, :n_prompt],
                               max_new_tokens=int(shards.metas[i]["seconds"] * 5) + 10, do_sample=False, eos_token_id=prompt.end,
                               pad_token_id=prompt.end, repetition_penalty=1.0)
            hyp = prompt.tok.decode(out[0], skip_special_tokens=True)
            refs.append(normalize(shards.metas[i]["spoken"]))
            hyps.append(normalize(hyp) or "-")
        if refs:
            result[f"wer_{group}"] = jiwer.wer(refs, hyps)
            result[f"sample_{group}"] = [refs[0], hyps[0]]
    result["heldout_loss"] = sum(losses) / max(1, len(losses))
    parts.train(), llm.train()
    return result


def trainable_state(parts: Trainable, llm) -> dict[str, torch.Tensor]:
    state = {f"parts.{k}": v.detach().clone() for k, v in parts.state_dict().items()}
    for name, p in llm.named_parameters():
        if p.requires_grad:
            state[f"lora.{name}"] = p.detach().clone()
    return state


def save(out: Path, name: str, parts, llm, optimizer, info: dict) -> None:
    from safetensors.torch import save_file

    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable_state(parts, llm).items()}, tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(info, indent=1))
    final = out / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_trainable(path: Path, parts: Trainable, llm) -> None:
    from safetensors.torch import load_file

    state = load_file(path / "trainable.safetensors")
    missing, _ = parts.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("parts.")}, strict=False)
    if any(not name.startswith("char_head.") for name in missing):
        raise SystemExit(f"checkpoint {path} lacks {missing}")
    params = dict(llm.named_parameters())
    for k, v in state.items():
        if k.startswith("lora."):
            params[k[5:]].data.copy_(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(".build/small-data"))
    parser.add_argument("--out", type=Path, default=Path(".build/small-train"))
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget, the schedule's length (default 120; given on resume, it extends the run)")
    parser.add_argument("--tune-from", type=int, default=4, help="first tower layer trained (cached before it)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tower-lr", type=float, default=2e-4, help="learning rate of the pretrained top layers")
    parser.add_argument("--lora-lr", type=float, default=4e-4)
    parser.add_argument("--warmup-steps", type=int, default=30)
    # CTC is off by default: against the ~10.6 k tokens the transcripts use it stayed in the all-blank phase and pulled
    # every projected frame towards the blank (docs/bundled-model.md).
    parser.add_argument("--ctc-only-frac", type=float, default=0.0, help="budget share trained on CTC alone")
    parser.add_argument("--ctc-weight", type=float, default=0.0, help="CTC weight once the LLM loss is on")
    parser.add_argument("--short-first-frac", type=float, default=0.25, help="budget share on clips under 10 s")
    parser.add_argument("--char-ctc-weight", type=float, default=0.5, help="character CTC weight (0 = off)")
    parser.add_argument("--guide-weight", type=float, default=1.0, help="guided-attention loss weight (0 = off)")
    parser.add_argument("--guide-until-frac", type=float, default=0.95,
                        help="budget share at which the guided-attention weight has decayed to zero")
    parser.add_argument("--guide-heads", default="8:0,8:4,12:1,12:7,16:2,16:5",
                        help="layer:head pairs of the LLM that are guided")
    parser.add_argument("--reinit-projector", action="store_true",
                        help="on resume: start the projector afresh (after a CTC phase collapsed it onto the blank)")
    parser.add_argument("--batch-tokens", type=int, default=900, help="audio + text tokens per batch")
    parser.add_argument("--feat-noise", type=float, default=0.05)
    parser.add_argument("--eval-every-min", type=float, default=12.0)
    parser.add_argument("--eval-decode", type=int, default=16)
    parser.add_argument("--save-every-min", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke tests)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "log.jsonl", "a")

    llm, tokenizer = load_smollm2()
    processor = build_processor(tokenizer)
    processor.save_pretrained(args.out / "processor")
    tower = build_tower("base")
    parts = Trainable(tower, args.tune_from, llm.config.hidden_size, args.lora_rank, llm)
    for p in llm.parameters():
        p.requires_grad_(False)
    target_norm = float(llm.model.embed_tokens.weight.norm(dim=-1).mean())
    llm = add_lora(llm, args.lora_rank)
    guide_heads = [tuple(int(x) for x in pair.split(":")) for pair in args.guide_heads.split(",")]
    if args.guide_weight > 0:
        llm.base_model.model.set_attn_implementation("eager")  # attention weights are needed for the guide
    embed = llm.get_input_embeddings()
    prompt = Prompt(processor)

    train, heldout = Shards(args.data, "train"), Shards(args.data, "heldout")
    vocab = sorted({t for m in train.metas + heldout.metas for t in prompt.target(m["spoken"])[:-1]})
    table = embed.weight[torch.tensor(vocab)].detach()
    class_of = {t: k + 1 for k, t in enumerate(vocab)}

    lora_params = [p for p in llm.parameters() if p.requires_grad]
    pretrained = list(parts.top_layers.parameters()) + list(parts.layer_norm.parameters())
    new = [p for p in parts.parameters() if all(p is not q for q in pretrained)]
    base_lrs = [args.lr, args.tower_lr, args.lora_lr]
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": lr} for params, lr in zip((new, pretrained, lora_params), base_lrs)],
        weight_decay=0.01, betas=(0.9, 0.98),
    )
    state = {"step": 0, "elapsed": 0.0, "budget": (args.minutes or 120.0) * 60, "last_eval": 0.0, "last_save": 0.0}
    if (args.out / "last" / "state.json").exists():
        load_trainable(args.out / "last", parts, llm)
        try:
            optimizer.load_state_dict(torch.load(args.out / "last" / "optimizer.pt", weights_only=True))
        except ValueError:  # a checkpoint from before the character head: its parameter groups differ
            print("optimizer state does not fit (new parameters): fresh optimizer moments", flush=True)
        state = json.loads((args.out / "last" / "state.json").read_text())
        if args.minutes:
            state["budget"] = args.minutes * 60
        if args.reinit_projector:
            parts.reset_projector()
            for p in parts.projector.parameters():
                optimizer.state.pop(p, None)
            print("projector re-initialized", flush=True)
        print(f"resumed at step {state['step']}, {state['elapsed'] / 60:.1f} of {state['budget'] / 60:.0f} min",
              flush=True)
    batcher = Batcher(train, args.batch_tokens, args.seed + state["step"])
    budget = state["budget"]
    session_start, start_elapsed = time.time(), state["elapsed"]
    avg = {}
    parts.train(), llm.train()
    while True:
        elapsed = start_elapsed + time.time() - session_start
        frac = elapsed / budget
        if frac >= 1 or (args.max_steps and state["step"] >= args.max_steps):
            break
        if state["step"] % 50 == 0:
            train.refresh()
        step = state["step"]
        warm = min(1.0, (step + 1) / args.warmup_steps)
        scale = warm * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * max(scale, 0.02)
        ctc_only = frac < args.ctc_only_frac
        batch = batcher.next(short_only=frac < args.short_first_frac)
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inputs, mask, labels, audio, targets, guide_rows = build_inputs(
                parts, embed, prompt, train, batch, args.feat_noise
            )
            use_ctc = ctc_only or args.ctc_weight > 0
            ctc = ctc_loss(parts, table, class_of, audio, targets) if use_ctc else torch.zeros(())
            loss = ctc + 0.1 * norm_penalty(audio, target_norm)
            chars = char_ctc_loss(parts, audio, [train.metas[i]["spoken"] for i in batch])
            lm = guide = None
            if not ctc_only:
                guide_weight = args.guide_weight * max(0.0, 1.0 - frac / args.guide_until_frac)
                out = llm(inputs_embeds=inputs, attention_mask=mask, labels=labels, output_attentions=guide_weight > 0)
                lm = out.loss
                loss = lm + args.ctc_weight * loss + args.char_ctc_weight * chars
                if guide_weight > 0:
                    guide = guided_attention_loss(out.attentions, guide_heads, guide_rows)
                    loss = loss + guide_weight * guide
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(parts.parameters()) + lora_params, 1.0)
        optimizer.step()
        state["step"] += 1
        avg["ctc"] = moving_average(avg.get("ctc"), float(ctc.detach()))
        avg["lm"] = moving_average(avg.get("lm"), None if lm is None else float(lm.detach()))
        avg["guide"] = moving_average(avg.get("guide"), None if guide is None else float(guide.detach()))
        avg["chars"] = moving_average(avg.get("chars"), float(chars.detach()))
        if state["step"] % 10 == 0:
            row = {"step": state["step"], "minutes": round(elapsed / 60, 2), "ctc": avg["ctc"], "lm": avg["lm"], "guide": avg["guide"], "chars": avg["chars"],
                   "clips": len(batch), "seconds_per_step": round(time.time() - t0, 2),
                   "lr": optimizer.param_groups[0]["lr"], "train_clips": len(train.metas)}
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
        elapsed = start_elapsed + time.time() - session_start
        state["elapsed"] = elapsed
        if not ctc_only and elapsed - state["last_eval"] > args.eval_every_min * 60:
            state["last_eval"] = elapsed
            result = evaluate(parts, llm, prompt, heldout, args.eval_decode)
            row = {"step": state["step"], "minutes": round(elapsed / 60, 2), "eval": result}
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
            session_start, start_elapsed = time.time(), state["elapsed"]  # evaluation time is not training time
        if elapsed - state["last_save"] > args.save_every_min * 60:
            state["last_save"] = elapsed
            save(args.out, "last", parts, llm, optimizer, state)
    state["elapsed"] = start_elapsed + time.time() - session_start
    save(args.out, "last", parts, llm, optimizer, state)
    result = evaluate(parts, llm, prompt, heldout, args.eval_decode)
    row = {"step": state["step"], "minutes": round(state["elapsed"] / 60, 2), "eval": result, "final": True}
    print(json.dumps(row), flush=True)
    log.write(json.dumps(row) + "\n")
    save(args.out, "final", parts, llm, optimizer, state)


if __name__ == "__main__":
    main()
