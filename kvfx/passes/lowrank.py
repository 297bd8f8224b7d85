"""The low-rank (ReCalKV) check: can a site's keys and values be stored as latents?

A site qualifies when, in the dynamo graph,

    v     = linear(x, W_v, None).view(B, T, Hkv, d).transpose(1, 2)
    k_pre = linear(x, W_k, None).view(B, T, Hkv, d).transpose(1, 2)
    k     = k_pre · cos + cat(-k_pre[..., d/2:], k_pre[..., :d/2]) · sin     (HF apply_rotary_pos_emb)

with cos / sin of shape (B | 1, 1, T, d), and the artifact has factors for the layer. The rewrite
then hands the projections' inputs x and weights W_k, W_v, and ``cos`` / ``sin``, to
``kvfx::lowrank_attention`` instead of k and v: k_proj, v_proj, their reshapes and the keys' RoPE
leave the graph (dead code, erased), the cache receives the ghosts ``kvfx::lowrank_attention`` returns, and the op
computes the latent down-projection x·(Qᵀ W)ᵀ itself (exact x·Wᵀ only for the prompt's own
attention).

Left alone, with the reason in the site report: a bias on k_proj / v_proj (ReCalKV reconstructs
x Rᵀ Lᵀ + b; the projection of the model's keys would also project b), fused QKV projections
(GPT-2), keys without this RoPE pattern (interleaved or partial rotary, no RoPE), or a layer the
artifact has no factors for. An artifact whose shapes do not fit the site is an error.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from kvfx.passes import graph_utils as gu

LINEAR_FNS = {torch.nn.functional.linear, torch._C._nn.linear}
NEG_FNS = {operator.neg, torch.neg}
_PASS_THROUGH = {"unsqueeze", "to", "float", "type", "contiguous", "type_as"}
_ROPE = "x·cos + rotate_half(x)·sin"


def _mul_operands(n) -> tuple | None:
    if gu.is_call(n, gu.MUL_FNS, {"mul", "__mul__"}) and len(n.args) == 2 \
            and all(isinstance(a, Node) for a in n.args):
        return n.args
    return None


def _half_slice(index, d: int):
    """'lo' for x[..., :d/2], 'hi' for x[..., d/2:], else None."""
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    if any(not (i is Ellipsis or i == slice(None)) for i in index[:-1]):
        return None
    if Ellipsis not in index[:-1] and len(index) != 4:
        return None
    s, h = index[-1], d // 2
    if s.step not in (None, 1):
        return None
    if s.start in (None, 0) and s.stop == h:
        return "lo"
    if s.start == h and s.stop is None:
        return "hi"
    return None


def _rotate_half_of(n, d: int) -> Node | None:
    """x if n is cat((-x[..., d/2:], x[..., :d/2]), dim=-1)."""
    if not gu.is_call(n, gu.CAT_FNS, {"cat"}):
        return None
    parts, dim = gu.arg(n, 0, "tensors"), gu.arg(n, 1, "dim", 0)
    if dim not in (-1, 3) or not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    neg, lo = parts
    if not (gu.is_call(neg, NEG_FNS, {"neg", "__neg__"}) and isinstance(neg.args[0], Node)):
        return None
    hi = neg.args[0]
    ok = [isinstance(t, Node) and t.op == "call_function" and t.target is operator.getitem
          for t in (hi, lo)]
    if not all(ok) or hi.args[0] is not lo.args[0]:
        return None
    if _half_slice(hi.args[1], d) != "hi" or _half_slice(lo.args[1], d) != "lo":
        return None
    return lo.args[0]


def match_rope(k: Node) -> tuple[Node, Node, Node] | str:
    """(k_pre, cos, sin) for k = k_pre·cos + rotate_half(k_pre)·sin, else the reason."""
    ks = gu.shape(k)
    d = gu.static_int(ks[-1]) if ks else None
    if not gu.is_call(k, gu.ADD_FNS, {"add", "__add__"}) or not d or d % 2:
        return f"the keys are not rotated as {_ROPE} (no RoPE, or another form)"
    a, b = k.args[0], k.args[1]
    for m1, m2 in ((a, b), (b, a)):
        p1, p2 = _mul_operands(m1), _mul_operands(m2)
        if p1 is None or p2 is None:
            continue
        for rot, sin in (p2, p2[::-1]):
            x = _rotate_half_of(rot, d)
            if x is None or x not in p1:
                continue
            cos = p1[1] if p1[0] is x else p1[0]
            for t in (cos, sin):
                s = gu.shape(t)
                if s is None or len(s) != 4 or gu.static_int(s[1]) != 1 or gu.static_int(s[-1]) != d:
                    return (f"the RoPE cos/sin have shape {s}, expected (B, 1, T, {d}) (unsqueezed "
                            "over heads)")
            return x, cos, sin
    return f"the keys are not rotated as {_ROPE} (no RoPE, or another form)"


def match_projection(x: Node, what: str) -> tuple[Node | None, str]:
    """(the Linear node, '') if x = linear(h, W, None).view/reshape(B, T, H, d).transpose(1, 2),
    else (None, the reason)."""
    if not (gu.is_call(x, {torch.transpose}, {"transpose"})
            and {a % 4 for a in x.args[1:3] if isinstance(a, int)} == {1, 2}):
        return None, f"the {what} are not a (B, T, H, d) projection transposed to (B, H, T, d)"
    view = x.args[0]
    if not gu.is_call(view, None, {"view", "reshape"}):
        return None, f"the {what} are not a reshaped Linear output"
    lin = view.args[0]
    if not (isinstance(lin, Node) and lin.op == "call_function" and lin.target in LINEAR_FNS):
        return None, (f"the {what} do not come from their own Linear (fused QKV projection?); the low-rank "
                      "store needs separate k_proj / v_proj")
    if gu.arg(lin, 2, "bias") is not None:
        return None, (f"the {what} projection has a bias; ReCalKV rebuilds x·Rᵀ·Lᵀ + b, which kvfx cannot "
                      "take from the model's keys")
    h, w = gu.arg(lin, 0, "input"), gu.arg(lin, 1, "weight")
    hv, wv, ov = gu.val(h), gu.val(w), gu.val(lin)
    if not all(isinstance(t, torch.Tensor) for t in (hv, wv, ov)) or hv.dim() != 3 or wv.dim() != 2:
        return None, f"the {what} projection's input is not a (B, T, D) tensor with a (H·d, D) weight"
    if not hv.dtype == wv.dtype == ov.dtype:
        return None, (f"the {what} projection computes in {ov.dtype} from {hv.dtype} inputs and {wv.dtype} "
                      "weights (autocast?); kvfx runs its down-projection in one dtype")
    return lin, ""


def rope_source(cos: Node, owners: dict) -> str:
    """A key for the RoPE table shared by the sites rotated by the same cos/sin: the module that
    made them (e.g. ``model.rotary_emb``), stable across prefill and decode graphs. ``owners``
    ({key: root node}, one per graph) keeps two different cos tensors of a graph apart."""
    root = cos
    while gu.is_call(root, None, _PASS_THROUGH) and isinstance(root.args[0], Node):
        root = root.args[0]
    key = f"rope:{gu.module_path(root) or root.name}"
    if owners.setdefault(key, root) is not root:
        key = f"{key}#{root.name}"
    return key


@dataclass
class LowRankPlan:
    """What the rewrite of a low-rank site needs (node arguments of ``kvfx::lowrank_attention``)."""

    x_k: Node
    w_k: Node
    x_v: Node
    w_v: Node
    cos: Node
    sin: Node
    rope_key: str
    heads: int
    head_dim: int


def check_lowrank(match, ks, vs, compressor, info, owners: dict):
    """(:class:`LowRankPlan`, "") if the site can hold latents, else (None, reason). ``owners``:
    see :func:`rope_source`.

    Raises:
        kvfx.calibrate.ArtifactError: the artifact's factors do not fit the site's heads.
    """
    if compressor.factors is None:
        return None, (f"the ReCalKV artifact {compressor.artifact} has no factors for layer "
                      f"{compressor.layer}")
    lin_v, reason = match_projection(vs.new, "values")
    if reason:
        return None, reason
    found = match_rope(ks.new)
    if isinstance(found, str):
        return None, found
    k_pre, cos, sin = found
    lin_k, reason = match_projection(k_pre, "keys")
    if reason:
        return None, reason
    if gu.shape(vs.new)[-1] != info.head_dim:
        return None, (f"the values have head dim {gu.shape(vs.new)[-1]} and the keys {info.head_dim}; "
                      "the low-rank store rebuilds both with one head dim")
    if (info.kv_heads, info.head_dim) != (compressor.kv_heads, compressor.head_dim):
        from kvfx.calibrate import ArtifactError

        raise ArtifactError(
            f"ReCalKV artifact {compressor.artifact}: layer {compressor.layer} factors are for "
            f"{compressor.kv_heads} KV heads x {compressor.head_dim}, site {info.module_path} has "
            f"{info.kv_heads} x {info.head_dim}; fix: calibrate for this model with `kvfx calibrate "
            "--model <this model> --keep-rank K --out F.safetensors`")
    return LowRankPlan(gu.arg(lin_k, 0, "input"), gu.arg(lin_k, 1, "weight"), gu.arg(lin_v, 0, "input"),
                       gu.arg(lin_v, 1, "weight"), cos, sin, rope_source(cos, owners),
                       info.kv_heads, info.head_dim), ""
