"""Quantized-store kernels (KIVI + outlier tokens) under the Triton interpreter against the references.

* quant_decode_attention vs quant_attention_reference: the STYLE item-4 oracle (kernel_oracle.py)
  with a float64 golden computed here from explicitly dequantized keys/values (an independent
  unpacking, not kvfx's), plus a logit round-off term (see check_quant_attention); the reference
  itself is also checked against that golden.
* quant_compress_keys / quant_compress_values vs quantize_keys(_with_outliers)(excluded="clamp") /
  quantize_values: bit-exact codes, scale, min, masks, outlier indices and keys. The one allowed
  difference (see quant_compress.py.jinja's [Note]): outlier norms are fp32 sums in another order,
  so on data whose norms are not exact sums the kernel may trace the other token of a near tie;
  the test then checks that it is one, and compares the rest against the reference run with the
  kernel's choice. On dyadic data (exact sums) the outlier choice must be identical.
* the kernel's packed codes round-trip through unpack/pack; dequantized values lie within half a
  step (kept slots) or of their value clamped into the range (excluded slots); a group's range
  excludes its traced outliers.
"""
import kernel_oracle  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import ast
import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_oracle import DTYPES, K_FACTOR, UNIT_ROUNDOFF  # noqa: E402

from kvfx.methods import quant as Q  # noqa: E402
from kvfx.methods.quant_attention import QuantKV, quant_attention_reference  # noqa: E402
from kvfx.methods.quant_pack import pack, unpack  # noqa: E402
from kvfx.templates import configs, launch_quant  # noqa: E402
from kvfx.templates.render import render  # noqa: E402
from kvfx.templates.spec import KernelSpec  # noqa: E402

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STATS = [torch.float16, torch.bfloat16, torch.float32]
# See check_quant_attention. Measured over 300 random fp32 cases: err(kernel) stayed below
# 0.054 sqrt(d) u32 logit_mag max|v|; the allowance is 2 LOGIT_ULPS = 1.0 of those.
LOGIT_ULPS = 0.5
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


pytestmark = pytest.mark.usefixtures("force_triton")  # tests/templates/conftest.py


def _bits_equal(a, b):
    """Bit-for-bit equality of two float tensors (tells -0 from +0, NaN patterns included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(_INT[a.dtype]), b.view(_INT[b.dtype])))


# --- decode attention ------------------------------------------------------------------------------

def _independent_codes(words, bits, n, dim):
    """Codes of ``n`` slots along ``dim`` (int64), unpacked here with plain shifts."""
    pw = 32 // bits
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(dim, -1)
    c = (w[..., None] >> (torch.arange(pw) * bits)) & ((1 << bits) - 1)
    return c.flatten(-2)[..., :n].movedim(-1, dim)


def dense_golden(q, kv, scale):
    """float64 attention over explicitly dequantized keys/values: (o, lse, all values, the largest
    scale * sum_i |q_i k_ji| over visible slots j)."""
    n, nk, nv, C = kv.n, kv.nk, kv.nv, kv.pool_size
    B, Hq, _, d = q.shape
    H = kv.kcodes.shape[1]
    f = torch.float64
    kq = (_independent_codes(kv.kcodes, kv.kbits, nk, 2).to(f)
          * kv.kscale.to(f).repeat_interleave(kv.kgroup, 2)[:, :, :nk]
          + kv.kmin.to(f).repeat_interleave(kv.kgroup, 2)[:, :, :nk])
    dv = kv.rv.shape[-1]
    vq = (_independent_codes(kv.vcodes[:, :, :nv], kv.vbits, dv, 3).to(f)
          * kv.vscale[:, :, :nv].to(f).repeat_interleave(kv.vgroup, 3)
          + kv.vmin[:, :, :nv].to(f).repeat_interleave(kv.vgroup, 3))
    keys = [kq, kv.rk[:, :, :n - nk].to(f)]
    values = [vq, torch.nan_to_num(kv.rv[:, :, :n - nv].to(f))]
    seen = torch.ones(B, H, n, dtype=torch.bool) if kv.ok is None else kv.ok[:, :, :n].clone()
    if C:
        keys.append(kv.pool_k.to(f))
        values.append(torch.where(kv.pool_ok[..., None], kv.pool_v.to(f), 0.0))
        seen = torch.cat([seen, kv.pool_ok], 2)
    K, V = torch.cat(keys, 2), torch.cat(values, 2)
    g = Hq // H
    s = (q.to(f).view(B, H, g, d) @ K.transpose(-1, -2)) * scale
    mag = (q.to(f).view(B, H, g, d).abs() @ K.nan_to_num().abs().transpose(-1, -2)) * scale
    mag = mag.masked_fill(~seen[:, :, None, :], 0.0).max().item() if mag.numel() else 0.0
    s = s.masked_fill(~seen[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    o = p @ V
    return o.reshape(B, Hq, 1, dv), lse.reshape(B, Hq, 1), V, mag


def check_quant_attention(kernel, ref, golden, V, logit_mag, d, name):
    """kernel_oracle.check_attention's rule, err(kernel) <= K * err(reference) + atol, with one more
    term in atol. [Note] A logit q.k in fp32 carries a round-off of ~sqrt(d) u sum_i |q_i k_i|,
    not ~u |q.k|: keys with outlier channels (as here, and as KIVI's keys are) make the sum of
    magnitudes much larger than the logit, and the kernel's tile dot sums in another order than
    torch's matmul, so the reference's error is no bound on the kernel's. Each logit error moves o
    by at most 2 max|v| times it, hence + LOGIT_ULPS * sqrt(d) u32 * logit_mag * 2 max|v|."""
    (o_k, l_k), (o_r, l_r), (o_g, l_g) = kernel, ref, golden
    assert o_k.dtype == o_r.dtype and l_k.dtype == torch.float32, name
    assert not torch.isnan(o_k).any() and not torch.isnan(l_k).any(), f"{name}: NaN in kernel output"
    empty = l_g == float("-inf")
    assert torch.equal(l_k == float("-inf"), empty), f"{name}: empty rows differ"
    assert (o_k[empty] == 0).all(), f"{name}: empty rows must have o = 0"
    logit_err = LOGIT_ULPS * d**0.5 * UNIT_ROUNDOFF[torch.float32] * logit_mag
    err_k = (o_k.double() - o_g).abs().max().item() if o_k.numel() else 0.0
    err_r = (o_r.double() - o_g).abs().max().item() if o_r.numel() else 0.0
    v_max = V.abs().max().item() if V.numel() else 0.0
    atol = UNIT_ROUNDOFF[o_k.dtype] * v_max + 1e-7 + 2 * logit_err * v_max
    assert err_k <= K_FACTOR * err_r + atol, f"{name}: o err {err_k:.3g} vs reference {err_r:.3g}"
    if (~empty).any():
        lk, lr, lg = l_k.double()[~empty], l_r.double()[~empty], l_g[~empty]
        e_k, e_r = (lk - lg).abs().max().item(), (lr - lg).abs().max().item()
        assert e_k <= K_FACTOR * e_r + 1e-5 * (1 + lg.abs().max().item()) + logit_err, \
            f"{name}: lse err {e_k:.3g} vs reference {e_r:.3g}"


@st.composite
def decode_cases(draw):
    kbits, vbits = draw(st.sampled_from(Q.BITS)), draw(st.sampled_from(Q.BITS))
    kgroup = draw(st.sampled_from([gr for gr in (4, 8, 16, 32, 64) if gr >= 32 // kbits]))
    d = draw(st.sampled_from([64, 128]))
    dv = draw(st.sampled_from([d, d, 32]))
    vgroup = draw(st.sampled_from([gr for gr in (8, 16, 32, dv) if gr <= dv]))
    nk = draw(st.integers(0, 3)) * kgroup
    n = nk + draw(st.one_of(st.just(0), st.integers(0, 40)))
    nv = draw(st.one_of(st.sampled_from([0, n, nk]), st.integers(0, n)))
    return dict(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), g=draw(st.sampled_from([1, 2, 4, 5])),
        d=d, dv=dv, kbits=kbits, vbits=vbits, kgroup=kgroup, vgroup=vgroup, n=n, nk=nk, nv=nv,
        C=draw(st.sampled_from([0, 0, 1, 5])), ok=draw(st.sampled_from(["none", "random", "heads_off"])),
        dtype=draw(st.sampled_from(sorted(DTYPES))), stat=draw(st.sampled_from(STATS[:2])),
        block_n=draw(st.sampled_from([16, 32, 64])), min_split=draw(st.sampled_from([16, 256])),
        seed=draw(st.integers(0, 2**16)),
    )


def build_store(c):
    """A QuantKV whose unused memory (slots past nk/nv/n, hidden residual slots, empty pool entries)
    holds NaN: the kernel must never let it reach the output."""
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, d, dv, n, nk, nv, C = (c[x] for x in ("B", "H", "d", "dv", "n", "nk", "nv", "C"))
    dt, nan = DTYPES[c["dtype"]], float("nan")
    chan = 10.0 ** (torch.rand(d, generator=gen) * 2 - 1)  # per-channel magnitudes (outlier channels)
    keys = torch.randn(B, H, n + c["kgroup"], d, generator=gen) * chan + torch.randn(d, generator=gen)
    keys = keys.to(dt)
    values = torch.randn(B, H, n + 3, dv, generator=gen).to(dt)
    capk = nk + c["kgroup"]  # one quantized group more than used, with NaN statistics
    qk = Q.quantize_keys(keys[:, :, :capk], c["kbits"], c["kgroup"], stat_dtype=c["stat"])
    qk.scale[:, :, nk // c["kgroup"]:] = nan
    qk.min[:, :, nk // c["kgroup"]:] = nan
    qv = Q.quantize_values(values[:, :, :nv + 3], c["vbits"], c["vgroup"], stat_dtype=c["stat"])
    qv.scale[:, :, nv:] = nan
    qv.min[:, :, nv:] = nan
    rk = torch.cat([keys[:, :, nk:n], torch.full((B, H, 2, d), nan, dtype=dt)], 2)
    rv = torch.cat([values[:, :, nv:n], torch.full((B, H, 2, dv), nan, dtype=dt)], 2)
    ok = None
    if c["ok"] != "none":
        ok = torch.rand(B, H, n + 4, generator=gen) < 0.7
        if c["ok"] == "heads_off":
            ok[0, 0] = False
        hidden = ~ok[:, :, :n]
        rk[:, :, :n - nk][hidden[:, :, nk:]] = nan
        rv[:, :, :n - nv][hidden[:, :, nv:]] = nan
    pool_k = pool_v = pool_ok = None
    if C:
        pool_k = torch.randn(B, H, C, d, generator=gen).to(dt) * chan.to(dt)
        pool_v = torch.randn(B, H, C, dv, generator=gen).to(dt)
        pool_ok = torch.rand(B, H, C, generator=gen) < 0.6
        if c["ok"] == "heads_off":
            pool_ok[0, 0] = False
        pool_k[~pool_ok], pool_v[~pool_ok] = nan, nan
    q = torch.randn(B, H * c["g"], 1, d, generator=gen).to(dt)
    kv = QuantKV(qk.codes, qk.scale, qk.min, qv.codes, qv.scale, qv.min, rk, rv, ok, pool_k, pool_v, pool_ok,
                 c["kbits"], c["kgroup"], c["vbits"], c["vgroup"], n, nk, nv)
    return q, kv


def _run_decode(c):
    q, kv = build_store(c)
    scale = c["d"] ** -0.5
    with pytest.MonkeyPatch.context() as mp:  # exercise block sizes and split-K on small stores
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", c["min_split"])
        mp.setattr(configs, "QUANT_DECODE_CONFIGS", (configs.AttnConfig(0, c["block_n"], 4, 1),))
        got = launch_quant.quant_decode_attention(q, kv, scale=scale)
    Hq = c["H"] * c["g"]
    assert got[0].shape == (c["B"], Hq, 1, c["dv"]) and got[1].shape == (c["B"], Hq, 1)
    o_g, l_g, V, mag = dense_golden(q, kv, scale)
    check_quant_attention(got, quant_attention_reference(q, kv, scale=scale), (o_g, l_g), V, mag, c["d"],
                          f"quant decode {c}")
    if c["ok"] == "heads_off":  # KV head 0 of row 0 sees nothing: its query heads are empty
        assert (got[1][0, :c["g"]] == float("-inf")).all() and (got[0][0, :c["g"]] == 0).all()


@SETTINGS
@given(decode_cases())
def test_quant_decode_kernel_matches_reference(c):
    _run_decode(c)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_quant_decode_boundaries(dtype):
    # nk = n (no residual keys), nv = 0 (no quantized values), a block straddling nothing, pool.
    base = dict(B=1, H=2, g=4, d=64, dv=64, kbits=4, vbits=2, kgroup=32, vgroup=64, ok="random", dtype=dtype,
                stat=torch.float16, block_n=32, min_split=16, seed=7)
    _run_decode(dict(base, n=64, nk=64, nv=0, C=3))
    _run_decode(dict(base, n=40, nk=0, nv=40, C=0, kbits=8, kgroup=64, vgroup=8, block_n=16))


def _stack_rows(stores):
    """One QuantKV with per-row counts from single-row stores (each padded along its slot axis with
    NaN statistics / residual slots and junk codes, which a row must never read past its counts)."""
    kvs = [kv for _, kv in stores]
    fields = {}
    for f in ("kcodes", "kscale", "kmin", "vcodes", "vscale", "vmin", "rk", "rv", "ok", "pool_k", "pool_v",
              "pool_ok"):
        ts = [getattr(kv, f) for kv in kvs]
        if ts[0] is None:
            fields[f] = None
            continue
        size = max(t.shape[2] for t in ts)
        fill = {torch.int32: -1, torch.bool: False}.get(ts[0].dtype, float("nan"))
        pads = [t.new_full((*t.shape[:2], size - t.shape[2], *t.shape[3:]), fill) for t in ts]
        fields[f] = torch.cat([torch.cat([t, pad], 2) for t, pad in zip(ts, pads)])
    rows = torch.tensor([[kv.n, kv.nk, kv.nv] for kv in kvs], dtype=torch.int32)
    kv = dataclasses.replace(kvs[0], **fields, n=max(kv.n for kv in kvs), nk=max(kv.nk for kv in kvs),
                             nv=max(kv.nv for kv in kvs), rows=rows)
    return torch.cat([q for q, _ in stores]), kv


@pytest.mark.parametrize("dtype,pool,ok", [("fp32", 3, "random"), ("fp16", 0, "none")])
def test_quant_decode_per_row_counts(dtype, pool, ok):
    """A left-padded batch: each row with its own (n, nk, nv) (kv.rows). The kernel and the
    reference give every row what its own single-row store gives (the reference bit for bit)."""
    base = dict(B=1, H=2, g=2, d=64, dv=64, kbits=2, vbits=2, kgroup=32, vgroup=32, C=pool, ok=ok,
                dtype=dtype, stat=torch.float16, block_n=32, min_split=16)
    counts = [(150, 128, 22), (60, 0, 0), (97, 64, 0), (0, 0, 0)]
    stores = [build_store(dict(base, n=n, nk=nk, nv=nv, seed=11 + i)) for i, (n, nk, nv) in enumerate(counts)]
    q, kv = _stack_rows(stores)
    scale = 0.125
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", 16)
        mp.setattr(configs, "QUANT_DECODE_CONFIGS", (configs.AttnConfig(0, 32, 4, 1),))
        got = launch_quant.quant_decode_attention(q, kv, scale=scale)
    ref = quant_attention_reference(q, kv, scale=scale)
    for b, (q_b, kv_b) in enumerate(stores):
        alone = quant_attention_reference(q_b, kv_b, scale=scale)
        assert torch.equal(ref[0][b:b + 1], alone[0]) and torch.equal(ref[1][b:b + 1], alone[1]), b
        o_g, l_g, V, mag = dense_golden(q_b, kv_b, scale)
        check_quant_attention((got[0][b:b + 1], got[1][b:b + 1]), alone, (o_g, l_g), V, mag, 64, f"row {b}")
    if not pool:  # a row with no slot (and no pool) sees nothing
        assert (got[1][3] == float("-inf")).all() and (got[0][3] == 0).all()
    with pytest.raises(ValueError, match=r"kv.rows\[1\] has nk=16, not a multiple of kv.kgroup=32"):
        launch_quant.quant_decode_attention(q, dataclasses.replace(kv, rows=kv.rows + torch.tensor(
            [[0, 0, 0], [0, 16, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.int32)), scale=scale)
    with pytest.raises(ValueError, match=r"kv.rows\[0\] = \(n=151"):
        launch_quant.quant_decode_attention(q, dataclasses.replace(kv, rows=kv.rows + torch.tensor(
            [[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.int32)), scale=scale)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_reference_matches_dense_attention_over_dequantized_cache(q_dtype):
    # quant_attention_reference itself, against the float64 golden above (no kernel involved).
    for seed, (kbits, vbits, kgroup, vgroup, n, nk, nv, C, ok) in enumerate(
            [(2, 4, 32, 32, 90, 64, 70, 4, "random"), (8, 2, 4, 16, 9, 8, 0, 0, "none"),
             (4, 8, 16, 64, 16, 16, 16, 2, "heads_off"), (2, 2, 16, 32, 5, 0, 5, 0, "random")]):
        c = dict(B=2, H=2, g=3, d=64, dv=64, kbits=kbits, vbits=vbits, kgroup=kgroup, vgroup=vgroup, n=n,
                 nk=nk, nv=nv, C=C, ok=ok, dtype="fp32", stat=torch.float16, seed=seed)
        q, kv = build_store(c)
        q = q.to(q_dtype)
        o, lse = quant_attention_reference(q, kv, scale=0.125, chunk=32)  # several chunks
        o_g, l_g, V, _ = dense_golden(q, kv, 0.125)
        assert o.dtype == q_dtype and lse.dtype == torch.float32
        empty = l_g == float("-inf")
        assert torch.equal(lse == float("-inf"), empty) and (o[empty] == 0).all()
        vmax = V.abs().max().item()
        tol = (2.0**-10 if q_dtype == torch.float16 else 2e-5) * vmax + 1e-6
        assert (o.double() - o_g).abs().max().item() <= tol, (c, q_dtype)
        assert (lse.double() - l_g)[~empty].abs().max().item() <= 1e-5 * (1 + l_g[~empty].abs().max().item())


def test_quant_decode_argument_errors():
    c = dict(B=1, H=2, g=2, d=64, dv=64, kbits=2, vbits=4, kgroup=32, vgroup=32, n=40, nk=32, nv=32, C=0,
             ok="none", dtype="fp32", stat=torch.float16, seed=0)
    q, kv = build_store(c)
    run = launch_quant.quant_decode_attention
    with pytest.raises(ValueError, match=r"q must be a \(B, Hq, 1, d\) tensor"):
        run(q.expand(1, 4, 2, 64), kv, scale=0.1)
    with pytest.raises(ValueError, match="kv must be a kvfx.methods.quant_attention.QuantKV"):
        run(q, {}, scale=0.1)
    with pytest.raises(ValueError, match="kv.kbits got 3, expected one of 2, 4, 8"):
        run(q, dataclasses.replace(kv, kbits=3), scale=0.1)
    with pytest.raises(ValueError, match=r"kv.kgroup got 48, expected a power of two"):
        run(q, dataclasses.replace(kv, kgroup=48), scale=0.1)
    with pytest.raises(ValueError, match="kv.nk=16 must be a multiple of kv.kgroup=32"):
        run(q, dataclasses.replace(kv, nk=16), scale=0.1)
    with pytest.raises(ValueError, match=r"kv.rk holds 10 slots, expected at least n - nk = 18"):
        run(q, dataclasses.replace(kv, n=50), scale=0.1)
    with pytest.raises(ValueError, match="q has 4 heads and the store 3"):
        run(q, dataclasses.replace(kv, kcodes=kv.kcodes[:, :1].expand(1, 3, -1, -1)), scale=0.1)
    with pytest.raises(ValueError, match="all tensors or all None"):
        run(q, dataclasses.replace(kv, pool_k=kv.rk), scale=0.1)
    with pytest.raises(ValueError, match="scale must be a finite Python float"):
        run(q, kv, scale=float("nan"))


# --- quantize + pack -----------------------------------------------------------------------------

def make_keys(gen, shape, kind, dtype):
    """dyadic: multiples of 1/16 in [-8, 8] (norm sums exact in fp32, in any order); gauss:
    per-channel magnitudes and offsets over 3 decades, some flat channels, a few huge entries."""
    B, H, _, d = shape
    if kind == "dyadic":
        x = torch.randint(-128, 129, shape, generator=gen).double() / 16
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        x = x * 10.0 ** (torch.rand(d, generator=gen, dtype=torch.float64) * 3 - 2)
        x = x + torch.randn(d, generator=gen, dtype=torch.float64)
        flat = torch.rand(B, H, 1, d, generator=gen) < 0.15
        x = torch.where(flat, x[:, :, :1], x)
        big = torch.rand(shape, generator=gen) < 0.01
        x = torch.where(big, (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 3e4, x)
    return x.to(dtype)


@st.composite
def key_cases(draw):
    bits = draw(st.sampled_from(Q.BITS))
    group = draw(st.sampled_from([gr for gr in (4, 8, 16, 32, 64) if gr >= 32 // bits]))
    return dict(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), T=group * draw(st.integers(1, 3)),
        d=draw(st.sampled_from([16, 64, 128])), bits=bits, group=group,
        n_out=draw(st.sampled_from([0, 1, 2, 3]).filter(lambda x: x < group)),
        norm=draw(st.sampled_from(["l1", "l2"])),
        valid=draw(st.sampled_from(["none", "random", "group_off"])),
        data=draw(st.sampled_from(["dyadic", "gauss"])), dtype=draw(st.sampled_from(sorted(DTYPES))),
        stat=draw(st.sampled_from([None] + STATS)), seed=draw(st.integers(0, 2**16)),
    )


def _keys_case(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, T, d = c["B"], c["H"], c["T"], c["d"]
    k = make_keys(gen, (B, H, T, d), c["data"], DTYPES[c["dtype"]])
    valid = None
    if c["valid"] != "none":
        valid = torch.rand(B, H, T, generator=gen) < 0.75
        if c["valid"] == "group_off":
            valid[:, 0, :c["group"]] = False  # a group with no valid token
    return k, valid


def _check_decodes(k, qk, keep):
    """Invariants of the kernel's output alone: codes round-trip through unpack/pack and fit the bits;
    kept slots dequantize within half a step, excluded ones to their value clamped into the range."""
    B, H, T, d = k.shape
    G, L = qk.group, (1 << qk.bits) - 1
    codes = unpack(qk.codes, qk.bits, T, dim=-2)
    assert torch.equal(pack(codes, qk.bits, dim=-2), qk.codes) and int(codes.max()) <= L
    s = qk.scale.double().repeat_interleave(G, 2)
    m = qk.min.double().repeat_interleave(G, 2)
    x, xhat = k.double(), Q.dequantize_keys(qk, torch.float64)
    # A flat group (no kept token, or one repeated value equal to m) has codes 0: x_hat = m.
    kg, kp = x.view(B, H, T // G, G, d), keep.expand(B, H, T, d).reshape(B, H, T // G, G, d)
    lo = torch.where(kp, kg, float("inf")).amin(3)
    hi = torch.where(kp, kg, -float("inf")).amax(3)
    flat = (~kp.any(3) | ((lo == hi) & (hi == qk.min.double()))).repeat_interleave(G, 2)
    target = torch.where(keep, x, torch.where(flat, m, torch.minimum(torch.maximum(x, m), m + L * s)))
    err = (target - xhat).abs()
    tol = s / 2 + 2.0**-22 * ((target - m).abs() + xhat.abs())
    assert (err <= tol).all(), f"dequantization error {(err - tol).max().item():.3g} over half a step"


@SETTINGS
@given(key_cases())
def test_quant_compress_keys_bit_exact(c):
    k, valid = _keys_case(c)
    bits, group, n_out, norm, stat = c["bits"], c["group"], c["n_out"], c["norm"], c["stat"]
    kw = dict(valid=valid, stat_dtype=stat, excluded="clamp")
    try:
        want = (Q.quantize_keys(k, bits, group, **kw) if n_out == 0
                else Q.quantize_keys_with_outliers(k, bits, group, n_out, norm, **kw))
    except ValueError as e:  # stats out of the stat dtype's range: the kernel path raises the same
        with pytest.raises(ValueError, match="not finite"):
            launch_quant.quant_compress_keys(k, bits, group, valid=valid, n_out=n_out, norm=norm,
                                             stat_dtype=stat)
        assert "not finite" in str(e)
        return
    got = launch_quant.quant_compress_keys(k, bits, group, valid=valid, n_out=n_out, norm=norm,
                                           stat_dtype=stat)
    qk, rqk = (got[0], want[0]) if n_out else (got, want)
    if n_out:
        (_, idx, keys), (_, ridx, rkeys) = got, want
        if not torch.equal(idx, ridx):
            # Only a near tie may differ (fp32 norm sums in another order), never on exact sums.
            assert c["data"] != "dyadic", "outlier choice differs on exactly summable norms"
            assert torch.equal(idx >= 0, ridx >= 0)
            norms = Q.token_norms(k, norm).double()
            nk_, nr_ = (torch.gather(norms, 2, i.clamp(min=0).flatten(2)) for i in (idx, ridx))
            assert torch.allclose(nk_, nr_, rtol=1e-5, atol=0), "traced outliers are not a near tie"
            keep = ~qk.masked
            rqk = Q.quantize_keys(k, bits, group, valid=keep, stat_dtype=stat, excluded="clamp")
            ridx = idx
            pos = idx.clamp(min=0).flatten(2)[..., None].expand(-1, -1, -1, k.shape[-1])
            rkeys = torch.where((idx >= 0)[..., None], torch.gather(k, 2, pos).view(keys.shape), 0)
        assert torch.equal(idx, ridx) and idx.dtype == torch.int64
        assert _bits_equal(keys, rkeys)
    assert torch.equal(qk.codes, rqk.codes), "codes differ"
    assert _bits_equal(qk.scale, rqk.scale) and _bits_equal(qk.min, rqk.min), "statistics differ"
    assert (qk.masked is None) == (rqk.masked is None)
    if qk.masked is not None:
        assert torch.equal(qk.masked, rqk.masked)
    assert (qk.bits, qk.group, qk.dtype) == (bits, group, k.dtype)
    keep = torch.ones_like(k, dtype=torch.bool) if qk.masked is None else ~qk.masked[..., None]
    _check_decodes(k, qk, keep)


@SETTINGS
@given(st.sampled_from(Q.BITS), st.sampled_from([8, 16, 32, 64]), st.integers(1, 40),
       st.sampled_from([16, 64, 128]), st.sampled_from(sorted(DTYPES)), st.sampled_from([None] + STATS),
       st.integers(0, 2**16))
def test_quant_compress_values_bit_exact(bits, group, T, d, dtype, stat, seed):
    group = min(group, d)
    gen = torch.Generator().manual_seed(seed)
    v = make_keys(gen, (2, 2, T, d), "gauss", DTYPES[dtype]).transpose(-1, -2).contiguous().transpose(-1, -2)
    want = Q.quantize_values(v, bits, group, stat_dtype=stat)
    got = launch_quant.quant_compress_values(v, bits, group, stat_dtype=stat)
    assert torch.equal(got.codes, want.codes), "codes differ"
    assert _bits_equal(got.scale, want.scale) and _bits_equal(got.min, want.min), "statistics differ"
    assert (got.bits, got.group, got.dtype) == (bits, group, v.dtype)
    codes = unpack(got.codes, bits, d)
    assert torch.equal(pack(codes, bits), got.codes) and int(codes.max()) <= (1 << bits) - 1


def test_quant_compress_keys_range_excludes_outliers():
    # Channel 0 sits near +10 for every token but one, which is ~0 everywhere (the smallest norm):
    # traced, it leaves the range, and its code is the clamp of its own value (code 0).
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 64, generator=gen)
    k[..., 0] += 10
    k[:, :, [5, 40]] = 0.01 * torch.randn(1, 2, 2, 64, generator=gen)
    qk, idx, keys = launch_quant.quant_compress_keys(k, 2, 32, n_out=1)
    assert idx.flatten().tolist() == [5, 40, 5, 40]
    assert torch.equal(keys[:, :, :, 0], k[:, :, [5, 40]]) and qk.masked[:, :, [5, 40]].all()
    assert int(qk.masked.sum()) == 4
    m, s = qk.min.double(), qk.scale.double()
    kept = torch.ones(64, dtype=torch.bool)
    kept[[5, 40]] = False
    kg = k.double().view(1, 2, 2, 32, 64)
    lo = torch.where(kept.view(2, 32, 1), kg, float("inf")).amin(3)
    hi = torch.where(kept.view(2, 32, 1), kg, -float("inf")).amax(3)
    assert (m <= lo).all() and (m + 3 * s >= hi).all()  # covers every kept token
    assert (m[..., 0] > 5).all()  # ... and not the outlier's 0.01
    assert (unpack(qk.codes, 2, 64, dim=-2)[:, :, [5, 40], 0] == 0).all()
    plain = launch_quant.quant_compress_keys(k, 2, 32)
    assert (plain.min[..., 0] < 1).all()  # without tracing, the outlier stretches the range


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_quant_compress_nan_in_invalid_slots_and_errors():
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(1, 1, 32, 64, generator=gen)
    valid = torch.ones(1, 1, 32, dtype=torch.bool)
    valid[..., 3] = False
    k_nan = k.clone()
    k_nan[..., 3, :] = float("nan")
    got = launch_quant.quant_compress_keys(k_nan, 4, 32, valid=valid, n_out=2)
    want = Q.quantize_keys_with_outliers(k, 4, 32, 2, valid=valid, excluded="clamp")
    assert _bits_equal(got[0].scale, want[0].scale) and _bits_equal(got[0].min, want[0].min)
    keep = ~got[0].masked[0, 0]
    codes, ref_codes = (unpack(x.codes, 4, 32, dim=-2)[0, 0] for x in (got[0], want[0]))
    assert torch.equal(codes[keep], ref_codes[keep]) and int(codes[3].max()) == 0  # NaN -> code 0
    with pytest.raises(ValueError, match="not finite in torch.float16"):
        launch_quant.quant_compress_keys(k * 1e6, 2, 32)
    with pytest.raises(ValueError, match="T=32 tokens, not a multiple of group=64"):
        launch_quant.quant_compress_keys(k, 2, 64)
    with pytest.raises(ValueError, match=r"group got 8, expected a power of two in \[16, 1024\]"):
        launch_quant.quant_compress_keys(k, 2, 8)
    with pytest.raises(ValueError, match=r"n_out got 32, expected an int \[0, 31\]"):
        launch_quant.quant_compress_keys(k, 2, 32, n_out=32)
    with pytest.raises(ValueError, match="norm got 'l3'"):
        launch_quant.quant_compress_keys(k, 2, 32, n_out=1, norm="l3")
    with pytest.raises(ValueError, match="head_dim 48 not supported"):
        launch_quant.quant_compress_values(torch.randn(1, 1, 4, 48), 2, 16)
    with pytest.raises(ValueError, match=r"group got 128, expected a power of two in \[1, 64\]"):
        launch_quant.quant_compress_values(torch.randn(1, 1, 4, 64), 2, 128)
    with pytest.raises(ValueError, match="has dtype torch.float64"):
        launch_quant.quant_compress_values(torch.randn(1, 1, 4, 64, dtype=torch.float64), 2, 16)


# --- spec and rendering ------------------------------------------------------------------------------

DECODE = KernelSpec("quant_decode_attention", "fp16", 128, 4, key_bits=2, key_group=32, value_bits=4,
                    value_group=32, outlier_pool=True)
KEYS = KernelSpec("quant_compress", "bf16", 64, key_bits=4, key_group=32, outlier_norm="l1")
VALUES = KernelSpec("quant_compress", "fp32", 64, value_bits=2, value_group=16)


def test_quant_spec_uri_spells_every_quant_field():
    assert DECODE.uri == ("quant_decode_attention_dtype_fp16_hd_128_g_4_causal_0_scores_none_qbits_0_calib_0"
                          "_kq_2_32_vq_4_32_pool_1_onorm_none")
    changes = dict(key_bits=4, key_group=64, value_bits=2, value_group=16, outlier_pool=False)
    for name, value in changes.items():
        assert dataclasses.replace(DECODE, **{name: value}).uri != DECODE.uri, name
    assert dataclasses.replace(KEYS, outlier_norm="l2").uri != KEYS.uri
    assert "_kq_" not in KernelSpec("decode_attention", "fp16", 64).uri


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="decode_attention", key_bits=2, key_group=32),
     "key_bits: got 2 for decode_attention, expected 0"),
    (dict(key_bits=3), "key_bits: got 3, expected one of 0, 2, 4, 8"),
    (dict(key_group=48), "key_group: got 48, expected a power of two"),
    (dict(key_bits=2, key_group=8), "key_group: got 8, expected a multiple of 32 // key_bits = 16"),
    (dict(value_bits=0, value_group=0), "quant_decode_attention expects key_bits and value_bits"),
    (dict(outlier_norm="l1"), "outlier_norm='none'"),
    (dict(outlier_norm="import os"), "outlier_norm: got 'import os', expected one of none, l1, l2"),
    (dict(key_group="32"), r"key_group: got '32' \(str\), expected an int"),
    (dict(scores="last_row"), "expects causal=False, scores='none', quant_bits=0"),
    (dict(kind="quant_compress"), "quant_compress expects gqa_group=1, outlier_pool=False"),
    (dict(kind="quant_compress", gqa_group=1, outlier_pool=False, key_bits=0, key_group=0, outlier_norm="l2"),
     "outlier_norm: got 'l2' with key_bits=0"),
    (dict(kind="quant_compress", gqa_group=1, outlier_pool=False, value_group=256, head_dim=64),
     "value_group: got 256, expected at most head_dim=64"),
])
def test_quant_spec_rejects_invalid_fields(kwargs, match):
    fields = dict(dataclasses.asdict(DECODE), **kwargs)
    with pytest.raises(ValueError, match=match):
        KernelSpec(**fields)


@pytest.mark.parametrize("spec", [DECODE, dataclasses.replace(DECODE, outlier_pool=False), KEYS, VALUES,
                                  dataclasses.replace(KEYS, value_bits=8, value_group=64, outlier_norm="l2")],
                         ids=lambda s: s.uri)
def test_quant_render_is_deterministic_and_structural(spec):
    src = render(spec)
    assert src == render(dataclasses.replace(spec))
    ast.parse(src)
    assert f"# URI: {spec.uri}\n" in src and "{{" not in src and "{%" not in src
    code = src[src.index("import triton"):]
    if spec.kind == "quant_decode_attention":
        assert "def _kvfx_quant_decode_attention_kernel(" in code and f"KGROUP == {spec.key_group})" in code
        assert ("POOL_SIZE" in code) == spec.outlier_pool
    else:
        assert ("def _kvfx_quant_compress_keys_kernel(" in code) == bool(spec.key_bits)
        assert ("def _kvfx_quant_compress_values_kernel(" in code) == bool(spec.value_bits)
        assert ("OUT_IDX" in code) == (spec.outlier_norm != "none")
        assert ("tl.sqrt_rn" in code) == (spec.outlier_norm == "l2")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decode_cases(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_quant_decode_reads_a_narrow_residual(c, held):
    """quant.residual_dtype: an fp32 query over a store whose residual and outlier pool are held in
    float16/bfloat16 (tests/held_dtype.py). The kernel passes the oracle against the float64 golden
    of that store, and its output is within held_dtype.rounding_bound (the exact output's move
    under the rounding) plus its own measured error of the fp32-residual store's golden output."""
    from held_dtype import narrow, rounding_bound

    c = dict(c, dtype="fp32")
    q, kv = build_store(c)
    kv_n = narrow(kv, held)
    scale = c["d"] ** -0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", c["min_split"])
        mp.setattr(configs, "QUANT_DECODE_CONFIGS", (configs.AttnConfig(0, c["block_n"], 4, 1),))
        got = launch_quant.quant_decode_attention(q, kv_n, scale=scale)
    o_n, l_n, V, mag = dense_golden(q, kv_n, scale)
    check_quant_attention(got, quant_attention_reference(q, kv_n, scale=scale), (o_n, l_n), V, mag, c["d"],
                          f"narrow residual {held} {c}")
    o_w = dense_golden(q, kv, scale)[0]
    own = float((got[0].double() - o_n).abs().max()) if o_n.numel() else 0.0
    err = float((got[0].double() - o_w).abs().max()) if o_w.numel() else 0.0
    assert err <= rounding_bound(q, kv, scale, held) + own + 1e-12, (err, own)
