#!/usr/bin/env bash
# Make the results of docs/results/ for the bundled model: a seeded synthetic evaluation set, then the full sweep
# of eviction methods x retentions x scopes. Same installed files and seed give the same numbers (timings aside).
#
#   scripts/results.sh              # defaults below
#   LIMIT=60 scripts/results.sh     # all 60 clips of the set (docs/results.md used the first 30)
#   RETENTIONS=0.8,0.6,0.4,0.2 SCOPES=all,audio scripts/results.sh   # the wider sweep
#
# `audiokv eval` prefills each clip once and reuses it for every cell; each worker process uses one
# torch thread for small models (faster than several on a shared machine, see docs/evaluation.md).
set -euo pipefail
cd "$(dirname "$0")/.."

SEED="${SEED:-0}"
EVAL_DIR="${EVAL_DIR:-.build/eval-set}"
EVAL_CLIPS="${EVAL_CLIPS:-60}"
OUT="${OUT:-docs/results}"
LIMIT="${LIMIT:-30}"
RETENTIONS="${RETENTIONS:-0.6,0.4,0.2}"
SCOPES="${SCOPES:-all}"
# The transcripts of 20-30 s clips are up to ~300 tokens of the bundled model's vocabulary; the cap must not cut
# a correct transcript short (that would count as degeneration).
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-384}"
METHODS="full,streamingllm,h2o,snapkv,pyramidkv,adakv,snapkv+sss,audiokv-nosss,audiokv,stride"
# audiokv and audiokv-nosss need a head profile of the bundled model: found in profiles/ when empty.
PROFILE="${PROFILE:-}"

# (a) The evaluation set: held-out sentences and voices, written as a manifest.jsonl directory.
MAKE_EVAL_SET="scripts/bundled_model/make_eval_set.py"
if [[ ! -f "$EVAL_DIR/manifest.jsonl" ]]; then
    if [[ ! -f "$MAKE_EVAL_SET" ]]; then
        echo "error: $MAKE_EVAL_SET is missing; build the evaluation set into $EVAL_DIR first" >&2
        exit 1
    fi
    python "$MAKE_EVAL_SET" --out "$EVAL_DIR" --num "$EVAL_CLIPS" --min-seconds 20 --max-seconds 30 --seed "$SEED"
fi

# (b) The sweep: every method at every retention, evicting from the whole prompt and from audio tokens only.
profile_args=()
if [[ -n "$PROFILE" ]]; then
    profile_args=(--profile "$PROFILE")
fi
audiokv eval --model tiny --data "$EVAL_DIR" --limit "$LIMIT" --workers "${WORKERS:-2}" \
    --methods "$METHODS" \
    --retention "$RETENTIONS" \
    --scope "$SCOPES" \
    --max-new-tokens "$MAX_NEW_TOKENS" \
    --device cpu --dtype float32 \
    --out "$OUT" "${profile_args[@]}"
