"""quant.residual_dtype in tests: a QuantKV with its full-precision parts held narrower, and how far
that may move the attention output (shared by tests/methods and tests/templates)."""

import dataclasses

import torch

from kvfx.methods.quant_attention import QuantKV, dequant_values


def narrow(kv: QuantKV, dtype: torch.dtype) -> QuantKV:
    """The same store with the residual (rk, rv) and the outlier pool (pool_k, pool_v) cast to
    ``dtype``, as a QuantStore with ``residual_dtype`` holds them; the quantized parts unchanged."""
    cast = {f: getattr(kv, f).to(dtype) for f in ("rk", "rv", "pool_k", "pool_v") if getattr(kv, f) is not None}
    return dataclasses.replace(kv, **cast)


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)


def rounding_bound(q: torch.Tensor, kv: QuantKV, scale: float, dtype: torch.dtype) -> float:
    """An upper bound of max |o(narrow(kv, dtype)) - o(kv)| in exact arithmetic, for one query
    per sequence (q (B, Hq, 1, d)) over a store without per-row counts (evaluated in float64).

    [Note] Rounding x to ``dtype`` moves it by at most u|x| + t (u = eps/2 the unit round-off, t =
    smallest_normal * eps/2, half the subnormal spacing). Over a narrowed key j (a residual slot
    s >= nk or a pool entry) the logit moves by |Δs_j| <= ds_j = scale * sum_i |q_i| (u |k_ji| + t);
    other keys do not move (ds_j = 0). With p_j the fp32-residual probabilities, p'_j = p_j e^{Δs_j}
    / Z with Z = sum_k p_k e^{Δs_k} in [Zlo, Zhi] = [sum p e^{-ds}, sum p e^{ds}], so
    |p'_j - p_j| <= p_j r_j, r_j = max(e^{ds_j} / Zlo - 1, 1 - e^{-ds_j} / Zhi). Since
    sum_j (p'_j - p_j) = 0, per value channel
        |Δo| <= sum_j p_j r_j |v_j - o| + sum_j p_j (1 + r_j) dv_j,
    o the fp32-residual output and dv_j = u |v_j| + t for a narrowed value (a residual slot
    s >= nv or a pool entry), 0 otherwise. The max over rows, query heads and channels is returned."""
    from kvfx.methods.quant_attention import dequant_keys

    assert kv.rows is None, "rounding_bound reads the store's extents: no per-row counts"
    fi = torch.finfo(dtype)
    u, t = fi.eps / 2, fi.smallest_normal * fi.eps / 2
    n, nk, nv, C = kv.n, kv.nk, kv.nv, kv.pool_size
    H = kv.kcodes.shape[1]
    B, Hq, _, d = q.shape
    g = Hq // H
    keys = [dequant_keys(kv, 0, nk).double(), _finite(kv.rk[:, :, :n - nk])]
    vals = [dequant_values(kv, 0, nv).double(), _finite(kv.rv[:, :, :n - nv])]
    if C:
        keys.append(_finite(kv.pool_k))
        vals.append(_finite(kv.pool_v))
    K, V = _finite(torch.cat(keys, 2)), _finite(torch.cat(vals, 2))  # (B, H, n + C, d / dv)
    narrow_k = torch.arange(n + C) >= nk
    narrow_v = (torch.arange(n + C) >= nv)[:, None]
    visible = torch.ones(B, H, n + C, dtype=torch.bool)
    if kv.ok is not None:
        visible[:, :, :n] = kv.ok[:, :, :n]
    if C:
        visible[:, :, n:] = kv.pool_ok
    qd = q.double().reshape(B, H, g, d)
    s = (scale * qd @ K.transpose(-1, -2)).masked_fill(~visible[:, :, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1))  # (B, H, g, n + C); 0 where hidden or none visible
    qa = qd.abs()
    ds = scale * (u * qa @ K.abs().transpose(-1, -2) + t * qa.sum(-1, keepdim=True)) * narrow_k
    zlo = (p * torch.exp(-ds)).sum(-1, keepdim=True)
    zhi = (p * torch.exp(ds)).sum(-1, keepdim=True)
    seen = zlo > 0
    r = torch.where(seen, torch.maximum(torch.exp(ds) / zlo.clamp(min=1e-300) - 1,
                                        1 - torch.exp(-ds) / zhi.clamp(min=1e-300)), 0.0).clamp(min=0)
    o = p @ V  # (B, H, g, dv)
    dv = (u * V.abs() + t) * narrow_v  # (B, H, n + C, dv)
    spread = ((p * r)[..., None] * (V[:, :, None] - o[..., None, :]).abs()).sum(-2)
    own = ((p * (1 + r)) @ dv)
    return float((spread + own).max()) if spread.numel() else 0.0
