"""Small helpers for reading dynamo-level FX graphs (torch functions, methods and operators
all appear; these normalize them)."""

from __future__ import annotations

import operator
import re

import torch
from torch.fx import Node

SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention,
                torch._C._nn.scaled_dot_product_attention}
SOFTMAX_FNS = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}
MATMUL_FNS = {torch.matmul, operator.matmul, torch.Tensor.matmul}
CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "type_as"}
DROPOUT_FNS = {torch.nn.functional.dropout}
MUL_FNS = {operator.mul, torch.mul, operator.imul}
DIV_FNS = {operator.truediv, torch.div, torch.true_divide, operator.itruediv}
ADD_FNS = {operator.add, torch.add, operator.iadd}
CAT_FNS = {torch.cat, torch.concat, torch.concatenate}


def is_call(node, fns=None, methods=None) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function" and fns is not None and node.target in fns:
        return True
    if node.op == "call_method" and methods is not None and node.target in methods:
        return True
    return False


def is_softmax(n) -> bool:
    return is_call(n, SOFTMAX_FNS, {"softmax"})


def is_matmul(n) -> bool:
    return is_call(n, MATMUL_FNS, {"matmul", "__matmul__"})


def val(node):
    """The example value (a FakeTensor) dynamo recorded for a node, if any."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def static_int(x) -> int | None:
    """A Python int from an int or a constant SymInt; None for a symbolic size. Never calls
    ``int()`` on a symbol: that would add a guard and recompile on every new length."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt) and is_concrete_int(x):
        return int(x)
    return None


def arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def module_path(node: Node) -> str:
    """Innermost module path of a node, normalized to dotted form (``model.layers.0.self_attn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L(\[[^\]]*\])*\.?", "", path)  # the root: L['self'], L['args'][0], ...
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    path = re.sub(r"_modules\.|\._modules", "", path)
    return path.strip(".")


def layer_index(path: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def single_user(node: Node) -> bool:
    return len(node.users) == 1
