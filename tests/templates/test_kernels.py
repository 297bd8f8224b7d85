"""Triton attention kernels (run by the interpreter on CPU) against the PyTorch references.

Oracle (STYLE item 4): golden = reference in float64 on the same inputs; the kernel passes when
err(kernel) <= K * err(reference run in the kernel's dtype) + atol, with no NaN, and every row the
golden marks empty (lse = -inf) is empty in the kernel too (o = 0, lse = -inf). err is the max
abs error. The reference rounds only its output; the kernel also rounds p to the input dtype
before the PV product (as FlashAttention does), an extra error bounded by u * max|v| (u the unit
round-off), hence atol = u * max|v|. Measured over 400 random cases: err(kernel) - 2 err(ref)
stayed below 0.55 u max|v| (bf16 the worst); fp16/fp32 err(kernel) / err(ref) < 2.4.

Interpreter dtypes: fp32 and fp16 run natively; bf16 loads, stores and casts work but tl.dot on
bf16 multiplies bit patterns (triton-lang/triton#11584), so under TRITON_INTERPRET the launcher
sets DOT_FP32 and bf16 operands (p after its bf16 rounding) are upcast before tl.dot.
"""
import kernel_oracle  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_oracle import DTYPES, check_attention as _check, layout as _layout  # noqa: E402

from kvfx.methods.attention import decode_attention_reference, prefill_attention_reference  # noqa: E402
from kvfx.templates import configs, launch  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("force_triton")  # tests/templates/conftest.py


@st.composite
def prefill_cases(draw):
    n_k = draw(st.one_of(st.sampled_from([1, 16, 17, 33, 64, 65]), st.integers(1, 150)))
    n_q = draw(st.one_of(st.just(n_k), st.integers(1, n_k), st.integers(1, 150)))
    B = draw(st.integers(1, 3))
    starts = draw(st.one_of(st.none(), st.lists(st.integers(0, n_k), min_size=B, max_size=B)))
    return dict(
        B=B, Hkv=draw(st.integers(1, 3)), g=draw(st.integers(1, 4)), n_q=n_q, n_k=n_k,
        d=draw(st.sampled_from([16, 32, 64, 128])), dtype=draw(st.sampled_from(sorted(DTYPES))),
        causal=draw(st.booleans()), starts=starts, seq_major=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _run_prefill(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, Hkv, g, n_q, n_k, d = c["B"], c["Hkv"], c["g"], c["n_q"], c["n_k"], c["d"]
    q = _layout(torch.randn(B, Hkv * g, n_q, d, generator=gen).to(dt), c["seq_major"])
    k = _layout(torch.randn(B, Hkv, n_k, d, generator=gen).to(dt), c["seq_major"])
    v = _layout(torch.randn(B, Hkv, n_k, d, generator=gen).to(dt), c["seq_major"])
    kv_start = torch.tensor(c["starts"], dtype=torch.int32) if c["starts"] is not None else None
    kw = dict(scale=d**-0.5, causal=c["causal"], kv_start=kv_start)
    got = launch.prefill_attention(q, k, v, **kw)
    _check(got, prefill_attention_reference(q, k, v, **kw),
           prefill_attention_reference(q.double(), k.double(), v.double(), **kw), v, f"prefill {c}")


@SETTINGS
@given(prefill_cases())
def test_prefill_kernel_matches_reference(c):
    _run_prefill(c)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_prefill_head_dim_256_and_padding_rows(dtype):
    # d = 256 (the largest block), left padding longer than a block, rows that see nothing.
    _run_prefill(dict(B=2, Hkv=1, g=2, n_q=40, n_k=40, d=256, dtype=dtype, causal=True,
                      starts=[0, 37], seq_major=False, seed=1))


def test_prefill_ignores_nan_in_pad_positions():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 32, generator=gen) for _ in range(3))
    starts = torch.tensor([3, 0], dtype=torch.int32)
    k[0, :, :3], v[0, :, :3] = float("nan"), float("nan")
    o, lse = launch.prefill_attention(q, k, v, scale=0.2, kv_start=starts)
    ro, rl = prefill_attention_reference(q, k, v, scale=0.2, kv_start=starts)
    assert not o.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5)


@st.composite
def decode_cases(draw):
    cap = draw(st.one_of(st.sampled_from([1, 16, 17, 64, 100]), st.integers(1, 300)))
    B, Hkv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    length = st.one_of(st.sampled_from([0, 1, cap]), st.integers(0, cap), st.integers(-2, cap + 5))
    lengths = draw(st.lists(length, min_size=B * Hkv, max_size=B * Hkv))
    return dict(
        B=B, Hkv=Hkv, g=draw(st.sampled_from([1, 2, 3, 4, 8])), cap=cap, lengths=lengths,
        d=draw(st.sampled_from([16, 32, 64, 128])), dtype=draw(st.sampled_from(sorted(DTYPES))),
        bias=draw(st.sampled_from(["none", "shared", "per_head", "with_inf"])),
        min_split=draw(st.sampled_from([16, 32, 256])), seq_major=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _run_decode(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, Hkv, g, cap, d = c["B"], c["Hkv"], c["g"], c["cap"], c["d"]
    lengths = torch.tensor(c["lengths"], dtype=torch.int32).view(B, Hkv)
    q = torch.randn(B, Hkv * g, 1, d, generator=gen).to(dt)
    k = torch.randn(B, Hkv, cap, d, generator=gen).to(dt)
    v = torch.randn(B, Hkv, cap, d, generator=gen).to(dt)
    unused = torch.arange(cap)[None, None, :] >= lengths[..., None]
    k[unused], v[unused] = float("nan"), float("nan")  # unused slots may hold anything
    k, v = _layout(k, c["seq_major"]), _layout(v, c["seq_major"])
    bias = None
    if c["bias"] != "none":
        bias = torch.randn(B, Hkv if c["bias"] == "per_head" else 1, cap, generator=gen)
        if c["bias"] == "with_inf":
            bias[torch.rand(bias.shape, generator=gen) < 0.3] = float("-inf")
    kw = dict(scale=d**-0.5, bias=bias)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", c["min_split"])  # exercise split-K on small caps
        got = launch.decode_attention(q, k, v, lengths, **kw)
    _check(got, decode_attention_reference(q, k, v, lengths, **kw),
           decode_attention_reference(q.double(), k.double(), v.double(), lengths, **kw), v, f"decode {c}")


@SETTINGS
@given(decode_cases())
def test_decode_kernel_matches_reference(c):
    _run_decode(c)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_decode_head_dim_256_many_splits(dtype):
    _run_decode(dict(B=1, Hkv=2, g=2, cap=200, lengths=[200, 77], d=256, dtype=dtype,
                     bias="with_inf", min_split=16, seq_major=True, seed=3))


def test_decode_split_heuristic_bounds():
    assert configs.decode_num_splits(cap=64, bh=1, block_n=64) == 1
    assert configs.decode_num_splits(cap=32768, bh=4, block_n=64) == configs.MAX_SPLITS
    assert configs.decode_num_splits(cap=32768, bh=1024, block_n=64) == 1  # GPU already full
    assert configs.decode_num_splits(cap=4096, bh=8, block_n=64) == 4096 // configs.MIN_TOKENS_PER_SPLIT


def test_prune_keeps_blocks_within_problem_and_smem():
    small = configs.prune_prefill(configs.PREFILL_CONFIGS, head_dim=64, dtype="fp16", n_q=10, n_k=10)
    assert all(c.block_m <= 16 and c.block_n <= 16 for c in small)
    big = configs.prune_prefill(configs.PREFILL_CONFIGS, head_dim=256, dtype="fp32", n_q=4096, n_k=4096)
    assert big and all(configs._smem_bytes(c, 256, "fp32") <= configs.SMEM_BUDGET for c in big)
