#!/usr/bin/env bash
# GPU figures for docs/performance.md, in one call on a CUDA machine (not yet run: no GPU was lent when it was written):
# decode attention alone (bench --kernel) and whole-model rows (bench) for real-size random-weight Qwen2-Audio-7B
# and Qwen2.5-Omni-7B decoders in bfloat16 at 8k and 32k prompt tokens, plus the two commands the issue names.
# Writes JSON lines under OUT (default gpu-bench/DATE).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-bench/$(date -u +%Y-%m-%d)}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
python -c "import torch; print(torch.__version__, torch.version.cuda)" > "$OUT/torch.txt"

# The decode kernels on this GPU against the naive reference first: figures from a wrong kernel are worthless.
python -m pytest -q tests/test_decode_kernels.py -k cuda | tail -n 3 | tee "$OUT/kernel-tests.txt"

for geometry in qwen2-audio-7b qwen2.5-omni-7b qwen3-omni-30b; do
  for tokens in 8192 32768; do
    for retention in 0.4 0.2; do
      audiokv bench --kernel --geometry "$geometry" --prompt-tokens "$tokens" --retention "$retention" \
        --methods full,snapkv,adakv,audiokv --batch-sizes 1,8 --device cuda --dtype bfloat16 --json \
        >> "$OUT/kernel-cli.jsonl"
    done
  done
done

python scripts/gpu_bench.py --out "$OUT" --prompt-tokens 8192,32768 --retention 0.4,0.2 --batch-sizes 4,8 \
  --new-tokens 32 --repeats 3 --device cuda --dtype bfloat16
audiokv bench --model tiny --methods full,snapkv,audiokv --retention 0.4 --seconds 30 --device cuda \
  --batch-sizes 1,4,8 --memory-gb 1 --json > "$OUT/tiny.jsonl"
echo "wrote $OUT"
