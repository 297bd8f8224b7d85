"""Attention entry points: check arguments, then run the Triton kernel (CUDA tensors, or
`KVFX_FORCE_TRITON=1`, used with `TRITON_INTERPRET=1` by the CPU tests) or the PyTorch reference
of `kvfx.methods.attention` (every other device). Both paths share one semantics and the same
argument checks; triton is imported only when a kernel is launched.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import torch

from kvfx.methods import attention as ref
from kvfx.templates import configs
from kvfx.templates.spec import DTYPE_NAMES, HEAD_DIMS, MAX_GQA_GROUP, KernelSpec

_DTYPES = ", ".join(str(d) for d in DTYPE_NAMES)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_or_none(op: str):
    """The triton module when a kernel should run, else None (reference path)."""
    forced = os.environ.get("KVFX_FORCE_TRITON") == "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        if forced:
            raise RuntimeError(f"{op}: KVFX_FORCE_TRITON=1 but triton is not importable; "
                               "install it with `pip install kvfx[triton]`") from None
        return None
    return triton


def _check_common(op, q, k, v, q_shape_doc, kv_shape_doc):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            doc = q_shape_doc if name == "q" else kv_shape_doc
            raise ValueError(f"{op}: {name} must be a 4-d tensor {doc}, got {got}")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected one of {_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v devices differ ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; expected equal")
    B, Hq, _, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"{op}: k has shape {tuple(k.shape)}, expected (B={B}, Hkv, n, d={d}) to match q")
    if d not in HEAD_DIMS:
        raise ValueError(f"{op}: head_dim {d} not supported, expected one of {', '.join(map(str, HEAD_DIMS))}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0 or Hq // Hkv > MAX_GQA_GROUP:
        raise ValueError(f"{op}: q has {Hq} heads and k has {Hkv}; expected Hq a multiple of Hkv "
                         f"with Hq // Hkv <= {MAX_GQA_GROUP}")


def _check_scale(op, scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite Python float, got {scale!r}")


def _dot_fp32(q) -> bool:
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584).
    return q.dtype == torch.bfloat16 and _interpreting()


def _softcap_constexpr(softcap) -> float:
    """The kernels' SOFTCAP constexpr: the cap as a float, 0.0 for none (that branch compiles away)."""
    return 0.0 if softcap is None else float(softcap)


def _device_ctx(q):
    return torch.cuda.device(q.device) if q.is_cuda else _Null()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _warn_no_triton(op):
    warnings.warn(f"{op}: triton is not importable; running the PyTorch reference on CUDA", stacklevel=3)


def prefill_attention(q, k, v, *, scale, causal=True, kv_start=None, scores="none", window=32, softcap=None):
    """Attention of every prompt query over the prompt's keys, with GQA and left padding, and
    optionally the eviction scores of SnapKV, H2O or TOVA from the same kernel.

    q: (B, Hq, n_q, d); k, v: (B, Hkv, n_k, d), Hq a multiple of Hkv (query head h reads KV head
    h // (Hq // Hkv)); any strides; dtype fp32, fp16 or bf16 (all three equal); d in HEAD_DIMS.
    scale: logit scale (usually d ** -0.5). causal: query i sees key j iff j <= i + n_k - n_q.
    kv_start: optional (B,) integer tensor, keys j < kv_start[b] are masked (left padding).
    scores: "none" | "window_colsum" | "colsum" | "last_row" | "window_logits"; with P[i, j] the
        attention probabilities, the side output is Σ_{i in the last min(window, n_q) rows} P[i, j]
        (SnapKV votes), Σ_i P[i, j] (H2O column sums), P[n_q - 1, j] (TOVA), or the logits
        s_ij = scale·q_i·k_j themselves of the last w = min(window, n_q) rows, -inf where not
        visible (SnapKV/TOVA scores and CaliDrop's prompt statistics from one set of logits). Only
        query rows i with i + n_k - n_q >= kv_start[b] vote (left-pad rows never do; their logit
        rows are all -inf). window: an int >= 1, read by window_colsum and window_logits (a
        runtime kernel argument: no recompile per window).
    softcap: None, or a finite float > 0: soft-capped logits s_ij = softcap * tanh(scale·q_i·k_j /
        softcap) (Gemma-2), before the mask; o, lse and the scores (window_logits: the capped
        logits) are those of the capped logits. The kernel's SOFTCAP constexpr (one compile per cap).
    Returns o (B, Hq, n_q, d) in q's dtype and lse (B, Hq, n_q) fp32 (natural log); rows that
    see no key have o = 0 and lse = -inf. With scores != "none", also scores (B, Hq, n_k) fp32,
    0 at masked keys (window_logits: (B, Hq, w, n_k) fp32, -inf at masked keys). The kernel accumulates scores with fp32 atomics: colsum (and windows wider
    than a query block) may differ between runs in the last bits; see the template's [Note].

    >>> q = torch.randn(2, 4, 10, 64); k = v = torch.randn(2, 2, 10, 64)
    >>> o, lse = prefill_attention(q, k, v, scale=0.125, kv_start=torch.tensor([0, 3]))
    >>> o.shape, lse.shape
    (torch.Size([2, 4, 10, 64]), torch.Size([2, 4, 10]))
    >>> o, lse, votes = prefill_attention(q, k, v, scale=0.125, scores="window_colsum", window=4)
    >>> votes.shape, round(float(votes[0, 0].sum()), 3)   # 4 window rows, each sums to 1
    (torch.Size([2, 4, 10]), 4.0)
    """
    op = "prefill_attention"
    _check_common(op, q, k, v, "(B, Hq, n_q, d)", "(B, Hkv, n_k, d)")
    _check_scale(op, scale)
    ref.check_score_args(op, scores, window)
    ref.check_softcap(op, softcap)
    B, Hq, n_q, d = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor) or tuple(kv_start.shape) != (B,) \
                or kv_start.dtype.is_floating_point or kv_start.dtype == torch.bool:
            got = (tuple(kv_start.shape), kv_start.dtype) if isinstance(kv_start, torch.Tensor) else kv_start
            raise ValueError(f"{op}: kv_start must be an integer tensor of shape (B,) = ({B},), got {got}")
    use_kernel = q.is_cuda or os.environ.get("KVFX_FORCE_TRITON") == "1"
    triton = _triton_or_none(op) if use_kernel else None
    if triton is None or min(B, Hq, n_q, n_k) == 0:
        if use_kernel and triton is None:
            _warn_no_triton(op)
        return ref.prefill_attention_reference(q, k, v, scale=scale, causal=causal, kv_start=kv_start,
                                               scores=scores, window=window, softcap=softcap)

    from kvfx.templates.render import load

    spec = KernelSpec("prefill_attention", DTYPE_NAMES[q.dtype], d, Hq // Hkv, bool(causal), scores)
    kernel = load(spec)._kvfx_prefill_attention_kernel
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, n_q), dtype=torch.float32, device=q.device)
    starts = kv_start.to(device=q.device, dtype=torch.int32).contiguous() if kv_start is not None else None
    out_scores = None

    def run(cfg):
        nonlocal out_scores
        score_args, window_args = (), ()
        if scores == "window_logits":
            # -inf on every launch: key blocks a program skips (causal, kv_start) stay masked.
            out_scores = torch.full((B, Hq, min(window, n_q), n_k), float("-inf"), dtype=torch.float32,
                                    device=q.device)
            score_args = (out_scores, *out_scores.stride())
        elif scores != "none":
            # Zeroed on every launch (autotuning relaunches): the kernel atomically adds into it.
            out_scores = torch.zeros((B, Hq, n_k), dtype=torch.float32, device=q.device)
            score_args = (out_scores, *out_scores.stride())
        if scores in ("window_colsum", "window_logits"):
            window_args = (min(window, n_q),)
        grid = (triton.cdiv(n_q, cfg.block_m), B * Hq)
        kernel[grid](
            q, k, v, o, lse, starts if starts is not None else lse, *score_args[:1],
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(), *score_args[1:],
            n_q, n_k, Hq, float(scale), *window_args,
            HEAD_DIM=d, GQA_GROUP=Hq // Hkv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            HAS_KV_START=starts is not None, DOT_FP32=_dot_fp32(q), SOFTCAP=_softcap_constexpr(softcap),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    candidates = configs.prune_prefill(configs.PREFILL_CONFIGS, head_dim=d, dtype=spec.dtype, n_q=n_q, n_k=n_k)
    key = (spec.uri, n_q.bit_length(), n_k.bit_length(), B * Hq)
    with _device_ctx(q):
        cfg = configs.choose(key, candidates, lambda c: triton.testing.do_bench(lambda: run(c)))
        run(cfg)
    return (o, lse) if scores == "none" else (o, lse, out_scores)


def _check_calib(op, calib, q, dv=None):
    """calib = (o_e (B, Hq, dv) float, lse_e (B, Hq) float, use (B, Hq) bool or integer); dv is
    the value dim (default: q's head dim)."""
    B, Hq, _, d = q.shape
    d = d if dv is None else dv
    if not isinstance(calib, (tuple, list)) or len(calib) != 3 \
            or not all(isinstance(t, torch.Tensor) for t in calib):
        raise ValueError(f"{op}: calib must be a tuple (o_e, lse_e, use) of tensors, "
                         f"got {type(calib).__name__}")
    o_e, lse_e, use = calib
    want = (("o_e", o_e, (B, Hq, d), "float"), ("lse_e", lse_e, (B, Hq), "float"),
            ("use", use, (B, Hq), "bool or integer"))
    for name, t, shape, kind in want:
        ok_dtype = t.dtype.is_floating_point if kind == "float" else not t.dtype.is_floating_point
        if tuple(t.shape) != shape or not ok_dtype or t.is_complex():
            raise ValueError(f"{op}: calib {name} must be a {kind} tensor of shape {shape}, got "
                             f"{tuple(t.shape)} {t.dtype}")


def decode_attention(q, k, v, lengths, *, scale, bias=None, return_probs=False, calib=None, softcap=None):
    """One new query per sequence over a fixed-capacity KV store (split-K, GQA).

    q: (B, Hq, 1, d); k, v: (B, Hkv, cap, d) the store, Hq a multiple of Hkv; dtype fp32, fp16 or
    bf16 (all equal); d in HEAD_DIMS. lengths: (B, Hkv) integer, slots [0, lengths[b, h]) are
    valid (clamped to [0, cap]; never read back to the host). bias: optional additive (B, 1, cap)
    or (B, Hkv, cap), cast to fp32, added to the scaled logits (-inf masks a slot).
    return_probs: also return the attention probabilities over the store slots (what H2O adds up
        and TOVA ranks at decode), from a third, elementwise kernel that normalizes the logits
        stage 1 stored once stage 2 knows the final lse (K and V are still read once).
    Returns o (B, Hq, 1, d) in q's dtype and lse (B, Hq, 1) fp32 (natural log); a head with no
    valid slot gets o = 0, lse = -inf. With return_probs, also probs (B, Hq, cap) fp32: 0 at
    slots >= lengths[b, h // g] and at -inf bias, all 0 for a head with no valid slot.
    calib: optional CaliDrop partition (o_e, lse_e, use) per query head: o_e (B, Hq, d) and
        lse_e (B, Hq) float (cast to fp32), use (B, Hq) bool or integer (nonzero = use), e.g.
        `kvfx.methods.calidrop.lookup`'s. Where use holds, the evicted set's estimate is merged
        as one more partition of the split-K reduction (a `calibration=True` kernel), and o, lse
        are those of the union; elsewhere they are bit for bit those without calib. probs stay
        normalized over the store slots.
    softcap: None, or a finite float > 0: soft-capped logits s_j = softcap * tanh(scale·q·k_j /
        softcap) + bias (Gemma-2; the cap before the bias and the mask); o, lse and probs are those
        of the capped logits. The kernel's SOFTCAP constexpr (one compile per cap).
    The number of splits comes from configs.decode_num_splits.

    >>> q = torch.randn(2, 4, 1, 64); k = v = torch.randn(2, 2, 32, 64)
    >>> lengths = torch.tensor([[5, 32], [0, 17]], dtype=torch.int32)
    >>> o, lse = decode_attention(q, k, v, lengths, scale=0.125)
    >>> o.shape, lse.shape
    (torch.Size([2, 4, 1, 64]), torch.Size([2, 4, 1]))
    >>> probs = decode_attention(q, k, v, lengths, scale=0.125, return_probs=True)[2]
    >>> probs.shape, round(float(probs[0, 0].sum()), 3), float(probs[0, 0, 5:].abs().sum())
    (torch.Size([2, 4, 32]), 1.0, 0.0)
    """
    op = "decode_attention"
    _check_common(op, q, k, v, "(B, Hq, 1, d)", "(B, Hkv, cap, d)")
    _check_scale(op, scale)
    B, Hq, n_q, d = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    if n_q != 1:
        raise ValueError(f"{op}: q has {n_q} queries per sequence (shape {tuple(q.shape)}), expected 1")
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B, Hkv) \
            or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        got = (tuple(lengths.shape), lengths.dtype) if isinstance(lengths, torch.Tensor) else lengths
        raise ValueError(f"{op}: lengths must be an integer tensor of shape (B, Hkv) = ({B}, {Hkv}), got {got}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 3 or bias.shape[0] != B \
                or bias.shape[1] not in (1, Hkv) or bias.shape[2] != cap or not bias.dtype.is_floating_point:
            got = (tuple(bias.shape), bias.dtype) if isinstance(bias, torch.Tensor) else bias
            raise ValueError(f"{op}: bias must be a float tensor of shape (B, 1, cap) or (B, Hkv, cap) "
                             f"= ({B}, 1 or {Hkv}, {cap}), got {got}")
    if type(return_probs) is not bool:
        raise ValueError(f"{op}: return_probs got {return_probs!r}, expected True or False")
    if calib is not None:
        _check_calib(op, calib, q)
    ref.check_softcap(op, softcap)
    use_kernel = q.is_cuda or os.environ.get("KVFX_FORCE_TRITON") == "1"
    triton = _triton_or_none(op) if use_kernel else None
    if triton is None or min(B, Hq, cap) == 0:
        if use_kernel and triton is None:
            _warn_no_triton(op)
        return ref.decode_attention_reference(q, k, v, lengths, scale=scale, bias=bias,
                                              return_probs=return_probs, calib=calib, softcap=softcap)

    from kvfx.templates.render import load

    g = Hq // Hkv
    spec = KernelSpec("decode_attention", DTYPE_NAMES[q.dtype], d, g,
                      scores="last_row" if return_probs else "none", calibration=calib is not None)
    module = load(spec)
    block_g = max(16, 1 << (g - 1).bit_length())
    lens = lengths.to(device=q.device, dtype=torch.int32)
    b = bias.to(device=q.device, dtype=torch.float32) if bias is not None else None
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, 1), dtype=torch.float32, device=q.device)
    # Stage 1 writes the logits of valid slots into probs, stage 3 normalizes them in place.
    probs = torch.empty((B, Hq, cap), dtype=torch.float32, device=q.device) if return_probs else None
    probs_args = (probs, *probs.stride()) if return_probs else ()
    calib_ptrs, calib_strides, lse_c = (), (), lse
    if calib is not None:
        o_e = calib[0].to(device=q.device, dtype=torch.float32)
        lse_e = calib[1].to(device=q.device, dtype=torch.float32)
        use = calib[2].to(q.device)
        use = use.view(torch.int8) if use.dtype == torch.bool else (use != 0).view(torch.int8)
        # With probs, stage 2 also writes the store-only lse (LSE_C) that stage 3 normalizes by.
        lse_c = torch.empty_like(lse) if return_probs else lse
        calib_ptrs = (o_e, lse_e, use) + ((lse_c,) if return_probs else ())
        calib_strides = (*o_e.stride(), *lse_e.stride(), *use.stride())

    def run(cfg):
        splits = configs.decode_num_splits(cap, B * Hkv, cfg.block_n)
        split_len = triton.cdiv(triton.cdiv(cap, splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(cap, split_len)
        o_part = torch.empty((B, Hq, splits, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
        bias_strides = (b.stride(0), b.stride(1) if b.shape[1] > 1 else 0, b.stride(2)) if b is not None else (0, 0, 0)
        module._kvfx_decode_attention_kernel[(B * Hkv, splits)](
            q, k, v, lens, b if b is not None else lse, o_part, lse_part, *probs_args[:1],
            q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *lens.stride(),
            *bias_strides, *o_part.stride(), *lse_part.stride(), *probs_args[1:],
            Hkv, cap, split_len, float(scale),
            HEAD_DIM=d, GQA_GROUP=g, BLOCK_G=block_g, BLOCK_N=cfg.block_n,
            HAS_BIAS=b is not None, DOT_FP32=_dot_fp32(q), SOFTCAP=_softcap_constexpr(softcap),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        module._kvfx_decode_attention_reduce_kernel[(B * Hq,)](
            o_part, lse_part, o, lse, *calib_ptrs,
            *o_part.stride(), *lse_part.stride(), o.stride(0), o.stride(1), o.stride(3),
            lse.stride(0), lse.stride(1), *calib_strides,
            Hq, splits,
            HEAD_DIM=d, BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
        )
        if return_probs:
            block_p = configs.decode_probs_block(cap)
            module._kvfx_decode_attention_probs_kernel[(B * Hq, triton.cdiv(cap, block_p))](
                probs, lse_c, lens, *probs.stride(), lse_c.stride(0), lse_c.stride(1), *lens.stride(),
                Hq, cap, GQA_GROUP=g, BLOCK_P=block_p,
            )

    candidates = configs.prune_decode(configs.DECODE_CONFIGS, head_dim=d, dtype=spec.dtype, block_g=block_g, cap=cap)
    # keyed by the calibration=False spec: calibrated and plain launches pick the same config,
    # so use=0 stays bit-identical to the plain kernel under KVFX_AUTOTUNE=1 too
    key = (dataclasses.replace(spec, calibration=False).uri, cap.bit_length(), B * Hkv)
    with _device_ctx(q):
        cfg = configs.choose(key, candidates, lambda c: triton.testing.do_bench(lambda: run(c)))
        run(cfg)
    return (o, lse) if not return_probs else (o, lse, probs)
