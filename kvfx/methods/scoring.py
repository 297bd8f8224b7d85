"""Helpers shared by the attention-based scorers (plain PyTorch, fp32).

Conventions: q (B, Hq, n, d); k (B, Hkv, n, d); valid (B, n) bool (False at pads);
query head h reads KV head h // g. Scores are (B, Hkv, n), higher = keep.
"""

from __future__ import annotations

import torch


def group_reduce(scores: torch.Tensor, kv_heads: int, how: str = "mean") -> torch.Tensor:
    """(B, Hq, n) -> (B, Hkv, n): combine the g query heads of each GQA group."""
    B, Hq, n = scores.shape
    s = scores.view(B, kv_heads, Hq // kv_heads, n)
    return s.amax(2) if how == "max" else s.mean(2)


def expand_kv(k: torch.Tensor, q_heads: int) -> torch.Tensor:
    """(B, Hkv, n, d) -> (B, Hq, n, d) without copying (query head h reads KV head h // g)."""
    B, Hkv, n, d = k.shape
    g = q_heads // Hkv
    return k[:, :, None].expand(B, Hkv, g, n, d).reshape(B, q_heads, n, d) if g > 1 else k


def attention_probs(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, q_pos: torch.Tensor,
                    scale: float, logits_out: list | None = None) -> torch.Tensor:
    """Softmax attention (fp32) of the queries at positions ``q_pos`` (nq,) over all n keys,
    causal (key j visible to query at position p iff j <= p) and without pad keys.

    Returns (B, Hq, nq, n). ``logits_out``: a list that receives the masked logits (-inf where
    not visible), for callers that reuse them (CaliDrop's prompt statistics)."""
    kk = expand_kv(k, q.shape[1]).float()
    logits = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    n = k.shape[2]
    allowed = (torch.arange(n, device=q.device)[None, :] <= q_pos[:, None])[None, None]
    allowed = allowed & valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    if logits_out is not None:
        logits_out.append(logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a query row with no visible key (pad queries)


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return scale if scale is not None else q.shape[-1] ** -0.5
