"""Attention of a rewritten site over its kvfx store.

Coordinates: the model still believes it holds every token (its cache holds a zero-byte
"ghost" of the right length), so its attention mask has one column per *logical* position.
Each store slot remembers its logical position, so the mask column of a slot is gathered
from the model's mask: any mask the model builds (padding, causal, sliding, bias) is applied
exactly to the tokens that are kept.

Prefill (the model's cache was empty): attention runs on the full-precision prompt exactly as
the model asked (same call, same arguments), then the compressor writes what it keeps.
Decode: the new tokens are appended, attention reads the store, then the store is evicted down
to its rolling cap if the policy has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvfx.methods.attention import grouped_attention_reference
from kvfx.methods.ragged_attention import ragged_decode_reference
from kvfx.methods.scoring import default_scale
from kvfx.runtime.state import KvfxStateError


def _mask4(mask: torch.Tensor, B: int, nq: int, L: int) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[-1] != L or mask.shape[-2] not in (1, nq):
        raise KvfxStateError(
            f"kvfx: attention mask of shape {tuple(mask.shape)} does not cover the {L} logical "
            f"key positions for {nq} queries; kvfx cannot map it onto its store")
    return mask.expand(B, mask.shape[1], nq, L)


def key_valid(mask: torch.Tensor | None, B: int, n: int, device) -> torch.Tensor:
    """(B, n) bool: keys the last query may see. For causal decoders these are exactly the
    non-pad tokens, so pads are never kept."""
    if mask is None:
        return torch.ones(B, n, dtype=torch.bool, device=device)
    m = _mask4(mask, B, n, n)[:, :, -1, :]
    ok = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return ok.any(dim=1)


def _store_mask(store, mask: torch.Tensor | None, is_causal: bool, nq: int,
                past_len: int, g: int) -> torch.Tensor | None:
    """Mask (B, Hq, nq, n) over the store slots, or None if every slot is visible to every
    query (see :func:`positions_mask`)."""
    if mask is None and not store.ragged and not (is_causal and nq > 1):
        return None
    return positions_mask(store.pos[:, :, :store.length], mask, is_causal, nq, past_len, g)


def positions_mask(pos: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, nq: int,
                   past_len: int, g: int) -> torch.Tensor:
    """Mask (B, Hq, nq, N) over keys at logical positions ``pos`` (B, Hkv, N) (-1: no key).

    Boolean masks stay boolean (True = attend); additive float masks are gathered with their
    values, so biases (ALiBi-style) apply exactly; keys at -1 get -inf. Slots of a SiteStore
    past a row's count hold -1, so this is also the store's validity mask."""
    B, H, n = pos.shape
    dev = pos.device
    keep = (pos >= 0)[:, :, None, :].expand(B, H, nq, n)
    if is_causal and nq > 1:  # SDPA's is_causal is top-left aligned over the logical keys
        keep = keep & (pos[:, :, None, :] <= torch.arange(nq, device=dev)[None, None, :, None])
    if g > 1:
        keep = keep.repeat_interleave(g, dim=1)
    if mask is None:
        return keep
    m4 = _mask4(mask, B, nq, past_len + nq)
    if m4.shape[1] not in (1, H * g):
        raise KvfxStateError(f"kvfx: attention mask with {m4.shape[1]} heads for {H * g} "
                             "query heads cannot be mapped onto the store")
    qpos = pos.clamp(min=0).repeat_interleave(g, dim=1) if g > 1 else pos.clamp(min=0)
    m4 = m4.expand(B, H * g, nq, m4.shape[-1])
    col = m4.gather(-1, qpos[:, :, None, :].expand(B, H * g, nq, n))
    if col.dtype == torch.bool:
        return keep & col
    return col.masked_fill(~keep, float("-inf"))


def sdpa(q, k, v, attn_mask, *, scale, is_causal=False):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=g > 1)


QUERY_BLOCK = 256  # queries per block of a prompt chunk's read (decode_attention)


def decode_attention(store, q: torch.Tensor, mask, is_causal: bool, past_len: int,
                     scale: float | None, with_probs: bool = False):
    """Attention of q (B, Hq, nq, d) over the store's first ``length`` slots.

    Returns (out (B, Hq, nq, dv), probs (B, Hq, nq, n) fp32 or None; ``with_probs``: H2O/TOVA
    read them). One decision (:func:`_use_kernel`): CUDA runs the Triton split-K decode kernel
    (one query, no mask); everything else runs the ``methods/`` reference of the same semantics,
    :func:`kvfx.methods.attention.grouped_attention_reference` (DESIGN rule 5: one semantics,
    two executions). That reference reads each KV head once for its whole query group (no
    expanded copy of the cache under GQA) and reads fp32 stores in place, which keeps kvfx
    ``full`` near inductor's decode on CPU (README, "core v2" bench). Quantized stores run their
    own reference (:mod:`kvfx.runtime.qstore`; its reductions compiled on CPU,
    :mod:`kvfx.runtime.cpu_fused`).

    A prompt chunk (many queries) runs in blocks of :data:`QUERY_BLOCK` queries, so no
    (queries x slots) mask or score matrix of the whole chunk exists at once (chunked prefill
    bounds peak memory)."""
    nq = q.shape[2]
    if nq > QUERY_BLOCK and not with_probs and not is_causal and (mask is None or mask.shape[-2] in (1, nq)):
        outs = []
        for a in range(0, nq, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, nq)
            mb = mask if mask is None or mask.shape[-2] == 1 else mask[..., a:b, :]
            # the block's mask still covers all past_len + nq logical keys
            outs.append(decode_attention(store, q[:, :, a:b], mb, False, past_len + nq - (b - a), scale)[0])
        return torch.cat(outs, dim=2), None
    n = store.length
    g = q.shape[1] // store.kv_heads
    keep = _store_mask(store, mask, is_causal, q.shape[2], past_len, g)
    k, v = store.k[:, :, :n], store.v[:, :, :n]
    if decode_kernel_applies(q, k, keep, mask):
        from kvfx.templates.launch import decode_attention as kernel

        sm = scale if scale is not None else q.shape[-1] ** -0.5
        res = kernel(q, k, v, store.count.to(torch.int32), scale=sm, bias=kernel_bias(keep, g),
                     return_probs=with_probs)
        return res[0], (res[2][:, :, None, :] if with_probs else None)
    o, _, probs = grouped_attention_reference(q, k, v, scale=default_scale(q, scale), keep=keep,
                                              return_probs=with_probs)
    return o, probs


def ragged_decode_attention(store, q: torch.Tensor, mask, is_causal: bool, past_len: int,
                            scale: float | None, return_lse: bool = False, with_probs: bool = False):
    """Attention of q (B, Hq, nq, d) over a head-wise ragged store
    (:class:`kvfx.runtime.ragged.RaggedStore`): each KV head reads its own segment of the pool.
    One decision (:func:`_use_kernel`): the Triton ``ragged_decode_attention`` kernel for one
    query without a mask (it reads the pool in place); else the ``methods/`` reference
    :func:`kvfx.methods.ragged_attention.ragged_decode_reference` with the model's mask gathered
    at each slot's logical position (:func:`positions_mask`). Returns out (B, Hq, nq, dv), or
    (out, lse (B, Hq, nq) fp32) with ``return_lse``; ``with_probs`` (H2O, TOVA: rolling eviction
    per head) runs the reference and returns (out, lse or None, probs (B, Hq, nq, length) fp32),
    probabilities over each segment's slots padded to ``store.length`` (0 past a segment's count)."""
    nq, d = q.shape[2], q.shape[-1]
    sm = default_scale(q, scale)
    if not with_probs and mask is None and nq == 1 and store.k.dtype == q.dtype and \
            _use_kernel(q, q.new_empty(1, store.kv_heads, 0, d)):
        from kvfx.templates.launch_ragged import ragged_decode_attention as kernel

        o, lse = kernel(q, store.k, store.v, store.start, store.count, scale=sm, length=store.length)
        return (o, lse) if return_lse else o
    g = q.shape[1] // store.kv_heads
    keep = None
    if mask is not None or (is_causal and nq > 1):
        keep = positions_mask(store.positions(), mask, is_causal, nq, past_len, g)
    o, lse, probs = ragged_decode_reference(q, store.k, store.v, store.start, store.count, scale=sm,
                                            length=store.length, keep=keep, return_lse=return_lse,
                                            return_probs=with_probs)
    if with_probs:
        return o, lse, probs
    return (o, lse) if return_lse else o


def _use_kernel(q: torch.Tensor, k: torch.Tensor | None = None) -> bool:
    """CUDA runs the Triton kernels where they support the shapes; ``KVFX_FORCE_TRITON=1``
    (with ``TRITON_INTERPRET=1``) routes CPU runs through them too, which the tests use to
    check the wiring. Everything else runs the PyTorch reference (SDPA for dense stores; for
    quantized stores the reference, its reductions compiled by inductor from 1024 quantized
    slots: :func:`kvfx.runtime.cpu_fused.use_compiled`)."""
    import os

    if not (q.is_cuda or os.environ.get("KVFX_FORCE_TRITON") == "1"):
        return False
    from kvfx.templates.spec import DTYPE_NAMES, HEAD_DIMS, MAX_GQA_GROUP

    g = q.shape[1] // (k.shape[1] if k is not None else q.shape[1])
    return q.dtype in DTYPE_NAMES and q.shape[-1] in HEAD_DIMS and g <= MAX_GQA_GROUP


def decode_kernel_applies(q: torch.Tensor, k: torch.Tensor, keep, mask=None) -> bool:
    """The dense decode kernel reads a store for q (B, Hq, nq, d) over k (the store's held slots):
    one query and :func:`_use_kernel`. A mask over the slots (``keep``, :func:`_store_mask`'s) goes
    to the kernel as an additive bias per KV head (:func:`kernel_bias`), which holds when the
    model's ``mask`` is the same for every query head (one head, or broadcast: padding, causal,
    sliding-window masks); a mask per query head (a per-head bias) runs the reference. Shared by
    every dense read (plain, calibrated, soft-capped)."""
    if q.shape[2] != 1 or not _use_kernel(q, k):
        return False
    return keep is None or mask is None or mask.dim() < 4 or mask.shape[1] == 1


def kernel_bias(keep, g: int):
    """The decode kernel's bias (B, Hkv, n) fp32 for ``keep`` (B, Hq, 1, n) over the store slots
    (None: no mask). ``keep`` comes from positions per KV head repeated over its ``g`` query heads
    and a mask shared by the query heads (:func:`decode_kernel_applies`), so each group's rows are
    equal and the first one is taken. Boolean: 0 or -inf; float: its values."""
    if keep is None:
        return None
    kk = keep[:, ::g, 0, :]
    if kk.dtype == torch.bool:
        return torch.zeros(kk.shape, dtype=torch.float32, device=kk.device).masked_fill(~kk, float("-inf"))
    return kk.float()


def prefill_kernel_applies(q: torch.Tensor, k: torch.Tensor, mask, is_causal: bool) -> bool:
    """The prefill kernel runs a prompt's own attention: causal, no explicit mask, as many queries as
    keys, and :func:`_use_kernel`. Shared by the plain and the soft-capped prefill."""
    return mask is None and is_causal and q.shape[2] == k.shape[2] and _use_kernel(q, k)


def prefill_attention(q, k, v, mask, *, scale, is_causal, scores: str = "none", window: int = 32):
    """The prompt's own attention, exactly as the model called it: the Triton prefill kernel
    when it applies (causal, no explicit mask, CUDA), with the eviction scores the compressor
    needs fused into it; else SDPA with the original arguments (and no votes: the scorer then
    computes them from q and k). Returns (out, votes or None)."""
    if prefill_kernel_applies(q, k, mask, is_causal):
        from kvfx.templates.launch import prefill_attention as kernel

        sm = scale if scale is not None else q.shape[-1] ** -0.5
        if scores == "none":
            return kernel(q, k, v, scale=sm, causal=True)[0], None
        o, _, votes = kernel(q, k, v, scale=sm, causal=True, scores=scores, window=max(window, 1))
        return o, votes
    return sdpa(q, k, v, mask, scale=scale, is_causal=is_causal), None


def evicted_mask(store, valid: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, n) bool: prompt tokens that are valid (``valid`` (B, n)) but not held by the
    store after prefill compression (what CaliDrop calibrates for)."""
    B, n = valid.shape
    pos = store.positions() if hasattr(store, "positions") else store.pos[:, :, :store.length]
    held = torch.zeros(B, store.kv_heads, n, dtype=torch.int32, device=valid.device)
    held.scatter_add_(2, pos.clamp(min=0).long(), (pos >= 0).to(torch.int32))
    return valid[:, None, :] & (held == 0)


def calibrated_decode(store, q: torch.Tensor, mask, is_causal: bool, past_len: int, scale,
                      with_probs: bool, calib):
    """Decode attention merged with CaliDrop's evicted partition (kvfx.methods.calidrop).

    Each query row looks up its nearest stored prompt query (and, with the recompute tier,
    may refresh the history); the kept-cache attention (o_C, LSE_C) and the stored (O_E, LSE_E)
    merge by the exact two-partition rule. On CUDA (one query, no mask) the merge is the decode
    kernel's extra split-K partition (for a quantized store, the quantized decode kernel's, beside
    its slot splits and outlier pool: DESIGN rule 9); otherwise the reference merge runs after
    attention.
    Returns (out, probs over the store or None)."""
    from kvfx.methods.calidrop import merge

    sm = scale if scale is not None else q.shape[-1] ** -0.5
    nq = q.shape[2]
    rows = []
    for t in range(nq):
        o_e, lse_e, use, store.calib = calib.calibrate(store.calib, q[:, :, t:t + 1], scale=sm)
        rows.append((o_e, lse_e, use))
    if with_probs and hasattr(store, "attend"):  # a ragged store rolling per head (the only store with
        # its own read that returns probabilities): the reference read
        o_c, lse_c, probs = ragged_decode_attention(store, q, mask, is_causal, past_len, scale,
                                                    return_lse=True, with_probs=True)
    elif hasattr(store, "attend"):  # quantized or ragged store: its read with the merge (fused: quantized)
        if nq == 1 and mask is None and _use_kernel(q):
            return store.attend(q, mask, is_causal, past_len, scale, calib=rows[0]), None
        o_c, lse_c = store.attend(q, mask, is_causal, past_len, scale, return_lse=True)
        probs = None
    else:
        n = store.length
        g = q.shape[1] // store.kv_heads
        keep = _store_mask(store, mask, is_causal, nq, past_len, g)
        k, v = store.k[:, :, :n], store.v[:, :, :n]
        if decode_kernel_applies(q, k, keep, mask):
            from kvfx.templates.launch import decode_attention as kernel

            res = kernel(q, k, v, store.count.to(torch.int32), scale=sm, bias=kernel_bias(keep, g),
                         return_probs=with_probs, calib=rows[0])
            return res[0], (res[2][:, :, None, :] if with_probs else None)
        o_c, lse_c, probs = grouped_attention_reference(q, k, v, scale=sm, keep=keep, return_lse=True,
                                                        return_probs=with_probs)
    outs = []
    for t, (o_e, lse_e, use) in enumerate(rows):
        o_t, _ = merge(o_c[:, :, t:t + 1], lse_c[:, :, t:t + 1], o_e, lse_e, use)
        outs.append(o_t)
    return torch.cat(outs, dim=2), probs
