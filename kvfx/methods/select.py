"""Shared token selection: budgets, sinks, recent window, pads, gathering.

Scorers only return ``(B, Hkv, n)`` scores (higher = keep); everything else about *which*
tokens a site keeps lives here, so every scorer gets the same guarantees:

* pad tokens (``valid == False``) are never kept, never scored, never counted in budgets;
* the first ``sink`` and the last ``window`` valid tokens of each row are always kept;
* a row keeps exactly ``min(budget, n_valid)`` tokens;
* kept tokens are returned in position order.
"""

from __future__ import annotations

import torch


def valid_rank(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each valid token among its row's valid tokens, and the row's valid count.

    valid: (B, n) bool  ->  rank (B, n) long (undefined at pads), n_valid (B,) long
    """
    v = valid.long()
    return v.cumsum(-1) - 1, v.sum(-1)


def protected_mask(valid: torch.Tensor, sink: int, window: int | torch.Tensor) -> torch.Tensor:
    """(B, n) bool: valid tokens that are sinks or inside the recent window (an int, or a
    (B,) tensor of per-row windows)."""
    rank, n_valid = valid_rank(valid)
    if isinstance(window, torch.Tensor):
        window = window[:, None]
    return valid & ((rank < sink) | (rank >= n_valid[:, None] - window))


def budget_from_keep(n_valid: torch.Tensor, *, keep: float | None, tokens: int | None,
                     sink: int, window: int) -> torch.Tensor:
    """Per-row token budget (B,) long: ``round(keep * n_valid)`` or ``tokens``, never below
    sink + window and never above n_valid."""
    if tokens is not None:
        budget = torch.full_like(n_valid, tokens)
    elif keep is not None:
        budget = torch.round(n_valid.double() * keep).long()
    else:
        budget = n_valid.clone()
    budget = torch.maximum(budget, torch.full_like(budget, sink + window))
    return torch.minimum(budget, n_valid)


def priority(scores: torch.Tensor | None, valid: torch.Tensor, *, sink: int,
             window: int | torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hkv, n) fp32 selection priority: the scores (recency if None), +inf at the sinks and
    the window (always kept), -inf at pads (never kept)."""
    B, n = valid.shape
    protected = protected_mask(valid, sink, window)[:, None, :].expand(B, kv_heads, n)
    valid3 = valid[:, None, :].expand(B, kv_heads, n)
    if scores is None:  # recency as the score: later = better
        scores = torch.arange(n, device=valid.device, dtype=torch.float32).expand(B, kv_heads, n)
    return scores.float().masked_fill(protected, float("inf")).masked_fill(~valid3, float("-inf"))


def select_kept(scores: torch.Tensor | None, valid: torch.Tensor, budget: torch.Tensor, *,
                sink: int, window: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the kept tokens of every (row, KV head).

    Args:
        scores: (B, Hkv, n) float, higher = keep, or None (keep only sinks + window, then the
            most recent tokens).
        valid:  (B, n) bool, False at pad positions.
        budget: (B,) long, tokens to keep per row (already clipped to n_valid).
    Returns:
        idx   (B, Hkv, m) long: token indices in position order; entries past ``count`` are 0.
        count (B, Hkv) long: kept tokens per row and head (= budget[b]).
    """
    B, n = valid.shape
    prio = priority(scores, valid, sink=sink, window=window, kv_heads=kv_heads)
    m = int(budget.max().item()) if B else 0
    # [Note] a stable sort, not topk: pooled scores tie often, and topk breaks ties by tensor
    # index, which left padding shifts; the stable order depends only on token order.
    top = prio.sort(dim=-1, descending=True, stable=True).indices[..., :m]
    count = budget[:, None].expand(B, kv_heads).clone()
    keep_slot = torch.arange(m, device=valid.device)[None, None, :] < count[..., None]
    # sort kept tokens by position, padding slots last
    key = torch.where(keep_slot, top, top + n)
    key, _ = key.sort(dim=-1)
    idx = torch.where(key < n, key, torch.zeros_like(key))
    return idx, count


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, d), idx (B, H, m) -> (B, H, m, d)."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def select_gather_reference(prio: torch.Tensor, budget: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, cap: int):
    """Keep the ``budget`` highest-priority tokens of every (row, KV head) and gather them, in
    position order, into fresh ``cap``-slot buffers: the semantics of the ``select_gather`` kernel
    (:func:`kvfx.runtime.compress.select_and_gather` runs one or the other).

    Args:
        prio:   (B, Hkv, n) float, higher = keep (see :func:`priority`: +inf protected, -inf pads).
        budget: (B,) or (B, Hkv) integer tokens to keep per row (and head).
        k, v:   (B, Hkv, n, d) and (B, Hkv, n, dv).
        cap:    slots of the outputs (an int >= 0).
    Returns:
        k_out (B, Hkv, cap, d), v_out (B, Hkv, cap, dv): kept tokens in slots [0, count), zeros after;
        pos_out (B, Hkv, cap) long: their token indices, -1 after;
        count (B, Hkv) long = min(budget, tokens with prio != -inf, cap), clamped at 0.

    The kept set is the first ``count`` tokens of a stable descending sort of ``prio``: ties go to
    the smaller index, NaN ranks above +inf (as in ``torch.sort``). -inf tokens are never kept,
    even when the budget exceeds the other tokens (then count < budget).

    >>> prio = torch.tensor([[[0.5, float("inf"), 0.5, float("-inf"), 2.0]]])
    >>> k = torch.arange(5.0).view(1, 1, 5, 1)
    >>> k_out, _, pos, count = select_gather_reference(prio, torch.tensor([3]), k, k, cap=4)
    >>> pos.tolist(), count.tolist(), k_out[0, 0, :, 0].tolist()
    ([[[0, 1, 4, -1]]], [[3]], [0.0, 1.0, 4.0, 0.0])
    """
    B, H, n = prio.shape
    dev = prio.device
    budget = budget.to(device=dev, dtype=torch.long)
    budget = (budget[:, None] if budget.dim() == 1 else budget).expand(B, H)
    alive = (prio != float("-inf")).sum(-1)
    count = torch.minimum(torch.minimum(budget.clamp(min=0), alive), torch.full_like(alive, cap))
    order = prio.float().sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=dev).expand(B, H, n))
    keep = rank < count[..., None]  # (B, H, n): the first `count` of the sorted order
    tokens = torch.arange(n, device=dev).expand(B, H, n)
    slot_key = torch.where(keep, tokens, tokens + n).sort(dim=-1).values  # kept first, by position
    pos = torch.full((B, H, cap), -1, dtype=torch.long, device=dev)
    m = min(cap, n)
    pos[..., :m] = torch.where(slot_key[..., :m] < n, slot_key[..., :m], -1)
    used = pos >= 0
    idx = pos.clamp(min=0)
    k_out = gather_tokens(k, idx).masked_fill(~used[..., None], 0) if n else k.new_zeros(B, H, cap, k.shape[-1])
    v_out = gather_tokens(v, idx).masked_fill(~used[..., None], 0) if n else v.new_zeros(B, H, cap, v.shape[-1])
    return k_out, v_out, pos, count


def chunk_scores(scores: torch.Tensor, valid: torch.Tensor, chunk: int, reduce=None) -> torch.Tensor:
    """ChunkKV (arXiv 2502.00299): every token takes the score of its chunk, so that a top-k keeps
    whole chunks of ``chunk`` consecutive tokens.

    Chunks are counted from each row's first valid token (left padding does not shift them). A
    chunk's score is the sum over KV heads of the token scores, averaged over the chunk's valid
    tokens (a partial last chunk over its own tokens), as NVIDIA kvpress's ``ChunkKVPress``; every
    KV head keeps the same chunks. kvpress takes the chunks of batch row 0 for every row; kvfx
    chooses per row. The budget stays exact: the lowest-ranked chunk that fits only partly keeps
    its first tokens (a stable sort: ties go to the earlier token).

    scores (B, Hkv, n) (-inf at pads), valid (B, n) -> (B, Hkv, n) fp32, -inf at pads.
    ``reduce``: called on the per-token sums over this process's KV heads (B, n) fp32, returning the
    sums over all KV heads of the layer: under tensor parallelism an all-reduce over the ranks, each
    of which holds some of the heads (:func:`kvfx.runtime.ranks.all_reduce_sum`), so every rank
    keeps the chunks one process keeps.
    """
    B, H, n = scores.shape
    rank, _ = valid_rank(valid)
    cid = torch.where(valid, rank // chunk, 0)                                   # (B, n)
    per_token = scores.float().masked_fill(~valid[:, None], 0).sum(1)            # (B, n)
    if reduce is not None:
        per_token = reduce(per_token)
    n_chunks = max(1, -(-n // chunk))
    total = per_token.new_zeros(B, n_chunks).scatter_add_(1, cid, per_token)
    count = per_token.new_zeros(B, n_chunks).scatter_add_(1, cid, valid.float())
    mean = total / count.clamp_min(1)
    out = mean.gather(1, cid).masked_fill(~valid, float("-inf"))
    return out[:, None].expand(B, H, n)
