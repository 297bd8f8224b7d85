"""Sites the passes cannot handle are left as the original attention, with a reason in the
report, and the model's output is still correct."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kvfx
from zoo import HandDecoder, clone_model, hand_decode


class CrossAttn(nn.Module):
    """Self-attention with a list cache, then cross-attention on encoder states."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.xq, self.xkv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.emb = nn.Embedding(50, dim)

    def split(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.d).transpose(1, 2)

    def forward(self, ids, enc, cache=None):
        x = self.emb(ids)
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, -1))
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1).transpose(1, 2).flatten(2)
        xk, xv = (self.split(t) for t in self.xkv(enc).chunk(2, -1))
        x = x + F.scaled_dot_product_attention(self.split(self.xq(x)), xk, xv).transpose(1, 2).flatten(2)
        return x, (k, v)


def test_cross_attention_left_alone_and_correct():
    torch.manual_seed(0)
    model = CrossAttn().eval()
    ids, enc = torch.randint(0, 50, (1, 7)), torch.randn(1, 5, 32)
    comp = torch.compile(clone_model(model), backend="kvfx", options={"inner": "eager"})
    with torch.no_grad():
        ref, rc = model(ids, enc)
        out, oc = comp(ids, enc)
        tok = torch.randint(0, 50, (1, 1))
        ref2, _ = model(tok, enc, rc)
        out2, _ = comp(tok, enc, oc)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2, ref2, rtol=1e-5, atol=1e-5)
    sites = {s.rewritten: s for s in kvfx.sites()}
    assert sites[True].provenance == "dynamic_cache"
    assert not sites[False].rewritten and "cross-attention" in sites[False].reason
    assert "left alone" in kvfx.explain()


class KeyBroadcastMask(nn.Module):
    """A mask of shape (T, 1): a per-query bias broadcast over keys. kvfx cannot map it to
    kept tokens, so it must leave the site alone."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.emb = nn.Embedding(50, dim)

    def forward(self, ids, cache=None):
        x = self.emb(ids)
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.h, self.d).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        bias = torch.linspace(-1, 0, T)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), (k, v)


def test_uninterpretable_mask_left_alone_and_correct():
    torch.manual_seed(0)
    model = KeyBroadcastMask().eval()
    ids = torch.randint(0, 50, (1, 6))
    comp = torch.compile(clone_model(model), backend="kvfx", options={"inner": "eager"})
    with torch.no_grad():
        ref, rc = model(ids)
        out, oc = comp(ids)
    torch.testing.assert_close(out, ref)
    (site,) = kvfx.sites()
    assert not site.rewritten and "broadcasts over the key axis" in site.reason
    assert oc[0].untyped_storage().nbytes() == rc[0].untyped_storage().nbytes()  # untouched


def test_training_dropout_left_alone():
    class Drop(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    m = Drop()
    q = torch.randn(1, 2, 4, 8)
    torch.compile(m, backend="kvfx", options={"inner": "eager"})(q, q, q)
    (site,) = kvfx.sites()
    assert not site.rewritten and "dropout" in site.reason


def test_unknown_backend_option_is_an_error():
    model = HandDecoder(layers=1)
    comp = torch.compile(model, backend="kvfx", options={"polcy": "full"})
    with pytest.raises(Exception, match="unknown option.*polcy"):
        comp(torch.randint(1, 50, (1, 4)))


def test_unimplemented_policy_is_a_clear_error():
    model = HandDecoder(layers=1)
    policy = {"kvfx": 1, "name": "h2o-kivi", "extends": "h2o", "quant": {"values": {"group": 16}}}
    comp = torch.compile(model, backend="kvfx", options={"policy": policy, "inner": "eager"})
    with pytest.raises(kvfx.PolicyError, match="eviction.scorer: got 'h2o', expected a scorer that does not "
                                               "evict during decode.* with a quantized store"):
        hand_decode(comp, torch.randint(1, 50, (1, 4)), 2)


def test_static_shapes_refused_and_dynamo_config_untouched():
    """dynamic=False would recompile every decode step and end in dynamo's eager fallback,
    where the ghost caches would be read: kvfx refuses it with the fix in the message. kvfx
    changes no process-wide dynamo setting (DESIGN rule 7)."""
    import torch._dynamo

    before = torch._dynamo.config.get_config_copy()
    model = HandDecoder(layers=1)
    comp = torch.compile(model, backend="kvfx", options={"inner": "eager"}, dynamic=False)
    with pytest.raises(Exception, match="dynamic=False"):
        hand_decode(comp, torch.randint(1, 50, (1, 4)), 3)
    torch._dynamo.reset()
    hand_decode(torch.compile(model, backend="kvfx", options={"inner": "eager"}),
                torch.randint(1, 50, (1, 4)), 3)
    assert all(s.rewritten for s in kvfx.sites()), kvfx.explain()
    assert torch._dynamo.config.get_config_copy() == before


def test_each_compile_gets_its_own_policy():
    """Compiling again with a new options dict applies the new policy (ids of freed option
    dicts can be reused; the backend must not hand out a stale policy)."""
    import gc

    import torch._dynamo

    from zoo import hf_model

    model = hf_model("llama", "sdpa")
    ids = torch.randint(1, 90, (1, 120), generator=torch.Generator().manual_seed(0))
    for policy, want in [("full", 120), ({"kvfx": 1, "name": "s", "extends": "streaming",
                                          "budget": {"window": 16}}, 20), ("full", 120)]:
        torch._dynamo.reset()
        kvfx.reset()
        gc.collect()
        model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
        with torch.no_grad():
            out = model(input_ids=ids)
        held = {s["tokens_held"] for s in kvfx.memory(out.past_key_values)["sites"].values()}
        assert held == {want}, (policy, held)
