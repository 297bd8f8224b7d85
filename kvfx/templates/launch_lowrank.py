"""Entry point of the latent decode kernel (ReCalKV low-rank stores): check arguments, then run the
Triton kernel (CUDA tensors, or `KVFX_FORCE_TRITON=1`, used with `TRITON_INTERPRET=1` by the CPU
tests) or the PyTorch reference :func:`kvfx.methods.lowrank_attention.latent_attention_reference`
(every other device, and shapes the kernel does not take). One semantics, the same checks.

    latent_decode_attention(q, zk, zv, lengths, pos, cos, sin, qk, qv, scale=...)
"""
from __future__ import annotations

import os

import torch

from kvfx.methods.lowrank_attention import latent_attention_reference
from kvfx.templates import configs
from kvfx.templates.launch import _check_scale, _device_ctx, _triton_or_none, _warn_no_triton
from kvfx.templates.spec import DTYPE_NAMES, HEAD_DIMS, MAX_GQA_GROUP, MAX_LATENT_RANK, KernelSpec

__all__ = ["latent_decode_attention"]

_DTYPES = ", ".join(str(d) for d in DTYPE_NAMES)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def _check(op, q, zk, zv, lengths, pos, cos, sin, qk, qv):
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] != 1:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{op}: q must be a (B, Hq, 1, d) tensor (one query per sequence), got {got}")
    B, Hq, _, d = q.shape
    for name, t, dims in (("zk", zk, 3), ("zv", zv, 3), ("cos", cos, 3), ("sin", sin, 3), ("qk", qk, 2),
                          ("qv", qv, 2), ("pos", pos, 2), ("lengths", lengths, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a {dims}-d tensor, got {got}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, q on {q.device}; move them to one device")
    for name, t in (("q", q), ("zk", zk), ("zv", zv), ("cos", cos), ("sin", sin)):
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected one of {_DTYPES}")
    if qk.dtype != torch.float32 or qv.dtype != torch.float32:
        raise ValueError(f"{op}: the bases qk, qv must be float32, got {qk.dtype}, {qv.dtype}")
    for name, t in (("pos", pos), ("lengths", lengths)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    cap = zk.shape[1]
    if zk.shape[0] != B or zv.shape[:2] != (B, cap) or tuple(pos.shape) != (B, cap) or lengths.shape[0] != B:
        raise ValueError(f"{op}: zk {tuple(zk.shape)}, zv {tuple(zv.shape)}, pos {tuple(pos.shape)} and lengths "
                         f"{tuple(lengths.shape)} must share the batch {B} and the capacity (B, cap, ·)")
    if cos.shape != sin.shape or cos.shape[0] != B or cos.shape[2] != d:
        raise ValueError(f"{op}: cos / sin must be (B, T, d) = ({B}, T, {d}) tables, got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if qk.shape[0] % d or qv.shape[0] != qk.shape[0]:
        raise ValueError(f"{op}: qk {tuple(qk.shape)} and qv {tuple(qv.shape)} must be (Hkv·d, r) with d = {d}")
    H = qk.shape[0] // d
    if qk.shape[1] != zk.shape[2] or qv.shape[1] != zv.shape[2]:
        raise ValueError(f"{op}: the bases' ranks ({qk.shape[1]}, {qv.shape[1]}) differ from the latents' "
                         f"widths ({zk.shape[2]}, {zv.shape[2]})")
    if Hq % H or Hq // H > MAX_GQA_GROUP:
        raise ValueError(f"{op}: q has {Hq} heads and the bases {H} KV heads; expected Hq a multiple of Hkv "
                         f"with Hq // Hkv <= {MAX_GQA_GROUP}")
    return B, Hq, H, d, cap


def _kernel_takes(d: int, rk: int, rv: int) -> bool:
    return d in HEAD_DIMS and d >= 32 and 1 <= rk <= MAX_LATENT_RANK and 1 <= rv <= MAX_LATENT_RANK


def latent_decode_attention(q, zk, zv, lengths, pos, cos, sin, qk, qv, *, scale):
    """One new query per sequence over a latent store (split-K; semantics:
    :func:`kvfx.methods.lowrank_attention.latent_attention_reference` with nq = 1, no bias).

    q (B, Hq, 1, d); zk (B, cap, r_k), zv (B, cap, r_v) latents; lengths (B,) integer (slots
    [0, lengths[b]) are valid, clamped to [0, cap]); pos (B, cap) integer logical positions;
    cos, sin (B, T, d) RoPE rows by position; qk (Hkv·d, r_k), qv (Hkv·d, r_v) float32 bases.
    Returns o (B, Hq, 1, d) in q's dtype and lse (B, Hq, 1) fp32.

    >>> B, Hq, d, r = 1, 4, 32, 16
    >>> qk = torch.linalg.qr(torch.randn(2 * d, r))[0]
    >>> cos, sin = torch.ones(B, 8, d), torch.zeros(B, 8, d)
    >>> z = torch.randn(B, 8, r)
    >>> o, lse = latent_decode_attention(torch.randn(B, Hq, 1, d), z, z, torch.tensor([6]),
    ...                                  torch.arange(8)[None], cos, sin, qk, qk, scale=0.18)
    >>> o.shape, lse.shape
    (torch.Size([1, 4, 1, 32]), torch.Size([1, 4, 1]))
    """
    op = "latent_decode_attention"
    B, Hq, H, d, cap = _check(op, q, zk, zv, lengths, pos, cos, sin, qk, qv)
    _check_scale(op, scale)
    rk, rv = zk.shape[2], zv.shape[2]
    use_kernel = q.is_cuda or os.environ.get("KVFX_FORCE_TRITON") == "1"
    triton = _triton_or_none(op) if use_kernel else None
    if triton is None or min(B, Hq, cap) == 0 or not _kernel_takes(d, rk, rv):
        if use_kernel and triton is None:
            _warn_no_triton(op)
        o, lse = latent_attention_reference(q, zk, zv, lengths, pos, cos, sin, qk, qv, scale=scale)
        return o, lse.float()

    from kvfx.templates.render import load

    g = Hq // H
    spec = KernelSpec("latent_decode_attention", DTYPE_NAMES[q.dtype], d, g, key_rank=rk, value_rank=rv)
    module = load(spec)
    block_rk, block_rv = _pow2(rk), _pow2(rv)
    heads = configs.latent_heads_per_program(H, g, block_rv)
    block_q = _pow2(heads * g)
    programs = B * triton.cdiv(H, heads)
    lens = lengths.to(device=q.device, dtype=torch.int32)
    positions = pos.to(device=q.device, dtype=torch.int32)
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, 1), dtype=torch.float32, device=q.device)

    def run(cfg):
        splits = configs.decode_num_splits(cap, programs, cfg.block_n)
        split_len = triton.cdiv(triton.cdiv(cap, splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(cap, split_len)
        o_part = torch.empty((B, Hq, splits, block_rv), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
        module._kvfx_latent_decode_attention_kernel[(programs, splits)](
            q, zk, zv, positions, lens, cos, sin, qk, o_part, lse_part,
            q.stride(0), q.stride(1), q.stride(3), *zk.stride(), *zv.stride(), *positions.stride(),
            lens.stride(0), *cos.stride(), *sin.stride(), *qk.stride(), *o_part.stride(), *lse_part.stride(),
            H, cap, split_len, float(scale),
            HEAD_DIM=d, HALF=d // 2, GQA_GROUP=g, KEY_RANK=rk, VALUE_RANK=rv, HEADS=heads, BLOCK_Q=block_q,
            BLOCK_N=cfg.block_n, BLOCK_RK=block_rk, BLOCK_RV=block_rv,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        module._kvfx_latent_decode_attention_reduce_kernel[(B * Hq,)](
            o_part, lse_part, qv, o, lse,
            *o_part.stride(), *lse_part.stride(), *qv.stride(), o.stride(0), o.stride(1), o.stride(3),
            lse.stride(0), lse.stride(1),
            Hq, splits,
            HEAD_DIM=d, GQA_GROUP=g, VALUE_RANK=rv, BLOCK_RV=block_rv,
            BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
        )

    candidates = configs.prune_latent_decode(configs.LATENT_DECODE_CONFIGS, head_dim=d, key_rank=block_rk,
                                             value_rank=block_rv, cap=cap)
    key = (spec.uri, cap.bit_length(), programs)
    with _device_ctx(q):
        cfg = configs.choose(key, candidates, lambda c: triton.testing.do_bench(lambda: run(c)))
        run(cfg)
    return o, lse
