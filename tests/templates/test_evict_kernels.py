"""Eviction kernels (interpreted on CPU) against their references, and the references against
independent plain-Python / float64 implementations written here.

select_gather: bit-exact kept sets, positions, gathered K/V and counts, for score ties, +inf
(protected), -inf (pads), NaN and -0.0, budgets of either shape including budgets above the
number of keepable tokens (count < budget) and above cap, with selection and compaction split
into several chunks. kv_stats: KNorm and LagKV scores within fp32 round-off of a float64 golden
(STYLE item 4: err(kernel) <= K * err(reference in fp32) + atol).
"""
import math

import kernel_oracle  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_oracle import DTYPES, K_FACTOR, UNIT_ROUNDOFF, layout  # noqa: E402

from kvfx.methods.knorm import knorm_scores as knorm_reference  # noqa: E402
from kvfx.methods.lagkv import EPS, partition_scores  # noqa: E402
from kvfx.methods.select import select_gather_reference  # noqa: E402
from kvfx.templates import configs, launch_evict  # noqa: E402
from kvfx.templates.render import render  # noqa: E402
from kvfx.templates.spec import KernelSpec  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INF = float("inf")


pytestmark = pytest.mark.usefixtures("force_triton")  # tests/templates/conftest.py


# ---- select_gather ------------------------------------------------------------------------------

@st.composite
def select_cases(draw):
    n = draw(st.one_of(st.sampled_from([1, 16, 17, 33]), st.integers(0, 70)))
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    per_head = draw(st.booleans())
    budgets = draw(st.lists(st.one_of(st.integers(-1, n + 3), st.just(n)),
                            min_size=B * H if per_head else B, max_size=B * H if per_head else B))
    return dict(
        B=B, H=H, n=n, d=draw(st.sampled_from([16, 32, 64])), dtype=draw(st.sampled_from(sorted(DTYPES))),
        per_head=per_head, budgets=budgets,
        cap=draw(st.one_of(st.just(None), st.integers(0, n + 4))),  # None: the largest budget
        values=draw(st.sampled_from(["ties", "normal", "mixed"])),
        p_inf=draw(st.sampled_from([0.0, 0.2])), p_pad=draw(st.sampled_from([0.0, 0.3, 0.9])),
        p_nan=draw(st.sampled_from([0.0, 0.0, 0.1])),
        block_n=draw(st.sampled_from([16, 32, 1024])), tile=draw(st.sampled_from([256, 512, 4096])),
        seq_major=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def _select_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, n, d = c["B"], c["H"], c["n"], c["d"]
    if c["values"] == "ties":  # few distinct values, -0.0 next to +0.0
        s = torch.randint(-2, 3, (B, H, n), generator=gen).float()
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    elif c["values"] == "normal":
        s = torch.randn(B, H, n, generator=gen)
    else:  # huge, tiny and subnormal magnitudes of both signs
        s = torch.randn(B, H, n, generator=gen) * 10.0 ** torch.randint(-40, 38, (B, H, n), generator=gen)
    u = torch.rand(B, H, n, generator=gen)
    s[u < c["p_inf"]] = INF
    s[(u >= c["p_inf"]) & (u < c["p_inf"] + c["p_nan"])] = float("nan")
    pad = torch.rand(B, 1, n, generator=gen) < c["p_pad"]  # pads are per row, as in a batch
    s = s.masked_fill(pad, -INF)
    k = torch.randn(B, H, n, d, generator=gen).to(DTYPES[c["dtype"]])
    v = torch.randn(B, H, n, d, generator=gen).to(DTYPES[c["dtype"]])
    k[pad.expand(B, H, n)] = float("nan")  # never read: pads are never kept
    shape = (B, H) if c["per_head"] else (B,)
    budget = torch.tensor(c["budgets"], dtype=torch.long).view(shape)
    cap = c["cap"] if c["cap"] is not None else max(0, int(budget.max()))
    return s, budget, layout(k, c["seq_major"]), layout(v, c["seq_major"]), cap


def _run_select(c):
    s, budget, k, v, cap = _select_inputs(c)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "SELECT_BLOCK_N", c["block_n"])
        mp.setattr(configs, "GATHER_TILE_ELEMENTS", c["tile"])
        got = launch_evict.select_gather(s, budget, k, v, cap)
    want = select_gather_reference(s, budget, k, v, cap)
    for name, a, b in zip(("k_out", "v_out", "pos_out", "count"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        assert torch.equal(a, b), f"{name} differs for {c}"


@SETTINGS
@given(select_cases())
def test_select_gather_kernel_is_bit_exact(c):
    _run_select(c)


def test_select_gather_long_rows_many_chunks():
    # n = 200 over 32-score selection chunks and 16-token compaction chunks, head_dim 128.
    _run_select(dict(B=2, H=2, n=200, d=128, dtype="bf16", per_head=True, budgets=[0, 1, 100, 400],
                     cap=None, values="ties", p_inf=0.1, p_pad=0.2, p_nan=0.05, block_n=32, tile=2048,
                     seq_major=True, seed=7))


def test_select_gather_budget_above_keepable_tokens():
    s = torch.tensor([[[1.0, -INF, INF, 0.5, -INF]]])
    k = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 16).contiguous()
    k_out, v_out, pos, count = launch_evict.select_gather(s, torch.tensor([4]), k, -k, 6)
    assert count.tolist() == [[3]] and pos.tolist() == [[[0, 2, 3, -1, -1, -1]]]
    assert k_out[0, 0, :, 0].tolist() == [0.0, 2.0, 3.0, 0.0, 0.0, 0.0]
    assert torch.equal(v_out, -k_out)


def _select_python(s, budget, cap):
    """Kept positions of one row: the stable descending order, written out (NaN first, ties by
    index, -inf never)."""
    alive = [j for j, x in enumerate(s) if x != -INF]
    order = sorted(alive, key=lambda j: (0 if math.isnan(s[j]) else 1, 0.0 if math.isnan(s[j]) else -s[j], j))
    return sorted(order[:max(0, min(budget, cap))])


@settings(max_examples=150, deadline=None)
@given(select_cases())
def test_select_reference_matches_plain_python(c):
    s, budget, k, v, cap = _select_inputs(c)
    k_out, v_out, pos, count = select_gather_reference(s, budget, k, v, cap)
    B, H, n = s.shape
    bud = budget[:, None].expand(B, H) if budget.dim() == 1 else budget
    for b in range(B):
        for h in range(H):
            kept = _select_python(s[b, h].tolist(), int(bud[b, h]), cap)
            m = len(kept)
            assert int(count[b, h]) == m
            assert pos[b, h].tolist() == kept + [-1] * (cap - m)
            assert torch.equal(k_out[b, h, :m], k[b, h, kept]) and torch.equal(v_out[b, h, :m], v[b, h, kept])
            assert (k_out[b, h, m:] == 0).all() and (v_out[b, h, m:] == 0).all()


def test_select_gather_argument_errors():
    s, k = torch.zeros(1, 2, 5), torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"scores must be a float tensor of shape \(B, Hkv, n\) = \(1, 2, 5\)"):
        launch_evict.select_gather(s[:, :1], torch.tensor([1]), k, k, 1)
    with pytest.raises(ValueError, match=r"budget must be an integer tensor of shape \(B,\) or \(B, Hkv\)"):
        launch_evict.select_gather(s, torch.tensor([1.0]), k, k, 1)
    with pytest.raises(ValueError, match=r"cap must be a Python int >= 0, got -1"):
        launch_evict.select_gather(s, torch.tensor([1]), k, k, -1)
    with pytest.raises(ValueError, match=r"expected the same shape up to the last"):
        launch_evict.select_gather(s, torch.tensor([1]), k, k[:, :, :4], 1)


def test_select_gather_unsupported_head_dim_runs_the_reference():
    gen = torch.Generator().manual_seed(0)
    s, k = torch.randn(2, 1, 9, generator=gen), torch.randn(2, 1, 9, 24, generator=gen)
    got = launch_evict.select_gather(s, torch.tensor([3, 9]), k, k, 9)
    want = select_gather_reference(s, torch.tensor([3, 9]), k, k, 9)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---- kv_stats: KNorm ----------------------------------------------------------------------------

def _check_close(got, ref, golden, atol, name):
    assert got.dtype == torch.float32 and got.shape == golden.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err_k = (got.double() - golden).abs().max().item() if got.numel() else 0.0
    err_r = (ref.double() - golden).abs().max().item() if ref.numel() else 0.0
    assert err_k <= K_FACTOR * err_r + atol, f"{name}: err {err_k:.3g} vs reference {err_r:.3g}"


@SETTINGS
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       n=st.one_of(st.sampled_from([1, 16, 17]), st.integers(0, 70)), d=st.sampled_from([16, 32, 64, 128]),
       dtype=st.sampled_from(sorted(DTYPES)), tile=st.sampled_from([256, 8192]),
       seq_major=st.booleans(), seed=st.integers(0, 2**16))
def test_knorm_kernel_matches_reference(lead, n, d, dtype, tile, seq_major, seed):
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(2, *lead, n, d, generator=gen) * 3).to(DTYPES[dtype])
    if k.dim() == 4:
        k = layout(k, seq_major)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "STATS_TILE_ELEMENTS", tile)
        got = launch_evict.knorm_scores(k)
    golden = -k.double().pow(2).sum(-1).sqrt()  # independent float64 definition
    ref = knorm_reference(k)
    top = golden.abs().max().item() if golden.numel() else 0.0
    _check_close(got, ref, golden, 4 * UNIT_ROUNDOFF[torch.float32] * (1 + top), f"knorm {k.shape} {dtype}")
    # the reference itself: within fp32 round-off of the definition
    assert ((ref.double() - golden).abs() <= 8 * UNIT_ROUNDOFF[torch.float32] * (1 + golden.abs())).all()


# ---- kv_stats: LagKV ----------------------------------------------------------------------------

def _lag_golden(k, v, lag, v_ratio):
    """float64 LagKV scores and the largest std (the softmax logits' scale), from the definition:
    per partition p < P-1 and token j, z = (x - min_ref) / (max_ref - min_ref + eps) per channel,
    std over channels (n - 1 divisor), softmax over the partition's tokens, s_K + v_ratio s_V."""
    R, n, d = k.shape
    P = n // lag
    out = torch.zeros(R, P - 1, lag, dtype=torch.float64)
    top = 0.0
    for x, w in ((k.double(), 1.0), (v.double(), v_ratio)):
        for p in range(P - 1):
            part, ref = x[:, p * lag:(p + 1) * lag], x[:, (p + 1) * lag:(p + 2) * lag]
            mn, mx = ref.min(1, keepdim=True).values, ref.max(1, keepdim=True).values
            z = (part - mn) / (mx - mn + EPS)
            mean = z.sum(-1, keepdim=True) / d
            std = (((z - mean) ** 2).sum(-1) / (d - 1)).sqrt()
            top = max(top, std.abs().max().item())
            e = (std - std.max(-1, keepdim=True).values).exp()
            out[:, p] += w * e / e.sum(-1, keepdim=True)
    return out, top


@st.composite
def lag_cases(draw):
    return dict(
        R=draw(st.integers(1, 3)), lag=draw(st.one_of(st.sampled_from([1, 4, 16, 17]), st.integers(2, 40))),
        P=draw(st.integers(2, 4)), d=draw(st.sampled_from([16, 32, 64])),
        dtype=draw(st.sampled_from(sorted(DTYPES))), v_ratio=draw(st.sampled_from([0.0, 0.5, 1.0, 2.5])),
        tile=draw(st.sampled_from([256, 512, 8192])), strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _lag_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    R, n, d = c["R"], c["P"] * c["lag"], c["d"]
    k, v = (torch.randn(R, n, d, generator=gen).to(DTYPES[c["dtype"]]) for _ in range(2))
    if c["strided"]:  # views into wider buffers, as the runtime's store slices are
        k = torch.cat([k, k], -1)[..., :d]
        v = torch.cat([v, v], 1)[:, :n]
    return k, v


def _lag_atol(top, v_ratio):
    # [Note] a std of magnitude `top` carries ~top * u absolute error, which the softmax turns
    # into that relative error of the probabilities (<= 1): atol = 16 u (1 + top) (1 + v_ratio).
    return 16 * UNIT_ROUNDOFF[torch.float32] * (1 + top) * (1 + v_ratio)


@SETTINGS
@given(lag_cases())
def test_lagkv_kernel_matches_reference(c):
    k, v = _lag_inputs(c)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "STATS_TILE_ELEMENTS", c["tile"])
        got = launch_evict.lagkv_partition_scores(k, v, c["lag"], c["v_ratio"])
    ref = partition_scores(k, v, lag=c["lag"], v_ratio=c["v_ratio"])
    golden, top = _lag_golden(k, v, c["lag"], c["v_ratio"])
    _check_close(got, ref, golden, _lag_atol(top, c["v_ratio"]), f"lagkv {c}")
    sums = got.double().sum(-1)  # each partition: softmax(K) + v_ratio softmax(V) sums to 1 + v_ratio
    torch.testing.assert_close(sums, torch.full_like(sums, 1 + c["v_ratio"]), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(lag_cases())
def test_lagkv_reference_matches_definition(c):
    k, v = _lag_inputs(c)
    golden, top = _lag_golden(k, v, c["lag"], c["v_ratio"])
    err = (partition_scores(k, v, lag=c["lag"], v_ratio=c["v_ratio"]).double() - golden).abs().max().item()
    assert err <= 4 * _lag_atol(top, c["v_ratio"]), err


def test_lagkv_leading_dims_and_single_partition():
    gen = torch.Generator().manual_seed(2)
    k, v = (torch.randn(2, 3, 3 * 8, 16, generator=gen) for _ in range(2))
    got = launch_evict.lagkv_partition_scores(k, v, 8, 1.0)
    want = partition_scores(k.reshape(6, 24, 16), v.reshape(6, 24, 16), lag=8, v_ratio=1.0).view(2, 3, 2, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert launch_evict.lagkv_partition_scores(k[..., :8, :], v[..., :8, :], 8, 1.0).shape == (2, 3, 0, 8)
    with pytest.raises(ValueError, match=r"lag must be a Python int >= 1 dividing the 24 tokens, got 5"):
        launch_evict.lagkv_partition_scores(k, v, 5, 1.0)


# ---- specs and rendering ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [KernelSpec("select_gather", "bf16", 128),
                                  KernelSpec("kv_stats", "fp16", 64, scores="knorm"),
                                  KernelSpec("kv_stats", "fp32", 16, scores="lagkv")], ids=lambda s: s.uri)
def test_evict_specs_render(spec):
    src = render(spec)
    assert src == render(KernelSpec(spec.kind, spec.dtype, spec.head_dim, scores=spec.scores))
    assert f"# URI: {spec.uri}\n" in src and f"def _kvfx_{spec.kind}_kernel(" in src
    assert f"HEAD_DIM == {spec.head_dim})" in src and "{{" not in src and "{%" not in src
    if spec.kind == "kv_stats":
        other = "lagkv" if spec.scores == "knorm" else "knorm"
        assert f"Mode {spec.scores}" in src and f"Mode {other}" not in src


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="kv_stats", scores="none"), r"scores: got 'none' for kv_stats, expected one of knorm, lagkv"),
    (dict(kind="prefill_attention", scores="knorm"), r"scores: got 'knorm' for prefill_attention, expected "
                                                     r"one of none, window_colsum, colsum, last_row"),
    (dict(kind="select_gather", scores="colsum"), r"scores: got 'colsum' for select_gather, expected 'none'"),
    (dict(kind="select_gather", gqa_group=2), r"select_gather reads K/V heads only, expected gqa_group=1"),
    (dict(kind="kv_stats", scores="lagkv", causal=True), r"kv_stats reads K/V heads only"),
    (dict(kind="kv_stats", scores="lagkv; import os"), r"scores: got 'lagkv; import os', expected one of"),
])
def test_evict_spec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelSpec(dtype="fp16", head_dim=64, **kwargs)
