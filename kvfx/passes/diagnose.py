"""Why kvfx found no attention in a graph.

:func:`kvfx.passes.find_attention.find_attention` accepts two shapes of attention (a call of
``F.scaled_dot_product_attention``, and the eager chain ``matmul(q, kᵀ) → (scale) → (mask) →
softmax → (cast) → (dropout) → matmul(·, v)``). When a compiled graph has neither, the user gets
no sites and no explanation. :func:`why_no_attention` looks at what the graph *does* have (a
softmax between two products, an attention kernel kvfx does not know) and says in one sentence
what it saw and why it was not recognized, or returns ``""`` when nothing in the graph looks like
attention (an MLP, a router softmax that feeds no product).

Both functions read dynamo-level graphs (torch functions, methods and operators) and never raise:
on a graph they cannot read they return ``""`` / ``[]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from kvfx.passes import graph_utils as gu

__all__ = ["why_no_attention", "attention_like_ops"]

_BMM_FNS = {torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm}
_BMM_METHODS = {"bmm", "baddbmm"}
_LOGIT_CASTS = {"float", "to", "type"}  # what find_attention looks through before the softmax
_MAX_BACK = 12  # ops walked back from a softmax to the product that made its input
_MAX_FWD = 5  # ops walked forward from a softmax to the product that consumes it

_RECOGNIZED = ("kvfx recognizes only F.scaled_dot_product_attention and eager attention "
               "written as torch.matmul/@ of 4-D (batch, heads, seq, head_dim) tensors")


@dataclass
class _Site:
    softmax: Node
    product: Node  # the product whose result feeds the softmax (q·kᵀ)
    between: list = field(default_factory=list)  # ops from product to softmax, in graph order
    after: list = field(default_factory=list)  # ops from softmax to the output product
    out: Node | None = None  # the product consuming the weights (·v)


def _name(node) -> str:
    """A short name for what a node calls: ``tanh``, ``mul``, ``clamp``, ``einsum``."""
    if not isinstance(node, Node):
        return repr(node)
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        return getattr(t, "__name__", None) or getattr(t, "_name", None) or str(t)
    return node.op


def _product_kind(node) -> str | None:
    """'matmul' | 'bmm' | 'baddbmm' | 'einsum' for a product of two tensors, else None."""
    if not isinstance(node, Node):
        return None
    if gu.is_matmul(node):
        return "matmul"
    if gu.is_call(node, _BMM_FNS, _BMM_METHODS):
        return _name(node)
    if node.op == "call_function" and (node.target is torch.einsum
                                       or getattr(node.target, "__name__", "") == "einsum"):
        return "einsum"
    return None


def _reaches_product(node, depth: int) -> bool:
    """Whether a product is among ``node`` and its inputs up to ``depth`` ops back (breadth
    first, each node once: residual streams branch at every add)."""
    frontier, seen = [node], set()
    for _ in range(depth + 1):
        nxt = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            if _product_kind(n):
                return True
            if n.op in ("call_function", "call_method"):
                nxt += _node_args(n)
        if not nxt:
            return False
        frontier = nxt
    return False


def _node_args(node: Node) -> list:
    out = [a for a in node.args if isinstance(a, Node)]
    out += [a for a in node.kwargs.values() if isinstance(a, Node)]
    return out


def _walk_back(sm: Node):
    """(product, ops between it and the softmax in graph order), or None."""
    x = gu.arg(sm, 0, "input")
    between = []
    for _ in range(_MAX_BACK):
        if not isinstance(x, Node):
            return None
        if _product_kind(x):
            return x, between[::-1]
        if x.op not in ("call_function", "call_method"):
            return None
        between.append(x)
        nxt = next((a for a in _node_args(x) if _reaches_product(a, _MAX_BACK)), None)
        if nxt is None:
            return None
        x = nxt
    return None


def _walk_forward(sm: Node):
    """(ops between the softmax and the product consuming it, that product), or None."""
    parent = {sm: None}
    frontier = [sm]
    for _ in range(_MAX_FWD):
        nxt = []
        for cur in frontier:
            for u in cur.users:
                if u in parent:
                    continue
                parent[u] = cur
                if _product_kind(u):
                    path, p = [], cur
                    while p is not None and p is not sm:
                        path.append(p)
                        p = parent[p]
                    return path[::-1], u
                if u.op in ("call_function", "call_method"):
                    nxt.append(u)
        frontier = nxt
    return None


def _sites(graph: Graph) -> list:
    """Attention-like sites find_attention did not match, and unknown attention kernels, in graph
    order: each a _Site or an ("kernel", node) pair."""
    matched = set()
    try:
        from kvfx.passes.find_attention import find_attention

        for m in find_attention(graph):
            matched.update(m.chain)
            matched.add(m.out)
    except Exception:
        pass
    found = []
    for n in graph.nodes:
        if n in matched:
            continue
        if n.op == "call_function" and n.target not in gu.SDPA_TARGETS and "attention" in _name(n):
            found.append(("kernel", n))
        elif gu.is_softmax(n):
            back = _walk_back(n)
            fwd = _walk_forward(n) if back else None
            if back and fwd:
                found.append(_Site(n, back[0], back[1], fwd[0], fwd[1]))
    return found


def _accepted_logit_op(node: Node) -> bool:
    """Whether find_attention's backward walk (_match_logits) can step over this op."""
    if gu.is_call(node, None, _LOGIT_CASTS):
        return True
    if gu.is_call(node, gu.ADD_FNS, {"add", "__add__"}):
        return True
    if gu.is_call(node, {torch.masked_fill}, {"masked_fill"}):
        return True
    if gu.is_call(node, gu.MUL_FNS | gu.DIV_FNS, {"mul", "div", "__mul__", "__truediv__"}):
        other = [a for a in node.args[:2] if not _reaches_product(a, 6)]
        b = other[0] if other else None
        return isinstance(b, (int, float)) or (isinstance(b, Node) and gu.shape(b) in ((), (1,)))
    return False


def _logit_role(node: Node) -> str:
    if gu.is_call(node, None, _LOGIT_CASTS):
        return "cast"
    if gu.is_call(node, {torch.masked_fill}, {"masked_fill"}) or gu.is_call(
            node, gu.ADD_FNS, {"add", "__add__"}):
        return "mask"
    return "scale"


def _label(node: Node) -> str:
    """An op's name with a qualifier where the name alone would mislead."""
    name = _name(node)
    if gu.is_call(node, gu.MUL_FNS | gu.DIV_FNS, {"mul", "div", "__mul__", "__truediv__"}):
        other = [a for a in node.args[:2] if not _reaches_product(a, 6)]
        s = gu.shape(other[0]) if other else None
        if s is not None and s not in ((), (1,)):
            return f"{name} by a tensor of shape {_fmt_shape(s)}"
    return name


def _fmt_shape(s) -> str:
    return "(" + ", ".join(str(d) for d in s) + (",)" if len(s) == 1 else ")")


def _chain(site: _Site) -> str:
    def show(n):
        if _product_kind(n) == "einsum" and n.args and isinstance(n.args[0], str):
            return f"einsum '{n.args[0]}'"
        return _name(n)

    nodes = [site.product, *site.between, site.softmax, *site.after]
    if site.out is not None:
        nodes.append(site.out)
    return " → ".join(show(n) for n in nodes)


def _where(node: Node) -> str:
    path = gu.module_path(node)
    return f" in module {path}" if path else ""


def _diagnose_site(site: _Site) -> tuple[str, str]:
    """(kind, sentence) for one softmax site find_attention did not match."""
    kind = _product_kind(site.product)
    chain, where = _chain(site), _where(site.softmax)
    shp = gu.shape(site.product)
    rank = len(shp) if shp is not None else (3 if kind in ("bmm", "baddbmm") else None)

    if kind == "einsum":
        return "einsum", (f"Saw einsum-based attention{where} ({chain}); kvfx does not recognize "
                          "torch.einsum: it needs q·kᵀ written with torch.matmul/@ (or "
                          "F.scaled_dot_product_attention).")
    if rank == 3:
        shape_txt = f", scores of shape {_fmt_shape(shp)}" if shp is not None else ""
        return "3d", (f"Saw 3-D {kind} attention (heads folded into batch){where} ({chain}"
                      f"{shape_txt}); kvfx does not recognize 3-D attention: it needs 4-D (batch, "
                      "heads, seq, head_dim) q·kᵀ via torch.matmul/@ or "
                      "F.scaled_dot_product_attention.")
    if kind != "matmul":
        return "product", (f"Saw a softmax between two {kind} products{where} ({chain}); "
                           f"{_RECOGNIZED}.")
    tanh = [n for n in site.between if _name(n) == "tanh"]
    if tanh:
        ops = ", ".join(_name(n) for n in site.between)
        return "softcap", (f"Saw eager attention with logit soft-capping{where} (tanh between the "
                           f"q·kᵀ matmul and the softmax: {ops}) in a form kvfx does not "
                           "support: it recognizes soft-capping only as cap * tanh(s / cap) with one "
                           "constant cap, after the scale and before the mask.")
    prefix = f"Saw a softmax over a q·kᵀ product{where} ({chain})"
    dim = gu.arg(site.softmax, 1, "dim")
    if dim not in (-1, 3):
        return "dim", (f"{prefix}, but the softmax is over dim={dim!r}; kvfx recognizes only a "
                       "softmax over the last (key) dim.")
    bad = [n for n in site.between if not _accepted_logit_op(n)]
    if bad:
        ops = ", ".join(_label(n) for n in bad)
        return "between", (f"{prefix}, but the ops between the matmul and the softmax ({ops}) are "
                           "not in the chain kvfx recognizes (one scale by a constant, one +mask "
                           "or masked_fill, casts).")
    from kvfx.passes.find_attention import _transposed_operand

    kt = site.product.args[1] if len(site.product.args) > 1 else None
    if not isinstance(kt, Node) or _transposed_operand(kt) is None:
        return "kt", (f"{prefix}, but the matmul's second operand comes from {_name(kt)}, not "
                      "from a transpose(-2, -1), permute(0, 1, 3, 2) or .mT of k, which kvfx needs "
                      "to find k.")
    roles = [_logit_role(n) for n in site.between if _logit_role(n) != "cast"]
    if len(roles) != len(set(roles)) or len(site.between) > 5:
        ops = ", ".join(_label(n) for n in site.between)
        return "repeat", (f"{prefix}, but the ops between the matmul and the softmax ({ops}) "
                          "repeat a step kvfx's recognized chain takes once (one scale, one mask, "
                          "casts).")
    shared = [n for n in [site.product, *site.between] if len(n.users) > 1]
    if shared:
        return "users", (f"{prefix}, but the scores ({_name(shared[0])}) are also used outside the "
                         "softmax, which kvfx's recognized chain does not allow.")
    bad_after = [n for n in site.after
                 if not (gu.is_call(n, None, gu.CAST_METHODS) or gu.is_call(n, gu.DROPOUT_FNS,
                                                                             {"dropout"}))]
    if bad_after or len(site.softmax.users) > 1:
        ops = ", ".join(_name(n) for n in bad_after) or "several users"
        return "after", (f"{prefix}, but the ops between the softmax and the ·v matmul ({ops}) are "
                         "not in the chain kvfx recognizes (casts, dropout).")
    return "other", f"{prefix} that does not match the chain kvfx recognizes; {_RECOGNIZED}."


def _diagnose(item) -> tuple[str, str]:
    if isinstance(item, tuple):
        n = item[1]
        return "kernel:" + _name(n), (f"Saw a call to {_name(n)}{_where(n)}; {_RECOGNIZED}, not "
                                      "other attention functions.")
    return _diagnose_site(item)


def why_no_attention(graph: Graph) -> str:
    """One sentence: what attention-like computation the graph has that find_attention did not
    recognize, and why; ``""`` when there is none (or the graph cannot be read)."""
    try:
        diags = [_diagnose(s) for s in _sites(graph)]
        if not diags:
            return ""
        kind, sentence = diags[0]
        n = sum(1 for k, _ in diags if k == kind)
        if n > 1 and sentence.endswith("."):
            sentence = f"{sentence[:-1]} ({n} sites like this in the graph)."
        return sentence
    except Exception:
        return ""


def attention_like_ops(graph: Graph) -> list[str]:
    """The attention-like computations find_attention did not match, one chain per site (e.g.
    ``"einsum 'bhqd,bhkd->bhqk' → truediv → softmax → einsum 'bhqk,bhkd->bhqd'"``)."""
    try:
        out = []
        for s in _sites(graph):
            out.append(_name(s[1]) if isinstance(s, tuple) else _chain(s))
        return out
    except Exception:
        return []

