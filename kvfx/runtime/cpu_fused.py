"""The CPU read path of quantized stores: the ``methods/`` reductions compiled by inductor.

:func:`kvfx.methods.quant_attention.quant_attention_split` is the quantized attention reference
with its two reductions over the quantized slots (q·k̂ over channels, p·v̂ over slots) written as
loop-free expressions, :func:`~kvfx.methods.quant_attention.quant_key_logits` and
:func:`~kvfx.methods.quant_attention.quant_value_sum`. Here each of them is compiled once per
shape class by ``torch.compile`` (inductor's vectorized C++): unpacking and dequantization are
fused into the reduction, so a decode step reads the packed codes once and never materializes
a dequantized copy of the cache (the eager reference dequantizes 1024-slot chunks in fp32).

Shape class: the bits and group sizes, batch, KV heads, query rows per KV head and head dims
are static; the slot counts are marked dynamic (``torch._dynamo.maybe_mark_dynamic``), so a
growing cache does not recompile. Each compiled function has its own recompile budget
(``isolate_recompiles``); past it dynamo runs the same functions uncompiled (same results,
slower). Nothing here changes a process-wide torch setting.

When it runs (:func:`use_compiled`): CPU tensors, at least :data:`MIN_SLOTS` quantized key slots
(below that the reference's chunks are as fast and no compile is worth it), and not disabled
with ``KVFX_CPU_COMPILE=0``. The result equals the reference's up to fp32 rounding (the
dequantization is folded into the dot products; tests bound the difference).
"""

from __future__ import annotations

import os

import torch

from kvfx.methods.quant_attention import QuantKV, quant_key_logits, quant_value_sum

MIN_SLOTS = 1024  # quantized key slots (a row's nk) from which the compiled path runs

_compiled: dict = {}


def use_compiled(q: torch.Tensor, kv: QuantKV) -> bool:
    """Whether a CPU read of ``kv`` by ``q`` runs the compiled reductions (module docstring)."""
    if q.is_cuda or os.environ.get("KVFX_CPU_COMPILE", "1") == "0":
        return False
    return kv.nk >= MIN_SLOTS


def _own_code(fn, name: str):
    """``fn`` with a code object of its own named ``name``. [Note] dynamo keeps compiled graphs,
    recompile counts and automatic-dynamic decisions per code object (and code name): variants
    sharing one (closures over other bits) would make the second variant's bits dynamic, symbolic
    in the generated C++, which ran 5× slower (kivi4 after kivi2 in one process, measured)."""
    fn.__code__ = fn.__code__.replace(co_name=name, co_qualname=name)
    return fn


def _get(kind: str, a: int, b: int):
    fn = _compiled.get((kind, a, b))
    if fn is None:
        if kind == "keys":
            def keys(qs, qm, kcodes):
                return quant_key_logits(qs, qm, kcodes, kbits=a, kgroup=b)
            fn = torch.compile(_own_code(keys, f"kvfx_keys_{a}_{b}"), fullgraph=True, isolate_recompiles=True)
        else:
            def values(p, vcodes, vscale, vmin):
                return quant_value_sum(p, vcodes, vscale, vmin, vbits=a, vgroup=b)
            fn = torch.compile(_own_code(values, f"kvfx_values_{a}_{b}"), fullgraph=True,
                               isolate_recompiles=True)
        _compiled[(kind, a, b)] = fn
    return fn


def key_logits(qs, qm, kcodes, *, kbits: int, kgroup: int) -> torch.Tensor:
    """:func:`kvfx.methods.quant_attention.quant_key_logits`, compiled."""
    for t, dim in ((qs, 3), (qm, 3), (kcodes, 2)):
        torch._dynamo.maybe_mark_dynamic(t, dim)
    return _get("keys", kbits, kgroup)(qs, qm, kcodes)


def value_sum(p, vcodes, vscale, vmin, *, vbits: int, vgroup: int) -> torch.Tensor:
    """:func:`kvfx.methods.quant_attention.quant_value_sum`, compiled."""
    for t, dim in ((p, 3), (vcodes, 2), (vscale, 2), (vmin, 2)):
        torch._dynamo.maybe_mark_dynamic(t, dim)
    return _get("values", vbits, vgroup)(p, vcodes, vscale, vmin)


def use_compiled_flush(v: torch.Tensor, nk: int) -> bool:
    """Whether a decode step's value flush (one slot per row: ``v`` (B, H, 1, dv)) of a store that
    holds ``nk`` quantized key slots is quantized by the compiled :func:`quantize_values`: the same
    stores that read through the compiled reductions (a decode step then runs one kernel instead of
    some thirty small eager ops per site)."""
    return (not v.is_cuda and v.shape[2] == 1 and nk >= MIN_SLOTS
            and os.environ.get("KVFX_CPU_COMPILE", "1") != "0")


def quantize_values(v: torch.Tensor, bits: int, group: int, stat_dtype: torch.dtype):
    """:func:`kvfx.methods.quant.quantize_values` compiled: (codes, scale, min), bit for bit the
    eager result (tests). Its eager-only check that every statistic is finite runs here after the
    call, with the same error."""
    from kvfx.methods.quant import quantize_values as eager

    key = ("flush", bits, group, stat_dtype)
    fn = _compiled.get(key)
    if fn is None:
        from kvfx.methods.quant import _quantize_groups, pack

        def flush(x):  # quantize_values' body, without its argument checks (done eagerly above)
            B, H, T, d = x.shape
            q, s, m = _quantize_groups(x.float().reshape(B, H, T, d // group, group), bits, stat_dtype, dim=4)
            return pack(q.reshape(B, H, T, d), bits, dim=-1), s, m
        name = f"kvfx_flush_{bits}_{group}_{str(stat_dtype).split('.')[-1]}"
        fn = _compiled[key] = torch.compile(_own_code(flush, name), fullgraph=True, isolate_recompiles=True)
    if v.dtype == torch.float64 or v.shape[-1] % group or v.shape[-1] % (32 // bits):
        return _as_tuple(eager(v, bits, group, stat_dtype=stat_dtype))  # its checks and errors
    codes, scale, mn = fn(v)
    if not (torch.isfinite(scale).all() and torch.isfinite(mn).all()):
        eager(v, bits, group, stat_dtype=stat_dtype)  # raises the eager error, naming the fix
    return codes, scale, mn


def _as_tuple(qv):
    return qv.codes, qv.scale, qv.min
