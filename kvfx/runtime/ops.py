"""The kvfx custom operators the rewrite pass inserts into graphs.

``kvfx::attention(q, k_new, v_new, mask, past_k, past_v, site, scale, is_causal, softcap=None, rope_cos=None, rope_sin=None) -> (out, ghost_k, ghost_v)``
    Attention of the site's queries over its compressed store plus the new tokens, and the
    store update (prefill compression or decode append/evict). ``past_k`` / ``past_v`` are what
    the model's cache held for the site (an empty tensor, None, or the ghosts this operator
    returned on the previous step): the store is found through them (:mod:`kvfx.runtime.state`),
    never through a constant of the graph. ``site`` is the site's index in the graph's program.
    Returns the attention output and the new ghosts, which the model's cache receives instead
    of ``cat(past, new)``: tensors of the logical shape (so the model's length and mask
    bookkeeping stay right) holding one element (stride 0). The full-precision history is no
    longer held by the model. Opaque to dynamo and inductor: nothing in it can recompile.
    ``softcap``: the site's logits are soft-capped, ``cap * tanh(s / cap)`` (Gemma-2); such a site
    runs :mod:`kvfx.runtime.softcap` (the dense Triton kernels with the cap where the runtime picks
    a kernel, the PyTorch reference elsewhere).
    A sliding-window site (``SiteInfo.window``) maps the model's window-relative mask onto logical
    positions and rolls its store after each step (:mod:`kvfx.runtime.window`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.runtime.lowrank import LatentStore
from kvfx.runtime.qstore import QuantStore
from kvfx.runtime.ragged import RaggedStore
from kvfx.runtime.state import (KvfxStateError, current, find_store, ghost_fake, make_ghost,
                                past_length)
from kvfx.runtime.lifecycle import check_continues, decode_step, prefill_step
from kvfx.runtime.store import SiteStore
from kvfx.runtime.window import window_mask


def make_store(key: str, compressor) -> object:
    """The store a compressor writes: latents (``lowrank:``), quantized (``quant:``) or dense."""
    if getattr(compressor, "lowrank", False):  # ReCalKV latents (kvfx.runtime.lowrank)
        return LatentStore(key, compressor.kv_heads, compressor.head_dim, compressor.quant)
    quant = getattr(compressor, "quant", None)
    if quant is None and getattr(compressor, "ragged", False):  # head-wise budgets (AdaKV)
        return RaggedStore(key)
    return SiteStore(key) if quant is None else QuantStore(key, quant)


def _new_store(sp) -> object:
    return make_store(sp.info.module_path, sp.compressor)


def _ghost_shape(new: Tensor, past: Tensor | None) -> list:
    shape = list(new.shape)
    shape[-2] = past_length(past) + new.shape[-2]
    return shape


@torch.library.custom_op("kvfx::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, past_k: Tensor | None,
              past_v: Tensor | None, site: int, scale: float | None,
              is_causal: bool, softcap: float | None = None, rope_cos: Tensor | None = None,
              rope_sin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, Hq, nq, d), k/v (B, Hkv, nq, d) the *new* tokens only; mask over the logical keys
    (past_len + nq columns). ``rope_cos`` / ``rope_sin`` (B | 1, 1, nq, d): the RoPE the queries
    were rotated by, for a scorer that reads it (Expected Attention). Returns
    (out (B, Hq, nq, dv), ghost_k, ghost_v)."""
    ctx = current()
    sp = ctx.program.sites[site]
    seq, store, past_len = find_store(ctx, sp, past_k, past_v, q.shape[0], _new_store)
    rope = (rope_cos, rope_sin) if rope_cos is not None and rope_sin is not None else None
    w = sp.info.window
    if w is not None and past_len:  # a sliding-window site: its mask is window-relative
        offset = store.seen - past_len
        mask, is_causal = window_mask(mask, is_causal, offset, past_len, q.shape[2], q.device)
        past_len = store.seen  # the logical positions the store's slots remember
    out = site_attention(sp.compressor, store, q, k, v, mask, past_len, scale, is_causal,
                         sp.info.module_path, softcap, rope)
    if w is not None:
        store.roll_window(w, q.shape[2])
    if ctx.tap is not None:
        if softcap is not None:  # the recorded calls are replayed without the cap
            raise KvfxStateError(f"kvfx: site {sp.info.module_path} has soft-capped logits (cap "
                                 f"{softcap}); recording its calls for replay (kvfx calib-error) does not "
                                 "carry the cap yet: run calib-error on a model without soft-capping")
        ctx.tap(sp.info, q, k, v, mask, past_len, scale, is_causal, out)
    h = seq.handle(sp.info.module_path)
    gk = make_ghost(k, _ghost_shape(k, past_k), h)
    gv = make_ghost(v, _ghost_shape(v, past_v), h)
    seq.note_ghosts(sp.info.module_path, gk, gv)
    return out, gk, gv


@attention.register_fake
def _(q, k, v, mask, past_k, past_v, site, scale, is_causal, softcap=None, rope_cos=None, rope_sin=None):
    return (q.new_empty(*q.shape[:-1], v.shape[-1]), ghost_fake(k, _ghost_shape(k, past_k)),
            ghost_fake(v, _ghost_shape(v, past_v)))


def site_attention(c, store, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, past_len: int,
                   scale: float | None, is_causal: bool, where: str = "",
                   softcap: float | None = None, rope: tuple | None = None) -> Tensor:
    """One call of a site: its compressor ``c`` and store. Prefill (``past_len == 0``): exact
    attention on the prompt, then compression (and CaliDrop's state). Decode: :func:`decode_step`.
    Also used to replay recorded calls. (Low-rank sites: :func:`kvfx.runtime.lowrank.lowrank_site_attention`,
    which differs only in what it projects before the same steps.) ``softcap``: the site's logits
    are soft-capped (:func:`kvfx.runtime.softcap.capped_site_attention`). ``rope``: the queries'
    (cos, sin), for a scorer that reads them."""
    if softcap is not None:
        from kvfx.runtime.softcap import capped_site_attention

        return capped_site_attention(c, store, q, k, v, mask, past_len, scale, is_causal, softcap, where)
    if past_len == 0:  # a new sequence: exact attention on the prompt, then compress
        return prefill_step(c, store, q, k, v, mask, scale, is_causal, rope=rope)
    B = q.shape[0]
    check_continues(store, past_len, B, where)
    return decode_step(c, store, q, k, v, mask, past_len, scale, is_causal, where, rope=rope)


__all__ = ["attention", "decode_step", "make_store", "site_attention", "KvfxStateError"]
