"""The policy document as frozen pydantic models, with the paper defaults of ALGORITHMS.md.

A validated document is a :class:`PolicyDoc`; what one attention site gets after the ``layers:``
overrides is a :class:`LayerPolicy`. Every model is frozen, strict (no ``"4"`` -> 4 coercion) and
forbids unknown keys. Contradictions between fields raise :func:`conflict` errors, which carry the
key path, the bad value and the allowed values so that the loader can print them as one line.
This module must stay torch-free.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


class PolicyError(ValueError):
    """A policy that cannot be loaded; ``str(err)`` is ONE line.

    Format: ``FILE:LINE:COL key.path: got VALUE, expected WHAT`` (``<dict> key.path: ...`` for dicts).

    ``file``, ``line``, ``col`` and ``path`` repeat the parts (``line``/``col`` are None for dicts).
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 col: int | None = None, path: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.file, self.line, self.col, self.path = file, line, col, path


def show_value(value: Any) -> str:
    """The value as a policy author wrote it: ``3``, ``'maxx'``, ``null``, ``true``, ``[0, 1]``."""
    if value is None:
        return "null"
    if value is NOTHING:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    try:
        text = json.dumps(value, default=str, separators=(", ", ": "))
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


NOTHING = type("Nothing", (), {"__repr__": lambda self: "nothing"})()   # "got nothing": a key not set


def conflict(path: str, got: Any, expected: str) -> PydanticCustomError:
    """An error at ``path`` (relative to the model raising it; ``""`` for the field itself)."""
    loc = tuple(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path))
    return PydanticCustomError("kvfx", "{path}: got {got}, expected {expected}",
                               {"path": path, "loc": loc, "got": show_value(got), "expected": expected})


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


SCORERS = ("none", "streaming", "knorm", "snapkv", "h2o", "tova", "lagkv")
BUDGETED = ("knorm", "snapkv", "h2o", "tova", "lagkv")   # scorers that need budget.keep or budget.tokens
Bits = Literal[2, 4, 8]


class Budget(_Model):
    """How much of the prompt a layer keeps. Sinks and the recent window are always kept."""

    keep: Optional[float] = Field(None, gt=0, le=1, description="fraction of prompt tokens kept (streaming: "
                                  "sinks + the most recent tokens up to this budget, rolling at it; without "
                                  "keep or tokens streaming keeps sink + window)")
    tokens: Optional[int] = Field(None, gt=0, description="tokens kept (instead of keep)")
    sink: int = Field(4, ge=0, description="first tokens always kept (StreamingLLM default 4)")
    window: int = Field(32, ge=0, description="recent tokens always kept; SnapKV's observation window")
    schedule: Literal["uniform", "pyramid"] = Field(
        "uniform", description="pyramid: PyramidKV per-layer budgets (beta 20), resolved by the consumer")
    max_tokens: Optional[int] = Field(None, gt=0, description="cap during decode (rolling eviction)")

    @model_validator(mode="after")
    def _consistent(self) -> "Budget":
        fixed = self.sink + self.window
        if self.keep is not None and self.tokens is not None:
            raise conflict("tokens", self.tokens, f"only one of budget.keep ({self.keep:g}) and "
                           "budget.tokens (remove one)")
        if self.tokens is not None and self.tokens < fixed:
            raise conflict("tokens", self.tokens, f">= sink + window = {fixed} (raise tokens or lower "
                           "sink/window)")
        if self.max_tokens is not None and self.max_tokens < fixed:
            raise conflict("max_tokens", self.max_tokens, f">= sink + window = {fixed} (raise "
                           "max_tokens or lower sink/window)")
        if self.schedule == "pyramid" and self.keep is None and self.tokens is None:
            raise conflict("schedule", "pyramid", "budget.keep or budget.tokens to go with it "
                           "(pyramid spreads that budget over layers)")
        return self


class Pool(_Model):
    """SnapKV's 1-D pooling of the window scores over tokens (stride 1, same padding)."""

    kind: Literal["max", "avg"] = "max"
    kernel: int = Field(7, ge=1, description="odd kernel size")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise conflict("", v, f"an odd integer (same padding needs a centre; use {v - 1} or {v + 1})")
        return v


class Eviction(_Model):
    """Which tokens leave the cache. Method-specific fields only apply to their scorer."""

    scorer: Literal["none", "streaming", "knorm", "snapkv", "h2o", "tova", "lagkv"] = "none"
    pool: Pool = Field(default_factory=Pool, description="snapkv: pooling of the window scores")
    group_reduce: Literal["mean", "max"] = Field("mean", description="how a GQA group's query heads combine")
    heavy: float = Field(0.1, ge=0, le=1, description="h2o: heavy-hitter fraction (the budget is split "
                         "heavy:recent)")
    recent: float = Field(0.1, ge=0, le=1, description="h2o: recent-token fraction")
    lag: int = Field(128, ge=1, description="lagkv: partition size in tokens")
    score_v_ratio: float = Field(1.0, ge=0, description="lagkv: weight of the value score")

    OWNERS: ClassVar[dict[str, str]] = {"pool": "snapkv", "heavy": "h2o", "recent": "h2o",
                                        "lag": "lagkv", "score_v_ratio": "lagkv"}

    @model_validator(mode="after")
    def _method_fields(self) -> "Eviction":
        if self.scorer == "h2o" and self.heavy + self.recent == 0:
            raise conflict("heavy", self.heavy, "heavy + recent > 0 (set heavy or recent)")
        if self.scorer == "none":
            return self
        for field, owner in self.OWNERS.items():
            default = type(self).model_fields[field].get_default(call_default_factory=True)
            value = getattr(self, field)
            if owner != self.scorer and value != default:
                shown = value.model_dump() if isinstance(value, BaseModel) else value
                raise conflict(field, shown, f"no {field} with scorer {self.scorer}: it is a {owner} "
                               f"parameter (remove it or set scorer: {owner})")
        return self


class Recompute(_Model):
    """CaliDrop's optional recompute tier: evicted tokens kept in low bit, recomputed when sim is lower."""

    bits: Bits = 2
    threshold: float = Field(0.7, ge=-1, le=1, description="recompute when threshold <= sim < calibration "
                             "threshold")


class Calibration(_Model):
    """CaliDrop (DERIVED): add back the attention of evicted tokens using the nearest stored query."""

    method: Literal["calidrop"] = "calidrop"
    history: int = Field(32, ge=1, description="stored queries per head (default: the window, 32)")
    threshold: float = Field(0.9, ge=-1, le=1, description="cosine similarity needed to calibrate")
    adjust: Literal["none", "tangent"] = Field("none", description="LSE of the evicted partition at the "
                                               "decode query: none = the stored query's, tangent = "
                                               "first-order shift (a lower bound)")
    recompute: Optional[Recompute] = None

    @model_validator(mode="after")
    def _tiers(self) -> "Calibration":
        if self.recompute is not None and self.recompute.threshold >= self.threshold:
            raise conflict("recompute.threshold", self.recompute.threshold,
                           f"< calibration.threshold ({self.threshold:g}): recompute covers the "
                           "similarities just below it")
        return self


class QuantSide(_Model):
    """KIVI quantization of one side of the cache: ``bits`` per code, groups of ``group`` along ``axis``."""

    bits: Bits = 2
    group: int = Field(32, description="group size, a power of two from 4 to 256")
    axis: Literal["channel", "token"] = Field("channel", description="channel: per-channel groups of "
                                              "tokens (KIVI keys); token: groups of channels (values)")

    @field_validator("group")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if not (4 <= v <= 256 and v & (v - 1) == 0):
            raise conflict("", v, "a power of two from 4 to 256 (it must divide the head dim; e.g. 32)")
        return v


class ValueQuant(QuantSide):
    """Values default to per-token groups (KIVI)."""

    axis: Literal["channel", "token"] = "token"


class Outliers(_Model):
    """Outlier tokens tracing: the smallest-norm keys of a group stay in a full-precision pool."""

    per_group: int = Field(1, ge=1, description="outlier tokens taken from each key group")
    pool: int = Field(64, ge=1, description="outlier pool capacity per head")
    norm: Literal["l1", "l2"] = "l1"


class Quant(_Model):
    """Low-bit cache (KIVI); the most recent ``residual`` tokens stay in full precision."""

    keys: QuantSide = Field(default_factory=QuantSide)
    values: ValueQuant = Field(default_factory=ValueQuant)
    residual: int = Field(128, ge=1, description="recent full-precision tokens, a multiple of the key group")
    outliers: Optional[Outliers] = None

    @model_validator(mode="after")
    def _consistent(self) -> "Quant":
        for side in ("keys", "values"):
            q = getattr(self, side)
            if q.axis == "channel" and self.residual % q.group:
                lo, hi = self.residual // q.group * q.group, (self.residual // q.group + 1) * q.group
                fix = f"e.g. {lo} or {hi}" if lo else f"e.g. {hi}"
                raise conflict("residual", self.residual,
                               f"a multiple of quant.{side}.group ({q.group}), {fix}")
        o = self.outliers
        if o is not None:
            if self.keys.axis != "channel":
                raise conflict("outliers", o.model_dump(), "keys.axis channel (outliers are traced in "
                               "per-channel key groups) or no outliers")
            if o.per_group >= self.keys.group:
                raise conflict("outliers.per_group", o.per_group, f"< quant.keys.group ({self.keys.group})")
            if o.pool < o.per_group:
                raise conflict("outliers.pool", o.pool, f">= outliers.per_group ({o.per_group})")
        return self


class LowRank(_Model):
    """ReCalKV low-rank keys/values; the factors come from ``kvfx calibrate``."""

    artifact: Optional[str] = Field(None, description="a .safetensors file of calibrated factors")

    @field_validator("artifact")
    @classmethod
    def _safetensors(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.endswith(".safetensors"):
            raise conflict("", v, "a .safetensors file (factors are never read from pickles)")
        return v


def check_sections(p: Any) -> None:
    """Contradictions between sections of a document or a layer policy (raises :func:`conflict`)."""
    b, scorer = p.budget, p.eviction.scorer
    if p.calibration is not None and scorer == "none":
        raise conflict("calibration", p.calibration.method, "eviction.scorer set too: calibration restores "
                       "evicted tokens (set eviction.scorer or remove calibration)")
    if scorer in BUDGETED and b.keep is None and b.tokens is None:
        raise conflict("budget.keep", NOTHING, f"budget.keep or budget.tokens with eviction.scorer {scorer} "
                       "(e.g. keep: 0.25)")
    if scorer == "streaming" and b.sink + b.window == 0:
        raise conflict("budget.window", b.window, "> 0 with scorer streaming (it keeps sink + window)")
    if scorer == "snapkv" and b.window == 0:
        raise conflict("budget.window", b.window, ">= 1 with scorer snapkv (the observation window)")
    if scorer == "lagkv":
        if b.tokens is not None:
            raise conflict("budget.tokens", b.tokens, "budget.keep with scorer lagkv (it keeps a fraction "
                           "of each partition)")
        if int(b.keep * p.eviction.lag) < 1:
            raise conflict("eviction.lag", p.eviction.lag, f">= {int(1 / b.keep) + 1} with budget.keep "
                           f"{b.keep:g} (each partition must keep a token)")
    if scorer == "none" and b.max_tokens is not None:
        raise conflict("budget.max_tokens", b.max_tokens, "null with eviction.scorer none (rolling "
                       "eviction needs a scorer, e.g. streaming)")


def _g(x: float) -> str:
    return f"{x:g}"


class LayerPolicy(_Model):
    """The resolved policy of one attention site (base document + matching ``layers:`` overrides)."""

    budget: Budget = Field(default_factory=Budget)
    eviction: Eviction = Field(default_factory=Eviction)
    calibration: Optional[Calibration] = None
    quant: Optional[Quant] = None
    lowrank: Optional[LowRank] = None

    @model_validator(mode="after")
    def _sections(self) -> "LayerPolicy":
        check_sections(self)
        return self

    @property
    def compresses(self) -> bool:
        """True if anything (eviction, quant, lowrank, calibration) changes the cache."""
        return (self.eviction.scorer != "none" or self.quant is not None or self.lowrank is not None
                or self.calibration is not None)

    def describe(self) -> str:
        """One short line, e.g. ``"streaming sink=4 window=64"``, ``"snapkv keep=0.25 ..."`` or ``"full"``."""
        b, ev, parts = self.budget, self.eviction, []
        if ev.scorer == "streaming" and b.keep is None and b.tokens is None:
            parts.append(f"streaming sink={b.sink} window={b.window}")
        elif ev.scorer == "streaming":  # a budget: sinks + the most recent tokens up to it
            amount = f"keep={_g(b.keep)}" if b.keep is not None else f"tokens={b.tokens}"
            parts.append(f"streaming {amount} sink={b.sink} window={b.window}")
        elif ev.scorer != "none":
            amount = f"keep={_g(b.keep)}" if b.keep is not None else f"tokens={b.tokens}"
            s = f"{ev.scorer} {amount}" + (" pyramid" if b.schedule == "pyramid" else "")
            s += f" sink={b.sink} window={b.window}"
            s += {"snapkv": f" pool={ev.pool.kind}{ev.pool.kernel}",
                  "h2o": f" heavy={_g(ev.heavy)} recent={_g(ev.recent)}",
                  "lagkv": f" lag={ev.lag} v_ratio={_g(ev.score_v_ratio)}"}.get(ev.scorer, "")
            parts.append(s + (" group_reduce=max" if ev.group_reduce == "max" else ""))
        if b.max_tokens is not None and parts:
            parts[-1] += f" max_tokens={b.max_tokens}"
        if (c := self.calibration) is not None:
            r = c.recompute
            parts.append(f"calidrop history={c.history} threshold={_g(c.threshold)}"
                         + (f" recompute={r.bits}bit@{_g(r.threshold)}" if r else ""))
        if (q := self.quant) is not None:
            side = lambda s: f"{s.bits}bit/{s.group}{'ch' if s.axis == 'channel' else 'tok'}"  # noqa: E731
            o = q.outliers
            parts.append(f"quant keys={side(q.keys)} values={side(q.values)} residual={q.residual}"
                         + (f" outliers={o.per_group}/{o.pool}{o.norm}" if o else ""))
        if self.lowrank is not None:
            parts.append(f"lowrank artifact={self.lowrank.artifact or 'none'}")
        return " + ".join(parts) or "full"
