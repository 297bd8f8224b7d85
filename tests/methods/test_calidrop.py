"""CaliDrop (kvfx.methods.calidrop) against its definition: exact partition merge, exact folds,
the logits path, the nearest-query lookup, the tangent bound and the recompute tier."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfx.methods import calidrop as cd
from kvfx.methods.attention import decode_attention_reference

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INF = float("inf")


@st.composite
def cases(draw):
    return dict(B=draw(st.integers(1, 2)), Hkv=draw(st.integers(1, 2)), g=draw(st.sampled_from([1, 2, 4])),
                n=draw(st.integers(1, 40)), c=draw(st.integers(1, 8)), d=draw(st.sampled_from([4, 8, 16])),
                p_evict=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
                adjust=draw(st.sampled_from(cd.ADJUSTS)), seed=draw(st.integers(0, 2**16)))


def _data(c, dtype=torch.float64):
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hkv, Hq, n, d = c["B"], c["Hkv"], c["Hkv"] * c["g"], c["n"], c["d"]
    q_win = torch.randn(B, Hq, c["c"], d, generator=gen, dtype=dtype)
    k = torch.randn(B, Hkv, n, d, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv, n, d, generator=gen, dtype=dtype)
    evicted = torch.rand(B, Hkv, n, generator=gen) < c["p_evict"]
    return q_win, k, v, evicted, gen


def _naive_partition(q, k, v, ok, scale):
    """Per query head, loops, float64: (LSE_E, O_E, G_E) of q (d,) over the keys with ok (n,)."""
    s = [scale * float(q @ k[j]) for j in range(k.shape[0]) if ok[j]]
    if not s:
        zero = torch.zeros(k.shape[1], dtype=torch.float64)
        return -INF, torch.zeros(v.shape[1], dtype=torch.float64), zero
    lse = math.log(sum(math.exp(x - max(s)) for x in s)) + max(s)
    idx = [j for j in range(k.shape[0]) if ok[j]]
    w = torch.tensor([math.exp(x - lse) for x in s], dtype=torch.float64)
    return lse, w @ v[idx].double(), scale * (w @ k[idx].double())


def _kept_attention(q, k, v, kept, scale, calib=None):
    """Attention of q (B, Hq, 1, d) over the kept tokens only (a -inf bias masks the others)."""
    B, Hkv, n, _ = k.shape
    bias = torch.zeros(B, Hkv, n, dtype=torch.float32).masked_fill(~kept, -INF)
    lengths = torch.full((B, Hkv), n, dtype=torch.int32)
    return decode_attention_reference(q, k, v, lengths, scale=scale, bias=bias, calib=calib)


@SETTINGS
@given(cases(), st.data())
def test_merge_with_a_stored_query_is_full_attention(c, data):
    """q_t = q_i (sim = 1): the calibrated output is attention over kept ∪ evicted, to round-off."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        q_win, k, v, evicted, _ = _data(c, dtype)
        scale = c["d"] ** -0.5
        state = cd.build_state(q_win, k, v, evicted, scale=scale, adjust=c["adjust"])
        i = data.draw(st.integers(0, c["c"] - 1), label="stored row")
        q_t = q_win[:, :, i:i + 1]
        o_e, lse_e, sim, use = cd.lookup(state, q_t, 0.9, adjust=c["adjust"])
        assert use.all() and (sim > 1 - 1e-5).all()
        full_o, full_lse = decode_attention_reference(q_t, k, v, torch.full(k.shape[:2], c["n"]), scale=scale)
        o_c, lse_c = _kept_attention(q_t, k, v, ~evicted, scale)
        o, lse = cd.merge(o_c, lse_c, o_e, lse_e, use)
        torch.testing.assert_close(o, full_o, rtol=tol, atol=tol)
        torch.testing.assert_close(lse, full_lse, rtol=tol, atol=tol)
        # The reference decode path's calib= merges the same partition before rounding.
        o2, lse2 = _kept_attention(q_t, k, v, ~evicted, scale, calib=(o_e, lse_e, use))
        torch.testing.assert_close(o2, full_o, rtol=tol, atol=tol)
        torch.testing.assert_close(lse2, full_lse, rtol=tol, atol=tol)


@SETTINGS
@given(cases())
def test_build_state_matches_the_definition(c):
    q_win, k, v, evicted, _ = _data(c)
    scale = c["d"] ** -0.5
    state = cd.build_state(q_win, k, v, evicted, scale=scale, adjust="tangent")
    g = c["g"]
    for b in range(c["B"]):
        for h in range(c["Hkv"] * g):
            for i in range(c["c"]):
                kv = h // g
                lse, o, grad = _naive_partition(q_win[b, h, i], k[b, kv], v[b, kv], evicted[b, kv], scale)
                assert state.lse_e[b, h, i].item() == pytest.approx(lse, abs=1e-10)
                torch.testing.assert_close(state.o_e[b, h, i], o, rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(state.lse_grad[b, h, i], grad, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(cases())
def test_build_state_from_logits_equals_build_state(c):
    q_win, k, v, evicted, gen = _data(c, torch.float32)
    scale = c["d"] ** -0.5
    g, Hq = c["g"], c["Hkv"] * c["g"]
    logits = torch.einsum("bhid,bhjd->bhij", q_win, k.repeat_interleave(g, 1)) * scale
    # Positions that are not evicted may hold anything (a causal mask, garbage).
    junk = torch.rand(logits.shape, generator=gen) < 0.5
    kept = ~evicted.repeat_interleave(g, 1)[:, :, None, :].expand_as(logits)
    logits = logits.masked_fill(kept & junk, float("nan")).masked_fill(kept & ~junk, -INF)
    q_valid = torch.rand(c["B"], c["c"], generator=gen) < 0.8
    want = cd.build_state(q_win, k, v, evicted, scale=scale, q_valid=q_valid, adjust=c["adjust"],
                          keep_evicted=True)
    got = cd.build_state_from_logits(q_win, logits, k, v, evicted, scale=scale, q_valid=q_valid,
                                     adjust=c["adjust"], keep_evicted=True)
    for a, b in zip(got.tensors(), want.tensors()):
        if a is None:
            assert b is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype and not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got.q_hist.shape == (c["B"], Hq, c["c"], c["d"])
    assert torch.equal(got.valid, q_valid[:, None, :].expand(c["B"], Hq, c["c"]))


@SETTINGS
@given(cases(), st.integers(0, 3))
def test_fold_equals_recomputation(c, steps):
    """Folding decode-time evictions (in `steps` batches, padded slots holding NaN) equals
    build_state over the union; the recompute store then holds exactly the union too."""
    q_win, k, v, evicted, gen = _data(c)
    scale = c["d"] ** -0.5
    later = (torch.rand(evicted.shape, generator=gen) < 0.5) & ~evicted
    state = cd.build_state(q_win, k, v, evicted, scale=scale, adjust=c["adjust"], keep_evicted=True)
    batch = torch.randint(0, max(steps, 1), later.shape, generator=gen)
    for s in range(steps):
        sel = later & (batch == s)
        k_e, v_e, ok = cd._compact_evicted(k, v, sel)
        k_e = k_e.masked_fill(~ok[..., None], float("nan"))
        v_e = v_e.masked_fill(~ok[..., None], float("nan"))
        state = cd.fold(state, k_e, v_e, ok, scale=scale)
    union = evicted | (later & (batch < steps))
    want = cd.build_state(q_win, k, v, union, scale=scale, adjust=c["adjust"])
    torch.testing.assert_close(state.lse_e, want.lse_e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.o_e, want.o_e, rtol=1e-10, atol=1e-10)
    if c["adjust"] == "tangent":
        torch.testing.assert_close(state.lse_grad, want.lse_grad, rtol=1e-10, atol=1e-10)
    assert torch.equal(state.evicted.count(), union.sum(-1)) and not state.evicted.tail_k.isnan().any()
    q_t = torch.randn(c["B"], q_win.shape[1], 1, c["d"], generator=gen, dtype=torch.float64)
    o_x, lse_x, _ = cd.recompute(state, q_t, scale=scale)
    o_w, lse_w = _kept_attention(q_t, k, v, union, scale)
    torch.testing.assert_close(o_x, o_w[:, :, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse_x, lse_w[:, :, 0], rtol=1e-10, atol=1e-10)


def test_fold_of_nothing_leaves_the_state_unchanged():
    q_win, k, v, evicted, _ = _data(dict(B=2, Hkv=2, g=2, n=12, c=4, d=8, p_evict=0.5, seed=1))
    state = cd.build_state(q_win, k, v, evicted, scale=0.3, adjust="tangent")
    junk = torch.full((2, 2, 3, 8), float("nan"), dtype=torch.float64)
    new = cd.fold(state, junk, junk, torch.zeros(2, 2, 3, dtype=torch.bool), scale=0.3)
    for a, b in zip(new.tensors(), state.tensors()):
        assert (a is None and b is None) or torch.equal(a, b)


@SETTINGS
@given(cases())
def test_lookup_picks_the_argmax_cosine(c):
    q_win, k, v, evicted, gen = _data(c)
    q_valid = torch.rand(c["B"], c["c"], generator=gen) < 0.7
    state = cd.build_state(q_win, k, v, evicted, scale=0.25, q_valid=q_valid)
    q_t = torch.randn(c["B"], q_win.shape[1], 1, c["d"], generator=gen, dtype=torch.float64)
    threshold = 0.2
    o_e, lse_e, sim, use = cd.lookup(state, q_t, threshold)
    for b in range(c["B"]):
        for h in range(q_win.shape[1]):
            cos = [float(q_t[b, h, 0] @ q_win[b, h, i] / (q_t[b, h, 0].norm() * q_win[b, h, i].norm()))
                   if q_valid[b, i] else -INF for i in range(c["c"])]
            best = max(range(c["c"]), key=lambda i: cos[i])
            assert sim[b, h].item() == pytest.approx(cos[best], abs=1e-12) or cos[best] == -INF == sim[b, h]
            assert bool(use[b, h]) == (cos[best] >= threshold)
            if cos[best] > -INF:
                assert torch.equal(o_e[b, h], state.o_e[b, h, best])
                assert lse_e[b, h] == state.lse_e[b, h, best]


@SETTINGS
@given(cases(), st.floats(0.0, 0.3))
def test_tangent_adjustment_is_a_lower_bound_and_second_order(c, eps):
    """LSE_E is convex in q: the tangent estimate never exceeds the true LSE_E(q_t), and its
    error is O(|δ|²): halving a small δ quarters it."""
    q_win, k, v, evicted, gen = _data(c)
    scale = c["d"] ** -0.5
    state = cd.build_state(q_win, k, v, evicted, scale=scale, adjust="tangent")
    q_0 = q_win[:, :, :1]
    r = torch.randn(q_0.shape, generator=gen, dtype=torch.float64)

    def err(q_t):  # true LSE_E(q_t) − the tangent estimate (-inf rows: E empty)
        true_lse = _kept_attention(q_t, k, v, evicted, scale)[1][:, :, 0]
        est = cd.lookup(state, q_t, -1.0, adjust="tangent")[1]
        finite = true_lse > -INF
        assert torch.equal(est > -INF, finite)
        return (true_lse - est)[finite]

    assert (err(q_0 * 1.1 + eps * r) >= -1e-9).all()
    e1, e2 = err(q_0 + 1e-3 * r), err(q_0 + 5e-4 * r)
    assert (e1 >= -1e-12).all()
    assert (e2 <= e1 / 4 * 1.05 + 1e-12).all() and (e2 >= e1 / 4 * 0.95 - 1e-12).all()


@SETTINGS
@given(cases())
def test_use_false_leaves_outputs_bit_identical(c):
    q_win, k, v, evicted, gen = _data(c, torch.float32)
    Hq = q_win.shape[1]
    q_t = torch.randn(c["B"], Hq, 1, c["d"], generator=gen)
    o_c, lse_c = _kept_attention(q_t, k, v, ~evicted, 0.3)
    o_e = torch.randn(c["B"], Hq, c["d"], generator=gen)
    lse_e = torch.randn(c["B"], Hq, generator=gen)
    use = torch.rand(c["B"], Hq, generator=gen) < 0.5
    o_e[~use] = float("nan")
    o, lse = cd.merge(o_c, lse_c, o_e, lse_e, use)
    o2, lse2 = _kept_attention(q_t, k, v, ~evicted, 0.3, calib=(o_e, lse_e, use))
    off = ~use[..., None]
    assert torch.equal(o.masked_select(off[..., None]), o_c.masked_select(off[..., None]))
    assert torch.equal(lse.masked_select(off), lse_c.masked_select(off))
    assert torch.equal(o2.masked_select(off[..., None]), o_c.masked_select(off[..., None]))
    assert torch.equal(lse2.masked_select(off), lse_c.masked_select(off))
    assert not o.isnan().any() and not o2.isnan().any()
    none = torch.zeros_like(use)
    assert all(torch.equal(a, b) for a, b in zip(cd.merge(o_c, lse_c, o_e, lse_e, none), (o_c, lse_c)))


def test_recompute_tier_inserts_the_exact_entry():
    c = dict(B=2, Hkv=2, g=2, n=30, c=4, d=8, p_evict=0.5, seed=3)
    q_win, k, v, evicted, gen = _data(c)
    scale = 8**-0.5
    q_valid = torch.tensor([[True] * 4, [False, True, True, True]])
    state = cd.build_state(q_win, k, v, evicted, scale=scale, q_valid=q_valid, adjust="tangent",
                           keep_evicted=True)
    q_t = torch.randn(2, 4, 1, 8, generator=gen, dtype=torch.float64)
    sims = cd.similarities(state, q_t)
    # Thresholds that put every head in the recompute tier.
    o_e, lse_e, use, new = cd.calibrate(state, q_t, scale=scale, threshold=1.0, recompute_threshold=-1.0,
                                        adjust="tangent")
    o_w, lse_w = _kept_attention(q_t, k, v, evicted, scale)
    assert use.all()
    torch.testing.assert_close(o_e, o_w[:, :, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse_e, lse_w[:, :, 0], rtol=1e-10, atol=1e-10)
    slot = sims.argmin(-1)
    assert (slot[1] == 0).all()  # the never-filled entry of batch 1 goes first
    for b in range(2):
        for h in range(4):
            i = int(slot[b, h])
            assert torch.equal(new.q_hist[b, h, i], q_t[b, h, 0]) and new.valid[b, h, i]
            others = [j for j in range(4) if j != i]
            assert torch.equal(new.o_e[b, h, others], state.o_e[b, h, others])
    # The same query is now matched exactly by the first tier.
    o2, lse2, sim2, use2 = cd.lookup(new, q_t, 0.99, adjust="tangent")
    assert use2.all()
    torch.testing.assert_close(o2, o_w[:, :, 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse2, lse_w[:, :, 0], rtol=1e-10, atol=1e-10)
    # Above the threshold nothing is recomputed or inserted; below recompute_threshold nothing either.
    o3, lse3, use3, same = cd.calibrate(new, q_t, scale=scale, threshold=0.99, recompute_threshold=0.5)
    assert use3.all() and torch.equal(same.q_hist, new.q_hist) and torch.equal(same.o_e, new.o_e)
    far = -q_t  # cosine -1 with the inserted entry, < 0.98 with the random others
    assert (cd.similarities(new, far).amax(-1) < 0.98).all()
    _, _, use4, same4 = cd.calibrate(new, far, scale=scale, threshold=0.99, recompute_threshold=0.98)
    assert not use4.any() and torch.equal(same4.valid, new.valid) and torch.equal(same4.q_hist, new.q_hist)


def test_nbytes_counts_every_tensor():
    case = dict(B=1, Hkv=2, g=2, n=20, c=4, d=16, p_evict=0.5, seed=0)
    q_win, k, v, evicted, _ = _data(case, torch.float32)
    plain = cd.build_state(q_win.half(), k, v, evicted, scale=0.25)
    Hq, c, d = 4, 4, 16
    assert plain.nbytes() == Hq * c * (d * 2 + d * 4 + 4 + 1)  # fp16 queries, fp32 O_E and LSE_E, bool valid
    tangent = cd.build_state(q_win.half(), k, v, evicted, scale=0.25, adjust="tangent")
    assert tangent.nbytes() == plain.nbytes() + Hq * c * d * 4
    full = cd.build_state(q_win.half(), k, v, evicted, scale=0.25, keep_evicted=True)
    m = int(evicted.sum(-1).max())
    assert full.nbytes() == plain.nbytes() + 2 * (2 * m * d * 4) + 2 * m


@pytest.mark.parametrize("kwargs, match", [
    (dict(history=0), r"CaliDrop.history: got 0, expected an int >= 1"),
    (dict(threshold=1.5), r"CaliDrop.threshold: got 1.5, expected a cosine in \[-1, 1\]"),
    (dict(recompute_threshold=0.95),
     r"recompute_threshold: got 0.95, expected a cosine in \[-1, threshold=0.9\)"),
    (dict(adjust="mean"), r"adjust got 'mean', expected one of none, tangent"),
])
def test_calidrop_parameters_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cd.CaliDrop(**kwargs)


def test_errors_name_the_fix():
    q_win, k, v, evicted, _ = _data(dict(B=1, Hkv=1, g=1, n=6, c=2, d=4, p_evict=0.5, seed=0))
    state = cd.build_state(q_win, k, v, evicted, scale=0.5)
    with pytest.raises(ValueError, match="needs a state built with adjust='tangent'"):
        cd.lookup(state, q_win[:, :, :1], 0.9, adjust="tangent")
    with pytest.raises(ValueError, match="keep_evicted=True"):
        cd.recompute(state, q_win[:, :, :1], scale=0.5)
    with pytest.raises(ValueError, match=r"logits has shape \(1, 1, 2, 5\), expected"):
        cd.build_state_from_logits(q_win, torch.zeros(1, 1, 2, 5), k, v, evicted, scale=0.5)
    with pytest.raises(ValueError, match="evicted must be a bool"):
        cd.build_state(q_win, k, v, evicted.int(), scale=0.5)


def test_calidrop_method_end_to_end():
    """The dataclass wires history, thresholds and adjust through build_state and calibrate."""
    q, k, v, evicted, gen = _data(dict(B=1, Hkv=2, g=2, n=24, c=24, d=16, p_evict=0.5, seed=5))
    m = cd.CaliDrop(history=8, threshold=0.9, recompute_threshold=0.5, adjust="tangent")
    state = m.build_state(q, k, v, evicted, scale=0.25)
    assert state.q_hist.shape[2] == 8 and torch.equal(state.q_hist, q[:, :, -8:]) and state.has_evicted
    o_e, lse_e, use, state2 = m.calibrate(state, q[:, :, -1:], scale=0.25)
    assert use.all()  # the last query is stored: nothing to recompute, nothing inserted
    assert all((x is None and y is None) or torch.equal(x, y)
               for x, y in zip(state2.tensors(), state.tensors()))
    plain = cd.CaliDrop()  # history 32 > n: all 24 prompt queries; no recompute tier, no G_E
    s0 = plain.build_state(q, k, v, evicted, scale=0.25)
    assert s0.q_hist.shape[2] == 24 and s0.lse_grad is None and not s0.has_evicted
    assert plain.calibrate(s0, q[:, :, -1:], scale=0.25)[3] is s0


@st.composite
def lowbit_cases(draw):
    return dict(B=draw(st.integers(1, 2)), Hkv=draw(st.integers(1, 2)), g=draw(st.sampled_from([1, 2])),
                n=draw(st.integers(1, 150)), c=draw(st.integers(1, 4)), d=draw(st.sampled_from([16, 32, 64])),
                p_evict=draw(st.sampled_from([0.3, 0.7, 1.0])), adjust=draw(st.sampled_from(cd.ADJUSTS)),
                seed=draw(st.integers(0, 2**16)), bits=draw(st.sampled_from([2, 4, 8])),
                cuts=draw(st.lists(st.integers(0, 150), max_size=3)))


@SETTINGS
@given(lowbit_cases())
def test_low_bit_evicted_store_holds_every_token_in_arrival_order(c):
    """Batching does not matter: appending the evicted tokens in pieces gives the same codes as
    storing them at once; every token is held, and keys/values are within half a step (plus the
    fp16 statistics' slack) of the originals."""
    from kvfx.methods.calidrop_evicted import EvictedKV

    q_win, k, v, evicted, gen = _data(c, torch.float32)
    k_e, v_e, ok = cd._compact_evicted(k, v, evicted)
    whole = EvictedKV.build(k_e, v_e, ok, bits=c["bits"])
    cuts = sorted({min(x, k_e.shape[2]) for x in c["cuts"]} | {0, k_e.shape[2]}) + [k_e.shape[2]]
    parts = EvictedKV.build(k_e[:, :, :cuts[1]], v_e[:, :, :cuts[1]], ok[:, :, :cuts[1]], bits=c["bits"])
    for a, b in zip(cuts[1:], cuts[2:]):
        parts = parts.append(k_e[:, :, a:b], v_e[:, :, a:b], ok[:, :, a:b])
    assert torch.equal(whole.count(), evicted.sum(-1)) and torch.equal(parts.count(), evicted.sum(-1))
    assert whole.body_tokens == parts.body_tokens == k_e.shape[2] // 32 * 32
    if k_e.shape[2] == 0:  # nothing evicted: nothing to read back
        assert list(whole.blocks(torch.float32)) == [] and whole.nbytes() == 0
        return
    got = [torch.cat(x, 2) for x in zip(*whole.blocks(torch.float32))]
    again = [torch.cat(x, 2) for x in zip(*parts.blocks(torch.float32))]
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    k_hat, v_hat, ok_hat = got
    assert torch.equal(ok_hat, ok)
    levels = (1 << c["bits"]) - 1
    for x, x_hat, axis in ((k_e, k_hat, "keys"), (v_e, v_hat, "values")):
        body = whole.body_tokens
        err = (x - x_hat)[:, :, :body].abs().masked_fill(~ok[:, :, :body, None], 0)
        # the widest step any group can have: the range of all valid entries / levels
        valid = x[:, :, :body][ok[:, :, :body]]
        step = (valid.max() - valid.min()) / levels if valid.numel() else torch.tensor(0.0)
        assert float(err.max() if err.numel() else 0) <= float(step) / 2 * 1.01 + 1e-3, axis
        assert torch.equal(x_hat[:, :, body:], x[:, :, body:].masked_fill(~ok[:, :, body:, None], 0))


@SETTINGS
@given(lowbit_cases())
def test_low_bit_recompute_is_attention_over_the_dequantized_store(c):
    """recompute over a low-bit store = exact attention (float64 oracle) over its dequantized
    keys and values, whatever the chunking; with 8 bits it is close to the full-precision one."""
    q_win, k, v, evicted, gen = _data(c, torch.float32)
    scale = c["d"] ** -0.5
    state = cd.build_state(q_win, k, v, evicted, scale=scale, adjust=c["adjust"], keep_evicted=True,
                           evicted_bits=c["bits"])
    assert state.evicted.bits == c["bits"]
    q_t = torch.randn(c["B"], q_win.shape[1], 1, c["d"], generator=gen)
    o_x, lse_x, g_x = cd.recompute(state, q_t, scale=scale)
    if not evicted.any():  # an empty store: no key, lse -inf
        assert (lse_x == float("-inf")).all() and (o_x == 0).all()
        return
    k_hat, v_hat, ok = (torch.cat(x, 2) for x in zip(*state.evicted.blocks(torch.float64)))
    o_w, lse_w = _kept_attention(q_t.double(), k_hat, v_hat, ok, scale)
    has = ok.any(-1).repeat_interleave(c["g"], 1)
    torch.testing.assert_close(lse_x.double(), lse_w[:, :, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o_x.double()[has], o_w[:, :, 0][has], rtol=1e-4, atol=1e-4)
    # one group dequantized at a time: the partial results merge to the same attention
    o_s, lse_s, g_s = cd.recompute(state, q_t, scale=scale, chunk=32)
    torch.testing.assert_close(o_s, o_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_s, lse_x, rtol=1e-5, atol=1e-5)
    if g_x is not None:
        torch.testing.assert_close(g_s, g_x, rtol=1e-5, atol=1e-5)
    if c["bits"] == 8:
        full = cd.build_state(q_win, k, v, evicted, scale=scale, adjust=c["adjust"], keep_evicted=True)
        o_f, lse_f, _ = cd.recompute(full, q_t, scale=scale)
        torch.testing.assert_close(o_x, o_f, rtol=0, atol=0.05)
        torch.testing.assert_close(lse_x, lse_f, rtol=0, atol=0.05)


def test_low_bit_recompute_tier_bytes_and_policy_wiring():
    """2-bit storage of the evicted set: what the policy's recompute.bits asks for, ~1/6 of the
    full-precision fp32 store at d = 64 (codes 1/16, fp16 scale+min per 32 tokens or channels)."""
    from kvfx.runtime.compressor import build_compressor
    from kvfx.policy import load_policy

    pol = load_policy({"kvfx": 1, "name": "t", "extends": "snapkv-calidrop",
                       "calibration": {"recompute": {"bits": 2, "threshold": 0.3}}})
    comp = build_compressor(pol.resolve(0, "m", 1), 0, 1)
    assert (comp.calib.recompute_bits, comp.calib.recompute_threshold) == (2, 0.3)
    c = dict(B=1, Hkv=2, g=2, n=1024, c=4, d=64, p_evict=1.0, seed=1)
    q_win, k, v, evicted, _ = _data(c, torch.float32)
    full = cd.build_state(q_win, k, v, evicted, scale=0.125, keep_evicted=True)
    low = cd.build_state(q_win, k, v, evicted, scale=0.125, keep_evicted=True, evicted_bits=2)
    ev_full = full.nbytes() - cd.build_state(q_win, k, v, evicted, scale=0.125).nbytes()
    ev_low = low.evicted.nbytes()
    assert ev_full == 2 * (2 * 1024 * 64 * 4) + 2 * 1024
    # keys: 2-bit codes + fp16 scale/min per 32 tokens per channel + 1 mask byte per token;
    # values: codes + fp16 scale/min per 32 channels per token
    want = 2 * (1024 * 64 // 4 + 2 * 2 * (1024 // 32) * 64 + 1024) + 2 * (1024 * 64 // 4 + 2 * 2 * 1024 * 2)
    assert ev_low == want and ev_low < ev_full / 6
    assert low.nbytes() == full.nbytes() - ev_full + ev_low
