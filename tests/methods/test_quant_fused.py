"""The CPU read path of quantized stores: quant_attention_split (the reference's math as two
loop-free reductions) against quant_attention_reference, eager and compiled by inductor."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfx.methods.quant import QuantConfig
from kvfx.methods.quant_attention import (VALUE_BLOCK, quant_attention_reference, quant_attention_split,
                                          quant_key_logits, quant_value_sum)
from kvfx.runtime.qstore import QuantStore


def _store(cfg, lengths, steps, *, H=2, d=64, evict=False, seed=0):
    """A store fed like a left-padded batch (row b holds lengths[b] prompt tokens; with ``evict``
    a random half of them, positions kept), then ``steps`` decode appends with KIVI flushes."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    kept = [torch.randperm(n, generator=g)[:max(1, n // 2)].sort().values if evict else torch.arange(n)
            for n in lengths]
    m = max(len(x) for x in kept)
    k = torch.randn(B, H, m, d, generator=g) * torch.linspace(0.2, 3, d)
    v = torch.randn(B, H, m, d, generator=g)
    pos = torch.full((B, H, m), -1)
    count = torch.zeros(B, H, dtype=torch.long)
    for b, (n, idx) in enumerate(zip(lengths, kept)):
        pos[b, :, :len(idx)], count[b] = idx + L - n, len(idx)
    s = QuantStore("t", cfg)
    s.write_kept(k, v, pos, count, m + 1)
    for t in range(steps):
        s.append(torch.randn(B, H, 1, d, generator=g), torch.randn(B, H, 1, d, generator=g), torch.tensor([L + t]))
        s.flush()
    return s


def _close(got, want):
    (o, lse), (o_ref, lse_ref) = got, want
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    tol = 1e-5 * float(o_ref.abs().max()) + 1e-6
    assert float((o - o_ref).abs().max()) <= tol
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


CFGS = [QuantConfig(2, 32, 2, 32, residual=128), QuantConfig(4, 32, 4, 32, residual=64),
        QuantConfig(8, 16, 4, 16, residual=32), QuantConfig(2, 32, 2, 32, residual=32, per_group=1, pool=4),
        QuantConfig(4, 32, 2, 8, residual=64)]  # value groups of 8 < 16 codes per word


@settings(max_examples=12, deadline=None)
@given(cfg=st.sampled_from(CFGS), lengths=st.lists(st.integers(1, 260), min_size=1, max_size=3),
       steps=st.integers(0, 40), g=st.sampled_from([1, 3]), nq=st.sampled_from([1, 2]),
       evict=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_split_matches_reference(cfg, lengths, steps, g, nq, evict, masked, seed):
    """Any layout (padded rows, eviction, outlier pool, residual, value blocks padded from the
    buffers or cut with a dequantized tail), GQA, several queries, an additive mask: the split
    path equals the reference up to fp32 rounding."""
    s = _store(cfg, lengths, steps, evict=evict, seed=seed)
    kv = s.view()
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lengths), 2 * g, nq, 64, generator=gen)
    bias = None
    if masked:
        bias = torch.randn(len(lengths), 1, nq, kv.n + kv.pool_size, generator=gen)
        bias = bias.masked_fill(bias > 1.5, float("-inf"))
    want = quant_attention_reference(q, kv, scale=0.125, bias=bias)
    _close(quant_attention_split(q, kv, scale=0.125, bias=bias), want)


def test_split_row_that_sees_nothing_is_zero_with_lse_minus_inf():
    s = _store(CFGS[0], [200], 0)
    kv = s.view()
    q = torch.randn(1, 2, 1, 64)
    bias = torch.full((1, 1, 1, kv.n), float("-inf"))
    o, lse = quant_attention_split(q, kv, scale=0.125, bias=bias)
    assert torch.equal(o, torch.zeros_like(o)) and bool((lse == float("-inf")).all())


def test_value_blocks_read_padding_slots_as_exact_zeros():
    """value_sum over a block whose last slots have weight 0 adds exactly nothing for them, whatever
    finite codes and statistics those slots hold."""
    torch.manual_seed(0)
    B, H, T = 1, 2, 2 * VALUE_BLOCK
    vcodes = torch.randint(-2**31, 2**31 - 1, (B, H, T, 4), dtype=torch.int32)
    vscale, vmin = torch.rand(B, H, T, 2).half() + 0.1, torch.randn(B, H, T, 2).half()
    p = torch.rand(B, H, 3, T)
    full = quant_value_sum(p, vcodes, vscale, vmin, vbits=2, vgroup=32)
    p2 = p.clone()
    p2[..., VALUE_BLOCK + 5:] = 0
    vc2, vs2, vm2 = vcodes.clone(), vscale.clone(), vmin.clone()
    vc2[:, :, VALUE_BLOCK + 5:] = 12345
    vs2[:, :, VALUE_BLOCK + 5:] = 7
    vm2[:, :, VALUE_BLOCK + 5:] = -3
    a = quant_value_sum(p2, vcodes, vscale, vmin, vbits=2, vgroup=32)
    b = quant_value_sum(p2, vc2, vs2, vm2, vbits=2, vgroup=32)
    assert torch.equal(a, b) and not torch.equal(a, full)


@pytest.mark.slow
def test_compiled_reductions_match_reference_and_do_not_recompile_as_the_cache_grows():
    """The inductor-compiled reductions (kvfx.runtime.cpu_fused) give the reference's result and
    one compiled graph per function serves a growing store (slot counts dynamic): no graph is
    compiled after the first step."""
    from torch._dynamo.utils import counters

    from kvfx.runtime import cpu_fused

    s = _store(QuantConfig(2, 32, 2, 32, residual=128), [1100], 0, seed=3)
    q = torch.randn(1, 4, 1, 64)
    g0, graphs = counters["stats"]["unique_graphs"], []
    for t in range(3):
        kv = s.view()
        assert cpu_fused.use_compiled(q, kv)
        got = quant_attention_split(q, kv, scale=0.125, key_logits=cpu_fused.key_logits,
                                    value_sum=cpu_fused.value_sum)
        _close(got, quant_attention_reference(q, kv, scale=0.125))
        for _ in range(70):  # crosses a key flush (R = 128) and value blocks
            s.append(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), None)
            s.flush()  # a one-slot value flush: compiled too (a third graph)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] - g0 == 3 and graphs[-1] == graphs[0]  # keys, values, flush: once each


def test_key_logits_fold_dequantization_exactly_in_math():
    """quant_key_logits(q·scale, q·min, codes) is q·(code·scale + min) summed over channels."""
    from kvfx.methods.quant import dequantize_keys, quantize_keys
    from kvfx.methods.quant_attention import fold_query

    torch.manual_seed(1)
    k = torch.randn(1, 2, 64, 64)
    qk = quantize_keys(k, 2, 32)
    khat = dequantize_keys(qk).float()
    qf = torch.randn(1, 2, 3, 64)
    qs, qm = fold_query(qf, qk.scale, qk.min)
    got = quant_key_logits(qs, qm, qk.codes, kbits=2, kgroup=32)
    torch.testing.assert_close(got, qf @ khat.transpose(-1, -2), atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_compiled_value_flush_is_bit_identical_to_eager(dtype=torch.float32):
    """A decode step's one-slot value flush, compiled (kvfx.runtime.cpu_fused.quantize_values),
    writes exactly the eager quantize_values' codes and statistics (wide ranges, a flat group)."""
    from kvfx.methods.quant import quantize_values
    from kvfx.runtime import cpu_fused

    torch.manual_seed(2)
    sd = torch.float16 if dtype == torch.float32 else dtype
    for _ in range(3):
        v = (torch.randn(2, 4, 1, 64) * torch.logspace(-3, 3, 64)).to(dtype)
        v[0, 0, 0, :32] = 1.5
        codes, scale, mn = cpu_fused.quantize_values(v, 2, 32, sd)
        qv = quantize_values(v, 2, 32, stat_dtype=sd)
        assert torch.equal(codes, qv.codes)
        assert torch.equal(scale.view(torch.int16), qv.scale.view(torch.int16))
        assert torch.equal(mn.view(torch.int16), qv.min.view(torch.int16))
    bad = torch.full((1, 1, 1, 64), float("inf"), dtype=dtype)
    with pytest.raises(ValueError, match="not finite"):
        cpu_fused.quantize_values(bad, 2, 32, sd)
