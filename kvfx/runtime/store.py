"""Per-site KV store: the memory that replaces the model's own cache.

Layout (one site = one attention layer):

    k, v      (B, Hkv, cap, d)   kept keys/values, slot order = insertion order
    pos       (B, Hkv, cap)      logical position of each slot, -1 = empty
    count     (B, Hkv)           valid slots per row; valid slots are [0, count)

Rows differ in their number of valid slots only because of padding (pads are never kept) or
per-head eviction. ``length`` is a host-side upper bound of ``count`` (the slots attention must
look at); it changes by known amounts (``+q_len`` on append, fixed under a rolling cap), so it
never needs a device sync. The store lives behind an opaque custom op, so none of its host-side
numbers reach dynamo's guards: growing it never recompiles a graph.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvfx.methods.registry import STORE_CAPS

_GROW_QUANTUM = 16  # capacities are multiples of this
_GROW_MIN = 64  # tokens added per growth at least; cap/32 beyond that (copy amortized to ~3%)


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


CAPABILITIES = {
    "evict": "slots can be dropped during decode (rolling caps: H2O, TOVA, streaming, max_tokens, LagKV)",
    "probs": "decode attention can return its probabilities over the slots (H2O, TOVA scores)",
    "calibration": "holds CaliDrop's state and exact evicted keys can be folded into it",
    "quantized": "tokens are held as low-bit codes (KIVI), read through the quantized attention",
    "latent": "tokens are held as low-rank latents (ReCalKV), read through the latent attention",
}


class KVStore(Protocol):
    """The protocol every cache representation implements (one site, one sequence).

    Lifecycle (:func:`kvfx.runtime.ops.site_attention`, :func:`kvfx.runtime.lowrank.lowrank_site_attention`):
    ``reset()`` for a new sequence; the compressor's ``prefill`` writes the kept prompt tokens with
    ``write_kept(k, v, pos, count, capacity)`` (head-wise AdaKV budgets: ``write_selection(prio,
    budget, k, v)``, which the dense and the ragged store (:mod:`kvfx.runtime.ragged`) implement); each decode step ``append(k, v, positions)``, attends
    with ``attend_step`` (dense, quantized or latent read; calibrated when the policy has CaliDrop),
    then ``finish_step`` (quantized: flush the residual; dense: the compressor's ``after_decode``,
    eviction through ``evict``): :func:`kvfx.runtime.ops.decode_step`.
    ``CAPS`` declares which :data:`CAPABILITIES` the representation has; a policy that needs one its
    store lacks is refused when it is resolved (:func:`kvfx.runtime.compressor.check_capabilities`).
    Accounting (``kvfx.memory``) reads the attributes and byte counters below; every byte comes from
    a tensor the store holds."""

    CAPS: frozenset
    seen: int  # logical tokens of the sequence processed (host)
    batch: int
    kv_heads: int
    dtype: torch.dtype | None

    def reset(self) -> None: ...
    @property
    def empty(self) -> bool: ...
    @property
    def capacity(self) -> int: ...
    def head_dims(self) -> tuple[int, int]: ...
    def write_kept(self, k, v, pos, count, capacity: int) -> None: ...
    def append(self, k, v, positions) -> None: ...
    def attend_step(self, c, q, mask, is_causal: bool, past_len: int, scale): ...
    def finish_step(self, c, nq: int, probs) -> None: ...
    def held_bytes(self) -> int: ...
    def kv_bytes(self) -> int: ...
    def calib_bytes(self) -> int: ...
    def tokens_held(self) -> int: ...
    def tokens_held_mean(self) -> float: ...


def mean_count(count: torch.Tensor | None) -> float:
    """The mean of a store's per-(row, head) token counts (0 when it holds none)."""
    return 0.0 if count is None or count.numel() == 0 else float(count.float().mean().item())


class Accounting:
    """Byte accounting shared by the stores that keep ``k``/``v``/``count``/``calib`` as
    attributes: ``held_tensors()`` says what they hold."""

    def held_tensors(self) -> list:
        raise NotImplementedError

    def held_bytes(self) -> int:
        """Bytes of every tensor :meth:`held_tensors` names, plus CaliDrop's state."""
        return sum(t.untyped_storage().nbytes() for t in self.held_tensors() if t is not None) \
            + self.calib_bytes()

    def calib_bytes(self) -> int:
        return 0 if self.calib is None else self.calib.nbytes()

    def kv_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.k, self.v) if t is not None)

    def tokens_held(self) -> int:
        """The most tokens a (row, head) holds."""
        return 0 if self.count is None else int(self.count.max().item())

    def tokens_held_mean(self) -> float:
        """The tokens a (row, head) holds on average: for head-wise budgets (AdaKV) the bytes follow
        this, not :meth:`tokens_held` (the longest head)."""
        return mean_count(self.count)


class SiteStore(Accounting):
    """Fixed-capacity key/value storage for one site, with byte accounting."""

    CAPS = STORE_CAPS["dense"]

    def __init__(self, site_id: str):
        self.site_id = site_id
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.length = 0  # host upper bound of count
        self.seen = 0  # logical tokens processed in this sequence (host)
        self.ragged = False  # True when some slot in [0, length) may be invalid
        self.batch = 0
        self.kv_heads = 0
        self.dtype: torch.dtype | None = None
        self.extra: dict[str, torch.Tensor] = {}  # method state that is not per slot
        self.slot_state: dict[str, torch.Tensor] = {}  # (B, Hkv, cap) per-slot method state
        self.extra_host: dict = {}  # host-side method bookkeeping (never read from the device)
        self.host_cap = 0  # rolling policies: host bound of ``length``
        self.calib = None  # CaliDrop state (kvfx.methods.calidrop.CalibState) of the sequence
        self.calib_scale = 1.0
        self.window: int | None = None  # a sliding-window site: the tokens the model's cache keeps

    # ---- lifecycle -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence: called when the model's cache is empty again (a new prompt)."""
        self.k = self.v = self.pos = self.count = None
        self.length = self.seen = 0
        self.ragged = False
        self.extra = {}
        self.slot_state = {}
        self.extra_host = {}
        self.host_cap = 0
        self.calib = None
        self.window = None

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def empty(self) -> bool:
        return self.k is None

    def head_dims(self) -> tuple[int, int]:
        return self.k.shape[-1], self.v.shape[-1]

    def allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int) -> None:
        """(Re)allocate to ``capacity`` slots, keeping the first ``length`` slots."""
        B, H = like_k.shape[0], like_k.shape[1]
        dev = like_k.device
        k = like_k.new_zeros(B, H, capacity, like_k.shape[-1])
        v = like_v.new_zeros(B, H, capacity, like_v.shape[-1])
        pos = torch.full((B, H, capacity), -1, dtype=torch.long, device=dev)
        if self.k is not None and self.length:
            n = self.length
            k[:, :, :n] = self.k[:, :, :n]
            v[:, :, :n] = self.v[:, :, :n]
            pos[:, :, :n] = self.pos[:, :, :n]
        else:
            self.count = torch.zeros(B, H, dtype=torch.long, device=dev)
        for name, t in self.slot_state.items():
            grown = t.new_zeros(B, H, capacity)
            grown[:, :, :self.length] = t[:, :, :self.length]
            self.slot_state[name] = grown
        self.k, self.v, self.pos = k, v, pos
        self.batch, self.kv_heads, self.dtype = B, H, like_k.dtype

    def shrink_to_fit(self) -> None:
        """Give back the slots a prompt chunk needed and the kept tokens no longer fill: capacity
        back to what a one-call prefill allocates (the held tokens, or the rolling cap, plus one
        step). Called once, at the first decode step after a chunked prefill."""
        want = max(self.length, self.host_cap) + 1
        if self.k is not None and self.capacity > want:
            self.allocate(self.k, self.v, want)

    def ensure_capacity(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        if needed > self.capacity:
            grow = _round_up(needed + max(_GROW_MIN, self.capacity // 32), _GROW_QUANTUM)
            if self.host_cap:  # a rolling cache: never more slots than its cap plus this step's tokens
                grow = min(grow, max(needed, self.host_cap + 1))
            self.allocate(like_k, like_v, grow)

    # ---- writes ----------------------------------------------------------------------------
    def write_kept(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, count: torch.Tensor,
                   capacity: int) -> None:
        """Replace the contents by gathered tokens: k/v (B, Hkv, m, d), pos (B, Hkv, m) with -1
        for unused trailing slots, count (B, Hkv)."""
        m = k.shape[2]
        self.k = self.v = self.pos = None
        self.length = 0
        self.allocate(k, v, max(capacity, m))
        self.k[:, :, :m] = k
        self.v[:, :, :m] = v
        self.pos[:, :, :m] = pos
        self.count = count.clone()
        self.length = m
        self.ragged = bool(m) and not _all_full(pos)

    def write_selection(self, prio: torch.Tensor, budget: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        slack: int = 1) -> None:
        """The ``budget`` (B, Hkv) highest ``prio`` (B, Hkv, n) tokens of each head, gathered and
        written (capacity: the largest budget + ``slack``); what a head-wise (AdaKV) compressor
        calls, as on :class:`kvfx.runtime.ragged.RaggedStore`."""
        from kvfx.runtime import compress

        m = int(budget.max().item()) if budget.numel() else 0
        k_kept, v_kept, pos, count = compress.select_and_gather(prio, budget, k, v, m)
        self.write_kept(k_kept, v_kept, pos, count, m + slack)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Append q new tokens (B, Hkv, q, d) at each row's own ``count`` (no host sync)."""
        q = k.shape[2]
        self.ensure_capacity(self.length + q, k, v)
        B, H = k.shape[0], k.shape[1]
        slot = self.count[:, :, None] + torch.arange(q, device=k.device)  # (B, H, q)
        self.k.scatter_(2, slot[..., None].expand(B, H, q, k.shape[-1]), k)
        self.v.scatter_(2, slot[..., None].expand(B, H, q, v.shape[-1]), v)
        self.pos.scatter_(2, slot, positions.expand(B, H, q))
        for t in self.slot_state.values():
            t.scatter_(2, slot, 0)
        self.count += q
        self.length += q

    def add_slot_state(self, name: str, values: torch.Tensor) -> None:
        """Per-slot method state (B, Hkv, m) for the first m slots; it moves with evictions."""
        t = values.new_zeros(self.batch, self.kv_heads, self.capacity)
        t[:, :, :values.shape[2]] = values
        self.slot_state[name] = t

    # ---- per-slot views (Scored.after_decode; the ragged store has the same) ----------------
    def slot_view(self, name: str, n: int) -> torch.Tensor:
        """The first ``n`` slots of a per-slot tensor (``"k"``, ``"v"``, ``"pos"`` or a
        ``slot_state`` name): (B, Hkv, n[, d]), a view."""
        t = self.slot_state[name] if name in self.slot_state else getattr(self, name)
        return t[:, :, :n]

    def tokens_at(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, m, d) at slots (B, Hkv, m)."""
        from kvfx.methods.select import gather_tokens

        return gather_tokens(self.k, slots), gather_tokens(self.v, slots)

    def add_to_slot_state(self, name: str, values: torch.Tensor) -> None:
        """``slot_state[name][:, :, :n] += values`` (B, Hkv, n)."""
        self.slot_state[name][:, :, :values.shape[2]] += values

    def set_caps(self, cap: torch.Tensor, recent: torch.Tensor, host_cap: int | None = None) -> None:
        """Rolling caps (B, Hkv) and the recent tokens each protects (B, Hkv); ``host_cap`` their
        largest (computed with one host sync when the caller has not)."""
        self.extra["cap"], self.extra["recent"] = cap, recent
        self.host_cap = int(cap.max().item()) if host_cap is None else host_cap

    def evict(self, victim: torch.Tensor, over: torch.Tensor, carry: tuple = ()) -> None:
        """Rows where ``over`` (B, Hkv) drop slot ``victim`` (B, Hkv): the row's last valid
        slot moves into it, so valid slots stay compact. Device-only, no host sync. ``carry``:
        more (B, Hkv, >= count) per-slot tensors, moved like ``slot_state`` (a caller's
        step-local scores)."""
        last = (self.count - 1).clamp(min=0)
        src = torch.where(over, last, victim)  # rows not over copy the victim onto itself
        for buf in (self.k, self.v):
            idx = src[:, :, None, None].expand(*src.shape, 1, buf.shape[-1])
            buf.scatter_(2, victim[:, :, None, None].expand_as(idx), buf.gather(2, idx))
        for buf in (self.pos, *self.slot_state.values(), *carry):
            buf.scatter_(2, victim[..., None], buf.gather(2, src[..., None]))
        kept = self.pos.gather(2, last[..., None])
        self.pos.scatter_(2, last[..., None], kept.masked_fill(over[..., None], -1))
        self.count -= over.long()

    def roll_window(self, w: int, nq: int = 1) -> None:
        """A sliding-window site (:mod:`kvfx.runtime.window`): drop every token no later query can
        see (logical position before ``seen - w``); capacity ``w + 1`` (the window and one decode
        step), so a long prompt's slots are given back. A one-token step after the first roll expires
        at most one token per row: it leaves through :meth:`evict` (device only: no host sync, no
        copy of the window). The first roll and prompt chunks (``nq`` > 1) compact the slots."""
        from kvfx.runtime.window import expired

        if self.k is None:
            return
        rolled = self.window is not None
        self.window = self.host_cap = w
        n, cutoff = self.length, self.seen - w
        if rolled and nq == 1:
            if cutoff > 0:  # the row's oldest slot leaves if it is now outside the window
                age = self.pos[:, :, :n].masked_fill(self.pos[:, :, :n] < 0, self.seen)
                victim = age.argmin(-1)
                self.evict(victim, age.gather(-1, victim[..., None])[..., 0] < cutoff)
                self.length = min(n, w)  # a row holds at most the w positions [seen - w, seen)
                self.ragged = True
            return
        gone = expired(self.pos[:, :, :n], cutoff)
        if bool(gone.any()):
            order = torch.argsort(gone.to(torch.int8), dim=-1, stable=True)  # kept slots first, in order
            for buf in (self.k, self.v):
                buf[:, :, :n] = buf[:, :, :n].gather(2, order[..., None].expand(*order.shape, buf.shape[-1]))
            for buf in (self.pos, *self.slot_state.values()):
                buf[:, :, :n] = buf[:, :, :n].gather(2, order)
            self.count -= gone.sum(-1)
            self.length = int(self.count.max().item())
            self.pos[:, :, :n].masked_fill_(torch.arange(n, device=self.pos.device) >= self.count[..., None], -1)
            self.ragged = self.length > 0 and not _all_full(self.pos[:, :, :self.length])
        if self.capacity > max(self.length, w) + 1:
            self.allocate(self.k, self.v, max(self.length, w) + 1)

    # ---- a decode step (kvfx.runtime.ops.decode_step) ---------------------------------------
    def attend_step(self, c, q, mask, is_causal: bool, past_len: int, scale):
        """Attention of q over the slots (calibrated with CaliDrop's state when ``c.calib``):
        (out, probabilities over the slots when ``c.needs_probs``, else None)."""
        from kvfx.runtime.attention import calibrated_decode, decode_attention

        if c.calib is not None:
            return calibrated_decode(self, q, mask, is_causal, past_len, scale, c.needs_probs, c.calib)
        return decode_attention(self, q, mask, is_causal, past_len, scale, c.needs_probs)

    def finish_step(self, c, nq: int, probs) -> None:
        c.after_decode(self, nq, probs)  # rolling eviction, if the policy has a cap

    # ---- accounting ------------------------------------------------------------------------
    def held_tensors(self) -> list:
        """Every tensor this site's store holds (buffers, counters, method state)."""
        return [self.k, self.v, self.pos, self.count, *self.extra.values(), *self.slot_state.values()]


def _all_full(pos: torch.Tensor) -> bool:
    return bool((pos >= 0).all().item())
