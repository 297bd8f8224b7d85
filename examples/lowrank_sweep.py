"""ReCalKV ablation on SmolLM2-135M: perplexity, passkey and bytes held per keep-rank, with and
without head-wise similarity reordering (HSR) and offline value calibration (OVC), and two
compositions (latents + 4-bit quant, latents + SnapKV eviction).

    python examples/lowrank_sweep.py --out results/lowrank

Artifacts: ``kvfx.calibrate.calibrate`` on the first 4096 tokens of the essays (what
``kvfx calibrate --keep-rank K [--no-hsr] [--no-ovc]`` writes), cached in OUT/artifacts.
Perplexity (held out): essays from character 300000 on, a PREFIX-token prompt compressed as a
prompt, then TOKENS teacher-forced tokens in chunks of 16 (each chunk's latents are appended and
attended as in decoding). Passkey: grass filler at 2k and 4k tokens, DEPTHS depths, seed 0.
Bytes: ``kvfx.memory(cache)`` of the perplexity run's cache, at its end. Every configuration runs in one
process against ``full``; the table goes to OUT/table.md, the records to OUT/results.jsonl and a
plot of Δ perplexity against bytes held to OUT/lowrank_ppl_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvfx
from kvfx.calibrate import calibrate, load_artifact, save_artifact
from kvfx.eval.passkey import passkey_sweep
from kvfx.eval.perplexity import long_text_ids, perplexity_under_compression
from kvfx.eval.text import filler_text
from kvfx.models import load_model

VARIANTS = (("hsr+ovc", True, True), ("hsr", True, False), ("ovc", False, True), ("plain", False, False))


def artifact(model, tok, out: Path, keep: float, hsr: bool, ovc: bool) -> Path:
    path = out / "artifacts" / f"smollm2-k{keep}-{'hsr' if hsr else 'nohsr'}-{'ovc' if ovc else 'noovc'}.safetensors"
    if not path.is_file():
        factors, prov = calibrate(model, tok, filler_text("essays"), keep, hsr=hsr, ovc=ovc,
                                  text_source="essays", model_name="smollm2-135m")
        save_artifact(path, factors, prov)
    return path


def configs(model, tok, out: Path, keeps):
    yield "full", "full", None
    for k in keeps:
        for tag, hsr, ovc in VARIANTS:
            path = artifact(model, tok, out, k, hsr, ovc)
            yield f"lowrank {k} {tag}", {"kvfx": 1, "name": f"lowrank-{k}-{tag.replace('+', '-')}",
                                         "lowrank": {"artifact": str(path)}}, path
    path = artifact(model, tok, out, 0.5, True, True)
    yield "lowrank 0.5 hsr+ovc + kivi4", {"kvfx": 1, "name": "lowrank-0.5-kivi4", "extends": "kivi4",
                                          "lowrank": {"artifact": str(path)}}, path
    yield "lowrank 0.5 hsr+ovc + snapkv@0.25", {"kvfx": 1, "name": "lowrank-0.5-snapkv", "extends": "snapkv",
                                                "budget": {"keep": 0.25}, "lowrank": {"artifact": str(path)}}, path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/lowrank")
    ap.add_argument("--keeps", default="0.75,0.5,0.25")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m", progress=False)
    ids = long_text_ids(tok, args.prefix + args.tokens, "essays", start=300000)
    depths = tuple(float(d) for d in args.depths.split(","))
    rows, t_all = [], time.perf_counter()
    for label, policy, path in configs(model, tok, out, [float(k) for k in args.keeps.split(",")]):
        t0 = time.perf_counter()
        torch._dynamo.reset()
        kvfx.reset()
        model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
        ppl = perplexity_under_compression(model, ids, prefix=args.prefix, chunk=16, keep_cache=True)
        mem = kvfx.memory(ppl.pop("cache"))  # the run's compressed state lives with its cache
        sites = kvfx.sites(model)
        pk = passkey_sweep(model, tok, lengths=(2048, 4096), depths=depths, progress=False)
        row = {"config": label, "artifact": str(path) if path else None, "ppl": ppl["ppl"],
               "held_bytes": mem["held_bytes"], "dense_bytes": mem["dense_bytes"],
               "kv_bytes": sum(s["kv_bytes"] for s in mem["sites"].values()),
               "shared_bytes": mem.get("shared_bytes", 0),
               "rewritten": sum(s.rewritten for s in sites), "sites": len(sites),
               "passkey": [(r.length, r.depth, r.correct, r.answer) for r in pk],
               "seconds": time.perf_counter() - t0}
        if path:
            prov = load_artifact(path).provenance
            row["rank_k"] = sum(sum(rec["k_ranks"]) for rec in prov["layers"]) / len(prov["layers"])
            row["rank_v"] = sum(sum(rec["v_ranks"]) for rec in prov["layers"]) / len(prov["layers"])
            row["calib_error_v"] = sum(rec["calib_error_v"] for rec in prov["layers"]) / len(prov["layers"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = rows[0]
    lines = ["| config | ranks k/v (of 192) | ppl | Δppl | passkey 2k | passkey 4k | held / dense | "
             "latent / dense K+V | sites | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = f"{r['rank_k']:.0f}/{r['rank_v']:.0f}" if "rank_k" in r else "192/192"
        pk = {n: [c for length, _, c, _ in r["passkey"] if length == n] for n in (2048, 4096)}
        lines.append(f"| {r['config']} | {ranks} | {r['ppl']:.2f} | {r['ppl'] - base['ppl']:+.2f} | "
                     f"{sum(pk[2048])}/{len(pk[2048])} | {sum(pk[4096])}/{len(pk[4096])} | "
                     f"{r['held_bytes'] / r['dense_bytes']:.3f} | {r['kv_bytes'] / r['dense_bytes']:.3f} | "
                     f"{r['rewritten']}/{r['sites']} | {r['seconds']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "lowrank_ppl_vs_bytes.png")
    print("\n".join(lines))
    print(f"{time.perf_counter() - t_all:.0f} s in all")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]["ppl"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (tag, _, _) in enumerate(VARIANTS):
        pts = sorted((r["held_bytes"] / r["dense_bytes"], r["ppl"] - base) for r in rows
                     if r["config"].endswith(" " + tag))
        if pts:
            ax.plot(*zip(*pts), marker="os^D"[i], label=f"lowrank, {tag}")
    for r in rows:
        if " + " in r["config"]:
            ax.scatter(r["held_bytes"] / r["dense_bytes"], r["ppl"] - base, marker="*", s=90, zorder=3)
            ax.annotate("lowrank 0.5 + " + r["config"].split(" + ", 1)[1], (r["held_bytes"] / r["dense_bytes"], r["ppl"] - base),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("KV bytes held / dense (model dtype)")
    ax.set_ylabel("Δ perplexity vs full (held-out essays)")
    ax.set_yscale("symlog", linthresh=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M, ReCalKV latents: keep-rank 0.75 / 0.5 / 0.25")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
