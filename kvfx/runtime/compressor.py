"""What a site keeps: compressors built from a resolved layer policy.

The runtime calls, per sequence,

* ``prefill(store, q, k, v, valid, scale)`` with the full-precision prompt, which writes the
  kept tokens into the store (scores → shared selection → gather);
* ``after_decode(store, nq, probs)`` after a decode step's tokens were appended and attended;
  rolling policies evict down to their cap here. ``probs`` (B, Hq, nq, n) is the step's
  attention over the store when ``needs_probs`` is set (H2O, TOVA), else None.

Scorers (``kvfx.methods.<name>``) only produce ``(B, Hkv, n)`` scores; budgets, sinks, the
window, pads, gathering and eviction are here and in :mod:`kvfx.methods.select`.
"""

from __future__ import annotations

import torch

from kvfx.methods import registry
from kvfx.methods.adakv import head_budgets
from kvfx.methods.lagkv import lagkv_keep_indices
from kvfx.methods.lowrank import latent_basis
from kvfx.methods.recalkv import LayerFactors
from kvfx.methods.pyramidkv import pyramid_budget
from kvfx.methods.scoring import default_scale, group_reduce, window_logits
from kvfx.methods.select import chunk_scores, gather_tokens, priority, select_kept
from kvfx.runtime import compress
from kvfx.runtime.store import SiteStore

_BIG = torch.iinfo(torch.long).max


class Compressor:
    """Keep everything (the ``full`` policy)."""

    name = "full"
    prompt_eviction = False  # evicts prompt tokens (then a prompt chunk is compressed: compress_chunk)
    quant = None  # a kvfx.methods.quant.QuantConfig when the layer policy has quant:
    calib = None  # a kvfx.methods.calidrop.CaliDrop when the layer policy has calibration:
    needs_probs = False
    kernel_scores = "none"  # the scores the fused prefill kernel should emit
    window = 0
    logit_rows = 0  # kernel_scores="window_logits": the prompt queries whose logits are kept

    def prefill(self, store: SiteStore, q, k, v, valid, scale=None, votes=None) -> None:
        B, Hkv, n, _ = k.shape
        count = torch.full((B, Hkv), n, dtype=torch.long, device=k.device)
        if bool(valid.all()):
            store.write_kept(k, v, torch.arange(n, device=k.device).expand(B, Hkv, n), count, n)
            return
        n_valid = valid.long().sum(-1)
        idx, count = select_kept(None, valid, n_valid, sink=0, window=0, kv_heads=Hkv)
        _write_selection(store, k, v, idx, count, 0)

    def after_decode(self, store: SiteStore, nq: int, probs=None) -> None:
        pass

    @property
    def needs(self) -> frozenset:
        """The store capabilities this compressor uses (see :data:`kvfx.runtime.store.CAPABILITIES`)."""
        out = set()
        if self.calib is not None:
            out.add("calibration")
        if self.needs_probs:
            out.add("probs")
        if getattr(self, "roll_at_budget", False) or getattr(self, "max_tokens", None) is not None \
                or isinstance(self, LagKVCompressor):  # (a partitioned scorer evicts during decode)
            out.add("evict")
        return frozenset(out)

    @property
    def kernel_window(self) -> int:
        """The ``window`` the fused prefill kernel is launched with (rows of votes or logits)."""
        return self.logit_rows if self.kernel_scores == "window_logits" else self.window

    def init_calibration(self, store, q, k, v, valid, scale) -> None:
        """CaliDrop (``self.calib``): after prefill, the evicted partition's statistics for the
        last ``history`` prompt queries. A scorer that scored from the window's logits (SnapKV,
        PyramidKV and TOVA with calibration, on the kernel path and on the PyTorch path) hands
        them over, so no second q·Kᵀ pass runs."""
        logits, self._window_logits = getattr(self, "_window_logits", None), None
        if self.calib is None:
            return
        from kvfx.methods.calidrop import build_state_from_logits
        from kvfx.runtime.attention import evicted_mask

        sm = default_scale(q, scale)
        store.calib_scale = sm
        evicted = evicted_mask(store, valid)
        c = min(self.calib.history, q.shape[2])
        if logits is not None and logits.shape[2] >= c:
            store.calib = build_state_from_logits(
                q[:, :, -c:], logits[:, :, logits.shape[2] - c:], k, v, evicted, scale=sm, q_valid=valid[:, -c:],
                adjust=self.calib.adjust, keep_evicted=self.calib.keep_evicted,
                evicted_bits=self.calib.recompute_bits)
        else:
            store.calib = self.calib.build_state(q, k, v, evicted, scale=sm, q_valid=valid)


def _write_selection(store, k, v, idx, count, slack) -> None:
    m = idx.shape[-1]
    unused = torch.arange(m, device=k.device)[None, None] >= count[..., None]
    store.write_kept(gather_tokens(k, idx), gather_tokens(v, idx), idx.masked_fill(unused, -1),
                     count, m + slack)


class Scored(Compressor):
    """A registered top-k scorer (:mod:`kvfx.methods.registry`): score → select within the budget
    (per-layer schedule, optional ChunkKV chunks) → during decode, grow, or roll at a cap evicting
    one token at a time in the scorer's ``decode`` order (``"oldest"``, ``"accumulated"``,
    ``"current"``, ``"self"``).

    Budgets: ``keep``·(valid prompt tokens) or ``tokens``, never below ``sink + window`` nor
    :data:`kvfx.methods.registry.MIN_BUDGET`, never above ``max_tokens``; a prompt shorter than its
    budget keeps everything. A rolling cache (the scorer ``rolls``, or ``max_tokens``) rolls at that
    budget, so a short prompt's cache grows to it first."""

    chunk_reduce = None  # tensor parallelism: sums ChunkKV's per-token scores over the ranks (run_passes)

    def __init__(self, scorer, *, keep, tokens, sink, window, max_tokens=None, layer=0, num_layers=1,
                 pyramid=False, group_reduce="mean", chunk=None, rolls=None, safeguard=None):
        self.scorer = scorer
        # AdaKV (budget.allocation: adaptive): the per-head floor; None = uniform allocation
        self.safeguard = safeguard
        self.ragged = safeguard is not None  # per-head token counts: the head-wise ragged store
        self.name = scorer.name
        self.keep, self.tokens, self.sink, self.window = keep, tokens, sink, window
        self.max_tokens, self.chunk = max_tokens, chunk
        self.recent = getattr(scorer, "recent_share", None)   # H2O: the budget's recent share
        self.layer, self.num_layers, self.pyramid = layer, num_layers, pyramid
        self.group_reduce = group_reduce
        # rolling eviction at the prompt budget (H2O, TOVA, streaming), or at max_tokens
        self.roll_at_budget = scorer.rolls if rolls is None else rolls
        rolling = self.roll_at_budget or max_tokens is not None
        self.decode = scorer.decode if rolling else None
        self.needs_probs = self.decode in ("accumulated", "current")
        self.kernel_scores = scorer.kernel_scores if scorer.kernel_scores not in ("key_norm",) else "none"

    def _raw_budget(self, n_valid: torch.Tensor) -> torch.Tensor:
        """(B,) long: the budget before the prompt's length caps it (floors and max_tokens applied)."""
        if self.tokens is not None:
            b = torch.full_like(n_valid, self.tokens)
        elif self.keep is not None:
            b = torch.round(n_valid.double() * self.keep).long()
        else:
            b = n_valid.clone()
        floor = max(self.sink, 0) + self._window(n_valid)
        b = torch.maximum(b, torch.clamp(floor, min=registry.MIN_BUDGET))
        if self.max_tokens is not None:  # the cap holds from the prompt on
            b = b.clamp(max=self.max_tokens)
        return b

    def budget(self, n_valid: torch.Tensor) -> torch.Tensor:
        """(B,) long tokens each row keeps of its prompt."""
        b = torch.minimum(self._raw_budget(n_valid), n_valid)
        if self.pyramid:
            b = pyramid_budget(n_valid, b, window=self.window, layer=self.layer,
                               num_layers=self.num_layers)
            if self.max_tokens is not None:
                b = b.clamp(max=self.max_tokens)
        return torch.minimum(b, n_valid)

    def _window(self, n_valid):
        if self.recent is not None:  # H2O: the budget splits heavy:recent, recent is the window
            if self.tokens is not None:
                base = torch.full_like(n_valid, self.tokens)
            else:
                base = torch.round(n_valid.double() * self.keep).long()
            return torch.maximum(torch.round(base.double() * self.recent).long(),
                                 torch.full_like(n_valid, self.window))
        return torch.full_like(n_valid, self.window)

    def prefill(self, store, q, k, v, valid, scale=None, votes=None, payload=None, rope=None) -> None:
        """``votes``: the raw scores the fused prefill kernel emitted (CUDA), if any.
        ``rope``: the queries' (cos, sin), given to a scorer that reads them (``rotary``).
        ``payload``: (k', v') (B, H', n, ·) to gather and store instead of k, v, with H' dividing
        the KV heads (low-rank latents: H' = 1): the scores of the H' // Hkv heads each payload
        head stands for are reduced with ``group_reduce`` (a key-norm scorer scores the payload keys)."""
        B, Hkv = k.shape[:2]
        n_valid = valid.long().sum(-1)
        budget = self.budget(n_valid)
        if self.kernel_scores == "window_logits":
            # CaliDrop: one set of window logits, the prefill kernel's (CUDA) or computed here,
            # gives the scores and (init_calibration) the evicted partition's statistics
            if votes is None:
                votes = window_logits(q, k, valid, self.logit_rows, default_scale(q, scale))
            scores = self.scorer.from_logits(votes, valid, Hkv)
            self._window_logits = votes
        elif votes is not None:
            scores = self.scorer.from_votes(votes, valid, Hkv)
        elif self.scorer.kernel_scores == "key_norm":  # attention-free: the kv_stats kernel on CUDA
            scores = compress.knorm_scores(k if payload is None else payload[0])
        elif self.scorer.rotary:
            scores = self.scorer.scores(q, k, v, valid, default_scale(q, scale), rope=rope)
        else:
            scores = self.scorer.scores(q, k, v, valid, default_scale(q, scale))
        if payload is not None:
            k, v = payload
            Hkv = k.shape[1]
            if scores is not None and scores.shape[1] != Hkv:
                scores = group_reduce(scores, Hkv, self.group_reduce)
        if self.chunk is not None and scores is not None:
            scores = chunk_scores(scores, valid, self.chunk, self.chunk_reduce)
        window = self._window(n_valid)
        # Select + gather (the select_gather kernel on CUDA): count = budget <= n_valid, since
        # only pads carry -inf (a -inf score from a scorer would be dropped); pos -1 past count.
        prio = priority(scores, valid, sink=self.sink, window=window, kv_heads=Hkv)
        if self.ragged:  # AdaKV: the same total shared by the heads by their scores, (B, Hkv) counts,
            # selected straight into the store's layout
            self._write_heads(store, prio, head_budgets(prio, budget, self.safeguard), k, v, scores,
                              n_valid, budget, window)
            store.extra["seen_valid"] = n_valid.clone()
            return
        m = int(budget.max().item()) if B else 0
        k_kept, v_kept, pos, count = compress.select_and_gather(prio, budget, k, v, m)
        self._write(store, k_kept, v_kept, pos, count, n_valid, budget, window)
        idx = pos.clamp(min=0)
        store.extra["seen_valid"] = n_valid.clone()  # valid prompt tokens so far (prompt chunks add)
        if self.decode == "accumulated":
            store.add_slot_state("score", scores.gather(2, idx).masked_fill(
                torch.arange(idx.shape[-1], device=k.device) >= count[..., None], 0))

    prompt_eviction = True

    def _cap(self, n_valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor | None:
        """(B,) long: a rolling cache's cap, the budget of ``n_valid`` tokens (not capped by the
        prompt's length) or ``max_tokens``; None when the cache does not roll."""
        if self.roll_at_budget:
            return self._raw_budget(n_valid)
        if self.max_tokens is not None:
            return torch.full_like(budget, self.max_tokens)
        return None

    def _write_heads(self, store, prio, counts, k, v, scores, n_valid, budget, window) -> None:
        """AdaKV: write each head's ``counts`` (B, Hkv) top tokens and, for a rolling cache, a cap
        per head: its allocation plus the row's distance to the row's cap (``cap - budget``: a
        short prompt's heads grow to it), so a row's caps sum to ``cap · Hkv`` and every head then
        rolls at its own allocation. The store gets headroom for that distance plus one step."""
        B, Hkv = counts.shape
        cap = self._cap(n_valid, budget)
        if cap is None:
            store.write_selection(prio, counts, k, v)
            return
        extra = (cap - budget).clamp(min=0)
        store.write_selection(prio, counts, k, v, slack=int(extra.max().item()) + 1 if B else 1)
        store.set_caps(counts + extra[:, None], window[:, None].expand(B, Hkv).contiguous())
        if self.decode == "accumulated":  # H2O: the kept tokens' prompt scores, accumulated from here
            pos = store.slot_view("pos", store.length)  # length: the largest count (host)
            store.add_slot_state("score", scores.gather(2, pos.clamp(min=0)).masked_fill(pos < 0, 0))

    def _write(self, store, k_kept, v_kept, pos, count, n_valid, budget, window) -> None:
        """Write the kept tokens and, for a rolling cache, its cap (:meth:`_cap`); the allocation
        is sized to the cap plus one decode step."""
        B, Hkv, m = pos.shape
        cap = self._cap(n_valid, budget)
        host_cap = 0 if cap is None else int(cap.max().item())  # host bound of the store length
        store.write_kept(k_kept, v_kept, pos, count, max(m, host_cap) + 1)
        if cap is not None:
            store.set_caps(cap[:, None].expand(B, Hkv).contiguous(), window[:, None].expand(B, Hkv).contiguous(),
                           host_cap)

    def compress_chunk(self, store, q, scale=None, rope=None) -> None:
        """A prompt chunk (a multi-token continuation: ``generate(..., prefill_chunk_size=N)``, or
        a new turn) was appended and attended: compress what the store holds (the tokens kept so
        far and the chunk) to the budget of the valid tokens seen so far, so the store never holds
        more than the budget plus one chunk, and after the last chunk it holds what an unchunked
        prefill keeps (the same count; the tokens may differ: see the README).

        Per scorer: the scores are computed over the held tokens and the chunk, with the chunk's
        queries as the prompt's last queries: SnapKV's window is the chunk's last ``window``
        queries, TOVA's query its last one, Expected Attention's statistics its last ``queries``;
        H2O adds the chunk's column sums to the held tokens' accumulated scores; attention-free
        scorers (KNorm, KeyDiff) score the held keys; streaming keeps the sinks and the most
        recent tokens; ChunkKV's chunks are counted over the held tokens. Sinks are the first held
        tokens (never evicted), the window the chunk's last tokens."""
        from kvfx.methods.scoring import attention_probs

        B, Hkv = store.batch, store.kv_heads
        nq = q.shape[2]
        dev = store.k.device
        cnt = store.count[:, 0]
        L = int(cnt.max().item())
        offs = (L - cnt)[:, None]                                            # (B, 1)
        j = torch.arange(L, device=dev)[None]                                # (1, L)
        valid = j >= offs                                                    # (B, L): right-aligned
        slot = (j - offs).clamp(min=0)[:, None].expand(B, Hkv, L)
        k = gather_tokens(store.k, slot)
        v = gather_tokens(store.v, slot)
        pos = store.pos.gather(2, slot).masked_fill(~valid[:, None], -1)
        seen = store.extra["seen_valid"] = store.extra["seen_valid"] + nq
        sm = default_scale(q, scale)
        kind = self.scorer.kernel_scores
        acc = None
        q_pos = torch.arange(L - nq, L, device=dev)
        if kind in ("window_colsum", "last_row"):
            w = 1 if kind == "last_row" else min(max(self.window, 1), nq)
            votes = attention_probs(q[:, :, nq - w:], k, valid, q_pos[nq - w:], sm).sum(2)
            scores = self.scorer.from_votes(votes, valid, Hkv)
        elif kind == "colsum":  # H2O: the chunk's column sums, added to the held accumulated scores
            votes = q.new_zeros(B, q.shape[1], L, dtype=torch.float32)
            for a in range(0, nq, 256):
                b = min(a + 256, nq)
                votes += attention_probs(q[:, :, a:b], k, valid, q_pos[a:b], sm).sum(2)
            prev = store.slot_state["score"].gather(2, slot).masked_fill(~valid[:, None], 0)
            scores = acc = prev + self.scorer.from_votes(votes, valid, Hkv)
            scores = scores.masked_fill(~valid[:, None], float("-inf"))
        elif kind == "key_norm":
            scores = compress.knorm_scores(k).masked_fill(~valid[:, None], float("-inf"))
        else:
            q_full = q.new_zeros(B, q.shape[1], L, q.shape[-1])
            q_full[:, :, L - nq:] = q
            kw = {}
            if self.scorer.rotary:  # the chunk's RoPE, right-aligned like its queries
                kw["rope"] = None if rope is None else tuple(  # earlier rows: angle 0 (no queries)
                    torch.cat([torch.full((*t.shape[:2], L - nq, t.shape[-1]), fill, dtype=t.dtype,
                                          device=t.device), t], dim=2) for t, fill in zip(rope, (1.0, 0.0)))
            scores = self.scorer.chunk_scores(q_full, k, v, valid, valid & (j >= L - nq), sm, **kw)
            if scores is not None:
                scores = scores.masked_fill(~valid[:, None], float("-inf"))
        if self.chunk is not None and scores is not None:
            scores = chunk_scores(scores, valid, self.chunk, self.chunk_reduce)
        budget = torch.minimum(self.budget(seen), cnt)
        window = torch.minimum(self._window(seen), cnt)
        prio = priority(scores, valid, sink=self.sink, window=window, kv_heads=Hkv)
        m = int(budget.max().item())
        k_kept, v_kept, idx, count = compress.select_and_gather(prio, budget, k, v, m)
        kept_pos = pos.gather(2, idx.clamp(min=0)).masked_fill(idx < 0, -1)
        self._write(store, k_kept, v_kept, kept_pos, count, seen, budget, window)
        if acc is not None:
            store.add_slot_state("score", acc.gather(2, idx.clamp(min=0)).masked_fill(idx < 0, 0))

    def after_decode(self, store, nq, probs=None) -> None:
        """Rolling eviction after a decode step of ``nq`` tokens: each (row, KV head) over its cap
        drops its lowest-scoring token that is not a sink or recent, once per token of the step.
        Works on per-slot views padded to the store's ``length`` (``slot_view``), so a dense store
        and a head-wise ragged store (AdaKV) evict the same tokens."""
        if "cap" not in store.extra:
            return
        n = store.length
        if self.decode == "accumulated" and probs is not None:
            store.add_to_slot_state("score", group_reduce(probs.sum(2), store.kv_heads, self.group_reduce))
        current = None
        if self.decode == "current" and probs is not None:
            # The step's attention (summed over its nq queries) ranks every eviction of the step;
            # evict() moves it with the slots (a chunk of nq > 1 tokens evicts up to nq).
            current = group_reduce(probs.sum(2), store.kv_heads, self.group_reduce)[..., :n].double()
        for _ in range(nq):
            n = store.length
            slot = torch.arange(n, device=store.k.device)
            pos = store.slot_view("pos", n)
            if current is not None:
                score = current[..., :n]
            elif self.decode == "accumulated":
                score = store.slot_view("score", n)
            elif self.decode == "self":
                if self.scorer.kernel_scores == "key_norm":
                    score = compress.knorm_scores(store.slot_view("k", n))
                else:
                    score = self.scorer.decode_scores(store.slot_view("k", n))
            else:  # oldest first: the score is the position (higher = newer = keep)
                score = pos.double()
            protected = (slot < self.sink) | (slot >= store.count[..., None])
            protected = protected | (pos >= store.seen + nq - store.extra["recent"][..., None])
            victim = score.double().masked_fill(protected, float("inf")).argmin(-1)
            over = store.count > store.extra["cap"]
            if store.calib is not None:  # CaliDrop: the evicted token joins the stored partitions
                _fold(store, victim[..., None], over[..., None])
            store.evict(victim, over, carry=() if current is None else (current,))
        store.length = min(store.length, store.host_cap)


class LagKVCompressor(Compressor):
    """LagKV with recursive compression during decode (see :mod:`kvfx.methods.lagkv`)."""

    def __init__(self, *, sink, lag, keep, v_ratio, name):
        self.sink, self.lag, self.keep, self.v_ratio, self.name = sink, lag, keep, v_ratio, name

    def prefill(self, store, q, k, v, valid, scale=None, votes=None) -> None:
        B, Hkv = k.shape[:2]
        rows, tails = [], []
        for b in range(B):
            idx_valid = valid[b].nonzero()[:, 0]
            kb, vb = k[b][:, idx_valid], v[b][:, idx_valid]
            kept, tail = lagkv_keep_indices(kb, vb, sink=self.sink, lag=self.lag, keep=self.keep,
                                            v_ratio=self.v_ratio,
                                            score_fn=compress.lagkv_partition_scores)
            rows.append(idx_valid[kept])
            tails.append(tail)
        m = max(r.shape[1] for r in rows)
        idx = torch.zeros(B, Hkv, m, dtype=torch.long, device=k.device)
        count = torch.zeros(B, Hkv, dtype=torch.long, device=k.device)
        for b, r in enumerate(rows):
            idx[b, :, :r.shape[1]] = r
            count[b] = r.shape[1]
        _write_selection(store, k, v, idx, count, self.lag)
        store.extra_host = {"tail": tails, "count": [r.shape[1] for r in rows]}

    def after_decode(self, store, nq, probs=None) -> None:
        h = store.extra_host
        for b in range(store.batch):
            h["tail"][b] += nq
            h["count"][b] += nq
            while h["tail"][b] >= 2 * self.lag:
                self._compress_row(store, b)
        store.length = max(h["count"])

    def _compress_row(self, store, b) -> None:
        h, lag = store.extra_host, self.lag
        count, tail = h["count"][b], h["tail"][b]
        start = count - tail
        dev = store.k.device
        part = slice(start, start + 2 * lag)
        from kvfx.methods.lagkv import compress_partitions

        kept = compress_partitions(store.k[b, :, part], store.v[b, :, part], lag=lag, keep=self.keep,
                                   v_ratio=self.v_ratio,
                                   score_fn=compress.lagkv_partition_scores) + start  # (H, kk)
        H = kept.shape[0]
        if store.calib is not None:  # CaliDrop: the partition's dropped tokens join the state
            gone = torch.zeros(store.batch, H, lag, dtype=torch.bool, device=dev)
            gone[b] = True
            gone[b].scatter_(1, kept - start, False)
            _fold(store, torch.arange(start, start + lag, device=dev).expand(store.batch, H, lag), gone)
        order = torch.cat([torch.arange(start, device=dev).expand(H, start), kept,
                           torch.arange(start + lag, count, device=dev).expand(H, count - start - lag)], 1)
        new_count = order.shape[1]
        for buf in (store.k, store.v):
            buf[b, :, :new_count] = buf[b].gather(1, order[..., None].expand(H, new_count, buf.shape[-1]))
        store.pos[b, :, :new_count] = store.pos[b].gather(1, order)
        store.pos[b, :, new_count:] = -1
        store.count[b] = new_count
        h["count"][b], h["tail"][b] = new_count, tail - lag


def _fold(store, slots: torch.Tensor, valid: torch.Tensor) -> None:
    """Fold the tokens at store slots (B, Hkv, m) where ``valid`` into the CaliDrop state."""
    from kvfx.methods.calidrop import fold

    k_e, v_e = store.tokens_at(slots)
    store.calib = fold(store.calib, k_e, v_e, valid, scale=store.calib_scale)


def build_compressor(layer_policy, layer: int = 0, num_layers: int = 1, factors: dict | None = None) -> Compressor:
    """Map a resolved :class:`kvfx.policy.LayerPolicy` to its compressor, or raise
    ``NotImplementedError`` naming what this build cannot do yet. ``factors``: a ``lowrank:``
    policy's ReCalKV factors (:func:`kvfx.calibrate.load_factors`)."""
    lp = layer_policy
    if lp.lowrank is not None:  # ReCalKV latents (kvfx.methods.lowrank, kvfx.runtime.lowrank)
        return build_lowrank(lp, layer, num_layers, factors)
    c = _build_evictor(lp, layer, num_layers)
    c.quant = c.calib = None
    if lp.calibration is not None:
        from kvfx.methods.calidrop import CaliDrop

        cal = lp.calibration
        c.calib = CaliDrop(history=cal.history, threshold=cal.threshold, adjust=cal.adjust,
                           recompute_threshold=cal.recompute.threshold if cal.recompute else None,
                           recompute_bits=cal.recompute.bits if cal.recompute else None)
        if hasattr(getattr(c, "scorer", None), "from_logits"):  # SnapKV, PyramidKV, TOVA
            c.kernel_scores = "window_logits"
            c.logit_rows = max(c.window, cal.history, 1)
    if lp.quant is not None:
        from kvfx.methods.quant import QuantConfig

        from kvfx.runtime.qstore import QuantStore

        check_capabilities(c, QuantStore.CAPS, "a quantized store (quant:)")
        c.quant = QuantConfig.from_policy(lp.quant)
    elif getattr(c, "ragged", False):
        from kvfx.runtime.ragged import RaggedStore

        check_capabilities(c, RaggedStore.CAPS, "a head-wise ragged store (budget.allocation: adaptive)")
    else:
        check_capabilities(c, SiteStore.CAPS, "a dense store")
    return c


# Why a compressor needs each store capability, and what to do when a store lacks it.
_NEEDS = {
    "evict": ("decode-time eviction", "such stores combine with prompt-time eviction (snapkv, pyramidkv, "
              "knorm without max_tokens)"),
    "probs": ("the attention probabilities of each decode step", "use a scorer that does not read them"),
    "calibration": ("calibration (CaliDrop folds each evicted token's exact key into its statistics)",
                    "drop calibration: or the other feature"),
}


def check_capabilities(c, caps: frozenset, store: str) -> None:
    """Raise ``NotImplementedError`` naming the first capability compressor ``c`` needs that the
    store (``caps``, its declared :attr:`CAPS`) lacks: the combinations kvfx refuses, decided when
    the policy is resolved against a model, before any graph runs."""
    for cap in sorted(c.needs - caps):
        what, fix = _NEEDS[cap]
        extra = ", budget.max_tokens" if getattr(c, "max_tokens", None) is not None and cap == "evict" else ""
        raise NotImplementedError(f"{store} together with {what} ({c.name}{extra}); {store} cannot "
                                  f"provide it (store capability {cap!r}): {fix}")


def _build_evictor(lp, layer: int, num_layers: int) -> Compressor:
    """The layer's evictor from its registered scorer (:func:`kvfx.methods.registry.from_policy`)."""
    ev, bud = lp.eviction, lp.budget
    scorer = registry.from_policy(ev, bud)
    if ev.scorer == "none":
        return Compressor()
    if scorer.partitioned:
        return LagKVCompressor(sink=bud.sink, lag=ev.lag, keep=bud.keep, v_ratio=ev.score_v_ratio,
                               name=scorer.name)
    common = dict(keep=bud.keep, tokens=bud.tokens, sink=bud.sink, window=bud.window,
                  max_tokens=bud.max_tokens, layer=layer, num_layers=num_layers,
                  pyramid=bud.schedule == "pyramid", group_reduce=ev.group_reduce, chunk=ev.chunk,
                  safeguard=bud.safeguard if bud.allocation == "adaptive" else None)
    if not scorer.budgeted and bud.keep is None and bud.tokens is None:
        # StreamingLLM: sink + window, rolling at it
        common.update(tokens=bud.sink + bud.window, max_tokens=bud.max_tokens or bud.sink + bud.window)
    return Scored(scorer, **common)


class LowRankCompressor:
    """Keep tokens as latents of width r_k (keys) + r_v (values) instead of 2·Hkv·d, chosen by
    ``inner`` (the layer's evictor: keep everything, or a scorer with its budget).

    ``factors`` None: the artifact has no factors for this layer (the pass leaves the site alone).
    ``quant``: a :class:`kvfx.runtime.qstore.QuantConfig` for the latents, or None.
    """

    name = "lowrank"
    lowrank = True  # the passes rewrite such sites onto kvfx::lowrank_attention
    calib = None  # CaliDrop is refused with lowrank (build_lowrank)

    def __init__(self, factors: LayerFactors | None, *, layer: int, artifact: str, inner: Compressor | None = None,
                 quant=None):
        self.factors, self.layer, self.artifact = factors, layer, artifact
        self.inner = inner if inner is not None else Compressor()
        self.quant = quant
        self._basis: dict = {}
        self._down: dict = {}
        if factors is not None:
            self.kv_heads = factors.k.L.shape[0] // factors.k.head_dim
            self.head_dim = factors.k.head_dim
            self.ranks = (factors.k.rank, factors.v.rank)

    @property
    def needs_probs(self) -> bool:
        return self.inner.needs_probs

    @property
    def prompt_eviction(self) -> bool:
        return self.inner.prompt_eviction

    def describe_inner(self) -> str:
        return self.inner.name

    def basis(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_k (m, r_k), Q_v (m, r_v)) float32 on ``device``."""
        key = str(device)
        if key not in self._basis:
            self._basis[key] = (latent_basis(self.factors.k).to(device),
                                latent_basis(self.factors.v).to(device))
        return self._basis[key]

    def down(self, w_k: torch.Tensor, w_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The down-projections Q_kᵀ W_k (r_k, D) and Q_vᵀ W_v (r_v, D) in the weights' dtype,
        computed once per weight tensor (keyed by its storage, version, dtype and device, so an
        in-place update of the model's weights is picked up)."""
        key = tuple((w.data_ptr(), w._version, w.dtype, str(w.device)) for w in (w_k, w_v))
        if self._down.get("key") != key:
            qk, qv = self.basis(w_k.device)
            self._down = {"key": key,
                          "w": ((qk.mT @ w_k.float()).to(w_k.dtype), (qv.mT @ w_v.float()).to(w_v.dtype))}
        return self._down["w"]

    def project(self, x_k, w_k, x_v, w_v) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of new tokens from the projections' inputs x (B, n, D): (B, 1, n, r_k),
        (B, 1, n, r_v): x·W_downᵀ, k_proj / v_proj are never run."""
        dk, dv = self.down(w_k, w_v)
        return (torch.nn.functional.linear(x_k, dk)[:, None],
                torch.nn.functional.linear(x_v, dv)[:, None])

    def latents(self, k_pre: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values (B, Hkv, n, d) -> latents (B, 1, n, r_k), (B, 1, n, r_v), in v's
        dtype (one latent row per token, shared by all heads)."""
        qk, qv = self.basis(v.device)
        B, H, n, d = v.shape
        flat = lambda t: t.transpose(1, 2).reshape(B, n, H * d).float()  # noqa: E731  (row h·d + j)
        return (flat(k_pre) @ qk).to(v.dtype)[:, None], (flat(v) @ qv).to(v.dtype)[:, None]

    def expand(self, zk: torch.Tensor, zv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, 1, n, r) -> pre-RoPE keys and values (B, Hkv, n, d) in the latents' dtype."""
        qk, qv = self.basis(zk.device)
        B, _, n, _ = zk.shape
        H, d = self.kv_heads, self.head_dim
        heads = lambda z, q: (z[:, 0].float() @ q.mT).to(z.dtype).view(B, n, H, d).transpose(1, 2)  # noqa: E731
        return heads(zk, qk), heads(zv, qv)

    # ---- what the site keeps: the inner evictor, on latents -----------------------------------
    def prefill(self, lat_store, q, k, v, valid, scale, zk, zv) -> None:
        """Write the kept prompt tokens' latents: ``inner`` scores the exact keys (q, k, v:
        (B, H, n, d)), its selection gathers the latents zk, zv (B, 1, n, r)."""
        if type(self.inner) is Compressor:
            Compressor.prefill(self.inner, lat_store, q, zk, zv, valid)
        else:
            self.inner.prefill(lat_store, q, k, v, valid, scale, None, payload=(zk, zv))

    def after_decode(self, lat_store, nq: int, probs=None) -> None:
        self.inner.after_decode(lat_store, nq, probs)


def build_lowrank(lp, layer: int, num_layers: int = 1, factors: dict | None = None) -> LowRankCompressor:
    """The compressor of a layer policy with ``lowrank:``, with the artifact's ``factors`` (loaded
    by the caller: :func:`kvfx.calibrate.load_factors`); raises ``NotImplementedError`` for
    combinations this build cannot run."""
    if lp.calibration is not None:
        raise NotImplementedError("lowrank together with calibration (CaliDrop folds each evicted "
                                  "token's exact key into its statistics; a low-rank store holds latents)")
    if factors is None:
        raise ValueError("lowrank: the artifact's factors were not given; load them with "
                         "kvfx.calibrate.load_factors(lp.lowrank.artifact)")
    inner = _build_evictor(lp, layer, num_layers)
    if isinstance(inner, LagKVCompressor):
        raise NotImplementedError("lowrank together with eviction.scorer lagkv (LagKV keeps a separate "
                                  "set of tokens per KV head; a low-rank latent is shared by all heads)")
    quant = None
    if lp.quant is not None:
        from kvfx.methods.quant import QuantConfig

        if getattr(inner, "roll_at_budget", False) or getattr(inner, "max_tokens", None) is not None:
            raise NotImplementedError(
                f"lowrank and quant together with decode-time eviction ({inner.name}); quantized latents "
                "combine with prompt-time eviction (snapkv, pyramidkv, knorm without max_tokens)")
        quant = QuantConfig.from_policy(lp.quant)
    return LowRankCompressor(factors.get(layer), layer=layer, artifact=lp.lowrank.artifact, inner=inner,
                             quant=quant)
