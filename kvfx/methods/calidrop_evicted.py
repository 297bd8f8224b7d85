"""CaliDrop's recompute tier: the evicted keys and values, in low bit (KIVI layout) — DERIVED.

ALGORITHMS.md (CaliDrop, 2): "a recompute tier that keeps E in low bit and recomputes O_E, LSE_E
exactly for q_t". This module is that store. Per (batch row, KV head) it holds

    body   T tokens (T a multiple of ``group``) quantized as KIVI does (:mod:`kvfx.methods.quant`):
           keys per channel over groups of ``group`` consecutive tokens, values per token over
           groups of ``vgroup`` channels, ``bits``-bit codes packed in int32 words, half scale/min;
    tail   fewer than ``group`` full-precision tokens that have not filled a key group yet
           (decode-time evictions arrive a few at a time); a tail that reaches ``group`` tokens
           is quantized into the body.

``ok`` masks (body and tail) mark the slots that hold an evicted token: a slot without one never
enters a group's min/max and never takes part in attention. With ``bits=None`` everything stays
in the tail (full precision): the store the tier had before low-bit storage existed, and the
float64 oracle of the tests.

Recomputation over the store is exact attention over the *dequantized* body and the tail: the
only error is the quantizer's (|x − x̂| <= s/2 per element, s the group's step).

    >>> k = v = torch.randn(1, 2, 70, 64); ok = torch.ones(1, 2, 70, dtype=torch.bool)
    >>> ev = EvictedKV.build(k, v, ok, bits=2)
    >>> ev.body_tokens, ev.tail_k.shape[2], int(ev.count().sum())
    (64, 6, 140)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from kvfx.methods.quant import (QuantizedKeys, QuantizedValues, dequantize_keys_block, dequantize_values_block,
                                nbytes, quantize_keys, quantize_values)
from kvfx.methods.quant_pack import check_bits, per_word

__all__ = ["EvictedKV", "value_group"]

_CHUNK = 1024  # body tokens dequantized at a time by `blocks`


def value_group(dv: int, bits: int, group: int = 32) -> int:
    """The value group of a `dv`-channel head: the largest divisor of `dv` that is at most
    `group` and a multiple of 32 // bits (a group fills whole int32 words).

    Raises:
        ValueError: no such divisor (`dv` is not a multiple of 32 // bits).
    """
    pw = per_word(bits)
    for gsize in range(min(group, dv), 0, -1):
        if dv % gsize == 0 and gsize % pw == 0:
            return gsize
    raise ValueError(f"calibration.recompute.bits: got {bits}, but the value head dim {dv} is not a multiple of "
                     f"32 // bits = {pw}; use bits: 8 (or a model whose head dim is a multiple of {pw})")


def _cat_keys(a: Optional[QuantizedKeys], b: QuantizedKeys) -> QuantizedKeys:
    if a is None:
        return b
    return dataclasses.replace(a, codes=torch.cat([a.codes, b.codes], 2), scale=torch.cat([a.scale, b.scale], 2),
                               min=torch.cat([a.min, b.min], 2), masked=torch.cat([a.masked, b.masked], 2))


def _cat_values(a: Optional[QuantizedValues], b: QuantizedValues) -> QuantizedValues:
    if a is None:
        return b
    return dataclasses.replace(a, codes=torch.cat([a.codes, b.codes], 2), scale=torch.cat([a.scale, b.scale], 2),
                               min=torch.cat([a.min, b.min], 2))


@dataclass(eq=False)
class EvictedKV:
    """The recompute tier's evicted K/V (see the module docstring). Functional: `append`
    returns a new store. Shapes: keys/values (B, Hkv, ·, d) and (B, Hkv, ·, dv)."""

    bits: Optional[int]
    group: int
    vgroup: int
    keys: Optional[QuantizedKeys]  # body, T tokens; keys.masked (B, Hkv, T): no token in the slot
    values: Optional[QuantizedValues]
    tail_k: torch.Tensor  # (B, Hkv, t, d), t < group (any t when bits is None)
    tail_v: torch.Tensor
    tail_ok: torch.Tensor  # (B, Hkv, t) bool; K/V are zero where False

    @property
    def ok(self) -> Optional[torch.Tensor]:
        """(B, Hkv, T) bool: body slots that hold an evicted token (None: no body yet)."""
        return None if self.keys is None else ~self.keys.masked

    @property
    def body_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.masked.shape[2]

    @classmethod
    def build(cls, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor, *, bits: Optional[int] = None,
              group: int = 32) -> "EvictedKV":
        """From evicted tokens k, v (B, Hkv, m, d/dv) with ok (B, Hkv, m) bool (False: no token,
        K/V ignored). ``bits``: 2, 4, 8, or None (full precision); ``group``: tokens per key group
        (a multiple of 32 // bits) and the largest value group."""
        if bits is not None:
            check_bits(bits)
            if group < 1 or group % per_word(bits):
                raise ValueError(f"EvictedKV: group got {group}, expected a positive multiple of 32 // bits = "
                                 f"{per_word(bits)}")
        vg = value_group(v.shape[-1], bits, group) if bits is not None else 0
        empty = cls(bits, group, vg, None, None, k[:, :, :0], v[:, :, :0], ok[:, :, :0])
        return empty.append(k, v, ok)

    def append(self, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor) -> "EvictedKV":
        """A store that also holds the tokens k, v (B, Hkv, m, ·) where ok (B, Hkv, m)."""
        k = k.to(self.tail_k.dtype).masked_fill(~ok[..., None], 0)
        v = v.to(self.tail_v.dtype).masked_fill(~ok[..., None], 0)
        tail_k = torch.cat([self.tail_k, k], 2)
        tail_v = torch.cat([self.tail_v, v], 2)
        tail_ok = torch.cat([self.tail_ok, ok], 2)
        new = dataclasses.replace(self, tail_k=tail_k, tail_v=tail_v, tail_ok=tail_ok)
        if self.bits is None:
            return new
        full = tail_k.shape[2] // self.group * self.group
        if full == 0:
            return new
        part = slice(0, full)
        qk = quantize_keys(tail_k[:, :, part], self.bits, self.group, valid=tail_ok[:, :, part])
        qv = quantize_values(tail_v[:, :, part], self.bits, self.vgroup)
        new.keys, new.values = _cat_keys(self.keys, qk), _cat_values(self.values, qv)
        new.tail_k, new.tail_v = tail_k[:, :, full:].clone(), tail_v[:, :, full:].clone()
        new.tail_ok = tail_ok[:, :, full:].clone()
        return new

    def blocks(self, dtype: torch.dtype, chunk: int = _CHUNK) -> Iterator[tuple]:
        """(k, v, ok) in ``dtype`` for chunks of the body (dequantized, at most ~``chunk`` tokens
        at a time: no dequantized copy of the whole body), then the tail."""
        T = self.body_tokens
        step = max(self.group, chunk // self.group * self.group)
        ok = self.ok
        for s0 in range(0, T, step):
            s1 = min(T, s0 + step)
            k = dequantize_keys_block(self.keys, s0 // self.group, (s1 - s0) // self.group, dtype)
            v = dequantize_values_block(self.values, s0, s1 - s0, dtype)
            yield k, v, ok[:, :, s0:s1]
        if self.tail_k.shape[2]:
            yield self.tail_k.to(dtype), self.tail_v.to(dtype), self.tail_ok

    def count(self) -> torch.Tensor:
        """(B, Hkv) evicted tokens held."""
        n = self.tail_ok.sum(-1)
        return n if self.keys is None else n + self.ok.sum(-1)

    def nbytes(self) -> int:
        """Bytes of every tensor held (codes, statistics, masks, the full-precision tail)."""
        total = sum(t.nbytes for t in (self.tail_k, self.tail_v, self.tail_ok))
        if self.keys is not None:  # codes, scale, min and the slot mask
            total += nbytes(self.keys) + nbytes(self.values)
        return total

    def describe(self) -> str:
        return "full precision" if self.bits is None else f"{self.bits}-bit, groups of {self.group}"
