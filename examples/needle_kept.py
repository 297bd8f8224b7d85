"""Which compressed caches still hold a passkey after the prompt: for each policy, prefill one
passkey prompt through the kvfx-compiled model and count, per layer and KV head, how many of the
passkey's digit tokens the store kept (before any question is asked or token generated).

    python examples/needle_kept.py --length 4096 --depth 0.45 --policy h2o@0.25 tova@0.25 snapkv@0.25
"""

import argparse

import torch
from transformers import DynamicCache

import kvfx
from kvfx.eval.passkey import make_passkey_sample
from kvfx.models import load_model
from kvfx.runtime.state import site_stores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depth", type=float, default=0.45)
    ap.add_argument("--policy", nargs="+", default=["h2o@0.25", "tova@0.25", "snapkv@0.25"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(a.model, progress=False)
    s = make_passkey_sample(tok, a.length, a.depth, 0, key_seed="needle_kept")
    ids = s.input_ids
    digits = [i for i in range(s.needle_start, s.needle_end) if tok.decode(ids[0, i]).strip().isdigit()]
    print(f"passkey {s.passkey}: {len(digits)} digit tokens at positions {digits[0]}..{digits[-1]} of {ids.shape[1]}")
    for spec in a.policy:
        torch._dynamo.reset()
        kvfx.reset()
        model.compile(backend="kvfx", options={"policy": spec, "inner": "eager"})
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        held = []
        for st in site_stores(cache).values():
            pos = st.pos[0, :, :st.length]
            held.append([sum(int((pos[h] == d).any()) for d in digits) for h in range(pos.shape[0])])
        every = sum(all(x == len(digits) for x in layer) for layer in held)
        none = sum(all(x == 0 for x in layer) for layer in held)
        total = sum(sum(layer) for layer in held) / (len(digits) * sum(len(layer) for layer in held))
        print(f"{spec}: {total:.0%} of the digit tokens kept over all (layer, KV head); every digit in every "
              f"head in {every}/{len(held)} layers, none in any head in {none}/{len(held)}")
        print("  digits kept per layer (per KV head):", " ".join("/".join(map(str, layer)) for layer in held))


if __name__ == "__main__":
    main()
