"""TOVA (arXiv 2401.06104): keep the tokens the *current* query attends to most.

Prefill: score = the attention of the last prompt query; decode: the current query's
attention, evicting the lowest token once a row is over its cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvfx.methods.registry import Scorer, register
from kvfx.methods.scoring import attention_probs, group_reduce, probs_from_logits


def last_query_scores(q, k, valid, *, scale: float) -> torch.Tensor:
    """(B, Hq, n): softmax attention of the last query over all keys."""
    n = k.shape[2]
    return attention_probs(q[:, :, -1:], k, valid, torch.tensor([n - 1], device=q.device), scale)[:, :, 0]


@register
@dataclass(frozen=True)
class TOVA(Scorer):
    name: ClassVar[str] = "tova"
    kernel_scores: ClassVar[str] = "last_row"
    decode: ClassVar[str] = "current"
    rolls: ClassVar[bool] = True

    group_reduce: str = "mean"

    def from_votes(self, votes, valid, kv_heads):
        return group_reduce(votes, kv_heads, self.group_reduce)

    def from_logits(self, logits, valid, kv_heads):
        """Scores from the masked logits (B, Hq, W, n) of the last W prompt queries: the last
        row's attention."""
        return group_reduce(probs_from_logits(logits[:, :, -1]), kv_heads, self.group_reduce)

    def scores(self, q, k, v, valid, scale):
        return group_reduce(last_query_scores(q, k, valid, scale=scale), k.shape[1], self.group_reduce)
