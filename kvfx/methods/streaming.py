"""StreamingLLM (arXiv 2309.17453): attention sinks plus the most recent tokens, rolling.

Without ``budget.keep``/``budget.tokens`` a layer keeps ``sink + window`` tokens: the first
``sink`` and the ``window`` most recent, evicting the oldest non-sink token at every decode step.
With a budget it keeps the sinks and the most recent tokens up to the budget, rolling at it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvfx.methods.registry import Scorer, conflict, register


@register
@dataclass(frozen=True)
class Streaming(Scorer):
    name: ClassVar[str] = "streaming"
    budgeted: ClassVar[bool] = False
    rolls: ClassVar[bool] = True

    @classmethod
    def check(cls, params, budget) -> None:
        if budget.sink + budget.window == 0:
            raise conflict("budget.window", budget.window, "> 0 with scorer streaming (it keeps sink + window)")

    def scores(self, q, k, v, valid, scale):
        return None  # recency: the selection keeps the most recent tokens
