"""Entry points of the quantized-store kernels (KIVI + outlier tokens): check arguments, then run
the Triton kernel (CUDA tensors, or `KVFX_FORCE_TRITON=1`, used with `TRITON_INTERPRET=1` by the
CPU tests) or the PyTorch reference (every other device). Both paths share one semantics and the
same argument checks.

    quant_decode_attention(q, kv, scale=..., calib=None)
                                                 attention of one query over a QuantKV store, with
                                                 CaliDrop's partition merged in the same reduction
                                                 (reference: kvfx.methods.quant_attention)
    quant_compress_keys(k, bits, group, ...)     quantize + pack keys, optional outlier tracing
    quant_compress_values(v, bits, group, ...)   quantize + pack values
                                                 (references: kvfx.methods.quant)

Kernel constraints, checked on every path: head dims in HEAD_DIMS, groups powers of two (key groups
a multiple of 32 // bits), fp32/fp16/bf16 tensors.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from kvfx.methods import quant as qref
from kvfx.methods.quant_attention import QuantKV, quant_attention_reference
from kvfx.methods.quant_pack import per_word
from kvfx.templates import configs
from kvfx.templates.launch import _check_calib, _check_scale, _device_ctx, _triton_or_none, _warn_no_triton
from kvfx.templates.spec import DTYPE_NAMES, HEAD_DIMS, KV_BITS, MAX_GQA_GROUP, MAX_QUANT_GROUP, KernelSpec

__all__ = ["quant_decode_attention", "quant_compress_keys", "quant_compress_values"]

_DTYPES = ", ".join(str(d) for d in DTYPE_NAMES)
_STAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DIMS = ", ".join(map(str, HEAD_DIMS))


def _triton_for(op: str, *tensors):
    """The triton module when the kernel should run, else None (reference path)."""
    use_kernel = tensors[0].is_cuda or os.environ.get("KVFX_FORCE_TRITON") == "1"
    if not use_kernel or min(t.numel() for t in tensors) == 0:
        return None
    triton = _triton_or_none(op)
    if triton is None:
        _warn_no_triton(op)
    return triton


def _shape_doc(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def _expect(op, name, t, shape, dtypes, what):
    """t is a tensor of `dtypes` whose shape matches `shape` (None: any size)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a tensor {_shape_doc(shape)}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {_shape_doc(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {what}")


def _check_int(op, name, value, lo, hi=None):
    if type(value) is not int or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{op}: {name} got {value!r}, expected an int {rng}")


def _check_bits(op, name, bits):
    if type(bits) is not int or bits not in KV_BITS:
        raise ValueError(f"{op}: {name} got {bits!r}, expected one of {', '.join(map(str, KV_BITS))}")


def _check_group(op, name, group, lo, hi, why):
    if type(group) is not int or group < lo or group > hi or group & (group - 1):
        raise ValueError(f"{op}: {name} got {group!r}, expected a power of two in [{lo}, {hi}] ({why})")


def _check_head_dim(op, name, d):
    if d not in HEAD_DIMS:
        raise ValueError(f"{op}: {name} {d} not supported, expected one of {_DIMS}")


def _check_finite(name, scale, mn, stat_dtype):
    # The reference's eager check (kvfx.methods.quant._quantize_groups), same message.
    if not torch.compiler.is_compiling() and not (torch.isfinite(mn).all() and torch.isfinite(scale).all()):
        raise ValueError(f"{name}: a group's min or scale is not finite in {stat_dtype} (values beyond its "
                         "range, or inf/NaN in valid slots); pass stat_dtype=torch.bfloat16 or "
                         "torch.float32, or mark the bad tokens invalid")


# --- decode attention over a quantized store -------------------------------------------------------

def _check_quant_kv(op, q, kv):
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] != 1:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{op}: q must be a (B, Hq, 1, d) tensor (one query per sequence), got {got}")
    if q.dtype not in DTYPE_NAMES:
        raise ValueError(f"{op}: q has dtype {q.dtype}, expected one of {_DTYPES}")
    if not isinstance(kv, QuantKV):
        raise ValueError(f"{op}: kv must be a kvfx.methods.quant_attention.QuantKV, got {type(kv).__name__}")
    B, Hq, _, d = q.shape
    _check_head_dim(op, "head_dim", d)
    _check_bits(op, "kv.kbits", kv.kbits)
    _check_bits(op, "kv.vbits", kv.vbits)
    pwk, pwv = per_word(kv.kbits), per_word(kv.vbits)
    _check_group(op, "kv.kgroup", kv.kgroup, pwk, MAX_QUANT_GROUP, f"a multiple of 32 // kbits = {pwk}")
    _expect(op, "kv.kcodes", kv.kcodes, (B, None, None, d), (torch.int32,), "torch.int32 (from pack)")
    H = kv.kcodes.shape[1]
    if H == 0 or Hq % H or Hq // H > MAX_GQA_GROUP:
        raise ValueError(f"{op}: q has {Hq} heads and the store {H}; expected Hq a multiple of Hkv with "
                         f"Hq // Hkv <= {MAX_GQA_GROUP}")
    stat = "torch.float16, torch.bfloat16 or torch.float32"
    _expect(op, "kv.kscale", kv.kscale, (B, H, None, d), _STAT_DTYPES, stat)
    _expect(op, "kv.kmin", kv.kmin, tuple(kv.kscale.shape), _STAT_DTYPES, stat)
    _expect(op, "kv.vcodes", kv.vcodes, (B, H, None, None), (torch.int32,), "torch.int32 (from pack)")
    dv = kv.vcodes.shape[3] * pwv
    _check_head_dim(op, "value dim (kv.vcodes words * 32 // vbits)", dv)
    _check_group(op, "kv.vgroup", kv.vgroup, 1, dv, f"at most the value dim {dv}")
    _expect(op, "kv.vscale", kv.vscale, (B, H, kv.vcodes.shape[2], dv // kv.vgroup), _STAT_DTYPES, stat)
    _expect(op, "kv.vmin", kv.vmin, tuple(kv.vscale.shape), _STAT_DTYPES, stat)
    _expect(op, "kv.rk", kv.rk, (B, H, None, d), DTYPE_NAMES, f"one of {_DTYPES}")
    _expect(op, "kv.rv", kv.rv, (B, H, None, dv), DTYPE_NAMES, f"one of {_DTYPES}")
    _check_int(op, "kv.n", kv.n, 0)
    _check_int(op, "kv.nk", kv.nk, 0, kv.n)
    _check_int(op, "kv.nv", kv.nv, 0, kv.n)
    n, nk, nv = kv.n, kv.nk, kv.nv
    capk = min(kv.kcodes.shape[2] * pwk, kv.kscale.shape[2] * kv.kgroup)
    if nk % kv.kgroup or nk > capk:
        raise ValueError(f"{op}: kv.nk={nk} must be a multiple of kv.kgroup={kv.kgroup} and at most the "
                         f"quantized key capacity {capk}")
    if nv > kv.vcodes.shape[2]:
        raise ValueError(f"{op}: kv.nv={nv} exceeds the quantized value capacity {kv.vcodes.shape[2]}")
    if kv.rows is None:  # (with per-row counts, _check_rows checks them per row)
        _check_residual(op, kv, n - nk, n - nv)
    if kv.ok is not None:
        _expect(op, "kv.ok", kv.ok, (B, H, None), (torch.bool,), "torch.bool")
        if kv.ok.shape[2] < n:
            raise ValueError(f"{op}: kv.ok covers {kv.ok.shape[2]} slots, expected at least n = {n}")
    if kv.rows is not None:
        _check_rows(op, kv, B, q.device)
    pool = (kv.pool_k, kv.pool_v, kv.pool_ok)
    if any(t is None for t in pool) and not all(t is None for t in pool):
        raise ValueError(f"{op}: kv.pool_k, kv.pool_v and kv.pool_ok must be all tensors or all None")
    if kv.pool_k is not None:
        _expect(op, "kv.pool_k", kv.pool_k, (B, H, None, d), DTYPE_NAMES, f"one of {_DTYPES}")
        C = kv.pool_k.shape[2]
        _expect(op, "kv.pool_v", kv.pool_v, (B, H, C, dv), DTYPE_NAMES, f"one of {_DTYPES}")
        _expect(op, "kv.pool_ok", kv.pool_ok, (B, H, C), (torch.bool,), "torch.bool")
    tensors = [kv.kcodes, kv.kscale, kv.kmin, kv.vcodes, kv.vscale, kv.vmin, kv.rk, kv.rv, kv.ok, *pool]
    if any(t is not None and t.device != q.device for t in tensors):
        raise ValueError(f"{op}: every tensor of kv must be on q's device {q.device}")
    return B, Hq, H, d, dv


def _check_residual(op, kv, need_k, need_v, what=""):
    for name, t, need in (("kv.rk", kv.rk, need_k), ("kv.rv", kv.rv, need_v)):
        if t.shape[2] < need:
            raise ValueError(f"{op}: {name} holds {t.shape[2]} slots, expected at least "
                             f"n - n{name[-1]} = {need}{what}")


def _check_rows(op, kv, B, device):
    """Per-row counts (kv.rows, see kvfx.methods.quant_attention): shape, dtype, and every row's
    (n, nk, nv) within the store (a host read of B * 3 integers)."""
    _expect(op, "kv.rows", kv.rows, (B, 3), (torch.int32,), "torch.int32")
    if kv.rows.device != device:
        raise ValueError(f"{op}: every tensor of kv must be on q's device {device}")
    for b, (n, nk, nv) in enumerate(kv.rows.tolist()):
        if not (0 <= nk <= n <= kv.n and 0 <= nv <= n and nk <= kv.nk and nv <= kv.nv):
            raise ValueError(f"{op}: kv.rows[{b}] = (n={n}, nk={nk}, nv={nv}), expected 0 <= nk <= n <= "
                             f"kv.n = {kv.n}, nv <= n, nk <= kv.nk = {kv.nk}, nv <= kv.nv = {kv.nv}")
        if nk % kv.kgroup:
            raise ValueError(f"{op}: kv.rows[{b}] has nk={nk}, not a multiple of kv.kgroup={kv.kgroup}")
        _check_residual(op, kv, n - nk, n - nv, f" (row {b})")


def _strides(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


def quant_decode_attention(q, kv: QuantKV, *, scale, calib=None):
    """Attention of one query per sequence over a quantized store (KIVI + outlier pool), fused.

    q: (B, Hq, 1, d) fp32/fp16/bf16, d in HEAD_DIMS; kv: a QuantKV (layout in
    kvfx.methods.quant_attention) with Hkv heads, Hq a multiple of Hkv (query head h reads KV head
    h // (Hq // Hkv)), kgroup a power of two multiple of 32 // kbits, vgroup a power of two, the
    value dim in HEAD_DIMS, nk a multiple of kgroup; kv.rows (optional, (B, 3) int32): each row's
    own (n, nk, nv) (a left-padded batch), each nk a multiple of kgroup. scale: the logit scale
    (usually d ** -0.5).
    Returns o (B, Hq, 1, dv) in q's dtype and lse (B, Hq, 1) fp32, those of
    `quant_attention_reference`; a head that sees no slot gets o = 0, lse = -inf.
    calib: optional CaliDrop partition (o_e, lse_e, use) per query head: o_e (B, Hq, dv) and
    lse_e (B, Hq) float (cast to fp32), use (B, Hq) bool or integer (nonzero = use), e.g.
    `kvfx.methods.calidrop.lookup`'s. Where use holds, the evicted set's estimate is merged as one
    more partition of the split-K reduction (a `calibration=True` kernel: quantized slots,
    residual, outlier pool and calibration partition meet in one reduction), and o, lse are those
    of the union (`quant_attention_reference(..., calib=)`, i.e. `kvfx.methods.calidrop.merge` in
    fp32 before rounding); elsewhere they are bit for bit those without calib.
    The kernel unpacks codes in registers and never writes a dequantized copy of the cache.

    >>> from kvfx.methods.quant import quantize_keys, quantize_values
    >>> k, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    >>> qk, qv = quantize_keys(k[:, :, :32], 2, 32), quantize_values(v[:, :, :32], 4, 32)
    >>> kv = QuantKV(qk.codes, qk.scale, qk.min, qv.codes, qv.scale, qv.min, k[:, :, 32:],
    ...              v[:, :, 32:], None, None, None, None, 2, 32, 4, 32, n=40, nk=32, nv=32)
    >>> o, lse = quant_decode_attention(torch.randn(1, 4, 1, 64), kv, scale=0.125)
    >>> o.shape, lse.shape
    (torch.Size([1, 4, 1, 64]), torch.Size([1, 4, 1]))
    """
    op = "quant_decode_attention"
    B, Hq, H, d, dv = _check_quant_kv(op, q, kv)
    _check_scale(op, scale)
    if calib is not None:
        _check_calib(op, calib, q, dv)
    triton = _triton_for(op, q)
    if triton is None:
        return quant_attention_reference(q, kv, scale=float(scale), calib=calib)

    from kvfx.templates.render import load

    g = Hq // H
    n, nk, nv, C = kv.n, kv.nk, kv.nv, kv.pool_size
    has_pool = C > 0
    spec = KernelSpec("quant_decode_attention", DTYPE_NAMES[q.dtype], d, g, calibration=calib is not None,
                      key_bits=kv.kbits, key_group=kv.kgroup, value_bits=kv.vbits, value_group=kv.vgroup,
                      outlier_pool=has_pool)
    module = load(spec)
    block_g = max(16, 1 << (g - 1).bit_length())
    o = torch.empty((B, Hq, 1, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, 1), dtype=torch.float32, device=q.device)
    ok = kv.ok.view(torch.uint8) if kv.ok is not None else None
    pool_args, pool_strides, pool_size = (), (), ()
    if has_pool:
        pool_args = (kv.pool_k, kv.pool_v, kv.pool_ok.view(torch.uint8))
        pool_strides = tuple(s for t in pool_args for s in t.stride())
        pool_size = (C,)
    calib_ptrs, calib_strides = (), ()
    if calib is not None:
        o_e = calib[0].to(device=q.device, dtype=torch.float32)
        lse_e = calib[1].to(device=q.device, dtype=torch.float32)
        use = calib[2].to(q.device)
        use = use.view(torch.int8) if use.dtype == torch.bool else (use != 0).view(torch.int8)
        calib_ptrs = (o_e, lse_e, use)
        calib_strides = (*o_e.stride(), *lse_e.stride(), *use.stride())

    def run(cfg):
        splits = configs.decode_num_splits(max(n, 1), B * H, cfg.block_n)
        split_len = triton.cdiv(triton.cdiv(max(n, 1), splits), cfg.block_n) * cfg.block_n
        slot_splits = triton.cdiv(max(n, 1), split_len)
        parts = slot_splits + int(has_pool)
        o_part = torch.empty((B, Hq, parts, dv), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Hq, parts), dtype=torch.float32, device=q.device)
        module._kvfx_quant_decode_attention_kernel[(B * H, parts)](
            q, kv.kcodes, kv.kscale, kv.kmin, kv.vcodes, kv.vscale, kv.vmin, kv.rk, kv.rv,
            ok if ok is not None else q, kv.rows if kv.rows is not None else q, *pool_args, o_part, lse_part,
            q.stride(0), q.stride(1), q.stride(3),
            *kv.kcodes.stride(), *kv.kscale.stride(), *kv.kmin.stride(),
            *kv.vcodes.stride(), *kv.vscale.stride(), *kv.vmin.stride(), *kv.rk.stride(), *kv.rv.stride(),
            *_strides(ok, 3), *_strides(kv.rows, 2), *pool_strides, *o_part.stride(), *lse_part.stride(),
            H, n, nk, nv, *pool_size, slot_splits, split_len, float(scale),
            HEAD_DIM=d, HEAD_DIM_V=dv, GQA_GROUP=g, BLOCK_G=block_g, BLOCK_N=cfg.block_n,
            KBITS=kv.kbits, PWK=per_word(kv.kbits), KGROUP=kv.kgroup,
            VBITS=kv.vbits, PWV=per_word(kv.vbits), VGROUP=kv.vgroup, HAS_OK=ok is not None,
            HAS_ROWS=kv.rows is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        module._kvfx_quant_decode_attention_reduce_kernel[(B * Hq,)](
            o_part, lse_part, o, lse, *calib_ptrs,
            *o_part.stride(), *lse_part.stride(), o.stride(0), o.stride(1), o.stride(3),
            lse.stride(0), lse.stride(1), *calib_strides, Hq, parts,
            HEAD_DIM_V=dv, BLOCK_S=max(2, 1 << (parts - 1).bit_length()),
        )

    candidates = configs.prune_quant_decode(configs.QUANT_DECODE_CONFIGS, head_dim=d, head_dim_v=dv,
                                            slots=max(n, C))
    # [Note] keyed by the calibration=False spec: with and without calib the same config (the same
    # splits) runs, so heads with use = 0 stay bit for bit those of the plain kernel under autotuning.
    key = (dataclasses.replace(spec, calibration=False).uri, dv, max(n, C).bit_length(), B * H)
    with _device_ctx(q):
        cfg = configs.choose(key, candidates, lambda c: triton.testing.do_bench(lambda: run(c)))
        run(cfg)
    return o, lse


# --- quantize + pack ---------------------------------------------------------------------------

def _check_dense(op, name, x):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a 4-d (B, H, T, d) tensor, got {got}")
    if x.dtype not in DTYPE_NAMES:
        raise ValueError(f"{op}: {name} has dtype {x.dtype}, expected one of {_DTYPES}")
    _check_head_dim(op, "head_dim", x.shape[3])
    return tuple(x.shape)


def quant_compress_keys(k, bits, group, *, valid=None, n_out=0, norm="l1", stat_dtype=None):
    """Quantize and pack a flush of keys (KIVI, per channel over groups of ``group`` tokens), with
    outlier tokens tracing when ``n_out`` > 0.

    k: (B, H, T, d) fp32/fp16/bf16, d in HEAD_DIMS, T a multiple of ``group``; ``group`` a power of
    two multiple of 32 // bits. valid: optional bool (B, H, T) (broadcastable): invalid tokens never
    enter a range. n_out in [0, group - 1]: the smallest-``norm`` ("l1" | "l2") valid tokens per
    group leave it before its range is computed. Excluded slots (invalid or traced) keep the codes
    of their own value clamped into the range (``excluded="clamp"`` of the references).
    Returns what ``quantize_keys(k, bits, group, valid=valid, stat_dtype=stat_dtype,
    excluded="clamp")`` returns when n_out == 0, else ``quantize_keys_with_outliers(k, bits, group,
    n_out, norm, valid, stat_dtype=stat_dtype, excluded="clamp")`` ((qk, idx, keys)), bit for bit
    (see the template's [Note] for the one exception: outlier norms within fp32 round-off).

    >>> qk, idx, ko = quant_compress_keys(torch.randn(1, 2, 64, 64), 2, 32, n_out=1)
    >>> qk.codes.shape, idx.shape, ko.shape
    (torch.Size([1, 2, 4, 64]), torch.Size([1, 2, 2, 1]), torch.Size([1, 2, 2, 1, 64]))
    """
    op = "quant_compress_keys"
    B, H, T, d = _check_dense(op, "k", k)
    _check_bits(op, "bits", bits)
    pw = per_word(bits)
    _check_group(op, "group", group, pw, MAX_QUANT_GROUP, f"a multiple of 32 // bits = {pw}")
    if T % group:
        raise ValueError(f"{op}: k has T={T} tokens, not a multiple of group={group}; quantize whole "
                         "groups and keep the rest in the full-precision residual")
    _check_int(op, "n_out", n_out, 0, group - 1)
    if norm not in ("l1", "l2"):
        raise ValueError(f"{op}: norm got {norm!r}, expected one of 'l1', 'l2'")
    sd = qref._stat_dtype(k.dtype, stat_dtype)
    v = None if valid is None else qref._check_valid(valid, B, H, T)
    if v is not None and v.device != k.device:
        raise ValueError(f"{op}: valid is on {v.device}, expected k's device {k.device}")
    triton = _triton_for(op, k)
    if triton is None:
        if n_out == 0:
            return qref.quantize_keys(k, bits, group, valid=v, stat_dtype=sd, excluded="clamp")
        return qref.quantize_keys_with_outliers(k, bits, group, n_out, norm, v, stat_dtype=sd,
                                                excluded="clamp")

    from kvfx.templates.render import load

    nG = T // group
    spec = KernelSpec("quant_compress", DTYPE_NAMES[k.dtype], d, key_bits=bits, key_group=group,
                      outlier_norm=norm if n_out else "none")
    kernel = load(spec)._kvfx_quant_compress_keys_kernel
    dev = k.device
    codes = torch.empty((B, H, T // pw, d), dtype=torch.int32, device=dev)
    scale = torch.empty((B, H, nG, d), dtype=sd, device=dev)
    mn = torch.empty_like(scale)
    masked = torch.empty((B, H, T), dtype=torch.uint8, device=dev)
    vu8 = v.to(torch.uint8) if v is not None else None
    out_args, out_strides = (), ()
    if n_out:
        idx = torch.empty((B, H, nG, n_out), dtype=torch.int64, device=dev)
        keys = torch.empty((B, H, nG, n_out, d), dtype=k.dtype, device=dev)
        out_args, out_strides = (idx, keys), (*idx.stride(), *keys.stride())
    with _device_ctx(k):
        kernel[(B * H, nG)](
            k, vu8 if vu8 is not None else masked, codes, scale, mn, masked, *out_args,
            *k.stride(), *_strides(vu8, 3), *codes.stride(), *scale.stride(), *mn.stride(), *masked.stride(),
            *out_strides, H,
            HEAD_DIM=d, KBITS=bits, PER_WORD=pw, KGROUP=group, N_OUT=n_out, HAS_VALID=vu8 is not None,
            STAT_BITS=8 * sd.itemsize, num_warps=configs.quant_compress_warps(group * d),
        )
    _check_finite("k", scale, mn, sd)
    qk = qref.QuantizedKeys(codes, scale, mn, bits, group, k.dtype,
                            masked.view(torch.bool) if (v is not None or n_out) else None)
    return (qk, idx, keys) if n_out else qk


def quant_compress_values(v, bits, group, *, stat_dtype=None):
    """Quantize and pack values (KIVI, per token over groups of ``group`` channels).

    v: (B, H, T, d) fp32/fp16/bf16, d in HEAD_DIMS; ``group`` a power of two <= d. Returns
    ``quantize_values(v, bits, group, stat_dtype=stat_dtype)`` bit for bit.

    >>> qv = quant_compress_values(torch.randn(2, 4, 10, 64), 4, 32)
    >>> qv.codes.shape, qv.scale.shape
    (torch.Size([2, 4, 10, 8]), torch.Size([2, 4, 10, 2]))
    """
    op = "quant_compress_values"
    B, H, T, d = _check_dense(op, "v", v)
    _check_bits(op, "bits", bits)
    _check_group(op, "group", group, 1, d, f"at most the head dim {d}")
    sd = qref._stat_dtype(v.dtype, stat_dtype)
    triton = _triton_for(op, v)
    if triton is None:
        return qref.quantize_values(v, bits, group, stat_dtype=sd)

    from kvfx.templates.render import load

    pw = per_word(bits)
    spec = KernelSpec("quant_compress", DTYPE_NAMES[v.dtype], d, value_bits=bits, value_group=group)
    kernel = load(spec)._kvfx_quant_compress_values_kernel
    codes = torch.empty((B, H, T, d // pw), dtype=torch.int32, device=v.device)
    scale = torch.empty((B, H, T, d // group), dtype=sd, device=v.device)
    mn = torch.empty_like(scale)
    block_t = configs.quant_values_block(T, d)
    with _device_ctx(v):
        kernel[(B * H, triton.cdiv(T, block_t))](
            v, codes, scale, mn, *v.stride(), *codes.stride(), *scale.stride(), *mn.stride(), H, T,
            HEAD_DIM=d, VBITS=bits, PER_WORD=pw, VGROUP=group, BLOCK_T=block_t, STAT_BITS=8 * sd.itemsize,
            num_warps=configs.quant_compress_warps(block_t * d),
        )
    _check_finite("v", scale, mn, sd)
    return qref.QuantizedValues(codes, scale, mn, bits, group, v.dtype)
