#!/bin/bash
# SmolLM2 grid (resumable: kvfx eval skips samples already in results.jsonl).
# The README's SmolLM2 results: examples/smollm2_grid.sh, then `kvfx report results/smollm2-grid --pivot`.
cd "$(dirname "$0")/.."
P="full streaming streaming@0.5 streaming@0.25 streaming@0.125 streaming@0.0625 streaming-calidrop streaming-calidrop@0.5 streaming-calidrop@0.25 streaming-calidrop@0.125 streaming-calidrop@0.0625 knorm@0.5 knorm@0.25 knorm@0.125 snapkv@0.5 snapkv@0.25 snapkv@0.125 snapkv@0.0625 snapkv-calidrop@0.5 snapkv-calidrop@0.25 snapkv-calidrop@0.125 snapkv-calidrop@0.0625 pyramidkv@0.5 pyramidkv@0.25 pyramidkv@0.125 h2o@0.5 h2o@0.25 h2o@0.125 tova@0.5 tova@0.25 tova@0.125 lagkv@0.5 lagkv@0.25 lagkv@0.125 snapkv-ott2@0.5 snapkv-ott2@0.25 snapkv-ott2@0.125 snapkv-calidrop-ott2@0.5 snapkv-calidrop-ott2@0.25 snapkv-calidrop-ott2@0.125 kivi4 kivi2 ott4 ott2"
ev() { kvfx eval --model smollm2-135m --out results/smollm2-grid "$@"; }
# 1. passkey: every other of the 10 depths first (a subset of the 10-depth grid), then the rest
for p in $P; do ev --policy $p --task passkey --lengths 2k,4k --depths 0.05,0.25,0.45,0.65,0.85; done
# 2. needle at 2k; at 4k first for the CaliDrop comparison (issue 5); 3. perplexity at 4k
for p in $P; do ev --policy $p --task needle --lengths 2k --depths 5; done
for p in full snapkv@0.25 snapkv@0.125 snapkv@0.0625 snapkv-calidrop@0.25 snapkv-calidrop@0.125 snapkv-calidrop@0.0625 streaming@0.25 streaming@0.125 streaming@0.0625 streaming-calidrop@0.25 streaming-calidrop@0.125 streaming-calidrop@0.0625; do ev --policy $p --task needle --lengths 4k --depths 5; done
for p in $P; do ev --policy $p --task perplexity --lengths 4k --chunk 16; done
# 4. the other five passkey depths, 5. needle at 4k
for p in $P; do ev --policy $p --task passkey --lengths 2k,4k --depths 10; done
for p in $P; do ev --policy $p --task needle --lengths 4k --depths 5; done
echo GRID DONE
