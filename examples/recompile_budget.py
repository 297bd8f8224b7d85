"""How many policies can plain ``model.compile(backend="kvfx", ...)`` compile in one process before
dynamo's shared recompile budget runs out (transformers 5: every model shares one forward code
object), against ``kvfx.compile`` (its own budget per model). A tiny random Llama, CPU, ~1 min.

    python examples/recompile_budget.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import kvfx  # noqa: E402
from kvfx.runtime.state import site_stores  # noqa: E402
from zoo import clone_model, hf_model  # noqa: E402

POLICIES = ["snapkv@0.5", "h2o@0.5", "streaming@0.5", "tova@0.5", "snapkv@0.25", "h2o@0.25", "tova@0.25"]


def main():
    base = hf_model("llama", heads=2, kv_heads=1)
    ids = torch.randint(1, 90, (1, 300), generator=torch.Generator().manual_seed(0))
    for how in ("model.compile", "kvfx.compile"):
        torch._dynamo.reset()
        for i, p in enumerate(POLICIES):
            m = clone_model(base)
            if how == "model.compile":
                m.compile(backend="kvfx", options={"policy": p, "inner": "eager"})
            else:
                kvfx.compile(m, p, inner="eager")
            with torch.no_grad():
                out = m.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
            held = [st.tokens_held() for st in site_stores(out.past_key_values).values()]
            print(f"{how:14s} policy {i + 1} {p:14s}",
                  f"compressed, {held} tokens held" if held else "NOT compressed (dynamo ran it eagerly)")


if __name__ == "__main__":
    main()
