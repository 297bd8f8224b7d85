"""Decode attention over a head-wise ragged pool (:class:`kvfx.runtime.ragged.RaggedStore`, AdaKV
budgets): the ``decode_attention`` template rendered with ``ragged=True`` (each KV head reads its
own segment of one flat pool, split-K as the dense kernel), or the PyTorch reference
:func:`kvfx.methods.ragged_attention.ragged_decode_reference` off CUDA. Same checks on both paths.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from kvfx.methods.ragged_attention import ragged_decode_reference
from kvfx.templates import configs
from kvfx.templates.launch import (_check_scale, _device_ctx, _dot_fp32, _triton_or_none, _warn_no_triton)
from kvfx.templates.spec import DTYPE_NAMES, HEAD_DIMS, MAX_GQA_GROUP, KernelSpec


def _check(op, q, k_pool, v_pool, start, count, length):
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"{op}: q must be a (B, Hq, 1, d) tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    B, Hq, _, d = q.shape
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != d:
            raise ValueError(f"{op}: {name} must be a (P, d={d}) pool, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} is {t.dtype} on {t.device}, expected q's {q.dtype} on {q.device}")
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"{op}: k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} differ")
    if q.dtype not in DTYPE_NAMES or d not in HEAD_DIMS:
        raise ValueError(f"{op}: dtype {q.dtype} / head_dim {d}, expected one of {list(DTYPE_NAMES)} / "
                         f"{list(HEAD_DIMS)}")
    for name, t in (("start", start), ("count", count)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != B or t.dtype.is_floating_point \
                or t.dtype == torch.bool:
            raise ValueError(f"{op}: {name} must be an integer (B={B}, Hkv) tensor, got "
                             f"{(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t}")
    Hkv = start.shape[1]
    if count.shape != start.shape or Hkv == 0 or Hq % Hkv or Hq // Hkv > MAX_GQA_GROUP:
        raise ValueError(f"{op}: start {tuple(start.shape)}, count {tuple(count.shape)} for {Hq} query heads; "
                         f"expected equal (B, Hkv) shapes with Hq a multiple of Hkv (group <= {MAX_GQA_GROUP})")
    if type(length) is not int or length < 0:
        raise ValueError(f"{op}: length must be an int >= 0 (a bound of count.max()), got {length!r}")


def ragged_decode_attention(q, k_pool, v_pool, start, count, *, scale, length=None):
    """One query per sequence over each KV head's own segment of a flat pool.

    q (B, Hq, 1, d); k_pool, v_pool (P, d) in q's dtype; start, count (B, Hkv) integer: KV head h of
    row b attends pool rows [start, start + count) (Hq a multiple of Hkv; query head h reads KV head
    h // g). ``length``: a host bound >= count.max() (None: computed, a device sync), the split-K
    range. Returns o (B, Hq, 1, d) in q's dtype and lse (B, Hq, 1) fp32; a head with count 0 gets
    o = 0, lse = -inf.

    >>> pool = torch.randn(10, 16)
    >>> o, lse = ragged_decode_attention(torch.randn(1, 4, 1, 16), pool, pool, torch.tensor([[0, 6]]),
    ...                                  torch.tensor([[6, 0]]), scale=0.25)
    >>> o.shape, bool(lse[0, 2:].isinf().all())
    (torch.Size([1, 4, 1, 16]), True)
    """
    op = "ragged_decode_attention"
    if length is None and isinstance(count, torch.Tensor):
        length = int(count.max().item()) if count.numel() else 0
    _check(op, q, k_pool, v_pool, start, count, length)
    _check_scale(op, scale)
    B, Hq, _, d = q.shape
    Hkv = start.shape[1]
    use_kernel = q.is_cuda or os.environ.get("KVFX_FORCE_TRITON") == "1"
    triton = _triton_or_none(op) if use_kernel else None
    if triton is None or min(B, Hq, length, k_pool.shape[0]) == 0:
        if use_kernel and triton is None:
            _warn_no_triton(op)
        o, lse, _ = ragged_decode_reference(q, k_pool, v_pool, start.long(), count.long(), scale=scale,
                                            length=length, return_lse=True)
        return o, lse

    from kvfx.templates.render import load

    g = Hq // Hkv
    spec = KernelSpec("decode_attention", DTYPE_NAMES[q.dtype], d, g, ragged=True)
    module = load(spec)
    block_g = max(16, 1 << (g - 1).bit_length())
    lens = count.to(device=q.device, dtype=torch.int32)
    seg = start.to(device=q.device, dtype=torch.int64)
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, 1), dtype=torch.float32, device=q.device)
    cap = length

    def run(cfg):
        splits = configs.decode_num_splits(cap, B * Hkv, cfg.block_n)
        split_len = triton.cdiv(triton.cdiv(cap, splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(cap, split_len)
        o_part = torch.empty((B, Hq, splits, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
        module._kvfx_decode_attention_kernel[(B * Hkv, splits)](
            q, k_pool, v_pool, lens, seg, lse, o_part, lse_part,
            q.stride(0), q.stride(1), q.stride(3), 0, 0, *k_pool.stride(), 0, 0, *v_pool.stride(),
            *lens.stride(), *seg.stride(), 0, 0, 0, *o_part.stride(), *lse_part.stride(),
            Hkv, cap, split_len, float(scale),
            HEAD_DIM=d, GQA_GROUP=g, BLOCK_G=block_g, BLOCK_N=cfg.block_n, HAS_BIAS=False,
            DOT_FP32=_dot_fp32(q), SOFTCAP=0.0,  # no cap: capped sites refuse head-wise budgets
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        module._kvfx_decode_attention_reduce_kernel[(B * Hq,)](
            o_part, lse_part, o, lse,
            *o_part.stride(), *lse_part.stride(), o.stride(0), o.stride(1), o.stride(3),
            lse.stride(0), lse.stride(1), Hq, splits,
            HEAD_DIM=d, BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
        )

    candidates = configs.prune_decode(configs.DECODE_CONFIGS, head_dim=d, dtype=spec.dtype, block_g=block_g, cap=cap)
    key = (dataclasses.replace(spec).uri, cap.bit_length(), B * Hkv)
    with _device_ctx(q):
        cfg = configs.choose(key, candidates, lambda c: triton.testing.do_bench(lambda: run(c)))
        run(cfg)
    return o, lse


__all__ = ["ragged_decode_attention"]
