"""The quantized store (KIVI + outlier tokens) on its own and inside compiled models."""

import pytest
import torch
import torch._dynamo.utils as dutils
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kvfx
from kvfx.methods.quant import (dequantize_keys, dequantize_values, quantize_keys, quantize_values,
                                token_norms)
from kvfx.runtime.qstore import QuantConfig, QuantStore


def _fill(cfg, B, H, m, steps, d=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, m + steps, d, generator=g).to(dtype)
    v = torch.randn(B, H, m + steps, d, generator=g).to(dtype)
    st_ = QuantStore("t", cfg)
    st_.write_kept(k[:, :, :m], v[:, :, :m], torch.arange(m).expand(B, H, m),
                   torch.full((B, H), m), m + 1)
    st_.seen = m
    return st_, k, v


def _dense_expected(cfg, k, v, n):
    """What the store must attend over after n tokens, built straight from KIVI's rules:
    keys of the first R·⌊n/R⌋ slots and values of the first max(0, n − R) quantized."""
    R = cfg.residual
    nk, nv = n // R * R, max(0, n - R)
    K, V = k[:, :, :n].clone(), v[:, :, :n].clone()
    if nk:
        K[:, :, :nk] = dequantize_keys(quantize_keys(k[:, :, :nk], cfg.kbits, cfg.kgroup))
    if nv:
        V[:, :, :nv] = dequantize_values(quantize_values(v[:, :, :nv], cfg.vbits, cfg.vgroup))
    return K, V, nk, nv


@settings(max_examples=10, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), group=st.sampled_from([16, 32]),
       rmul=st.integers(1, 2), m=st.integers(1, 120), steps=st.integers(0, 40), g=st.sampled_from([1, 3]))
def test_flush_rules_and_attention_match_kivi(bits, group, rmul, m, steps, g):
    if group % (32 // bits):
        group = 32
    cfg = QuantConfig(bits, group, bits, group, residual=group * rmul)
    store, k, v = _fill(cfg, 1, 2, m, steps)
    q = torch.randn(1, 2 * g, 1, 64)
    for t in range(m, m + steps + 1):
        if t > m:
            store.append(k[:, :, t - 1:t], v[:, :, t - 1:t], torch.tensor([t - 1]))
            store.flush()
        K, V, nk, nv = _dense_expected(cfg, k, v, t)
        assert (store.n, store.nk, store.nv) == (t, nk, nv)
        out = store.attend(q, None, False, t, None)
        want = F.scaled_dot_product_attention(q, K, V, enable_gqa=g > 1)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


def test_kivi2_bytes_at_4k_under_022_of_fp16():
    """Bytes are those of the tensors the store holds (codes, stats, residual, counters)."""
    cfg = QuantConfig(2, 32, 2, 32, residual=128)
    m = 4096
    store, k, v = _fill(cfg, 1, 3, m, 8, dtype=torch.float16)
    for t in range(m, m + 8):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t]))
        store.flush()
    dense16 = 3 * (m + 8) * 128 * 2
    assert store.held_bytes() <= 0.22 * dense16, store.held_bytes() / dense16
    assert store.pos is None and store.ok is None  # identity layout: no per-slot bookkeeping


def test_outlier_pool_holds_smallest_norm_keys_exactly():
    cfg = QuantConfig(2, 32, 2, 32, residual=64, per_group=1, pool=3)
    m = 256  # 8 groups, 8 candidates for a pool of 3
    store, k, v = _fill(cfg, 1, 2, m, 0, seed=3)
    pool = store.pool
    assert (pool.count == 3).all()
    for h in range(2):
        kh = k[0, h, :256]
        cand = [int(token_norms(kh[i * 32:(i + 1) * 32]).argmin()) + 32 * i for i in range(8)]
        norms = token_norms(kh[cand])
        want = sorted(c for _, c in sorted(zip(norms.tolist(), cand))[:3])
        held = sorted(pool.pos[0, h].tolist())
        assert held == want
        # the pool's keys and values are bit-exact, their slots are hidden; the others are back
        for j, s in enumerate(pool.pos[0, h].tolist()):
            assert torch.equal(pool.keys[0, h, j], k[0, h, s]) and torch.equal(pool.values[0, h, j], v[0, h, s])
        hidden = (~store.ok[0, h, :m]).nonzero().flatten().tolist()
        assert hidden == want
        # each group's range was computed without its outlier
        for i in range(8):
            grp = kh[i * 32:(i + 1) * 32]
            rest = torch.cat([grp[:cand[i] - 32 * i], grp[cand[i] - 32 * i + 1:]])
            lo = store.kmin[0, h, i].float()
            assert (lo <= rest.min(0).values).all()
            assert torch.allclose(lo, rest.min(0).values, atol=1e-2)


def test_outlier_store_attention_matches_its_own_dense_view():
    """Attention over [quantized slots (pool slots hidden) ∪ pool ∪ residual] equals SDPA over
    the same keys written out: pool tokens exact, the rest dequantized."""
    cfg = QuantConfig(2, 32, 2, 32, residual=64, per_group=1, pool=4)
    store, k, v = _fill(cfg, 1, 2, 256 + 20, 0, seed=5)
    kv = store.view()
    from kvfx.methods.quant_attention import dequant_keys, dequant_values

    K = torch.cat([dequant_keys(kv, 0, kv.nk), store.rk[:, :, :kv.n - kv.nk].float()], 2)
    V = torch.cat([dequant_values(kv, 0, kv.nv), store.rv[:, :, :kv.n - kv.nv].float()], 2)
    K = torch.cat([K, store.pool.keys.float()], 2)
    V = torch.cat([V, store.pool.values.float()], 2)
    vis = torch.cat([store.ok[:, :, :kv.n], store.pool.occupied], 2)
    q = torch.randn(1, 2, 1, 64)
    want = F.scaled_dot_product_attention(q, K, V, attn_mask=vis[:, :, None, :])
    torch.testing.assert_close(store.attend(q, None, False, kv.n, None), want, atol=2e-5, rtol=1e-4)
    assert int((~store.ok[:, :, :kv.n]).sum()) == 2 * 4  # hidden exactly while pooled


# ---- left-padded batches: every row as it is alone ----------------------------------------------

def _padded_batch(cfg, lengths, keep, seed, d=64, H=2, dtype=torch.float32):
    """A QuantStore fed like a compressor feeds a left-padded batch (row b's kept tokens
    left-aligned in its first count slots, positions in the padded coordinates, NaN in the unused
    slots, as pads' hidden states can be), and one single-row store per row fed the same kept
    tokens with no padding (positions from 0). ``keep``: fraction kept per row (eviction) or 1.
    Returns (batch store, alone stores, per-row kept positions in the row's own coordinates, L)."""
    g = torch.Generator().manual_seed(seed)
    L, B = max(lengths), len(lengths)
    kept = []
    for n in lengths:
        c = n if keep == 1 else max(1, round(keep * n))
        kept.append(torch.randperm(n, generator=g)[:c].sort().values)
    m = max(len(x) for x in kept)
    k = torch.full((B, H, m, d), float("nan"), dtype=dtype)
    v = torch.full((B, H, m, d), float("nan"), dtype=dtype)
    pos = torch.full((B, H, m), -1)
    count = torch.zeros(B, H, dtype=torch.long)
    alone = []
    for b, (n, idx) in enumerate(zip(lengths, kept)):
        c = len(idx)
        kb = (torch.randn(1, H, c, d, generator=g) * torch.linspace(0.2, 3, d)).to(dtype)
        vb = torch.randn(1, H, c, d, generator=g).to(dtype)
        k[b, :, :c], v[b, :, :c], pos[b, :, :c], count[b] = kb[0], vb[0], idx + L - n, c
        st_ = QuantStore(f"row{b}", cfg)
        st_.write_kept(kb, vb, idx.expand(1, H, c), torch.full((1, H), c), c + 1)
        alone.append(st_)
    batch = QuantStore("batch", cfg)
    batch.write_kept(k, v, pos, count, m + 1)
    return batch, alone, L


def _same_row_state(batch, b, alone):
    """Row b of the batch store holds what the single-row store holds: counts, codes, statistics,
    residual, visibility and outlier pool (bit for bit)."""
    c = batch.cfg
    n, nk, nv = batch.row_n[b], batch.row_nk[b], batch.row_nv[b]
    assert (n, nk, nv) == (alone.n, alone.nk, alone.nv), (b, (n, nk, nv), (alone.n, alone.nk, alone.nv))
    assert int(batch.count[b, 0]) == n
    pw = 32 // c.kbits
    for name, hi in (("kcodes", nk // pw), ("kscale", nk // c.kgroup), ("kmin", nk // c.kgroup),
                     ("vcodes", nv), ("vscale", nv), ("vmin", nv), ("rk", n - nk), ("rv", n - nv)):
        assert torch.equal(getattr(batch, name)[b, :, :hi], getattr(alone, name)[0, :, :hi]), (b, name)
    ok_alone = alone.ok[0, :, :n] if alone.ok is not None else torch.ones_like(batch.ok[b, :, :n])
    assert torch.equal(batch.ok[b, :, :n], ok_alone), b
    assert not batch.ok[b, :, n:batch.n].any()  # a shorter row's slots past its count are hidden
    if alone.pool is not None:
        for name in ("keys", "values", "pos", "norms"):
            assert torch.equal(getattr(batch.pool, name)[b], getattr(alone.pool, name)[0]), (b, name)
    elif batch.pool is not None:  # the row never flushed alone: nothing of it is in the pool
        assert not batch.pool.occupied[b].any()


PADDED = [  # (cfg, kept fraction)
    (QuantConfig(2, 32, 2, 32, residual=128), 1),  # kivi2
    (QuantConfig(4, 32, 4, 32, residual=128, per_group=1, pool=8), 1),  # ott4
    (QuantConfig(2, 32, 2, 32, residual=32, per_group=1, pool=4), 0.5),  # snapkv-ott2, small R
    (QuantConfig(4, 16, 2, 32, residual=32), 0.3),  # evicting kivi, groups of 16
    (QuantConfig(2, 32, 2, 32, residual=32, per_group=1, pool=4, residual_dtype="float16"), 0.5),
]


@pytest.mark.parametrize("cfg,keep", PADDED, ids=["kivi2", "ott4", "evict-ott2-R32", "evict-kivi-R32",
                                                  "evict-ott2-R32-fp16-residual"])
def test_left_padded_rows_match_their_single_row_stores(cfg, keep):
    """KIVI's flushes counted in each row's own tokens: at prefill (150 tokens: nk = 128), during
    decode (100 -> 140 crosses 128), never (60, 20); every decode step's attention of a row equals
    the single-row store's (fp32 round-off) and so does its whole state (bit for bit)."""
    lengths, steps, H, g = (150, 100, 60, 20), 40, 2, 2
    batch, alone, L = _padded_batch(cfg, lengths, keep, seed=len(PADDED) + int(keep * 10))
    assert batch.view().rows is not None and batch.pos is not None
    gen = torch.Generator().manual_seed(1)
    for b in range(len(lengths)):
        _same_row_state(batch, b, alone[b])
    for t in range(steps):
        k = torch.randn(len(lengths), H, 1, 64, generator=gen)
        v = torch.randn(len(lengths), H, 1, 64, generator=gen)
        q = torch.randn(len(lengths), H * g, 1, 64, generator=gen)
        batch.append(k, v, torch.tensor([L + t]))
        mask = torch.zeros(len(lengths), 1, 1, L + t + 1)  # the model's additive padding mask
        for b, n in enumerate(lengths):
            mask[b, ..., :L - n] = float("-inf")
        out = batch.attend(q, mask, False, L + t, None)
        batch.flush()
        for b, st_ in enumerate(alone):
            st_.append(k[b:b + 1], v[b:b + 1], torch.tensor([lengths[b] + t]))
            want = st_.attend(q[b:b + 1], None, False, lengths[b] + t, None)
            st_.flush()
            torch.testing.assert_close(out[b:b + 1], want, msg=lambda m: f"step {t} row {b}: {m}")
    for b in range(len(lengths)):
        _same_row_state(batch, b, alone[b])
    if keep == 1 and cfg.residual == 128:  # the KIVI schedule in each row's own tokens
        assert batch.row_nk == [128, 128, 0, 0] and batch.row_nv == [62, 12, 0, 0]


def test_uniform_rows_keep_one_vectorized_path():
    """No padding: one set of counts for the whole batch, no per-row counts in the view."""
    cfg = QuantConfig(2, 32, 2, 32, residual=64, per_group=1, pool=2)
    store, k, v = _fill(cfg, 3, 2, 150, 0)
    assert store.uniform and store.view().rows is None and store._row_sets() == [(slice(None), 150, 128, 86)]


@pytest.mark.parametrize("residual_dtype", ["model", "float16"])
def test_quant_latents_with_left_padding_match_single_rows(residual_dtype):
    """The low-rank + quant path (a one-"head" QuantStore of latents) reads per-row counts too:
    latent_quant_attention_reference of the padded batch equals each row's own store (also with
    the latents' residual and pool held in float16, quant.residual_dtype)."""
    from kvfx.methods.lowrank_attention import latent_quant_attention_reference
    from kvfx.runtime.attention import positions_mask

    cfg = QuantConfig(2, 32, 2, 16, residual=32, per_group=1, pool=2, residual_dtype=residual_dtype)
    lengths = (70, 40, 9)
    batch, alone, L = _padded_batch(cfg, lengths, 1, seed=3, d=32, H=1)
    heads, d, Hq = 2, 16, 4
    gen = torch.Generator().manual_seed(2)
    qk = torch.linalg.qr(torch.randn(heads * d, 32, generator=gen))[0]
    qv = torch.linalg.qr(torch.randn(heads * d, 32, generator=gen))[0]
    ang = torch.arange(L + 1)[:, None] * 0.1 * torch.arange(1, d + 1)
    cos, sin = ang.cos().expand(len(lengths), L + 1, d), ang.sin().expand(len(lengths), L + 1, d)
    batch.append(torch.randn(3, 1, 1, 32, generator=gen), torch.randn(3, 1, 1, 32, generator=gen),
                 torch.tensor([L]))
    q = torch.randn(3, Hq, 1, d, generator=gen)
    pos = batch.positions()[:, 0]
    mask = torch.zeros(3, 1, 1, L + 1)
    for b, n in enumerate(lengths):
        mask[b, ..., :L - n] = float("-inf")
    bias = positions_mask(pos[:, None], mask, False, 1, L, Hq)  # additive (the mask is)
    assert batch.rk.dtype == (torch.float16 if residual_dtype == "float16" else torch.float32)
    out, _ = latent_quant_attention_reference(q, batch.view(), pos, cos, sin, qk, qv, scale=0.25, bias=bias)
    for b, (n, st_) in enumerate(zip(lengths, alone)):
        st_.append(batch.rk[b:b + 1, :, batch.row_n[b] - 1 - batch.row_nk[b]][:, :, None],
                   batch.rv[b:b + 1, :, batch.row_n[b] - 1 - batch.row_nv[b]][:, :, None], torch.tensor([n]))
        shift = L - n  # the single row's positions start at 0: its RoPE rows are the batch's, shifted
        p_b = st_.positions()[:, 0]
        want, _ = latent_quant_attention_reference(q[b:b + 1], st_.view(), p_b, cos[b:b + 1, shift:],
                                                   sin[b:b + 1, shift:], qk, qv, scale=0.25)
        torch.testing.assert_close(out[b:b + 1], want, msg=lambda m: f"row {b}: {m}")


# ---- inside compiled models --------------------------------------------------------------------

def _llama(layers=2, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval().to(dtype)
    m.generation_config.pad_token_id = 0
    return m


def _teacher_logits(model, seq, prompt, caches=None):
    """Teacher-forced last-position logits; ``caches`` (a list) receives the model's cache."""
    from zoo import cache_kwarg

    with torch.no_grad():
        out = model(seq[:, :prompt], use_cache=True)
        lg = [out.logits[:, -1:]]
        for t in range(prompt, seq.shape[1] - 1):
            past = out.get("cache", out.get("past_key_values"))
            out = model(seq[:, t:t + 1], **{cache_kwarg(model): past}, use_cache=True)
            lg.append(out.logits[:, -1:])
    if caches is not None:
        caches.append(out.get("cache", out.get("past_key_values")))
    return torch.cat(lg, 1)


def test_quantized_generation_error_shrinks_with_bits_and_no_recompiles():
    ids = torch.randint(1, 90, (1, 300), generator=torch.Generator().manual_seed(1))
    seq = torch.cat([ids, torch.randint(1, 90, (1, 20), generator=torch.Generator().manual_seed(2))], 1)
    ref = _teacher_logits(_llama(), seq, 300)
    err = {}
    for bits in (8, 4, 2):
        kvfx.reset()
        torch._dynamo.reset()
        model = _llama()
        policy = {"kvfx": 1, "name": f"kivi{bits}", "extends": "kivi2",
                  "quant": {"keys": {"bits": bits}, "values": {"bits": bits}}}
        model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
        dutils.counters.clear()
        caches = []
        got = _teacher_logits(model, seq, 300, caches)
        assert dutils.counters["stats"]["unique_graphs"] <= 3
        err[bits] = (got - ref).abs().max().item()
        stores = kvfx.runtime.state.site_stores(caches.pop())
        assert len(stores) == 2
        store = next(iter(stores.values()))
        assert isinstance(store, QuantStore) and (store.n, store.nk, store.nv) == (319, 256, 191)
    assert err[8] < 5e-3 and err[8] < err[4] < err[2], err


def test_kivi2_model_memory_at_4k_is_real_bytes():
    """A half-precision model at a 4k prompt: kvfx.memory() (measured tensors, including the
    model's own ghost cache) is at most 0.22 of the dense fp16 cache."""
    kvfx.reset()
    torch._dynamo.reset()
    model = _llama(dtype=torch.bfloat16)
    model.compile(backend="kvfx", options={"policy": "kivi2", "inner": "eager"})
    ids = torch.randint(1, 90, (1, 4096), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    mem = kvfx.memory(out.get("cache", out.get("past_key_values")))
    assert mem["ratio_fp16"] <= 0.22, mem["ratio_fp16"]
    assert mem["ratio"] == pytest.approx(mem["ratio_fp16"])  # the model's dtype is 16-bit here


def test_snapkv_ott2_with_left_padding_never_keeps_pads():
    kvfx.reset()
    torch._dynamo.reset()
    model = _llama()
    model.compile(backend="kvfx", options={"policy": "snapkv-ott2", "inner": "eager"})
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 90, (2, 700), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :100], ids[1, :100] = 0, 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             return_dict_in_generate=True)
    assert out.sequences.shape == (2, 720)
    stores = kvfx.runtime.state.site_stores(out.past_key_values)
    assert len(stores) == 2
    for st_ in stores.values():
        assert isinstance(st_, QuantStore) and st_.pos is not None
        pos = st_.pos[1, :, :st_.n]
        assert not ((pos >= 0) & (pos < 100)).any()  # row 1's pads were never kept
        assert int(st_.count[0].max()) == round(0.25 * 700) + 19  # 19 decode steps feed tokens back


@pytest.mark.parametrize("policy,match", [
    ({"kvfx": 1, "name": "h2o-q", "extends": "h2o", "quant": {}}, "eviction.scorer: got 'h2o'.*evict during decode"),
    ({"kvfx": 1, "name": "st-q", "extends": "streaming", "quant": {}},
     "eviction.scorer: got 'streaming'.*evict during decode"),
])
def test_quant_with_rolling_eviction_is_refused_clearly(policy, match):
    kvfx.reset()
    torch._dynamo.reset()
    model = _llama(layers=1)
    model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
    ids = torch.randint(1, 90, (1, 40))
    with pytest.raises(kvfx.PolicyError, match=match):  # a located policy error, not wrapped by dynamo
        with torch.no_grad():
            model(ids)


def test_value_group_that_does_not_divide_head_dim_fails_at_compile():
    from zoo import hf_model  # head dim 16

    kvfx.reset()
    torch._dynamo.reset()
    model = hf_model("llama", layers=1)
    model.compile(backend="kvfx", options={"policy": "kivi2", "inner": "eager"})
    with pytest.raises(Exception, match="head dim 16"):
        with torch.no_grad():
            model(torch.randint(1, 90, (1, 40)))


# ---- quant.residual_dtype: the residual and the outlier pool held narrower ----------------------

def _layout_bytes(s, held_itemsize):
    """The bytes a QuantStore's layout holds (module docstring of kvfx.runtime.qstore): packed
    codes (int32), fp16 statistics per group, the residual buffers and the outlier pool's keys and
    values at ``held_itemsize`` bytes an element, the pool's int32 positions and fp32 norms, the
    per-slot visibility mask (when some slot is hidden) and the int64 per-head counts."""
    c = s.cfg
    B, H = s.batch, s.kv_heads
    d, dv = s.head_dims()
    cap, capv = s.cap, max(0, s.cap - c.residual)
    total = B * H * (cap // (32 // c.kbits) * d + capv * dv // (32 // c.vbits)) * 4  # codes
    total += B * H * 2 * (cap // c.kgroup * d + capv * dv // c.vgroup) * 2  # scale + min, fp16
    total += B * H * (s.rk.shape[2] * d + s.rv.shape[2] * dv) * held_itemsize  # residual
    if c.per_group:
        total += B * H * c.pool * ((d + dv) * held_itemsize + 4 + 4)  # pool keys, values, pos, norms
    if s.ok is not None:
        total += B * H * cap  # bool
    return total + B * H * 8  # count


@pytest.mark.parametrize("per_group,pool", [(0, 0), (1, 16)], ids=["kivi2", "ott2"])
@pytest.mark.parametrize("model_dtype,residual_dtype,held", [
    (torch.float32, "model", torch.float32), (torch.float32, "float16", torch.float16),
    (torch.float32, "bfloat16", torch.bfloat16), (torch.bfloat16, "float16", torch.bfloat16),
    (torch.float16, "bfloat16", torch.float16)])
def test_residual_dtype_bytes_follow_the_layout(per_group, pool, model_dtype, residual_dtype, held):
    """Bytes held equal the layout's formula with the residual and pool at the held dtype's
    itemsize (the narrower dtype only where the model's is wider); the slot counts do not depend
    on the dtype, so float16 under fp32 saves exactly 2 bytes per residual and pool element."""
    cfg = QuantConfig(2, 32, 2, 32, residual=128, per_group=per_group, pool=pool, residual_dtype=residual_dtype)
    m, steps = 600, 40
    store, k, v = _fill(cfg, 2, 3, m, steps, dtype=model_dtype)
    for t in range(m, m + steps):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t]))
        store.flush()
    assert store.rk.dtype == store.rv.dtype == held and store.dtype == model_dtype
    if per_group:
        assert store.pool.keys.dtype == store.pool.values.dtype == held
    assert store.held_bytes() == _layout_bytes(store, held.itemsize)
    if model_dtype == torch.float32 and residual_dtype != "model":
        wide, _, _ = _fill(QuantConfig(2, 32, 2, 32, residual=128, per_group=per_group, pool=pool), 2, 3, m, steps)
        for t in range(m, m + steps):
            wide.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t]))
            wide.flush()
        elems = 2 * 3 * 64 * (store.rk.shape[2] + store.rv.shape[2] + 2 * pool)
        assert wide.rk.shape == store.rk.shape and wide.rv.shape == store.rv.shape
        assert wide.held_bytes() - store.held_bytes() == 2 * elems


def test_float16_residual_refuses_values_beyond_its_range():
    """A finite fp32 key beyond float16's range would be held as inf: refused, naming bfloat16
    (which holds it; so does the model's dtype)."""
    k = torch.randn(1, 2, 200, 64)
    v = torch.randn(1, 2, 200, 64)
    k[0, 1, 150, 3] = 1e5  # a residual slot (R = 128: slots 128..199)
    pos, count = torch.arange(200).expand(1, 2, 200), torch.full((1, 2), 200)
    store = QuantStore("model.layers.0.self_attn", QuantConfig(residual=128, residual_dtype="float16"))
    with pytest.raises(ValueError, match=r"site model.layers.0.self_attn: quant.residual_dtype float16 cannot "
                       r"hold a key of magnitude above 65504 \(torch.float32 model\); set residual_dtype: bfloat16"):
        store.write_kept(k, v, pos, count, 201)
    store.write_kept(k[:, :, :199].clone().fill_(1.0), v[:, :, :199], pos[:, :, :199], count - 1, 201)
    big = torch.full((1, 2, 1, 64), -7e4)
    with pytest.raises(ValueError, match="cannot hold a value of magnitude"):
        store.append(torch.zeros(1, 2, 1, 64), big, torch.tensor([199]))
    for held in ("bfloat16", "model"):
        ok = QuantStore("t", QuantConfig(residual=128, residual_dtype=held))
        ok.write_kept(k, v, pos, count, 201)
        assert float(ok.rk.float().abs().max()) == pytest.approx(1e5, rel=2**-8)


def test_residual_dtype_float16_in_a_compiled_fp32_model():
    """kivi2 and ott2 with quant.residual_dtype float16 on an fp32 model: teacher-forced logits
    move from the fp32-residual run by less than a tenth of what 2-bit quantization itself moves
    them (the rounding of the residual is small next to the quantization), the store holds fp16
    residual and pool tensors, and kvfx.memory() counts exactly the bytes saved."""
    ids = torch.randint(1, 90, (1, 300), generator=torch.Generator().manual_seed(1))
    seq = torch.cat([ids, torch.randint(1, 90, (1, 20), generator=torch.Generator().manual_seed(2))], 1)
    ref = _teacher_logits(_llama(), seq, 300)
    for preset in ("kivi2", "ott2"):
        got, mem, stores = {}, {}, {}
        for held in ("model", "float16"):
            kvfx.reset()
            torch._dynamo.reset()
            model = _llama()
            policy = {"kvfx": 1, "name": f"{preset}-{held}", "extends": preset, "quant": {"residual_dtype": held}}
            model.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
            caches = []
            got[held] = _teacher_logits(model, seq, 300, caches)
            mem[held] = kvfx.memory(caches[0])
            stores[held] = list(kvfx.runtime.state.site_stores(caches[0]).values())
        quant_err = (got["model"] - ref).abs().max().item()
        held_err = (got["float16"] - got["model"]).abs().max().item()
        assert held_err < 0.1 * quant_err, (preset, held_err, quant_err)
        saved = 0
        for wide, narrow in zip(stores["model"], stores["float16"]):
            assert narrow.rk.dtype == narrow.rv.dtype == torch.float16 and wide.rk.dtype == torch.float32
            elems = sum(t.numel() for t in (narrow.rk, narrow.rv))
            if narrow.pool is not None:
                assert narrow.pool.keys.dtype == torch.float16
                elems += narrow.pool.keys.numel() + narrow.pool.values.numel()
            saved += 2 * elems
        assert mem["model"]["held_bytes"] - mem["float16"]["held_bytes"] == saved > 0
        assert mem["model"]["dense_bytes"] == mem["float16"]["dense_bytes"]
