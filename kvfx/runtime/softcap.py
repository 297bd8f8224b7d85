"""Soft-capped attention (Gemma-2's ``attn_logit_softcapping``): ``softmax(cap * tanh(s / cap) + mask)``
with ``s = scale * q·kᵀ``.

A site whose logits are soft-capped (:attr:`kvfx.passes.find_attention.AttentionMatch.softcap`)
runs the same lifecycle as every site (:mod:`kvfx.runtime.lifecycle`: exact prefill, then the
compressor writes what it keeps; decode appends, attends, finishes the step) with the cap applied
wherever logits are formed. The attention itself makes the runtime's one kernel-or-reference
decision (:func:`kvfx.runtime.attention.prefill_kernel_applies`,
:func:`~kvfx.runtime.attention.decode_kernel_applies`): where it picks a kernel (CUDA; a causal
prompt without a mask; one decode query, its mask over the store as the kernel's bias) the dense Triton prefill or
decode kernel runs with the cap (their ``SOFTCAP`` constexpr, :mod:`kvfx.templates.launch`);
everywhere else, and always on CPU, :func:`capped_attention` below, the PyTorch reference.
Supported stores: the dense store (``full`` and eviction policies; H2O/TOVA read the capped
probabilities, from the decode kernel's probabilities on the kernel path). Quantized (``quant:``),
low-rank (``lowrank:``), calibrated (``calibration:``) and head-wise ragged (AdaKV) layer policies
read logits inside their own stores and kernels, which take no cap: the passes refuse them on a
capped site at compile time (:func:`check_policy`). Prompt-time eviction scorers (SnapKV,
PyramidKV, ...) score the uncapped logits on every device (the prefill kernel could fuse capped
scores, but is asked for none here, so CPU and CUDA select the same tokens): the cap is a monotone
map of each logit, so their rankings per query are unchanged, but their summed probabilities are
not the capped ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.runtime.attention import (_store_mask, decode_kernel_applies, kernel_bias, key_valid,
                                    prefill_kernel_applies)


def capped_attention(q: Tensor, k: Tensor, v: Tensor, keep, *, scale: float | None, softcap: float,
                     is_causal: bool = False, with_probs: bool = False):
    """Reference soft-capped attention, as Hugging Face's eager attention computes it (fp32
    softmax). ``keep``: a boolean (True = attend) or additive mask broadcastable to (B, Hq, nq, n),
    or None. Returns (out in q's dtype, fp32 probs or None)."""
    from kvfx.methods.scoring import expand_kv

    sm = scale if scale is not None else q.shape[-1] ** -0.5
    kx, vx = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    logits = torch.matmul(q, kx.transpose(-1, -2)) * sm
    logits = torch.tanh(logits / softcap) * softcap
    if is_causal and q.shape[2] > 1:
        nq, n = q.shape[2], k.shape[2]
        causal = torch.ones(nq, n, dtype=torch.bool, device=q.device).tril(diagonal=0)
        keep = causal if keep is None else (keep & causal if keep.dtype == torch.bool
                                            else keep.masked_fill(~causal, float("-inf")))
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf")) if keep.dtype == torch.bool else logits + keep
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(v.dtype), vx)
    return out, (probs if with_probs else None)


def check_policy(compressor) -> str:
    """'' if ``compressor`` can run on a soft-capped site, else what it asks for that cannot."""
    if getattr(compressor, "lowrank", False):
        return "a low-rank (lowrank:) store"
    if getattr(compressor, "quant", None) is not None:
        return "a quantized (quant:) store"
    if getattr(compressor, "calib", None) is not None:
        return "calibration (calibration:)"
    if getattr(compressor, "ragged", False):
        return "a head-wise ragged store (budget.allocation: adaptive)"
    return ""


def _prefill(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, is_causal: bool,
             softcap: float) -> Tensor:
    """The prompt's own capped attention: the prefill kernel with the cap where it applies, else the
    reference. No fused scores (the scorers score uncapped logits on every device)."""
    if prefill_kernel_applies(q, k, mask, is_causal):
        from kvfx.templates.launch import prefill_attention as kernel

        sm = scale if scale is not None else q.shape[-1] ** -0.5
        return kernel(q, k, v, scale=sm, causal=True, softcap=softcap)[0]
    return capped_attention(q, k, v, mask, scale=scale, softcap=softcap, is_causal=is_causal)[0]


def _read(store, q: Tensor, keep, scale: float | None, softcap: float, with_probs: bool, mask=None):
    """Capped attention of q over the store's held slots (``keep``: :func:`_store_mask`'s): the dense
    decode kernel with the cap where it applies, else the reference. Returns (out, probs
    (B, Hq, nq, n) fp32 or None)."""
    n = store.length
    k, v = store.k[:, :, :n], store.v[:, :, :n]
    if decode_kernel_applies(q, k, keep, mask):
        from kvfx.templates.launch import decode_attention as kernel

        sm = scale if scale is not None else q.shape[-1] ** -0.5
        res = kernel(q, k, v, store.count.to(torch.int32), scale=sm, return_probs=with_probs, softcap=softcap,
                     bias=kernel_bias(keep, q.shape[1] // store.kv_heads))
        return res[0], (res[2][:, :, None, :] if with_probs else None)
    return capped_attention(q, k, v, keep, scale=scale, softcap=softcap, with_probs=with_probs)


def capped_site_attention(c, store, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, past_len: int,
                          scale: float | None, is_causal: bool, softcap: float, where: str = "") -> Tensor:
    """:func:`kvfx.runtime.ops.site_attention` for a soft-capped site (dense store)."""
    from kvfx.runtime.lifecycle import check_continues

    B, _, nq, _ = q.shape
    if past_len == 0:
        store.reset()
        out = _prefill(q, k, v, mask, scale, is_causal, softcap)
        with torch.no_grad():
            c.prefill(store, q, k, v, key_valid(mask, B, nq, q.device), scale, None)
        store.seen = nq
        return out.contiguous()
    check_continues(store, past_len, B, where)
    with torch.no_grad():
        store.append(k, v, torch.arange(past_len, past_len + nq, device=q.device))
        g = q.shape[1] // store.kv_heads
        keep = _store_mask(store, mask, is_causal, nq, past_len, g)
        out, probs = _read(store, q, keep, scale, softcap, c.needs_probs, mask)
        store.finish_step(c, nq, probs)
    store.seen += nq
    return out.contiguous()


__all__ = ["capped_attention", "capped_site_attention", "check_policy"]
