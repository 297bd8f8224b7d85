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


def masked_logits(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, q_pos: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Logits (fp32) of the queries at positions ``q_pos`` (nq,) over all n keys, -inf where a
    key is not visible: causal (key j visible to query at position p iff j <= p), no pad keys.
    q (B, Hq, nq, d), k (B, Hkv, n, d), valid (B, n) -> (B, Hq, nq, n)."""
    kk = expand_kv(k, q.shape[1]).float()
    logits = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    n = k.shape[2]
    allowed = (torch.arange(n, device=q.device)[None, :] <= q_pos[:, None])[None, None]
    allowed = allowed & valid[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf"))


def window_logits(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, rows: int,
                  scale: float) -> torch.Tensor:
    """The :func:`masked_logits` of the last ``min(rows, n)`` prompt queries: (B, Hq, w, n), what
    the prefill kernel emits with ``scores="window_logits"`` (pad query rows see no key, so their
    rows are all -inf in both)."""
    n = k.shape[2]
    w = min(rows, n)
    return masked_logits(q[:, :, n - w:], k, valid, torch.arange(n - w, n, device=q.device), scale)


def probs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax of masked logits; a row with no visible key (a pad query) gets all zeros."""
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)


def attention_probs(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, q_pos: torch.Tensor,
                    scale: float, logits_out: list | None = None) -> torch.Tensor:
    """Softmax attention (fp32) of the queries at positions ``q_pos`` (nq,) over all n keys,
    causal (key j visible to query at position p iff j <= p) and without pad keys.

    Returns (B, Hq, nq, n). ``logits_out``: a list that receives the masked logits (-inf where
    not visible), for callers that reuse them (CaliDrop's prompt statistics)."""
    logits = masked_logits(q, k, valid, q_pos, scale)
    if logits_out is not None:
        logits_out.append(logits)
    return probs_from_logits(logits)


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return scale if scale is not None else q.shape[-1] ** -0.5
