"""Attention in plain PyTorch: the semantic oracle of the kvfx attention kernels and their CPU path.

Notation: B batch, Hq query heads, Hkv KV heads, g = Hq // Hkv (query head h reads KV head
h // g), n_q / n_k query / key lengths, cap store capacity, d head dim.
Logits are s = scale * q.kᵀ (+ bias); with ``softcap=cap`` (Gemma-2's attn_logit_softcapping, the
kernels' SOFTCAP) the prefill and decode references form s = cap * tanh(scale * q.kᵀ / cap) (+ bias)
instead, before any mask, and every score below is formed from these capped logits.
Every function returns `(o, lse)`: o in the input dtype, lse = log Σ_j exp(s_j) over the *visible*
keys, natural log, fp32 (float64 for float64 input).
A row that sees no key has o = 0 and lse = -inf. Math runs in fp32 (float64 for float64 input).
Masked keys never reach o, even when their K/V hold NaN (unused store slots, pads).

Fused eviction scores (the kernels' side outputs; a third return value when asked for), with
P[i, j] = softmax_j(s_ij) over the keys visible to query row i:
    prefill, scores="window_colsum" (SnapKV votes): Σ_{i in the last `window` rows} P[i, j]
    prefill, scores="colsum" (H2O column sums):     Σ_{all rows i} P[i, j]
    prefill, scores="last_row" (TOVA):               P[n_q - 1, j]
    prefill, scores="window_logits":                 s_ij of the last `window` rows (-inf where
                                                     not visible), (B, Hq, min(window, n_q), n_k)
    decode, return_probs=True (H2O/TOVA at decode):  P[0, j] over the store slots
Query row i sits at position i + (n_k - n_q), the alignment of the causal mask; it votes only
if that position is >= kv_start[b] (0 without kv_start), so left-pad query rows never vote.
Scores are (B, Hq, n_k) (decode: (B, Hq, cap)), fp32 (float64 for float64 input), 0 at
masked keys and for rows that see no key (window_logits: -inf there, and whole rows of
non-voting queries are -inf).
"""
from __future__ import annotations

import math

import torch

_QUERY_CHUNK = 1024  # rows per chunk: bounds the (B, Hq, chunk, n_k) logits on the CPU path
# the attention kinds of kvfx.templates.spec.SCORE_KINDS
SCORE_KINDS = ("none", "window_colsum", "colsum", "last_row", "window_logits")


def check_score_args(op: str, scores, window) -> None:
    """Shared by the references and the launchers: `scores` one of SCORE_KINDS, `window` an int >= 1."""
    if type(scores) is not str or scores not in SCORE_KINDS:
        raise ValueError(f"{op}: scores got {scores!r}, expected one of {', '.join(SCORE_KINDS)}")
    if type(window) is not int or window < 1:
        raise ValueError(f"{op}: window got {window!r}, expected an int >= 1 (the SnapKV observation "
                         "window, in query rows)")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...) with query head h reading KV head h // g."""
    g = n_heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def check_softcap(op: str, softcap) -> None:
    """Shared by the references and the launchers: ``softcap`` None (no cap) or a finite float > 0."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap <= 0:
        raise ValueError(f"{op}: softcap got {softcap!r}, expected None (no cap) or a finite float > 0 "
                         "(the model's attn_logit_softcapping)")


def _logits(q, k, scale, softcap=None):
    """scale * q.kᵀ, soft-capped as cap * tanh(s / cap) when ``softcap`` is set (Hugging Face's order:
    divide, tanh, multiply)."""
    s = scale * (q @ k.transpose(-1, -2))
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def _masked_attention(q, k, v, visible, scale, bias=None, softcap=None):
    """q (B, Hq, m, d); k, v (B, Hq, n, d); visible bool broadcastable to (B, Hq, m, n);
    bias broadcastable to (B, Hq, m, n) or None; softcap: see :func:`_logits`. Returns (o, lse, p) in
    the compute dtype, p the (B, Hq, m, n) probabilities (0 at masked keys and in rows that see no key)."""
    k = torch.where(visible.any(dim=-2).unsqueeze(-1), k, 0)  # NaN in masked slots stays out
    v = torch.where(visible.any(dim=-2).unsqueeze(-1), v, 0)
    s = _logits(q, k, scale, softcap)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # [Note] an empty row has lse = -inf; shift by 0 there so p = exp(-inf) = 0 instead of NaN.
    shift = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    p = torch.exp(s - shift.unsqueeze(-1))
    return p @ v, lse, p


def prefill_attention_reference(q, k, v, *, scale, causal=True, kv_start=None, scores="none", window=32,
                                softcap=None):
    """Attention of every query over the prompt's keys, optionally with fused eviction scores.

    q: (B, Hq, n_q, d); k, v: (B, Hkv, n_k, d), Hq % Hkv == 0, any strides.
    causal: query i sees key j iff j <= i + (n_k - n_q) (bottom-right aligned; the usual
        lower triangle when n_q == n_k).
    kv_start: optional (B,) integer; keys j < kv_start[b] are masked (left padding), and so are
        the votes of query rows at positions i + (n_k - n_q) < kv_start[b].
    scores: "none" | "window_colsum" (Σ of the last min(window, n_q) rows' probabilities) |
        "colsum" (Σ over all rows) | "last_row" (row n_q - 1) | "window_logits" (the logits of the
        last min(window, n_q) rows); window is ignored by colsum and last_row.
    softcap: None, or the cap of soft-capped logits, s = cap * tanh(scale * q.kᵀ / cap) (the
        output, lse and every score are those of the capped logits).
    Returns o (B, Hq, n_q, d) in q's dtype and lse (B, Hq, n_q) fp32 (float64 for float64 input),
    plus scores (B, Hq, n_k) in lse's dtype when scores != "none" (window_logits:
    (B, Hq, min(window, n_q), n_k)).

    >>> q = k = v = torch.randn(1, 2, 5, 16)
    >>> o, lse = prefill_attention_reference(q, k, v, scale=0.25)
    >>> o.shape, lse.shape
    (torch.Size([1, 2, 5, 16]), torch.Size([1, 2, 5]))
    >>> o, lse, s = prefill_attention_reference(q, k, v, scale=0.25, scores="window_colsum", window=2)
    >>> s.shape, round(float(s.sum()), 4)   # 2 heads x 2 window rows, each row sums to 1
    (torch.Size([1, 2, 5]), 4.0)
    """
    check_score_args("prefill_attention_reference", scores, window)
    check_softcap("prefill_attention_reference", softcap)
    cd = _compute_dtype(q)
    B, Hq, n_q, _ = q.shape
    n_k = k.shape[2]
    k = _expand_kv(k.to(cd), Hq)
    v = _expand_kv(v.to(cd), Hq)
    key = torch.arange(n_k, device=q.device)
    start = torch.zeros(B, dtype=torch.long, device=q.device)
    if kv_start is not None:
        start = kv_start.to(q.device).long()
    key_ok = key[None, :] >= start[:, None]  # (B, n_k)
    w = min(window, n_q)
    vote_lo = {"none": n_q, "window_colsum": n_q - w, "colsum": 0, "last_row": n_q - 1,
               "window_logits": n_q - w}[scores]
    total = torch.zeros(B, Hq, n_k, dtype=cd, device=q.device)
    logits = []
    outs, lses = [], []
    for i0 in range(0, n_q, _QUERY_CHUNK):
        i1 = min(i0 + _QUERY_CHUNK, n_q)
        rows = torch.arange(i0, i1, device=q.device)
        visible = key_ok[:, None, None, :]  # (B, 1, 1, n_k)
        if causal:
            visible = visible & (key[None, :] <= rows[:, None] + (n_k - n_q))[None, None]
        o, lse, p = _masked_attention(q[:, :, i0:i1].to(cd), k, v, visible, scale, softcap=softcap)
        outs.append(o)
        lses.append(lse)
        if i1 > vote_lo:
            votes = (rows[None, :] >= vote_lo) & (rows[None, :] + (n_k - n_q) >= start[:, None])  # (B, m)
            if scores == "window_logits":
                r0 = max(i0, vote_lo)
                s = _logits(q[:, :, r0:i1].to(cd), k, scale, softcap)
                ok = visible.expand(B, 1, i1 - i0, n_k)[:, :, r0 - i0:] & votes[:, None, r0 - i0:, None]
                logits.append(s.masked_fill(~ok, float("-inf")))
            else:
                total += (p * votes[:, None, :, None]).sum(2)
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape, dtype=cd)
    lse = torch.cat(lses, dim=2) if lses else q.new_zeros(q.shape[:3], dtype=cd)
    out_dtype = torch.float64 if cd == torch.float64 else torch.float32
    if scores == "none":
        return o.to(q.dtype), lse.to(out_dtype)
    if scores == "window_logits":
        total = torch.cat(logits, dim=2) if logits else q.new_zeros(B, Hq, 0, n_k, dtype=cd)
    return o.to(q.dtype), lse.to(out_dtype), total.to(out_dtype)


def decode_attention_reference(q, k, v, lengths, *, scale, bias=None, return_probs=False, calib=None,
                               softcap=None):
    """One new query per sequence attends over a fixed-capacity store.

    q: (B, Hq, 1, d); k, v: (B, Hkv, cap, d) (the store); lengths: (B, Hkv) integer, slots
    [0, lengths[b, h]) are valid (clamped to [0, cap]); bias: optional additive fp32 (B, 1, cap)
    or (B, Hkv, cap), added to the scaled logits (-inf masks a slot).
    softcap: None, or the cap of soft-capped logits, s = cap * tanh(scale * q.kᵀ / cap) + bias.
    calib: optional CaliDrop partition (o_e (B, Hq, d), lse_e (B, Hq), use (B, Hq) bool or
    integer, nonzero = use), e.g. `kvfx.methods.calidrop.lookup`'s; where use holds it is merged
    with the store's attention before the output is rounded to q's dtype (`merge_partitions`, in
    the compute dtype), so o and lse are those of the union of the two partitions; elsewhere o and
    lse are exactly those without calib. probs stay normalized over the store slots.
    Returns o (B, Hq, 1, d) in q's dtype and lse (B, Hq, 1) fp32 (float64 for float64 input),
    plus, with return_probs, the attention row probs (B, Hq, cap) in lse's dtype (0 at slots
    >= lengths[b, h // g], at -inf bias, and for heads with no valid slot).

    >>> q = torch.randn(2, 4, 1, 16); k = v = torch.randn(2, 2, 8, 16)
    >>> lengths = torch.tensor([[3, 8], [0, 5]], dtype=torch.int32)
    >>> o, lse = decode_attention_reference(q, k, v, lengths, scale=0.25)
    >>> float(lse[1, 0, 0]), float(o[1, 0].abs().sum())   # KV head 0 of batch 1 is empty
    (-inf, 0.0)
    >>> probs = decode_attention_reference(q, k, v, lengths, scale=0.25, return_probs=True)[2]
    >>> probs.shape, round(float(probs[0, 0].sum()), 4), float(probs[0, 0, 3:].abs().sum())
    (torch.Size([2, 4, 8]), 1.0, 0.0)
    """
    if type(return_probs) is not bool:
        raise ValueError(f"decode_attention_reference: return_probs got {return_probs!r}, "
                         "expected True or False")
    check_softcap("decode_attention_reference", softcap)
    cd = _compute_dtype(q)
    Hq, cap = q.shape[1], k.shape[2]
    slot = torch.arange(cap, device=q.device)
    valid = slot[None, None, :] < lengths.to(q.device).long()[:, :, None]  # (B, Hkv, cap)
    visible = _expand_kv(valid, Hq).unsqueeze(2)  # (B, Hq, 1, cap)
    b = None
    if bias is not None:
        b = bias.to(cd)
        b = (b if b.shape[1] == 1 else _expand_kv(b, Hq)).unsqueeze(2)
    o, lse, p = _masked_attention(
        q.to(cd), _expand_kv(k.to(cd), Hq), _expand_kv(v.to(cd), Hq), visible, scale, b, softcap
    )
    if calib is not None:
        o_e, lse_e, use = calib
        use = (use != 0).reshape(lse.shape)
        o_m, lse_m = merge_partitions(o, lse, o_e.to(cd).reshape(o.shape), lse_e.to(cd).reshape(lse.shape))
        o, lse = torch.where(use[..., None], o_m, o), torch.where(use, lse_m, lse)
    out_dtype = torch.float64 if cd == torch.float64 else torch.float32
    if not return_probs:
        return o.to(q.dtype), lse.to(out_dtype)
    return o.to(q.dtype), lse.to(out_dtype), p[:, :, 0].to(out_dtype)


def grouped_attention_reference(q, k, v, *, scale, keep=None, return_lse=False, return_probs=False):
    """Attention of q over a store's slots that reads each KV head once for its whole query group.

    q: (B, Hq, m, d); k, v: (B, Hkv, n, d) (a store's held slots), Hq % Hkv == 0.
    keep: None (every slot visible to every query), or a mask broadcastable to (B, Hq, m, n),
        its head dim 1 or Hq (query head h reads KV head h // g): bool (True = attend) or an
        additive float bias (-inf masks).
    Returns (o (B, Hq, m, dv) in q's dtype, lse (B, Hq, m) fp32 or None, probs (B, Hq, m, n)
    fp32 or None): lse and probs only when asked for. A row that sees no slot has o = 0,
    lse = -inf, probs 0.

    This is the CPU execution of :func:`decode_attention_reference`'s semantics for a dense
    store (DESIGN rule 5): the g query heads of a group are stacked as rows of one
    (g·m, d) x (d, n) product per KV head, so no per-query-head copy of K/V exists, fp32 or
    float64 input is read in place, and the softmax is one fused op. Without a mask, lse or
    probabilities (a plain decode step), fp32/float64 input runs torch's fused
    ``scaled_dot_product_attention`` (grouped), the same math in one pass. Half-precision K/V are
    upcast to fp32 (a copy per step, the price of fp32 math). Unlike the slot-masked
    reference, masked slots must hold finite K/V (a store's slots below its length always do).

    >>> q = torch.randn(1, 4, 1, 8); k = v = torch.randn(1, 2, 5, 8)
    >>> o, lse, _ = grouped_attention_reference(q, k, v, scale=0.35, return_lse=True)
    >>> o2, lse2 = decode_attention_reference(q, k, v, torch.full((1, 2), 5), scale=0.35)
    >>> torch.allclose(o, o2, atol=1e-6), torch.allclose(lse, lse2, atol=1e-6)
    (True, True)
    """
    cd = _compute_dtype(q)
    B, Hq, m, d = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    if keep is None and not return_lse and not return_probs and n and q.dtype == cd:
        # every slot visible to every query (no empty row): torch's fused kernel computes this
        # same softmax(scale·q·kᵀ)·v in one pass over K/V (grouped, no expansion)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=scale, enable_gqa=g > 1), None, None
    qg = (q.to(cd) * scale).reshape(B, Hkv, g * m, d)
    s = torch.matmul(qg, k.to(cd).transpose(-1, -2)).view(B, Hkv, g, m, n)
    if keep is not None:
        kb = keep.reshape(keep.shape[0], 1, 1, *keep.shape[2:]) if keep.shape[1] == 1 \
            else keep.reshape(keep.shape[0], Hkv, g, *keep.shape[2:])
        s = s.masked_fill(~kb, float("-inf")) if kb.dtype == torch.bool else s + kb.to(cd)
    lse = torch.logsumexp(s, dim=-1).reshape(B, Hq, m) if return_lse else None
    p = torch.softmax(s, dim=-1)
    if keep is not None:  # a row that sees no slot: softmax of all -inf is NaN, its p is 0
        p = p.nan_to_num_(0.0)
    o = torch.matmul(p.view(B, Hkv, g * m, n), v.to(cd)).view(B, Hq, m, v.shape[-1])
    out_dtype = torch.float64 if cd == torch.float64 else torch.float32
    return (o.to(q.dtype), None if lse is None else lse.to(out_dtype),
            p.reshape(B, Hq, m, n).to(out_dtype) if return_probs else None)


def merge_partitions(o1, lse1, o2, lse2):
    """Exact merge of attention over two disjoint key sets.

    o1, o2: (..., d) attention outputs of each partition; lse1, lse2: (...) their log-sum-exps.
    o = σ(lse1 − lse2)·o1 + (1 − σ(lse1 − lse2))·o2, lse = logaddexp(lse1, lse2). An empty
    partition (lse = -inf) gets weight 0 whatever its o holds; two empty ones give o = 0,
    lse = -inf. Computes in fp32 (float64 for float64 input); o in o1's dtype, lse in lse1's.

    >>> o, lse = merge_partitions(torch.ones(3), torch.tensor(0.0), torch.zeros(3), torch.tensor(0.0))
    >>> o.tolist(), round(float(lse), 4)
    ([0.5, 0.5, 0.5], 0.6931)
    """
    cd = _compute_dtype(o1)
    l1, l2 = lse1.to(cd), lse2.to(cd)
    ninf = float("-inf")
    e1, e2 = l1 == ninf, l2 == ninf
    # [Note] σ(-inf - x) is 0 already, but -inf - -inf is NaN: pin the weights of empty parts.
    w1 = torch.where(e1, 0.0, torch.where(e2, 1.0, torch.sigmoid(l1 - l2)))
    w2 = torch.where(e2, 0.0, 1.0 - w1)
    a = torch.where(w1.unsqueeze(-1) > 0, w1.unsqueeze(-1) * o1.to(cd), 0.0)
    b = torch.where(w2.unsqueeze(-1) > 0, w2.unsqueeze(-1) * o2.to(cd), 0.0)
    return (a + b).to(o1.dtype), torch.logaddexp(l1, l2).to(lse1.dtype)
