"""The calibration=True decode kernel (CaliDrop's partition merged in the split-K reduction), run
by the interpreter on CPU, against the reference `decode_attention_reference(..., calib=)`.

Oracle as in test_kernels.py (kernel_oracle.check_attention); plus: with the decode query equal
to a stored history query the kernel reproduces full attention over kept ∪ evicted, and use = 0
leaves o, lse and probs bit for bit those of the calibration=False kernel.
"""
import ast

import kernel_oracle  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_oracle import DTYPES, check_attention, check_scores, layout  # noqa: E402

from kvfx.methods import calidrop  # noqa: E402
from kvfx.methods.attention import decode_attention_reference  # noqa: E402
from kvfx.templates import configs, launch  # noqa: E402
from kvfx.templates.render import render  # noqa: E402
from kvfx.templates.spec import KernelSpec  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("force_triton")  # tests/templates/conftest.py


@st.composite
def calib_cases(draw):
    cap = draw(st.one_of(st.sampled_from([1, 16, 17, 64]), st.integers(1, 100)))
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    length = st.one_of(st.sampled_from([0, cap]), st.integers(0, cap))
    return dict(
        B=B, Hkv=Hkv, g=draw(st.sampled_from([1, 2, 4])), cap=cap,
        lengths=draw(st.lists(length, min_size=B * Hkv, max_size=B * Hkv)),
        d=draw(st.sampled_from([16, 32, 64])), dtype=draw(st.sampled_from(sorted(DTYPES))),
        use=draw(st.sampled_from(["none", "all", "mixed"])), use_int=draw(st.booleans()),
        lse_shift=draw(st.sampled_from([-30.0, 0.0, 3.0, 30.0])), empty_e=draw(st.booleans()),
        probs=draw(st.booleans()), min_split=draw(st.sampled_from([16, 256])),
        seq_major=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def _inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, Hkv, g, cap, d = c["B"], c["Hkv"], c["g"], c["cap"], c["d"]
    Hq = Hkv * g
    lengths = torch.tensor(c["lengths"], dtype=torch.int32).view(B, Hkv)
    q = torch.randn(B, Hq, 1, d, generator=gen).to(dt)
    k = torch.randn(B, Hkv, cap, d, generator=gen).to(dt)
    v = torch.randn(B, Hkv, cap, d, generator=gen).to(dt)
    unused = torch.arange(cap)[None, None, :] >= lengths[..., None]
    k[unused], v[unused] = float("nan"), float("nan")
    k, v = layout(k, c["seq_major"]), layout(v, c["seq_major"])
    o_e = torch.randn(B, Hq, d, generator=gen)
    # lse_e around the store's own lse (log of the length) shifted: either partition can dominate.
    lse_store = torch.log(lengths.float().clamp_min(1)).repeat_interleave(g, 1)
    lse_e = torch.randn(B, Hq, generator=gen) + lse_store + c["lse_shift"]
    use = {"none": torch.zeros(B, Hq, dtype=torch.bool), "all": torch.ones(B, Hq, dtype=torch.bool),
           "mixed": torch.rand(B, Hq, generator=gen) < 0.5}[c["use"]]
    if c["empty_e"]:  # an empty evicted set: lse_e = -inf, whatever o_e holds
        lse_e[:, 0] = float("-inf")
        o_e[:, 0] = float("nan")
    o_e[~use] = float("nan")  # unused partitions may hold anything
    if c["use_int"]:
        use = use.to(torch.int32) * 3
    return q, k, v, lengths, (o_e, lse_e, use)


@SETTINGS
@given(calib_cases())
def test_calibrated_decode_kernel_matches_reference(c):
    q, k, v, lengths, calib = _inputs(c)
    kw = dict(scale=c["d"] ** -0.5, return_probs=c["probs"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", c["min_split"])
        got = launch.decode_attention(q, k, v, lengths, calib=calib, **kw)
        plain = launch.decode_attention(q, k, v, lengths, **kw)
    ref_lo = decode_attention_reference(q, k, v, lengths, calib=calib, **kw)
    gold_calib = (calib[0].double(), calib[1].double(), calib[2])
    golden = decode_attention_reference(q.double(), k.double(), v.double(), lengths, calib=gold_calib, **kw)
    values = torch.cat([v.flatten(), calib[0][calib[2] != 0].flatten()])  # sets atol: max |v|, |o_e|
    check_attention(got[:2], ref_lo[:2], golden[:2], values, f"calib decode {c}")
    off = calib[2] == 0  # unused heads: exactly the calibration=False kernel
    assert torch.equal(got[0][off], plain[0][off]) and torch.equal(got[1][off], plain[1][off])
    if c["probs"]:
        assert torch.equal(got[2], plain[2])  # probs stay normalized over the store slots
        check_scores(got[2], ref_lo[2], golden[2], f"calib decode probs {c}")


@pytest.mark.parametrize("g, adjust", [(1, "none"), (4, "tangent")])
def test_stored_query_gives_full_attention(g, adjust):
    """q_t equal to a stored history query: kernel(kept, calib=lookup) == attention over all."""
    gen = torch.Generator().manual_seed(g)
    B, Hkv, n, d, c = 2, 2, 90, 32, 6
    q_win = torch.randn(B, Hkv * g, c, d, generator=gen)
    k, v = torch.randn(B, Hkv, n, d, generator=gen), torch.randn(B, Hkv, n, d, generator=gen)
    evicted = torch.rand(B, Hkv, n, generator=gen) < 0.6
    evicted[1, 1] = True  # a head whose whole cache is evicted
    evicted[0, 1] = False  # and one with nothing evicted
    scale = d**-0.5
    state = calidrop.build_state(q_win, k, v, evicted, scale=scale, adjust=adjust)
    q_t = q_win[:, :, 3:4]
    o_e, lse_e, sim, use = calidrop.lookup(state, q_t, 0.9, adjust=adjust)
    assert use.all()
    # The store: the kept tokens of each head packed to the front, NaN behind.
    k_c, v_c, ok = calidrop._compact_evicted(k, v, ~evicted)
    lengths = ok.sum(-1).to(torch.int32)
    k_c[~ok], v_c[~ok] = float("nan"), float("nan")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", 16)
        o, lse = launch.decode_attention(q_t, k_c, v_c, lengths, scale=scale, calib=(o_e, lse_e, use))
    full_o, full_lse = decode_attention_reference(q_t, k, v, torch.full((B, Hkv), n), scale=scale)
    torch.testing.assert_close(o, full_o, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, full_lse, rtol=2e-5, atol=2e-5)


def test_render_calibration_variant():
    for scores in ("none", "last_row"):
        plain = render(KernelSpec("decode_attention", "fp16", 64, 4, scores=scores))
        calib = render(KernelSpec("decode_attention", "fp16", 64, 4, scores=scores, calibration=True))
        assert calib == render(KernelSpec("decode_attention", "fp16", 64, 4, scores=scores, calibration=True))
        ast.parse(calib)
        code = calib[calib.index("@triton.jit"):]  # without the header, which names every option
        assert "O_E" not in plain[plain.index("@triton.jit"):] and "calibration=False" in plain
        assert "O_E, LSE_E, USE" in code and "stride_ub, stride_uh" in code and "calibration=True" in calib
        assert ("LSE_C" in code) == (scores == "last_row")
    with pytest.raises(NotImplementedError, match="prefill_attention has no 'calibration=True' variant"):
        render(KernelSpec("prefill_attention", "fp16", 64, calibration=True))


@pytest.mark.parametrize("calib, match", [
    ((torch.zeros(1, 2, 16), torch.zeros(1, 2)), r"calib must be a tuple \(o_e, lse_e, use\)"),
    ((torch.zeros(1, 2, 8), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)),
     r"calib o_e must be a float tensor of shape \(1, 2, 16\), got \(1, 2, 8\)"),
    ((torch.zeros(1, 2, 16), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 2, dtype=torch.bool)),
     r"calib lse_e must be a float tensor"),
    ((torch.zeros(1, 2, 16), torch.zeros(1, 2), torch.ones(1, 2)),
     r"calib use must be a bool or integer tensor"),
])
def test_calib_argument_errors(calib, match):
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match=match):
        launch.decode_attention(q, k, k, torch.tensor([[8]]), scale=0.25, calib=calib)
