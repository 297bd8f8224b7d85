"""Model coverage (issue 21): soft-capped attention, sliding-window layers, and memory reports of
partly compressed models. Fast tests use hand-written decoders; the slow ones tiny Hugging Face
Gemma-2, Gemma-3 and Mistral configs (random weights, small windows)."""

import pytest
import torch
import torch.nn as nn

import kvfx
from kvfx.runtime.softcap import capped_attention

VOCAB, DIM, H, HKV = 64, 32, 4, 2
D = DIM // H


class CapBlock(nn.Module):
    """Eager attention, logits soft-capped as Gemma-2 does (``cap=None``: no cap); ``window``: the
    cache keeps the last ``window`` tokens and each query sees ``window`` keys (sliding layer)."""

    def __init__(self, cap, window=None):
        super().__init__()
        self.cap, self.window = cap, window
        self.q, self.k, self.v = (nn.Linear(DIM, n * D, bias=False) for n in (H, HKV, HKV))
        self.o = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x, past):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, H, D).transpose(1, 2)
        k = self.k(x).view(B, T, HKV, D).transpose(1, 2)
        v = self.v(x).view(B, T, HKV, D).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        L = k.shape[2]
        s = torch.matmul(q, k.repeat_interleave(H // HKV, dim=1).transpose(2, 3)) * D**-0.5
        if self.cap is not None:
            s = s / self.cap
            s = torch.tanh(s)
            s = s * self.cap
        masked = torch.ones(T, L, dtype=torch.bool).triu(L - T + 1)
        if self.window is not None:
            masked = masked | torch.ones(T, L, dtype=torch.bool).tril(L - T - self.window)
        s = s.masked_fill(masked, float("-inf"))
        a = torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype),
                         v.repeat_interleave(H // HKV, dim=1))
        cache = (k, v) if self.window is None else (k[:, :, -self.window:], v[:, :, -self.window:])
        return x + self.o(a.transpose(1, 2).reshape(B, T, -1)), cache


class CapDecoder(nn.Module):
    def __init__(self, cap=2.0, windows=(None, None), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([CapBlock(cap, w) for w in windows])
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids, cache=None):
        x, new = self.emb(ids) * 4.0, []  # large activations: the cap is far from the identity
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if cache is None else cache[i])
            new.append(kv)
        return self.head(x), new


def decode(model, ids, steps):
    logits, cache = model(ids)
    out = [logits[:, -1]]
    for _ in range(steps):
        logits, cache = model(out[-1].argmax(-1, keepdim=True), cache)
        out.append(logits[:, -1])
    return torch.stack(out, 1), cache


def compiled(model, policy):
    return torch.compile(model, backend="kvfx", options={"policy": policy, "inner": "eager"})


def test_capped_attention_reference_matches_hf_eager():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8) * 3, torch.randn(1, 2, 5, 8) * 3, torch.randn(1, 2, 5, 8)
    mask = torch.zeros(1, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    mod = nn.Module()
    mod.num_key_value_groups, mod.training = 2, False
    ref, _ = eager_attention_forward(mod, q, k, v, mask, dropout=0.0, scaling=0.5, softcap=1.5)
    out, _ = capped_attention(q, k, v, mask, scale=0.5, softcap=1.5)
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=0, atol=1e-6)
    uncapped, _ = eager_attention_forward(mod, q, k, v, mask, dropout=0.0, scaling=0.5, softcap=None)
    assert (uncapped - ref).abs().max() > 1e-2  # the cap matters on these inputs


def test_softcap_sites_rewritten_and_full_is_exact():
    ref = CapDecoder().eval()
    model = compiled(CapDecoder().eval(), "full")
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        want, _ = decode(ref, ids, 4)
        got, _ = decode(model, ids, 4)
        uncapped, _ = decode(CapDecoder(cap=None).eval(), ids, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (uncapped - want).abs().max() > 1e-2  # dropping the cap would fail the comparison
    sites = kvfx.sites(model)
    assert [s.rewritten for s in sites] == [True, True] and {s.softcap for s in sites} == {2.0}
    assert "eager+softcap 2" in kvfx.explain(model)


def test_softcap_quantized_policy_is_refused_at_compile():
    from kvfx.passes import UnsupportedPolicyError, run_passes
    from kvfx.policy import load_policy

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(CapDecoder().eval(), backend=backend)(torch.randint(0, VOCAB, (1, 6)))
    with pytest.raises(UnsupportedPolicyError, match="(?s)quantized.*soft-capped.*cap 2.0.*dense store"):
        run_passes(graphs[0], load_policy({"kvfx": 1, "name": "kivi4-g8", "extends": "kivi4",
                                           "quant": {"values": {"group": 8}}}))


def forced(model, ids, toks):
    """Logits of a prompt then of the given tokens, one step each (teacher forcing: both models
    see the same inputs, so a quantization error cannot change what is fed next)."""
    logits, cache = model(ids)
    out = [logits[:, -1]]
    for t in toks.unbind(1):
        logits, cache = model(t[:, None], cache)
        out.append(logits[:, -1])
    return torch.stack(out, 1), cache


@pytest.mark.parametrize("window,prompt", [(4, 48), (40, 100)])
def test_sliding_window_full_is_exact_and_holds_the_window(window, prompt):
    torch._dynamo.reset()
    ref = CapDecoder(cap=None, windows=(window, None)).eval()
    model = compiled(CapDecoder(cap=None, windows=(window, None)).eval(), "full")
    ids = torch.randint(0, VOCAB, (2, prompt))
    with torch.no_grad():
        want, _ = decode(ref, ids, 12)
        got, cache = decode(model, ids, 12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    s0, s1 = kvfx.sites(model)
    assert (s0.rewritten, s0.provenance, s0.window) == (True, "sliding_window", window)
    assert s1.rewritten and s1.window is None
    assert "sliding_window (window %d)" % window in kvfx.explain(model)
    mem = kvfx.memory(cache)
    e = mem["sites"][s0.module_path]
    # the store holds the model's window (and one decode step of capacity), not the sequence
    assert (e["tokens_held"], e["capacity"], e["tokens_seen"]) == (window, window + 1, prompt + 12)
    assert e["dense_bytes"] == 2 * 2 * HKV * window * D * 4  # the window cache the model would hold
    assert e["held_bytes"] <= 1.5 * e["dense_bytes"]
    assert mem["left_alone"] == {} and mem["summary"] == "policy applied to 2 of 2 layers"


def test_sliding_window_quantized_exact_while_the_window_fits_the_residual():
    """Window 20 < residual 32: every visible token is in the full-precision residual, so the
    quantized store must reproduce full attention exactly; expired tokens (quantized or residual)
    must be dropped or masked, never attended."""
    torch._dynamo.reset()
    pol = {"kvfx": 1, "name": "kivi4-r32", "extends": "kivi4", "quant": {"values": {"group": 8}, "residual": 32}}
    ref = CapDecoder(cap=None, windows=(20, 20)).eval()
    model = compiled(CapDecoder(cap=None, windows=(20, 20)).eval(), pol)
    ids, toks = torch.randint(0, VOCAB, (2, 50)), torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        want, _ = forced(ref, ids, toks)
        got, cache = forced(model, ids, toks)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert all(s.rewritten and s.window == 20 and "quant" in s.policy for s in kvfx.sites(model))
    for e in kvfx.memory(cache)["sites"].values():
        assert e["tokens_held"] < 20 + 32 and e["capacity"] <= 96


def test_sliding_window_quantized_error_as_on_a_global_layer():
    """Window 80 > residual 32: old tokens are quantized and leave in whole key groups. The error
    against the model is that of the same quantization on a global layer (teacher-forced, 70 steps)."""
    pol = {"kvfx": 1, "name": "kivi4-r32", "extends": "kivi4", "quant": {"values": {"group": 8}, "residual": 32}}
    ids, toks = torch.randint(0, VOCAB, (2, 300)), torch.randint(0, VOCAB, (2, 70))
    errs = {}
    for windows in ((None, None), (80, 80)):
        torch._dynamo.reset()
        ref = CapDecoder(cap=None, windows=windows).eval()
        model = compiled(CapDecoder(cap=None, windows=windows).eval(), pol)
        with torch.no_grad():
            want, _ = forced(ref, ids, toks)
            got, cache = forced(model, ids, toks)
        errs[windows] = (got - want).abs().amax(-1)[:, 1:].mean().item()
    assert errs[(80, 80)] < 1.5 * errs[(None, None)], errs
    for e in kvfx.memory(cache)["sites"].values():  # the window's slots, not the sequence's
        assert 80 <= e["tokens_held"] <= 80 + 32 + 1 and e["capacity"] == 128


@pytest.mark.parametrize("outliers,residual_dtype", [(False, "model"), (True, "model"), (True, "float16")])
def test_quant_store_rolls_with_the_window(outliers, residual_dtype):
    """The store's own contents after every step: each slot's dequantized key/value is the token
    at its recorded position (within the 4-bit error), a row's slots are the consecutive positions
    ending at the newest token and covering the window, and attention under the window mask equals
    attention over the exact window within the quantization error. Row 1 starts with 10 pads."""
    from kvfx.methods.quant import QuantConfig
    from kvfx.methods.quant_attention import dequant_keys, dequant_values
    from kvfx.runtime.qstore import QuantStore
    from kvfx.runtime.window import window_mask

    doc = {"kvfx": 1, "name": "q", "extends": "ott4" if outliers else "kivi4",
           "quant": {"values": {"group": 8}, "residual": 32, "residual_dtype": residual_dtype}}
    if outliers:
        doc["quant"]["outliers"] = {"per_group": 1, "pool": 8, "norm": "l1"}
    cfg = QuantConfig.from_policy(kvfx.load_policy(doc).resolve(0, "a", 1).quant)
    torch.manual_seed(0)
    B, Hk, d, T, w, steps, pads = 2, 2, 8, 300, 80, 90, 10
    K, V = torch.randn(B, Hk, T + steps, d), torch.randn(B, Hk, T + steps, d)
    pos = torch.arange(T).expand(B, Hk, T).clone()
    pos[1] = torch.cat([torch.arange(pads, T), torch.full((pads,), -1)])
    k0, v0 = K[:, :, :T].clone(), V[:, :, :T].clone()
    k0[1, :, :T - pads], v0[1, :, :T - pads] = K[1, :, pads:T], V[1, :, pads:T]
    st = QuantStore("site", cfg)
    st.write_kept(k0, v0, pos, torch.tensor([[T] * Hk, [T - pads] * Hk]), T)
    st.seen = T
    st.roll_window(w)
    for t in range(T, T + steps):
        st.append(K[:, :, t:t + 1], V[:, :, t:t + 1], torch.tensor([t]))
        kv = st.view()
        for b in range(B):
            n, nk, nv = st.row_n[b], st.row_nk[b], st.row_nv[b]
            p = st.pos[b, 0, :n].long()
            assert p.tolist() == list(range(t - n + 1, t + 1)) and p[0] <= t - w
            keys = torch.cat([dequant_keys(kv, 0, nk)[b] if nk else K[b, :, :0], st.rk[b, :, :n - nk].float()], 1)
            vals = torch.cat([dequant_values(kv, 0, nv)[b] if nv else V[b, :, :0], st.rv[b, :, :n - nv].float()], 1)
            assert (keys - K[b][:, p]).abs().max() < 0.5 and (vals - V[b][:, p]).abs().max() < 0.5
            assert n <= w + st.quantum + 1
        q = torch.randn(B, 2 * Hk, 1, d)
        P = min(t, w)
        keep = torch.ones(1, 1, 1, P + 1, dtype=torch.bool)
        keep[..., :P + 1 - w] = False  # the model sees its last w keys, as CapBlock's mask
        m, _ = window_mask(keep, False, t - P, P, 1)
        out = st.attend(q, m, False, t, None)
        kx, vx = (x[:, :, t - w + 1:t + 1].repeat_interleave(2, 1) for x in (K, V))
        ref = torch.softmax(q @ kx.mT * d ** -0.5, -1) @ vx
        assert (out - ref).abs().max() < 0.15
        st.flush()
        st.seen += 1
        st.roll_window(w)
        assert st.cap == st.window_cap
    if residual_dtype == "float16":
        assert st.rk.dtype == torch.float16 and st.pool.keys.dtype == torch.float16
    if outliers:  # the pool held entries, and none points at a dropped slot
        assert st.pool is not None and bool((st.pool.pos < torch.tensor(st.row_n)[:, None, None]).all())


def test_window_override_targets_sliding_layers_and_refuses_eviction():
    snap_winq = {"kvfx": 1, "name": "snap-winq", "extends": "snapkv", "layers": [
        {"window": True, "eviction": {"scorer": "none"},
         "quant": {"keys": {"bits": 4}, "values": {"bits": 4, "group": 8}}}]}
    torch._dynamo.reset()
    model = compiled(CapDecoder(cap=None, windows=(40, None)).eval(), snap_winq)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 60)))
    s0, s1 = kvfx.sites(model)
    assert s0.rewritten and s0.policy.startswith("quant") and s1.policy.startswith("snapkv")
    # without the override, eviction leaves the window layer alone, with the reason
    torch._dynamo.reset()
    model = compiled(CapDecoder(cap=None, windows=(40, None)).eval(), "snapkv")
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 60)))
    s0, s1 = kvfx.sites(model)
    assert not s0.rewritten and s1.rewritten
    assert "sliding-window layer" in s0.reason and "eviction inside a sliding window" in s0.reason
    assert "window: true" in s0.reason
    # an override that targets the window layers with eviction is an error, not a skipped layer
    bad = {"kvfx": 1, "name": "bad", "extends": "full", "layers": [{"window": True, "eviction": {"scorer": "knorm"},
                                                                      "budget": {"keep": 0.5}}]}
    torch._dynamo.reset()
    with pytest.raises(kvfx.PolicyError, match=r"layers\[0\] \(window: true\).*eviction inside"):
        compiled(CapDecoder(cap=None, windows=(40, None)).eval(), bad)(torch.randint(0, VOCAB, (1, 60)))
    # a window override on a model without window layers matches nothing: an error
    torch._dynamo.reset()
    with pytest.raises(kvfx.PolicyError, match="layers\\[0\\].window: got true.*0 of them sliding-window"):
        compiled(CapDecoder(cap=None, windows=(None, None)).eval(), snap_winq)(torch.randint(0, VOCAB, (1, 8)))


# ---- tiny Hugging Face configs (slow: each compiles a model) -----------------------------------

def _hf(cfg, attn):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    m.generation_config.pad_token_id = 0
    return m


def _common(layers=2, head_dim=32):
    return dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                max_position_embeddings=1024)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=getattr(model, "_orig_mod", model).config)


def _hf_decode(model, ids, steps):
    cache = _new_cache(model)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        out = model(input_ids=logits[-1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


@pytest.mark.slow
def test_gemma3_sliding_layers_rewritten_full_exact_and_memory_within_1_10():
    import copy

    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(**_common(), sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"])
    ref = _hf(cfg, "sdpa")
    model = torch.compile(copy.deepcopy(ref), backend="kvfx", options={"policy": "full", "inner": "eager"})
    ids = torch.randint(1, 96, (1, 160))
    with torch.no_grad():
        want, _ = _hf_decode(ref, ids, 2)
        got, _ = _hf_decode(model, ids, 2)
        cache = _new_cache(model)
        model(input_ids=ids, past_key_values=cache, use_cache=True)  # prefill only: no growth slack
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    s0, s1 = kvfx.sites(model)
    assert s0.rewritten and s0.provenance == "sliding_window" and s0.window == 15
    assert s1.rewritten
    mem = kvfx.memory(cache)
    assert mem["left_alone"] == {} and mem["sites"]["model.layers.0.self_attn"]["tokens_held"] == 15
    assert 1.0 <= mem["ratio"] <= 1.10, mem["ratio"]
    assert mem["summary"] == "policy applied to 2 of 2 layers"


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_quantized_sliding_layers_reported_compressed(attn):
    """SnapKV on the global layer, KIVI 2-bit on the sliding one (a ``window: true`` override):
    the sliding layer is rewritten onto a quantized store that holds fewer bytes than its window,
    and generation follows the model (teacher-forced logits close to the model's)."""
    import copy

    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(**_common(), sliding_window=384,
                           layer_types=["sliding_attention", "full_attention"])
    ref = _hf(cfg, attn)
    policy = {"kvfx": 1, "name": "snapkv-winq2", "extends": "snapkv", "budget": {"keep": 0.5}, "layers": [
        {"window": True, "eviction": {"scorer": "none"}, "quant": {"keys": {"bits": 2}, "values": {"bits": 2}}}]}
    model = torch.compile(copy.deepcopy(ref), backend="kvfx", options={"policy": policy, "inner": "eager"})
    ids, toks = torch.randint(1, 96, (1, 600)), torch.randint(1, 96, (1, 8))
    with torch.no_grad():
        for m in (ref, model):
            cache = _new_cache(m)
            out = m(input_ids=ids, past_key_values=cache, use_cache=True)
            logits = [out.logits[:, -1]]
            for t in toks.unbind(1):
                logits.append(m(input_ids=t[:, None], past_key_values=cache, use_cache=True).logits[:, -1])
            if m is ref:
                want = torch.stack(logits, 1)
        got = torch.stack(logits, 1)
    s0, s1 = kvfx.sites(model)
    assert s0.rewritten and s0.window == 383 and s0.policy.startswith("quant keys=2bit")
    assert s1.rewritten and s1.policy.startswith("snapkv")
    mem = kvfx.memory(cache)
    e0 = mem["sites"]["model.layers.0.self_attn"]
    assert e0["dense_bytes"] == 2 * 2 * 383 * 32 * 4  # the model's own window cache: 383 tokens
    assert e0["held_bytes"] < 0.5 * e0["dense_bytes"]  # 2-bit codes, a 128-token fp32 residual
    assert 383 <= e0["tokens_held"] <= 383 + 32 + 1 and mem["left_alone"] == {}
    assert (got.softmax(-1) - want.softmax(-1)).abs().max() < 0.1  # a random model: a loose check


@pytest.mark.slow
def test_gemma2_soft_capped_eager_full_exact():
    import copy

    from transformers import Gemma2Config

    cfg = Gemma2Config(**_common(head_dim=16), sliding_window=8, attn_logit_softcapping=1.0,
                       final_logit_softcapping=30.0, query_pre_attn_scalar=4)
    ref = _hf(cfg, "eager")
    model = torch.compile(copy.deepcopy(ref), backend="kvfx", options={"policy": "full", "inner": "eager"})
    ids = torch.randint(1, 96, (2, 30))  # longer than the window: the sliding store rolls
    with torch.no_grad():
        want, _ = _hf_decode(ref, ids, 10)
        got, cache = _hf_decode(model, ids, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    sites = kvfx.sites(model)
    assert all(s.softcap == 1.0 and s.pattern == "eager" for s in sites)
    # Gemma-2 alternates sliding (layer 0) and global (layer 1) layers: both rewritten
    assert [(s.rewritten, s.provenance) for s in sites] == [(True, "sliding_window"), (True, "dynamic_cache")]
    assert kvfx.memory(cache)["sites"]["model.layers.0.self_attn"]["tokens_held"] == 7


@pytest.mark.slow
def test_mistral_sliding_window_eviction_left_alone_with_reason_quant_rewritten():
    import copy

    from transformers import MistralConfig

    cfg = MistralConfig(**_common(layers=1, head_dim=16), sliding_window=8)
    ref = _hf(cfg, "sdpa")
    model = torch.compile(copy.deepcopy(ref), backend="kvfx", options={"policy": "snapkv", "inner": "eager"})
    ids = torch.randint(1, 96, (1, 12))
    with torch.no_grad():
        want, _ = _hf_decode(ref, ids, 1)
        got, cache = _hf_decode(model, ids, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # nothing rewritten: unchanged
    sites = kvfx.sites(model)
    assert len(sites) == 1 and not any(s.rewritten for s in sites)
    assert all(s.window == 7 and "sliding-window layer" in s.reason for s in sites)
    mem = kvfx.memory(cache)
    (left,) = mem["left_alone"].values()  # no kvfx state: held is the model's own window cache
    assert left["tokens"] == 7 and mem["store_bytes"] == 0
    assert mem["ratio"] == pytest.approx(1.0, abs=0.01)  # (+ the cache's small bookkeeping tensors)
    # a policy that keeps every token (here full) is rewritten and follows the model exactly
    torch._dynamo.reset()
    model = torch.compile(copy.deepcopy(ref), backend="kvfx", options={"policy": "full", "inner": "eager"})
    with torch.no_grad():
        got, cache = _hf_decode(model, ids, 4)
        want, _ = _hf_decode(ref, ids, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    (s,) = kvfx.sites(model)
    assert s.rewritten and s.window == 7
    assert kvfx.memory(cache)["sites"]["model.layers.0.self_attn"]["tokens_held"] == 7
