"""Methods as plug-ins: the scorer registry, the schema generated from it, KeyDiff, Expected
Attention and ChunkKV against independent float64 loops, and the budget rules every scorer gets."""

import math
from pathlib import Path

import pytest
import torch

from kvfx.methods import registry
from kvfx.methods.expected_attention import expected_attention_scores
from kvfx.methods.keydiff import keydiff_scores
from kvfx.methods.select import chunk_scores
from kvfx.policy import PolicyError, load_policy
from kvfx.policy import schema
from kvfx.runtime.compressor import build_compressor
from kvfx.runtime.qstore import QuantStore
from kvfx.runtime.store import SiteStore


def test_scorer_names_come_from_the_registry_only():
    names = tuple(registry.scorers())
    assert names[0] == "none" and {"snapkv", "h2o", "keydiff", "expected_attention"} <= set(names)
    assert schema.SCORERS == names
    assert schema.Eviction.model_fields["scorer"].annotation.__args__ == names
    assert set(schema.BUDGETED) == {n for n, c in registry.scorers().items() if c.budgeted}
    # each scorer's parameters are eviction fields owned by it
    assert schema.Eviction.OWNERS["lag"] == ("lagkv",) and schema.Eviction.OWNERS["queries"] == (
        "expected_attention",)
    # the scorer names are spelled nowhere else in the package's code (presets and docs aside)
    root = Path(registry.__file__).parents[1]
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.parent.name in ("methods", "templates"):  # kernel modes are named after their math
            continue
        for name in ("keydiff", "expected_attention", "lagkv", "tova"):
            assert f'"{name}"' not in text, (path, name)


def test_register_refuses_malformed_scorers():
    from dataclasses import dataclass

    class Plain(registry.Scorer):
        name = "plain"

    with pytest.raises(TypeError, match="dataclass"):
        registry.register(Plain)

    @dataclass
    class Mutable(registry.Scorer):
        name = "mutable"

    with pytest.raises(TypeError, match="frozen"):
        registry.register(Mutable)

    @dataclass(frozen=True)
    class Taken(registry.Scorer):
        name = "snapkv"

    with pytest.raises(TypeError, match="already"):
        registry.register(Taken)


def test_schema_documents_every_scorer_parameter():
    props = load_policy("full") and schema.Eviction.model_json_schema()["properties"]
    for name, cls in registry.scorers().items():
        for f in registry.params_of(cls):
            assert f.name in props, (name, f.name)
    assert "keydiff" in props["scorer"]["description"]


# ---- KeyDiff -----------------------------------------------------------------------------------

def naive_keydiff(k, valid):
    B, H, n, d = k.shape
    out = torch.full((B, H, n), -math.inf, dtype=torch.float64)
    for b in range(B):
        idx = [j for j in range(n) if valid[b, j]]
        for h in range(H):
            units = [k[b, h, j].double() / k[b, h, j].double().norm() for j in idx]
            a = sum(units) / len(units)
            for j in idx:
                kj = k[b, h, j].double()
                out[b, h, j] = -float(kj @ a) / float(kj.norm() * a.norm())
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_keydiff_matches_definition(seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 3, 20, 8, generator=g) + 0.5
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :6] = False
    got = keydiff_scores(k, valid)
    want = naive_keydiff(k, valid)
    torch.testing.assert_close(got[valid[:, None].expand_as(got)].double(),
                               want[valid[:, None].expand_as(want)], rtol=1e-5, atol=1e-5)


# ---- Expected Attention --------------------------------------------------------------------------

def _rope_tables(n_pos, d, base=10000.0, scaling=1.0):
    """HF's default RoPE: cos / sin (n_pos, d) of emb = cat(θ, θ), θ_i = base^(-2i/d)."""
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * torch.cat([theta, theta])[None]
    return torch.cos(ang) * scaling, torch.sin(ang) * scaling


def _rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def naive_expected_attention(q_pre, k, v, valid, queries, sink, covariance, vnorm, epsilon, future=None,
                             base=10000.0, scaling=1.0):
    """kvpress ExpectedAttentionPress, one row and one head at a time, in float64: the statistics of
    the pre-RoPE queries after the sinks (or the last `queries`), R̄ = the mean over the next `future`
    positions of cos·I + sin·P (P x = rotate_half(x)), built as matrices; `future=None`: no RoPE."""
    B, Hq, n, d = q_pre.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    out = torch.full((B, Hkv, n), -math.inf, dtype=torch.float64)
    P = torch.zeros(d, d, dtype=torch.float64)
    P[d // 2:, :d // 2], P[:d // 2, d // 2:] = torch.eye(d // 2), -torch.eye(d // 2)
    for b in range(B):
        idx = [j for j in range(n) if valid[b, j]]
        used = idx[sink:] if queries is None else idx[-queries:]
        scored = idx[sink:]
        R = torch.eye(d, dtype=torch.float64)
        if future is not None:
            cos, sin = _rope_tables(len(idx) + future, d, base, scaling)
            R = sum(torch.diag(cos[t]) + torch.diag(sin[t]) @ P for t in range(len(idx), len(idx) + future)) / future
        for hk in range(Hkv):
            acc = {j: 0.0 for j in idx}
            for hq in range(hk * g, (hk + 1) * g):
                Q = torch.stack([q_pre[b, hq, i].double() for i in used])
                mu = Q.mean(0)
                sigma = (Q - mu).T @ (Q - mu) / len(used)
                mu, sigma = R @ mu, R @ sigma @ R.T
                z = {}
                for j in scored:
                    kj = k[b, hk, j].double()
                    z[j] = float(mu @ kj) / math.sqrt(d) + (0.5 * float(kj @ sigma @ kj) / d if covariance else 0)
                m = max(z.values())
                e = {j: math.exp(x - m) for j, x in z.items()}
                s = sum(e.values())
                for j in scored:
                    acc[j] += e[j] / s / g
            for j in idx:
                val = acc[j] + epsilon
                out[b, hk, j] = val * (float(v[b, hk, j].double().norm()) if vnorm else 1.0)
    return out


def _ea_inputs(seed=3, B=2, Hkv=2, gq=3, n=24, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * gq, n, d, generator=g)
    k = torch.randn(B, Hkv, n, d, generator=g)
    v = torch.randn(B, Hkv, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[0, :5] = False  # a left-padded row
    return q, k, v, valid


@pytest.mark.parametrize("covariance,vnorm,epsilon,queries", [(True, True, 0.0, None), (False, True, 0.01, 5),
                                                               (True, False, 0.0, 7)])
def test_expected_attention_without_rope_matches_definition(covariance, vnorm, epsilon, queries):
    """A site without rotary embeddings: the queries are the statistics' queries, R̄ = I."""
    q, k, v, valid = _ea_inputs()
    got = expected_attention_scores(q, k, v, valid, queries=queries, sink=4, covariance=covariance,
                                    vnorm=vnorm, epsilon=epsilon)
    want = naive_expected_attention(q, k, v, valid, queries, 4, covariance, vnorm, epsilon)
    m = valid[:, None].expand_as(got)
    torch.testing.assert_close(got[m].double(), want[m], rtol=1e-4, atol=1e-6)
    assert torch.isinf(got[~m]).all()


@pytest.mark.parametrize("scaling,future,base", [(1.0, 512, 10000.0), (1.3, 37, 100.0)])
def test_expected_attention_with_rope_matches_kvpress_definition(scaling, future, base):
    """The paper's method as kvpress runs it: the scorer gets post-RoPE queries and keys and the
    site's cos / sin (HF layout (B, 1, n, d), positions counted from each row's first real token,
    scaled by an attention_scaling), and equals the float64 loop over pre-RoPE queries with the
    RoPE matrix averaged over the next `future` positions."""
    q_pre, k_pre, v, valid = _ea_inputs(seed=5, d=16)
    B, _, n, d = q_pre.shape
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)                     # HF generate's position ids
    cos_t, sin_t = _rope_tables(n, d, base, scaling)
    cos, sin = cos_t[pos][:, None].float(), sin_t[pos][:, None].float()  # (B, 1, n, d)
    q = (q_pre * cos + _rot(q_pre) * sin).float()
    k = (k_pre * cos + _rot(k_pre) * sin).float()
    got = expected_attention_scores(q, k, v, valid, future=future, sink=4, rope=(cos, sin))
    # kvpress: pre-RoPE query statistics (its rotary_emb scales R̄, so the scale rides along)
    want = naive_expected_attention(q_pre * scaling, k, v, valid, None, 4, True, True, 0.0, future=future,
                                    base=base)
    m = valid[:, None].expand_as(got)
    torch.testing.assert_close(got[m].double(), want[m], rtol=2e-4, atol=1e-6)
    # reading the RoPE changes the ranking: without it the scores differ
    plain = expected_attention_scores(q, k, v, valid, future=future, sink=4)
    assert not torch.allclose(plain[m], got[m], rtol=1e-2, atol=1e-4)


# ---- ChunkKV -------------------------------------------------------------------------------------

def test_chunk_scores_match_definition_and_keep_whole_chunks():
    g = torch.Generator().manual_seed(5)
    B, H, n, c = 2, 3, 23, 4
    s = torch.randn(B, H, n, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :3] = False
    got = chunk_scores(s.masked_fill(~valid[:, None], float("-inf")), valid, c)
    for b in range(B):
        idx = [j for j in range(n) if valid[b, j]]
        for start in range(0, len(idx), c):
            members = idx[start:start + c]
            want = sum(float(s[b, :, j].sum()) for j in members) / len(members)
            for j in members:
                assert got[b, :, j].tolist() == pytest.approx([want] * H, rel=1e-5)
    # through the compressor: with sink 0 / window 0 and a budget of whole chunks, whole chunks stay
    lp = load_policy({"kvfx": 1, "name": "ck", "budget": {"tokens": 8, "sink": 0, "window": 0},
                      "eviction": {"scorer": "knorm", "chunk": 4}}).resolve(0, "m", 1)
    comp = build_compressor(lp)
    k = torch.randn(1, 2, 40, 8, generator=g)
    store = SiteStore("t")
    valid = torch.ones(1, 40, dtype=torch.bool)
    comp.prefill(store, torch.randn(1, 2, 40, 8), k, k.clone(), valid, 8 ** -0.5)
    budget = int(comp.budget(valid.sum(-1)))
    assert budget == registry.MIN_BUDGET  # tokens 8 < the floor of 16
    for h in range(2):
        kept = store.pos[0, h, :int(store.count[0, h])].tolist()
        assert len(kept) == budget and all(sum(1 for j in kept if j // 4 == cid) == 4 for cid in {j // 4 for j in kept})
    assert store.pos[0, 0, :budget].tolist() == store.pos[0, 1, :budget].tolist()  # same chunks per head


# ---- budgets and caps ----------------------------------------------------------------------------

def _prefill(policy, n, *, steps=0, d=8, Hkv=2, g=2):
    lp = load_policy(policy).resolve(3, "model.layers.3.self_attn", 8)
    comp = build_compressor(lp, 3, 8)
    store = SiteStore("t")
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, Hkv * g, n, d, generator=gen)
    k = torch.randn(1, Hkv, n, d, generator=gen)
    valid = torch.ones(1, n, dtype=torch.bool)
    comp.prefill(store, q, k, k.clone(), valid, d ** -0.5)
    store.seen = n
    max_cap = store.capacity
    for t in range(steps):
        kk = torch.randn(1, Hkv, 1, d, generator=gen)
        store.append(kk, kk.clone(), torch.tensor([n + t]))
        probs = torch.softmax(torch.randn(1, Hkv * g, 1, store.length, generator=gen), -1)
        comp.after_decode(store, 1, probs)
        store.seen += 1
        max_cap = max(max_cap, store.capacity)
    return store, max_cap


@pytest.mark.parametrize("policy", ["h2o", "tova", "streaming", "snapkv", "knorm", "keydiff", "expected-attention"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_short_prompts_are_kept_and_caches_grow_to_the_floor(policy, n):
    """A 1-7 token prompt is kept whole, and a rolling cache (h2o, tova) grows to at least
    MIN_BUDGET tokens before it evicts, instead of holding round(keep * n) (0 or 1) tokens."""
    store, _ = _prefill(policy, n, steps=30)
    held = int(store.count.min())
    assert held >= min(n + 30, registry.MIN_BUDGET)


@pytest.mark.parametrize("policy,cap", [({"kvfx": 1, "name": "mt", "extends": "snapkv",
                                          "budget": {"max_tokens": 96}}, 96),
                                        ({"kvfx": 1, "name": "mt2", "eviction": {"scorer": "keydiff"},
                                          "budget": {"keep": 0.25, "max_tokens": 40}}, 40),
                                        ("h2o@0.25", None)])
@pytest.mark.parametrize("n", [20, 60, 200])
def test_a_rolling_cap_bounds_the_allocation(policy, cap, n):
    """max_tokens is the most slots a store ever allocates, plus one decode step."""
    store, max_cap = _prefill(policy, n, steps=120)
    bound = cap if cap is not None else max(round(0.25 * n), registry.MIN_BUDGET)
    assert int(store.count.max()) <= bound
    assert max_cap <= bound + 1, (max_cap, bound)


# ---- policy checks without a model -----------------------------------------------------------------

@pytest.mark.parametrize("doc,key", [
    ({"extends": "kivi2", "eviction": {"scorer": "h2o"}, "budget": {"keep": 0.25}}, "eviction.scorer"),
    ({"extends": "kivi2", "eviction": {"scorer": "streaming"}}, "eviction.scorer"),
    ({"extends": "kivi2", "eviction": {"scorer": "snapkv"}, "budget": {"keep": 0.25, "max_tokens": 96}},
     "budget.max_tokens"),
    ({"extends": "kivi2", "eviction": {"scorer": "tova"}, "budget": {"keep": 0.25}}, "eviction.scorer"),
    ({"extends": "snapkv", "eviction": {"scorer": "streaming", "chunk": 20}}, "eviction.chunk"),
])
def test_validate_refuses_what_no_store_can_run(tmp_path, doc, key):
    path = tmp_path / "p.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"kvfx": 1, "name": "p", **doc}, sort_keys=False))
    with pytest.raises(PolicyError) as info:
        load_policy(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}:") and f" {key}: got" in msg and "\n" not in msg, msg
    assert info.value.line is not None


def test_quant_store_caps_are_the_registry_table():
    assert QuantStore.CAPS == registry.STORE_CAPS["quantized"]
    assert SiteStore.CAPS == registry.STORE_CAPS["dense"]


def test_name_at_keep_everywhere():
    assert load_policy("keydiff@0.125").resolve(3, "m", 8).budget.keep == 0.125
    assert load_policy("chunkkv@0.5").resolve(3, "m", 8).eviction.chunk == 20
