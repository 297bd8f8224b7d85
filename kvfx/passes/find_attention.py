"""Pass 1: find attention in a dynamo FX graph.

Two patterns:

* ``sdpa``: a call of ``F.scaled_dot_product_attention`` (Hugging Face ``sdpa`` attention and
  hand-written models);
* ``eager``: ``matmul(q, kᵀ) → (·scale | /scale) → (soft-cap) → (+mask | masked_fill) → softmax
  → (cast) → (dropout) → matmul(·, v)`` (GPT-2, Hugging Face ``eager`` attention, hand-written).
  The soft-cap is Gemma-2's ``tanh(s / cap) * cap`` (or ``tanh(s * (1/cap)) * cap``) with one
  constant ``cap``; it must come after the scale and before the mask (a mask inside the ``tanh``
  would be capped too, which is not masking).

For both, K and V are looked through ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``
or ``repeat_interleave``) to the real KV heads. A match records *why* it cannot be rewritten
instead of failing: the rewrite pass leaves such sites alone and the report shows the reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from kvfx.passes import graph_utils as gu


@dataclass
class AttentionMatch:
    pattern: str  # "sdpa" | "eager"
    out: Node  # the node producing the attention output
    q: Node
    k: Node  # as consumed, after looking through repeat_kv
    v: Node
    gqa_group: int  # query heads per KV head (from repeat_kv, or enable_gqa shapes)
    mask: Node | None = None
    mask_kind: str = "none"  # "none" | "sdpa" (as SDPA takes it) | "additive" | "fill_true"
    is_causal: bool = False
    scale: float | None = None  # a constant scale
    scale_node: Node | None = None  # a tensor scale (eager pattern)
    scale_op: str = "mul"  # how scale_node applies to the logits: "mul" | "div"
    chain: tuple = ()  # nodes made dead by a rewrite (eager pattern)
    softcap: float | None = None  # logits soft-capped as cap * tanh(logits / cap) (eager pattern)
    reason: str = ""  # non-empty: cannot be rewritten


def unrepeat(node: Node) -> tuple[Node, int, tuple]:
    """Look through repeat_kv. Returns (base node, group size, nodes of the repeat chain)."""
    if gu.is_call(node, {torch.repeat_interleave}, {"repeat_interleave"}):
        reps = gu.static_int(gu.arg(node, 1, "repeats"))
        dim = gu.arg(node, 2, "dim")
        if reps and dim in (1, -3):
            return node.args[0], reps, (node,)
    if gu.is_call(node, None, {"reshape", "view"}):
        exp = node.args[0]
        if gu.is_call(exp, None, {"expand"}) and isinstance(exp.args[0], Node):
            idx = exp.args[0]
            if (idx.op == "call_function" and idx.target is operator.getitem
                    and isinstance(idx.args[1], tuple) and len(idx.args[1]) >= 3
                    and idx.args[1][2] is None):
                s = gu.shape(exp)
                if s is not None and len(s) == 5:
                    g = gu.static_int(s[2])
                    if g:
                        return idx.args[0], g, (node, exp, idx)
    return node, 1, ()


def _transposed_operand(node: Node) -> Node | None:
    """k from kᵀ: transpose(-2, -1) / transpose(2, 3) / permute(0, 1, 3, 2) / .mT."""
    if gu.is_call(node, {torch.transpose}, {"transpose"}):
        dims = {d % 4 if isinstance(d, int) else d for d in node.args[1:3]}
        if dims == {2, 3}:
            return node.args[0]
    if gu.is_call(node, {torch.permute}, {"permute"}):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if tuple(d % 4 for d in dims) == (0, 1, 3, 2):
            return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _match_sdpa(n: Node) -> AttentionMatch:
    q, k, v = (gu.arg(n, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = gu.arg(n, 3, "attn_mask")
    dropout = gu.arg(n, 4, "dropout_p", 0.0)
    is_causal = gu.arg(n, 5, "is_causal", False)
    scale = gu.arg(n, 6, "scale", None)
    gqa = bool(n.kwargs.get("enable_gqa", False))
    kb, gk, rk = unrepeat(k)
    vb, gv, rv = unrepeat(v)
    m = AttentionMatch("sdpa", n, q, kb, vb, gk, mask=mask,
                       mask_kind="sdpa" if mask is not None else "none", chain=rk + rv)
    qs, ks = gu.shape(q), gu.shape(kb)
    if qs and ks and len(qs) == 4 and len(ks) == 4:
        hq, hkv = gu.static_int(qs[1]), gu.static_int(ks[1])
        if hq and hkv and hq % hkv == 0:
            m.gqa_group = hq // hkv
    if gk != gv:
        m.reason = "keys and values are repeated differently"
    elif not isinstance(dropout, (int, float)) or dropout != 0.0:
        m.reason = f"dropout_p={dropout} (training-style call)"
    elif not isinstance(is_causal, bool):
        m.reason = "is_causal is not a constant"
    elif scale is not None and not isinstance(scale, (int, float)):
        m.reason = "scale is not a constant"
    elif m.gqa_group > 1 and gk == 1 and not gqa:
        m.reason = "query and key heads differ without enable_gqa or repeat_kv"
    m.is_causal = bool(is_causal) if isinstance(is_causal, bool) else False
    m.scale = float(scale) if isinstance(scale, (int, float)) else None
    return m


def _match_logits(sm: Node):
    """Backward from the softmax input: (+mask | masked_fill) → (scale) → matmul(q, kᵀ)."""
    x = gu.arg(sm, 0, "input")
    found = dict(mask=None, mask_kind="none", scale=None, scale_node=None, scale_op="mul",
                 softcap=None, chain=[], reason="")
    for _ in range(6):
        if not isinstance(x, Node) or not gu.single_user(x):
            break
        if gu.is_call(x, None, {"float", "to", "type"}):
            found["chain"].append(x)
            x = x.args[0]
        elif found["softcap"] is None and found["scale"] is None and found["scale_node"] is None \
                and (cap := _softcap(x)) is not None:
            found["softcap"] = cap[0]
            found["chain"] += cap[1]
            x = cap[2]
        elif gu.is_call(x, gu.ADD_FNS, {"add", "__add__"}) and found["mask"] is None:
            a, b = x.args[0], x.args[1]
            logits, mask = (a, b) if _leads_to_qk(a) else (b, a)
            if found["softcap"] is not None:
                found["reason"] = "the mask is added before the soft-cap (tanh), which caps it too"
            found.update(mask=mask, mask_kind="additive")
            found["chain"].append(x)
            x = logits
        elif gu.is_call(x, {torch.masked_fill}, {"masked_fill"}) and found["mask"] is None:
            value = gu.arg(x, 2, "value")
            if not (isinstance(value, (int, float)) and (value == -math.inf or value < -1e4)):
                found["reason"] = f"masked_fill with value {value!r} is not a -inf mask"
            elif found["softcap"] is not None:
                found["reason"] = "the mask is applied before the soft-cap (tanh), which caps it too"
            found.update(mask=x.args[1], mask_kind="fill_true")
            found["chain"].append(x)
            x = x.args[0]
        elif (gu.is_call(x, gu.MUL_FNS | gu.DIV_FNS, {"mul", "div", "__mul__", "__truediv__"})
              and found["scale"] is None and found["scale_node"] is None):
            is_div = gu.is_call(x, gu.DIV_FNS, {"div", "__truediv__"})
            a, b = x.args[0], x.args[1]
            if not is_div and not _leads_to_qk(a):
                a, b = b, a
            if isinstance(b, (int, float)):
                found["scale"] = 1.0 / b if is_div else float(b)
            elif isinstance(b, Node) and gu.shape(b) in ((), (1,)):
                found.update(scale_node=b, scale_op="div" if is_div else "mul")
            else:
                break
            found["chain"].append(x)
            x = a
        else:
            break
    if not gu.is_matmul(x):
        return None
    k = _transposed_operand(x.args[1]) if isinstance(x.args[1], Node) else None
    if k is None:
        return None
    found["chain"] += [x, x.args[1]]
    if found["scale"] is None and found["scale_node"] is None:
        found["scale"] = 1.0  # no scaling op: the logits are used as they are
    return x.args[0], k, found


def _const(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _softcap(x: Node):
    """``cap * tanh(s / cap)`` (or ``tanh(s * (1/cap)) * cap``) ending at ``x``: (cap, its nodes, s),
    else None. The two constants must agree (to float rounding): otherwise it is not a cap."""
    if not gu.is_call(x, gu.MUL_FNS, {"mul", "__mul__"}):
        return None
    a, b = x.args[0], x.args[1]
    if _const(a) is not None:
        a, b = b, a
    cap = _const(b)
    if cap is None or cap <= 0 or not isinstance(a, Node) or not gu.single_user(a):
        return None
    if not gu.is_call(a, {torch.tanh}, {"tanh"}):
        return None
    inner = a.args[0]
    if not isinstance(inner, Node) or not gu.single_user(inner):
        return None
    s = None
    if gu.is_call(inner, gu.DIV_FNS, {"div", "__truediv__"}) and _const(inner.args[1]):
        inv, s = 1.0 / _const(inner.args[1]), inner.args[0]
    elif gu.is_call(inner, gu.MUL_FNS, {"mul", "__mul__"}):
        i = 1 if _const(inner.args[1]) is not None else 0
        inv, s = _const(inner.args[i]), inner.args[1 - i]
    if s is None or inv is None or not math.isclose(inv * cap, 1.0, rel_tol=1e-6):
        return None
    return cap, [x, a, inner], s


def _match_eager(sm: Node) -> AttentionMatch | None:
    if gu.arg(sm, 1, "dim") not in (-1, 3):
        return None
    logits = _match_logits(sm)
    if logits is None:
        return None
    q, kt, f = logits
    # forward: softmax → casts/dropout → matmul(·, v)
    chain, cur, reason = [sm] + f.pop("chain"), sm, f.pop("reason")
    out = v = None
    while out is None:
        users = list(cur.users)
        nxt = users[0] if len(users) == 1 else None
        if nxt is None:
            reason = reason or "attention weights have other users (output_attentions?)"
            out = sm
        elif gu.is_call(nxt, None, gu.CAST_METHODS):
            chain.append(nxt)
            cur = nxt
        elif gu.is_call(nxt, gu.DROPOUT_FNS, {"dropout"}):
            p, training = gu.arg(nxt, 1, "p", 0.5), gu.arg(nxt, 2, "training", True)
            if not (p == 0.0 or training is False):
                reason = reason or "attention dropout in training mode"
            chain.append(nxt)
            cur = nxt
        elif gu.is_matmul(nxt) and nxt.args[0] is cur:
            out, v = nxt, nxt.args[1]
        else:
            return None
    kb, gk, rk = unrepeat(kt)
    vb, gv, rv = (v, 1, ()) if v is None else unrepeat(v)
    if v is not None and gk != gv:
        reason = reason or "keys and values are repeated differently"
    return AttentionMatch("eager", out, q, kb, vb if vb is not None else kb, gk,
                          chain=tuple(chain) + rk + rv, reason=reason, **f)


def _leads_to_qk(node) -> bool:
    """Whether ``node`` is the logits side (derived from a matmul of q and kᵀ)."""
    for _ in range(6):
        if not isinstance(node, Node):
            return False
        if gu.is_matmul(node):
            return True
        node = next((a for a in node.args if isinstance(a, Node)), None)  # ``c * x`` too
    return False


def find_attention(graph: Graph) -> list[AttentionMatch]:
    """All attention sites in graph order."""
    found = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in gu.SDPA_TARGETS:
            found.append(_match_sdpa(n))
        elif gu.is_softmax(n):
            m = _match_eager(n)
            if m is not None:
                found.append(m)
    return found
