"""CaliDrop (arXiv 2507.19906): speculative calibration of evicted tokens — DERIVED.

No official code is public; this is the formulation of docs/ALGORITHMS.md, every constant a
parameter. Plain PyTorch, fp32 (float64 for float64 input).

Notation: B batch, Hq query heads, Hkv KV heads, g = Hq // Hkv (query head h reads KV head h // g),
c stored queries per head, d key dim, dv value dim, n prompt length, s = scale · q·k.
For a query q and the evicted set E of its KV head:
    LSE_E(q) = log Σ_{j∈E} exp(s_j),   O_E(q) = Σ_{j∈E} softmax_E(s)_j v_j,
    G_E(q)   = ∇_q LSE_E(q) = scale · Σ_{j∈E} softmax_E(s)_j k_j    (adjust="tangent" only).
Prefill stores, per query head, the last c prompt queries q_1..q_c with O_E, LSE_E (and G_E) of
each: O(c·d) per head instead of O(|E|·d). Empty E: LSE_E = -inf, O_E = 0, G_E = 0.

Decode at q_t, attention over the kept cache C giving (o_C, LSE_C):
    i* = argmax_i cos(q_t, q_i),  sim = cos(q_t, q_i*),  use = sim >= threshold;
    LSE_E' = LSE_E(q_i*)                                   adjust="none" (the paper's minimum)
    LSE_E' = LSE_E(q_i*) + G_E(q_i*)·(q_t − q_i*)           adjust="tangent"
    o = σ(LSE_C − LSE_E')·o_C + (1 − σ(LSE_C − LSE_E'))·O_E(q_i*),  lse = logaddexp(LSE_C, LSE_E')
and o = o_C, lse = LSE_C where use is False. The merge is the exact rule of two disjoint softmax
partitions (`kvfx.methods.attention.merge_partitions`); the decode kernel's `calib=` does it as
one more split-K partition.

[Note] Why "tangent". Cosine similarity ignores the query norm and the logit shift, and LSE_E is
what sets the evicted partition's weight. LSE_E(q) = log Σ exp(scale·q·k_j) is convex in q, so its
tangent plane at q_i* is its exact first-order expansion *and* a lower bound everywhere:
LSE_E(q_t) >= LSE_E(q_i*) + G_E(q_i*)·δ, δ = q_t − q_i*, with error ½ scale² δᵀ Cov_E(k) δ
(Cov_E the softmax_E-weighted covariance of the evicted keys). So the estimate is exact to first
order, never over-weights the evicted partition, and costs one more (c, d) fp32 tensor per head.
G_E folds exactly like O_E at decode-time eviction (below). O_E itself is not adjusted.

Decode-time eviction of tokens e (H2O, TOVA, streaming) folds them into every stored entry i,
s_e = scale · q_i·k_e, exactly (vectorized over the m tokens):
    LSE' = logaddexp(LSE, log Σ_e exp(s_e)),
    O'   = e^{LSE−LSE'}·O + Σ_e e^{s_e−LSE'}·v_e,   G' = e^{LSE−LSE'}·G + Σ_e e^{s_e−LSE'}·scale·k_e.

Recompute tier (optional, off by default): the state also keeps the evicted K/V
(:class:`kvfx.methods.calidrop_evicted.EvictedKV`: in ``bits``-bit KIVI layout, as ALGORITHMS.md
asks, or in full precision with bits None) and, for heads with recompute_threshold <= sim <
threshold, computes O_E, LSE_E (, G_E) of q_t exactly over it (over the dequantized keys and
values: the quantizer's error is the only one) and inserts (q_t, O_E, LSE_E) into the history in
place of the entry *least similar to q_t* (entries never filled first): queries drift slowly, so
the entry farthest from the current query is the least likely to be matched next, this never
replaces the best match, and it needs no age counter. Decode-time evictions join the store (a
full-precision tail that is quantized a key group at a time).

All functions are functional: they return new tensors / a new `CalibState`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from kvfx.methods.attention import merge_partitions
from kvfx.methods.calidrop_evicted import EvictedKV

ADJUSTS = ("none", "tangent")
_COS_EPS = 1e-12  # |q|·|q_i| floor: a zero query has cosine 0 with everything


def _cd(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_query_head(x: torch.Tensor, hq: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...): query head h reads KV head h // g (a view, no copy)."""
    B, hkv = x.shape[:2]
    g = hq // hkv
    if g == 1:
        return x
    return x.unsqueeze(2).expand(B, hkv, g, *x.shape[2:]).reshape(B, hq, *x.shape[2:])


def _check_adjust(adjust) -> None:
    if type(adjust) is not str or adjust not in ADJUSTS:
        raise ValueError(f"calidrop: adjust got {adjust!r}, expected one of {', '.join(ADJUSTS)}")


@dataclass
class CalibState:
    """The CaliDrop history of one attention site.

    q_hist (B, Hq, c, d) stored queries (the window queries' dtype); o_e (B, Hq, c, dv) and
    lse_e (B, Hq, c) fp32 (float64 for float64 input; lse_e = -inf where E is empty);
    valid (B, Hq, c) bool, False for entries never filled (left-pad window rows): never matched;
    lse_grad (B, Hq, c, d) G_E of each entry, only with adjust="tangent" (else None);
    evicted: the evicted K/V of the recompute tier (else None).
    """

    q_hist: torch.Tensor
    o_e: torch.Tensor
    lse_e: torch.Tensor
    valid: torch.Tensor
    lse_grad: Optional[torch.Tensor] = None
    evicted: Optional[EvictedKV] = None

    @property
    def adjust(self) -> str:
        return "none" if self.lse_grad is None else "tangent"

    @property
    def has_evicted(self) -> bool:
        return self.evicted is not None

    def nbytes(self) -> int:
        """Bytes held by every tensor of the state (the recompute tier's store included)."""
        ev = 0 if self.evicted is None else self.evicted.nbytes()
        return ev + sum(t.nbytes for t in self.tensors() if t is not None)

    def tensors(self) -> tuple:
        """Every tensor field in declaration order (None for the absent optional ones), without
        copies; the recompute tier's store is ``evicted``."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "evicted")


def _compact_evicted(k, v, evicted):
    """Gather the evicted tokens of each KV head to the front, in order: (B, Hkv, m, d) K/V with
    m = the largest evicted count of any head, and the (B, Hkv, m) mask of real tokens."""
    m = int(evicted.sum(-1).max()) if evicted.numel() else 0
    order = torch.argsort((~evicted).to(torch.int8), dim=-1, stable=True)[..., :m]
    ok = torch.gather(evicted, -1, order)
    idx = order.unsqueeze(-1)
    k_ev = torch.gather(k, 2, idx.expand(*idx.shape[:-1], k.shape[-1]))
    v_ev = torch.gather(v, 2, idx.expand(*idx.shape[:-1], v.shape[-1]))
    return k_ev.masked_fill(~ok[..., None], 0), v_ev.masked_fill(~ok[..., None], 0), ok


def _partition(s, ok):
    """Mask logits s (B, Hq, r, m) to the keys with ok (B, Hkv, m) bool. Returns (lse (B, Hq, r),
    the masked s, ok per query head (B, Hq, m))."""
    ok_q = _per_query_head(ok, s.shape[1])
    s = s.masked_fill(~ok_q[:, :, None, :], float("-inf"))
    return torch.logsumexp(s, dim=-1), s, ok_q


def _o_and_grad(p, k, v, ok_q, scale, with_grad, cd):
    """p (B, Hq, r, m) weights -> (p @ v, scale · p @ k or None); K/V outside ok read as 0 (NaN safe)."""
    hq = p.shape[1]
    vv = _per_query_head(v, hq).to(cd).masked_fill(~ok_q[..., None], 0)
    o = p @ vv
    grad = None
    if with_grad:
        kk = _per_query_head(k, hq).to(cd).masked_fill(~ok_q[..., None], 0)
        grad = scale * (p @ kk)
    return o, grad


def build_state_from_logits(q_win, logits, k, v, evicted, *, scale, q_valid=None, adjust="none",
                            keep_evicted=False, evicted_bits=None) -> CalibState:
    """`build_state` from precomputed window logits (what SnapKV scoring computes): no second
    pass of q·Kᵀ.

    logits (B, Hq, c, n): scale · q_i·k_j for the c rows of q_win (B, Hq, c, d) over the n prompt
    keys. Only evicted positions are read (NaN/-inf elsewhere is fine, e.g. a causal mask inside
    the window); an evicted key must carry its real logit: the decode queries that use the entry
    see every evicted token. k, v (B, Hkv, n, d); k is read only for adjust="tangent" or
    keep_evicted. Other arguments as `build_state`.
    """
    _check_adjust(adjust)
    cd = _cd(q_win)
    B, hq, c, _ = q_win.shape
    if logits.shape != (B, hq, c, k.shape[2]):
        raise ValueError(f"build_state_from_logits: logits has shape {tuple(logits.shape)}, expected "
                         f"(B, Hq, c, n) = ({B}, {hq}, {c}, {k.shape[2]})")
    if evicted.shape != (B, k.shape[1], k.shape[2]) or evicted.dtype != torch.bool:
        raise ValueError(f"build_state: evicted must be a bool (B, Hkv, n) = ({B}, {k.shape[1]}, "
                         f"{k.shape[2]}) tensor, got {tuple(evicted.shape)} {evicted.dtype}")
    lse, s, ok_q = _partition(logits.to(cd), evicted)
    shift = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    p = torch.exp(s - shift[..., None])
    o, grad = _o_and_grad(p, k, v, ok_q, scale, adjust == "tangent", cd)
    valid = torch.ones(B, hq, c, dtype=torch.bool, device=q_win.device)
    if q_valid is not None:
        valid = valid & q_valid.to(q_win.device)[:, None, :]
        lse = lse.masked_fill(~valid, float("-inf"))
        o = o.masked_fill(~valid[..., None], 0)
        grad = grad.masked_fill(~valid[..., None], 0) if grad is not None else None
    state = CalibState(q_hist=q_win.clone(), o_e=o, lse_e=lse, valid=valid, lse_grad=grad)
    if keep_evicted:
        state.evicted = EvictedKV.build(*_compact_evicted(k, v, evicted), bits=evicted_bits)
    return state


def build_state(q_win, k, v, evicted, *, scale, q_valid=None, adjust="none",
                keep_evicted=False, evicted_bits=None) -> CalibState:
    """The CaliDrop history after prefill eviction.

    q_win (B, Hq, c, d): the last c prompt queries (default c = the observation window);
    k, v (B, Hkv, n, d) the prompt's keys/values; evicted (B, Hkv, n) bool, True for tokens the
    base eviction dropped (pads must be False: they are neither kept nor evicted); every evicted
    token counts for every stored query (no causal mask: the decode queries that use an entry see
    all of E);
    scale: the logit scale (d ** -0.5); q_valid: optional (B, c) bool, False for pad rows of the
    window (never matched); adjust: "none" | "tangent" (also stores G_E, see the module doc);
    keep_evicted: keep the evicted K/V for the recompute tier, in ``evicted_bits`` (2, 4, 8;
    None: full precision).

    >>> q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    >>> ev = torch.zeros(1, 2, 20, dtype=torch.bool); ev[..., :10] = True
    >>> st = build_state(q[:, :, -4:], k, v, ev, scale=0.25)
    >>> st.o_e.shape, st.lse_e.shape, st.nbytes()
    (torch.Size([1, 4, 4, 16]), torch.Size([1, 4, 4]), 2128)
    """
    cd = _cd(q_win)
    kk = _per_query_head(k, q_win.shape[1]).to(cd)
    logits = (q_win.to(cd) @ kk.transpose(-1, -2)) * scale
    return build_state_from_logits(q_win, logits, k, v, evicted, scale=scale, q_valid=q_valid,
                                   adjust=adjust, keep_evicted=keep_evicted, evicted_bits=evicted_bits)


def similarities(state: CalibState, q: torch.Tensor) -> torch.Tensor:
    """cos(q_t, q_i) for every stored entry: q (B, Hq, 1, d) -> (B, Hq, c) in the compute dtype;
    -inf at entries never filled."""
    cd = _cd(q)
    qt = q[:, :, 0].to(cd)
    h = state.q_hist.to(cd)
    dot = (h @ qt.unsqueeze(-1)).squeeze(-1)
    norms = h.norm(dim=-1) * qt.norm(dim=-1, keepdim=True)
    return (dot / norms.clamp_min(_COS_EPS)).masked_fill(~state.valid, float("-inf"))


def _lookup(state, q, threshold, adjust):
    _check_adjust(adjust)
    if adjust == "tangent" and state.lse_grad is None:
        raise ValueError("calidrop.lookup: adjust='tangent' needs a state built with adjust='tangent' "
                         "(it stores the gradient G_E of each entry)")
    sims = similarities(state, q)
    sim, idx = sims.max(dim=-1)  # ties: the first (oldest) entry
    o_e = torch.gather(state.o_e, 2, idx[..., None, None].expand(*idx.shape, 1, state.o_e.shape[-1]))[:, :, 0]
    lse_e = torch.gather(state.lse_e, 2, idx[..., None])[..., 0]
    if adjust == "tangent":
        cd = lse_e.dtype
        d = state.q_hist.shape[-1]
        q_i = torch.gather(state.q_hist, 2, idx[..., None, None].expand(*idx.shape, 1, d))[:, :, 0].to(cd)
        grad = torch.gather(state.lse_grad, 2, idx[..., None, None].expand(*idx.shape, 1, d))[:, :, 0]
        lse_e = lse_e + (grad * (q[:, :, 0].to(cd) - q_i)).sum(-1)  # -inf stays -inf (G_E = 0 there)
    return o_e, lse_e, sim, sim >= threshold, sims


def lookup(state: CalibState, q: torch.Tensor, threshold: float, *, adjust: str = "none"):
    """Nearest stored query per head and its evicted-partition statistics.

    q (B, Hq, 1, d). Returns o_e (B, Hq, dv), lse_e (B, Hq) (LSE_E' of the module doc, per
    `adjust`), sim (B, Hq) the best cosine (-inf if no entry is filled) and use = sim >= threshold
    (B, Hq) bool: exactly the `calib` tuple (o_e, lse_e, use) of `decode_attention`.

    >>> st = build_state(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16),
    ...                  torch.ones(1, 2, 9, dtype=torch.bool), scale=0.25)
    >>> o_e, lse_e, sim, use = lookup(st, st.q_hist[:, :, 2:3], 0.9)
    >>> bool(use.all()), torch.equal(o_e, st.o_e[:, :, 2])
    (True, True)
    """
    return _lookup(state, q, threshold, adjust)[:4]


def merge(o_c, lse_c, o_e, lse_e, use):
    """Merge the kept-cache attention with the evicted partition where `use` holds.

    o_c (..., dv), lse_c (...): e.g. decode attention's (B, Hq, 1, dv) and (B, Hq, 1); o_e, lse_e,
    use: `lookup`'s (B, Hq, dv), (B, Hq), (B, Hq) (reshaped to o_c's / lse_c's shape).
    o = σ(lse_c − lse_e)·o_c + (1 − σ(lse_c − lse_e))·o_e, lse = logaddexp(lse_c, lse_e), computed
    in fp32 (float64 for float64 input), o in o_c's dtype; where use is False, o_c and lse_c are
    returned bit for bit.
    """
    o_e = o_e.reshape(o_c.shape)
    lse_e = lse_e.reshape(lse_c.shape)
    use = use.reshape(lse_c.shape).to(torch.bool)
    o_m, lse_m = merge_partitions(o_c, lse_c, o_e, lse_e)
    return torch.where(use[..., None], o_m, o_c), torch.where(use, lse_m, lse_c)


def fold(state: CalibState, k_e, v_e, valid_e, *, scale) -> CalibState:
    """Fold tokens evicted at decode into every stored entry (exact; see the module doc).

    k_e, v_e (B, Hkv, m, d); valid_e (B, Hkv, m) bool, False for slots that evict nothing (their
    K/V may hold anything). With the recompute tier the tokens also join the evicted store.
    """
    cd = state.lse_e.dtype
    s = (state.q_hist.to(cd) @ _per_query_head(k_e, state.q_hist.shape[1]).to(cd).transpose(-1, -2)) * scale
    lse_new, s, ok_q = _partition(s, valid_e)
    lse = torch.logaddexp(state.lse_e, lse_new)
    shift = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    a = torch.exp(state.lse_e - shift)[..., None]  # e^{LSE − LSE'}
    p = torch.exp(s - shift[..., None])  # e^{s_e − LSE'}
    o_add, g_add = _o_and_grad(p, k_e, v_e, ok_q, scale, state.lse_grad is not None, cd)
    keep = state.valid[..., None]
    new = dataclasses.replace(
        state,
        o_e=torch.where(keep, a * state.o_e + o_add, state.o_e),
        lse_e=torch.where(state.valid, lse, state.lse_e),
        lse_grad=(None if state.lse_grad is None
                  else torch.where(keep, a * state.lse_grad + g_add, state.lse_grad)),
    )
    if state.has_evicted:
        new.evicted = state.evicted.append(k_e, v_e, valid_e)
    return new


def recompute(state: CalibState, q, *, scale, chunk: int = 1024):
    """Exact O_E, LSE_E (and G_E, None without adjust="tangent") of q (B, Hq, 1, d) over the
    evicted store (dequantized ~``chunk`` tokens at a time, the partial results merged exactly):
    (B, Hq, dv), (B, Hq), (B, Hq, d)."""
    if not state.has_evicted:
        raise ValueError("calidrop.recompute: the state keeps no evicted K/V "
                         "(build it with keep_evicted=True)")
    cd = state.lse_e.dtype
    with_grad = state.lse_grad is not None
    o = lse = grad = None
    for k_b, v_b, ok_b in state.evicted.blocks(cd, chunk):
        s = (q.to(cd) @ _per_query_head(k_b, q.shape[1]).transpose(-1, -2)) * scale
        lse_b, s, ok_q = _partition(s, ok_b)
        shift = torch.where(lse_b == float("-inf"), torch.zeros_like(lse_b), lse_b)
        o_b, g_b = _o_and_grad(torch.exp(s - shift[..., None]), k_b, v_b, ok_q, scale, with_grad, cd)
        if o is None:
            o, lse, grad = o_b, lse_b, g_b
            continue
        if with_grad:
            grad, _ = merge_partitions(grad, lse, g_b, lse_b)
        o, lse = merge_partitions(o, lse, o_b, lse_b)
    if o is None:  # an empty store
        B, hq = q.shape[:2]
        zeros = q.new_zeros(B, hq, 1, state.o_e.shape[-1], dtype=cd)
        o, lse = zeros, q.new_full((B, hq, 1), float("-inf"), dtype=cd)
        grad = q.new_zeros(B, hq, 1, q.shape[-1], dtype=cd) if with_grad else None
    return o[:, :, 0], lse[:, :, 0], None if grad is None else grad[:, :, 0]


def calibrate(state: CalibState, q, *, scale, threshold, recompute_threshold=None, adjust="none"):
    """One decode step of CaliDrop's two tiers: `lookup`, then (with recompute_threshold) exact
    recomputation for heads with recompute_threshold <= sim < threshold, whose result replaces
    the stored entry least similar to q. Returns (o_e, lse_e, use, state'): the `calib` tuple of
    `decode_attention` and the updated history (the same object without the recompute tier).
    This reference recomputes every head and then selects (no host sync); a runtime may skip the
    pass over the evicted store when no head falls in the tier."""
    o_e, lse_e, sim, use, sims = _lookup(state, q, threshold, adjust)
    if recompute_threshold is None:
        return o_e, lse_e, use, state
    if recompute_threshold >= threshold:
        raise ValueError(f"calidrop.calibrate: recompute_threshold got {recompute_threshold}, expected "
                         f"< threshold ({threshold})")
    tier = (sim >= recompute_threshold) & ~use
    o_x, lse_x, g_x = recompute(state, q, scale=scale)
    o_e = torch.where(tier[..., None], o_x, o_e)
    lse_e = torch.where(tier, lse_x, lse_e)
    # Insert: the least similar entry (never-filled ones have sim = -inf, so they go first).
    slot = torch.nn.functional.one_hot(sims.argmin(dim=-1), sims.shape[-1]).to(torch.bool) & tier[..., None]
    sl = slot[..., None]
    new = dataclasses.replace(
        state,
        q_hist=torch.where(sl, q.to(state.q_hist.dtype), state.q_hist),
        o_e=torch.where(sl, o_x[:, :, None], state.o_e),
        lse_e=torch.where(slot, lse_x[..., None], state.lse_e),
        valid=state.valid | slot,
        lse_grad=None if g_x is None else torch.where(sl, g_x[:, :, None], state.lse_grad),
    )
    return o_e, lse_e, use | tier, new


@dataclass(frozen=True)
class CaliDrop:
    """The method's parameters (policy `calibration:`): history c, threshold τ, the optional
    recompute tier's τ_re (None: off) and bits of its evicted store (None: full precision), and
    the LSE adjustment ("none" | "tangent")."""

    history: int = 32
    threshold: float = 0.9
    recompute_threshold: Optional[float] = None
    adjust: str = "none"
    recompute_bits: Optional[int] = None

    def __post_init__(self):
        if type(self.history) is not int or self.history < 1:
            raise ValueError(f"CaliDrop.history: got {self.history!r}, expected an int >= 1")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"CaliDrop.threshold: got {self.threshold!r}, expected a cosine in [-1, 1]")
        if self.recompute_threshold is not None and not -1.0 <= self.recompute_threshold < self.threshold:
            raise ValueError(f"CaliDrop.recompute_threshold: got {self.recompute_threshold!r}, expected "
                             f"a cosine in [-1, threshold={self.threshold})")
        _check_adjust(self.adjust)
        if self.recompute_bits not in (None, 2, 4, 8):
            raise ValueError(f"CaliDrop.recompute_bits: got {self.recompute_bits!r}, expected 2, 4, 8 or None")

    @property
    def keep_evicted(self) -> bool:
        return self.recompute_threshold is not None

    def build_state(self, q, k, v, evicted, *, scale, q_valid=None) -> CalibState:
        """From the prompt's queries q (B, Hq, n, d): the last `history` rows are stored."""
        c = min(self.history, q.shape[2])
        qv = None if q_valid is None else q_valid[:, -c:]
        return build_state(q[:, :, -c:], k, v, evicted, scale=scale, q_valid=qv, adjust=self.adjust,
                           keep_evicted=self.keep_evicted, evicted_bits=self.recompute_bits)

    def calibrate(self, state: CalibState, q, *, scale):
        return calibrate(state, q, scale=scale, threshold=self.threshold,
                         recompute_threshold=self.recompute_threshold, adjust=self.adjust)
