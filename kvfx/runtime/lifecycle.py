"""The decode half of a site's lifecycle, shared by every cache representation (the
:class:`kvfx.runtime.store.KVStore` protocol). The prefill half is
:func:`kvfx.runtime.ops.site_attention` (keys and values) and
:func:`kvfx.runtime.lowrank.lowrank_site_attention` (latents), which differ only in what they
project before handing the same store and compressor calls the same arguments."""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.runtime.state import KvfxStateError


def check_continues(store, past_len: int, B: int, where: str) -> None:
    """The model's cache reports ``past_len`` tokens for batch ``B``: exactly what the store saw."""
    if store.seen != past_len or store.batch != B:
        raise KvfxStateError(
            f"kvfx: site {where}: the model's cache reports {past_len} past tokens "
            f"for batch {B}, the kvfx store has {store.seen} for batch {store.batch}. kvfx does "
            "not support cropping or reordering the cache (assisted decoding, beam search, "
            "contrastive search); start a new sequence with an empty cache.")


def decode_step(c, store, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, past_len: int,
                scale: float | None, is_causal: bool) -> Tensor:
    """The decode half of the lifecycle, the same for every representation (the
    :class:`kvfx.runtime.store.KVStore` protocol): append the step's tokens (``k``/``v``: what the
    store holds per token: keys and values, or latents), attend over the store (the store's own
    read: dense, quantized or latent, calibrated when ``c.calib``), then finish the step (flush the
    quantized residual, or let the compressor evict)."""
    nq = q.shape[2]
    with torch.no_grad():
        store.append(k, v, torch.arange(past_len, past_len + nq, device=q.device))
        out, probs = store.attend_step(c, q, mask, is_causal, past_len, scale)
        store.finish_step(c, nq, probs)
    store.seen += nq
    return out.contiguous()


__all__ = ["check_continues", "decode_step"]
