"""The head-wise ragged store: each KV head of each row holds its own number of tokens (AdaKV
budgets, ``budget.allocation: adaptive``), in one flat token pool per site.

Layout (segments in (row, head) order; ``S = B · Hkv`` segments):

    k, v     (P, d), (P, dv)   the pool: segment s owns slots [start[s], start[s] + count[s] + slack)
    pos      (P,) long         logical position of each slot, -1 = empty
    start    (B, Hkv) long     segment offsets
    count    (B, Hkv) long     valid tokens of each segment (a segment's first slots)

``P = Σ_s (kept_s + slack)``: the bytes held are the *sum* over heads of their token counts plus
a headroom of ``slack`` slots per segment, not ``max_h kept_h · Hkv`` as in the dense store. Every
decode step appends the same number of tokens to every segment, so all segments have the same
headroom, a host int known without a device sync. When a step does not fit, every segment grows
by the same amortized chunk (``max(64, length / 32)`` rounded to 16, as the dense store grows):
one new pool, one copy; no reallocation on the other steps. ``length`` is a host upper bound of
the longest segment (the width of the padded read on the CPU path).

Rolling caps (H2O, TOVA, streaming, ``max_tokens`` over an AdaKV allocation) roll **per head**:
each segment has its own cap (``extra["cap"]`` (B, Hkv): its prompt allocation plus the row's
headroom to the layer's cap, so a row's caps sum to ``cap · Hkv``), and after a step every segment
over its cap drops its lowest-scoring unprotected token (:meth:`evict`: the segment's last token
moves into the victim's slot, device only). Since every segment of a row starts the same distance
below its cap and grows by the same tokens, a row's segments reach their caps at the same step;
from then on a step's append and eviction leave each segment's headroom unchanged, so the pool is
sized once at prefill (headroom = the largest distance to the cap + 1) and never grows.
Method state per slot (H2O's accumulated scores) lives in the pool layout, ``slot_state[name]``
(P,), and moves with the slots. Decode probabilities and per-slot views are padded to ``length``
(:meth:`slot_view`), the layout :meth:`kvfx.runtime.compressor.Scored.after_decode` works in for
both stores.

Capabilities (:data:`kvfx.methods.registry.STORE_CAPS` ``"ragged"``): ``evict``, ``probs`` (the
reference read: the Triton ragged decode kernel returns no probabilities, so a policy that reads
them runs the reference on CUDA too) and ``calibration`` (CaliDrop's per-head evicted partition;
tokens evicted during decode are folded into it). Not ``quantized``: the policy schema refuses
quantization with head-wise budgets, with the reason.
"""

from __future__ import annotations

import torch

from kvfx.methods.ragged_attention import gather_segments, pack_segments, segment_slots
from kvfx.methods.registry import STORE_CAPS
from kvfx.runtime.store import Accounting

_GROW_QUANTUM = 16
_GROW_MIN = 64


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


class RaggedStore(Accounting):
    """One site's head-wise ragged store (the :class:`kvfx.runtime.store.KVStore` protocol)."""

    CAPS = STORE_CAPS["ragged"]
    ragged = True

    def __init__(self, site_id: str):
        self.site_id = site_id
        self.reset()

    # ---- lifecycle -------------------------------------------------------------------------
    def reset(self) -> None:
        self.k = self.v = self.pos = self.start = self.count = None
        self.length = self.seen = 0
        self.slack = 0  # free slots at the end of every segment (host; the same for all)
        self.batch = self.kv_heads = 0
        self.dtype: torch.dtype | None = None
        self.extra: dict[str, torch.Tensor] = {}
        self.slot_state: dict[str, torch.Tensor] = {}
        self.extra_host: dict = {}
        self.host_cap = 0  # rolling caps: host bound of the longest segment (``length``)
        self.cap_headroom = None  # rolling caps: the fewest free slots of a segment at its cap (host)
        self.calib = None
        self.calib_scale = 1.0

    @property
    def empty(self) -> bool:
        return self.k is None

    @property
    def capacity(self) -> int:
        """Slots of the pool (all segments together)."""
        return 0 if self.k is None else self.k.shape[0]

    def head_dims(self) -> tuple[int, int]:
        return self.k.shape[-1], self.v.shape[-1]

    # ---- writes ----------------------------------------------------------------------------
    def write_kept(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, count: torch.Tensor,
                   capacity: int) -> None:
        """The prompt's kept tokens, dense per head (k (B, Hkv, m, d), pos (B, Hkv, m) with -1 past
        ``count`` (B, Hkv)), packed into segments of ``count + slack`` slots, ``slack = capacity - m``
        (at least 1: the first decode step)."""
        B, H, m = pos.shape
        dev = k.device
        self.batch, self.kv_heads, self.dtype = B, H, k.dtype
        self.slack = max(capacity - m, 1)
        count = count.to(device=dev, dtype=torch.long)
        self._allocate_segments(count, k, v)
        for src, pool in ((k, self.k), (v, self.v), (pos, self.pos)):
            pack_segments(src, count, self.start, pool)
        self.count = count.clone()
        self.length = m

    def _allocate_segments(self, counts: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """An empty pool of segments of ``counts`` (B, Hkv) + ``self.slack`` slots each, in
        (row, head) order; ``start`` their offsets. One host sync (the pool size), at prefill."""
        B, H = counts.shape
        sizes = (counts + self.slack).reshape(-1)
        self.start = (sizes.cumsum(0) - sizes).view(B, H)
        P = int(sizes.sum().item())
        self.k = k.new_zeros(P, k.shape[-1])
        self.v = v.new_zeros(P, v.shape[-1])
        self.pos = torch.full((P,), -1, dtype=torch.long, device=k.device)

    def write_selection(self, prio: torch.Tensor, budget: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        slack: int = 1) -> None:
        """The prompt's kept tokens selected straight into the pool (no dense per-head copy): the
        ``budget`` (B, Hkv) highest ``prio`` (B, Hkv, n) tokens of each head (the select+gather
        kernel on CUDA, :func:`kvfx.runtime.compress.select_and_gather_ragged`), segments of
        ``budget + slack`` slots."""
        from kvfx.runtime.compress import select_and_gather_ragged

        B, H = prio.shape[:2]
        dev = k.device
        self.batch, self.kv_heads, self.dtype = B, H, k.dtype
        self.slack = max(slack, 1)
        budget = budget.to(device=dev, dtype=torch.long).clamp(min=0)
        self._allocate_segments(budget, k, v)
        self.count = select_and_gather_ragged(prio, budget, k, v, self.start, self.k, self.v, self.pos)
        self.length = int(budget.max().item()) if budget.numel() else 0

    def _grow(self, q: int) -> None:
        """Every segment gains the same ``G`` slots: one new pool, old slot i moves to i + G · s."""
        B, H = self.batch, self.kv_heads
        G = _round_up(max(_GROW_MIN, q, self.length // 32), _GROW_QUANTUM)
        P = self.k.shape[0]
        dev = self.k.device
        seg = torch.searchsorted(self.start.reshape(-1), torch.arange(P, device=dev), right=True) - 1
        moved = torch.arange(P, device=dev) + G * seg
        grown = P + B * H * G
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(grown, old.shape[-1])
            new[moved] = old
            setattr(self, name, new)
        pos = torch.full((grown,), -1, dtype=torch.long, device=dev)
        pos[moved] = self.pos
        self.pos = pos
        for name, old in self.slot_state.items():
            new = old.new_zeros(grown)
            new[moved] = old
            self.slot_state[name] = new
        self.start = self.start + G * torch.arange(B * H, device=dev).view(B, H)
        self.slack += G
        if self.cap_headroom is not None:
            self.cap_headroom += G

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Append q new tokens (B, Hkv, q, d) to every segment (no host sync)."""
        B, H, q = k.shape[:3]
        if q > self.slack:
            self._grow(q)
        slot = (self.start + self.count)[..., None] + torch.arange(q, device=k.device)  # (B, H, q)
        flat = slot.reshape(-1)
        self.k.index_copy_(0, flat, k.reshape(-1, k.shape[-1]).to(self.k.dtype))
        self.v.index_copy_(0, flat, v.reshape(-1, v.shape[-1]).to(self.v.dtype))
        self.pos.index_copy_(0, flat, positions.to(self.pos.device).expand(B, H, q).reshape(-1))
        for t in self.slot_state.values():
            t.index_fill_(0, flat, 0)
        self.count += q
        self.length += q
        self.slack -= q

    def positions(self) -> torch.Tensor:
        """(B, Hkv, length) logical positions of each segment's slots, -1 past its count."""
        return self.slot_view("pos", self.length)

    # ---- per-slot views and rolling eviction (Scored.after_decode; the dense store has the same) ----
    def slot_view(self, name: str, n: int) -> torch.Tensor:
        """A per-slot tensor (``"k"``, ``"v"``, ``"pos"`` or a ``slot_state`` name) of each segment
        padded to ``n`` slots: (B, Hkv, n[, d]), a copy; past a segment's count: -1 for ``pos``, 0
        otherwise."""
        idx, valid = segment_slots(self.start, self.count, n)
        pool = self.slot_state[name] if name in self.slot_state else getattr(self, name)
        out = gather_segments(pool, idx)
        fill = -1 if name == "pos" else 0
        return out.masked_fill(~valid.view(*valid.shape, *(1,) * (out.dim() - 3)), fill)

    def tokens_at(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, m, d) at segment-local slots (B, Hkv, m)."""
        flat = (self.start[..., None] + slots).reshape(-1)
        k = torch.index_select(self.k, 0, flat).view(*slots.shape, -1)
        return k, torch.index_select(self.v, 0, flat).view(*slots.shape, -1)

    def add_slot_state(self, name: str, values: torch.Tensor) -> None:
        """Per-slot method state from (B, Hkv, m) values of each segment's first m slots (pool
        layout, moved with evictions; 0 elsewhere)."""
        m = values.shape[2]
        idx, valid = segment_slots(self.start, self.count.clamp(max=m), m)
        t = values.new_zeros(self.capacity)
        t[idx[valid]] = values[valid]
        self.slot_state[name] = t

    def add_to_slot_state(self, name: str, values: torch.Tensor) -> None:
        """``slot_state[name] += values`` for (B, Hkv, n) values padded like :meth:`slot_view`."""
        n = values.shape[2]
        idx, valid = segment_slots(self.start, self.count, n)
        self.slot_state[name].index_add_(0, idx[valid], values[valid].to(self.slot_state[name].dtype))

    def evict(self, victim: torch.Tensor, over: torch.Tensor, carry: tuple = ()) -> None:
        """Segments where ``over`` (B, Hkv) drop their slot ``victim`` (B, Hkv): the segment's last
        valid slot moves into it, so its valid slots stay its first ``count``. Device only.
        ``carry``: (B, Hkv, >= count) padded per-slot tensors (a caller's step-local scores), moved
        the same way."""
        last = (self.count - 1).clamp(min=0)
        src = torch.where(over, last, victim)  # segments not over copy the victim onto itself
        dst_flat = (self.start + victim).reshape(-1)
        src_flat = (self.start + src).reshape(-1)
        for pool in (self.k, self.v, self.pos, *self.slot_state.values()):
            pool.index_copy_(0, dst_flat, torch.index_select(pool, 0, src_flat))
        for buf in carry:
            buf.scatter_(2, victim[..., None], buf.gather(2, src[..., None]))
        tail = (self.start + last).reshape(-1)
        self.pos.index_copy_(0, tail, self.pos.index_select(0, tail).masked_fill(over.reshape(-1), -1))
        self.count -= over.long()

    def set_caps(self, cap: torch.Tensor, recent: torch.Tensor) -> None:
        """Rolling caps per segment (B, Hkv) and the recent tokens each protects (B, Hkv), after the
        prompt was written with headroom for them; one host sync for the bounds: ``host_cap`` (the
        largest cap: ``length`` never exceeds it) and ``cap_headroom`` (the fewest free slots of a
        segment at its cap: the headroom :meth:`finish_step` restores)."""
        self.extra["cap"], self.extra["recent"] = cap, recent
        ends = torch.cat([self.start.reshape(-1)[1:], self.start.new_tensor([self.capacity])])
        sizes = ends - self.start.reshape(-1)
        host_cap, low = torch.stack([cap.max(), (sizes - cap.reshape(-1)).min()]).tolist()
        self.host_cap, self.cap_headroom = int(host_cap), int(low)

    # ---- a decode step ---------------------------------------------------------------------
    def attend(self, q: torch.Tensor, mask, is_causal: bool, past_len: int, scale,
               return_lse: bool = False, calib=None):
        """Attention of q (B, Hq, nq, d) over every head's segment: out (B, Hq, nq, dv), or (out,
        lse (B, Hq, nq) fp32) with ``return_lse``. ``calib``: CaliDrop's partition (o_e, lse_e, use)
        of the one query, merged after the read (the ragged kernel has no calibration variant)."""
        from kvfx.runtime.attention import ragged_decode_attention

        o, lse = ragged_decode_attention(self, q, mask, is_causal, past_len, scale, return_lse=True)
        if calib is not None:
            from kvfx.methods.calidrop import merge

            o, lse = merge(o, lse, *calib)
        return (o, lse) if return_lse else o

    def attend_step(self, c, q, mask, is_causal: bool, past_len: int, scale):
        """(out, probabilities over the padded segments when ``c.needs_probs`` (H2O, TOVA rolling
        per head), else None); calibrated with CaliDrop's state when ``c.calib``."""
        from kvfx.runtime.attention import calibrated_decode, ragged_decode_attention

        if c.calib is not None:  # CaliDrop: the prompt's evicted partition merged with the read
            return calibrated_decode(self, q, mask, is_causal, past_len, scale, c.needs_probs, c.calib)
        if c.needs_probs:
            o, _, probs = ragged_decode_attention(self, q, mask, is_causal, past_len, scale, with_probs=True)
            return o, probs
        return self.attend(q, mask, is_causal, past_len, scale), None

    def finish_step(self, c, nq: int, probs) -> None:
        c.after_decode(self, nq, probs)  # rolling eviction per head, if the policy has a cap
        if self.cap_headroom is not None:  # every segment is at or below its cap again
            self.slack = max(self.slack, self.cap_headroom)

    # ---- accounting (held_bytes, kv_bytes, calib_bytes, tokens_held: Accounting) -----------
    def held_tensors(self) -> list:
        return [self.k, self.v, self.pos, self.start, self.count, *self.extra.values(),
                *self.slot_state.values()]


__all__ = ["RaggedStore"]
