"""Pass 3: rewrite each cached attention site onto the kvfx runtime.

For a site whose K/V are ``cat([past, new])`` (see :mod:`kvfx.passes.trace_kv`):

    out = attention(q, repeat(cat(pk, nk)), repeat(cat(pv, nv)), mask)     # before
    cache_k, cache_v = cat(pk, nk), cat(pv, nv)

    out, gk, gv = kvfx::attention(q, nk, nv, mask, pk, pv, site, scale, is_causal, softcap[, cos, sin])   # after
    cache_k, cache_v = gk, gv

``pk`` / ``pv`` (the model's cache entries: empty, or kvfx's ghosts from the previous step) are
how the operator finds the sequence's store; ``site`` is the site's index in the graph's
:class:`kvfx.runtime.state.Program`. A low-rank site (policy ``lowrank:``) calls
``kvfx::lowrank_attention(q, x_k, W_k, x_v, W_v, cos, sin, mask, pk, pv, site, rope_key, scale,
is_causal, heads, head_dim)`` instead, on the inputs of its k_proj / v_proj (kvfx.passes.lowrank);
k_proj, v_proj and the keys' RoPE become dead code and are erased.
A check returns a reason to leave the site alone; every rewrite bumps ``stats["rewritten"]``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import kvfx.runtime.lowrank  # noqa: F401  (registers torch.ops.kvfx.lowrank_attention)
import kvfx.runtime.ops  # noqa: F401  (registers torch.ops.kvfx.attention)
from kvfx.passes import graph_utils as gu
from kvfx.passes.find_attention import AttentionMatch
from kvfx.passes.trace_kv import KVSource, window_users

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class SitePlan:
    match: AttentionMatch
    ks: KVSource
    vs: KVSource
    index: int  # the site's index in the graph's program (the operators' ``site`` argument)
    reason: str = ""
    lowrank: object = None  # low-rank sites: a kvfx.passes.lowrank.LowRankPlan
    rope: tuple | None = None  # (cos, sin) nodes of the queries' RoPE, for a scorer that reads it


def check(match: AttentionMatch, ks: KVSource, vs: KVSource) -> str:
    """Empty string if the site can be rewritten, else the reason it is left alone."""
    if match.reason:
        return match.reason
    for src in (ks, vs):
        if src.reason:
            return src.reason
    if ks.past_is_empty != vs.past_is_empty:
        return "keys and values come from different cache states"
    qv, kv = gu.val(match.q), gu.val(ks.new)
    if qv is None or kv is None:
        return "shapes unknown (no example values in the graph)"
    if qv.dim() != 4:
        return f"query is {qv.dim()}-D, expected (B, H, T, d)"
    if qv.dtype not in SUPPORTED_DTYPES:
        return f"dtype {qv.dtype} not supported (float32, float16, bfloat16)"
    if gu.static_int(qv.shape[2]) is not None and gu.static_int(kv.shape[2]) is not None \
            and gu.static_int(qv.shape[2]) != gu.static_int(kv.shape[2]):
        return "queries and new keys differ in length (cross-attention?)"
    hq, hkv = gu.static_int(qv.shape[1]), gu.static_int(kv.shape[1])
    if not hq or not hkv or hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} KV heads"
    mv = gu.val(match.mask)
    if match.mask is not None:
        if not isinstance(mv, torch.Tensor):
            return "the mask is not a tensor the pass can interpret"
        if mv.dim() > 4 or (mv.dtype != torch.bool and not mv.dtype.is_floating_point):
            return f"a {mv.dim()}-D {mv.dtype} mask cannot be interpreted"
        if match.mask_kind == "fill_true" and mv.dtype != torch.bool:
            return "masked_fill with a non-boolean mask"
        keys = gu.val(ks.cat)
        if mv.dim() == 0 or (gu.static_int(mv.shape[-1]) == 1 and gu.static_int(keys.shape[-2]) != 1):
            return ("the mask broadcasts over the key axis; kvfx maps mask columns to kept "
                    "tokens and needs one column per key")
    return ""


def rewrite_site(gm: GraphModule, plan: SitePlan) -> None:
    """Apply the rewrite of one checked site in place."""
    g, m, ks, vs = gm.graph, plan.match, plan.ks, plan.vs
    with g.inserting_before(m.out):
        q = m.q
        if m.scale_node is not None:  # fold a tensor scale into the queries
            op = operator.truediv if m.scale_op == "div" else operator.mul
            q = g.call_function(op, (q, m.scale_node))
        mask = m.mask
        if m.mask_kind == "fill_true":  # masked_fill(mask, -inf): True means "masked"
            mask = g.call_function(torch.logical_not, (mask,))
        lr = plan.lowrank
        if lr is not None:  # the store holds latents (kvfx.runtime.lowrank)
            res = g.call_function(torch.ops.kvfx.lowrank_attention.default,
                                  (q, lr.x_k, lr.w_k, lr.x_v, lr.w_v, lr.cos, lr.sin, mask, ks.past, vs.past,
                                   plan.index, lr.rope_key, m.scale, m.is_causal, lr.heads, lr.head_dim))
        else:
            res = g.call_function(torch.ops.kvfx.attention.default,
                                  (q, ks.new, vs.new, mask, ks.past, vs.past, plan.index, m.scale, m.is_causal,
                                   m.softcap, *(plan.rope or ())))
        attn = g.call_function(operator.getitem, (res, 0))
        ghosts = [g.call_function(operator.getitem, (res, i)) for i in (1, 2)]
    m.out.replace_all_uses_with(attn)
    for src, gh in zip((ks, vs), ghosts):  # the cache receives the ghosts instead of cat(past, new)
        to_cache = set(window_users(src))  # a sliding-window cache keeps ghost[:, :, -w:]
        src.cat.replace_all_uses_with(gh, delete_user_cb=lambda user: user.op == "output" or user in to_cache)
        for u in to_cache:  # the slice ran right after the cache's cat: it now follows the ghost
            gh.append(u)
    _erase_dead(gm, [m.out, *m.chain, ks.cat, vs.cat] + ([ks.new, vs.new] if lr else []))
    assert all(src.cat.graph is not g or not any(u.op == "output" for u in src.cat.users)
               for src in (ks, vs))


def _erase_dead(gm: GraphModule, candidates: list[Node]) -> None:
    """Erase candidate nodes (and their now-dead producers) that have no users left. Only
    pure nodes reachable from the candidates are touched: never ``eliminate_dead_code``,
    which would also delete in-place calls such as ``index_copy_``."""
    todo = [n for n in candidates if isinstance(n, Node)]
    while todo:
        n = todo.pop()
        if n.graph is not gm.graph or n.users or n.op in ("placeholder", "output"):
            continue
        if n.op == "call_method" and str(n.target).endswith("_"):
            continue
        inputs = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        todo.extend(i for i in inputs if gu.is_call(i, _PURE_FNS, _PURE_METHODS))


# Pure producers _erase_dead follows back from a dead node: views and the arithmetic of a
# projection + RoPE chain (never in-place variants: operator.iadd / imul are not here).
_PURE_FNS = {operator.getitem, torch.transpose, *gu.CAT_FNS, operator.mul, torch.mul, operator.add,
             torch.add, operator.neg, torch.neg, torch.nn.functional.linear, torch._C._nn.linear}
_PURE_METHODS = {"expand", "reshape", "view", "transpose", "contiguous", "mul", "add", "neg"}
