"""quant.residual_dtype on the CPU read paths: the residual and the outlier pool held in float16 or
bfloat16 under an fp32 model. The reference and the split path (eager and compiled by inductor)
read the narrower tensors, and their output moves from the fp32-residual output by no more than
the rounding of those tensors allows (tests/held_dtype.py: rounding_bound)."""

import pytest
import torch
from held_dtype import narrow, rounding_bound

from kvfx.methods.quant import QuantConfig
from kvfx.methods.quant_attention import quant_attention_reference, quant_attention_split
from kvfx.runtime.qstore import QuantStore

NARROW = [torch.float16, torch.bfloat16]
# both outputs are fp32 computations of the same formula on different inputs: each carries its own
# fp32 round-off (the split path's tests bound it by 1e-5 max|o| + 1e-6; see test_quant_fused.py)
FP32_SLACK = 1e-5


def _store(cfg, m, steps, *, B=1, H=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, m + steps, d, generator=g) * torch.linspace(0.2, 3, d)
    v = torch.randn(B, H, m + steps, d, generator=g)
    s = QuantStore("t", cfg)
    s.write_kept(k[:, :, :m], v[:, :, :m], torch.arange(m).expand(B, H, m), torch.full((B, H), m), m + 1)
    for t in range(m, m + steps):
        s.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t]))
        s.flush()
    return s


def _within(got, want, bound, name):
    err = float((got[0].double() - want[0].double()).abs().max())
    slack = FP32_SLACK * float(want[0].abs().max()) + 1e-6
    assert err <= bound + slack, f"{name}: |Δo| {err:.3g} > bound {bound:.3g} + {slack:.3g}"
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()


CFGS = {"kivi2": QuantConfig(2, 32, 2, 32, residual=128),
        "ott2": QuantConfig(2, 32, 2, 32, residual=64, per_group=1, pool=8),
        "kivi4-g16": QuantConfig(4, 16, 4, 16, residual=32)}


@pytest.mark.parametrize("dtype", NARROW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(CFGS))
@pytest.mark.parametrize("g", [1, 3])
def test_narrow_residual_moves_the_output_within_its_rounding(name, dtype, g):
    """Reference and split path over the same store with its residual and pool narrowed: each
    within rounding_bound of the fp32-residual output; split equal to reference as for fp32."""
    s = _store(CFGS[name], 300, 17, seed=len(name) + g)
    kv = s.view()
    q = torch.randn(1, 2 * g, 1, 64, generator=torch.Generator().manual_seed(g))
    bound = rounding_bound(q, kv, 0.125, dtype)
    kv_n = narrow(kv, dtype)
    want = quant_attention_reference(q, kv, scale=0.125)
    ref_n = quant_attention_reference(q, kv_n, scale=0.125)
    _within(ref_n, want, bound, "reference")
    split_n = quant_attention_split(q, kv_n, scale=0.125)
    _within(split_n, want, bound, "split")
    tol = 1e-5 * float(ref_n[0].abs().max()) + 1e-6
    assert float((split_n[0] - ref_n[0]).abs().max()) <= tol
    assert bound < 0.05 * float(want[0].abs().max()), bound  # the bound says something at this scale


@pytest.mark.parametrize("name", sorted(CFGS))
@pytest.mark.parametrize("dtype", NARROW, ids=["fp16", "bf16"])
def test_store_holds_exactly_the_cast_tokens(name, dtype):
    """A store with residual_dtype holds its residual and pool in that dtype; fed tokens the dtype
    represents exactly, every tensor equals the fp32-residual store's (the quantized ones bit for
    bit, through prompt quantization, key flushes with outlier tracing and value flushes), and its
    attention is bit for bit the same."""
    cfg = CFGS[name]
    held = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    cfg_n = QuantConfig(**{**cfg.__dict__, "residual_dtype": held})
    g = torch.Generator().manual_seed(7)
    B, H, m, steps, d = 2, 2, 200, 140, 64  # 140 steps: a key flush of R tokens for every R here
    k = (torch.randn(B, H, m + steps, d, generator=g) * torch.linspace(0.2, 3, d)).to(dtype).float()
    v = torch.randn(B, H, m + steps, d, generator=g).to(dtype).float()
    stores = []
    for c in (cfg, cfg_n):
        s = QuantStore("t", c)
        s.write_kept(k[:, :, :m], v[:, :, :m], torch.arange(m).expand(B, H, m), torch.full((B, H), m), m + 1)
        for t in range(m, m + steps):
            s.append(k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor([t]))
            s.flush()
        stores.append(s)
    wide, held_s = stores
    assert held_s.rk.dtype == held_s.rv.dtype == dtype and held_s.dtype == torch.float32
    assert (held_s.n, held_s.nk, held_s.nv) == (wide.n, wide.nk, wide.nv)
    for f in ("kcodes", "kscale", "kmin", "vcodes", "vscale", "vmin", "ok"):
        a, b = getattr(wide, f), getattr(held_s, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    for f in ("rk", "rv"):
        assert torch.equal(getattr(wide, f).to(dtype), getattr(held_s, f)), f
    if cfg.per_group:
        assert held_s.pool.keys.dtype == held_s.pool.values.dtype == dtype
        assert torch.equal(wide.pool.pos, held_s.pool.pos)
        assert torch.equal(wide.pool.keys.to(dtype), held_s.pool.keys)
        assert torch.equal(wide.pool.values.to(dtype), held_s.pool.values)
    q = torch.randn(B, 2 * H, 1, d, generator=g)
    assert torch.equal(wide.attend(q, None, False, wide.n, None), held_s.attend(q, None, False, held_s.n, None))


@pytest.mark.slow
def test_compiled_split_reads_a_narrow_residual():
    """The inductor-compiled reductions (kvfx.runtime.cpu_fused, from 1024 quantized key slots)
    with a float16 residual and pool: within rounding_bound of the fp32-residual reference."""
    from kvfx.runtime import cpu_fused

    s = _store(QuantConfig(2, 32, 2, 32, residual=128, per_group=1, pool=16), 1100, 5, seed=3)
    kv = s.view()
    q = torch.randn(1, 6, 1, 64, generator=torch.Generator().manual_seed(4))
    kv_n = narrow(kv, torch.float16)
    assert cpu_fused.use_compiled(q, kv_n)
    got = quant_attention_split(q, kv_n, scale=0.125, key_logits=cpu_fused.key_logits,
                                value_sum=cpu_fused.value_sum)
    _within(got, quant_attention_reference(q, kv, scale=0.125), rounding_bound(q, kv, 0.125, torch.float16),
            "compiled split")
