"""KeyDiff (arXiv 2504.15364): keep the keys least similar to the mean key direction.

Attention-free and query-free, per KV head (post-RoPE keys, as the cache holds them):

    a_h     = mean over the row's valid tokens j of k_j / ||k_j||_2
    score_j = -cos(k_j, a_h)                       (higher = more distinctive = keep)

As NVIDIA kvpress's ``KeyDiffPress`` (cosine eps 1e-8, fp32 here). kvpress protects no sinks or
recent window; kvfx's selection always keeps ``budget.sink`` and ``budget.window`` (set them to 0
for the paper's plain top-k). Pad tokens take no part in the anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvfx.methods.registry import Scorer, register

EPS = 1e-8  # F.cosine_similarity's default


def keydiff_scores(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """k (B, Hkv, n, d), valid (B, n) -> (B, Hkv, n) fp32 scores -cos(k_j, anchor)."""
    kf = k.float()
    unit = kf / kf.norm(dim=-1, keepdim=True).clamp_min(EPS)
    w = valid[:, None, :, None].to(kf.dtype)
    anchor = (unit * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)
    cos = (kf * anchor).sum(-1) / (kf.norm(dim=-1) * anchor.norm(dim=-1)).clamp_min(EPS)
    return -cos


@register
@dataclass(frozen=True)
class KeyDiff(Scorer):
    name: ClassVar[str] = "keydiff"
    decode: ClassVar[str] = "self"   # budget.max_tokens: the held key most like the anchor leaves

    def scores(self, q, k, v, valid, scale):
        return keydiff_scores(k, valid)

    def decode_scores(self, k):
        return keydiff_scores(k, torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device))
