"""Eviction entry points: select+gather of the kept tokens, and the K/V statistics of the
attention-free scorers (KNorm, LagKV).

Each function checks its arguments, then runs the Triton kernel (CUDA tensors, or
`KVFX_FORCE_TRITON=1`, used with `TRITON_INTERPRET=1` by the CPU tests) or its PyTorch reference
in `kvfx.methods` (every other device, and shapes the kernels do not take: head_dim outside
HEAD_DIMS, dtypes other than fp32/fp16/bf16, k and v of different shapes). Both paths share one
semantics; triton is imported only when a kernel is launched.
"""
from __future__ import annotations

import os

import torch

from kvfx.methods.knorm import knorm_scores as knorm_reference
from kvfx.methods.lagkv import EPS as LAG_EPS
from kvfx.methods.lagkv import partition_scores as lagkv_reference
from kvfx.methods.ragged_attention import select_gather_ragged_reference
from kvfx.methods.select import select_gather_reference
from kvfx.templates import configs
from kvfx.templates.launch import _device_ctx, _triton_or_none, _warn_no_triton
from kvfx.templates.spec import DTYPE_NAMES, HEAD_DIMS, KernelSpec


def _check_kv(op, k, v, doc):
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a tensor {doc}, got {got}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{op}: k has shape {tuple(k.shape)} and v {tuple(v.shape)}; expected the same "
                         "shape up to the last (channel) dimension")
    if k.device != v.device:
        raise ValueError(f"{op}: k and v devices differ ({k.device}, {v.device})")


def _kernel_triton(op, k, v=None):
    """The triton module when the kernel should run on k (and v), else None (reference path)."""
    if not (k.is_cuda or os.environ.get("KVFX_FORCE_TRITON") == "1"):
        return None
    fits = k.dtype in DTYPE_NAMES and k.shape[-1] in HEAD_DIMS
    if v is not None:
        fits = fits and v.shape == k.shape and v.dtype == k.dtype
    if not fits:
        return None
    triton = _triton_or_none(op)
    if triton is None:
        _warn_no_triton(op)
    return triton


def select_gather(scores, budget, k, v, cap):
    """Keep the `budget` highest-scoring tokens of every (row, KV head), in position order.

    scores: (B, Hkv, n) float priority, higher = keep; protected tokens (sinks, window) carry
        +inf and pads -inf (see `kvfx.methods.select.priority`). Ties go to the smaller token
        index (a stable descending sort); NaN ranks above +inf, as in torch.sort.
    budget: (B,) or (B, Hkv) integer tensor, tokens to keep per row (and head).
    k, v: (B, Hkv, n, d) and (B, Hkv, n, dv), any strides.
    cap: slots of the outputs, a Python int >= 0 (usually the largest budget).
    Returns k_out (B, Hkv, cap, d), v_out (B, Hkv, cap, dv) with the kept tokens in slots
    [0, count) and zeros after; pos_out (B, Hkv, cap) int64 token indices, -1 after count;
    count (B, Hkv) int64 = min(max(budget, 0), cap, tokens whose score is not -inf): -inf tokens
    are never kept, so a budget above the number of the others keeps fewer tokens than asked.
    Never reads a device value back to the host.

    >>> prio = torch.tensor([[[0.5, float("inf"), 0.5, float("-inf"), 2.0]]])
    >>> kv = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 16)
    >>> k_out, v_out, pos, count = select_gather(prio, torch.tensor([9]), kv, kv, cap=6)
    >>> pos.tolist(), count.tolist()
    ([[[0, 1, 2, 4, -1, -1]]], [[4]])
    """
    op = "select_gather"
    _check_kv(op, k, v, "(B, Hkv, n, d)")
    if k.dim() != 4:
        raise ValueError(f"{op}: k must be a 4-d tensor (B, Hkv, n, d), got {tuple(k.shape)}")
    B, H, n = k.shape[:3]
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (B, H, n) \
            or not scores.dtype.is_floating_point:
        got = (tuple(scores.shape), scores.dtype) if isinstance(scores, torch.Tensor) else scores
        raise ValueError(f"{op}: scores must be a float tensor of shape (B, Hkv, n) = ({B}, {H}, {n}), "
                         f"got {got}")
    if not isinstance(budget, torch.Tensor) or tuple(budget.shape) not in ((B,), (B, H)) \
            or budget.dtype.is_floating_point or budget.dtype == torch.bool:
        got = (tuple(budget.shape), budget.dtype) if isinstance(budget, torch.Tensor) else budget
        raise ValueError(f"{op}: budget must be an integer tensor of shape (B,) or (B, Hkv) = ({B},) or "
                         f"({B}, {H}), got {got}")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise ValueError(f"{op}: cap must be a Python int >= 0, got {cap!r}")
    triton = _kernel_triton(op, k, v)
    if triton is None or min(B, H) == 0:
        return select_gather_reference(scores, budget, k, v, cap)

    from kvfx.templates.render import load

    d = k.shape[-1]
    kernel = load(KernelSpec("select_gather", DTYPE_NAMES[k.dtype], d))._kvfx_select_gather_kernel
    s = scores.to(device=k.device, dtype=torch.float32)
    bud = budget.to(device=k.device, dtype=torch.int32)
    bud_strides = (bud.stride(0), bud.stride(1) if bud.dim() == 2 else 0)
    k_out = torch.empty((B, H, cap, d), dtype=k.dtype, device=k.device)
    v_out = torch.empty_like(k_out)
    pos_out = torch.empty((B, H, cap), dtype=torch.long, device=k.device)
    count = torch.empty((B, H), dtype=torch.long, device=k.device)
    block_n, block_c = configs.select_blocks(n, d)
    with _device_ctx(k):
        kernel[(B * H,)](
            s, bud, k, v, k_out, v_out, pos_out, count,
            *s.stride(), *bud_strides, *k.stride(), *v.stride(), *k_out.stride(), *v_out.stride(),
            *pos_out.stride(), *count.stride(),
            H, n, cap,
            HEAD_DIM=d, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=configs.EVICT_NUM_WARPS,
        )
    return k_out, v_out, pos_out, count


def select_gather_ragged(scores, budget, k, v, start, k_pool, v_pool, pos_pool):
    """Select + gather straight into a head-wise ragged pool (:mod:`kvfx.runtime.ragged`): the
    ``budget`` (B, Hkv) highest-scoring tokens of every (row, KV head), in position order, written
    to k_pool (P, d), v_pool (P, dv), pos_pool (P,) int64 at [start[b, h], start[b, h] + count);
    every other slot is left as it is. Same kept set as :func:`select_gather`. Returns count
    (B, Hkv) int64. The semantics: :func:`kvfx.methods.ragged_attention.select_gather_ragged_reference`.

    >>> prio = torch.tensor([[[0.5, float("inf"), 0.5, float("-inf"), 2.0]]])
    >>> kv = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 16)
    >>> kp, pp = torch.zeros(4, 16), torch.full((4,), -1)
    >>> select_gather_ragged(prio, torch.tensor([[2]]), kv, kv, torch.tensor([[1]]), kp, kp.clone(), pp).tolist()
    [[2]]
    >>> pp.tolist()
    [-1, 1, 4, -1]
    """
    op = "select_gather_ragged"
    _check_kv(op, k, v, "(B, Hkv, n, d)")
    B, H, n = k.shape[:3]
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (B, H, n) or not scores.dtype.is_floating_point:
        raise ValueError(f"{op}: scores must be a float tensor of shape (B, Hkv, n) = ({B}, {H}, {n})")
    for name, t in (("budget", budget), ("start", start)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, H) or t.dtype.is_floating_point \
                or t.dtype == torch.bool:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t
            raise ValueError(f"{op}: {name} must be an integer tensor of shape (B, Hkv) = ({B}, {H}), got {got}")
    for name, t, w in (("k_pool", k_pool, k.shape[-1]), ("v_pool", v_pool, v.shape[-1])):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != w or t.dtype != k.dtype:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t
            raise ValueError(f"{op}: {name} must be a (P, {w}) {k.dtype} pool, got {got}")
    if not isinstance(pos_pool, torch.Tensor) or pos_pool.dim() != 1 or pos_pool.dtype != torch.long:
        raise ValueError(f"{op}: pos_pool must be a (P,) int64 tensor")
    triton = _kernel_triton(op, k, v)
    if triton is None or min(B, H, n, k_pool.shape[0]) == 0:
        return select_gather_ragged_reference(scores, budget, k, v, start, k_pool, v_pool, pos_pool)

    from kvfx.templates.render import load

    d = k.shape[-1]
    kernel = load(KernelSpec("select_gather", DTYPE_NAMES[k.dtype], d, ragged=True))._kvfx_select_gather_kernel
    s = scores.to(device=k.device, dtype=torch.float32)
    bud = budget.to(device=k.device, dtype=torch.int32)
    seg = start.to(device=k.device, dtype=torch.int64)
    count = torch.empty((B, H), dtype=torch.long, device=k.device)
    block_n, block_c = configs.select_blocks(n, d)
    with _device_ctx(k):
        kernel[(B * H,)](
            s, bud, k, v, k_pool, v_pool, pos_pool, count, seg,
            *s.stride(), *bud.stride(), *k.stride(), *v.stride(), 0, 0, *k_pool.stride(),
            0, 0, *v_pool.stride(), 0, 0, *pos_pool.stride(), *count.stride(), *seg.stride(),
            H, n, n,
            HEAD_DIM=d, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=configs.EVICT_NUM_WARPS,
        )
    return count


def _rows(x):
    """(..., n, d) -> (R, n, d) (a view when the leading dims merge)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def knorm_scores(k):
    """KNorm scores -||k_j||_2 in fp32: k (..., n, d) -> (..., n), e.g. (B, Hkv, n, d) -> (B, Hkv, n).

    >>> knorm_scores(torch.full((1, 2, 3, 16), 0.5)).shape
    torch.Size([1, 2, 3])
    """
    op = "knorm_scores"
    if not isinstance(k, torch.Tensor) or k.dim() < 2:
        got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"{op}: k must be a tensor (..., n, d), got {got}")
    triton = _kernel_triton(op, k)
    if triton is None or k.numel() == 0:
        return knorm_reference(k)

    from kvfx.templates.render import load

    n, d = k.shape[-2], k.shape[-1]
    kr = _rows(k)
    kernel = load(KernelSpec("kv_stats", DTYPE_NAMES[k.dtype], d, scores="knorm"))._kvfx_kv_stats_kernel
    out = torch.empty(kr.shape[:2], dtype=torch.float32, device=k.device)
    block_n = configs.stats_block(n, d)
    with _device_ctx(k):
        kernel[(kr.shape[0], triton.cdiv(n, block_n))](
            kr, out, *kr.stride(), *out.stride(), n,
            HEAD_DIM=d, BLOCK_N=block_n, num_warps=configs.EVICT_NUM_WARPS,
        )
    return out.view(k.shape[:-1])


def lagkv_partition_scores(k, v, lag, v_ratio):
    """LagKV scores of the first P - 1 partitions of `lag` tokens, each against the next one
    (see `kvfx.methods.lagkv.partition_scores`): k, v (..., P * lag, d) -> (..., P - 1, lag) fp32.

    lag: Python int >= 1 dividing the token count; v_ratio: Python float, the weight of the
    value scores. P < 2 returns an empty (..., 0, lag).

    >>> lagkv_partition_scores(torch.randn(2, 24, 16), torch.randn(2, 24, 16), 8, 1.0).shape
    torch.Size([2, 2, 8])
    """
    op = "lagkv_partition_scores"
    _check_kv(op, k, v, "(..., P * lag, d)")
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 1 or k.shape[-2] % lag:
        raise ValueError(f"{op}: lag must be a Python int >= 1 dividing the {k.shape[-2]} tokens, got {lag!r}")
    if isinstance(v_ratio, bool) or not isinstance(v_ratio, (int, float)):
        raise ValueError(f"{op}: v_ratio must be a Python float, got {v_ratio!r}")
    lead, n, d = k.shape[:-2], k.shape[-2], k.shape[-1]
    P = n // lag
    if k.numel() == 0 or v.numel() == 0 or P < 2:
        return torch.zeros((*lead, max(P - 1, 0), lag), dtype=torch.float32, device=k.device)
    triton = _kernel_triton(op, k, v)
    if triton is None:
        kr, vr = _rows(k), _rows(v)
        return lagkv_reference(kr, vr, lag=lag, v_ratio=v_ratio).view(*lead, max(P - 1, 0), lag)

    from kvfx.templates.render import load

    kr, vr = _rows(k), _rows(v)
    kernel = load(KernelSpec("kv_stats", DTYPE_NAMES[k.dtype], d, scores="lagkv"))._kvfx_kv_stats_kernel
    out = torch.empty((kr.shape[0], P - 1, lag), dtype=torch.float32, device=k.device)
    with _device_ctx(k):
        kernel[(kr.shape[0], P - 1)](
            kr, vr, out, *kr.stride(), *vr.stride(), *out.stride(), lag, float(v_ratio), LAG_EPS,
            HEAD_DIM=d, BLOCK_L=configs.stats_block(lag, d), num_warps=configs.EVICT_NUM_WARPS,
        )
    return out.view(*lead, P - 1, lag)
