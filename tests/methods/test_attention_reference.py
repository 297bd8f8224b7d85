"""The PyTorch attention references against torch's SDPA and explicit logsumexp, in float64, and
their fused eviction scores against the scorers' own math (snapkv, h2o, tova)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfx.methods import attention, h2o, snapkv, tova
from kvfx.methods.attention import (
    check_score_args,
    decode_attention_reference,
    merge_partitions,
    prefill_attention_reference,
)

SETTINGS = settings(max_examples=30, deadline=None)
NINF = float("-inf")


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _logits(q, k, scale):
    g = q.shape[1] // k.shape[1]
    return scale * q @ k.repeat_interleave(g, dim=1).transpose(-1, -2)


@SETTINGS
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), g=st.integers(1, 4), n=st.integers(1, 40),
       d=st.sampled_from([8, 16]), seed=st.integers(0, 1000))
def test_prefill_matches_sdpa_gqa(B, Hkv, g, n, d, seed):
    q, k, v = _rand(B, Hkv * g, n, d, seed=seed), _rand(B, Hkv, n, d, seed=seed + 1), _rand(B, Hkv, n, d, seed=seed + 2)
    for causal in (False, True):
        o, lse = prefill_attention_reference(q, k, v, scale=0.3, causal=causal)
        want = F.scaled_dot_product_attention(q, k, v, scale=0.3, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
        s = _logits(q, k, 0.3)
        if causal:
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), NINF)
        torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)
        assert o.dtype == torch.float64 and lse.dtype == torch.float64


@SETTINGS
@given(B=st.integers(1, 3), n_q=st.integers(1, 20), extra=st.integers(0, 20), data=st.data())
def test_prefill_bottom_right_causal_and_kv_start(B, n_q, extra, data):
    n_k = n_q + extra
    starts = torch.tensor(data.draw(st.lists(st.integers(0, n_k), min_size=B, max_size=B)))
    q, k, v = _rand(B, 4, n_q, 8, seed=n_q), _rand(B, 2, n_k, 8, seed=extra), _rand(B, 2, n_k, 8, seed=7)
    o, lse = prefill_attention_reference(q, k, v, scale=0.5, causal=True, kv_start=starts)
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    mask = (j <= i + (n_k - n_q))[None, None] & (j >= starts[:, None, None, None])  # (B, 1, n_q, n_k)
    s = _logits(q, k, 0.5).masked_fill(~mask, NINF)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)
    seen = mask.any(-1).expand(B, 4, n_q)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(o[seen], want[seen], rtol=1e-12, atol=1e-12)
    assert (o[~seen] == 0).all() and (lse[~seen] == NINF).all()  # rows that see no key


def test_prefill_query_chunks_join_exactly(monkeypatch):
    q, k, v = _rand(2, 4, 11, 8, seed=0), _rand(2, 2, 11, 8, seed=1), _rand(2, 2, 11, 8, seed=2)
    starts = torch.tensor([0, 4])
    whole = prefill_attention_reference(q, k, v, scale=0.3, kv_start=starts)
    monkeypatch.setattr(attention, "_QUERY_CHUNK", 3)  # the CPU path bounds memory by chunking rows
    for got, want in zip(prefill_attention_reference(q, k, v, scale=0.3, kv_start=starts), whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_prefill_low_precision_returns_input_dtype_and_fp32_lse():
    q = k = v = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    o, lse = prefill_attention_reference(q, k, v, scale=0.25)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32


@SETTINGS
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), g=st.integers(1, 4), cap=st.integers(1, 40),
       bias_heads=st.sampled_from([0, 1, -1]), data=st.data())
def test_decode_matches_sdpa_with_lengths_and_bias(B, Hkv, g, cap, bias_heads, data):
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, cap), min_size=B * Hkv, max_size=B * Hkv)),
                           dtype=torch.int32).view(B, Hkv)
    q, k, v = _rand(B, Hkv * g, 1, 8, seed=cap), _rand(B, Hkv, cap, 8, seed=1), _rand(B, Hkv, cap, 8, seed=2)
    valid = torch.arange(cap)[None, None] < lengths[..., None]  # (B, Hkv, cap)
    k, v = k.masked_fill(~valid[..., None], float("nan")), v.masked_fill(~valid[..., None], float("nan"))
    bias = None if bias_heads == 0 else _rand(B, Hkv if bias_heads == -1 else 1, cap, seed=3)
    o, lse = decode_attention_reference(q, k, v, lengths, scale=0.4, bias=bias)
    add = torch.zeros(B, Hkv, cap, dtype=torch.float64) + (0 if bias is None else bias)
    add = add.masked_fill(~valid, NINF).repeat_interleave(g, dim=1).unsqueeze(2)  # (B, Hq, 1, cap)
    seen = valid.any(-1).repeat_interleave(g, dim=1).unsqueeze(-1)  # (B, Hq, 1)
    s = _logits(q, k.nan_to_num(0.0), 0.4) + add
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)
    want = F.scaled_dot_product_attention(q, k.nan_to_num(0.0), v.nan_to_num(0.0), attn_mask=add,
                                          scale=0.4, enable_gqa=True)
    torch.testing.assert_close(o[seen], want[seen], rtol=1e-12, atol=1e-12)
    assert (o[~seen] == 0).all() and not o.isnan().any()


@SETTINGS
@given(n=st.integers(1, 50), data=st.data())
def test_merge_of_disjoint_partitions_is_attention_over_union(n, data):
    in_first = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    q, k, v = _rand(2, 4, 1, 8, seed=n), _rand(2, 2, n, 8, seed=n + 1), _rand(2, 2, n, 8, seed=n + 2)
    lengths = torch.full((2, 2), n, dtype=torch.int32)
    mask = torch.zeros(2, 1, n, dtype=torch.float64)
    o1, l1 = decode_attention_reference(q, k, v, lengths, scale=0.3, bias=mask.masked_fill(~in_first, NINF))
    o2, l2 = decode_attention_reference(q, k, v, lengths, scale=0.3, bias=mask.masked_fill(in_first, NINF))
    o, lse = merge_partitions(o1, l1, o2, l2)
    want_o, want_lse = decode_attention_reference(q, k, v, lengths, scale=0.3)
    torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("empty_side", [1, 2])
def test_merge_with_an_empty_partition_returns_the_other(empty_side):
    o, lse = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    junk, ninf = torch.full((3, 8), float("nan"), dtype=torch.float64), torch.full((3,), NINF, dtype=torch.float64)
    args = (junk, ninf, o, lse) if empty_side == 1 else (o, lse, junk, ninf)
    mo, ml = merge_partitions(*args)
    assert torch.equal(mo, o) and torch.equal(ml, lse)


def test_merge_of_two_empty_partitions_is_empty():
    z, ninf = torch.zeros(2, 4), torch.full((2,), NINF)
    mo, ml = merge_partitions(z, ninf, z, ninf)
    assert (mo == 0).all() and (ml == NINF).all() and not mo.isnan().any()


# ---- fused eviction scores: the references equal the scorers' own math ----


def _scorer(kind, q, k, valid, window, scale):
    if kind == "window_colsum":
        return snapkv.window_votes(q, k, valid, window=window, scale=scale)
    if kind == "colsum":
        return h2o.column_sums(q, k, valid, scale=scale, block=7)  # blocks of 7 rows: several chunks
    return tova.last_query_scores(q, k, valid, scale=scale)


@SETTINGS
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), g=st.integers(1, 3), n=st.integers(1, 40),
       window=st.integers(1, 50), kind=st.sampled_from(["window_colsum", "colsum", "last_row"]),
       data=st.data())
def test_prefill_scores_equal_scorer_math(B, Hkv, g, n, window, kind, data):
    # Prefill (n_q == n_k, causal) with kv_start is the scorers' top-left q_pos with valid = j >= kv_start.
    starts = torch.tensor(data.draw(st.lists(st.integers(0, n), min_size=B, max_size=B)))
    gen = torch.Generator().manual_seed(n * 100 + window)
    q, k, v = (torch.randn(B, h, n, 16, generator=gen) for h in (Hkv * g, Hkv, Hkv))
    valid = torch.arange(n)[None, :] >= starts[:, None]
    o, lse, s = prefill_attention_reference(q, k, v, scale=0.3, kv_start=starts, scores=kind, window=window)
    assert s.shape == (B, Hkv * g, n) and s.dtype == torch.float32
    torch.testing.assert_close(s, _scorer(kind, q, k, valid, window, 0.3), rtol=1e-5, atol=1e-6)
    assert (s.masked_select(~valid[:, None, :].expand_as(s)) == 0).all()  # pad keys never score
    rows = {"window_colsum": min(window, n), "colsum": n, "last_row": 1}[kind]
    seen = (lse[:, :, n - rows:] > NINF).sum(-1).float()  # voting rows that see a key
    torch.testing.assert_close(s.sum(-1), seen, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(n_q=st.integers(1, 20), extra=st.integers(0, 20), causal=st.booleans(), window=st.integers(1, 30),
       kind=st.sampled_from(["window_colsum", "colsum", "last_row"]), data=st.data())
def test_prefill_scores_bottom_right_rows_and_query_pads(n_q, extra, causal, window, kind, data):
    # n_q <= n_k: row i sits at position i + n_k - n_q; it votes iff that position >= kv_start.
    n_k = n_q + extra
    starts = torch.tensor(data.draw(st.lists(st.integers(0, n_k), min_size=2, max_size=2)))
    q, k, v = _rand(2, 4, n_q, 8, seed=n_q), _rand(2, 2, n_k, 8, seed=extra), _rand(2, 2, n_k, 8, seed=3)
    o, lse, s = prefill_attention_reference(q, k, v, scale=0.5, causal=causal, kv_start=starts,
                                            scores=kind, window=window)
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    mask = (j >= starts[:, None, None, None]) & ((j <= i + extra) if causal else True)
    p = torch.softmax(_logits(q, k, 0.5).masked_fill(~mask, NINF), -1).nan_to_num(0.0)
    lo = {"window_colsum": n_q - min(window, n_q), "colsum": 0, "last_row": n_q - 1}[kind]
    votes = (torch.arange(n_q) >= lo)[None, :] & (torch.arange(n_q)[None, :] + extra >= starts[:, None])
    want = (p * votes[:, None, :, None]).sum(2)
    torch.testing.assert_close(s, want, rtol=1e-12, atol=1e-12)
    assert s.dtype == torch.float64
    assert len(prefill_attention_reference(q, k, v, scale=0.5, kv_start=starts)) == 2  # default unchanged


def test_prefill_scores_join_across_query_chunks(monkeypatch):
    q, k, v = _rand(2, 4, 11, 8, seed=0), _rand(2, 2, 11, 8, seed=1), _rand(2, 2, 11, 8, seed=2)
    starts = torch.tensor([0, 4])
    for kind in ("window_colsum", "colsum", "last_row"):
        whole = prefill_attention_reference(q, k, v, scale=0.3, kv_start=starts, scores=kind, window=6)
        with monkeypatch.context() as mp:
            mp.setattr(attention, "_QUERY_CHUNK", 3)
            chunked = prefill_attention_reference(q, k, v, scale=0.3, kv_start=starts, scores=kind, window=6)
        for got, want in zip(chunked, whole):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), g=st.integers(1, 3), cap=st.integers(1, 30),
       with_bias=st.booleans(), data=st.data())
def test_decode_probs_are_the_softmax_row(B, Hkv, g, cap, with_bias, data):
    lengths = torch.tensor(data.draw(st.lists(st.integers(-1, cap + 2), min_size=B * Hkv, max_size=B * Hkv)),
                           dtype=torch.int32).view(B, Hkv)
    q, k, v = _rand(B, Hkv * g, 1, 8, seed=cap), _rand(B, Hkv, cap, 8, seed=1), _rand(B, Hkv, cap, 8, seed=2)
    valid = torch.arange(cap)[None, None] < lengths[..., None]
    k, v = k.masked_fill(~valid[..., None], float("nan")), v.masked_fill(~valid[..., None], float("nan"))
    bias = _rand(B, 1, cap, seed=4).masked_fill(_rand(B, 1, cap, seed=5) > 1.0, NINF) if with_bias else None
    o, lse, probs = decode_attention_reference(q, k, v, lengths, scale=0.4, bias=bias, return_probs=True)
    add = torch.zeros(B, Hkv, cap, dtype=torch.float64) + (0 if bias is None else bias)
    add = add.masked_fill(~valid, NINF).repeat_interleave(g, dim=1)  # (B, Hq, cap)
    s = _logits(q, k.nan_to_num(0.0), 0.4)[:, :, 0] + add
    torch.testing.assert_close(probs, torch.softmax(s, -1).nan_to_num(0.0), rtol=1e-12, atol=1e-12)
    assert probs.shape == (B, Hkv * g, cap) and not probs.isnan().any()
    assert (probs[~valid.repeat_interleave(g, dim=1)] == 0).all()
    torch.testing.assert_close(probs.sum(-1), (lse[..., 0] > NINF).double(), rtol=1e-12, atol=1e-12)
    o2, lse2 = decode_attention_reference(q, k, v, lengths, scale=0.4, bias=bias)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


@pytest.mark.parametrize(
    "scores, window, match",
    [
        ("snapkv", 32, r"scores got 'snapkv', expected one of none, window_colsum, colsum, last_row"),
        ("colsum", 0, r"window got 0, expected an int >= 1"),
        ("colsum", True, r"window got True, expected an int >= 1"),
        ("colsum", 4.0, r"window got 4.0, expected an int >= 1"),
    ],
)
def test_score_argument_errors(scores, window, match):
    with pytest.raises(ValueError, match=match):
        check_score_args("op", scores, window)
    q = k = v = _rand(1, 2, 3, 8, seed=0)
    with pytest.raises(ValueError, match="prefill_attention_reference: " + match):
        prefill_attention_reference(q, k, v, scale=0.3, scores=scores, window=window)


def test_decode_return_probs_must_be_bool():
    q, k = _rand(1, 2, 1, 8, seed=0), _rand(1, 1, 4, 8, seed=1)
    with pytest.raises(ValueError, match="return_probs got 1, expected True or False"):
        decode_attention_reference(q, k, k, torch.tensor([[4]]), scale=0.3, return_probs=1)


@SETTINGS
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), g=st.integers(1, 4), m=st.integers(1, 5),
       n=st.integers(1, 30), mask=st.sampled_from(["none", "bool_all", "bool_1", "bias_all"]),
       data=st.data())
def test_grouped_reference_is_expanded_masked_attention(B, Hkv, g, m, n, mask, data):
    """The dense CPU read (grouped, no K/V expansion) equals attention with expanded KV heads in
    float64: o, lse and probs, for bool and additive masks of 1 or Hq heads, empty rows
    included (o = 0, lse = -inf, probs 0)."""
    seed = data.draw(st.integers(0, 1000))
    Hq = Hkv * g
    q, k, v = _rand(B, Hq, m, 8, seed=seed), _rand(B, Hkv, n, 8, seed=seed + 1), _rand(B, Hkv, n, 8, seed=seed + 2)
    keep = None
    s = _logits(q, k, 0.3)
    if mask != "none":
        heads = 1 if mask == "bool_1" else Hq
        gen = torch.Generator().manual_seed(seed + 3)
        vis = torch.rand(B, heads, m, n, generator=gen) < 0.6
        vis[0, 0, 0] = False  # one row that sees nothing
        if mask == "bias_all":
            bias = torch.randn(B, heads, m, n, generator=gen, dtype=torch.float64)
            keep = bias.masked_fill(~vis, NINF)
            s = s + keep
        else:
            keep = vis
            s = s.masked_fill(~vis, NINF)
    o, lse, probs = attention.grouped_attention_reference(q, k, v, scale=0.3, keep=keep,
                                                          return_lse=True, return_probs=True)
    want_lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(want_lse == NINF, 0.0, want_lse)[..., None])
    want_o = p @ v.repeat_interleave(g, dim=1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
    if mask != "none":
        assert float(o[0, 0, 0].abs().sum()) == 0.0 and lse[0, 0, 0] == NINF


def test_grouped_reference_dtypes():
    """fp32 agrees with float64; bf16 returns bf16 output with
    fp32 lse, close to the float64 answer."""
    q, k, v = (torch.randn(1, 6, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    o32, lse32, _ = attention.grouped_attention_reference(q, k, v, scale=0.25, return_lse=True)
    o64, lse64, _ = attention.grouped_attention_reference(q.double(), k.double(), v.double(), scale=0.25,
                                                          return_lse=True)
    torch.testing.assert_close(o32.double(), o64, rtol=1e-5, atol=1e-5)
    ob, lseb, _ = attention.grouped_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.25,
                                                        return_lse=True)
    assert ob.dtype == torch.bfloat16 and lseb.dtype == torch.float32
    torch.testing.assert_close(ob.double(), o64, rtol=0.05, atol=0.05)
