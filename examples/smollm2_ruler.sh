#!/bin/bash
# The kvpress leaderboard protocol on SmolLM2-135M: RULER at 4k, score vs compression, then the
# shared-context comparison (a context compressed once, several questions). Resumable: kvfx eval
# skips samples already in results.jsonl. Then: kvfx report results/smollm2-ruler-4k
#
# FULL=1 runs the whole leaderboard grid (every eviction preset at 25/50/75/87.5 % removed, the
# quantized presets, all 11 RULER tasks, 20 samples each: days on a CPU). ALL_TASKS=1 runs the
# subset committed in results/smollm2-ruler-4k-all: all 11 tasks, one sample each, full and five
# methods at 50 and 75 % removed (~70 min on one core). Without either, the small subset committed
# in results/smollm2-ruler-4k (the README says what each is and how long it took).
cd "$(dirname "$0")/.."
OUT=${OUT:-results/smollm2-ruler-4k}
ev() { kvfx eval --model smollm2-135m --lengths 4k --out "$OUT" "$@"; }
if [ "${ALL_TASKS:-0}" = 1 ]; then
  OUT=${OUT_ALL:-results/smollm2-ruler-4k-all}
  for p in full snapkv@0.5 snapkv@0.25 knorm@0.5 knorm@0.25 lagkv@0.5 lagkv@0.25 streaming@0.5 streaming@0.25 \
           tova@0.5 tova@0.25; do
    ev --policy $p --task ruler --seeds 1
  done
elif [ "${FULL:-0}" = 1 ]; then
  P="full"
  for m in streaming snapkv pyramidkv h2o tova knorm lagkv keydiff expected-attention chunkkv snapkv-calidrop; do
    for k in 0.75 0.5 0.25 0.125; do P="$P $m@$k"; done
  done
  P="$P kivi4 kivi2 ott4 ott2"
  for p in $P; do ev --policy $p --task ruler --seeds 20; done
  for p in full snapkv@0.5 snapkv@0.25 knorm@0.5 knorm@0.25 lagkv@0.5 lagkv@0.25 keydiff@0.5 keydiff@0.25; do
    ev --policy $p --task shared-context --seeds 10 --questions 4
  done
else
  P="full snapkv@0.5 snapkv@0.25 knorm@0.5 knorm@0.25"
  for p in $P; do ev --policy $p --task ruler --subtasks niah_single_1,niah_single_2 --seeds 1 --max-new-tokens 24; done
  for p in full snapkv@0.25 knorm@0.25; do  # at 2k: a 4k prefill took ~2 min on the shared CPU
    kvfx eval --model smollm2-135m --lengths 2k --out "$OUT" --policy $p --task shared-context --seeds 1 \
      --questions 2 --max-new-tokens 16
  done
  for p in full snapkv@0.5 chunkkv@0.5 knorm@0.5 lagkv@0.5 keydiff@0.5; do  # 50 % removed, 3 contexts: where the methods still retrieve
    kvfx eval --model smollm2-135m --lengths 2k --out "$OUT" --policy $p --task shared-context --seeds 3 \
      --questions 2 --max-new-tokens 16
  done
fi
echo RULER DONE
