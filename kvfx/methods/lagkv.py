"""LagKV (arXiv 2504.04704, official ``lag_kv.py``): attention-free, lag-relative scoring.

After the ``sink`` tokens, tokens are cut into partitions of ``lag``. Partition p is scored
against partition p+1 (its lag reference), per head and channel:

    mn, mx = min, max over the reference tokens
    z      = (x − mn) / (mx − mn + eps)            for x in partition p
    s_X    = softmax over the partition's tokens of std over channels of z   (unbiased std)
    score  = s_K + score_v_ratio · s_V

Each compressed partition keeps ``int(keep · lag)`` tokens per head. The last full partition
and the remainder stay uncompressed; whenever ``2 · lag`` uncompressed tokens have
accumulated (also during decode), the oldest uncompressed partition is compressed against the
next one (recursive compression).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from kvfx.methods.registry import Scorer, conflict, register

EPS = 1e-6  # the official code's guard against a flat reference range


def lag_scores(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x, ref (..., lag, d) -> (..., lag): softmax over tokens of the std over channels of
    x min-max normalized by the reference's per-channel range."""
    mn = ref.amin(-2, keepdim=True).float()
    mx = ref.amax(-2, keepdim=True).float()
    z = (x.float() - mn) / (mx - mn + EPS)
    return torch.softmax(z.std(-1, unbiased=True), dim=-1)


def partition_scores(k: torch.Tensor, v: torch.Tensor, *, lag: int, v_ratio: float) -> torch.Tensor:
    """k, v (H, P·lag, d) with P ≥ 2 partitions -> scores (H, P−1, lag) of the first P−1."""
    H, n, d = k.shape
    P = n // lag
    kp = k.reshape(H, P, lag, d)
    vp = v.reshape(H, P, lag, v.shape[-1])
    return lag_scores(kp[:, :-1], kp[:, 1:]) + v_ratio * lag_scores(vp[:, :-1], vp[:, 1:])


def compress_partitions(k: torch.Tensor, v: torch.Tensor, *, lag: int, keep: float,
                        v_ratio: float, score_fn=partition_scores) -> torch.Tensor:
    """Indices (H, (P−1)·kk) into the P·lag tokens of the kept tokens of the first P−1
    partitions, in position order (kk = int(keep·lag) per partition and head). ``score_fn``
    computes :func:`partition_scores` (the runtime passes its kernel-or-reference choice)."""
    kk = max(1, int(keep * lag))
    s = score_fn(k, v, lag=lag, v_ratio=v_ratio)
    top = s.topk(kk, dim=-1).indices.sort(-1).values  # (H, P-1, kk)
    offs = torch.arange(s.shape[1], device=k.device)[None, :, None] * lag
    return (top + offs).reshape(k.shape[0], -1)


def lagkv_keep_indices(k: torch.Tensor, v: torch.Tensor, *, sink: int, lag: int, keep: float,
                       v_ratio: float, score_fn=partition_scores) -> tuple[torch.Tensor, int]:
    """For one row: k, v (H, n, d) of valid tokens -> (kept indices (H, m) in position order,
    number of trailing uncompressed tokens)."""
    H, n, _ = k.shape
    s = min(sink, n)
    P = (n - s) // lag
    dev = k.device
    if P < 2:
        return torch.arange(n, device=dev).expand(H, n), n - s
    body = slice(s, s + P * lag)
    kept = compress_partitions(k[:, body], v[:, body], lag=lag, keep=keep, v_ratio=v_ratio,
                               score_fn=score_fn) + s
    tail_start = s + (P - 1) * lag
    head = torch.arange(s, device=dev).expand(H, s)
    tail = torch.arange(tail_start, n, device=dev).expand(H, n - tail_start)
    return torch.cat([head, kept, tail], dim=1), n - tail_start


@register
@dataclass(frozen=True)
class LagKV(Scorer):
    """Partitioned: the runtime compresses partition by partition (prefill and decode) with
    :func:`lagkv_keep_indices` and :func:`compress_partitions`; ``budget.keep`` is the fraction of
    each partition kept."""

    name: ClassVar[str] = "lagkv"
    partitioned: ClassVar[bool] = True

    lag: Annotated[int, Field(ge=1, description="lagkv: partition size in tokens")] = 128
    score_v_ratio: Annotated[float, Field(ge=0, description="lagkv: weight of the value score")] = 1.0

    @classmethod
    def check(cls, params, budget) -> None:
        if budget.tokens is not None:
            raise conflict("budget.tokens", budget.tokens, "budget.keep with scorer lagkv (it keeps a fraction "
                           "of each partition)")
        if int(budget.keep * params.lag) < 1:
            raise conflict("eviction.lag", params.lag, f">= {int(1 / budget.keep) + 1} with budget.keep "
                           f"{budget.keep:g} (each partition must keep a token)")

    def describe(self) -> str:
        return f" lag={self.lag} v_ratio={self.score_v_ratio:g}"
