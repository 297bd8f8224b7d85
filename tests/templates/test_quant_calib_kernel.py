"""The calibration=True quantized decode kernel (DESIGN rule 9: quantized slots, residual, outlier
pool and CaliDrop's partition meet in one split-K reduction), run by the interpreter on CPU.

* against `quant_attention_reference(..., calib=)` (quant attention, then `calidrop.merge` in
  fp32) with test_quant_kernels' oracle: a float64 golden from an independent dequantization,
  merged here in float64 with the calibration partition;
* heads with use = 0 (and every head when use is all False) are bit for bit the calib=None
  kernel's, and NaN in an unused (or empty, lse_e = -inf) o_e never reaches the output;
* at a stored query whose (o_e, lse_e) come from explicit extra keys/values (calidrop's history),
  the output is attention over the union of the store's dequantized view and those tokens.
"""
import ast

import kernel_oracle  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_oracle import DTYPES  # noqa: E402
from test_quant_kernels import (  # noqa: E402
    _bits_equal, _independent_codes, build_store, check_quant_attention, dense_golden)

from kvfx.methods import calidrop  # noqa: E402
from kvfx.methods.attention import merge_partitions  # noqa: E402
from kvfx.methods.quant_attention import quant_attention_reference  # noqa: E402
from kvfx.templates import configs, launch_quant  # noqa: E402
from kvfx.templates.render import render  # noqa: E402
from kvfx.templates.spec import KernelSpec  # noqa: E402

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("force_triton")  # tests/templates/conftest.py


@st.composite
def calib_cases(draw):
    kbits, vbits = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4]))
    kgroup = draw(st.sampled_from([gr for gr in (16, 32) if gr >= 32 // kbits]))
    dv = draw(st.sampled_from([64, 32]))
    nk = draw(st.integers(0, 2)) * kgroup
    n = nk + draw(st.integers(0, 24))
    nv = draw(st.one_of(st.sampled_from([0, n, nk]), st.integers(0, n)))
    return dict(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), g=draw(st.sampled_from([1, 3])),
        d=64, dv=dv, kbits=kbits, vbits=vbits, kgroup=kgroup, vgroup=draw(st.sampled_from([16, dv])),
        n=n, nk=nk, nv=nv, C=draw(st.sampled_from([0, 4])),
        ok=draw(st.sampled_from(["none", "random", "heads_off"])),
        dtype=draw(st.sampled_from(sorted(DTYPES))), stat=torch.float16,
        block_n=draw(st.sampled_from([16, 32])), min_split=draw(st.sampled_from([16, 256])),
        use=draw(st.sampled_from(["none", "all", "mixed"])), use_int=draw(st.booleans()),
        lse_shift=draw(st.sampled_from([-30.0, 0.0, 3.0, 30.0])), empty_e=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _calib(c, lse_store):
    """(o_e, lse_e, use) per query head: lse_e around the store's own lse (either partition may
    dominate), NaN in every o_e that must not be read (unused, or lse_e = -inf)."""
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    B, Hq = c["B"], c["H"] * c["g"]
    o_e = torch.randn(B, Hq, c["dv"], generator=gen)
    base = torch.where(lse_store.isfinite(), lse_store, 0.0)
    lse_e = torch.randn(B, Hq, generator=gen) + base + c["lse_shift"]
    use = {"none": torch.zeros(B, Hq, dtype=torch.bool), "all": torch.ones(B, Hq, dtype=torch.bool),
           "mixed": torch.rand(B, Hq, generator=gen) < 0.5}[c["use"]]
    if c["empty_e"]:  # an empty evicted set: lse_e = -inf, whatever o_e holds
        lse_e[:, 0] = float("-inf")
        o_e[:, 0] = float("nan")
    o_e[~use] = float("nan")
    if c["use_int"]:
        use = use.to(torch.int32) * 3
    return o_e, lse_e, use


def _kernel(q, kv, scale, c, **kw):
    with pytest.MonkeyPatch.context() as mp:  # block sizes and split-K on small stores
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", c["min_split"])
        mp.setattr(configs, "QUANT_DECODE_CONFIGS", (configs.AttnConfig(0, c["block_n"], 4, 1),))
        return launch_quant.quant_decode_attention(q, kv, scale=scale, **kw)


@SETTINGS
@given(calib_cases())
def test_quant_calib_kernel_matches_reference(c):
    q, kv = build_store(c)
    scale = c["d"] ** -0.5
    o_g, l_g, V, mag = dense_golden(q, kv, scale)
    o_e, lse_e, use = calib = _calib(c, l_g[..., 0].float())
    got = _kernel(q, kv, scale, c, calib=calib)
    plain = _kernel(q, kv, scale, c)
    ref = quant_attention_reference(q, kv, scale=scale, calib=calib)
    Hq = c["H"] * c["g"]
    assert got[0].shape == (c["B"], Hq, 1, c["dv"]) and got[1].shape == (c["B"], Hq, 1)
    # Golden: the store's float64 attention merged in float64 with the calibration partition.
    on = (use != 0)[..., None]
    o_m, l_m = merge_partitions(o_g, l_g, o_e.double()[:, :, None], lse_e.double()[..., None])
    golden = (torch.where(on[..., None], o_m, o_g), torch.where(on, l_m, l_g))
    values = torch.cat([V.flatten(), o_e[use != 0].double().flatten()]).nan_to_num(0.0)
    check_quant_attention(got, ref, golden, values, mag, c["d"], f"quant calib decode {c}")
    off = use == 0  # unused heads: exactly the calibration=False kernel
    assert _bits_equal(got[0][off], plain[0][off]) and _bits_equal(got[1][off], plain[1][off])


@pytest.mark.parametrize("pool, g, bits", [(0, 1, 2), (4, 3, 4)])
def test_use_all_false_is_bit_identical(pool, g, bits):
    c = dict(B=2, H=2, g=g, d=64, dv=64, kbits=bits, vbits=bits, kgroup=32, vgroup=32, n=77, nk=64, nv=40,
             C=pool, ok="random", dtype="fp16", stat=torch.float16, block_n=16, min_split=16, seed=3)
    q, kv = build_store(c)
    Hq = 2 * g
    nan_e = torch.full((2, Hq, 64), float("nan"))
    for lse_e in (torch.zeros(2, Hq), torch.full((2, Hq), float("-inf")), torch.full((2, Hq), 50.0)):
        got = _kernel(q, kv, 0.125, c, calib=(nan_e, lse_e, torch.zeros(2, Hq, dtype=torch.bool)))
        plain = _kernel(q, kv, 0.125, c)
        assert _bits_equal(got[0], plain[0]) and _bits_equal(got[1], plain[1])
        assert not got[0].isnan().any()


def _dequantized_view(kv):
    """float64 keys, values and visibility of [slots 0..n) ∪ [pool] (an independent unpacking)."""
    n, nk, nv, f = kv.n, kv.nk, kv.nv, torch.float64
    dv = kv.rv.shape[-1]
    kq = (_independent_codes(kv.kcodes, kv.kbits, nk, 2).to(f)
          * kv.kscale.to(f).repeat_interleave(kv.kgroup, 2)[:, :, :nk]
          + kv.kmin.to(f).repeat_interleave(kv.kgroup, 2)[:, :, :nk])
    vq = (_independent_codes(kv.vcodes[:, :, :nv], kv.vbits, dv, 3).to(f)
          * kv.vscale[:, :, :nv].to(f).repeat_interleave(kv.vgroup, 3)
          + kv.vmin[:, :, :nv].to(f).repeat_interleave(kv.vgroup, 3))
    K = torch.cat([kq, kv.rk[:, :, :n - nk].to(f), kv.pool_k.to(f)], 2)
    V = torch.cat([vq, kv.rv[:, :, :n - nv].to(f), kv.pool_v.to(f)], 2)
    seen = torch.cat([kv.ok[:, :, :n], kv.pool_ok], 2)
    return K.nan_to_num(), V.nan_to_num(), seen


@pytest.mark.parametrize("g, bits", [(1, 2), (3, 4)])
def test_stored_query_gives_union_attention(g, bits):
    """q_t equal to a stored history query whose (O_E, LSE_E) cover explicit extra tokens: the
    calibrated kernel gives attention over the store's dequantized view ∪ those tokens."""
    c = dict(B=2, H=2, g=g, d=64, dv=64, kbits=bits, vbits=bits, kgroup=32, vgroup=32, n=70, nk=64, nv=50,
             C=4, ok="random", dtype="fp32", stat=torch.float16, block_n=16, min_split=16, seed=11 + g)
    _, kv = build_store(c)
    gen = torch.Generator().manual_seed(g)
    B, H, Hq, d, m = 2, 2, 2 * g, 64, 37
    q_win = torch.randn(B, Hq, 5, d, generator=gen)
    k_x, v_x = torch.randn(B, H, m, d, generator=gen), torch.randn(B, H, m, d, generator=gen)
    scale = d**-0.5
    state = calidrop.build_state(q_win, k_x, v_x, torch.ones(B, H, m, dtype=torch.bool), scale=scale)
    q_t = q_win[:, :, 2:3]
    o_e, lse_e, _, use = calidrop.lookup(state, q_t, 0.9)
    assert use.all()
    o, lse = _kernel(q_t, kv, scale, c, calib=(o_e, lse_e, use))
    K, V, seen = _dequantized_view(kv)
    K = torch.cat([K, k_x.double()], 2).repeat_interleave(g, 1)
    V = torch.cat([V, v_x.double()], 2).repeat_interleave(g, 1)
    seen = torch.cat([seen, torch.ones(B, H, m, dtype=torch.bool)], 2).repeat_interleave(g, 1)
    s = (q_t.double() @ K.transpose(-1, -2) * scale).masked_fill(~seen[:, :, None], float("-inf"))
    want_lse = torch.logsumexp(s, -1)
    want_o = torch.softmax(s, -1) @ V
    torch.testing.assert_close(o.double(), want_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    plain = _kernel(q_t, kv, scale, c)[0].double()
    assert (plain - want_o).abs().max() > 1e-2  # the extra tokens matter


def test_render_quant_calibration_variant():
    for pool in (False, True):
        kw = dict(key_bits=2, key_group=32, value_bits=4, value_group=32, outlier_pool=pool)
        plain = render(KernelSpec("quant_decode_attention", "fp16", 64, 4, **kw))
        calib = render(KernelSpec("quant_decode_attention", "fp16", 64, 4, calibration=True, **kw))
        ast.parse(calib)
        code = calib[calib.index("@triton.jit"):]
        assert "O_E" not in plain[plain.index("@triton.jit"):] and "calibration=False" in plain
        assert "O_E, LSE_E, USE" in code and "stride_ub, stride_uh" in code and "calibration=True" in calib
        # The slot/pool partition kernel is the same; only the reduction gains the partition.
        stage1 = slice(plain.index("@triton.jit"), plain.index("def _kvfx_quant_decode_attention_reduce_kernel"))
        assert plain[stage1] in calib
    with pytest.raises(NotImplementedError, match="quant_compress has no 'calibration=True' variant"):
        render(KernelSpec("quant_compress", "fp16", 64, key_bits=2, key_group=32, calibration=True))


def test_quant_calib_argument_errors():
    c = dict(B=1, H=2, g=2, d=64, dv=32, kbits=2, vbits=4, kgroup=32, vgroup=32, n=40, nk=32, nv=32, C=0,
             ok="none", dtype="fp32", stat=torch.float16, seed=0)
    q, kv = build_store(c)
    use = torch.ones(1, 4, dtype=torch.bool)
    run = launch_quant.quant_decode_attention
    with pytest.raises(ValueError, match=r"calib must be a tuple \(o_e, lse_e, use\)"):
        run(q, kv, scale=0.1, calib=(torch.zeros(1, 4, 32), torch.zeros(1, 4)))
    with pytest.raises(ValueError, match=r"calib o_e must be a float tensor of shape \(1, 4, 32\)"):
        run(q, kv, scale=0.1, calib=(torch.zeros(1, 4, 64), torch.zeros(1, 4), use))
    with pytest.raises(ValueError, match=r"calib use must be a bool or integer tensor"):
        run(q, kv, scale=0.1, calib=(torch.zeros(1, 4, 32), torch.zeros(1, 4), use.float()))
