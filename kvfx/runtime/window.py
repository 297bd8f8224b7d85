"""Sliding-window sites: the store holds what the model's window cache would hold, and rolls with it.

A sliding-window layer (Hugging Face's ``DynamicSlidingWindowLayer``: Gemma-2/3, Mistral with
``sliding_window``) keeps the last ``w`` tokens (``sliding_window - 1``) and attends, under the model's
sliding-window mask, over ``cat(cache, new)``. Its mask is *window-relative*: column ``j`` is logical
position ``offset + j`` with ``offset = L - P`` (``L`` tokens seen, ``P = min(L, w)`` in the model's
cache). kvfx rewrites such a site only when its policy keeps every token (``full``, or ``quant:``
alone: :func:`kvfx.passes.window_refusal`), and then:

* the model's cache entry is ``ghost[:, :, -w:]`` (the graph's own slice of the ghost), so the model's
  length and mask bookkeeping are unchanged;
* :func:`window_mask` maps the model's mask onto logical positions: ``offset`` masked columns are put in
  front of it, so every store slot (which remembers its logical position) gets its own column, and a
  slot that has left the window is masked, exactly as the model masks it;
* after each step the store drops the tokens no later query can see (logical position ``< L - w``):
  the dense store drops them all (it then holds exactly the model's window), the quantized store drops
  whole key groups of its quantized part (KIVI quantizes keys per channel over groups of tokens, so a
  token cannot leave a group alone) and any residual tokens, and masks the few expired tokens left in a
  group until the group has left the window (at most one quantum of slots, see
  :meth:`kvfx.runtime.qstore.QuantStore.roll_window`).

``full`` on a window site is exact (tested on Gemma-3, Mistral and a hand-written window cache); the
held bytes are the window's (``kvfx.memory`` counts the dense equivalent of a window site as the
``min(L, w)`` tokens the model's cache would hold).
"""

from __future__ import annotations

import torch
from torch import Tensor


def window_mask(mask: Tensor | None, is_causal: bool, offset: int, past_len: int, nq: int, device=None):
    """(mask over the ``offset + past_len + nq`` logical positions, is_causal) for the model's
    ``mask`` over its ``past_len + nq`` window-relative columns. Columns of positions before the
    window are masked. With no mask, the model's semantics (every key visible; SDPA's top-left
    ``is_causal`` over its own columns) become an explicit mask first."""
    if offset <= 0:
        return mask, is_causal
    n = past_len + nq
    if mask is None:
        keep = torch.ones(nq, n, dtype=torch.bool, device=device)
        if is_causal and nq > 1:
            keep = keep.tril()
        mask, is_causal = keep[None, None], False
    pad_shape = (*mask.shape[:-1], offset)
    if mask.dtype == torch.bool:
        pad = torch.zeros(pad_shape, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.full(pad_shape, torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1), is_causal


def expired(pos: Tensor, cutoff: int) -> Tensor:
    """(…, n) bool: slots holding a token at a logical position before ``cutoff`` (-1: empty)."""
    return (pos >= 0) & (pos < cutoff)


__all__ = ["expired", "window_mask"]
