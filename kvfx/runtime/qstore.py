"""The quantized KV store of a site (KIVI low-bit codes, full-precision residual, outlier pool).

A site whose policy has ``quant:`` keeps its tokens in a :class:`QuantStore` instead of a
:class:`kvfx.runtime.store.SiteStore`. Each batch row b holds its own tokens left-aligned in
slots [0, n_b) of a slot axis shared by its heads (pads never take a slot: DESIGN rule 6), and
its own KIVI counts; what each slot of a row holds is described in
:mod:`kvfx.methods.quant_attention` (the attention reference and the kernel's contract):

    slots [0, nk_b)    keys quantized per channel in groups of G slots (packed codes, half stats)
    slots [nk_b, n_b)  keys in full precision (``rk[b, :, i]`` is slot nk_b + i)
    slots [0, nv_b)    values quantized per slot in groups of G channels
    slots [nv_b, n_b)  values in full precision (``rv[b, :, i]`` is slot nv_b + i)
    pool               outlier tokens (OTT): full-precision key and value, at most C per head

Flush rules (KIVI, ALGORITHMS.md), counted in each row's own tokens: at prefill
nk_b = R·⌊n_b/R⌋ and nv_b = max(0, n_b − R); during decode a step appends at slot n_b of every
row, keys flush R at a time whenever R full-precision keys are held, values one slot at a time
once more than R are held. So a row of a left-padded batch holds exactly what it holds when it
runs alone. The host keeps the per-row counts (``row_n``, ``row_nk``, ``row_nv``); ``n``,
``nk``, ``nv`` are their maxima (the extents of the slot axis). When every row agrees (no
padding) the store works on all rows at once and its view carries no per-row counts; otherwise
quantization runs row by row and the view carries them (``QuantKV.rows``).

With outlier tracing, every key flush (R slots = R/G groups) takes the ``per_group``
smallest-norm valid keys of each group out of the group before its range is computed and offers
them, with their values, to the pool; the pool keeps the C smallest norms per head (and row). A
slot in the pool is hidden from the quantized part (``ok`` False); a token that leaves the pool
(or is not admitted) falls back to its quantized slot, whose codes hold its own key clamped into
the group's range ([Note] the OTT paper fills the slot with the group mean and masks it; we keep
the clamped code so a token the pool cannot hold still takes part in attention, an approximation
rather than a deletion).

Held dtype: the residual (``rk``, ``rv``) and the pool's keys and values are in the model's dtype,
or in ``quant.residual_dtype`` (:meth:`QuantConfig.held_dtype`: float16/bfloat16 where the model's
dtype is wider), cast when written; every read upcasts them to fp32. Tokens that a decode flush
moves out of the residual are quantized from their held (rounded) values, upcast exactly to the
model's dtype; the prompt's tokens are quantized from the model's values. A float16 residual
refuses a finite key or value beyond its range (|x| > 65504) with an error naming bfloat16.
``held_bytes`` counts the tensors as held, so the narrower residual shows in ``kvfx.memory()``.

Positions: ``pos`` (B, H, cap) int32 logical positions of the slots (-1: empty or pad), needed
to apply the model's mask once eviction or padding has made slots differ from positions. When
the kept slots are exactly positions 0..n−1 in every row (no eviction, no padding), ``pos`` is
None and slot s is position s: the identity layout costs no bytes per token. Likewise ``ok``
is None until some slot must be hidden (slots past n_b of a shorter row are hidden).

Bytes: every tensor above is counted by :meth:`held_bytes`; nothing is derived from a formula.
"""

from __future__ import annotations

import math

import torch

from kvfx.methods.quant import QuantConfig, quantize_keys, quantize_keys_with_outliers, quantize_values, token_norms
from kvfx.methods.quant_attention import QuantKV, quant_attention_reference, quant_attention_split
from kvfx.methods.quant_pack import OutlierPool, per_word
from kvfx.runtime import cpu_fused
from kvfx.runtime.store import mean_count

_GROW_MIN = 64


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


class QuantStore:
    """Quantized storage for one site (see the module docstring); a :class:`kvfx.runtime.store.KVStore`."""

    CAPS = frozenset({"quantized", "calibration"})

    def __init__(self, site_id: str, cfg: QuantConfig):
        self.site_id, self.cfg = site_id, cfg
        self.quantum = math.lcm(cfg.kgroup, per_word(cfg.kbits), 16)
        self.reset()

    # ---- lifecycle -------------------------------------------------------------------------
    def reset(self) -> None:
        self.kcodes = self.kscale = self.kmin = None
        self.vcodes = self.vscale = self.vmin = None
        self.rk = self.rv = None
        self.pos = self.ok = self.count = None
        self.pool: OutlierPool | None = None
        # per-row KIVI counts on the host (see the module docstring): slots held, quantized keys,
        # quantized values of each batch row
        self.row_n: list[int] = []
        self.row_nk: list[int] = []
        self.row_nv: list[int] = []
        self._rows_dev = None  # (key, (B, 3) int32 tensor) cache of view().rows
        self.seen = 0
        self.cap = 0
        self.batch = self.kv_heads = 0
        self.dtype = None  # the model's dtype (what the dense cache would hold)
        self.held = None  # the residual's and the pool's dtype (cfg.held_dtype(self.dtype))
        self.extra: dict = {}  # no rolling caps on quantized stores (see build_compressor)
        self.extra_host: dict = {}
        self.slot_state: dict = {}
        self.ragged = False
        self.calib = None  # CaliDrop state of the sequence
        self.calib_scale = 1.0
        self.window: int | None = None  # a sliding-window site: the tokens the model's cache keeps
        self.window_cap = 0  # ... and then the most slots the store allocates (roll_window)

    @property
    def n(self) -> int:
        """Slots in use: the largest row's count (the extent of the slot axis)."""
        return max(self.row_n, default=0)

    @property
    def nk(self) -> int:
        """The most quantized keys of a row."""
        return max(self.row_nk, default=0)

    @property
    def nv(self) -> int:
        """The most quantized values of a row."""
        return max(self.row_nv, default=0)

    @property
    def uniform(self) -> bool:
        """Every row holds the same counts (no padding): one vectorized path for all rows."""
        return len(set(self.row_n)) <= 1 and len(set(self.row_nk)) <= 1 and len(set(self.row_nv)) <= 1

    def _row_sets(self) -> list:
        """(rows, n, nk, nv): all rows at once (``slice(None)``) when their counts agree, else
        one entry per row (``slice(b, b + 1)``)."""
        if not self.row_n:
            return []
        if self.uniform:
            return [(slice(None), self.row_n[0], self.row_nk[0], self.row_nv[0])]
        return [(slice(b, b + 1), n, nk, nv)
                for b, (n, nk, nv) in enumerate(zip(self.row_n, self.row_nk, self.row_nv))]

    @property
    def empty(self) -> bool:
        return self.kcodes is None

    @property
    def length(self) -> int:
        return self.n

    @length.setter
    def length(self, value: int) -> None:  # compressors without rolling caps set it unchanged
        if value != self.n:
            raise RuntimeError("kvfx: a quantized store cannot be truncated by a compressor")

    @property
    def capacity(self) -> int:
        return self.cap

    # ---- allocation ------------------------------------------------------------------------
    def _alloc(self, like_k: torch.Tensor, like_v: torch.Tensor, cap: int) -> None:
        """(Re)allocate the slot buffers to ``cap`` slots, keeping their contents."""
        c = self.cfg
        B, H, d, dv = like_k.shape[0], like_k.shape[1], like_k.shape[-1], like_v.shape[-1]
        dev = like_k.device
        sd = like_k.dtype if like_k.dtype in (torch.float16, torch.bfloat16) else torch.float16
        capv = max(0, cap - c.residual)
        new = {
            "kcodes": torch.zeros(B, H, cap // per_word(c.kbits), d, dtype=torch.int32, device=dev),
            "kscale": torch.ones(B, H, cap // c.kgroup, d, dtype=sd, device=dev),
            "kmin": torch.zeros(B, H, cap // c.kgroup, d, dtype=sd, device=dev),
            # values are quantized only R slots behind the newest one: nv <= max(0, n - R)
            "vcodes": torch.zeros(B, H, capv, dv // per_word(c.vbits), dtype=torch.int32, device=dev),
            "vscale": torch.ones(B, H, capv, dv // c.vgroup, dtype=sd, device=dev),
            "vmin": torch.zeros(B, H, capv, dv // c.vgroup, dtype=sd, device=dev),
        }
        if self.pos is not None:
            new["pos"] = torch.full((B, H, cap), -1, dtype=torch.int32, device=dev)
        if self.ok is not None:
            new["ok"] = torch.zeros(B, H, cap, dtype=torch.bool, device=dev)
        for name, t in new.items():
            old = getattr(self, name)
            if old is not None and self.cap:
                keep = min(old.shape[2] if name not in ("pos", "ok") else self.n, t.shape[2])
                t[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, t)
        self.cap = cap

    def _ensure(self, slots: int, like_k, like_v) -> None:
        if slots > self.cap:
            grow = slots + max(_GROW_MIN, self.cap // 32)
            if self.window_cap:  # a sliding-window site never needs more than its window's slots
                grow = max(slots, min(grow, self.window_cap))
            self._alloc(like_k, like_v, _round_up(grow, self.quantum))

    def _residual(self, name: str, like: torch.Tensor, need: int, keep: int) -> torch.Tensor:
        """The full-precision residual buffer ``name`` resized to hold ``need`` slots (rounded
        up to 8), keeping its first ``keep``. It grows 8 slots at a time and shrinks after a key
        flush, so it holds what KIVI keeps in full precision and little more."""
        buf = getattr(self, name)
        cap = _round_up(max(need, 1), 8)
        if buf is None or buf.shape[2] < need or buf.shape[2] > cap + 8:
            grown = like.new_zeros(like.shape[0], like.shape[1], cap, like.shape[-1], dtype=self.held)
            if buf is not None and keep:
                grown[:, :, :keep] = buf[:, :, :keep]
            setattr(self, name, grown)
            buf = grown
        return buf

    # ---- writes ----------------------------------------------------------------------------
    def write_kept(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, count: torch.Tensor,
                   capacity: int) -> None:
        """The prompt's kept tokens (k/v (B, H, m, d), pos (B, H, m) logical positions with -1
        for unused slots, count (B, H) with the kept tokens of a row in its first count slots),
        quantized by the prefill flush rules counted in each row's own tokens."""
        c = self.cfg
        self.reset()
        B, H, m, d = k.shape
        dv = v.shape[-1]
        if dv % c.vgroup or dv % per_word(c.vbits):
            raise ValueError(f"kvfx: quant.values.group={c.vgroup} does not divide this site's value "
                             f"head dim {dv} (or it is not a multiple of {per_word(c.vbits)}); "
                             "pick a group that divides the head dim")
        if H and not bool((count == count[:, :1]).all()):
            raise NotImplementedError("kvfx: a quantized store keeps one token count per batch row; "
                                      "this compressor kept different counts per KV head")
        self.batch, self.kv_heads, self.dtype = B, H, k.dtype
        self.held = c.held_dtype(k.dtype)
        self._check_range(k, v)
        identity = bool((pos == torch.arange(m, device=k.device)).all())
        valid = pos >= 0
        if not identity:
            self.pos = pos.to(torch.int32)
            self.ragged = True
        if not identity or c.per_group:
            self.ok = valid.clone()
        self._alloc(k, v, _round_up(max(m, capacity, 1), self.quantum))
        if self.pos is not None:
            self.pos[:, :, :m] = pos.to(torch.int32)
        if self.ok is not None:
            self.ok[:, :, :m] = valid
        self.count = count.clone()
        R = c.residual
        self.row_n = [min(int(x), m) for x in (count[:, 0].tolist() if H else [m] * B)]
        self.row_nk = [n // R * R for n in self.row_n]
        self.row_nv = [max(0, n - R) for n in self.row_n]
        sets = self._row_sets()
        for rows, n, nk, nv in sets:
            self._flush_keys(k[rows, :, :nk], v[rows, :, :nk], 0,
                             None if identity else valid[rows, :, :nk], rows)
            if nv:
                self._write_values(v[rows, :, :nv], 0, rows)
        rk = self._residual("rk", k, max(n - nk for _, n, nk, _ in sets), 0)
        rv = self._residual("rv", v, max(n - nv for _, n, _, nv in sets), 0)
        for rows, n, nk, nv in sets:
            rk[rows, :, :n - nk] = k[rows, :, nk:n]
            rv[rows, :, :n - nv] = v[rows, :, nv:n]

    def _flush_keys(self, k: torch.Tensor, v: torch.Tensor, start: int, valid, rows=slice(None)) -> None:
        """Quantize keys of slots [start, start + T) of batch ``rows`` (T a multiple of the
        group); ``v`` holds their values in full precision (for the outlier pool)."""
        c = self.cfg
        T = k.shape[2]
        if T == 0:
            return
        pw, G = per_word(c.kbits), c.kgroup
        sd = self.kscale.dtype
        if c.per_group:
            qk, idx, keys = quantize_keys_with_outliers(k, c.kbits, G, c.per_group, c.norm, valid,
                                                        stat_dtype=sd, excluded="clamp")
            self.ok[rows, :, start:start + T] &= ~qk.masked
            self._offer_outliers(idx, keys, v, start, rows)
        else:
            qk = quantize_keys(k, c.kbits, G, valid=valid, stat_dtype=sd, excluded="clamp")
        self.kcodes[rows, :, start // pw:(start + T) // pw] = qk.codes
        self.kscale[rows, :, start // G:(start + T) // G] = qk.scale
        self.kmin[rows, :, start // G:(start + T) // G] = qk.min

    def _offer_outliers(self, idx: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, start: int,
                        rows=slice(None)) -> None:
        """idx (b, H, groups, n_out) indices into the flushed chunk of batch ``rows`` (-1: none),
        keys their full-precision keys, v the chunk's values."""
        c = self.cfg
        B, H = self.batch, self.kv_heads
        if idx.shape[0] != B:  # one row flushes: the other rows offer nothing (their pool is unchanged)
            def full(t, fill):
                out = t.new_full((B, *t.shape[1:]), fill)
                out[rows] = t
                return out

            idx, keys, v = full(idx, -1), full(keys, 0), full(v, 0)
        if self.pool is None:
            self.pool = OutlierPool(B, H, c.pool, keys.shape[-1], v.shape[-1], dtype=self.held,
                                    device=keys.device)
        idx = idx.reshape(B, H, -1)
        keys = keys.reshape(B, H, idx.shape[-1], -1).to(self.held)  # held as the residual is
        v = v.to(self.held)
        safe = idx.clamp(min=0)
        vals = v.gather(2, safe[..., None].expand(*safe.shape, v.shape[-1]))
        slots = torch.where(idx >= 0, safe + start, -1)
        ev = self.pool.add(keys, vals, slots, token_norms(keys, c.norm))
        # tokens the pool does not hold return to their quantized slot. [Note] index_put_ on the
        # returned entries only: a scatter of every entry (the empty ones aimed at slot 0) would
        # race with a returned token of slot 0.
        back = ev.pos.long()
        b, h, i = (back >= 0).nonzero(as_tuple=True)
        self.ok.index_put_((b, h, back[b, h, i]), torch.ones_like(b, dtype=torch.bool))

    def _write_values(self, v: torch.Tensor, start: int, rows=slice(None)) -> None:
        c = self.cfg
        T = v.shape[2]
        if cpu_fused.use_compiled_flush(v, self.nk):
            codes, scale, mn = cpu_fused.quantize_values(v, c.vbits, c.vgroup, self.vscale.dtype)
        else:
            qv = quantize_values(v, c.vbits, c.vgroup, stat_dtype=self.vscale.dtype)
            codes, scale, mn = qv.codes, qv.scale, qv.min
        self.vcodes[rows, :, start:start + T] = codes
        self.vscale[rows, :, start:start + T] = scale
        self.vmin[rows, :, start:start + T] = mn

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """q new tokens (B, H, q, d) at slots [n_b, n_b + q) of every row b (its own count)."""
        q = k.shape[2]
        sets = self._row_sets()
        self._check_range(k, v)
        self._ensure(self.n + q, k, v)
        rk = self._residual("rk", k, max(n + q - nk for _, n, nk, _ in sets),
                            max(n - nk for _, n, nk, _ in sets))
        rv = self._residual("rv", v, max(n + q - nv for _, n, _, nv in sets),
                            max(n - nv for _, n, _, nv in sets))
        for rows, n, nk, nv in sets:
            if self.pos is not None:
                self.pos[rows, :, n:n + q] = positions.to(torch.int32)
            if self.ok is not None:
                self.ok[rows, :, n:n + q] = True
            rk[rows, :, n - nk:n + q - nk] = k[rows]
            rv[rows, :, n - nv:n + q - nv] = v[rows]
        self.row_n = [n + q for n in self.row_n]
        self.count += q

    def flush(self) -> None:
        """Apply KIVI's decode flush rules to every row (keys R at a time, then values past R)."""
        R = self.cfg.residual
        for rows, n, nk, nv in self._row_sets():
            while n - nk >= R:
                off = nk - nv  # values of the flushed slots are still in rv (nv <= nk)
                valid = None if self.pos is None else self.pos[rows, :, nk:nk + R] >= 0
                # quantized from the held residual, in the model's dtype (an exact upcast): the
                # quantizers (and the compiled flush) see one input dtype whatever residual_dtype is
                self._flush_keys(self.rk[rows, :, :R].to(self.dtype), self.rv[rows, :, off:off + R].to(self.dtype),
                                 nk, valid, rows)
                rest = n - nk - R
                self.rk[rows, :, :rest] = self.rk[rows, :, R:R + rest].clone()
                nk += R
            t = n - nv - R
            if t > 0:
                self._write_values(self.rv[rows, :, :t].to(self.dtype), nv, rows)
                rest = n - nv - t
                self.rv[rows, :, :rest] = self.rv[rows, :, t:t + rest].clone()
                nv += t
            for b in range(self.batch)[rows]:
                self.row_nk[b], self.row_nv[b] = nk, nv
        held = max((n - nk for n, nk in zip(self.row_n, self.row_nk)), default=0)
        if self.rk is not None:
            self._residual("rk", self.rk, held, held)  # shrink to what is left

    def roll_window(self, w: int, nq: int = 1) -> None:
        """A sliding-window site (:mod:`kvfx.runtime.window`): drop the tokens no later query can
        see (logical position before ``seen - w``). Quantized keys leave in whole quanta of
        :attr:`quantum` slots (a key group cannot lose one token); when every quantized key of a row
        has expired, its expired residual tokens leave too, one by one. The expired tokens still in a
        group (fewer than a quantum per row) stay masked by the window mask until their group
        leaves. Capacity: ``window_cap`` slots (the window, a quantum and a decode step). ``nq`` (the
        step's tokens) is part of the store protocol; quanta are counted from the slots."""
        from kvfx.runtime.window import expired

        if self.kcodes is None:
            return
        q = self.quantum
        self.window = w
        self.window_cap = _round_up(w + q + 2, q)
        cutoff = self.seen - w
        if cutoff > 0:
            B, n = self.batch, self.n
            slot_pos = (self.pos[:, 0, :n] if self.pos is not None
                        else torch.arange(n, device=self.kcodes.device).expand(B, n))
            n_exp = expired(slot_pos, cutoff).sum(-1).tolist()  # a prefix of each row's slots
            drops = [e if e >= nk else e // q * q for e, nk in zip(n_exp, self.row_nk)]
            if any(drops):
                if self.pos is None:  # slots stop being positions: materialize them
                    cap = self.cap
                    pos = torch.arange(cap, dtype=torch.int32, device=self.kcodes.device).expand(
                        B, self.kv_heads, cap).clone()
                    for b, nb in enumerate(self.row_n):
                        pos[b, :, nb:] = -1
                    self.pos = pos
                    self.ragged = True
                for b, d in enumerate(drops):
                    if d:
                        self._drop_front(b, d)
        if self.cap > self.window_cap and self.n <= self.window_cap:  # give a long prompt's slots back
            d, dv = self.head_dims()
            like_k = self.kcodes.new_empty((self.batch, self.kv_heads, 0, d), dtype=self.dtype)
            like_v = self.kcodes.new_empty((self.batch, self.kv_heads, 0, dv), dtype=self.dtype)
            self._alloc(like_k, like_v, self.window_cap)

    def _drop_front(self, b: int, d: int) -> None:
        """Drop the ``d`` oldest slots of batch row ``b`` (``d`` a multiple of the quantum, or every
        quantized key of the row and some of its residual)."""
        c = self.cfg
        pw, G = per_word(c.kbits), c.kgroup
        r = slice(b, b + 1)
        n, nk, nv = self.row_n[b], self.row_nk[b], self.row_nv[b]
        dk, dv = min(d, nk), min(d, nv)
        if dk:
            self.kcodes[r, :, :(nk - dk) // pw] = self.kcodes[r, :, dk // pw:nk // pw].clone()
            for t in (self.kscale, self.kmin):
                t[r, :, :(nk - dk) // G] = t[r, :, dk // G:nk // G].clone()
        if d > dk:  # every quantized key has gone: the oldest residual keys go too
            rest = n - nk - (d - dk)
            self.rk[r, :, :rest] = self.rk[r, :, d - dk:d - dk + rest].clone()
        if dv:
            for t in (self.vcodes, self.vscale, self.vmin):
                t[r, :, :nv - dv] = t[r, :, dv:nv].clone()
        if d > dv:
            rest = n - nv - (d - dv)
            self.rv[r, :, :rest] = self.rv[r, :, d - dv:d - dv + rest].clone()
        self.pos[r, :, :n - d] = self.pos[r, :, d:n].clone()
        self.pos[r, :, n - d:n] = -1
        if self.ok is not None:
            self.ok[r, :, :n - d] = self.ok[r, :, d:n].clone()
            self.ok[r, :, n - d:n] = False
        if self.pool is not None:  # pool entries point at slots: shift them, drop the expired ones
            pp = self.pool.pos[r]
            gone = (pp >= 0) & (pp < d)
            self.pool.pos[r] = torch.where(gone, -1, torch.where(pp >= 0, pp - d, pp))
            self.pool.norms[r] = self.pool.norms[r].masked_fill(gone, float("inf"))
        self.count[r] -= d
        self.row_n[b], self.row_nk[b], self.row_nv[b] = n - d, nk - dk, nv - dv

    def _check_range(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """A float16 residual narrower than the model's dtype cannot hold a finite |x| > 65504 (it
        would become inf and poison attention): refuse it, naming the fix (one host read)."""
        if self.held != torch.float16 or self.dtype.itemsize <= 2:
            return
        top = torch.finfo(torch.float16).max
        over = [(x.abs() > top) & torch.isfinite(x) for x in (k, v)]
        if bool(torch.stack([o.any() for o in over]).any()):
            side = "key" if bool(over[0].any()) else "value"
            raise ValueError(f"kvfx: site {self.site_id}: quant.residual_dtype float16 cannot hold a {side} of "
                             f"magnitude above {top:g} ({self.dtype} model); set residual_dtype: bfloat16 "
                             "(the same bytes, fp32's range) or model")

    # ---- reads -----------------------------------------------------------------------------
    def view(self) -> QuantKV:
        c, p = self.cfg, self.pool
        return QuantKV(self.kcodes, self.kscale, self.kmin, self.vcodes, self.vscale, self.vmin,
                       self.rk, self.rv, self.ok,
                       p.keys if p is not None else None, p.values if p is not None else None,
                       p.occupied if p is not None else None,
                       c.kbits, c.kgroup, c.vbits, c.vgroup, self.n, self.nk, self.nv,
                       rows=None if self.uniform else self._rows_tensor())

    def _rows_tensor(self) -> torch.Tensor:
        """(B, 3) int32 per-row (n_b, nk_b, nv_b) on the store's device (rebuilt when they change)."""
        key = (tuple(self.row_n), tuple(self.row_nk), tuple(self.row_nv))
        if self._rows_dev is None or self._rows_dev[0] != key:
            t = torch.tensor(list(zip(*key)), dtype=torch.int32).to(self.kcodes.device)
            self._rows_dev = (key, t)
        return self._rows_dev[1]

    def positions(self) -> torch.Tensor:
        """(B, H, n + C) logical positions of [slots | pool entries] (-1: none)."""
        dev = self.kcodes.device
        B, H = self.batch, self.kv_heads
        slot_pos = (self.pos[:, :, :self.n].long() if self.pos is not None
                    else torch.arange(self.n, device=dev).expand(B, H, self.n))
        if self.pool is None:
            return slot_pos
        ps = self.pool.pos.long()
        pool_pos = torch.where(ps >= 0, slot_pos.gather(2, ps.clamp(min=0)), -1)
        return torch.cat([slot_pos, pool_pos], dim=2)

    def attend(self, q: torch.Tensor, mask, is_causal: bool, past_len: int, scale,
               return_lse: bool = False, calib=None):
        """Attention of q (B, Hq, nq, d) over the store (after the step's tokens were appended):
        out (B, Hq, nq, dv), or (out, lse (B, Hq, nq) fp32) with ``return_lse``.

        ``calib``: optional CaliDrop partition (o_e, lse_e, use) of the one query (nq = 1), merged
        with the store's attention (out and lse are those of the union): inside the quantized
        decode kernel's reduction on the kernel path, by the reference's merge otherwise."""
        from kvfx.runtime.attention import _use_kernel, positions_mask

        sm = scale if scale is not None else q.shape[-1] ** -0.5
        nq = q.shape[2]
        g = q.shape[1] // self.kv_heads
        kv = self.view()
        if mask is None and not (is_causal and nq > 1):
            bias = None
        else:
            keep = positions_mask(self.positions(), mask, is_causal, nq, past_len, g)
            bias = keep.float() if keep.dtype != torch.bool else torch.zeros(
                keep.shape, device=q.device).masked_fill(~keep, float("-inf"))
        if bias is None and nq == 1 and _use_kernel(q):
            from kvfx.templates.launch_quant import quant_decode_attention

            o, lse = quant_decode_attention(q, kv, scale=sm, calib=calib)
        elif cpu_fused.use_compiled(q, kv):  # the reference's math, reductions compiled (CPU)
            o, lse = quant_attention_split(q, kv, scale=sm, bias=bias, calib=calib,
                                           key_logits=cpu_fused.key_logits, value_sum=cpu_fused.value_sum)
        else:
            o, lse = quant_attention_reference(q, kv, scale=sm, bias=bias, calib=calib)
        return (o, lse.reshape(o.shape[:-1])) if return_lse else o

    # ---- accounting ------------------------------------------------------------------------
    def attend_step(self, c, q, mask, is_causal: bool, past_len: int, scale):
        """A decode step's read (:func:`kvfx.runtime.ops.decode_step`): (out, None)."""
        if c.calib is not None:
            from kvfx.runtime.attention import calibrated_decode

            return calibrated_decode(self, q, mask, is_causal, past_len, scale, c.needs_probs, c.calib)
        return self.attend(q, mask, is_causal, past_len, scale), None

    def finish_step(self, c, nq: int, probs) -> None:
        self.flush()  # no "evict" capability: the residual is flushed into codes instead

    def _tensors(self) -> list:
        ts = [self.kcodes, self.kscale, self.kmin, self.vcodes, self.vscale, self.vmin, self.rk, self.rv,
              self.pos, self.ok, self.count, self._rows_dev[1] if self._rows_dev is not None else None]
        if self.pool is not None:
            p = self.pool
            ts += [p.keys, p.values, p.pos, p.norms]
        return [t for t in ts if t is not None]

    def held_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._tensors()) + self.calib_bytes()

    def calib_bytes(self) -> int:
        return 0 if self.calib is None else self.calib.nbytes()

    def kv_bytes(self) -> int:
        """Bytes of key/value content (codes, statistics, residual, pool keys/values)."""
        ts = [self.kcodes, self.kscale, self.kmin, self.vcodes, self.vscale, self.vmin, self.rk, self.rv]
        if self.pool is not None:
            ts += [self.pool.keys, self.pool.values]
        return sum(t.untyped_storage().nbytes() for t in ts if t is not None)

    def head_dims(self) -> tuple[int, int]:
        return self.kcodes.shape[-1], self.vcodes.shape[-1] * per_word(self.cfg.vbits)

    def tokens_held(self) -> int:
        return 0 if self.count is None else int(self.count.max().item())

    def tokens_held_mean(self) -> float:
        return mean_count(self.count)
