"""Pass 2: where do an attention site's K and V come from?

* ``dynamic_cache``: ``cat([past, new], dim=-2)`` whose result goes back to the caller (a
  Hugging Face DynamicCache, or a hand-written list cache): rewritable.
* ``sliding_window``: ``cat([past, new], dim=-2)`` of which the caller keeps only the last
  ``w`` tokens (``cat[:, :, -w:]``, Hugging Face's ``DynamicSlidingWindowLayer``: Gemma-2/3,
  Mistral with ``sliding_window``): the attention runs on the whole concatenation under a
  sliding-window mask. Rewritable when the layer's policy keeps every token (``full``, ``quant:``
  alone): the store rolls with the window and maps the model's window-relative mask columns
  (:mod:`kvfx.runtime.window`); :func:`kvfx.passes.window_refusal` says why other policies leave
  such a layer alone.
* ``static_cache``: a buffer written with ``index_copy_`` (Hugging Face StaticCache): the
  model owns a preallocated full-length buffer that kvfx cannot free, so it is left alone.
* ``fresh``: computed in this graph with no cache (encoders, training-style calls,
  cross-attention on encoder states): nothing to compress, left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from kvfx.passes import graph_utils as gu


@dataclass
class KVSource:
    provenance: str
    past: Node | None = None
    new: Node | None = None
    cat: Node | None = None
    past_is_empty: bool = False  # the first call: past is an empty placeholder tensor
    reason: str = ""
    window: int | None = None  # sliding_window: the tokens the caller keeps


def _window_slice(node: Node) -> int | None:
    """``w`` if ``node`` is ``x[:, :, -w:]`` (``x[:, :, -w:, :]``, ``x[..., -w:, :]``) returned to
    the caller."""
    import operator

    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    idx = node.args[1]
    if not isinstance(idx, tuple) or not any(u.op == "output" for u in node.users):
        return None
    if len(idx) in (3, 4) and all(i == slice(None) for i in (idx[0], idx[1], *idx[3:])):
        sl = idx[2]
    elif len(idx) == 3 and idx[0] is Ellipsis and idx[2] == slice(None):
        sl = idx[1]
    else:
        return None
    if isinstance(sl, slice) and isinstance(sl.start, int) and sl.start < 0 and sl.stop is None \
            and sl.step in (None, 1):
        return -sl.start
    return None


def _trace_one(node: Node, attention_users: set) -> KVSource:
    if gu.is_call(node, gu.CAT_FNS, {"cat"}):
        parts = gu.arg(node, 0, "tensors")
        dim = gu.arg(node, 1, "dim", 0)
        if not (isinstance(parts, (list, tuple)) and len(parts) == 2):
            return KVSource("unknown", reason="cache concatenation of more than two parts")
        past, new = parts
        ns = gu.shape(new)
        if ns is None or len(ns) != 4 or dim not in (2, -2):
            return KVSource("unknown", reason=f"concatenation along dim {dim} of a "
                            f"{len(ns) if ns else '?'}-D tensor is not a (B, H, T, d) cache")
        ps = gu.shape(past)
        empty = ps is not None and len(ps) == 1 and gu.static_int(ps[0]) == 0
        if ps is None or not (empty or len(ps) == 4):
            return KVSource("unknown", reason="past keys are not a (B, H, T, d) tensor")
        other = [u for u in node.users if u.op != "output" and u not in attention_users]
        windows = {_window_slice(u) for u in other}
        if other and None not in windows and len(windows) == 1:
            return _sliding(past, new, node, empty, windows.pop())
        if other:
            return KVSource("dynamic_cache", reason=f"the concatenated cache is also used by "
                            f"{other[0].op} {other[0].target}, which kvfx cannot follow")
        if not any(u.op == "output" for u in node.users):
            return KVSource("dynamic_cache", reason="the concatenated keys are not returned "
                            "as a cache")
        return KVSource("dynamic_cache", past, new, node, empty)
    if node.op == "placeholder" and any(gu.is_call(u, None, {"index_copy_", "copy_"})
                                        for u in node.users):
        return KVSource("static_cache", reason="static cache (index_copy_ into a preallocated "
                        "buffer): kvfx cannot free a model-owned buffer; use DynamicCache")
    if gu.is_call(node, None, {"index_copy_"}):
        return KVSource("static_cache", reason="static cache (index_copy_ into a preallocated "
                        "buffer): kvfx cannot free a model-owned buffer; use DynamicCache")
    if any(u.op == "output" for u in node.users):
        # fresh K/V that are also returned: the first call of a model whose cache starts as
        # None (hand-written list caches). The returned tensors are the cache being created.
        other = [u for u in node.users if u.op != "output" and u not in attention_users]
        if other:
            return KVSource("fresh", reason=f"the keys are returned and also used by "
                            f"{other[0].op} {other[0].target}")
        return KVSource("dynamic_cache", None, node, node, past_is_empty=True)
    windows = {_window_slice(u) for u in node.users if u not in attention_users}
    if windows and None not in windows and len(windows) == 1:  # the first call of a window cache
        return _sliding(None, node, node, True, windows.pop())
    return KVSource("fresh", reason="no KV cache feeds this attention (encoder, "
                    "cross-attention or a call without use_cache)")


def _sliding(past, new, cat, empty: bool, w: int) -> KVSource:
    return KVSource("sliding_window", past, new, cat, empty, window=w)


def window_users(src: KVSource) -> list[Node]:
    """The ``cat[:, :, -w:]`` nodes through which a sliding-window cache receives its entry."""
    if src.provenance != "sliding_window" or src.cat is None:
        return []
    return [u for u in src.cat.users if _window_slice(u) == src.window]


def trace_kv_source(k: Node, v: Node, attention_users: set) -> tuple[KVSource, KVSource]:
    """Provenance of K and V. ``attention_users`` are the nodes of the attention itself
    (SDPA node, repeat_kv chain, transposes), which may use the cache concatenation."""
    return _trace_one(k, attention_users), _trace_one(v, attention_users)
