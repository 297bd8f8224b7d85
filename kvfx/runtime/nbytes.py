"""Bytes held by tensors, counted once per storage, wrapper tensor subclasses included.

Hugging Face's quantized caches hold tensor subclasses: optimum-quanto's ``QTensor`` family are
wrapper subclasses whose own storage is a placeholder ("Attempted to access the data pointer on
an invalid python storage" when read); their bytes are in the inner tensors that
``__tensor_flatten__`` names (codes, scales, shifts). :func:`storage_bytes` walks into them, so
``kvfx.memory(cache)`` measures any cache: plain tensors, views sharing a storage (counted once),
and wrapper subclasses (their inner tensors, recursively).
"""

from __future__ import annotations

import torch


def _is_wrapper(t: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return type(t) is not torch.Tensor and is_traceable_wrapper_subclass(t)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``.

    A wrapper subclass (``__tensor_flatten__``) counts its inner tensors instead of itself; a
    tensor whose storage cannot be read (a subclass without inner tensors) counts
    ``numel * element_size``; storages shared by several tensors count once."""
    seen, total = set(), 0
    stack = list(tensors)
    while stack:
        t = stack.pop()
        if _is_wrapper(t):
            attrs, _ = t.__tensor_flatten__()
            stack.extend(getattr(t, a) for a in attrs)
            continue
        try:
            s = t.untyped_storage()
            key, n = (t.device, s.data_ptr()), s.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            key, n = None, t.numel() * t.element_size()
        if key is None or key[1] == 0:  # no storage to share (or an empty one): count the object
            key = ("object", id(t))
        if key not in seen:
            seen.add(key)
            total += n
    return total
