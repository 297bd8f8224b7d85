"""Fused eviction scores of the attention kernels (interpreted on CPU) against the references.

Prefill scores="window_colsum" | "colsum" | "last_row" (SnapKV votes, H2O column sums, TOVA) and
decode return_probs, with the oracle of kernel_oracle (STYLE item 4) on o, lse and the scores,
plus invariants: each voting row that sees a key contributes probabilities summing to 1, and
masked keys score exactly 0. Small query/key blocks are drawn so that windows span several query
blocks (several programs adding into one score) and n is rarely a block multiple.
"""
import kernel_oracle  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported)
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_oracle import DTYPES, check_attention, check_scores, layout  # noqa: E402

from kvfx.methods import h2o, snapkv, tova  # noqa: E402
from kvfx.methods.attention import decode_attention_reference, prefill_attention_reference  # noqa: E402
from kvfx.templates import configs, launch  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("window_colsum", "colsum", "last_row")
BLOCKS = {"16x16": configs.AttnConfig(16, 16, 2, 1), "32x16": configs.AttnConfig(32, 16, 4, 1),
          "16x32": configs.AttnConfig(16, 32, 2, 1), "table": None}


pytestmark = pytest.mark.usefixtures("force_triton")  # tests/templates/conftest.py


def _voters(B, n_q, n_k, scores, window, starts, lse):
    """(B, Hq) number of rows that vote and see a key: what each (b, h) score row must sum to."""
    lo = {"window_colsum": n_q - min(window, n_q), "colsum": 0, "last_row": n_q - 1}[scores]
    start = torch.tensor(starts) if starts is not None else torch.zeros(B, dtype=torch.long)
    rows = torch.arange(n_q)
    votes = (rows[None, :] >= lo) & (rows[None, :] + (n_k - n_q) >= start[:, None])  # (B, n_q)
    return (votes[:, None, :] & (lse > float("-inf"))).sum(-1).double()


@st.composite
def prefill_score_cases(draw):
    n_k = draw(st.one_of(st.sampled_from([1, 16, 17, 33]), st.integers(1, 80)))
    n_q = draw(st.one_of(st.just(n_k), st.just(n_k), st.integers(1, n_k)))
    B = draw(st.integers(1, 2))
    starts = draw(st.one_of(st.none(), st.lists(st.integers(0, n_k), min_size=B, max_size=B)))
    return dict(
        B=B, Hkv=draw(st.integers(1, 2)), g=draw(st.integers(1, 3)), n_q=n_q, n_k=n_k,
        d=draw(st.sampled_from([16, 32, 64])), dtype=draw(st.sampled_from(sorted(DTYPES))),
        causal=draw(st.sampled_from([True, True, False])), starts=starts,
        scores=draw(st.sampled_from(KINDS)),
        window=draw(st.one_of(st.sampled_from([1, 16, 17, 32]), st.integers(1, 100))),
        blocks=draw(st.sampled_from(sorted(BLOCKS))), seq_major=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, Hkv, g, n_q, n_k, d = c["B"], c["Hkv"], c["g"], c["n_q"], c["n_k"], c["d"]
    q = layout(torch.randn(B, Hkv * g, n_q, d, generator=gen).to(dt), c["seq_major"])
    k = layout(torch.randn(B, Hkv, n_k, d, generator=gen).to(dt), c["seq_major"])
    v = layout(torch.randn(B, Hkv, n_k, d, generator=gen).to(dt), c["seq_major"])
    return q, k, v


def _run_prefill_scores(c):
    q, k, v = _inputs(c)
    kv_start = torch.tensor(c["starts"], dtype=torch.int32) if c["starts"] is not None else None
    kw = dict(scale=c["d"] ** -0.5, causal=c["causal"], kv_start=kv_start, scores=c["scores"],
              window=c["window"])
    with pytest.MonkeyPatch.context() as mp:
        if BLOCKS[c["blocks"]] is not None:
            mp.setattr(configs, "PREFILL_CONFIGS", (BLOCKS[c["blocks"]],))
        got = launch.prefill_attention(q, k, v, **kw)
    ref_lo = prefill_attention_reference(q, k, v, **kw)
    golden = prefill_attention_reference(q.double(), k.double(), v.double(), **kw)
    name = f"prefill scores {c}"
    assert len(got) == 3 and got[2].shape == (c["B"], q.shape[1], c["n_k"]), name
    check_attention(got[:2], ref_lo[:2], golden[:2], v, name)
    check_scores(got[2], ref_lo[2], golden[2], name)
    want = _voters(c["B"], c["n_q"], c["n_k"], c["scores"], c["window"], c["starts"], golden[1])
    torch.testing.assert_close(got[2].double().sum(-1), want, rtol=1e-5, atol=1e-5, msg=name)
    if c["starts"] is not None:
        for b, s in enumerate(c["starts"]):
            assert (got[2][b, :, :s] == 0).all(), f"{name}: pad keys must score 0"


@SETTINGS
@given(prefill_score_cases())
def test_prefill_scores_match_reference(c):
    _run_prefill_scores(c)


@pytest.mark.parametrize("scores", KINDS)
@pytest.mark.parametrize("n, window", [(1, 32), (33, 5), (33, 40), (40, 17)])
def test_prefill_scores_edges(scores, n, window):
    # n = 1 (one row, one key), windows narrower / wider than n and than a 16-row block,
    # left padding covering a whole key block, fp16.
    _run_prefill_scores(dict(B=2, Hkv=1, g=2, n_q=n, n_k=n, d=32, dtype="fp16", causal=True,
                             starts=[0, min(n, 17)], scores=scores, window=window, blocks="16x16",
                             seq_major=False, seed=n + window))


@pytest.mark.parametrize("scores", KINDS)
def test_prefill_kernel_scores_equal_scorer_math(scores):
    # The kernel's side output is the scorers' own quantity (prefill, n_q == n_k, kv_start -> valid).
    gen = torch.Generator().manual_seed(5)
    B, Hkv, g, n, d = 2, 2, 2, 45, 32
    q, k, v = (torch.randn(B, h, n, d, generator=gen) for h in (Hkv * g, Hkv, Hkv))
    starts = torch.tensor([0, 9], dtype=torch.int32)
    valid = torch.arange(n)[None, :] >= starts[:, None].long()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "PREFILL_CONFIGS", (BLOCKS["16x16"],))
        got = launch.prefill_attention(q, k, v, scale=d**-0.5, kv_start=starts, scores=scores, window=20)[2]
    want = {"window_colsum": lambda: snapkv.window_votes(q, k, valid, window=20, scale=d**-0.5),
            "colsum": lambda: h2o.column_sums(q, k, valid, scale=d**-0.5),
            "last_row": lambda: tova.last_query_scores(q, k, valid, scale=d**-0.5)}[scores]()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(prefill_score_cases())
def test_prefill_window_logits_match_reference(c):
    """scores="window_logits": the logits of the last min(window, n_q) rows; the same -inf pattern
    as the reference (causal, kv_start, non-voting pad rows), finite logits within the oracle's
    tolerance, and their row softmax sums to the kernel's own window_colsum votes."""
    c = dict(c, scores="window_logits")
    q, k, v = _inputs(c)
    kv_start = torch.tensor(c["starts"], dtype=torch.int32) if c["starts"] is not None else None
    kw = dict(scale=c["d"] ** -0.5, causal=c["causal"], kv_start=kv_start, window=c["window"])
    with pytest.MonkeyPatch.context() as mp:
        if BLOCKS[c["blocks"]] is not None:
            mp.setattr(configs, "PREFILL_CONFIGS", (BLOCKS[c["blocks"]],))
        got = launch.prefill_attention(q, k, v, scores="window_logits", **kw)
        votes = launch.prefill_attention(q, k, v, scores="window_colsum", **kw)[2]
    ref_lo = prefill_attention_reference(q, k, v, scores="window_logits", **kw)
    golden = prefill_attention_reference(q.double(), k.double(), v.double(), scores="window_logits", **kw)
    name = f"window logits {c}"
    w = min(c["window"], c["n_q"])
    assert got[2].shape == (c["B"], q.shape[1], w, c["n_k"]) and got[2].dtype == torch.float32, name
    check_attention(got[:2], ref_lo[:2], golden[:2], v, name)
    masked = golden[2] == float("-inf")
    assert torch.equal(got[2] == float("-inf"), masked), f"{name}: -inf pattern differs"
    assert not got[2].isnan().any(), name
    fin = ~masked
    if fin.any():
        err_k = (got[2].double() - golden[2])[fin].abs().max().item()
        err_r = (ref_lo[2].double() - golden[2])[fin].abs().max().item()
        top = golden[2][fin].abs().max().item()
        assert err_k <= 3 * err_r + 2e-6 * (1 + top), f"{name}: logits err {err_k:.3g} vs reference {err_r:.3g}"
    probs = torch.nan_to_num(torch.softmax(got[2].double(), -1), nan=0.0).sum(2)
    torch.testing.assert_close(probs, votes.double(), rtol=1e-4, atol=1e-5, msg=name)


@st.composite
def decode_probs_cases(draw):
    cap = draw(st.one_of(st.sampled_from([1, 16, 17, 100]), st.integers(1, 200)))
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    length = st.one_of(st.sampled_from([0, 1, cap]), st.integers(0, cap), st.integers(-2, cap + 5))
    return dict(
        B=B, Hkv=Hkv, g=draw(st.sampled_from([1, 2, 3, 4])), cap=cap,
        lengths=draw(st.lists(length, min_size=B * Hkv, max_size=B * Hkv)),
        d=draw(st.sampled_from([16, 32, 64])), dtype=draw(st.sampled_from(sorted(DTYPES))),
        bias=draw(st.sampled_from(["none", "shared", "per_head", "with_inf"])),
        min_split=draw(st.sampled_from([16, 32, 256])), seq_major=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _run_decode_probs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    B, Hkv, g, cap, d = c["B"], c["Hkv"], c["g"], c["cap"], c["d"]
    lengths = torch.tensor(c["lengths"], dtype=torch.int32).view(B, Hkv)
    q = torch.randn(B, Hkv * g, 1, d, generator=gen).to(dt)
    k = torch.randn(B, Hkv, cap, d, generator=gen).to(dt)
    v = torch.randn(B, Hkv, cap, d, generator=gen).to(dt)
    unused = torch.arange(cap)[None, None, :] >= lengths[..., None]
    k[unused], v[unused] = float("nan"), float("nan")  # unused slots may hold anything
    k, v = layout(k, c["seq_major"]), layout(v, c["seq_major"])
    bias = None
    if c["bias"] != "none":
        bias = torch.randn(B, Hkv if c["bias"] == "per_head" else 1, cap, generator=gen)
        if c["bias"] == "with_inf":
            bias[torch.rand(bias.shape, generator=gen) < 0.3] = float("-inf")
    kw = dict(scale=d**-0.5, bias=bias, return_probs=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "MIN_TOKENS_PER_SPLIT", c["min_split"])  # exercise split-K on small caps
        got = launch.decode_attention(q, k, v, lengths, **kw)
    ref_lo = decode_attention_reference(q, k, v, lengths, **kw)
    golden = decode_attention_reference(q.double(), k.double(), v.double(), lengths, **kw)
    name = f"decode probs {c}"
    assert len(got) == 3 and got[2].shape == (B, Hkv * g, cap), name
    check_attention(got[:2], ref_lo[:2], golden[:2], v, name)
    check_scores(got[2], ref_lo[2], golden[2], name)
    seen = (golden[1][..., 0] > float("-inf")).double()
    torch.testing.assert_close(got[2].double().sum(-1), seen, rtol=1e-5, atol=1e-5, msg=name)
    beyond = torch.arange(cap)[None, None, :] >= lengths.clamp(0, cap).repeat_interleave(g, 1)[..., None]
    assert (got[2][beyond] == 0).all(), f"{name}: slots >= lengths must be 0"


@SETTINGS
@given(decode_probs_cases())
def test_decode_probs_match_reference(c):
    _run_decode_probs(c)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_decode_probs_many_splits(dtype):
    _run_decode_probs(dict(B=1, Hkv=2, g=3, cap=200, lengths=[200, 77], d=64, dtype=dtype,
                           bias="with_inf", min_split=16, seq_major=True, seed=3))


def test_decode_without_probs_is_unchanged():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 1, 32, generator=gen)
    k, v = (torch.randn(1, 1, 40, 32, generator=gen) for _ in range(2))
    lengths = torch.tensor([[33]], dtype=torch.int32)
    plain = launch.decode_attention(q, k, v, lengths, scale=0.2)
    with_probs = launch.decode_attention(q, k, v, lengths, scale=0.2, return_probs=True)
    assert len(plain) == 2 and len(with_probs) == 3
    assert torch.equal(plain[0], with_probs[0]) and torch.equal(plain[1], with_probs[1])
