"""SmolLM2-135M in fp32 at a 4096-token prompt + 36 decode steps: what kvfx's quantized stores hold,
tensor by tensor, with the residual in the model's dtype and in float16 (quant.residual_dtype),
measured from the stores' own tensors and kvfx.memory() (python examples/residual_bytes.py).
Prints a markdown table (results/residual-dtype/bytes.md)."""
import torch

import kvfx
from kvfx.eval.perplexity import long_text_ids
from kvfx.models import load_model
from kvfx.runtime.state import site_stores

GROUPS = {"codes": ("kcodes", "vcodes"), "scale/min": ("kscale", "kmin", "vscale", "vmin"),
          "residual": ("rk", "rv")}


def nbytes(t):
    return 0 if t is None else t.untyped_storage().nbytes()


rows = []
for base in ("kivi2", "kivi4"):
    for held in ("model", "float16"):
        kvfx.reset()
        torch._dynamo.reset()
        model, tok = load_model("smollm2-135m", progress=False)
        policy = {"kvfx": 1, "name": f"{base}-{held}", "extends": base, "quant": {"residual_dtype": held}}
        model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
        ids = long_text_ids(tok, 4096)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=36, min_new_tokens=36,
                                 do_sample=False, return_dict_in_generate=True)
        cache = out.get("cache", out.get("past_key_values"))
        mem = kvfx.memory(cache)
        stores = list(site_stores(cache).values())
        s0 = stores[0]
        parts = {g: sum(nbytes(getattr(s0, f)) for f in fs) for g, fs in GROUPS.items()}
        parts["other"] = s0.held_bytes() - sum(parts.values())
        rows.append((base, held, s0.tokens_held(), s0.held_bytes(), parts, str(s0.rk.dtype).split(".")[-1],
                     (s0.n, s0.nk, s0.nv), mem))
        print(rows[-1][:4], parts, mem["ratio"], flush=True)

print("\n| policy | residual_dtype | residual held as | tokens | per site: held B | codes | fp16 scale/min | "
      "residual | other | site held / dense fp32 | kvfx.memory() held / dense (all sites, ghosts) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for base, held, n, total, parts, rdt, counts, mem in rows:
    dense = 2 * 3 * n * 64 * 4  # one site: keys + values, 3 KV heads x 64, fp32
    share = " | ".join(f"{parts[g]:,} ({parts[g] / total:.0%})" for g in ("codes", "scale/min", "residual", "other"))
    print(f"| {base} | {held} | {rdt} | {n} (n, nk, nv = {counts}) | {total:,} | {share} | {total / dense:.4f} | "
          f"{mem['held_bytes']:,} / {mem['dense_bytes']:,} = {mem['ratio']:.4f} |")
