"""KIVI low-bit quantization (arXiv 2402.02750) and outlier tokens tracing (arXiv 2505.10938).

Plain PyTorch: the semantic reference for the Triton kernels (ALGORITHMS.md, "KIVI" and "Outlier
tokens tracing"). Notation: k, v (B, H, T, d); ``b`` bits, L = 2^b - 1 levels above zero, ``G`` the
group size. Keys are quantized per channel over G consecutive tokens, values per token over G
consecutive channels. Per group: scale s = (max - min) / L, q = round(clamp((x - m) / s, 0, L)),
x_hat = q * s + m. Codes are packed into int32 words (:mod:`kvfx.methods.quant_pack`):

* keys   ``codes (B, H, T*b/32, d)``: packed along tokens (word w, channel c holds tokens
  w*32/b ..); ``scale``, ``min`` (B, H, T/G, d).
* values ``codes (B, H, T, d*b/32)``: packed along channels; ``scale``, ``min`` (B, H, T, d/G).

[Note] Rounding of the statistics. ``scale`` and ``min`` are stored in a half dtype (``stat_dtype``)
and the codes are computed from the STORED values. ``min`` is rounded down (m <= min) and
s = (max - m) / L is rounded up (both from float64), so m + L*s >= max: every x of the group has
(x - m)/s in [0, L], the clamp never bites and, in exact arithmetic, |x - x_hat| <= s/2 with s
the stored scale. The rounding of min costs no separate slack term: it widens the range by at
most ulp(min), i.e. s by at most ulp(min)/L + ulp(s) over (max - min)/L. The codes and x_hat are
evaluated in fp32 (u = 2^-24), which adds at most
2u|x - m| (code choice) + u|x_hat| (dequantization), so the tested bound is

    |x - x_hat| <= s/2 + 2^-22 * (|x - m| + |x_hat|)        (x_hat in fp32)

plus half an ulp of x_hat when it is cast to a half output dtype. A flat group (max == m) stores
s = 1 with codes 0, so x_hat = m = x exactly (no NaN). float16 statistics need min >= -65504 and
(max - min)/L <= 65504 per group (a min above 65504 rounds down to 65504, which is still valid);
otherwise the quantizers raise and suggest bfloat16.

    >>> k = torch.randn(1, 2, 64, 16)
    >>> qk = quantize_keys(k, bits=2, group=32)
    >>> qk.codes.shape, qk.scale.shape, dequantize_keys(qk).shape
    (torch.Size([1, 2, 4, 16]), torch.Size([1, 2, 2, 16]), torch.Size([1, 2, 64, 16]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvfx.methods.quant_pack import (BITS, Evicted, OutlierPool, check_bits, dense_bytes, nbytes, pack,
                                     per_word, unpack)

__all__ = ["BITS", "QuantizedKeys", "QuantizedValues", "quantize_keys", "quantize_values",
           "dequantize_keys", "dequantize_keys_block", "dequantize_values", "dequantize_values_block",
           "token_norms", "select_outliers", "quantize_keys_with_outliers", "OutlierPool", "Evicted",
           "nbytes", "dense_bytes", "pack", "unpack"]

STAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, eq=False)
class QuantizedKeys:
    """Per-channel quantized keys. ``masked`` (B, H, T) bool, or None: True where the slot's
    quantized key must not be used (invalid token or traced outlier; its codes hold the group mean)."""

    codes: torch.Tensor  # int32 (B, H, T*bits/32, d)
    scale: torch.Tensor  # stat_dtype (B, H, T/group, d)
    min: torch.Tensor  # stat_dtype (B, H, T/group, d)
    bits: int
    group: int
    dtype: torch.dtype  # dtype of the original keys, the default output dtype
    masked: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple:
        B, H, W, d = self.codes.shape
        return (B, H, W * per_word(self.bits), d)


@dataclass(frozen=True, eq=False)
class QuantizedValues:
    """Per-token quantized values."""

    codes: torch.Tensor  # int32 (B, H, T, d*bits/32)
    scale: torch.Tensor  # stat_dtype (B, H, T, d/group)
    min: torch.Tensor  # stat_dtype (B, H, T, d/group)
    bits: int
    group: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple:
        B, H, T, W = self.codes.shape
        return (B, H, T, W * per_word(self.bits))


# --- checks ------------------------------------------------------------------------------------

def _eager() -> bool:
    return not torch.compiler.is_compiling()


def _check_4d(name: str, x: torch.Tensor) -> tuple:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"{name}: got a {x.ndim}-d {x.dtype} tensor, expected a floating (B, H, T, d) "
                         "tensor")
    return tuple(x.shape)


def _check_group(name: str, group: int, size: int, axis: str, fix: str) -> None:
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group: got {group!r}, expected a positive int (e.g. 32)")
    if size % group:
        raise ValueError(f"{name}: {axis}={size} is not a multiple of group={group}; {fix}")


def _stat_dtype(x_dtype: torch.dtype, stat_dtype: Optional[torch.dtype]) -> torch.dtype:
    if stat_dtype is None:
        return x_dtype if x_dtype in (torch.float16, torch.bfloat16) else torch.float16
    if stat_dtype not in STAT_DTYPES:
        raise ValueError(f"stat_dtype: got {stat_dtype}, expected torch.float16, torch.bfloat16 or "
                         "torch.float32")
    return stat_dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_valid(valid: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
    if valid.dtype != torch.bool:
        raise ValueError(f"valid: dtype {valid.dtype}, expected a torch.bool mask (True = real token)")
    try:
        return valid.expand(B, H, T)
    except RuntimeError:
        raise ValueError(f"valid: shape {tuple(valid.shape)} does not broadcast to (B, H, T) = "
                         f"{(B, H, T)}") from None


def _check_excluded(excluded: str) -> str:
    if excluded not in ("mean", "clamp"):
        raise ValueError(f"excluded: got {excluded!r}, expected 'mean' or 'clamp'")
    return excluded


# --- group quantization ------------------------------------------------------------------------

_SAME_SIZE_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _next_bits(b: torch.Tensor, up: bool) -> torch.Tensor:
    """Bit patterns (int16/int32 view of a float) of the neighbours toward +inf (``up``) or -inf."""
    sign = 1 << (8 * b.dtype.itemsize - 1)
    w = b.to(torch.int64)
    key = torch.where(w < 0, -(w & (sign - 1)), w) + (1 if up else -1)  # ordered like the floats
    w = torch.where(key < 0, (-key) | sign, key)
    return torch.where(w >= sign, w - 2 * sign, w).to(b.dtype)


def _round_directed(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """x (float64) rounded to ``dtype`` toward +inf (``up``) or -inf.

    [Note] Decided on bit patterns, not with torch.nextafter and a float ``where``: under
    torch.compile, Inductor's CPU code keeps float16 intermediates in float32 (so a ``where``
    over x.to(float16) can return the unrounded x) and computes nextafter for float16 in float32
    (returning h unchanged). A bitcast forces the rounding; integer ops cannot be widened.
    """
    b = x.to(dtype).view(_SAME_SIZE_INT[dtype])  # nearest
    back = b.view(dtype).to(x.dtype)
    wrong = back < x if up else back > x
    return torch.where(wrong, _next_bits(b, up), b).view(dtype)


def _quantize_groups(x: torch.Tensor, bits: int, stat_dtype: torch.dtype, dim: int,
                     valid: Optional[torch.Tensor] = None, name: str = "x", excluded: str = "mean"):
    """x (..., G at ``dim``, ...) -> uint8 codes like x, scale and min with ``dim`` removed.

    ``valid`` (broadcastable to x, bool): invalid slots are refilled with the mean of the valid
    ones (clamped into their range) so they never move min or max; a group with no valid slot
    gets scale 1, min 0, codes 0. ``excluded="clamp"``: the invalid slots still stay out of the
    range, but their codes encode their own value clamped into it (what a traced outlier falls
    back to when it leaves the outlier pool) instead of the mean.
    """
    L = (1 << bits) - 1
    x_own = x
    if valid is not None:
        valid = valid.expand_as(x)
        count = valid.sum(dim, keepdim=True)
        lo = torch.where(valid, x, float("inf")).amin(dim, keepdim=True)
        hi = torch.where(valid, x, -float("inf")).amax(dim, keepdim=True)
        mean = torch.where(valid, x, 0.0).sum(dim, keepdim=True) / count.clamp(min=1)
        fill = torch.where(count > 0, torch.minimum(torch.maximum(mean, lo), hi), 0.0)
        x = torch.where(valid, x, fill)
    # [Note] per-group statistics in float64 (cheap: one value per group): fp32 could round
    # max - m down (0.0005 - (-8568) == 8568 in fp32) and leave m + L*s below max.
    m = _round_directed(x.amin(dim, keepdim=True).double(), stat_dtype, up=False)
    hi, m64 = x.amax(dim, keepdim=True).double(), m.double()
    s = _round_directed((hi - m64) / L, stat_dtype, up=True)
    short = m64 + L * s.double() < hi  # the division rounded below an exact stat value
    sb = s.view(_SAME_SIZE_INT[stat_dtype])
    s = torch.where(short, _next_bits(sb, up=True), sb).view(stat_dtype)
    if _eager() and not (torch.isfinite(m).all() and torch.isfinite(s).all()):
        raise ValueError(f"{name}: a group's min or scale is not finite in {stat_dtype} (values beyond its "
                         "range, or inf/NaN in valid slots); pass stat_dtype=torch.bfloat16 or "
                         "torch.float32, or mark the bad tokens invalid")
    flat = s == 0
    s = torch.where(flat, torch.ones_like(s), s)
    if excluded == "clamp":
        x = x_own
    q = torch.round(((x - m.to(x.dtype)) / s.to(x.dtype)).clamp(0, L))
    q = torch.where(flat, 0.0, q).to(torch.uint8)
    return q, s.squeeze(dim), m.squeeze(dim)


def quantize_keys(k: torch.Tensor, bits: int, group: int, *, valid: Optional[torch.Tensor] = None,
                  stat_dtype: Optional[torch.dtype] = None, excluded: str = "mean") -> QuantizedKeys:
    """KIVI keys: per channel over groups of ``group`` consecutive tokens.

    k (B, H, T, d) with T a multiple of ``group`` and of 32 // bits. ``valid`` (B, H, T) bool
    (anything broadcastable): invalid tokens never enter a group's min/max; the result's
    ``masked`` is ``~valid``. ``excluded``: what the codes of invalid slots hold, "mean" (the
    group mean) or "clamp" (their own value clamped into the group's range). ``stat_dtype``: dtype of scale/min, default k.dtype if it is a half
    dtype else float16.

        >>> qk = quantize_keys(torch.randn(2, 4, 128, 64), bits=2, group=32)
        >>> qk.codes.shape, qk.scale.shape, qk.scale.dtype
        (torch.Size([2, 4, 8, 64]), torch.Size([2, 4, 4, 64]), torch.float16)
    """
    check_bits(bits)
    B, H, T, d = _check_4d("k", k)
    fix = "quantize whole groups and keep the rest in the full-precision residual"
    _check_group("k", group, T, "T", fix)
    _check_group("k", per_word(bits), T, "T", f"(32 // bits={bits}); {fix}")
    sd = _stat_dtype(k.dtype, stat_dtype)
    x = k.to(_compute_dtype(k.dtype)).reshape(B, H, T // group, group, d)
    v = None if valid is None else _check_valid(valid, B, H, T)
    vg = None if v is None else v.reshape(B, H, T // group, group, 1)
    q, s, m = _quantize_groups(x, bits, sd, dim=3, valid=vg, name="k", excluded=_check_excluded(excluded))
    codes = pack(q.reshape(B, H, T, d), bits, dim=-2)
    return QuantizedKeys(codes, s, m, bits, group, k.dtype, None if v is None else ~v)


def quantize_values(v: torch.Tensor, bits: int, group: int, *,
                    stat_dtype: Optional[torch.dtype] = None) -> QuantizedValues:
    """KIVI values: per token over groups of ``group`` consecutive channels.

    v (B, H, T, d) with d a multiple of ``group`` and of 32 // bits.

        >>> qv = quantize_values(torch.randn(2, 4, 10, 64), bits=4, group=32)
        >>> qv.codes.shape, qv.scale.shape
        (torch.Size([2, 4, 10, 8]), torch.Size([2, 4, 10, 2]))
    """
    check_bits(bits)
    B, H, T, d = _check_4d("v", v)
    _check_group("v", group, d, "d", "use a group that divides the head dim (e.g. 32)")
    _check_group("v", per_word(bits), d, "d", f"(32 // bits={bits}); the head dim must fill whole words")
    sd = _stat_dtype(v.dtype, stat_dtype)
    x = v.to(_compute_dtype(v.dtype)).reshape(B, H, T, d // group, group)
    q, s, m = _quantize_groups(x, bits, sd, dim=4, name="v")
    return QuantizedValues(pack(q.reshape(B, H, T, d), bits, dim=-1), s, m, bits, group, v.dtype)


def dequantize_keys_block(qk: QuantizedKeys, start_group: int, n_groups: int,
                          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Groups ``start_group .. start_group + n_groups - 1`` of the keys -> (B, H, n_groups*group, d).

    Unpacks only the words that cover those tokens, so a reference attention can walk the cache
    block by block. Masked slots come back as their stored (mean) values; see ``qk.masked``.
    """
    n_total = qk.scale.shape[-2]
    if not (0 <= start_group and 0 <= n_groups and start_group + n_groups <= n_total):
        raise ValueError(f"dequantize_keys_block: groups [{start_group}, {start_group + n_groups}) are "
                         f"outside [0, {n_total}); pass 0 <= start_group <= start_group + n_groups "
                         f"<= {n_total}")
    G, pw, out = qk.group, per_word(qk.bits), dtype or qk.dtype
    t0, t1 = start_group * G, (start_group + n_groups) * G
    w0, w1 = t0 // pw, -(-t1 // pw)
    q = unpack(qk.codes[:, :, w0:w1], qk.bits, (w1 - w0) * pw, dim=-2)[:, :, t0 - w0 * pw:t1 - w0 * pw]
    B, H, _, d = q.shape
    cd = _compute_dtype(out)
    sl = slice(start_group, start_group + n_groups)
    x = (q.reshape(B, H, n_groups, G, d).to(cd) * qk.scale[:, :, sl, None, :].to(cd)
         + qk.min[:, :, sl, None, :].to(cd))
    return x.reshape(B, H, n_groups * G, d).to(out)


def dequantize_keys(qk: QuantizedKeys, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """QuantizedKeys -> keys (B, H, T, d) in ``dtype`` (default the original keys' dtype)."""
    return dequantize_keys_block(qk, 0, qk.scale.shape[-2], dtype)


def dequantize_values_block(qv: QuantizedValues, start: int, n_tokens: int,
                            dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Tokens ``start .. start + n_tokens - 1`` of the values -> (B, H, n_tokens, d)."""
    T = qv.codes.shape[-2]
    if not (0 <= start and 0 <= n_tokens and start + n_tokens <= T):
        raise ValueError(f"dequantize_values_block: tokens [{start}, {start + n_tokens}) are outside "
                         f"[0, {T}); pass 0 <= start <= start + n_tokens <= {T}")
    out = dtype or qv.dtype
    cd = _compute_dtype(out)
    B, H, _, W = qv.codes.shape
    d = W * per_word(qv.bits)
    sl = slice(start, start + n_tokens)
    q = unpack(qv.codes[:, :, sl], qv.bits, d).reshape(B, H, n_tokens, d // qv.group, qv.group)
    x = q.to(cd) * qv.scale[:, :, sl, :, None].to(cd) + qv.min[:, :, sl, :, None].to(cd)
    return x.reshape(B, H, n_tokens, d).to(out)


def dequantize_values(qv: QuantizedValues, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """QuantizedValues -> values (B, H, T, d) in ``dtype`` (default the original values' dtype)."""
    return dequantize_values_block(qv, 0, qv.codes.shape[-2], dtype)


# --- outlier tokens tracing ----------------------------------------------------------------------

def token_norms(k: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """k (..., d) -> S = ||k||_p (...) in fp32, p = 1 ("l1", the OTT default) or 2 ("l2")."""
    if norm == "l1":
        return k.float().abs().sum(-1)
    if norm == "l2":
        return torch.linalg.vector_norm(k.float(), dim=-1)
    raise ValueError(f"norm: got {norm!r}, expected one of 'l1', 'l2'")


def select_outliers(k_group: torch.Tensor, n_out: int, norm: str = "l1", *,
                    valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``n_out`` tokens of a group with the SMALLEST ||k_i||_p (ALGORITHMS.md, OTT).

    k_group (B, H, G, d) (any leading axes) -> idx (B, H, n_out) int64, indices into the group,
    ordered by ascending norm, ties by position. ``valid`` (B, H, G) bool: invalid tokens are never
    picked; where fewer than ``n_out`` are valid the surplus entries are -1.
    """
    G = k_group.shape[-2]
    if not isinstance(n_out, int) or not 0 <= n_out <= G:
        raise ValueError(f"n_out: got {n_out!r}, expected an int in [0, {G}] (the group size)")
    s = token_norms(k_group, norm)
    if valid is not None:
        s = torch.where(valid, s, float("inf"))
    idx = torch.sort(s, dim=-1, stable=True).indices[..., :n_out]
    if valid is not None:
        idx = torch.where(torch.gather(valid.expand_as(s), -1, idx), idx, -1)
    return idx


def quantize_keys_with_outliers(k: torch.Tensor, bits: int, group: int, n_out: int, norm: str = "l1",
                                valid: Optional[torch.Tensor] = None, *,
                                stat_dtype: Optional[torch.dtype] = None, excluded: str = "mean"):
    """KIVI keys with the ``n_out`` smallest-norm tokens of each group traced as outliers.

    Returns ``(qk, outlier_idx, outlier_keys)``: ``outlier_idx`` (B, H, T/group, n_out) int64
    token positions in [0, T) (ascending norm; -1 where a group has fewer valid tokens), and
    ``outlier_keys`` (B, H, T/group, n_out, d) in k.dtype, bit-exact copies of k (zeros at -1).
    The outliers leave their group before its range is computed, exactly like invalid tokens:
    ``qk.masked`` (B, H, T) is True at outliers and invalid tokens. Norms for the pool:
    ``token_norms(outlier_keys, norm)``.

        >>> qk, idx, ko = quantize_keys_with_outliers(torch.randn(1, 2, 64, 16), 2, 32, n_out=1)
        >>> idx.shape, ko.shape, int(qk.masked.sum())
        (torch.Size([1, 2, 2, 1]), torch.Size([1, 2, 2, 1, 16]), 4)
    """
    B, H, T, d = _check_4d("k", k)
    _check_group("k", group, T, "T", "quantize whole groups and keep the rest in the full-precision residual")
    if not isinstance(n_out, int) or not 1 <= n_out < group:
        raise ValueError(f"n_out: got {n_out!r}, expected an int in [1, {group - 1}] (fewer than "
                         f"group={group})")
    nG = T // group
    kg = k.reshape(B, H, nG, group, d)
    vg = None if valid is None else _check_valid(valid, B, H, T).reshape(B, H, nG, group)
    local = select_outliers(kg, n_out, norm, valid=vg)  # (B, H, nG, n_out)
    hit = local >= 0
    safe = local.clamp(min=0)
    is_out = torch.zeros(B, H, nG, group, dtype=torch.int32, device=k.device).scatter_add(
        -1, safe, hit.to(torch.int32)) > 0
    keep = ~is_out if vg is None else vg & ~is_out
    qk = quantize_keys(k, bits, group, valid=keep.reshape(B, H, T), stat_dtype=stat_dtype, excluded=excluded)
    base = torch.arange(nG, device=k.device).view(1, 1, nG, 1) * group
    idx = torch.where(hit, local + base, -1)
    keys = torch.gather(kg, 3, safe.unsqueeze(-1).expand(B, H, nG, n_out, d))
    keys = torch.where(hit.unsqueeze(-1), keys, torch.zeros((), dtype=k.dtype, device=k.device))
    return qk, idx, keys


@dataclass(frozen=True)
class QuantConfig:
    """What a policy's ``quant:`` section asks of a site."""

    kbits: int = 2
    kgroup: int = 32
    vbits: int = 2
    vgroup: int = 32
    residual: int = 128
    per_group: int = 0  # outliers traced per key group (0: no outlier tracing)
    pool: int = 0  # outlier pool capacity per head
    norm: str = "l1"
    residual_dtype: str = "model"  # "model", "float16" or "bfloat16": see held_dtype

    def __post_init__(self):
        if self.residual_dtype not in _HELD_DTYPES:
            raise ValueError(f"residual_dtype: got {self.residual_dtype!r}, expected one of "
                             + ", ".join(map(repr, _HELD_DTYPES)))

    def held_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the full-precision residual and the outlier pool of a model in ``dtype`` are
        held in: ``residual_dtype`` where it is narrower than ``dtype`` (an fp32 model with
        "float16"), else ``dtype`` itself (a 16-bit model keeps its own; "model" changes nothing).

            >>> QuantConfig(residual_dtype="float16").held_dtype(torch.float32)
            torch.float16
            >>> QuantConfig(residual_dtype="float16").held_dtype(torch.bfloat16)
            torch.bfloat16
        """
        want = _HELD_DTYPES[self.residual_dtype]
        if want is None or want.itemsize >= dtype.itemsize:
            return dtype
        return want

    @classmethod
    def from_policy(cls, q) -> "QuantConfig":
        """From a validated :class:`kvfx.policy.schema.Quant`; raises NotImplementedError for
        layouts this build does not store."""
        if q.keys.axis != "channel":
            raise NotImplementedError("quant.keys.axis=token (kvfx stores keys per channel, as KIVI)")
        if q.values.axis != "token":
            raise NotImplementedError("quant.values.axis=channel (kvfx stores values per token, as KIVI)")
        if q.keys.group % per_word(q.keys.bits):
            raise NotImplementedError(f"quant.keys.group={q.keys.group} with bits={q.keys.bits} (a key "
                                      f"group must fill whole 32-bit words: a multiple of "
                                      f"{per_word(q.keys.bits)})")
        o = q.outliers
        return cls(q.keys.bits, q.keys.group, q.values.bits, q.values.group, q.residual,
                   o.per_group if o else 0, o.pool if o else 0, o.norm if o else "l1",
                   q.residual_dtype)

    def describe(self) -> str:
        s = f"K{self.kbits}/G{self.kgroup} V{self.vbits}/G{self.vgroup} R{self.residual}"
        s += f" outliers {self.per_group}/group pool {self.pool}" if self.per_group else ""
        return s + (f" held in {self.residual_dtype}" if self.residual_dtype != "model" else "")


_HELD_DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
