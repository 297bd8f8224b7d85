"""Reading and writing a head-wise ragged store (AdaKV budgets): the semantic references of the
ragged decode kernel (``decode_attention`` with ``ragged``) and of the ragged select+gather
(``select_gather`` with ``ragged``), and the CPU execution of both.

Layout (:class:`kvfx.runtime.ragged.RaggedStore`): one flat token pool per site,

    k_pool (P, d), v_pool (P, dv)   the tokens of every (row, KV head) segment
    start  (B, Hkv) long            segment offsets into the pool
    count  (B, Hkv) long            valid tokens of each segment: slots [start, start + count)

so the bytes held are the *sum* over heads of their token counts (plus each segment's decode
headroom), not the maximum times the number of heads. Query head h reads KV head h // g.
"""

from __future__ import annotations

import torch

from kvfx.methods.attention import grouped_attention_reference
from kvfx.methods.select import select_gather_reference


def segment_slots(start: torch.Tensor, count: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool slots of each segment padded to ``length`` (>= count.max()): (idx (B, H, L) long,
    valid (B, H, L) bool); idx is 0 past a segment's count (to be masked)."""
    j = torch.arange(length, device=start.device)
    valid = j < count[..., None]
    idx = torch.where(valid, start[..., None] + j, 0)
    return idx, valid


def gather_segments(pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """pool (P, ...) and slots idx (B, H, L) -> (B, H, L, ...)."""
    # [Note] index_select: ~15x faster than pool[idx] on CPU for (P, d) pools
    return torch.index_select(pool, 0, idx.reshape(-1)).view(*idx.shape, *pool.shape[1:])


def ragged_decode_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            start: torch.Tensor, count: torch.Tensor, *, scale: float,
                            length: int | None = None, keep: torch.Tensor | None = None,
                            return_lse: bool = False, return_probs: bool = False):
    """Attention of q (B, Hq, m, d) over each KV head's own segment of the pool.

    k_pool (P, d), v_pool (P, dv), finite in every slot (free ones included; the kernel reads valid
    slots only); start, count (B, Hkv) long (segments in the pool, P >= start + count); ``length``: a host bound >= count.max() (computed when None: a device sync); ``keep``:
    an optional mask over the first ``length`` slots of each segment, broadcastable to
    (B, Hq, m, length), bool (True = attend) or additive float (-inf masks); slots past a
    segment's count are never attended.
    Returns (o (B, Hq, m, dv) in q's dtype, lse (B, Hq, m) fp32 or None, probs (B, Hq, m, length)
    fp32 or None); a head with no visible slot has o = 0, lse = -inf.

    It gathers the segments into a (B, Hkv, length, d) working copy for one step (the CPU path;
    the kernel reads the pool in place) and runs
    :func:`kvfx.methods.attention.grouped_attention_reference`.

    >>> k = torch.arange(6.0).view(6, 1).expand(6, 16).contiguous()
    >>> q = torch.zeros(1, 2, 1, 16)
    >>> o, _, _ = ragged_decode_reference(q, k, k, torch.tensor([[0, 4]]), torch.tensor([[3, 0]]), scale=1.0)
    >>> o[0, :, 0, 0].tolist()  # head 0: mean of slots 0..2; head 1: no token
    [1.0, 0.0]
    """
    if length is None:
        length = int(count.max().item()) if count.numel() else 0
    if k_pool.shape[0] == 0:  # an empty pool: every count is 0
        length = 0
    B, Hq, m, _ = q.shape
    idx, valid = segment_slots(start, count, length)
    # [Note] padding reads slot 0 (masked): the pools must hold finite values in every slot, as the
    # store's do (free slots are zeros), since a masked logit still multiplies its value in p @ v
    k = gather_segments(k_pool, idx)
    v = gather_segments(v_pool, idx)
    g = Hq // start.shape[1]
    seg = valid[:, :, None, :].repeat_interleave(g, dim=1) if g > 1 else valid[:, :, None, :]
    if keep is None:
        mask = seg
    elif keep.dtype == torch.bool:
        mask = seg & keep
    else:
        mask = keep.masked_fill(~seg, float("-inf"))
    return grouped_attention_reference(q, k, v, scale=scale, keep=mask.expand(B, Hq, m, length),
                                       return_lse=return_lse, return_probs=return_probs)


def pack_segments(x: torch.Tensor, count: torch.Tensor, start: torch.Tensor, pool: torch.Tensor) -> None:
    """Write the first ``count`` slots of dense per-head rows x (B, H, m, ...) into ``pool``
    (P, ...) at each segment's ``start`` (in place); the prompt's kept tokens after select+gather."""
    m = x.shape[2]
    idx, valid = segment_slots(start, count.clamp(max=m), m)
    pool[idx[valid]] = x[valid]


def select_gather_ragged_reference(prio: torch.Tensor, budget: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   start: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                   pos_pool: torch.Tensor) -> torch.Tensor:
    """Select + gather straight into a ragged pool: the ``budget`` (B, Hkv) highest-priority
    tokens of every (row, KV head) (:func:`kvfx.methods.select.select_gather_reference`'s kept
    set: a stable descending sort, -inf never kept), in position order, written to the pools
    (k_pool (P, d), v_pool (P, dv), pos_pool (P,) long) at slots [start, start + count) of each
    segment; every other slot is left as it is. Returns count (B, Hkv) long = min(budget, tokens
    that are not -inf); the segments must have room for it.

    >>> prio = torch.tensor([[[0.5, float("inf"), 0.5, float("-inf"), 2.0], [1., 2., 3., 4., 5.]]])
    >>> k = torch.arange(10.0).view(1, 2, 5, 1)
    >>> kp, pp = torch.zeros(6, 1), torch.full((6,), -1)
    >>> select_gather_ragged_reference(prio, torch.tensor([[3, 2]]), k, k, torch.tensor([[0, 3]]), kp, kp, pp).tolist()
    [[3, 2]]
    >>> pp.tolist(), kp[:, 0].tolist()
    ([0, 1, 4, 3, 4, -1], [0.0, 1.0, 4.0, 8.0, 9.0, 0.0])
    """
    m = int(budget.max().item()) if budget.numel() else 0
    k_kept, v_kept, pos, count = select_gather_reference(prio, budget, k, v, m)
    for src, pool in ((k_kept, k_pool), (v_kept, v_pool), (pos, pos_pool)):
        pack_segments(src, count, start, pool)
    return count


__all__ = ["gather_segments", "pack_segments", "ragged_decode_reference", "segment_slots",
           "select_gather_ragged_reference"]
