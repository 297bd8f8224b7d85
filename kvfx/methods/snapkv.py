"""SnapKV (arXiv 2404.14469): vote with the attention of the last ``window`` queries.

A = softmax(Q[-w:] Kᵀ · scale + causal mask inside the window) over all n keys (fp32);
s_j = Σ over the window queries of A[:, j]; s is pooled over tokens with a 1-D pool (kernel 7,
max or avg, stride 1, same padding); the g query heads of a GQA group are reduced (mean/max).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from kvfx.methods.registry import ParamModel, Scorer, conflict, register
from kvfx.methods.scoring import attention_probs, group_reduce, probs_from_logits


class Pool(ParamModel):
    """SnapKV's 1-D pooling of the window scores over tokens (stride 1, same padding)."""

    kind: Literal["max", "avg"] = "max"
    kernel: int = Field(7, ge=1, description="odd kernel size")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise conflict("", v, f"an odd integer (same padding needs a centre; use {v - 1} or {v + 1})")
        return v


def pool_scores(s: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    """1-D pooling over the token axis of (..., n) scores, stride 1, same length."""
    if kernel <= 1:
        return s
    shape = s.shape
    x = s.reshape(-1, 1, shape[-1])
    if kind == "max":
        x = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        x = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return x.reshape(shape)


def window_votes(q, k, valid, *, window: int, scale: float, logits_out: list | None = None) -> torch.Tensor:
    """Σ of the attention of the last ``window`` (non-pad) queries: (B, Hq, n)."""
    n = k.shape[2]
    w = min(window, n)
    q_pos = torch.arange(n - w, n, device=q.device)
    probs = attention_probs(q[:, :, n - w:], k, valid, q_pos, scale, logits_out)
    return (probs * valid[:, None, n - w:, None]).sum(2)


def snapkv_scores(q, k, valid, *, window: int, scale: float, pool: str = "max", kernel: int = 7,
                  group_reduce_how: str = "mean", logits_out: list | None = None) -> torch.Tensor:
    """q (B, Hq, n, d), k (B, Hkv, n, d), valid (B, n) -> scores (B, Hkv, n). ``logits_out``
    receives the window's logits (B, Hq, w, n)."""
    s = pool_scores(window_votes(q, k, valid, window=window, scale=scale, logits_out=logits_out),
                    pool, kernel)
    return group_reduce(s, k.shape[1], group_reduce_how)


@register
@dataclass(frozen=True)
class SnapKV(Scorer):
    """Votes of the last ``window`` queries (``budget.window``, at least 1), pooled."""

    name: ClassVar[str] = "snapkv"
    kernel_scores: ClassVar[str] = "window_colsum"  # what the fused prefill kernel can emit

    pool: Annotated[Pool, Field(description="snapkv: pooling of the window scores")] = \
        field(default_factory=Pool)
    window: int = 32
    group_reduce: str = "mean"

    @classmethod
    def check(cls, params, budget) -> None:
        if budget.window == 0:
            raise conflict("budget.window", budget.window, ">= 1 with scorer snapkv (the observation window)")

    def describe(self) -> str:
        return f" pool={self.pool.kind}{self.pool.kernel}"

    def from_votes(self, votes, valid, kv_heads):
        """Scores from the prefill kernel's window votes (B, Hq, n)."""
        return group_reduce(pool_scores(votes, self.pool.kind, self.pool.kernel), kv_heads, self.group_reduce)

    def from_logits(self, logits, valid, kv_heads):
        """Scores from the masked logits (B, Hq, W, n) of the last W >= ``window`` prompt queries
        (:func:`kvfx.methods.scoring.window_logits`, or the prefill kernel's window_logits): the
        votes of the last ``window`` of them, exactly as :meth:`scores` computes them."""
        n = valid.shape[1]
        w = min(max(self.window, 1), n)
        if logits.shape[2] < w:
            raise ValueError(f"SnapKV.from_logits: {logits.shape[2]} logit rows, expected at least the "
                             f"window's {w}")
        votes = (probs_from_logits(logits[:, :, -w:]) * valid[:, None, n - w:, None]).sum(2)
        return self.from_votes(votes, valid, kv_heads)

    def scores(self, q, k, v, valid, scale, logits_out: list | None = None):
        return snapkv_scores(q, k, valid, window=max(self.window, 1), scale=scale, pool=self.pool.kind,
                             kernel=self.pool.kernel, group_reduce_how=self.group_reduce, logits_out=logits_out)
