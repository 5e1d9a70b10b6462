"""Exploration: does a log-count bias rescue cross-attention eviction on Whisper?

Each kept frame is made to stand for the evicted frames nearest to it (attention logit + log(count), as if the
evicted neighbours were copies of it). The bias is applied by a dense reference attention over the kept frames, not
by the ragged cache's kernels: this measures the idea, it is not a shipped method.

  python scripts/whisper/merge_probe.py whisper-base profiles/whisper-base.safetensors .build/whisper-dev 12 1   # bias on
  python scripts/whisper/merge_probe.py whisper-base profiles/whisper-base.safetensors .build/whisper-dev 12 0   # off
"""
import json, sys
import torch
import audiokv_cli.compression.cache as cache_mod
import audiokv_cli.evaluation.cell_batch as cb
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.io.audio import load_audio
from audiokv_cli.compression.methods import MethodOptions, resolve_method
from audiokv_cli.evaluation.metrics import corpus_wer, is_degenerate
from safetensors.torch import load_file
torch.set_num_threads(1)
MERGE = sys.argv[5] == "1"
stash = {}
orig_compress = cache_mod.RaggedLayer.compress
def compress(self, keep):
    K, V = self.keys, self.values
    L = keep.shape[-1]
    pos = torch.arange(L, dtype=torch.float32)
    # nearest kept position for every position, per (row, head)
    counts = torch.zeros(keep.shape)
    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            kp = torch.nonzero(keep[b, h]).flatten()
            if kp.numel() == 0: continue
            nearest = kp[torch.argmin((pos[:, None] - kp[None, :].float()).abs(), dim=1)]
            counts[b, h].index_add_(0, nearest, torch.ones(L))
    stash[id(self)] = (K, V, keep.clone(), torch.log(counts.clamp(min=1)))
    return orig_compress(self, keep)
cache_mod.RaggedLayer.compress = compress
orig_attn = cb.ragged_decode_attention
def attn(layer, query, scaling, *a, **k):
    if not MERGE: return orig_attn(layer, query, scaling, *a, **k)
    K, V, keep, bias = stash[id(layer)]
    logits = (query.float() @ K.float().transpose(-1, -2)) * scaling + bias[:, :, None, :]
    logits = logits.masked_fill(~keep[:, :, None, :], float("-inf"))
    return (torch.softmax(logits, -1) @ V.float()).transpose(1, 2).to(query.dtype)
cb.ragged_decode_attention = attn
model, prof, data, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ad = load_adapter(model, device="cpu", dtype="float32")
hs = load_file(prof)["score"]
# Coverage over all frames / over the clip's frames only, both with the paper's 50 % profile floor.
ALL = dict(coverage=1.0, smooth_over="evictable", profile_floor=0.5)
CLIP = dict(coverage=1.0, smooth_over="audio", profile_floor=0.5)
specs = [("full", 1, {}), ("stride", 0.2, {}), ("stride", 0.1, {}), ("audiokv", 0.2, ALL), ("audiokv", 0.1, ALL),
         ("audiokv", 0.2, CLIP), ("audiokv", 0.1, CLIP), ("snapkv", 0.2, {})]
cells = []
for name, r, kw in specs:
    m = resolve_method(name); cells.append((f"{name}@{r}{kw}", m.policy(r if not m.is_full else 1.0, MethodOptions(head_scores=hs, **kw))))
ex = [json.loads(l) for l in open(data + "/manifest.jsonl")][:limit]
hyps = {c: [] for c, _ in cells}; degen = {c: 0 for c, _ in cells}
for e in ex:
    p = ad.prepare(load_audio(data + "/" + e["audio"]))
    outs, _ = cb.run_cells_batched(ad, p, [c for _, c in cells], 200)
    for (c, _), o in zip(cells, outs):
        hyps[c].append(ad.decode(o.token_ids)); degen[c] += is_degenerate(o.token_ids, o.hit_token_limit, strip_ids=ad.eos_token_ids)
refs = [e["text"] for e in ex]
for c, _ in cells:
    print(f"merge={int(MERGE)} {c:50s} WER {100*corpus_wer(refs, hyps[c]):6.1f}  degenerate {degen[c]}/{len(ex)}")
