"""The kvfx custom operators the rewrite pass inserts into graphs.

``kvfx::attention(q, k_new, v_new, mask, past_len, site, scale, is_causal)``
    Attention of the site's queries over its compressed store plus the new tokens, and the
    store update (prefill compression or decode append/evict). Opaque to dynamo and inductor:
    its state lives in the store, so nothing in it can cause a recompile.

``kvfx::ghost(new, past_len, site)``
    What the model's own cache receives instead of ``cat(past, new)``: a tensor of the
    logical shape (so the model's length and mask bookkeeping stay right) whose storage is a
    single element (stride 0). The full-precision history is no longer held by the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.runtime.attention import (KvfxStateError, calibrated_decode, decode_attention, key_valid,
                                    prefill_attention)
from kvfx.runtime.qstore import QuantStore
from kvfx.runtime.registry import REGISTRY


def _ghost_shape(new: Tensor, past_len) -> list:
    shape = list(new.shape)
    shape[-2] = past_len + new.shape[-2]
    return shape


@torch.library.custom_op("kvfx::ghost", mutates_args=())
def ghost(new: Tensor, past_len: int, site: str) -> Tensor:
    out = new.new_zeros(1).expand(_ghost_shape(new, past_len))
    REGISTRY.note_ghost(site, out)
    return out


@ghost.register_fake
def _(new, past_len, site):
    return new.new_empty(1).expand(_ghost_shape(new, past_len))


@torch.library.custom_op("kvfx::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, past_len: int, site: str,
              scale: float | None, is_causal: bool) -> Tensor:
    """q (B, Hq, nq, d), k/v (B, Hkv, nq, d) the *new* tokens only; mask over the logical keys
    (past_len + nq columns). Returns (B, Hq, nq, dv)."""
    b = REGISTRY.binding(site)
    out = site_attention(b.compressor, b.store, q, k, v, mask, past_len, scale, is_causal,
                         b.info.module_path)
    if TAP is not None:
        TAP(b.info, q, k, v, mask, past_len, scale, is_causal, out)
    return out


TAP = None  # a callable(info, q, k, v, mask, past_len, scale, is_causal, out) that sees every call
            # (kvfx.eval.calib_error records a full-cache run with it); None in normal use


def site_attention(c, store, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, past_len: int,
                   scale: float | None, is_causal: bool, where: str = "") -> Tensor:
    """One call of a site: its compressor ``c`` and store. Prefill (``past_len == 0``): exact
    attention on the prompt, then compression (and CaliDrop's state). Decode: append, attend
    (calibrated, quantized or plain), then flush or evict. Also used to replay recorded calls."""
    B, _, nq, _ = q.shape
    if past_len == 0:  # a new sequence: exact attention on the prompt, then compress
        store.reset()
        out, votes = prefill_attention(q, k, v, mask, scale=scale, is_causal=is_causal,
                                       scores=c.kernel_scores, window=max(c.kernel_window, 1))
        with torch.no_grad():
            valid = key_valid(mask, B, nq, q.device)
            c.prefill(store, q, k, v, valid, scale, votes)
            c.init_calibration(store, q, k, v, valid, scale)  # CaliDrop's state, if any
        store.seen = nq
        return out.contiguous()  # the layout the fake implementation promises
    if store.seen != past_len or store.batch != B:
        raise KvfxStateError(
            f"kvfx: site {where}: the model's cache reports {past_len} past tokens "
            f"for batch {B}, the kvfx store has {store.seen} for batch {store.batch}. kvfx does "
            "not support cropping or reordering the cache (assisted decoding, beam search, "
            "contrastive search); start a new sequence with an empty cache.")
    positions = torch.arange(past_len, past_len + nq, device=q.device)
    with torch.no_grad():
        store.append(k, v, positions)
        if c.calib is not None:
            out, probs = calibrated_decode(store, q, mask, is_causal, past_len, scale,
                                           c.needs_probs, c.calib)
            if isinstance(store, QuantStore):
                store.flush()
            else:
                c.after_decode(store, nq, probs)
        elif isinstance(store, QuantStore):  # no decode-time eviction on quantized stores
            out = store.attend(q, mask, is_causal, past_len, scale)
            store.flush()
        else:
            out, probs = decode_attention(store, q, mask, is_causal, past_len, scale, c.needs_probs)
            c.after_decode(store, nq, probs)
    store.seen += nq
    return out.contiguous()


@attention.register_fake
def _(q, k, v, mask, past_len, site, scale, is_causal):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


__all__ = ["attention", "ghost", "site_attention", "KvfxStateError"]
