#!/bin/bash
# KeyDiff, Expected Attention and ChunkKV on the passkey grid's samples at 2k. The eval code of
# commit 938c6ec draws the passkeys of results/smollm2-grid (later commits draw one per depth cell),
# so it runs from a worktree of that commit; results go to results/smollm2-grid-new-methods.
set -e
cd "$(dirname "$0")/.."
OUT="$PWD/results/smollm2-grid-new-methods"
WT=$(mktemp -d)/kvfx-938c6ec
git worktree add -q "$WT" 938c6ec
trap 'git worktree remove --force "$WT"' EXIT
P="keydiff@0.25 expected-attention@0.25 chunkkv@0.25 keydiff@0.125 expected-attention@0.125 chunkkv@0.125"
(cd "$WT" && PYTHONPATH="$WT" python -c "import sys; from kvfx.cli import main; sys.exit(main())" \
    eval --model smollm2-135m --out "$OUT" --policy $P --task passkey --lengths 2k --depths 0.05,0.25,0.45,0.65,0.85)
