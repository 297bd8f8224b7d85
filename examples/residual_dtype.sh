#!/bin/bash
# quant.residual_dtype (issue 22 item 2): kivi2/kivi4 on SmolLM2-135M (fp32) with the residual in the
# model's dtype and in float16, same runs: perplexity at 4k (full: 22.83 in results/smollm2-grid, an older commit) and passkey at 2k/4k,
# 5 depths. Then `kvfx report results/residual-dtype`; bytes per tensor: examples/residual_bytes.py.
cd "$(dirname "$0")/.."
R=results/residual-dtype
# The eager quantized read (KVFX_CPU_COMPILE=0), as the committed records ran (chosen to avoid the
# compiled path's compile time; under the machine's load both took ~8-10 min per 4k perplexity sample).
# Run so far: the kivi2 pair of the perplexity step (results/residual-dtype/README.md).
export KVFX_CPU_COMPILE=0
ev() { python -m kvfx.cli eval --model smollm2-135m --out $R "$@"; }
ev --policy kivi2 $R/kivi2-fp16res.yaml kivi4 $R/kivi4-fp16res.yaml --task perplexity --lengths 4k --chunk 16
ev --policy kivi2 $R/kivi2-fp16res.yaml kivi4 $R/kivi4-fp16res.yaml --task passkey --lengths 2k,4k \
   --depths 0.05,0.25,0.45,0.65,0.85
