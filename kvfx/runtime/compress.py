"""The eviction steps the compressors run, each on the Triton kernel or its PyTorch reference.

`kvfx.methods` holds the semantics in plain PyTorch and never imports triton; this module picks
the execution: the kernels of `kvfx.templates.launch_evict` when
`kvfx.runtime.attention._use_kernel` says so (CUDA, or `KVFX_FORCE_TRITON=1` in the tests), the
references otherwise (CPU). Both give the same kept tokens: select+gather bit for bit, the K/V
statistics to fp32 round-off.
"""

from __future__ import annotations

import torch

from kvfx.methods.knorm import knorm_scores as _knorm_reference
from kvfx.methods.lagkv import partition_scores as _lagkv_reference
from kvfx.methods.ragged_attention import select_gather_ragged_reference
from kvfx.methods.select import select_gather_reference
from kvfx.runtime.attention import _use_kernel


def _kernel(k: torch.Tensor) -> bool:
    return k.numel() > 0 and _use_kernel(k)  # (_use_kernel divides by k.shape[1])


def knorm_scores(k: torch.Tensor) -> torch.Tensor:
    """k (B, Hkv, n, d) -> KNorm scores -||k_j||_2 (B, Hkv, n) fp32."""
    if _kernel(k):
        from kvfx.templates.launch_evict import knorm_scores as kernel

        return kernel(k)
    return _knorm_reference(k)


def lagkv_partition_scores(k: torch.Tensor, v: torch.Tensor, lag: int, v_ratio: float) -> torch.Tensor:
    """k, v (H, P·lag, d) -> LagKV scores (H, P−1, lag) of the first P−1 partitions
    (the signature of :func:`kvfx.methods.lagkv.partition_scores`, usable as its ``score_fn``)."""
    if _kernel(k) and k.shape == v.shape:
        from kvfx.templates.launch_evict import lagkv_partition_scores as kernel

        return kernel(k, v, lag, v_ratio)
    return _lagkv_reference(k, v, lag=lag, v_ratio=v_ratio)


def select_and_gather(scores: torch.Tensor, budget: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cap: int):
    """Kept tokens of every (row, KV head) gathered in position order into ``cap`` slots.

    scores (B, Hkv, n) priority (+inf protected, -inf pads), budget (B,) or (B, Hkv), k, v
    (B, Hkv, n, d). Returns (k_out, v_out, pos_out, count); see
    :func:`kvfx.methods.select.select_gather_reference` for the exact semantics."""
    if _kernel(k) and k.shape == v.shape:
        from kvfx.templates.launch_evict import select_gather as kernel

        return kernel(scores, budget, k, v, cap)
    return select_gather_reference(scores, budget, k, v, cap)


def select_and_gather_ragged(scores: torch.Tensor, budget: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             start: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                             pos_pool: torch.Tensor) -> torch.Tensor:
    """Kept tokens of every (row, KV head) written in position order straight into a ragged pool
    at each segment's ``start``: count (B, Hkv). See
    :func:`kvfx.methods.ragged_attention.select_gather_ragged_reference`."""
    if _kernel(k) and k.shape == v.shape:
        from kvfx.templates.launch_evict import select_gather_ragged as kernel

        return kernel(scores, budget, k, v, start, k_pool, v_pool, pos_pool)
    return select_gather_ragged_reference(scores, budget, k, v, start, k_pool, v_pool, pos_pool)
