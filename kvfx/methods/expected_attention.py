"""Expected Attention (arXiv 2510.00636): score each key by the attention that future queries
are expected to give it, from the statistics of recent queries; weighted by the value norm.

With μ, Σ the mean and covariance (biased, 1/N) of a query head's last ``queries`` prompt
queries, a key's expected logit under q ~ N(μ, Σ) and its score are

    z_j     = μ·k_j / √d + ½ k_jᵀ Σ k_j / d           (the covariance term when ``covariance``)
    a_j     = softmax over the row's non-sink keys of z_j
    score_j = (mean over the GQA group's query heads of a_j + epsilon) · ||v_j||_2   (``vnorm``)

The paper's defaults as NVIDIA kvpress runs them: covariance and value norm on, 4 sinks (kvfx:
``budget.sink``), epsilon 0 (its leaderboard entry uses 1e-2, under AdaKV).

DERIVED: kvpress takes the statistics of the layer's pre-RoPE queries over the whole prompt and
rotates μ and Σ by the RoPE rotation averaged over the next 512 positions. kvfx's operators see
queries after RoPE and do not know the model's rotary frequencies, so kvfx takes the statistics of
the last ``queries`` post-RoPE prompt queries (default 64) as they stand: recent queries stand in
for the next ones, without the averaged rotation. Pad queries take no part; pad keys get no score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from kvfx.methods.registry import Scorer, register
from kvfx.methods.scoring import group_reduce


def expected_attention_scores(q, k, v, valid, *, queries: int = 64, sink: int = 4, covariance: bool = True,
                              vnorm: bool = True, epsilon: float = 0.0, group_reduce_how: str = "mean",
                              q_valid=None):
    """q (B, Hq, n, d), k/v (B, Hkv, n, d), valid (B, n) -> (B, Hkv, n) fp32 scores (pads -inf).

    The statistics use the last ``queries`` valid queries of each row; the softmax runs over the
    row's valid keys after its first ``sink`` valid ones (which the selection keeps anyway: they
    score 0 here). ``q_valid`` (B, n): the rows of q that are real queries (default ``valid``;
    a prompt chunk: its own queries)."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    rank = valid.long().cumsum(-1) - 1
    qv = valid if q_valid is None else q_valid
    q_rank = qv.long().cumsum(-1) - 1
    recent = qv & (q_rank >= qv.long().sum(-1, keepdim=True) - queries)   # (B, n)
    w = recent[:, None, :, None].float()                               # (B, 1, n, 1)
    cnt = w.sum(2, keepdim=True).clamp_min(1)
    qf = q.float()
    mu = (qf * w).sum(2, keepdim=True) / cnt                           # (B, Hq, 1, d)
    kf = k.float().repeat_interleave(Hq // Hkv, dim=1)                 # (B, Hq, n, d)
    z = (kf * mu).sum(-1) / d ** 0.5                                   # (B, Hq, n)
    if covariance:
        c = (qf - mu) * w
        sigma = c.transpose(-1, -2) @ c / cnt                          # (B, Hq, d, d)
        z = z + 0.5 * ((kf @ sigma) * kf).sum(-1) / d
    scored = valid & (rank >= sink)
    a = torch.softmax(z.masked_fill(~scored[:, None], float("-inf")), dim=-1)
    a = torch.nan_to_num(a, nan=0.0)                                   # a row with no scored key
    s = group_reduce(a, Hkv, group_reduce_how) + epsilon
    if vnorm:
        s = s * v.float().norm(dim=-1)
    return s.masked_fill(~valid[:, None], float("-inf"))


@register
@dataclass(frozen=True)
class ExpectedAttention(Scorer):
    name: ClassVar[str] = "expected_attention"

    queries: Annotated[int, Field(ge=1, description="expected_attention: recent prompt queries whose "
                                  "mean and covariance model the future queries")] = 64
    covariance: Annotated[bool, Field(description="expected_attention: add the ½ kᵀΣk/d term")] = True
    vnorm: Annotated[bool, Field(description="expected_attention: weight by the value norm")] = True
    epsilon: Annotated[float, Field(ge=0, description="expected_attention: added to the expected "
                                    "attention before the value-norm weighting")] = 0.0
    sink: int = 4
    group_reduce: str = "mean"

    def scores(self, q, k, v, valid, scale):
        return self.chunk_scores(q, k, v, valid, None, scale)

    def chunk_scores(self, q, k, v, valid, q_valid, scale):
        return expected_attention_scores(q, k, v, valid, queries=self.queries, sink=self.sink,
                                         covariance=self.covariance, vnorm=self.vnorm, epsilon=self.epsilon,
                                         group_reduce_how=self.group_reduce, q_valid=q_valid)
