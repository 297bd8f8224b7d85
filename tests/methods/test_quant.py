"""KIVI quantization, bit packing, outlier tokens tracing and byte accounting (kvfx.methods.quant).

Invariants, checked against independent definitions in float64:
* pack -> unpack is exact, and the layout is little-endian inside an int32 word;
* |x - x_hat| <= s/2 + 2^-22 (|x - m| + |x_hat|) per element (s, m the STORED scale and min;
  the second term is fp32 arithmetic, see the [Note] in kvfx/methods/quant.py);
* the stored range [m, m + L s] covers the group's [min, max] and is tight to one half-dtype ulp;
* invalid slots and traced outliers never influence a group's range;
* outliers round-trip bit-exactly through the pool, which keeps the smallest-norm entries;
* codes take bits/8 bytes per element; 2-bit KIVI at T=4096, d=64, R=128 is <= 0.22 of fp16.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfx.methods.quant import (OutlierPool, dense_bytes, dequantize_keys, dequantize_keys_block,
                                dequantize_values, dequantize_values_block, nbytes, pack,
                                quantize_keys, quantize_keys_with_outliers, quantize_values,
                                select_outliers, token_norms, unpack)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLACK = 2.0 ** -22  # fp32 arithmetic: 2u|x - m| + u|x_hat| with u = 2^-24, rounded up
FEW = settings(max_examples=40, deadline=None)
SOME = settings(max_examples=60, deadline=None)


# --- data ----------------------------------------------------------------------------------------

def make(seed, grouped_shape, gdim, dtype, log_spread=0.0, flat=False, outliers=False):
    """A tensor in grouped layout with per-channel magnitudes, optional flat groups and huge outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(grouped_shape, generator=g, dtype=torch.float64)
    chan = 10.0 ** (torch.rand(grouped_shape[-1], generator=g, dtype=torch.float64) * 3 - 2)
    x = (x * chan + torch.randn(grouped_shape[-1], generator=g, dtype=torch.float64)) * 10.0 ** log_spread
    if flat:  # about a third of the groups hold one repeated value
        first = x.narrow(gdim, 0, 1)
        pick = torch.rand(first.shape, generator=g) < 0.35
        x = torch.where(pick, first, x)
    if outliers:  # ~2% of the entries, up to +-3e4 (inside float16's range)
        hit = torch.rand(grouped_shape, generator=g) < 0.02
        big = (torch.rand(grouped_shape, generator=g, dtype=torch.float64) * 2 - 1) * 3e4
        x = torch.where(hit, big, x)
    return x.to(dtype)


def key_layout(B, H, T, d, group):
    return (B, H, T // group, group, d), 3


def value_layout(B, H, T, d, group):
    return (B, H, T, d // group, group), 4


def expand_stats(t, side, group):
    """Per-group stats -> per-element, float64."""
    return t.double().repeat_interleave(group, dim=2 if side == "keys" else 3)


def assert_half_step(x, xhat, s, m, where=None):
    x, xhat = x.double(), xhat.double()
    err = (x - xhat).abs()
    tol = s / 2 + SLACK * ((x - m).abs() + xhat.abs())
    ok = err <= tol
    if where is not None:
        ok |= ~where
    assert not torch.isnan(xhat).any()
    assert ok.all(), f"error exceeds half a step by {(err - tol)[~ok].max().item():.3g}"


def assert_tight_cover(xg, gdim, s, m, L, stat_dtype, valid=None):
    """Stored [m, m + L s] covers the (valid) group range, within one half-dtype ulp of it."""
    xg = xg.double()
    s, m = s.double().unsqueeze(gdim), m.double().unsqueeze(gdim)
    inf = float("inf")
    v = torch.ones_like(xg, dtype=torch.bool) if valid is None else valid.expand_as(xg)
    lo = torch.where(v, xg, inf).amin(gdim, keepdim=True)
    hi = torch.where(v, xg, -inf).amax(gdim, keepdim=True)
    has = v.any(gdim, keepdim=True)
    fi = torch.finfo(stat_dtype)
    eps, tiny = 2 * fi.eps, fi.tiny
    assert (~has | ((m <= lo) & (m >= lo - eps * lo.abs() - tiny))).all(), "min not rounded down tightly"
    assert (~has | (m + L * s >= hi)).all(), "stored range misses the group max"
    span = torch.where(has, (hi - m) / L, 0.0)
    assert (~has | (span == 0) | (s <= span * (1 + eps) + tiny)).all(), "scale not rounded up tightly"
    assert (has | ((s == 1) & (m == 0))).all(), "a group without valid tokens must get scale 1, min 0"


# --- bit packing ---------------------------------------------------------------------------------

@st.composite
def pack_cases(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    n = (32 // bits) * draw(st.integers(1, 4))
    dim = draw(st.sampled_from([-1, 0])) if lead else -1
    dtype = draw(st.sampled_from([torch.uint8, torch.int32, torch.int64]))
    return bits, lead, n, dim, dtype, draw(st.integers(0, 2**16))


@SOME
@given(pack_cases())
def test_pack_unpack_exact_and_little_endian(case):
    bits, lead, n, dim, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    shape = [*lead, n] if dim == -1 else [n, *lead]
    codes = torch.randint(0, 1 << bits, shape, generator=g).to(dtype)
    codes.view(-1)[0] = (1 << bits) - 1  # the top code sets the sign bit of some word
    words = pack(codes, bits, dim=dim)
    per = 32 // bits
    assert words.dtype == torch.int32 and words.shape[dim] == n // per
    assert torch.equal(unpack(words, bits, n, dim=dim), codes.to(torch.uint8))
    rows = codes.movedim(dim, -1).reshape(-1, n).tolist()
    got = words.movedim(dim, -1).reshape(-1, n // per).tolist()
    for row, wrow in zip(rows, got):
        for w in range(n // per):
            want = sum(c << (i * bits) for i, c in enumerate(row[w * per:(w + 1) * per]))
            assert wrow[w] & 0xFFFFFFFF == want  # code i of a word at bit (i % per_word) * bits


def test_pack_layout_example():
    codes = torch.zeros(16, dtype=torch.uint8)
    codes[0], codes[1], codes[15] = 1, 2, 3
    (word,) = pack(codes, 2).tolist()
    assert word & 0xFFFFFFFF == 1 | (2 << 2) | (3 << 30)
    assert pack(torch.tensor([0x12, 0x34, 0x56, 0x78], dtype=torch.uint8), 8).item() == 0x78563412


@pytest.mark.parametrize("call, match", [
    (lambda: pack(torch.zeros(10, dtype=torch.uint8), 2), r"10 codes, expected a multiple of 16"),
    (lambda: pack(torch.zeros(16, dtype=torch.uint8), 3), r"bits: got 3, expected one of 2, 4, 8"),
    (lambda: pack(torch.full((8,), 16, dtype=torch.uint8), 4), r"codes span \[16, 16\], expected \[0, 15\]"),
    (lambda: pack(torch.zeros(16), 2), r"not an integer dtype"),
    (lambda: unpack(torch.zeros(2, dtype=torch.int32), 2, 16), r"holds 2 words, expected .* = 1"),
    (lambda: unpack(torch.zeros(1, dtype=torch.int32), 4, 12), r"n=12 is not a multiple of 8"),
    (lambda: unpack(torch.zeros(1, dtype=torch.int64), 4, 8), r"expected torch.int32"),
])
def test_pack_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- quantize -> dequantize ----------------------------------------------------------------------

@st.composite
def quant_cases(draw, side):
    bits = draw(st.sampled_from([2, 4, 8]))
    group = draw(st.sampled_from([16, 32, 64]))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    if side == "keys":
        T, d = group * draw(st.integers(1, 3)), draw(st.integers(1, 8))
    else:
        T, d = draw(st.integers(1, 5)), group * draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(DTYPES))
    log_spread = draw(st.floats(-4, 3))
    return (bits, group, (B, H, T, d), dtype, log_spread, draw(st.booleans()), draw(st.booleans()),
            draw(st.integers(0, 2**16)))


def quantize(side, x, bits, group):
    if side == "keys":
        q = quantize_keys(x, bits, group)
        return q, dequantize_keys(q, dtype=torch.float32)
    q = quantize_values(x, bits, group)
    return q, dequantize_values(q, dtype=torch.float32)


@pytest.mark.parametrize("side", ["keys", "values"])
@FEW
@given(data=st.data())
def test_error_within_half_step(side, data):
    bits, group, shape, dtype, log_spread, flat, outl, seed = data.draw(quant_cases(side))
    layout, gdim = (key_layout if side == "keys" else value_layout)(*shape, group)
    x = make(seed, layout, gdim, dtype, log_spread, flat, outl).reshape(shape)
    q, xhat = quantize(side, x, bits, group)
    stat = dtype if dtype != torch.float32 else torch.float16
    assert q.scale.dtype == q.min.dtype == stat and q.shape == shape
    assert_half_step(x, xhat, expand_stats(q.scale, side, group), expand_stats(q.min, side, group))
    default = dequantize_keys(q) if side == "keys" else dequantize_values(q)
    assert default.dtype == dtype  # default output dtype: the input's


@pytest.mark.parametrize("side", ["keys", "values"])
@FEW
@given(data=st.data())
def test_dequantized_within_group_range(side, data):
    bits, group, shape, dtype, log_spread, flat, outl, seed = data.draw(quant_cases(side))
    layout, gdim = (key_layout if side == "keys" else value_layout)(*shape, group)
    x = make(seed, layout, gdim, dtype, log_spread, flat, outl)
    q, xhat = quantize(side, x.reshape(shape), bits, group)
    L = (1 << bits) - 1
    s, m = expand_stats(q.scale, side, group), expand_stats(q.min, side, group)
    xhat, top = xhat.double(), m + L * s
    assert ((xhat >= m) & (xhat <= top + SLACK * top.abs())).all()  # inside the stored range
    assert_tight_cover(x, gdim, q.scale, q.min, L, q.scale.dtype)  # which is the group's, to an ulp
    lo, hi = x.double().amin(gdim, keepdim=True), x.double().amax(gdim, keepdim=True)
    xg, sg = xhat.reshape(layout), q.scale.double().unsqueeze(gdim)
    tol = sg / 2 + SLACK * (lo.abs() + hi.abs() + xg.abs() + L * sg)
    assert ((xg >= lo - tol) & (xg <= hi + tol)).all()  # and the group's own [min, max], +- half a step


def test_flat_groups_are_exact_and_never_nan():
    for x in (torch.zeros(1, 1, 32, 4), torch.full((1, 1, 32, 4), 3.0), torch.full((1, 1, 32, 4), -2.5)):
        for bits in (2, 4, 8):
            qk = quantize_keys(x, bits, 32)
            assert torch.equal(qk.scale, torch.ones_like(qk.scale)) and not qk.codes.any()
            assert torch.equal(dequantize_keys(qk), x)
            qv = quantize_values(x.transpose(2, 3).contiguous(), bits, 32)
            assert torch.equal(dequantize_values(qv), x.transpose(2, 3))
    x = torch.full((1, 1, 32, 4), 0.1)  # not a float16: min rounds down, a tiny scale covers it
    qk = quantize_keys(x, 2, 32)
    assert_half_step(x, dequantize_keys(qk, torch.float32), expand_stats(qk.scale, "keys", 32),
                     expand_stats(qk.min, "keys", 32))


def test_shapes_and_stat_dtype():
    k, v = torch.randn(2, 3, 128, 64), torch.randn(2, 3, 7, 64)
    qk = quantize_keys(k, 2, 32)
    assert qk.codes.shape == (2, 3, 8, 64) and qk.codes.dtype == torch.int32
    assert qk.scale.shape == qk.min.shape == (2, 3, 4, 64) and qk.masked is None
    qv = quantize_values(v, 4, 32, stat_dtype=torch.bfloat16)
    assert qv.codes.shape == (2, 3, 7, 8) and qv.scale.shape == (2, 3, 7, 2)
    assert qv.scale.dtype == torch.bfloat16
    assert quantize_keys(k.half(), 8, 32).scale.dtype == torch.float16


@st.composite
def block_cases(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    group = draw(st.sampled_from([4, 8, 16, 32]))  # 4, 8: words straddle groups (2- and 4-bit)
    unit = max(group, 32 // bits)
    n_groups = unit * draw(st.integers(1, 3)) // group
    start = draw(st.integers(0, n_groups - 1))
    return bits, group, n_groups, start, draw(st.integers(1, n_groups - start)), draw(st.integers(0, 999))


@SOME
@given(block_cases())
def test_blocks_match_full_dequantization(case):
    bits, group, n_groups, start, n, seed = case
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, n_groups * group, 5, generator=g)
    qk = quantize_keys(k, bits, group)
    full = dequantize_keys(qk)
    assert torch.equal(dequantize_keys_block(qk, start, n), full[:, :, start * group:(start + n) * group])
    v = torch.randn(1, 2, n_groups, 32, generator=g)
    qv = quantize_values(v, bits, 16 if group > 16 else group)
    assert torch.equal(dequantize_values_block(qv, start, n), dequantize_values(qv)[:, :, start:start + n])


def test_compiled_quantization_matches_eager():
    """Inductor keeps float16 intermediates in float32 and miscompiles float16 nextafter; the
    statistics are decided on bit patterns so the compiled codes and stats are the eager ones."""
    def both(k):
        qk, qv = quantize_keys(k, 2, 32), quantize_values(k, 4, 16)
        return qk.codes, qk.scale, qk.min, qv.codes, qv.scale, qv.min

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 64, 16, generator=g) * torch.logspace(-3, 3, 16)
    for got, want in zip(torch.compile(both, fullgraph=True)(k), both(k)):
        assert torch.equal(got, want)


# --- invalid slots --------------------------------------------------------------------------------

@SOME
@given(st.sampled_from([2, 4, 8]), st.sampled_from([16, 32, 64]), st.integers(1, 3), st.sampled_from(DTYPES),
       st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_invalid_slots_never_influence_ranges(bits, group, n_groups, dtype, p_valid, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, T, d = 2, 2, n_groups * group, 6
    x = make(seed, (B, H, n_groups, group, d), 3, dtype, 0.0, True, True).reshape(B, H, T, d)
    valid = torch.rand(B, H, T, generator=g) < p_valid
    valid[0, 0, :group] = False  # one group with no valid token
    junk = torch.tensor([float("nan"), float("inf"), -1e30, 7e4], dtype=torch.float32)
    noise = junk[torch.randint(0, 4, (B, H, T, d), generator=g)].to(dtype)
    y = torch.where(valid[..., None], x, noise)  # only the invalid slots differ
    qx, qy = quantize_keys(x, bits, group, valid=valid), quantize_keys(y, bits, group, valid=valid)
    assert torch.equal(qx.scale, qy.scale) and torch.equal(qx.min, qy.min)
    assert torch.equal(qx.masked, ~valid) and torch.equal(qy.masked, ~valid)
    cx, cy = unpack(qx.codes, bits, T, dim=-2), unpack(qy.codes, bits, T, dim=-2)
    assert torch.equal(torch.where(valid[..., None], cx, 0), torch.where(valid[..., None], cy, 0))
    L = (1 << bits) - 1
    assert_tight_cover(x.reshape(B, H, n_groups, group, d), 3, qx.scale, qx.min, L, qx.scale.dtype,
                       valid=valid.reshape(B, H, n_groups, group, 1))
    xhat = dequantize_keys(qy, torch.float32)
    assert not torch.isnan(xhat).any()
    assert_half_step(x, xhat, expand_stats(qx.scale, "keys", group), expand_stats(qx.min, "keys", group),
                     where=valid[..., None].expand_as(x))


# --- outlier tokens tracing -----------------------------------------------------------------------

@SOME
@given(st.integers(1, 12), st.integers(0, 4), st.sampled_from(["l1", "l2"]), st.booleans(), st.booleans(),
       st.integers(0, 2**16))
def test_select_outliers_are_smallest_norms(G, n_out, norm, ints, masked, seed):
    g = torch.Generator().manual_seed(seed)
    n_out = min(n_out, G)
    if ints:  # small integers: many ties
        k = torch.randint(-2, 3, (2, 3, G, 4), generator=g).float()
    else:
        k = torch.randn(2, 3, G, 4, generator=g)
    valid = torch.rand(2, 3, G, generator=g) < 0.7 if masked else None
    idx = select_outliers(k, n_out, norm, valid=valid)
    p = 1 if norm == "l1" else 2
    S = k.double().abs().pow(p).sum(-1).pow(1 / p)
    for b in range(2):
        for h in range(3):
            cand = [i for i in range(G) if valid is None or valid[b, h, i]]
            want = sorted(cand, key=lambda i: (S[b, h, i].item(), i))[:n_out]  # ties: lower position
            assert idx[b, h].tolist() == want + [-1] * (n_out - len(want))


@FEW
@given(st.sampled_from([2, 4]), st.sampled_from([16, 32]), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from(["l1", "l2"]), st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**16))
def test_outliers_leave_their_group_and_come_back_exact(bits, group, n_groups, n_out, norm, dtype, masked,
                                                        seed):
    g = torch.Generator().manual_seed(seed)
    B, H, T, d = 2, 2, n_groups * group, 8
    off = torch.rand(d, generator=g) * 40 + 10  # outlier channels: large, positive keys
    k = torch.randn(B, H, T, d, generator=g) + off
    planted = torch.randint(0, group, (B, H, n_groups), generator=g) + torch.arange(n_groups) * group
    small = 0.01 * torch.randn(B, H, n_groups, d, generator=g)  # one small-norm token a group
    k.scatter_(2, planted[..., None].expand(B, H, n_groups, d), small)
    k = k.to(dtype)
    v = torch.randn(B, H, T, d, generator=g).to(dtype)
    valid = torch.rand(B, H, T, generator=g) < 0.8 if masked else None
    if valid is not None:
        valid.scatter_(2, planted, True)
    qk, idx, ko = quantize_keys_with_outliers(k, bits, group, n_out, norm, valid)
    assert idx.shape == (B, H, n_groups, n_out) and ko.shape == (B, H, n_groups, n_out, d)
    assert torch.equal(idx[..., 0], planted)  # the planted small-norm key is the first outlier
    is_out = torch.zeros(B, H, T, dtype=torch.bool)
    is_out.scatter_(2, idx.clamp(min=0).flatten(2), (idx >= 0).flatten(2))
    keep = ~is_out if valid is None else valid & ~is_out
    assert torch.equal(qk.masked, ~keep)
    ref = quantize_keys(k, bits, group, valid=keep)  # outliers are treated like invalid slots
    assert torch.equal(qk.scale, ref.scale) and torch.equal(qk.min, ref.min)
    assert torch.equal(qk.codes, ref.codes)
    L = (1 << bits) - 1
    assert_tight_cover(k.reshape(B, H, n_groups, group, d), 3, qk.scale, qk.min, L, qk.scale.dtype,
                       valid=keep.reshape(B, H, n_groups, group, 1))
    at_planted = torch.gather(k, 2, planted[..., None].expand(B, H, n_groups, d)).double()
    assert (qk.min.double() > at_planted).all()  # the range excludes the planted outlier
    hit = idx >= 0
    gathered = torch.gather(k, 2, idx.clamp(min=0).flatten(2)[..., None].expand(B, H, -1, d))
    assert torch.equal(ko.flatten(2, 3)[hit.flatten(2)], gathered[hit.flatten(2)])  # bit-exact
    pool = OutlierPool(B, H, n_groups * n_out, d, dtype=dtype)
    vo = torch.gather(v, 2, idx.clamp(min=0).flatten(2)[..., None].expand(B, H, -1, d))
    ev = pool.add(ko.flatten(2, 3), vo, idx.flatten(2), token_norms(ko, norm).flatten(2))
    assert (ev.pos < 0).all()  # the pool had room for all of them
    for b in range(B):
        for h in range(H):
            occ = pool.occupied[b, h]
            pos = pool.pos[b, h][occ].long()
            assert sorted(pos.tolist()) == sorted(i for i in idx[b, h].flatten().tolist() if i >= 0)
            assert torch.equal(pool.keys[b, h][occ], k[b, h, pos])  # bit-exact keys and values
            assert torch.equal(pool.values[b, h][occ], v[b, h, pos])


@SOME
@given(st.integers(1, 6), st.lists(st.integers(1, 5), min_size=1, max_size=4), st.booleans(),
       st.integers(0, 2**16))
def test_pool_keeps_smallest_norms_and_returns_the_rest(capacity, rounds, ints, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, d = 1, 2, 3
    pool = OutlierPool(B, H, capacity, d, dtype=torch.float32)
    offered = [[] for _ in range(H)]  # (norm, arrival, pos)
    evicted = [[] for _ in range(H)]
    next_pos = 0
    for n in rounds:
        pos = torch.arange(next_pos, next_pos + n).expand(B, H, n).clone()
        next_pos += n
        pos[torch.rand(B, H, n, generator=g) < 0.2] = -1  # no entry in these rows
        norms = (torch.randint(0, 3, (B, H, n), generator=g).float() if ints
                 else torch.rand(B, H, n, generator=g))
        keys = pos[..., None].float().expand(B, H, n, d).clone()  # each key spells its position
        ev = pool.add(keys, -keys, pos, norms)
        assert ev.pos.shape == (B, H, n)
        for h in range(H):
            for j in range(n):
                if pos[0, h, j] >= 0:
                    offered[h].append((norms[0, h, j].item(), int(pos[0, h, j]), int(pos[0, h, j])))
            gone = ev.pos[0, h][ev.pos[0, h] >= 0]
            assert torch.equal(ev.keys[0, h][ev.pos[0, h] >= 0][:, 0], gone.float())
            evicted[h] += gone.tolist()
    for h in range(H):
        want = sorted(offered[h])[:capacity]  # smallest norm; ties keep the earlier entry
        held = pool.pos[0, h][pool.occupied[0, h]]
        assert sorted(held.tolist()) == sorted(p for _, _, p in want)
        assert torch.equal(pool.keys[0, h][pool.occupied[0, h]][:, 0], held.float())
        assert torch.equal(pool.values[0, h][pool.occupied[0, h]][:, 0], -held.float())
        assert sorted(evicted[h] + held.tolist()) == sorted(p for _, _, p in offered[h])
        assert int(pool.count[0, h]) == min(capacity, len(offered[h]))


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: quantize_keys(torch.randn(1, 1, 48, 4), 2, 32), r"T=48 is not a multiple of group=32"),
    (lambda: quantize_keys(torch.randn(1, 1, 24, 4), 2, 8), r"T=24 is not a multiple of group=16"),
    (lambda: quantize_keys(torch.randn(1, 32, 4), 2, 32), r"expected a floating \(B, H, T, d\)"),
    (lambda: quantize_keys(torch.randn(1, 1, 32, 4), 5, 32), r"bits: got 5, expected one of 2, 4, 8"),
    (lambda: quantize_values(torch.randn(1, 1, 3, 48), 2, 32), r"d=48 is not a multiple of group=32"),
    (lambda: quantize_keys(torch.randn(1, 1, 32, 4), 2, 32, stat_dtype=torch.float64), r"stat_dtype: got"),
    (lambda: quantize_keys(torch.full((1, 1, 32, 4), -1e5), 2, 32), r"not finite in torch.float16.*bfloat16"),
    (lambda: quantize_keys(torch.randn(1, 1, 32, 4), 2, 32, valid=torch.ones(1, 1, 16, dtype=torch.bool)),
     r"valid: shape \(1, 1, 16\) does not broadcast"),
    (lambda: quantize_keys_with_outliers(torch.randn(1, 1, 32, 4), 2, 32, 32), r"n_out: got 32, expected"),
    (lambda: quantize_keys_with_outliers(torch.randn(1, 1, 32, 4), 2, 32, 1, "l3"), r"norm: got 'l3'"),
    (lambda: dequantize_keys_block(quantize_keys(torch.randn(1, 1, 64, 4), 2, 32), 1, 2),
     r"groups \[1, 3\) are outside \[0, 2\)"),
    (lambda: OutlierPool(1, 1, 0, 4), r"capacity: got 0"),
    (lambda: OutlierPool(1, 1, 2, 4).add(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4, dtype=torch.half),
                                         torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)),
     r"keys dtype torch.float32"),
    (lambda: OutlierPool(1, 1, 2, 4).add(torch.zeros(1, 1, 1, 5, dtype=torch.half),
                                         torch.zeros(1, 1, 1, 4, dtype=torch.half),
                                         torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)), r"keys has shape"),
])
def test_errors_name_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- bytes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_take_bits_over_8_bytes_per_element(bits):
    B, H, T, d = 2, 3, 64, 32
    k = torch.randn(B, H, T, d, dtype=torch.float16)
    qk, qv = quantize_keys(k, bits, 32), quantize_values(k, bits, 32)
    for q, n_stats in ((qk, B * H * (T // 32) * d), (qv, B * H * T * (d // 32))):
        assert nbytes(q.codes) * 8 == B * H * T * d * bits
        assert nbytes(q) == nbytes(q.codes) + 2 * 2 * n_stats  # scale + min in fp16
    assert dense_bytes(B, H, T, d, torch.float16) == nbytes(k)
    qm = quantize_keys(k, bits, 32, valid=torch.ones(B, H, T, dtype=torch.bool))
    assert nbytes(qm) == nbytes(qk) + B * H * T  # the slot mask: one byte per slot


def cache_ratio(bits, outliers=None, B=1, H=2, T=4096, d=64, R=128, group=32):
    """Bytes of a KIVI cache built from real tensors over a dense fp16 K+V cache of T tokens."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, H, T, d, generator=g).half()
    v = torch.randn(B, H, T, d, generator=g).half()
    kq, vq, k_fp, v_fp = k[:, :, :T - R], v[:, :, :T - R], k[:, :, T - R:].clone(), v[:, :, T - R:].clone()
    parts = [quantize_values(vq, bits, group), k_fp, v_fp]
    if outliers is None:
        parts.append(quantize_keys(kq, bits, group))
    else:
        qk, idx, ko = quantize_keys_with_outliers(kq, bits, group, 1, "l1")
        pool = OutlierPool(B, H, outliers, d, dtype=torch.float16)
        vo = torch.gather(vq, 2, idx.flatten(2)[..., None].expand(B, H, -1, d))
        pool.add(ko.flatten(2, 3), vo, idx.flatten(2), token_norms(ko).flatten(2))
        parts += [qk, pool]
    return nbytes(parts) / (2 * dense_bytes(B, H, T, d, torch.float16))


def test_kivi2_cache_is_under_022_of_fp16():
    ratio = cache_ratio(2)
    # per token and head: codes 2 * 64 * 2 / 8 = 32 B, stats (keys per 32 tokens, values per token) 16 B
    assert ratio == pytest.approx((3968 * 48 + 128 * 256) / (4096 * 256))
    assert ratio <= 0.22, ratio


@pytest.mark.parametrize("bits, outliers, want", [
    (4, None, (3968 * 80 + 128 * 256) / (4096 * 256)),
    (2, 64, (3968 * 49 + 128 * 256 + 64 * (2 * 64 * 2 + 4 + 4)) / (4096 * 256)),  # + slot mask and pool
])
def test_other_cache_ratios(bits, outliers, want):
    assert cache_ratio(bits, outliers) == pytest.approx(want)
