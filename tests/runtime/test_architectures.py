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


def test_sliding_window_left_alone_and_memory_counts_it():
    ref = CapDecoder(cap=None, windows=(4, None)).eval()
    model = compiled(CapDecoder(cap=None, windows=(4, None)).eval(), "full")
    ids = torch.randint(0, VOCAB, (1, 48))
    with torch.no_grad():
        want, _ = decode(ref, ids, 3)
        got, _ = decode(model, ids, 3)
        logits, cache = model(ids)  # a prefill: the full store holds exactly the prompt
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    s0, s1 = kvfx.sites(model)
    assert (s0.rewritten, s0.provenance, s0.window) == (False, "sliding_window", 4)
    assert "sliding-window layer" in s0.reason and "last 4 tokens" in s0.reason
    assert s1.rewritten and s1.window is None
    text = kvfx.explain(model)
    assert "sliding_window (window 4)" in text and "policy applied to 1 of 2 layers" in text
    mem = kvfx.memory(cache)
    (name, left), = mem["left_alone"].items()
    window_bytes = sum(t.untyped_storage().nbytes() for t in cache[0])
    assert left["layer"] == 0 and left["bytes"] == window_bytes == mem["left_alone_bytes"]
    site_dense = sum(e["dense_bytes"] for e in mem["sites"].values())
    assert mem["dense_bytes"] == site_dense + window_bytes  # the same layers on both sides
    assert 1.0 <= mem["ratio"] <= 1.10, mem["ratio"]
    assert mem["summary"].startswith("policy applied to 1 of 2 layers; the other 1 (left alone, "
                                     "uncompressed) hold ")
    frac = float(mem["summary"].split(" hold ")[1].split()[0])
    assert frac == pytest.approx(window_bytes / mem["held_bytes"], abs=0.006)


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
def test_gemma3_sliding_layers_reported_and_memory_within_1_10():
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
    assert not s0.rewritten and s0.provenance == "sliding_window" and "sliding-window" in s0.reason
    assert s1.rewritten
    mem = kvfx.memory(cache)
    assert list(mem["left_alone"]) == ["model.layers.0.self_attn"]
    assert 1.0 <= mem["ratio"] <= 1.10, mem["ratio"]
    assert mem["summary"].startswith("policy applied to 1 of 2 layers")


@pytest.mark.slow
def test_gemma2_soft_capped_eager_full_exact():
    import copy

    from transformers import Gemma2Config

    cfg = Gemma2Config(**_common(head_dim=16), sliding_window=8, attn_logit_softcapping=1.0,
                       final_logit_softcapping=30.0, query_pre_attn_scalar=4)
    ref = _hf(cfg, "eager")
    model = torch.compile(copy.deepcopy(ref), backend="kvfx", options={"policy": "full", "inner": "eager"})
    ids = torch.randint(1, 96, (1, 12))
    with torch.no_grad():
        want, _ = _hf_decode(ref, ids, 3)
        got, _ = _hf_decode(model, ids, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    sites = kvfx.sites(model)
    assert all(s.softcap == 1.0 and s.pattern == "eager" for s in sites)
    # Gemma-2 alternates sliding (layer 0) and global (layer 1) layers
    assert [(s.rewritten, s.provenance) for s in sites] == [(False, "sliding_window"), (True, "dynamic_cache")]


@pytest.mark.slow
def test_mistral_sliding_window_all_layers_left_alone_with_reason():
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
