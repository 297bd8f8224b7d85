"""The ragged decode kernel (decode_attention rendered with ragged=True: each KV head reads its own
segment of a flat pool, kvfx.runtime.ragged) under TRITON_INTERPRET=1 against its reference
kvfx.methods.ragged_attention.ragged_decode_reference, with the STYLE item-4 oracle of
kernel_oracle.py: segment lengths 0, full (a segment with no free slot) and in between, GQA,
rows with different totals, NaN in free slots (the kernel never reads them), split-K on small
lengths."""
import os
import pathlib

import kernel_oracle  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_oracle import DTYPES, check_attention  # noqa: E402

from kvfx.methods.ragged_attention import ragged_decode_reference, select_gather_ragged_reference  # noqa: E402
from kvfx.methods.select import priority  # noqa: E402
from kvfx.templates import configs  # noqa: E402
from kvfx.templates.launch_evict import select_gather_ragged  # noqa: E402
from kvfx.templates.launch_ragged import ragged_decode_attention  # noqa: E402
from kvfx.templates.spec import KernelSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("force_triton")  # tests/templates/conftest.py


@st.composite
def cases(draw):
    B, Hkv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seg_cap = draw(st.integers(1, 120))
    counts = draw(st.lists(st.one_of(st.sampled_from([0, seg_cap]), st.integers(0, seg_cap)),
                           min_size=B * Hkv, max_size=B * Hkv))
    gaps = draw(st.lists(st.integers(0, 9), min_size=B * Hkv, max_size=B * Hkv))
    return dict(B=B, Hkv=Hkv, g=draw(st.sampled_from([1, 2, 3, 4, 8])), counts=counts, gaps=gaps,
                extra=draw(st.sampled_from([0, 0, 7])), d=draw(st.sampled_from([16, 32, 64])),
                dtype=draw(st.sampled_from(sorted(DTYPES))), min_split=draw(st.sampled_from([16, 32, 256])),
                seed=draw(st.integers(0, 2**16)))


def _run(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, Hkv, g, d = c["B"], c["Hkv"], c["g"], c["d"]
    count = torch.tensor(c["counts"]).view(B, Hkv)
    sizes = count.reshape(-1) + torch.tensor(c["gaps"])  # segments with free slots after them
    start = (sizes.cumsum(0) - sizes).view(B, Hkv)
    P = int(sizes.sum())
    k = torch.full((P, d), float("nan"), dtype=dt)
    v = torch.full((P, d), float("nan"), dtype=dt)
    used = torch.zeros(P, dtype=torch.bool)
    for s, n in zip(start.reshape(-1).tolist(), count.reshape(-1).tolist()):
        used[s:s + n] = True
    k[used] = torch.randn(int(used.sum()), d, generator=gen).to(dt)
    v[used] = torch.randn(int(used.sum()), d, generator=gen).to(dt)
    q = torch.randn(B, Hkv * g, 1, d, generator=gen).to(dt)
    length = int(count.max()) + c["extra"]
    kw = dict(scale=d ** -0.5, length=length)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", c["min_split"])  # split-K on small segments
        got = ragged_decode_attention(q, k, v, start, count, **kw)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # the reference's pools are finite (the kernel's hold NaN)
    ref = ragged_decode_reference(q, k, v, start, count, return_lse=True, **kw)[:2]
    gold = ragged_decode_reference(q.double(), k.double(), v.double(), start, count, return_lse=True, **kw)[:2]
    check_attention(got, ref, gold, v[used], f"ragged decode {c}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_ragged_kernel_matches_reference(c):
    _run(c)


def test_ragged_zero_and_full_segments_gqa():
    """A row whose heads hold 0, a full segment and 1 token; a second row with more tokens."""
    for dtype in sorted(DTYPES):
        _run(dict(B=2, Hkv=3, g=4, counts=[0, 100, 1, 37, 64, 99], gaps=[0, 0, 3, 1, 0, 2], extra=0, d=64,
                  dtype=dtype, min_split=16, seed=5))
    rendered = pathlib.Path(os.environ["KVFX_CACHE_DIR"]).rglob("*_ragged_1.py")
    assert any(True for _ in rendered), "the ragged kernel did not run"


def test_ragged_spec_is_checked():
    assert KernelSpec("decode_attention", "fp16", 64, 4, ragged=True).uri.endswith("_ragged_1")
    assert not KernelSpec("decode_attention", "fp16", 64, 4).uri.endswith("_ragged_1")
    with pytest.raises(ValueError, match=r"KernelSpec.ragged: got True for prefill_attention"):
        KernelSpec("prefill_attention", "fp16", 64, ragged=True)
    with pytest.raises(ValueError, match=r"ragged_decode_attention: start must be an integer"):
        ragged_decode_attention(torch.randn(1, 2, 1, 16), torch.randn(4, 16), torch.randn(4, 16),
                                torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.long), scale=0.25)


@st.composite
def select_cases(draw):
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.integers(1, 70))
    return dict(B=B, H=H, n=n, pads=[draw(st.integers(0, n)) for _ in range(B)],
                budgets=draw(st.lists(st.one_of(st.sampled_from([0, n]), st.integers(0, n + 3)),
                                      min_size=B * H, max_size=B * H)),
                gaps=draw(st.lists(st.integers(0, 4), min_size=B * H, max_size=B * H)),
                ties=draw(st.booleans()), d=draw(st.sampled_from([16, 32])),
                dtype=draw(st.sampled_from(sorted(DTYPES))), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(select_cases())
def test_ragged_select_gather_matches_reference(c):
    """The ragged select+gather kernel writes exactly the reference's tokens and positions into
    each segment (budgets 0, all tokens and more, left pads, ties) and leaves every other slot
    untouched (sentinels)."""
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, H, n, d = c["B"], c["H"], c["n"], c["d"]
    valid = torch.ones(B, n, dtype=torch.bool)
    for b, p in enumerate(c["pads"]):
        valid[b, :p] = False
    raw = torch.randint(0, 3, (B, H, n), generator=gen).float() if c["ties"] else torch.randn(B, H, n, generator=gen)
    prio = priority(raw, valid, sink=1, window=2, kv_heads=H)
    budget = torch.tensor(c["budgets"]).view(B, H)
    sizes = budget.reshape(-1).clamp(max=n) + torch.tensor(c["gaps"])
    start = (sizes.cumsum(0) - sizes).view(B, H)
    P = int(sizes.sum())
    k = torch.randn(B, H, n, d, generator=gen).to(dt)
    v = torch.randn(B, H, n, d, generator=gen).to(dt)
    pools = [(torch.full((P, d), 7.0, dtype=dt), torch.full((P, d), 7.0, dtype=dt), torch.full((P,), -5))
             for _ in range(2)]
    got = select_gather_ragged(prio, budget, k, v, start, *pools[0])
    want = select_gather_ragged_reference(prio, budget, k, v, start, *pools[1])
    assert torch.equal(got, want)
    for a, b in zip(pools[0], pools[1]):
        assert torch.equal(a, b)
