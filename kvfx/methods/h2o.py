"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention, plus recent tokens.

Prefill: hh_j = Σ over all queries of the causal softmax attention to key j (computed in
query blocks: the full n×n matrix never exists). Decode: each step's attention row is added
to hh; when a row holds more than its cap, the lowest-hh token outside the recent ones leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from kvfx.methods.registry import Scorer, conflict, register
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


@register
@dataclass(frozen=True)
class H2O(Scorer):
    """The budget splits heavy:recent; the recent share is protected like a window. During decode
    each step's attention adds to the scores and the cache rolls at the prompt budget."""

    name: ClassVar[str] = "h2o"
    kernel_scores: ClassVar[str] = "colsum"
    decode: ClassVar[str] = "accumulated"
    rolls: ClassVar[bool] = True

    heavy: Annotated[float, Field(ge=0, le=1, description="h2o: heavy-hitter fraction (the budget is split "
                                  "heavy:recent)")] = 0.1
    recent: Annotated[float, Field(ge=0, le=1, description="h2o: recent-token fraction")] = 0.1
    group_reduce: str = "mean"

    @classmethod
    def check(cls, params, budget) -> None:
        if params.heavy + params.recent == 0:
            raise conflict("eviction.heavy", params.heavy, "heavy + recent > 0 (set heavy or recent)")

    @property
    def recent_share(self) -> float:
        """The fraction of the budget that is the protected recent window."""
        return self.recent / (self.heavy + self.recent) if self.heavy + self.recent > 0 else 0.5

    def from_votes(self, votes, valid, kv_heads):
        return group_reduce(votes, kv_heads, self.group_reduce)

    def scores(self, q, k, v, valid, scale):
        return group_reduce(column_sums(q, k, valid, scale=scale), k.shape[1], self.group_reduce)
