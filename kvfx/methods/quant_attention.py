"""Attention over a quantized store (KIVI + outlier tokens): the reference of the fused kernel.

A quantized site holds, per (batch row b, KV head h), ``n`` slots in one slot order:

    keys    slots [0, nk) quantized per channel over groups of ``kgroup`` slots
            (``kcodes`` packed along slots, ``kscale``/``kmin`` per group and channel),
            slots [nk, n) in full precision in ``rk`` (``rk[:, :, i]`` is slot ``nk + i``);
    values  slots [0, nv) quantized per slot over groups of ``vgroup`` channels
            (``vcodes`` packed along channels, ``vscale``/``vmin`` per slot and group),
            slots [nv, n) in full precision in ``rv`` (``rv[:, :, i]`` is slot ``nv + i``);
    ok      (B, H, cap) bool or None: slot s < n takes part in attention (False for pads and
            empty slots, and for traced outliers while the outlier pool holds them);
            None means every slot in [0, n) does;
    pool    ``pool_k``/``pool_v`` (B, H, C, d/dv) full-precision outlier tokens,
            ``pool_ok`` (B, H, C) bool (False = empty entry); C may be 0.

KIVI's flush rules keep nk a multiple of ``kgroup`` (keys are quantized R at a time) and
nv <= nk <= n (values are quantized one slot at a time once more than R are held), but the
reference only needs 0 <= nk, nv <= n.

Per-row counts (``rows``, (B, 3) int32, or None): the rows of a left-padded batch hold different
numbers of tokens, each left-aligned in its own slots, and count their KIVI flushes in their own
tokens. Row b then reads exactly as a store of its own with (n, nk, nv) = rows[b]: slots
[0, rows[b, 0]) with the layout above (``rk[b, :, i]`` is slot rows[b, 1] + i, ``rv[b, :, i]``
slot rows[b, 2] + i); its slots past rows[b, 0] are hidden. ``n``, ``nk``, ``nv`` are then
extents: n >= every row's n (the slot axis that ``bias`` and positions cover), nk and nv >= every
row's (the quantized capacity in use), and every row has nk_b <= n_b, nv_b <= n_b.

Attention of q (B, Hq, nq, d) (query head h reads KV head h // g) is one softmax over the union
[slots 0..n) ∪ [pool entries]: logits s = scale · q·k̂ (+ ``bias``), where k̂ is the dequantized
key (x̂ = code·scale + min, in fp32) for s < nk and the stored key otherwise; the output is
Σ p·v̂ with v̂ dequantized for s < nv. This is exactly the math the Triton kernel must do in
registers. The reference walks the quantized slots in chunks, so it never materializes a
dequantized copy of the whole cache either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from kvfx.methods.quant_pack import per_word, unpack

_CHUNK = 1024  # slots dequantized at a time by the reference


@dataclass(eq=False)
class QuantKV:
    """The tensors of a quantized store that attention reads (see the module docstring)."""

    kcodes: torch.Tensor  # int32 (B, H, capk / (32 // kbits), d)
    kscale: torch.Tensor  # half (B, H, capk / kgroup, d)
    kmin: torch.Tensor
    vcodes: torch.Tensor  # int32 (B, H, capv, dv / (32 // vbits))
    vscale: torch.Tensor  # half (B, H, capv, dv / vgroup)
    vmin: torch.Tensor
    rk: torch.Tensor  # (B, H, >= n - nk, d) model dtype
    rv: torch.Tensor  # (B, H, >= n - nv, dv)
    ok: Optional[torch.Tensor]  # (B, H, >= n) bool, or None (all slots attended)
    pool_k: Optional[torch.Tensor]  # (B, H, C, d) or None (no outlier pool)
    pool_v: Optional[torch.Tensor]
    pool_ok: Optional[torch.Tensor]  # (B, H, C) bool
    kbits: int
    kgroup: int
    vbits: int
    vgroup: int
    n: int
    nk: int
    nv: int
    rows: Optional[torch.Tensor] = None  # (B, 3) int32 per-row (n, nk, nv), or None (all rows: n, nk, nv)

    @property
    def pool_size(self) -> int:
        return 0 if self.pool_k is None else self.pool_k.shape[2]


def row_views(kv: QuantKV):
    """For a store with per-row counts: (b, the QuantKV of row b alone) per batch row, each a
    view (no copy) with that row's (n, nk, nv) and no per-row counts."""
    for b, (n, nk, nv) in enumerate(kv.rows.tolist()):
        one = {f: getattr(kv, f)[b:b + 1] for f in ("kcodes", "kscale", "kmin", "vcodes", "vscale", "vmin",
                                                    "rk", "rv", "ok", "pool_k", "pool_v", "pool_ok")
               if getattr(kv, f) is not None}
        yield b, dataclasses.replace(kv, **one, n=n, nk=nk, nv=nv, rows=None)


def row_columns(x: Optional[torch.Tensor], b: int, n_b: int, n: int, shape) -> Optional[torch.Tensor]:
    """Row b of x (broadcastable to ``shape`` = (B, ..., n + C), over [slots | pool]) restricted
    to that row's slots [0, n_b) and the pool."""
    if x is None:
        return None
    x = x.expand(shape)[b:b + 1]
    return torch.cat([x[..., :n_b], x[..., n:]], dim=-1)


def dequant_keys(kv: QuantKV, s0: int, s1: int) -> torch.Tensor:
    """Keys of slots [s0, s1) (both multiples of the key group and of 32 // kbits, s1 <= nk) in
    fp32: (B, H, s1 - s0, d)."""
    pw, G = per_word(kv.kbits), kv.kgroup
    codes = unpack(kv.kcodes[:, :, s0 // pw:s1 // pw], kv.kbits, s1 - s0, dim=-2)
    B, H, T, d = codes.shape
    sl = slice(s0 // G, s1 // G)
    x = codes.view(B, H, T // G, G, d).float() * kv.kscale[:, :, sl, None].float() + kv.kmin[:, :, sl, None].float()
    return x.view(B, H, T, d)


def dequant_values(kv: QuantKV, s0: int, s1: int) -> torch.Tensor:
    """Values of slots [s0, s1) (s1 <= nv) in fp32: (B, H, s1 - s0, dv)."""
    dv = kv.vcodes.shape[-1] * per_word(kv.vbits)
    codes = unpack(kv.vcodes[:, :, s0:s1], kv.vbits, dv)
    B, H, T, _ = codes.shape
    G = kv.vgroup
    x = (codes.view(B, H, T, dv // G, G).float() * kv.vscale[:, :, s0:s1, :, None].float()
         + kv.vmin[:, :, s0:s1, :, None].float())
    return x.view(B, H, T, dv)


def _chunks(lo: int, hi: int, step: int):
    s = lo
    while s < hi:
        yield s, min(s + step, hi)
        s += step


def _expand(x: torch.Tensor, g: int) -> torch.Tensor:
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def quant_attention_reference(q: torch.Tensor, kv: QuantKV, *, scale: float,
                              bias: Optional[torch.Tensor] = None, chunk: int = _CHUNK, calib=None):
    """Attention of q (B, Hq, nq, d) over a quantized store.

    ``bias``: optional additive fp32 mask over [slots 0..n) ∪ [pool], broadcastable to
    (B, Hq, nq, n + C) (-inf hides a key); ``kv.ok``/``kv.pool_ok`` always apply.
    ``calib``: optional CaliDrop partition (o_e (B, Hq, dv), lse_e (B, Hq) float, use (B, Hq)
    bool or integer, nonzero = use), e.g. `kvfx.methods.calidrop.lookup`'s, for nq = 1 only:
    where use holds, the store's attention and the evicted set's estimate are merged by
    `kvfx.methods.calidrop.merge` in fp32, before o is rounded to q's dtype, so o and lse are
    those of the union of the two partitions; elsewhere they are exactly those without calib.
    This is the semantics of the fused kernel's calibration variant.
    Returns (o (B, Hq, nq, dv) in q's dtype, lse (B, Hq, nq) fp32); a row that sees no key gets
    o = 0 and lse = -inf.
    """
    B, Hq, nq, d = q.shape
    if kv.rows is not None:  # each row over its own slots and counts (see the module docstring)
        shape = (B, Hq, nq, kv.n + kv.pool_size)
        outs = [quant_attention_reference(
            q[b:b + 1], one, scale=scale, bias=row_columns(bias, b, one.n, kv.n, shape), chunk=chunk,
            calib=None if calib is None else tuple(t[b:b + 1] for t in calib)) for b, one in row_views(kv)]
        return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])
    H = kv.kcodes.shape[1]
    g = Hq // H
    n, nk, nv, C = kv.n, kv.nk, kv.nv, kv.pool_size
    qf = q.float().reshape(B, H, g * nq, d)  # query heads of one KV head side by side
    step = max(kv.kgroup, per_word(kv.kbits))
    step = max(step, chunk // step * step)
    parts = []
    for s0, s1 in _chunks(0, nk, step):  # quantized keys
        parts.append(qf @ dequant_keys(kv, s0, s1).transpose(-1, -2))
    if n > nk:
        parts.append(qf @ kv.rk[:, :, :n - nk].float().transpose(-1, -2))
    if C:
        parts.append(qf @ kv.pool_k.float().transpose(-1, -2))
    s = torch.cat(parts, dim=-1) * scale if parts else qf.new_zeros(B, H, g * nq, 0)
    s = s.view(B, Hq, nq, n + C)
    visible = torch.ones(B, H, n + C, dtype=torch.bool, device=q.device)
    if kv.ok is not None:
        visible[:, :, :n] = kv.ok[:, :, :n]
    if C:
        visible[:, :, n:] = kv.pool_ok
    s = s.masked_fill(~_expand(visible, g)[:, :, None, :], float("-inf"))
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])  # 0 where masked
    pv = p.view(B, H, g * nq, n + C)
    o = torch.zeros(B, H, g * nq, kv.rv.shape[-1], dtype=torch.float32, device=q.device)
    for s0, s1 in _chunks(0, nv, step):
        o += pv[..., s0:s1] @ dequant_values(kv, s0, s1)
    if n > nv:
        o += pv[..., nv:n] @ torch.nan_to_num(kv.rv[:, :, :n - nv].float())
    if C:
        o += pv[..., n:] @ torch.where(kv.pool_ok[..., None], kv.pool_v.float(), 0.0)
    return _finish(o.view(B, Hq, nq, -1), lse, q, calib, "quant_attention_reference")


# --- the same math as two loop-free reductions (the CPU fast path) ---------------------------------

def quant_key_logits(qs: torch.Tensor, qm: torch.Tensor, kcodes: torch.Tensor, *, kbits: int,
                     kgroup: int) -> torch.Tensor:
    """Logits of m query rows over the quantized keys of slots [0, nk), from the codes.

    Since k̂ = code·scale + min per (group, channel), q·k̂ = Σ_c (q·scale)[c]·code[c] + Σ_c q·min:
    ``qs`` (B, H, m, nk/kgroup, d) fp32 is q times each group's scale and ``qm`` (B, H, m,
    nk/kgroup) q·min per group (:func:`fold_query`); ``kcodes`` (B, H, nk/(32/kbits), d) the packed
    codes. One reduction over channels with no Python loop and no data-dependent shape, so a
    compiler (inductor, :mod:`kvfx.runtime.cpu_fused`) fuses the unpacking into it: no dequantized
    copy of the keys exists. Returns (B, H, m, nk) fp32 (unscaled: fold the softmax scale into q).
    [Note] The fold is a separate step: inside the same compiled graph inductor recomputes
    q·scale for every slot of a group, which made the reduction 2× slower (measured)."""
    B, H, W, d = kcodes.shape
    m = qs.shape[2]
    pw = 32 // kbits
    sh = torch.arange(pw, dtype=torch.int32, device=kcodes.device) * kbits
    codes = ((kcodes[:, :, :, None, :] >> sh[:, None]) & ((1 << kbits) - 1)).float()  # B,H,W,pw,d
    codes = codes.reshape(B, H, 1, W * pw // kgroup, kgroup, d)
    return ((qs[:, :, :, :, None, :] * codes).sum(-1) + qm[..., None]).reshape(B, H, m, W * pw)


def fold_query(qf: torch.Tensor, kscale: torch.Tensor, kmin: torch.Tensor):
    """(qs, qm) of :func:`quant_key_logits` for query rows qf (B, H, m, d) fp32 and a store's key
    statistics (B, H, groups, d)."""
    qs = qf[:, :, :, None, :] * kscale[:, :, None]
    qm = torch.matmul(qf[:, :, :, None, :], kmin[:, :, None].transpose(-1, -2).float()).squeeze(-2)
    return qs, qm


VALUE_BLOCK = 32  # slots summed in one block by quant_value_sum (see there)


def quant_value_sum(p: torch.Tensor, vcodes: torch.Tensor, vscale: torch.Tensor, vmin: torch.Tensor, *,
                    vbits: int, vgroup: int) -> torch.Tensor:
    """Σ_s p[..., s]·v̂[s] over the quantized values of slots [0, T), from the codes.

    ``p`` (B, H, m, T) fp32 weights, ``vcodes`` (B, H, T, dv/(32/vbits)) packed codes, ``vscale``/
    ``vmin`` (B, H, T, dv/vgroup); T a multiple of :data:`VALUE_BLOCK`. Since v̂ = code·scale + min
    per (slot, channel group), the sum is Σ_s (p·scale)[s]·code[s] + Σ_s (p·min)[s]: a reduction over
    slots that a compiler fuses with the unpacking (no dequantized copy of the values exists).
    [Note] The slots are summed in blocks of VALUE_BLOCK, then the blocks: inductor's C++ code then
    accumulates each block in plain vector registers (one reduction over all T slots gets its
    slower cascade summation). Returns (B, H, m, dv) fp32."""
    B, H, T, wv = vcodes.shape
    m = p.shape[2]
    vpw = 32 // vbits
    dv = wv * vpw
    nb = T // VALUE_BLOCK
    sh = torch.arange(vpw, dtype=torch.int32, device=vcodes.device) * vbits
    codes = ((vcodes.view(B, H, 1, nb, VALUE_BLOCK, wv, 1) >> sh) & ((1 << vbits) - 1)).float()
    ps = (p[..., None] * vscale.float()[:, :, None]).view(B, H, m, nb, VALUE_BLOCK, dv // vgroup)
    if vgroup % vpw == 0:  # a word's channels share one group: its weight is one number per word
        w = ps.repeat_interleave(vgroup // vpw, dim=-1)[..., None]
    else:
        w = ps.repeat_interleave(vgroup, dim=-1).view(B, H, m, nb, VALUE_BLOCK, wv, vpw)
    o = (w * codes).sum(4).sum(3).reshape(B, H, m, dv)
    return o + (p @ vmin.float()).repeat_interleave(vgroup, dim=-1)


def quant_attention_split(q: torch.Tensor, kv: QuantKV, *, scale: float,
                          bias: Optional[torch.Tensor] = None, calib=None, key_logits=quant_key_logits,
                          value_sum=quant_value_sum):
    """:func:`quant_attention_reference`'s semantics with the two reductions over the quantized
    slots done by :func:`quant_key_logits` and :func:`quant_value_sum` (or compiled versions of
    them: ``key_logits``/``value_sum`` take the same arguments) in one piece each, and the rest
    (full-precision residual, outlier pool, masks, softmax, CaliDrop merge) as in the reference.

    Equal to the reference up to fp32 rounding: the dequantization is folded into the dot
    products and the softmax scale into q (tests: max |Δo| ≤ 1e-5 · max |o| + 1e-6 for fp32)."""
    B, Hq, nq, d = q.shape
    if kv.rows is not None:  # each row over its own slots and counts, as the reference
        shape = (B, Hq, nq, kv.n + kv.pool_size)
        outs = [quant_attention_split(
            q[b:b + 1], one, scale=scale, bias=row_columns(bias, b, one.n, kv.n, shape),
            calib=None if calib is None else tuple(t[b:b + 1] for t in calib), key_logits=key_logits,
            value_sum=value_sum) for b, one in row_views(kv)]
        return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])
    H = kv.kcodes.shape[1]
    g = Hq // H
    n, nk, nv, C = kv.n, kv.nk, kv.nv, kv.pool_size
    pw = per_word(kv.kbits)
    qf = q.float().reshape(B, H, g * nq, d) * scale
    parts = []
    if nk:  # over the whole key buffers (their capacity: stable shapes and strides), cut to nk
        capk = kv.kcodes.shape[2] * pw
        G = kv.kgroup
        wk = capk if capk == kv.kscale.shape[2] * G else nk  # a view may carry cut buffers
        qs, qm = fold_query(qf, kv.kscale[:, :, :wk // G], kv.kmin[:, :, :wk // G])
        parts.append(key_logits(qs, qm, kv.kcodes[:, :, :wk // pw], kbits=kv.kbits, kgroup=G)[..., :nk])
    if n > nk:
        parts.append(qf @ kv.rk[:, :, :n - nk].float().transpose(-1, -2))
    if C:
        parts.append(qf @ kv.pool_k.float().transpose(-1, -2))
    s = torch.cat(parts, dim=-1) if parts else qf.new_zeros(B, H, g * nq, 0)
    s = s.view(B, Hq, nq, n + C)
    if kv.ok is not None or C:
        visible = torch.ones(B, H, n + C, dtype=torch.bool, device=q.device)
        if kv.ok is not None:
            visible[:, :, :n] = kv.ok[:, :, :n]
        if C:
            visible[:, :, n:] = kv.pool_ok
        s = s.masked_fill(~_expand(visible, g)[:, :, None, :], float("-inf"))
    if bias is not None:
        s = s + bias.float()
    mx = s.amax(dim=-1, keepdim=True)
    mx = mx.masked_fill(mx == float("-inf"), 0.0)  # a row that sees no key: p = 0, lse = -inf
    p = (s - mx).exp_()
    tot = p.sum(dim=-1, keepdim=True)
    lse = (tot.log() + mx).squeeze(-1)
    p = p.div_(tot.clamp(min=torch.finfo(torch.float32).tiny))
    pv = p.view(B, H, g * nq, n + C)
    dv = kv.rv.shape[-1]
    # value_sum reads whole blocks: the whole value buffers when their capacity is a multiple of
    # the block (stable shapes and strides), with the weights of slots [nv, capacity) zero (those
    # slots hold finite codes and statistics, so they add exactly 0); else slots [0, nb) with nb
    # rounded down to a block, and slots [nb, nv) dequantized here
    capv = kv.vcodes.shape[2]
    nb = capv if capv % VALUE_BLOCK == 0 else nv // VALUE_BLOCK * VALUE_BLOCK
    if nb:
        w = pv[..., :min(nb, nv)]
        w = torch.nn.functional.pad(w, (0, nb - nv)) if nb > nv else w.contiguous()
        o = value_sum(w, kv.vcodes[:, :, :nb], kv.vscale[:, :, :nb], kv.vmin[:, :, :nb],
                      vbits=kv.vbits, vgroup=kv.vgroup)
    else:
        o = torch.zeros(B, H, g * nq, dv, dtype=torch.float32, device=q.device)
    if nv > nb:
        o = o + pv[..., nb:nv] @ dequant_values(kv, nb, nv)
    if n > nv:
        o = o + pv[..., nv:n] @ torch.nan_to_num(kv.rv[:, :, :n - nv].float())
    if C:
        o = o + pv[..., n:] @ torch.where(kv.pool_ok[..., None], kv.pool_v.float(), 0.0)
    return _finish(o.view(B, Hq, nq, -1), lse, q, calib, "quant_attention_split")


def _finish(o, lse, q, calib, who: str):
    """Both reads' last step: CaliDrop's merge of the evicted partition (``calib``), then q's dtype."""
    if calib is not None:
        if q.shape[2] != 1:
            raise ValueError(f"{who}: calib needs one query per sequence, got nq={q.shape[2]}")
        from kvfx.methods.calidrop import merge

        o_e, lse_e, use = calib
        o, lse = merge(o, lse, o_e.to(q.device, torch.float32), lse_e.to(q.device, torch.float32),
                       use.to(q.device) != 0)
    return o.to(q.dtype), lse
