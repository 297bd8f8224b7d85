"""Storage of kvfx's low-bit caches: bit packing, the full-precision outlier pool, byte accounting.

The quantization math lives in :mod:`kvfx.methods.quant` (which re-exports everything here).

Notation: ``b`` bits per code, ``per_word = 32 // b`` codes per word. Along the packed axis, code
``i`` lives in word ``i // per_word`` at bit offset ``(i % per_word) * b`` (little-endian inside the
word: code 0 in the lowest bits). Words are ``int32`` (Triton loads them as such); the top code of a
word may set the sign bit, which :func:`unpack` masks off.

    >>> import torch
    >>> codes = torch.tensor([[1, 2, 3, 0] * 4], dtype=torch.uint8)   # 16 two-bit codes
    >>> words = pack(codes, 2)                                         # (1, 1) int32
    >>> bool((unpack(words, 2, 16) == codes).all())
    True
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

BITS = (2, 4, 8)

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def per_word(bits: int) -> int:
    """Codes per int32 word for ``bits`` in {2, 4, 8}."""
    check_bits(bits)
    return 32 // bits


def check_bits(bits: int, name: str = "bits") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{name}: got {bits!r}, expected one of 2, 4, 8")


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(32 // bits, device=device, dtype=torch.int64) * bits


def pack(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integer codes (..., n) in [0, 2^bits) into int32 words (..., n * bits / 32).

    ``dim`` selects the packed axis (default the last); the other axes keep their sizes. ``n`` must
    be a multiple of ``32 // bits``. Codes out of range raise in eager mode (the check is skipped
    under ``torch.compile``, where it would force a host sync).
    """
    pw = per_word(bits)
    if codes.dtype not in _INT_DTYPES:
        raise ValueError(f"pack: codes dtype {codes.dtype} is not an integer dtype; "
                         "pass uint8 (or another integer dtype) codes")
    if codes.ndim == 0:
        raise ValueError("pack: codes is a 0-d tensor; pass at least one axis to pack along")
    dim = dim % codes.ndim
    n = codes.shape[dim]
    if n % pw:
        raise ValueError(f"pack: axis {dim} has {n} codes, expected a multiple of {pw} "
                         f"(32 // bits for bits={bits}); pad the codes to {(n // pw + 1) * pw}")
    c = codes.movedim(dim, -1).to(torch.int64)
    if not torch.compiler.is_compiling() and c.numel() and (c.min() < 0 or c.max() >= 1 << bits):
        raise ValueError(f"pack: codes span [{int(c.min())}, {int(c.max())}], expected [0, "
                         f"{(1 << bits) - 1}] for bits={bits}")
    c = c.reshape(*c.shape[:-1], n // pw, pw)
    w = (c << _shifts(bits, c.device)).sum(-1)  # disjoint bit fields: sum == or, < 2^32
    w = torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)  # two's complement wrap
    return w.movedim(-1, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words (..., n * bits / 32) -> uint8 codes (..., n)."""
    pw = per_word(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"unpack: words dtype {words.dtype}, expected torch.int32 (from pack)")
    if n % pw:
        raise ValueError(f"unpack: n={n} is not a multiple of {pw} (32 // bits for bits={bits})")
    dim = dim % words.ndim
    if words.shape[dim] != n // pw:
        raise ValueError(f"unpack: axis {dim} holds {words.shape[dim]} words, expected n * bits / 32 "
                         f"= {n // pw} for n={n}, bits={bits}")
    # [Note] int32 shifts in place along ``dim`` (no movedim, no int64): an arithmetic shift of a
    # negative word sign-extends, but the mask keeps only the code's own bits.
    shape = [1] * (words.ndim + 1)
    shape[dim + 1] = pw
    shifts = (torch.arange(pw, dtype=torch.int32, device=words.device) * bits).view(shape)
    c = (words.unsqueeze(dim + 1) >> shifts) & ((1 << bits) - 1)
    out = list(words.shape)
    out[dim] = n
    return c.to(torch.uint8).reshape(out)


# --- outlier pool ------------------------------------------------------------------------------

class Evicted(NamedTuple):
    """Entries that left an :class:`OutlierPool` (rows with ``pos < 0`` are padding)."""

    keys: torch.Tensor  # (B, H, n, d)
    values: torch.Tensor  # (B, H, n, dv)
    pos: torch.Tensor  # (B, H, n) int32
    norms: torch.Tensor  # (B, H, n) fp32


class OutlierPool:
    """Full-precision outlier keys and values, ``capacity`` entries per (batch, head).

    Static buffers updated in place: ``keys`` (B, H, C, d), ``values`` (B, H, C, dv), ``pos``
    (B, H, C) int32 logical positions (-1 = empty), ``norms`` (B, H, C) fp32 (+inf = empty).

    :meth:`add` keeps, among the held and the new entries, the ``capacity`` with the smallest norm
    (ALGORITHMS.md: "when full keep the smallest-norm entries"; ties keep the older entry) and
    RETURNS the others. The pool does not decide their fate: the caller either drops them (their
    key slot stays masked, so the token leaves attention) or re-quantizes them into their group's
    existing scale/min (clamped) and clears the mask. Entry order inside the pool is by norm.

        >>> pool = OutlierPool(1, 2, capacity=4, key_dim=16, dtype=torch.float32)
        >>> ev = pool.add(torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16),
        ...               torch.arange(6).expand(1, 2, 6), torch.rand(1, 2, 6))
        >>> pool.count.tolist(), ev.pos.shape
        ([[4, 4]], torch.Size([1, 2, 6]))
    """

    def __init__(self, batch: int, heads: int, capacity: int, key_dim: int, value_dim: Optional[int] = None,
                 *, dtype: torch.dtype = torch.float16, device=None):
        for name, n in (("batch", batch), ("heads", heads), ("capacity", capacity), ("key_dim", key_dim)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"OutlierPool.{name}: got {n!r}, expected a positive int")
        dv = key_dim if value_dim is None else value_dim
        self.keys = torch.zeros(batch, heads, capacity, key_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch, heads, capacity, dv, dtype=dtype, device=device)
        self.pos = torch.full((batch, heads, capacity), -1, dtype=torch.int32, device=device)
        self.norms = torch.full((batch, heads, capacity), float("inf"), dtype=torch.float32, device=device)

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]

    @property
    def occupied(self) -> torch.Tensor:
        """(B, H, C) bool: True where an entry is held."""
        return self.pos >= 0

    @property
    def count(self) -> torch.Tensor:
        """(B, H) entries held."""
        return self.occupied.sum(-1)

    def add(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
            norms: torch.Tensor) -> Evicted:
        """Offer n entries per (b, h): keys (B, H, n, d), values (B, H, n, dv), pos (B, H, n) (-1 =
        no entry), norms (B, H, n). Returns the n entries that are not kept (see the class doc)."""
        B, H, C, d = self.keys.shape
        n = pos.shape[-1] if pos.ndim == 3 else -1
        want = {"keys": (B, H, n, d), "values": (B, H, n, self.values.shape[-1]), "pos": (B, H, n),
                "norms": (B, H, n)}
        for name, t in (("keys", keys), ("values", values), ("pos", pos), ("norms", norms)):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"OutlierPool.add: {name} has shape {tuple(t.shape)}, expected {want[name]}")
        for name, t in (("keys", keys), ("values", values)):
            if t.dtype != self.keys.dtype:
                raise ValueError(f"OutlierPool.add: {name} dtype {t.dtype}, expected the pool's "
                                 f"{self.keys.dtype} (a cast would break bit-exact outliers); build the "
                                 "pool with that dtype")
        pos = pos.to(torch.int32)
        norms = torch.where(pos >= 0, norms.float(), float("inf"))
        cat = [torch.cat(p, dim=2) for p in ((self.keys, keys), (self.values, values), (self.pos, pos),
                                             (self.norms, norms))]
        order = torch.sort(cat[3], dim=-1, stable=True).indices

        def take(t, idx):
            return torch.gather(t, 2, idx.view(*idx.shape, *([1] * (t.ndim - 3))).expand(
                *idx.shape, *t.shape[3:]))

        keep, out = order[..., :C], order[..., C:]
        evicted = Evicted(*(take(t, out) for t in cat))
        for buf, t in zip((self.keys, self.values, self.pos, self.norms), cat):
            buf.copy_(take(t, keep))
        return evicted


# --- byte accounting -----------------------------------------------------------------------------

def nbytes(obj) -> int:
    """Bytes held by the tensors of a QuantizedKeys / QuantizedValues / OutlierPool / tensor, or a
    list or tuple of them (numel * element size; a bool mask counts one byte per slot)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # QuantizedKeys / QuantizedValues
        fields = (getattr(obj, f.name) for f in dataclasses.fields(obj))
        return sum(nbytes(t) for t in fields if isinstance(t, torch.Tensor))
    if isinstance(obj, OutlierPool):
        return sum(nbytes(t) for t in (obj.keys, obj.values, obj.pos, obj.norms))
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    raise TypeError(f"nbytes: got {type(obj).__name__}, expected a tensor, QuantizedKeys, QuantizedValues, "
                    "OutlierPool, or a list/tuple of them")


def dense_bytes(B: int, H: int, T: int, d: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of ONE dense (B, H, T, d) cache tensor (keys or values; a K+V cache is twice this)."""
    return B * H * T * d * dtype.itemsize
