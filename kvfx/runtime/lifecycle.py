"""A site's lifecycle, shared by every cache representation (the
:class:`kvfx.runtime.store.KVStore` protocol):

* :func:`prefill_step` (a new sequence): exact attention on the prompt as the model asked, then
  the compressor writes what it keeps (and CaliDrop's state);
* :func:`check_continues`, then :func:`decode_step`: append, attend, flush or evict.

The operators (:func:`kvfx.runtime.ops.site_attention` for keys and values,
:func:`kvfx.runtime.lowrank.lowrank_site_attention` for latents) differ only in what they project
before calling these with the same store and compressor."""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

from kvfx.runtime.attention import key_valid, prefill_attention
from kvfx.runtime.state import KvfxStateError
from kvfx.runtime.store import SiteStore


def prefill_step(c, store, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
                 is_causal: bool, latents: tuple | None = None, rope: tuple | None = None) -> Tensor:
    """A new sequence: exact attention of the prompt (``k``, ``v``: its exact keys and values), with
    the scores the compressor needs fused into the prefill kernel where it runs; then the
    compressor writes the kept tokens (``latents``: (zk, zv) a latent store holds instead, and
    its inner store receives them) and CaliDrop's state. ``rope``: the queries' RoPE (cos, sin),
    for a scorer that reads it (``Scorer.rotary``)."""
    B, _, nq, _ = q.shape
    store.reset()
    store.decoded = False  # no single-token decode step yet: multi-token steps are prompt chunks
    store.chunked = False
    scores = getattr(c, "kernel_scores", "none") if latents is None else "none"
    out, votes = prefill_attention(q, k, v, mask, scale=scale, is_causal=is_causal, scores=scores,
                                   window=max(getattr(c, "kernel_window", 1), 1))
    with torch.no_grad():
        valid = key_valid(mask, B, nq, q.device)
        if latents is None:
            c.prefill(store, q, k, v, valid, scale, votes, **({"rope": rope} if rope is not None else {}))
            c.init_calibration(store, q, k, v, valid, scale)  # CaliDrop's state, if any
        else:
            c.prefill(store.lat, q, k, v, valid, scale, *latents)
    store.seen = nq
    store.peak_bytes = 0
    _note_peak(store)
    return out.contiguous()  # the layout the fake implementations promise


def _note_peak(store) -> None:
    store.peak_bytes = max(getattr(store, "peak_bytes", 0), store.held_bytes())


def check_continues(store, past_len: int, B: int, where: str) -> None:
    """The model's cache reports ``past_len`` tokens for batch ``B``: exactly what the store saw."""
    if store.seen != past_len or store.batch != B:
        raise KvfxStateError(
            f"kvfx: site {where}: the model's cache reports {past_len} past tokens "
            f"for batch {B}, the kvfx store has {store.seen} for batch {store.batch}. kvfx does "
            "not support cropping or reordering the cache (assisted decoding, beam search, "
            "contrastive search); start a new sequence with an empty cache.")


def decode_step(c, store, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, past_len: int,
                scale: float | None, is_causal: bool, where: str = "", rope: tuple | None = None) -> Tensor:
    """The decode half of the lifecycle, the same for every representation (the
    :class:`kvfx.runtime.store.KVStore` protocol): append the step's tokens (``k``/``v``: what the
    store holds per token: keys and values, or latents), attend over the store (the store's own
    read: dense, quantized or latent, calibrated when ``c.calib``), then finish the step (flush the
    quantized residual, or let the compressor evict)."""
    nq = q.shape[2]
    chunk = nq > 1 and getattr(c, "prompt_eviction", False) and not getattr(_APPEND, "on", False)
    if chunk:
        why = _chunk_refusal(c, store)
        if why and not getattr(store, "decoded", False):
            raise KvfxStateError(
                f"kvfx: site {where}: a prompt chunk of {nq} tokens (generate's prefill_chunk_size, or a "
                f"prompt fed in several calls) under a policy whose {why}; prefill the prompt in one call "
                "(no prefill_chunk_size) or use a policy without it; to append the tokens uncompressed "
                "(a question after a compressed context), run the step inside `with kvfx.appending():`")
        chunk = not why
    if nq > 1 and not getattr(store, "decoded", False):
        store.chunked = True  # a prompt fed in several calls: its buffers may hold a chunk's slack
    elif nq == 1 and getattr(store, "chunked", False) and not getattr(store, "decoded", False):
        store.chunked = False
        if hasattr(store, "shrink_to_fit"):  # decoding starts: drop the largest chunk's slots
            store.shrink_to_fit()
    with torch.no_grad():
        store.append(k, v, torch.arange(past_len, past_len + nq, device=q.device))
        _note_peak(store)  # the high-water mark: the step's tokens appended, nothing evicted yet
        out, probs = store.attend_step(c, q, mask, is_causal, past_len, scale)
        if chunk:
            c.compress_chunk(store, q, scale, **({"rope": rope} if rope is not None else {}))
        else:
            store.finish_step(c, nq, probs)
    if nq == 1:
        store.decoded = True
    store.seen += nq
    return out.contiguous()


_APPEND = threading.local()


@contextlib.contextmanager
def appending():
    """Inside this context, a multi-token step that continues a cache appends its tokens
    uncompressed, as decode steps do (a question asked of a context compressed once, a new chat
    turn). Outside it, such a step before decoding starts is a prompt chunk and is compressed
    with the prompt (``generate(..., prefill_chunk_size=N)``). Thread-local; nests."""
    old = getattr(_APPEND, "on", False)
    _APPEND.on = True
    try:
        yield
    finally:
        _APPEND.on = old


def _chunk_refusal(c, store) -> str:
    """Why a prompt chunk cannot be compressed at this site ('' if it can)."""
    return chunk_refusal(c, quantized=not isinstance(store, SiteStore))


def chunk_refusal(c, quantized: bool) -> str:
    """Why a prompt chunk cannot be compressed by compressor ``c`` over a quantized (``quant:``) or
    dense store ('' if it can). The one list, used at run time (:func:`decode_step`) and before a
    run by :func:`kvfx.eval.harness.check_chunked_policies`."""
    if getattr(c, "lowrank", False):
        return ("evicting low-rank latents cannot rescore a chunk (the store holds latents, the scorer "
                "reads exact keys)")
    if c.calib is not None:
        return ("calibration (CaliDrop) keeps the statistics of the prompt's evicted tokens for stored "
                "prompt queries; rebuilding them at each chunk is not implemented")
    if getattr(c, "ragged", False):
        return ("head-wise budgets (budget.allocation: adaptive) re-selecting the held tokens of a chunk is not "
                "implemented (each head holds its own number of tokens)")
    if quantized:
        return ("quantized store (quant:) cannot re-select the tokens it already quantized; chunked "
                "prefill works with quant: alone or with eviction alone")
    return ""


__all__ = ["appending", "check_continues", "chunk_refusal", "decode_step", "prefill_step"]
