"""Expected Attention (arXiv 2510.00636): score each key by the attention that future queries
are expected to give it, from the statistics of the prompt's queries; weighted by the value norm.

As NVIDIA kvpress's ``ExpectedAttentionPress`` runs it (its defaults are kvfx's):

1. μ, Σ: the mean and covariance (biased, 1/N) of a query head's **pre-RoPE** prompt queries,
   all but the first ``sink`` (outliers);
2. R̄: the RoPE rotation averaged over the next ``future`` positions (n .. n + future - 1 for an
   n-token prompt); μ̄ = R̄μ, Σ̄ = R̄ΣR̄ᵀ;
3. a key's expected logit under q ~ N(μ̄, Σ̄) and its score:

       z_j     = μ̄·k_j / √d + ½ k_jᵀ Σ̄ k_j / d           (the covariance term when ``covariance``)
       a_j     = softmax over the row's non-sink keys of z_j
       score_j = (mean over the GQA group's query heads of a_j + epsilon) · ||v_j||_2   (``vnorm``)

   Sinks are kept (kvfx: ``budget.sink``). Pad queries take no part; pad keys get no score.

kvfx's operator sees the queries after RoPE. The rewrite pass recognizes HF's rotation of the
queries, ``q = q_pre·cos + rotate_half(q_pre)·sin``, and hands the site's ``cos`` / ``sin`` to the
scorer (``rope``): the pre-RoPE queries are the post-RoPE ones rotated back, the frequencies are
the angle steps between the last two positions, and R̄ is averaged from the last position on.
On a site whose queries carry no such rotation (no RoPE, or another form) ``rope`` is None: the
queries are used as they are and R̄ is the identity, which is exact for models without rotary
embeddings (``kvfx.explain()`` says which case a site is in).

``queries``: kvfx's option to take the statistics from the last N queries only (None, the
default, takes them all as the paper does). ``epsilon``: 0 as in the paper (kvpress's leaderboard
entry uses 1e-2 under AdaKV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Optional

import torch
from pydantic import Field

from kvfx.methods.registry import Scorer, register
from kvfx.methods.scoring import group_reduce


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def unrotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The queries before RoPE: q (B, Hq, n, d) rotated back by the angles of cos / sin
    (B | 1, 1, n, d). HF scales both by a model's ``attention_scaling``; only their angle is
    used, so the scale stays on the queries, as it stays on the rotated mean in kvpress."""
    r = torch.sqrt(cos * cos + sin * sin).clamp_min(1e-30)
    return q * (cos / r) - _rotate_half(q) * (sin / r)


def average_rotation(cos: torch.Tensor, sin: torch.Tensor, last: torch.Tensor, future: int) -> torch.Tensor:
    """R̄ (B, d, d): the RoPE rotation averaged over the ``future`` positions after each row's
    last query. cos / sin (B | 1, 1, n, d) at the queries' positions; ``last`` (B,) the index of
    each row's last query row (the row before it must be its previous position)."""
    B = last.shape[0]
    cos, sin = cos[:, 0].expand(B, -1, -1), sin[:, 0].expand(B, -1, -1)     # (B, n, d)
    idx = last[:, None, None].expand(B, 1, cos.shape[-1])
    a1 = torch.atan2(sin.gather(1, idx), cos.gather(1, idx))[:, 0]            # (B, d) at last
    a0 = torch.atan2(sin.gather(1, (idx - 1).clamp(min=0)), cos.gather(1, (idx - 1).clamp(min=0)))[:, 0]
    theta = torch.remainder(a1 - a0 + math.pi, 2 * math.pi) - math.pi          # step per position
    theta = torch.where((last >= 1)[:, None], theta, torch.zeros_like(theta))
    j = torch.arange(1, future + 1, device=cos.device, dtype=cos.dtype)
    ang = a1[:, None, :] + j[None, :, None] * theta[:, None, :]                # (B, future, d)
    c, s = torch.cos(ang).mean(1), torch.sin(ang).mean(1)                      # (B, d)
    d = c.shape[-1]
    h = d // 2
    P = torch.zeros(d, d, dtype=c.dtype, device=c.device)                      # P x = rotate_half(x)
    P[h:, :h] = torch.eye(h, dtype=c.dtype, device=c.device)
    P[:h, h:] = -torch.eye(h, dtype=c.dtype, device=c.device)
    return torch.diag_embed(c) + s[:, :, None] * P                             # R x = c·x + s·Px


def expected_attention_scores(q, k, v, valid, *, future: int = 512, queries: int | None = None, sink: int = 4,
                              covariance: bool = True, vnorm: bool = True, epsilon: float = 0.0,
                              group_reduce_how: str = "mean", q_valid=None, rope=None):
    """q (B, Hq, n, d) (after RoPE), k/v (B, Hkv, n, d), valid (B, n) -> (B, Hkv, n) fp32 scores
    (pads -inf).

    The statistics use the valid query rows after each row's first ``sink`` (or its last
    ``queries``); the softmax runs over the row's valid keys after its first ``sink`` valid ones
    (which the selection keeps anyway: they score 0 here). ``q_valid`` (B, n): the rows of q that
    are real queries (default ``valid``; a prompt chunk: its own queries, right-aligned).
    ``rope``: (cos, sin) (B | 1, 1, n, d) of the query rows, or None (no rotation)."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    qv = valid if q_valid is None else q_valid
    q_rank = qv.long().cumsum(-1) - 1
    n_q = qv.long().sum(-1, keepdim=True)
    use = qv & (q_rank >= sink) if queries is None else qv & (q_rank >= n_q - queries)
    use = torch.where(use.any(-1, keepdim=True), use, qv)              # fewer queries than sinks
    qf = q.float()
    rot = None
    if rope is not None:
        cos, sin = (t.float() for t in rope)
        qf = unrotate(qf, cos, sin)
        rot = average_rotation(cos, sin, torch.full((B,), n - 1, device=q.device), future)
    w = use[:, None, :, None].float()                                  # (B, 1, n, 1)
    cnt = w.sum(2, keepdim=True).clamp_min(1)
    mu = (qf * w).sum(2, keepdim=True) / cnt                           # (B, Hq, 1, d)
    sigma = None
    if covariance:
        c = (qf - mu) * w
        sigma = c.transpose(-1, -2) @ c / cnt                          # (B, Hq, d, d)
    if rot is not None:
        R = rot[:, None]                                               # (B, 1, d, d)
        mu = mu @ R.transpose(-1, -2)
        if sigma is not None:
            sigma = R @ sigma @ R.transpose(-1, -2)
    kf = k.float().repeat_interleave(Hq // Hkv, dim=1)                 # (B, Hq, n, d)
    z = (kf * mu).sum(-1) / d ** 0.5                                   # (B, Hq, n)
    if sigma is not None:
        z = z + 0.5 * ((kf @ sigma) * kf).sum(-1) / d
    rank = valid.long().cumsum(-1) - 1
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
    rotary: ClassVar[bool] = True  # reads the site's RoPE cos / sin when the pass finds them

    future: Annotated[int, Field(ge=1, description="expected_attention: future positions the RoPE "
                                 "rotation of the query statistics is averaged over (n_future_positions)")] = 512
    queries: Annotated[Optional[int], Field(ge=1, description="expected_attention: the statistics come "
                                            "from the last N prompt queries (null: all but the sinks, "
                                            "as the paper)")] = None
    covariance: Annotated[bool, Field(description="expected_attention: add the ½ kᵀΣk/d term")] = True
    vnorm: Annotated[bool, Field(description="expected_attention: weight by the value norm")] = True
    epsilon: Annotated[float, Field(ge=0, description="expected_attention: added to the expected "
                                    "attention before the value-norm weighting")] = 0.0
    sink: int = 4
    group_reduce: str = "mean"

    def scores(self, q, k, v, valid, scale, rope=None):
        return self.chunk_scores(q, k, v, valid, None, scale, rope=rope)

    def chunk_scores(self, q, k, v, valid, q_valid, scale, rope=None):
        return expected_attention_scores(q, k, v, valid, future=self.future, queries=self.queries,
                                         sink=self.sink, covariance=self.covariance, vnorm=self.vnorm,
                                         epsilon=self.epsilon, group_reduce_how=self.group_reduce,
                                         q_valid=q_valid, rope=rope)
