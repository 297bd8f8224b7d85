"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention, plus recent tokens.

Prefill: hh_j = Σ over all queries of the causal softmax attention to key j (computed in
query blocks: the full n×n matrix never exists). Decode: each step's attention row is added
to hh; when a row holds more than its cap, the lowest-hh token outside the recent ones leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfx.methods.scoring import attention_probs, group_reduce

QUERY_BLOCK = 256


def column_sums(q, k, valid, *, scale: float, block: int = QUERY_BLOCK) -> torch.Tensor:
    """Σ_i softmax_causal(q_i Kᵀ)_j over all valid queries: (B, Hq, n) fp32.

    A block of query rows ending at ``end`` sees only keys ``< end`` (causal), so it reads
    ``k[:, :, :end]`` alone: half the work of masking the whole row."""
    B, Hq, n, _ = q.shape
    total = q.new_zeros(B, Hq, n, dtype=torch.float32)
    for start in range(0, n, block):
        end = min(start + block, n)
        q_pos = torch.arange(start, end, device=q.device)
        p = attention_probs(q[:, :, start:end], k[:, :, :end], valid[:, :end], q_pos, scale)
        p = p * valid[:, None, start:end, None]  # pad queries do not vote
        total[..., :end] += p.sum(2)
    return total


@dataclass(frozen=True)
class H2O:
    heavy: float = 0.1
    recent: float = 0.1
    group_reduce: str = "mean"

    kernel_scores = "colsum"

    def from_votes(self, votes, valid, kv_heads):
        return group_reduce(votes, kv_heads, self.group_reduce)

    def scores(self, q, k, v, valid, scale):
        return group_reduce(column_sums(q, k, valid, scale=scale), k.shape[1], self.group_reduce)
