"""Attention in plain PyTorch: the semantic oracle of the kvfx attention kernels and their CPU path.

Notation: B batch, Hq query heads, Hkv KV heads, g = Hq // Hkv (query head h reads KV head
h // g), n_q / n_k query / key lengths, cap store capacity, d head dim.
Logits are s = scale * q.kᵀ (+ bias). Every function returns `(o, lse)`: o in the input dtype,
lse = log Σ_j exp(s_j) over the *visible* keys, natural log, fp32 (float64 for float64 input).
A row that sees no key has o = 0 and lse = -inf. Math runs in fp32 (float64 for float64 input).
Masked keys never reach o, even when their K/V hold NaN (unused store slots, pads).
"""
from __future__ import annotations

import torch

_QUERY_CHUNK = 1024  # rows per chunk: bounds the (B, Hq, chunk, n_k) logits on the CPU path


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...) with query head h reading KV head h // g."""
    g = n_heads // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def _masked_attention(q, k, v, visible, scale, bias=None):
    """q (B, Hq, m, d); k, v (B, Hq, n, d); visible bool broadcastable to (B, Hq, m, n);
    bias broadcastable to (B, Hq, m, n) or None. Returns (o, lse) in the compute dtype."""
    k = torch.where(visible.any(dim=-2).unsqueeze(-1), k, 0)  # NaN in masked slots stays out
    v = torch.where(visible.any(dim=-2).unsqueeze(-1), v, 0)
    s = scale * (q @ k.transpose(-1, -2))
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # [Note] an empty row has lse = -inf; shift by 0 there so p = exp(-inf) = 0 instead of NaN.
    shift = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    p = torch.exp(s - shift.unsqueeze(-1))
    return p @ v, lse


def prefill_attention_reference(q, k, v, *, scale, causal=True, kv_start=None):
    """Attention of every query over the prompt's keys.

    q: (B, Hq, n_q, d); k, v: (B, Hkv, n_k, d), Hq % Hkv == 0, any strides.
    causal: query i sees key j iff j <= i + (n_k - n_q) (bottom-right aligned; the usual
        lower triangle when n_q == n_k).
    kv_start: optional (B,) integer; keys j < kv_start[b] are masked (left padding).
    Returns o (B, Hq, n_q, d) in q's dtype and lse (B, Hq, n_q) fp32 (float64 for float64 input).

    >>> q = k = v = torch.randn(1, 2, 5, 16)
    >>> o, lse = prefill_attention_reference(q, k, v, scale=0.25)
    >>> o.shape, lse.shape
    (torch.Size([1, 2, 5, 16]), torch.Size([1, 2, 5]))
    """
    cd = _compute_dtype(q)
    B, Hq, n_q, _ = q.shape
    n_k = k.shape[2]
    k = _expand_kv(k.to(cd), Hq)
    v = _expand_kv(v.to(cd), Hq)
    key = torch.arange(n_k, device=q.device)
    key_ok = torch.ones(B, n_k, dtype=torch.bool, device=q.device)
    if kv_start is not None:
        key_ok = key[None, :] >= kv_start.to(q.device).long()[:, None]
    outs, lses = [], []
    for i0 in range(0, n_q, _QUERY_CHUNK):
        i1 = min(i0 + _QUERY_CHUNK, n_q)
        rows = torch.arange(i0, i1, device=q.device)
        visible = key_ok[:, None, None, :]  # (B, 1, 1, n_k)
        if causal:
            visible = visible & (key[None, :] <= rows[:, None] + (n_k - n_q))[None, None]
        o, lse = _masked_attention(q[:, :, i0:i1].to(cd), k, v, visible, scale)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape, dtype=cd)
    lse = torch.cat(lses, dim=2) if lses else q.new_zeros(q.shape[:3], dtype=cd)
    return o.to(q.dtype), lse.to(torch.float64 if cd == torch.float64 else torch.float32)


def decode_attention_reference(q, k, v, lengths, *, scale, bias=None):
    """One new query per sequence attends over a fixed-capacity store.

    q: (B, Hq, 1, d); k, v: (B, Hkv, cap, d) (the store); lengths: (B, Hkv) integer, slots
    [0, lengths[b, h]) are valid (clamped to [0, cap]); bias: optional additive fp32 (B, 1, cap)
    or (B, Hkv, cap), added to the scaled logits (-inf masks a slot).
    Returns o (B, Hq, 1, d) in q's dtype and lse (B, Hq, 1) fp32 (float64 for float64 input).

    >>> q = torch.randn(2, 4, 1, 16); k = v = torch.randn(2, 2, 8, 16)
    >>> lengths = torch.tensor([[3, 8], [0, 5]], dtype=torch.int32)
    >>> o, lse = decode_attention_reference(q, k, v, lengths, scale=0.25)
    >>> float(lse[1, 0, 0]), float(o[1, 0].abs().sum())   # KV head 0 of batch 1 is empty
    (-inf, 0.0)
    """
    cd = _compute_dtype(q)
    Hq, cap = q.shape[1], k.shape[2]
    slot = torch.arange(cap, device=q.device)
    valid = slot[None, None, :] < lengths.to(q.device).long()[:, :, None]  # (B, Hkv, cap)
    visible = _expand_kv(valid, Hq).unsqueeze(2)  # (B, Hq, 1, cap)
    b = None
    if bias is not None:
        b = bias.to(cd)
        b = (b if b.shape[1] == 1 else _expand_kv(b, Hq)).unsqueeze(2)
    o, lse = _masked_attention(
        q.to(cd), _expand_kv(k.to(cd), Hq), _expand_kv(v.to(cd), Hq), visible, scale, b
    )
    return o.to(q.dtype), lse.to(torch.float64 if cd == torch.float64 else torch.float32)


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
