"""The head-wise ragged store (kvfx.runtime.ragged): segments hold exactly what a dense per-head
store would, its pool is sized by the sum over heads, and AdaKV end to end on a tiny GQA model:
left padding, each row alone, the same logits as the dense store holding the same tokens, bytes
held = the per-head budgets + headroom + fixed overhead, below the dense store's."""

import copy

import pytest
import torch
import torch._dynamo.utils as dutils
from hypothesis import given, settings
from hypothesis import strategies as st

import kvfx
import kvfx.runtime.ops as ops
from kvfx.runtime.ragged import RaggedStore
from kvfx.runtime.state import sequences_of_cache
from kvfx.runtime.store import SiteStore
from zoo import hf_model


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 12), st.lists(st.integers(1, 40), min_size=1,
       max_size=6), st.integers(0, 2**16))
def test_segments_hold_what_a_dense_store_holds(B, H, m, steps, seed):
    """write_kept then appends of 1..40 tokens (crossing growth): every segment holds its kept
    tokens then the appended ones, positions included; the pool is sized by the sum over heads."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(0, m + 1, (B, H), generator=g)
    d = 4
    k = torch.randn(B, H, m, d, generator=g)
    pos = torch.arange(m).expand(B, H, m).masked_fill(torch.arange(m) >= count[..., None], -1)
    s = RaggedStore("t")
    s.write_kept(k, -k, pos, count, m + 1)
    want = {(b, h): [(k[b, h, j].tolist(), j) for j in range(int(count[b, h]))] for b in range(B) for h in range(H)}
    assert s.capacity == int(count.sum()) + B * H  # one slot of headroom per segment
    p = m
    for q in steps:
        new = torch.randn(B, H, q, d, generator=g)
        s.append(new, -new, torch.arange(p, p + q))
        for b in range(B):
            for h in range(H):
                want[b, h] += [(new[b, h, j].tolist(), p + j) for j in range(q)]
        p += q
    assert torch.equal(s.count, count + sum(steps))
    assert s.capacity == int(s.count.sum()) + s.slack * B * H  # the sum over heads, + headroom
    positions = s.positions()
    for (b, h), toks in want.items():
        a = int(s.start[b, h])
        n = len(toks)
        assert s.k[a:a + n].tolist() == [t for t, _ in toks]
        assert (-s.v[a:a + n]).tolist() == [t for t, _ in toks]
        assert positions[b, h, :n].tolist() == [j for _, j in toks]
        assert bool((positions[b, h, n:] == -1).all())
    assert bool((s.start.reshape(-1).diff() >= 0).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**16))
def test_write_selection_equals_write_kept(B, H, n, seed):
    """Selecting straight into the pool gives the same store as the dense select+gather then
    write_kept (pads, per-head budgets)."""
    from kvfx.methods.select import priority, select_gather_reference

    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, n, generator=g) > 0.2
    prio = priority(torch.randn(B, H, n, generator=g), valid, sink=1, window=1, kv_heads=H)
    budget = torch.minimum(torch.randint(0, n + 1, (B, H), generator=g), valid.sum(-1, keepdim=True))
    k = torch.randn(B, H, n, 8, generator=g)
    a, b = RaggedStore("a"), RaggedStore("b")
    a.write_selection(prio, budget, k, -k)
    m = int(budget.max())
    kk, vv, pos, count = select_gather_reference(prio, budget, k, -k, m)
    b.write_kept(kk, vv, pos, count, m + 1)
    for name in ("k", "v", "pos", "start", "count"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.length, a.slack) == (b.length, b.slack)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 10), st.integers(1, 25), st.integers(0, 2**16))
def test_per_head_eviction_matches_the_dense_store(B, H, m, steps, seed):
    """Appends of one token, then each segment over its cap drops a random victim (the last slot
    moves into it): the ragged store and the dense store fed the same steps hold the same tokens,
    positions and per-slot state in the same slots, the pool never grows (headroom restored at the
    cap), and the padded views agree."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(0, m + 1, (B, H), generator=g)
    extra = torch.randint(0, 4, (B,), generator=g)
    cap = (count + extra[:, None]).clamp(min=1)
    d = 4
    k = torch.randn(B, H, m, d, generator=g)
    pos = torch.arange(m).expand(B, H, m).masked_fill(torch.arange(m) >= count[..., None], -1)
    r, s = RaggedStore("r"), SiteStore("s")
    slack = int((cap - count).clamp(min=0).max()) + 1
    for st_ in (r, s):
        st_.write_kept(k, -k, pos, count, m + slack)
        st_.set_caps(cap, torch.zeros(B, H, dtype=torch.long))
        st_.add_slot_state("score", pos.double())
    P = r.capacity
    for t in range(steps):
        new = torch.randn(B, H, 1, d, generator=g)
        for st_ in (r, s):
            st_.append(new, -new, torch.tensor([m + t]))
            st_.seen = m + t + 1
        n = r.length
        assert n == s.length
        victim = (torch.rand(B, H, generator=g) * r.count.clamp(min=1)).long()
        over = r.count > cap
        for st_ in (r, s):
            st_.add_to_slot_state("score", torch.ones(B, H, n, dtype=torch.float64))
            st_.evict(victim, over)
        r.slack = max(r.slack, r.cap_headroom)
        r.length = s.length = min(n, r.host_cap)
        assert torch.equal(r.count, s.count) and bool((r.count <= cap).all())
        for name in ("k", "v", "pos", "score"):
            assert torch.equal(r.slot_view(name, r.length), s.slot_view(name, s.length).masked_fill(
                (torch.arange(s.length) >= s.count[..., None]).view(B, H, -1, *(1,) * (name in "kv")),
                -1 if name == "pos" else 0)), name
    assert r.capacity == P  # no growth: each segment's headroom at its cap is restored every step
    kk, vv = r.tokens_at(torch.zeros(B, H, 1, dtype=torch.long))
    assert torch.equal(kk, s.tokens_at(torch.zeros(B, H, 1, dtype=torch.long))[0])


PROMPTS = (300, 260)
STEPS = 40  # crosses the headroom once (1 slot after prefill, then 64 per segment)


def _prompts():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 90, (n,), generator=g) for n in PROMPTS]
    L = max(PROMPTS)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
    return rows, ids, mask


def _generate(model, policy, ids, mask):
    model = copy.deepcopy(model)
    model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1), out


@pytest.fixture(scope="module")
def runs():
    torch._dynamo.reset()
    model = hf_model("llama", "sdpa", layers=2)  # GQA 4:2, head dim 16
    rows, ids, mask = _prompts()
    dutils.counters.clear()
    ragged = _generate(model, "adakv-snapkv", ids, mask)
    graphs = dutils.counters["stats"]["unique_graphs"]
    alone = [_generate(model, "adakv-snapkv", r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows]
    with pytest.MonkeyPatch.context() as mp:  # the same allocation held by the dense store
        mp.setattr(ops, "RaggedStore", SiteStore)
        dense = _generate(model, "adakv-snapkv", ids, mask)
    uniform = _generate(model, "snapkv", ids, mask)
    return dict(model=model, rows=rows, ragged=ragged, alone=alone, dense=dense, uniform=uniform, graphs=graphs)


def _stores(out):
    (seq,) = sequences_of_cache(out.past_key_values)
    return list(seq.stores.values())


def test_rows_alone_and_dense_store_agree(runs):
    tokens, logits, out = runs["ragged"]
    assert torch.isfinite(logits).all()
    assert all(isinstance(s, RaggedStore) for s in _stores(out))
    assert runs["graphs"] <= 3  # no per-step recompiles (growth included)
    for b, r in enumerate(runs["rows"]):
        t_alone, l_alone, _ = runs["alone"][b]
        assert torch.equal(tokens[b], t_alone[0]), f"row {b}: greedy tokens differ from the row alone"
        torch.testing.assert_close(logits[b], l_alone[0], atol=1e-5, rtol=1e-5)
    d_tokens, d_logits, d_out = runs["dense"]
    assert all(isinstance(s, SiteStore) for s in _stores(d_out))
    torch.testing.assert_close(logits, d_logits, atol=1e-5, rtol=1e-5)
    # AdaKV really changed something (else the comparisons above would prove little)
    assert (logits - runs["uniform"][1]).abs().max() > 1e-3


def test_bytes_held_are_the_per_head_budgets(runs):
    """held = (Σ_h kept_h + headroom) · (key + value + position bytes) + start/count/seen_valid;
    the per-head kept counts sum to the uniform total H · budget; fewer bytes than the dense store
    with the same allocation (max head × heads) and than uniform SnapKV."""
    _, _, out = runs["ragged"]
    B = len(PROMPTS)
    mem = kvfx.memory(out.past_key_values)
    snap = _stores(runs["uniform"][2])
    for st_, u in zip(_stores(out), snap):
        H = st_.kv_heads
        d, dv = st_.head_dims()
        kept = st_.count - STEPS  # the prompt's kept tokens per (row, head)
        budget = u.count[:, 0] - STEPS  # uniform SnapKV's per-head budget of each row
        assert torch.equal(kept.sum(1), H * budget)  # AdaKV keeps the uniform total
        assert len(set(kept.reshape(-1).tolist())) > 1  # heads differ
        P = int(st_.count.sum()) + st_.slack * B * H
        assert st_.capacity == P
        fixed = 2 * B * H * 8 + B * 8  # start, count (int64), seen_valid
        assert st_.held_bytes() == P * (d + dv) * st_.dtype.itemsize + P * 8 + fixed
        # the dense layout of the same tokens and headroom: the longest head's slots in every head
        assert P < B * H * (int(st_.count.max()) + st_.slack)
    site_bytes = [s["held_bytes"] for s in mem["sites"].values()]
    assert site_bytes == [s.held_bytes() for s in _stores(out)]
    dense_mem = kvfx.memory(runs["dense"][2].past_key_values)
    assert mem["held_bytes"] < dense_mem["held_bytes"], (mem["held_bytes"], dense_mem["held_bytes"])
    assert mem["held_bytes"] < kvfx.memory(runs["uniform"][2].past_key_values)["held_bytes"]


def test_prompt_chunks_refused_with_reason():
    model = hf_model("llama", "sdpa", layers=1)
    model.compile(backend="kvfx", options={"policy": "adakv-snapkv", "inner": "eager"})
    ids = torch.randint(1, 90, (1, 200), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match=r"head-wise budgets \(budget.allocation: adaptive\)"):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, prefill_chunk_size=64)


def test_calidrop_with_head_wise_budgets():
    """CaliDrop over AdaKV: the evicted partition of each head is its own (per-head counts); rows of
    a padded batch equal their runs alone, logits equal the dense store holding the same tokens with
    the same CaliDrop state, and the state is counted."""
    pol = {"kvfx": 1, "name": "ada-cd", "extends": "adakv-snapkv", "calibration": {"threshold": 0.5}}
    model = hf_model("llama", "sdpa", layers=2)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 90, (n,), generator=g) for n in (200, 150)]
    ids = torch.zeros(2, 200, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, 200 - len(r):], mask[b, 200 - len(r):] = r, 1
    torch._dynamo.reset()
    tokens, logits, out = _generate(model, pol, ids, mask)
    assert all(isinstance(s, RaggedStore) and s.calib is not None for s in _stores(out))
    assert kvfx.memory(out.past_key_values)["sites"] and all(
        s["calib_bytes"] > 0 for s in kvfx.memory(out.past_key_values)["sites"].values())
    for b, r in enumerate(rows):
        t_alone, l_alone, _ = _generate(model, pol, r[None], torch.ones(1, len(r), dtype=torch.long))
        assert torch.equal(tokens[b], t_alone[0])
        torch.testing.assert_close(logits[b], l_alone[0], atol=1e-5, rtol=1e-5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "RaggedStore", SiteStore)
        d_tokens, d_logits, _ = _generate(model, pol, ids, mask)
    torch.testing.assert_close(logits, d_logits, atol=1e-5, rtol=1e-5)
    plain = _generate(model, "adakv-snapkv", ids, mask)[1]
    assert (logits - plain).abs().max() > 1e-4  # calibration changed the output


def test_softcapped_sites_refuse_head_wise_budgets():
    """The soft-capped path reads a dense store: the pass refuses AdaKV there (check_policy)."""
    from kvfx.policy import load_policy
    from kvfx.runtime.compressor import build_compressor
    from kvfx.runtime.softcap import check_policy

    assert check_policy(build_compressor(load_policy("adakv-snapkv").resolve(0, "m", 1))) == \
        "a head-wise ragged store (budget.allocation: adaptive)"
    assert check_policy(build_compressor(load_policy("snapkv").resolve(0, "m", 1))) == ""


ROLLING = {  # AdaKV over rolling caches: each head rolls at its own allocation
    "h2o": {"extends": "h2o"},                                              # accumulated scores
    "tova": {"extends": "tova"},                                            # the step's attention
    "snapkv-max": {"extends": "snapkv", "budget": {"max_tokens": 90}},      # oldest first, grows first
    "knorm-max": {"budget": {"keep": 0.25, "max_tokens": 70}, "eviction": {"scorer": "knorm"}},  # key norms
    "snapkv-calidrop-max": {"extends": "snapkv-calidrop", "budget": {"max_tokens": 80}},  # folds evictions
}
# On this random tiny model H2O's column sums rank the same early tokens first in both KV heads, so
# AdaKV splits every layer's budget evenly: there the run must equal uniform H2O exactly (the dense
# store's own rolling path), a cross-check of the per-head caps and decode scores.
EVEN_SPLIT = {"h2o"}


@pytest.mark.parametrize("name", sorted(ROLLING))
def test_rolling_caps_evict_per_head(name):
    """Rolling eviction per head in the ragged store: the same tokens and logits as the dense store
    holding the same allocation (an independent layout of the same per-head eviction), padded rows
    equal their runs alone, every head ends at its own cap (they sum to the uniform cap), the pool
    never grew during decode, and AdaKV changed the output (or, where it split evenly, equals the
    uniform policy)."""
    base = ROLLING[name]
    ada = {"kvfx": 1, "name": f"ada-{name}", **base,
           "budget": {**base.get("budget", {}), "allocation": "adaptive", "safeguard": 0.2}}
    uni = {"kvfx": 1, "name": f"uni-{name}", **base}
    torch._dynamo.reset()
    model = hf_model("llama", "sdpa", layers=2)
    rows, ids, mask = _prompts()
    with torch._dynamo.config.patch(recompile_limit=64):  # six compiled copies of one model class
        dutils.counters.clear()
        tokens, logits, out = _generate(model, ada, ids, mask)
        assert dutils.counters["stats"]["unique_graphs"] <= 3
        stores = _stores(out)
        u_logits, u_out = _generate(model, uni, ids, mask)[1:]
        u_stores = _stores(u_out)
        alone = [_generate(model, ada, r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops, "RaggedStore", SiteStore)
            d_tokens, d_logits, d_out = _generate(model, ada, ids, mask)
        d_stores = _stores(d_out)
    assert all(isinstance(s, RaggedStore) for s in stores) and all(isinstance(s, SiteStore) for s in d_stores)
    even = True
    for s, u in zip(stores, u_stores):
        cap = s.extra["cap"]
        assert torch.equal(s.count, cap), "every head rolls at its own cap after 40 steps"
        assert torch.equal(cap.sum(1), u.extra["cap"].sum(1)), "a row's caps sum to the uniform cap"
        even = even and torch.equal(cap, u.extra["cap"])
        assert s.cap_headroom == 1, "the pool never grew (growth adds >= 64 slots of headroom)"
        newest = out.sequences.shape[1] - 2  # the last token fed to the model
        assert bool((s.positions().max(-1).values == newest).all()), "the newest token is held"
        if s.calib is not None:
            assert s.calib_bytes() > 0
    assert even == (name in EVEN_SPLIT), "AdaKV's per-head caps differ from the uniform ones"
    for b, (t_alone, l_alone, _) in enumerate(alone):
        assert torch.equal(tokens[b], t_alone[0]), f"row {b}: greedy tokens differ from the row alone"
        torch.testing.assert_close(logits[b], l_alone[0], atol=1e-5, rtol=1e-5)
    for s, d in zip(stores, d_stores):
        assert torch.equal(s.count, d.count)
        got = s.positions().sort(-1).values
        want = d.pos[:, :, :d.length].sort(-1).values
        n = min(got.shape[-1], want.shape[-1])
        assert torch.equal(got[..., -n:], want[..., -n:]), "the same tokens held per head"
    assert torch.equal(tokens, d_tokens), "the ragged store's greedy tokens differ from the dense store's"
    torch.testing.assert_close(logits, d_logits, atol=1e-5, rtol=1e-5)
    if even:
        torch.testing.assert_close(logits, u_logits, atol=1e-5, rtol=1e-5)
    else:
        assert (logits - u_logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["tova", "snapkv-max"])
def test_rolling_caps_with_interleaved_sequences(name):
    """Two sequences decoded alternately through one compiled model, each with its own cache, roll
    their heads' caps independently: each gives the logits of its run alone (state belongs to the
    sequence, DESIGN rule 7), and the two sequences' heads end at different allocations."""
    from transformers import DynamicCache

    base = ROLLING[name]
    ada = {"kvfx": 1, "name": f"ada-{name}", **base,
           "budget": {**base.get("budget", {}), "allocation": "adaptive", "safeguard": 0.2}}
    torch._dynamo.reset()
    model = hf_model("llama", "sdpa", layers=2)
    model.compile(backend="kvfx", options={"policy": ada, "inner": "eager"})
    rows = _prompts()[0]

    def step(ids, cache):
        with torch.no_grad():
            return model(input_ids=ids, use_cache=True, past_key_values=cache).logits[:, -1]

    def alone(r):
        cache = DynamicCache(config=model.config)
        out = [step(r[None], cache)]
        for _ in range(STEPS):
            out.append(step(out[-1].argmax(-1, keepdim=True), cache))
        return torch.stack(out, 1), cache

    refs = [alone(r)[0] for r in rows]
    caches = [DynamicCache(config=model.config) for _ in rows]
    logits = [[step(r[None], c)] for r, c in zip(rows, caches)]
    for _ in range(STEPS):
        for lg, c in zip(logits, caches):
            lg.append(step(lg[-1].argmax(-1, keepdim=True), c))
    for lg, ref in zip(logits, refs):
        torch.testing.assert_close(torch.stack(lg, 1), ref, rtol=0, atol=0)
    caps = []
    for c in caches:
        (seq,) = sequences_of_cache(c)
        store = next(iter(seq.stores.values()))
        assert isinstance(store, RaggedStore), type(store)
        cap = store.extra["cap"]
        assert torch.equal(store.count.reshape(cap.shape), cap)  # every head rolled at its own cap
        caps.append(cap.clone())
    assert not torch.equal(caps[0], caps[1]), caps  # each sequence its own split of the layer's budget
