"""ReCalKV: relative reconstruction error of k_proj / v_proj outputs on held-out text.

Calibrates on the first ``--tokens`` tokens of a text and measures on the next ``--heldout``
tokens, for every keep-rank with and without HSR and OVC (the Grams XᵀX of the inputs are
collected once; each variant only refactorizes). Error per layer:
‖X Wᵀ - X Rᵀ Lᵀ‖_F / ‖X Wᵀ‖_F; the table gives its mean (and max) over layers.

    python examples/recalkv_errors.py --model smollm2-135m --text essays --tokens 4096 --heldout 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvfx.calibrate import collect_grams, kv_projections, text_ids
from kvfx.eval.text import filler_text
from kvfx.methods.recalkv import ReCalKV, relative_error
from kvfx.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="essays", help="essays, pydoc, grass or auto")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--heldout", type=int, default=2048, help="held-out tokens (right after them)")
    ap.add_argument("--keep", default="0.75,0.5,0.25", help="keep-rank fractions")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, progress=False)
    ids = text_ids(tok, filler_text(args.text), args.tokens + args.heldout)
    calib = collect_grams(model, ids[: args.tokens], chunk=args.chunk, desc="calibration")
    held = collect_grams(model, ids[args.tokens:], chunk=args.chunk, desc="held-out")
    projs = kv_projections(model)
    cfg = model.config
    n_kv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    print(f"{args.model}, {args.text}: calibration {args.tokens} tokens, held-out the next {args.heldout}; "
          f"relative error of the projection outputs, mean (max) over {len(projs)} layers\n")
    print("| keep-rank | HSR | OVC | key groups (layer 0) | k ranks | v rank | held-out k | held-out v "
          "| calib k | calib v |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    variants = [(True, True, None), (True, False, None), (False, True, None), (False, False, None),
                ("one group", True, n_kv)]
    for keep in (float(k) for k in args.keep.split(",")):
        for hsr, ovc, gs in variants:
            method = ReCalKV(keep_rank=keep, hsr=hsr is True, ovc=ovc, group_size=gs)
            errs = {"hk": [], "hv": [], "ck": [], "cv": []}
            for p in projs:
                w_k, w_v = p.k_proj.weight.detach(), p.v_proj.weight.detach()
                g_k, g_v = calib[p.layer]
                f = method.factorize(w_k, w_v, g_k, g_v, n_heads=n_kv, head_dim=d)
                if p.layer == projs[0].layer:
                    groups, k_ranks, v_rank = list(f.k.groups), list(f.k.ranks), f.v.rank
                errs["hk"].append(relative_error(w_k, f.k, gram=held[p.layer][0]))
                errs["hv"].append(relative_error(w_v, f.v, gram=held[p.layer][1]))
                errs["ck"].append(relative_error(w_k, f.k, gram=g_k))
                errs["cv"].append(relative_error(w_v, f.v, gram=g_v))
            cells = [f"{statistics.mean(e):.4f} ({max(e):.3f})" for e in errs.values()]
            label = "no" if hsr is False else ("yes" if hsr is True else hsr)
            print(f"| {keep} | {label} | {'yes' if ovc else 'no'} | {[list(g) for g in groups]} | {k_ranks} "
                  f"| {v_rank} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
