"""Chunked compression is sound on a real model (SmolLM2-135M, offline from its pip package): at a
light budget (keep 0.9), a 512-token essay prefilled in chunks of 128 continues like the full cache.
A chunk boundary that evicted the wrong tokens, mixed up positions or dropped a chunk would break
the continuation within a few tokens (at keep 0.5 KNorm already diverges after 4-6)."""

from __future__ import annotations

import copy

import pytest
import torch

import kvfx

pytestmark = pytest.mark.slow

N, CHUNK, NEW = 512, 128, 16


@pytest.fixture(scope="module")
def smol_full():
    from kvfx.eval.perplexity import long_text_ids
    from kvfx.models import load_model

    model, tok = load_model("smollm2-135m", progress=False)
    ids = long_text_ids(tok, N, "essays")[:, :N]
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, N:]
    return model, ids, full


@pytest.mark.parametrize("policy", ["knorm@0.9", "snapkv@0.9", "h2o@0.9"])
def test_chunked_prefill_continues_like_full_at_light_budget(smol_full, policy):
    model, ids, full = smol_full
    m = copy.deepcopy(model)
    kvfx.compile(m, policy, inner="eager")
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=NEW, do_sample=False, prefill_chunk_size=CHUNK,
                         return_dict_in_generate=True)
    got = out.sequences[0, N:]
    stores = kvfx.runtime.state.site_stores(out.past_key_values)
    held = [int(s.count.max()) for s in stores.values()]
    # 0.9 of the 512 + 16 tokens (the KNorm preset leaves layers 0 and 1 full, as its paper does)
    assert len(held) == 30 and sum(h <= round(0.9 * (N + NEW)) + 1 for h in held) >= 28, f"{policy}: {held}"
    agree = int(torch.cumprod((got == full).int(), 0).sum())
    assert agree >= 12, f"{policy}: chunked greedy tokens agree with full for {agree} of {NEW}"
