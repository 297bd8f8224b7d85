"""SmolLM2-135M in bfloat16 at a 4096-token prompt: bytes kvfx holds for kivi2 and ott2 against the
dense fp16 cache, measured by kvfx.memory() (python examples/quant_bytes.py)."""
import torch, kvfx
from kvfx.models import load_model
from kvfx.eval.perplexity import long_text_ids
for policy in ["kivi2", "ott2"]:
    kvfx.reset(); torch._dynamo.reset()
    model, tok = load_model("smollm2-135m", progress=False)
    model = model.to(torch.bfloat16)
    model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
    ids = long_text_ids(tok, 4096)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, return_dict_in_generate=True)
    mem = kvfx.memory(out.get("cache", out.get("past_key_values")))
    print(policy, "held", mem["held_bytes"], "dense_fp16", mem["dense_fp16_bytes"], "ratio_fp16", round(mem["ratio_fp16"], 4),
          "model_cache_bytes", mem["model_cache_bytes"], flush=True)
