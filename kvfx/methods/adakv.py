"""AdaKV (arXiv 2407.11550; NVIDIA kvpress ``AdaKVPress``): one layer's budget shared by its KV
heads according to their scores.

Uniform allocation gives every KV head of a row the row's budget ``b``. AdaKV keeps the same total,
``b · H``, but takes the top ``b · H`` scores over all (head, token) pairs of the row jointly, after
guaranteeing every head its own top ``floor(safeguard · b)`` tokens (kvpress ``alpha_safeguard``,
0.20: ``int(n_kept * alpha)``). Scores are per KV head; with GQA the scorer has already reduced
its query heads' scores over each group (``group_reduce``, kvpress: mean).

kvfx applies it to the selection *priority* (:func:`kvfx.methods.select.priority`): sinks and the
recent window are +inf in every head (always kept, counted in that head's share), pads -inf (never
kept, never counted). The result is a per-(row, head) token count; the kept tokens of head ``h``
are then exactly its ``count[h]`` highest-priority tokens (the shared select+gather with a
(B, Hkv) budget), because raising a head's own top tokens to +inf keeps their order within the head.

Ties: a stable sort over the flattened (head, token) order, so equal scores go to the lower head,
then the earlier token: left padding shifts every token of a row equally and changes nothing.
"""

from __future__ import annotations

import torch


def head_budgets(prio: torch.Tensor, budget: torch.Tensor, safeguard: float) -> torch.Tensor:
    """Tokens each KV head keeps under AdaKV.

    Args:
        prio: (B, H, n) float selection priority (higher = keep; +inf protected, -inf pads).
        budget: (B,) long, the uniform per-head budget of each row (already <= the row's valid tokens).
        safeguard: the per-head floor as a fraction of ``budget``, in [0, 1].
    Returns:
        (B, H) long counts: ``sum_h count = min(H · budget, kept-able tokens)``, each
        ``count >= min(floor(safeguard · budget), valid tokens)``.

    >>> prio = torch.tensor([[[9., 8., 7., 6.], [1., 0., -1., -2.]]])
    >>> head_budgets(prio, torch.tensor([2]), 0.5).tolist()
    [[3, 1]]
    """
    B, H, n = prio.shape
    dev = prio.device
    budget = budget.to(device=dev, dtype=torch.long)
    if n == 0 or H == 0:
        return torch.zeros(B, H, dtype=torch.long, device=dev)
    p = prio.float()
    alive = p != float("-inf")
    floor = torch.floor(budget.double() * safeguard).long()                      # (B,)
    order = p.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=dev).expand(B, H, n))
    forced = (rank < floor[:, None, None]) & alive                               # each head's own top
    joint = p.masked_fill(forced, float("inf")).reshape(B, H * n)
    flat = joint.sort(dim=-1, descending=True, stable=True).indices              # (B, H·n)
    total = torch.minimum(budget * H, alive.reshape(B, -1).sum(-1))
    take = torch.arange(H * n, device=dev)[None] < total[:, None]
    return torch.zeros(B, H, dtype=torch.long, device=dev).scatter_add_(1, flat // n, take.long())


__all__ = ["head_budgets"]
