"""What a site keeps: the compressor interface and the two policies of the foundation.

A compressor is built once per site from its resolved layer policy. The runtime calls

* ``prefill(store, q, k, v, valid)`` once per sequence, with the full-precision prompt K/V, to
  write the kept tokens into the store;
* ``after_decode(store)`` after each decode step's tokens were appended and attended, to evict
  down to a rolling cap.

Scorer-based methods (SnapKV, H2O, ...) plug in by returning scores to
:func:`kvfx.methods.select.select_kept`; they do not touch budgets or pads themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfx.methods.select import budget_from_keep, gather_tokens, select_kept
from kvfx.runtime.store import SiteStore

IMPLEMENTED_SCORERS = ("none", "streaming")


class Compressor:
    """Keep everything (the ``full`` policy)."""

    name = "full"
    rolling_cap: int | None = None
    slack = 0  # extra capacity allocated beyond the kept tokens at prefill

    def budget(self, n_valid: torch.Tensor) -> torch.Tensor:
        return n_valid

    def scores(self, q, k, v, valid) -> torch.Tensor | None:
        return None

    def sink_window(self) -> tuple[int, int]:
        return 0, 0

    def prefill(self, store: SiteStore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor) -> None:
        """q (B, Hq, n, d), k/v (B, Hkv, n, d), valid (B, n) bool (False at pads)."""
        B, Hkv, n, _ = k.shape
        n_valid = valid.long().sum(-1)
        budget = self.budget(n_valid)
        positions = torch.arange(n, device=k.device)
        if bool((budget == n).all()):  # nothing to drop: keep the prompt as is
            count = torch.full((B, Hkv), n, dtype=torch.long, device=k.device)
            store.write_kept(k, v, positions.expand(B, Hkv, n), count, n + self.slack)
            return
        sink, window = self.sink_window()
        idx, count = select_kept(self.scores(q, k, v, valid), valid, budget, sink=sink,
                                 window=window, kv_heads=Hkv)
        m = idx.shape[-1]
        unused = torch.arange(m, device=k.device)[None, None] >= count[..., None]
        pos = idx.masked_fill(unused, -1)
        store.write_kept(gather_tokens(k, idx), gather_tokens(v, idx), pos, count, m + self.slack)

    def after_decode(self, store: SiteStore, new_tokens: int) -> None:
        if self.rolling_cap is not None:
            evict_oldest(store, self.rolling_cap, protect=self.sink_window()[0], steps=new_tokens)


@dataclass
class Streaming(Compressor):
    """StreamingLLM (arXiv 2309.17453): the first ``sink`` tokens plus the most recent ones.

    After every step the store holds the first ``sink`` tokens and the last ``window`` tokens
    (at most ``sink + window``); a decode query attends over those plus itself. The prompt
    itself is attended exactly (full attention at prefill), then cut to that set.
    """

    sink: int = 4
    window: int = 256
    name = "streaming"

    def __post_init__(self):
        self.rolling_cap = self.sink + self.window
        self.slack = 1

    def budget(self, n_valid):
        return torch.clamp(n_valid, max=self.sink + self.window)

    def sink_window(self):
        return self.sink, self.window


def evict_oldest(store: SiteStore, cap: int, *, protect: int, steps: int = 1) -> None:
    """Rows holding more than ``cap`` tokens drop their oldest token outside the first
    ``protect`` slots (the sinks); the row's last slot moves into the freed one so that valid
    slots stay compact. Device-only: no host sync."""
    for _ in range(steps):
        n = store.length
        slot = torch.arange(n, device=store.k.device)
        p = store.pos[:, :, :n].masked_fill(slot < protect, torch.iinfo(torch.long).max)
        p = p.masked_fill(slot >= store.count[..., None], torch.iinfo(torch.long).max)
        victim = p.argmin(-1)  # (B, H)
        over = store.count > cap
        last = (store.count - 1).clamp(min=0)
        src = torch.where(over, last, victim)  # rows not over copy the victim onto itself
        for buf in (store.k, store.v):
            moved = buf.gather(2, src[:, :, None, None].expand(*src.shape, 1, buf.shape[-1]))
            buf.scatter_(2, victim[:, :, None, None].expand_as(moved), moved)
        moved_pos = store.pos.gather(2, src[..., None])
        store.pos.scatter_(2, victim[..., None], moved_pos)
        kept_pos = store.pos.gather(2, last[..., None])
        store.pos.scatter_(2, last[..., None], kept_pos.masked_fill(over[..., None], -1))
        store.count -= over.long()
    store.length = min(store.length, cap)


def build_compressor(layer_policy) -> Compressor:
    """Map a resolved :class:`kvfx.policy.LayerPolicy` to its compressor, or raise
    ``NotImplementedError`` naming what this build cannot do yet."""
    lp = layer_policy
    missing = []
    if lp.eviction.scorer not in IMPLEMENTED_SCORERS:
        missing.append(f"eviction.scorer={lp.eviction.scorer} (implemented: "
                       f"{', '.join(IMPLEMENTED_SCORERS)})")
    for section in ("calibration", "quant", "lowrank"):
        if getattr(lp, section, None) is not None:
            missing.append(f"{section}")
    if missing:
        raise NotImplementedError("; ".join(missing))
    if lp.eviction.scorer == "streaming":
        return Streaming(sink=lp.budget.sink, window=lp.budget.window)
    return Compressor()
