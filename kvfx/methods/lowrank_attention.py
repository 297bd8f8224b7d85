"""Attention over a low-rank (ReCalKV latent) store: the semantics of the latent decode kernel and
the CPU path.

Notation: B batch, Hq query heads, H KV heads (g = Hq // H: query head h reads KV head h // g),
d head dim, r_k / r_v the latent widths, Q_k (H·d, r_k), Q_v (H·d, r_v) the orthonormal bases of
:func:`kvfx.methods.lowrank.latent_basis` (rows h·d .. h·d + d − 1 are KV head h's block Q_k^h).
A store slot s holds one latent row per token, shared by every head: zk_s (r_k), zv_s (r_v), and
the token's logical position pos_s; ``cos``/``sin`` tables (B, T, d) hold the model's RoPE rows
by logical position.

For query head h of KV head u = h // g, with c_s = cos[pos_s], s_s = sin[pos_s]:

    k_s  = rope(zk_s · (Q_k^u)ᵀ, c_s, s_s)                       (the rebuilt post-RoPE key, d)
    l_s  = scale · q_h · k_s (+ bias),  p = softmax over the valid slots
    o_h  = (Σ_s p_s zv_s) · (Q_v^u)ᵀ                             (the value up-projection, once)

The value up-projection is applied once per query after the weighted sum (the same number as
Σ p_s (zv_s (Q_v^u)ᵀ), by linearity): values are never rebuilt per slot. Keys must be, since
RoPE depends on each slot's position. Math in fp32 (float64 for float64 queries).
"""

from __future__ import annotations

from typing import Optional

import torch

from kvfx.methods.lowrank import rope

__all__ = ["latent_attention_reference", "latent_quant_attention_reference", "rebuild_keys"]


def _cd(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def rebuild_keys(zk: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 qk: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Post-RoPE keys (B, H, T, d) in ``dtype`` from latents zk (B, T, r_k) at logical positions
    pos (B, T) (-1: any row; such slots must be masked by the caller)."""
    B, T, _ = zk.shape
    d = qk.shape[0] // heads
    k_pre = (zk.to(dtype) @ qk.to(dtype).mT).view(B, T, heads, d).transpose(1, 2)
    idx = pos.clamp(min=0).long()[..., None].expand(B, T, d)
    c = cos.gather(1, idx).to(dtype)[:, None]
    s = sin.gather(1, idx).to(dtype)[:, None]
    return rope(k_pre, c, s)


def _up_project(o_lat: torch.Tensor, qv: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hq, nq, r_v) weighted latent sums -> (B, Hq, nq, d) through each KV head's Q_v block."""
    B, Hq, nq, rv = o_lat.shape
    d = qv.shape[0] // heads
    blocks = qv.to(o_lat.dtype).view(heads, d, rv)  # (H, d, r_v)
    o = torch.einsum("bhgqr,hdr->bhgqd", o_lat.view(B, heads, Hq // heads, nq, rv), blocks)
    return o.reshape(B, Hq, nq, d)


def latent_attention_reference(q, zk, zv, lengths, pos, cos, sin, qk, qv, *, scale: float,
                               bias: Optional[torch.Tensor] = None, return_probs: bool = False):
    """Attention of q (B, Hq, nq, d) over a latent store (see the module docstring).

    zk (B, cap, r_k), zv (B, cap, r_v): the latents; lengths (B,) integer: slots [0, lengths[b])
    are valid; pos (B, cap) integer logical positions (read for valid slots only); cos, sin
    (B, T, d) RoPE tables with T > every valid position; qk, qv the bases; bias: optional additive
    mask broadcastable to (B, Hq, nq, cap) (-inf hides a slot; a bool mask: True = attend).
    Returns o (B, Hq, nq, d) in q's dtype and lse (B, Hq, nq) fp32 (float64 for float64 q), and
    with ``return_probs`` also p (B, Hq, nq, cap) (0 at hidden slots). A row that sees no slot
    gets o = 0, lse = -inf.

    >>> B, H, d, r = 1, 2, 8, 4
    >>> qk = torch.linalg.qr(torch.randn(H * d, r))[0]
    >>> cos, sin = torch.ones(B, 16, d), torch.zeros(B, 16, d)      # RoPE at angle 0
    >>> z = torch.randn(B, 5, r)
    >>> o, lse = latent_attention_reference(torch.randn(B, 4, 1, d), z, z, torch.tensor([5]),
    ...                                     torch.arange(5)[None], cos, sin, qk, qk, scale=0.35)
    >>> o.shape, lse.shape
    (torch.Size([1, 4, 1, 8]), torch.Size([1, 4, 1]))
    """
    cd = _cd(q)
    B, Hq, nq, d = q.shape
    heads = qk.shape[0] // d
    g = Hq // heads
    cap = zk.shape[1]
    k = rebuild_keys(zk, pos, cos, sin, qk, heads, cd)  # (B, H, cap, d)
    kk = k if g == 1 else k.repeat_interleave(g, dim=1)
    s = scale * (q.to(cd) @ kk.transpose(-1, -2))  # (B, Hq, nq, cap)
    valid = torch.arange(cap, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.to(cd)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    zv_ok = torch.where(valid[..., None], zv.to(cd), 0.0)  # NaN in unused slots stays out
    o = _up_project(p @ zv_ok[:, None], qv, heads)
    out = (o.to(q.dtype), lse)
    return out + (p,) if return_probs else out


def _row(t: torch.Tensor, b: int) -> torch.Tensor:
    return t[b:b + 1] if t.shape[0] > 1 else t


def latent_quant_attention_reference(q, kv, pos, cos, sin, qk, qv, *, scale: float,
                                     bias: Optional[torch.Tensor] = None, chunk: int = 1024):
    """Attention of q (B, Hq, nq, d) over a *quantized* latent store: ``kv`` the
    :class:`kvfx.methods.quant_attention.QuantKV` view of a one-"head" QuantStore whose keys are
    zk (r_k latent channels) and values zv (r_v), ``pos`` (B, n + C) the logical positions of its
    slots and outlier-pool entries (:meth:`kvfx.runtime.qstore.QuantStore.positions`, -1: none).
    Latents are dequantized ``chunk`` slots at a time (never the whole store), rebuilt and rotated
    as in :func:`latent_attention_reference`. bias: optional additive fp32 mask broadcastable to
    (B, Hq, nq, n + C). With per-row counts (``kv.rows``), each row reads its own slots (see
    :mod:`kvfx.methods.quant_attention`). Returns (o (B, Hq, nq, d) in q's dtype, lse (B, Hq, nq)
    fp32)."""
    from kvfx.methods.quant_attention import _chunks, dequant_keys, dequant_values, row_columns, row_views
    from kvfx.methods.quant_pack import per_word

    cd = _cd(q)
    B, Hq, nq, d = q.shape
    if kv.rows is not None:  # per-row counts (left-padded batch): each row over its own slots
        n_all = kv.n + kv.pool_size
        outs = [latent_quant_attention_reference(
            q[b:b + 1], one, row_columns(pos, b, one.n, kv.n, (B, n_all)), _row(cos, b), _row(sin, b), qk, qv,
            scale=scale, bias=row_columns(bias, b, one.n, kv.n, (B, Hq, nq, n_all)), chunk=chunk)
            for b, one in row_views(kv)]
        return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])
    heads = qk.shape[0] // d
    g = Hq // heads
    n, nk, nv, C = kv.n, kv.nk, kv.nv, kv.pool_size
    qf = q.to(cd)
    step = max(kv.kgroup, per_word(kv.kbits))
    step = max(step, chunk // step * step)

    def logits(z, p):  # z (B, 1, T, r_k) latents at positions p (B, T)
        k = rebuild_keys(z[:, 0], p, cos, sin, qk, heads, cd)
        k = k if g == 1 else k.repeat_interleave(g, dim=1)
        return qf @ k.transpose(-1, -2)

    parts = [logits(dequant_keys(kv, s0, s1), pos[:, s0:s1]) for s0, s1 in _chunks(0, nk, step)]
    if n > nk:
        parts.append(logits(kv.rk[:, :, :n - nk], pos[:, nk:n]))
    if C:
        parts.append(logits(kv.pool_k, pos[:, n:]))
    s = torch.cat(parts, dim=-1) * scale if parts else qf.new_zeros(B, Hq, nq, 0)
    visible = pos >= 0
    if kv.ok is not None:
        visible[:, :n] &= kv.ok[:, 0, :n]
    if C:
        visible[:, n:] &= kv.pool_ok[:, 0]
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    if bias is not None:
        s = s + bias.to(cd)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    o_lat = torch.zeros(B, Hq, nq, kv.rv.shape[-1], dtype=cd, device=q.device)
    for s0, s1 in _chunks(0, nv, step):
        o_lat += p[..., s0:s1] @ dequant_values(kv, s0, s1).to(cd)
    if n > nv:
        o_lat += p[..., nv:n] @ torch.nan_to_num(kv.rv[:, :, :n - nv].to(cd))
    if C:
        o_lat += p[..., n:] @ torch.where(kv.pool_ok[..., None], kv.pool_v.to(cd), 0.0)
    return _up_project(o_lat, qv, heads).to(q.dtype), lse
