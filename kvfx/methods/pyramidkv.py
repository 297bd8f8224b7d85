"""PyramidKV (arXiv 2406.02069): SnapKV scores with a per-layer budget that shrinks with depth.

With average budget C, window w, β = 20 and L layers:
min = (C−w)/β, max = 2(C−w) − min; if max ≥ n−w: max = n−w, min = 2(C−w) − max;
layer l keeps max − l·(max−min)/(L−1) tokens plus the window.
If n ≤ C nothing is compressed; if n < 2(C−w) every layer keeps C−w (+ the window).
"""

from __future__ import annotations

import torch


def pyramid_budget(n_valid: torch.Tensor, avg_budget: torch.Tensor, *, window: int, layer: int,
                   num_layers: int, beta: float = 20.0) -> torch.Tensor:
    """Per-row budget (B,) long of layer ``layer``, window included.

    n_valid, avg_budget: (B,) long (C is the budget a uniform schedule would give)."""
    n = n_valid.double()
    C = avg_budget.double()
    span = C - window
    lo = span / beta
    hi = 2 * span - lo
    clip = hi >= n - window
    hi = torch.where(clip, n - window, hi)
    lo = torch.where(clip, 2 * span - hi, lo)
    step = (hi - lo) / max(num_layers - 1, 1)
    layer_keep = hi - layer * step
    layer_keep = torch.where(n < 2 * span, span, layer_keep)
    out = torch.floor(layer_keep).long() + window
    out = torch.where(n <= C, n_valid, out)
    return torch.minimum(torch.clamp(out, min=window), n_valid)
