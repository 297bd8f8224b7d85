"""KNorm / L2 (arXiv 2406.11430): keep the keys with the *lowest* L2 norm (post-RoPE).

score_j = -||k_j||_2 per KV head. The official variants skip layers 0 and 1: the ``knorm``
preset does that with a per-layer override.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvfx.methods.registry import Scorer, register


def knorm_scores(k: torch.Tensor) -> torch.Tensor:
    """k (B, Hkv, n, d) -> scores (B, Hkv, n) = -||k||_2 in fp32."""
    return -torch.linalg.vector_norm(k.float(), dim=-1)


@register
@dataclass(frozen=True)
class KNorm(Scorer):
    """Attention-free; with ``budget.max_tokens`` the rolling cache evicts the largest-norm key."""

    name: ClassVar[str] = "knorm"
    kernel_scores: ClassVar[str] = "key_norm"  # the kv_stats kernel on CUDA
    decode: ClassVar[str] = "self"

    def scores(self, q, k, v, valid, scale):
        return knorm_scores(k)

    def decode_scores(self, k):
        return knorm_scores(k)
