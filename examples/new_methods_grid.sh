#!/bin/bash
# KeyDiff, Expected Attention and ChunkKV (over SnapKV and over KNorm) on the README grid's samples:
# passkey 2k/4k (5 depths), needle 2k (5 depths; 4k with NEEDLE4K=1), perplexity 4k, keep 0.5 / 0.25 / 0.125.
# `--passkeys per-seed` draws the passkeys results/smollm2-grid was evaluated on, so the rows compare
# with that grid's SnapKV/KNorm rows. Resumable (kvfx eval skips samples already in results.jsonl).
# Usage: examples/new_methods_grid.sh [POLICY ...]   (default: all twelve)
set -e
cd "$(dirname "$0")/.."
OUT=results/smollm2-grid-new-methods
P="${*:-keydiff@0.5 keydiff@0.25 keydiff@0.125 chunkkv@0.5 chunkkv@0.25 chunkkv@0.125 chunkkv-knorm@0.5 chunkkv-knorm@0.25 chunkkv-knorm@0.125 expected-attention@0.5 expected-attention@0.25 expected-attention@0.125}"
ev() { kvfx eval --model smollm2-135m --out "$OUT" --policy $P "$@"; }
ev --task passkey --lengths 2k,4k --depths 0.05,0.25,0.45,0.65,0.85 --passkeys per-seed
ev --task needle --lengths 2k --depths 5
ev --task perplexity --lengths 4k --chunk 16
if [ -n "$NEEDLE4K" ]; then ev --task needle --lengths 4k --depths 5; fi
kvfx report "$OUT" --pivot
