"""Tokens kept per KV head and layer by AdaKV (``adakv-snapkv@KEEP``) on one passkey prompt of
SmolLM2-135M, read from the ragged stores after prefill; also how many of the needle's tokens
each head kept, the bytes held against uniform SnapKV at the same keep, and (``--time``) decode
ms/token of both on this CPU (alternating runs, one process).

    python examples/adakv_heads.py --keep 0.125 --depth 0.45 --out results/adakv [--time]

Writes OUT/heads_kept.json and OUT/heads_kept.png (the README's heatmap).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import kvfx
from kvfx.eval.passkey import make_passkey_sample
from kvfx.models import load_model
from kvfx.runtime.state import sequences_of_cache


def _layer(path: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", path).group(1))


def prefill(model, ids, policy):
    torch._dynamo.reset()
    kvfx.reset()
    model.compile(backend="kvfx", options={"policy": policy})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, past_key_values=cache)
    return out, cache


def decode_ms(model, ids, policy, steps):
    out, cache = prefill(model, ids, policy)
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=tok, use_cache=True, past_key_values=cache)
            tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) * 1000 / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.125)
    ap.add_argument("--depth", type=float, default=0.45)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--out", default="results/adakv")
    ap.add_argument("--time", action="store_true", help="also decode ms/token, adakv vs snapkv")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m", progress=False)
    sample = make_passkey_sample(tok, args.length, args.depth, seed=0)
    ids = sample.input_ids
    policy = f"adakv-snapkv@{args.keep:g}"
    _, cache = prefill(model, ids, policy)
    (seq,) = sequences_of_cache(cache)
    rows, needle = [], []
    for path in sorted(seq.stores, key=_layer):
        st = seq.stores[path]
        rows.append(st.count[0].tolist())
        pos = st.positions()[0]
        needle.append(((pos >= sample.needle_start) & (pos < sample.needle_end)).sum(-1).tolist())
    ada = kvfx.memory(cache)
    _, ucache = prefill(model, ids, f"snapkv@{args.keep:g}")
    uni = kvfx.memory(ucache)
    (useq,) = sequences_of_cache(ucache)
    budget = int(next(iter(useq.stores.values())).count[0, 0])
    rec = {"policy": policy, "n_tokens": sample.n_tokens, "depth": args.depth, "uniform_budget": budget,
           "needle_tokens": sample.needle_end - sample.needle_start,
           "kept_per_layer_head": rows, "needle_kept_per_layer_head": needle,
           "store_bytes": ada["store_bytes"], "uniform_store_bytes": uni["store_bytes"]}
    if args.time:
        steps = 32
        runs = {policy: [], f"snapkv@{args.keep:g}": []}
        for _ in range(2):
            for p in runs:
                runs[p].append(decode_ms(model, ids, p, steps))
        rec["decode_ms_per_token"] = {p: min(v) for p, v in runs.items()}
        rec["decode_ratio"] = rec["decode_ms_per_token"][policy] / rec["decode_ms_per_token"][f"snapkv@{args.keep:g}"]
    (out_dir / "heads_kept.json").write_text(json.dumps(rec, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = torch.tensor(rows, dtype=torch.float32)   # (layers, kv heads)
    hit = torch.tensor(needle, dtype=torch.float32)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 8.5), sharey=True)
    im = axes[0].imshow(kept / budget, aspect="auto", cmap="viridis")
    axes[0].set_title(f"tokens kept / uniform budget ({budget})")
    fig.colorbar(im, ax=axes[0], fraction=0.08)
    im2 = axes[1].imshow(hit, aspect="auto", cmap="magma", vmin=0, vmax=rec["needle_tokens"])
    axes[1].set_title(f"needle tokens kept (of {rec['needle_tokens']})")
    fig.colorbar(im2, ax=axes[1], fraction=0.08)
    for ax in axes:
        ax.set_xlabel("KV head")
        ax.set_xticks(range(kept.shape[1]))
    axes[0].set_ylabel("layer")
    for i in range(kept.shape[0]):
        for j in range(kept.shape[1]):
            axes[0].text(j, i, str(int(kept[i, j])), ha="center", va="center", fontsize=6, color="w")
    fig.suptitle(f"{policy}, SmolLM2-135M, passkey {sample.n_tokens} tokens, depth {args.depth}")
    fig.tight_layout()
    fig.savefig(out_dir / "heads_kept.png", dpi=110)
    print(json.dumps({k: v for k, v in rec.items() if not k.endswith("layer_head")}))


if __name__ == "__main__":
    main()
