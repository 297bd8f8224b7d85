"""CaliDrop wired into the runtime: at a decode query equal to a stored prompt query, the
calibrated attention over the compressed store equals attention over every token (exact
two-partition merge); decode-time eviction folds what it drops; bytes are counted."""

import pytest
import torch
import torch.nn.functional as F

import kvfx
from kvfx.runtime.compressor import build_compressor
from kvfx.policy import load_policy
from kvfx.runtime.attention import calibrated_decode, evicted_mask
from kvfx.runtime.qstore import QuantStore
from kvfx.runtime.state import site_stores
from kvfx.runtime.store import SiteStore


def _prompt(B=2, Hq=4, Hkv=2, n=160, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, d, generator=g)
    k = torch.randn(B, Hkv, n, d, generator=g)
    v = torch.randn(B, Hkv, n, d, generator=g)
    return q, k, v


def _compress(policy, q, k, v, store=None):
    lp = load_policy(policy).resolve(0, "layers.0.self_attn", 1)
    c = build_compressor(lp, 0, 1)
    store = store or (SiteStore("t") if c.quant is None else QuantStore("t", c.quant))
    valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
    scale = q.shape[-1] ** -0.5
    c.prefill(store, q, k, v, valid, scale, None)
    c.init_calibration(store, q, k, v, valid, scale)
    store.seen = q.shape[2]
    return c, store


def test_snapkv_window_logits_are_reused_and_give_the_same_state(monkeypatch):
    """SnapKV's scoring already computed the window's logits: the state built from them equals
    the one built by a fresh pass over the keys."""
    import kvfx.methods.calidrop as cd

    calls = []
    real = cd.build_state_from_logits
    monkeypatch.setattr(cd, "build_state_from_logits", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _prompt()
    c, store = _compress("snapkv-calidrop", q, k, v)
    assert calls == [1]  # the logits path ran
    valid = torch.ones(2, q.shape[2], dtype=torch.bool)
    fresh = c.calib.build_state(q, k, v, evicted_mask(store, valid), scale=q.shape[-1] ** -0.5, q_valid=valid)
    for name in ("q_hist", "o_e", "lse_e", "valid"):
        torch.testing.assert_close(getattr(store.calib, name), getattr(fresh, name), atol=1e-5, rtol=1e-5)
    assert c._window_logits is None  # handed over, not kept


@pytest.mark.parametrize("policy", ["snapkv-calidrop", "snapkv-calidrop-ott2"])
def test_stored_query_recovers_full_attention(policy):
    q, k, v = _prompt()
    c, store = _compress(policy, q, k, v)
    n = q.shape[2]
    assert int(store.count.max()) < n  # something was evicted
    k1, v1 = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
    store.append(k1, v1, torch.tensor([n]))
    qt = q[:, :, -5:-4]  # a query of the observation window
    out, _ = calibrated_decode(store, qt, None, False, n, None, False, c.calib)
    want = F.scaled_dot_product_attention(qt, torch.cat([k, k1], 2), torch.cat([v, v1], 2),
                                          enable_gqa=True)
    if isinstance(store, QuantStore):  # the kept part is 2-bit there: compare to its own view
        o_plain = store.attend(qt, None, False, n, None)
        assert (out - want).abs().mean() < (o_plain - want).abs().mean()
    else:
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
        plain = F.scaled_dot_product_attention(qt, store.k[:, :, :store.length], store.v[:, :, :store.length],
                                               attn_mask=(store.pos[:, :, :store.length] >= 0)[:, :, None].repeat_interleave(2, 1),
                                               enable_gqa=True)
        assert (plain - want).abs().max() > 1e-3  # calibration changed something


def test_dissimilar_query_is_left_alone():
    q, k, v = _prompt()
    c, store = _compress("snapkv-calidrop", q, k, v)
    n = q.shape[2]
    store.append(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64), torch.tensor([n]))
    qt = -q[:, :, -1:]  # cosine -1 with its stored self
    qt = qt - (qt * 0)  # same tensor values
    keep = (store.pos[:, :, :store.length] >= 0)[:, :, None].repeat_interleave(2, 1)
    plain = F.scaled_dot_product_attention(qt, store.k[:, :, :store.length], store.v[:, :, :store.length],
                                           attn_mask=keep, enable_gqa=True)
    sims = torch.nn.functional.cosine_similarity(qt, store.calib.q_hist, dim=-1)
    out, _ = calibrated_decode(store, qt, None, False, n, None, False, c.calib)
    below = sims.max(-1).values < 0.9
    assert below.any()
    torch.testing.assert_close(out[below], plain[below], atol=1e-6, rtol=1e-5)


def test_decode_eviction_folds_dropped_tokens_exactly():
    """Streaming with a rolling cap: after tokens are evicted at decode, a stored query still
    recovers attention over *every* token seen (prompt + decoded)."""
    policy = {"kvfx": 1, "name": "s-cal", "extends": "streaming",
              "budget": {"sink": 4, "window": 60}, "calibration": {"history": 32}}
    q, k, v = _prompt(n=128)
    c, store = _compress(policy, q, k, v)
    ks, vs = [k], [v]
    for t in range(20):  # each step appends one token and evicts the oldest non-sink
        kt, vt = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
        store.append(kt, vt, torch.tensor([128 + t]))
        ks.append(kt)
        vs.append(vt)
        c.after_decode(store, 1, None)
        store.seen += 1
    assert store.length == 64
    qt = q[:, :, -3:-2]
    out, _ = calibrated_decode(store, qt, None, False, store.seen, None, False, c.calib)
    want = F.scaled_dot_product_attention(qt, torch.cat(ks, 2), torch.cat(vs, 2), enable_gqa=True)
    torch.testing.assert_close(out, want, atol=3e-5, rtol=1e-4)


def test_calibration_bytes_are_counted_in_memory():
    from zoo import hf_model

    kvfx.reset()
    torch._dynamo.reset()
    model = hf_model("llama", layers=2)
    model.compile(backend="kvfx", options={"policy": "snapkv-calidrop", "inner": "eager"})
    ids = torch.randint(1, 90, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
    mem = kvfx.memory(out.past_key_values)
    stores = site_stores(out.past_key_values)
    assert len(stores) == 2 and mem["sites"].keys() == stores.keys()
    for path, site in mem["sites"].items():
        st = stores[path]
        assert site["calib_bytes"] > 0 and site["calib_bytes"] == st.calib.nbytes()
        assert site["held_bytes"] >= site["kv_bytes"] + site["calib_bytes"]
