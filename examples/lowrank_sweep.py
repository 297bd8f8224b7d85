"""ReCalKV low-rank KV cache on SmolLM2-135M: perplexity, passkey and bytes held per keep-rank.

Artifacts first (OMP_NUM_THREADS=1: LAPACK is slow under contention), e.g.

    OMP_NUM_THREADS=1 kvfx calibrate --keep-rank 0.5 --out runs/lowrank/smollm2-k0.5.safetensors
    OMP_NUM_THREADS=1 kvfx calibrate --keep-rank 0.5 --no-hsr --no-ovc \\
        --out runs/lowrank/smollm2-k0.5-plain.safetensors

then

    python examples/lowrank_sweep.py --artifacts runs/lowrank --out runs/lowrank/sweep

Perplexity: essays from character 300000 on (calibration used the first 4096 tokens), a
1024-token prefix then 256 teacher-forced tokens in chunks of 8. Passkey: 2048 tokens, depths
0.1 / 0.5 / 0.9, seed 0. Bytes: ``kvfx.memory()`` after the perplexity run (1280 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvfx
from kvfx.eval.passkey import passkey_sweep
from kvfx.eval.perplexity import long_text_ids, perplexity_under_compression
from kvfx.models import load_model


def configs(artifacts: Path, keeps):
    yield "full", "full", None
    for k in keeps:
        for tag, suffix in (("hsr+ovc", ""), ("plain", "-plain")):
            path = artifacts / f"smollm2-k{k}{suffix}.safetensors"
            if path.is_file():
                yield f"lowrank k={k} {tag}", {"kvfx": 1, "name": f"lowrank-{k}{suffix}",
                                               "lowrank": {"artifact": str(path)}}, path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="runs/lowrank")
    ap.add_argument("--out", default="runs/lowrank/sweep")
    ap.add_argument("--keeps", default="1.0,0.75,0.5,0.25")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m", progress=False)
    ids = long_text_ids(tok, 1280, "essays", start=300000)
    depths = tuple(float(d) for d in args.depths.split(","))
    rows = []
    for label, policy, path in configs(Path(args.artifacts), args.keeps.split(",")):
        t0 = time.perf_counter()
        torch._dynamo.reset()
        kvfx.reset()
        model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
        ppl = perplexity_under_compression(model, ids, prefix=1024, chunk=8)
        mem = kvfx.memory()
        sites = kvfx.sites()
        pk = passkey_sweep(model, tok, lengths=(2048,), depths=depths, progress=False)
        row = {"config": label, "artifact": str(path) if path else None, "ppl": ppl["ppl"],
               "nll_sum": ppl["nll_sum"], "held_bytes": mem["held_bytes"], "dense_bytes": mem["dense_bytes"],
               "kv_bytes": sum(s["kv_bytes"] for s in mem["sites"].values()),
               "shared_bytes": mem.get("shared_bytes", 0),
               "rewritten": sum(s.rewritten for s in sites), "sites": len(sites),
               "passkey": [(r.depth, r.correct, r.answer) for r in pk],
               "passkey_acc": sum(r.correct for r in pk) / len(pk), "seconds": time.perf_counter() - t0}
        if path:
            from kvfx.calibrate import load_artifact

            prov = load_artifact(path).provenance
            row["rank_k"] = sum(sum(rec["k_ranks"]) for rec in prov["layers"]) / len(prov["layers"])
            row["rank_v"] = sum(sum(rec["v_ranks"]) for rec in prov["layers"]) / len(prov["layers"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = rows[0]
    lines = ["| config | ranks k/v (of 192) | ppl | Δppl | passkey 2k | held / dense | latent / dense K+V | sites |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = f"{r['rank_k']:.0f}/{r['rank_v']:.0f}" if "rank_k" in r else "192/192"
        lines.append(f"| {r['config']} | {ranks} | {r['ppl']:.3f} | {r['ppl'] - base['ppl']:+.3f} | "
                     f"{sum(c for _, c, _ in r['passkey'])}/{len(r['passkey'])} | "
                     f"{r['held_bytes'] / r['dense_bytes']:.3f} | {r['kv_bytes'] / r['dense_bytes']:.3f} | "
                     f"{r['rewritten']}/{r['sites']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
