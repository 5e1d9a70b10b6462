"""Development-set comparison of eviction settings on a Whisper model (how AudioKV's Whisper defaults were chosen).

Each clip is decoded once per cell, all cells of a clip as one batch (evaluation/cell_batch.py); prints corpus WER
and the number of degenerate outputs per cell. A cell is METHOD@RETENTION[:OPTION=VALUE...] with MethodOptions
fields (coverage, smooth_over, profile_floor).

  python scripts/whisper/dev_ablation.py whisper-base profiles/whisper-base.safetensors .build/whisper-dev 12 \
      "full@1;stride@0.2;audiokv@0.2:coverage=1:smooth_over=audio"

The development set is built from the training side of the corpus split (texts and voices disjoint from every
held-out clip): python scripts/bundled_model/make_eval_set.py --out .build/whisper-dev --split train --num 12 --seed 11
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file

from audiokv_cli.io.audio import load_audio
from audiokv_cli.compression.methods import MethodOptions, resolve_method
from audiokv_cli.evaluation.cell_batch import run_cells_batched
from audiokv_cli.evaluation.metrics import corpus_wer, is_degenerate
from audiokv_cli.models.registry import load_adapter


def parse_cell(spec: str, head_scores: torch.Tensor):
    name, rest = spec.split("@")
    retention, *settings = rest.split(":")
    options = MethodOptions(head_scores=head_scores)
    for setting in settings:
        key, value = setting.split("=")
        setattr(options, key, value if key == "smooth_over" else float(value))
    method = resolve_method(name)
    return spec, method.policy(1.0 if method.is_full else float(retention), options)


def main() -> None:
    model, profile, data, limit, cells_spec = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    adapter = load_adapter(model, device="cpu", dtype="float32")
    head_scores = load_file(profile)["score"]
    cells = [parse_cell(spec, head_scores) for spec in cells_spec.split(";")]
    examples = [json.loads(line) for line in open(f"{data}/manifest.jsonl")][:limit]
    hypotheses = {name: [] for name, _ in cells}
    degenerate = {name: 0 for name, _ in cells}
    for example in examples:
        prepared = adapter.prepare(load_audio(f"{data}/{example['audio']}"))
        outcomes, _ = run_cells_batched(adapter, prepared, [policy for _, policy in cells], 200)
        for (name, _), outcome in zip(cells, outcomes):
            hypotheses[name].append(adapter.decode(outcome.token_ids))
            degenerate[name] += is_degenerate(outcome.token_ids, outcome.hit_token_limit, strip_ids=adapter.eos_token_ids)
    references = [example["text"] for example in examples]
    for name, _ in cells:
        wer = 100 * corpus_wer(references, hypotheses[name])
        print(f"{name:50s} WER {wer:6.1f}  degenerate {degenerate[name]}/{len(examples)}")


if __name__ == "__main__":
    main()
