#!/usr/bin/env bash
# The byte frontier of docs/results.md section 1: WER against kept bytes (fractions of the 16-bit cache) for
# quantization alone, eviction alone, eviction x bits, merging, and --kv-budget's own choice, on the development
# sets of scripts/devset (natural TTS voices and real read speech; never used for training).
# Resumable: every (model, set, part) is one `audiokv eval --resume` run into .build/frontier/MODEL/SET/PART; a
# finished part is skipped, an interrupted one continues from its last finished clip. Rerun to continue.
#
#   scripts/frontier/sweep.sh                               # every model and set
#   MODELS=whisper-base SETS=dev-human scripts/frontier/sweep.sh
#   python scripts/frontier/table.py .build/frontier        # the table and plot
set -euo pipefail
cd "$(dirname "$0")/../.."

MODELS="${MODELS:-whisper-base whisper-tiny.en}"
SETS="${SETS:-dev-human dev-tts}"
DATA="${DATA:-.build}"
OUT="${OUT:-.build/frontier}"
LIMIT="${LIMIT:-12}"
METHODS="${METHODS:-stride,audiokv}"
MERGES="${MERGES:-none,mean}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-160}"
CROSS_STORE="${CROSS_STORE:-auto}"  # Whisper: kv keeps the per-head cache (the baseline families), auto the shipped store
PART_PREFIX="${PART_PREFIX:-bits}"  # another prefix keeps a second run of the same bits apart (e.g. values)
# Each stored precision where it can pay: PART=BITS:BUDGETS (16-bit entries are eviction or merging alone).
PARTS="${PARTS:-q:full 16:0.5,0.25,0.125 8:0.25,0.125,0.0625 4:0.125,0.0625,0.03125 2:0.0625,0.03125,0.015625 auto:0.5,0.25,0.125,0.0625,0.03125,0.015625}"

run() {  # run OUT ARGS...: one resumable eval
    local out="$1"; shift
    if [[ -f "$out/summary.json" ]]; then echo "done: $out"; return; fi
    mkdir -p "$out"
    local resume=()
    [[ -f "$out/rows.partial.jsonl" ]] && resume=(--resume)
    echo "== $out"
    audiokv eval --data "$@" --max-new-tokens "$MAX_NEW_TOKENS" --limit "$LIMIT" --device cpu --dtype float32 \
        --out "$out" "${resume[@]}"
}

for model in $MODELS; do
    for set in $SETS; do
        for part in $PARTS; do
            bits="${part%%:*}"; budgets="${part#*:}"
            if [[ "$bits" == q ]]; then  # the full cache and quantization alone (every entry kept)
                quant=full
                [[ "$model" == whisper* ]] || quant=full,hf-quanto  # transformers' QuantizedCache: decoder-only
                run "$OUT/$model/$set/quant" "$DATA/$set" --model "$model" --methods "$quant" --kv-bits auto,16,8,4,2
            else
                run "$OUT/$model/$set/$PART_PREFIX-$bits" "$DATA/$set" --model "$model" --methods "$METHODS" \
                    --retention none --kv-budget "$budgets" --budget-bits "$bits" --merge "$MERGES" \
                    --cross-store "$CROSS_STORE"
            fi
        done
    done
done
