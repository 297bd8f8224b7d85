"""The policy document as frozen pydantic models, with the paper defaults of ALGORITHMS.md.

A validated document is a :class:`PolicyDoc`; what one attention site gets after the ``layers:``
overrides is a :class:`LayerPolicy`. Every model is frozen, strict (no ``"4"`` -> 4 coercion) and
forbids unknown keys. Contradictions between fields raise :func:`conflict` errors, which carry the
key path, the bad value and the allowed values so that the loader can print them as one line.
This module must stay torch-free.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, create_model, field_validator, model_validator

from kvfx.methods import registry
from kvfx.methods.registry import NOTHING, ParamModel, conflict, show_value  # noqa: F401  (re-exported)


class PolicyError(ValueError):
    """A policy that cannot be loaded; ``str(err)`` is ONE line.

    Format: ``FILE:LINE:COL key.path: got VALUE, expected WHAT`` (``<dict> key.path: ...`` for dicts).

    ``file``, ``line``, ``col`` and ``path`` repeat the parts (``line``/``col`` are None for dicts).
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 col: int | None = None, path: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.file, self.line, self.col, self.path = file, line, col, path


_Model = ParamModel
_SCORERS = registry.scorers()   # name -> scorer class, from the method files (kvfx/methods/*.py)
SCORERS = tuple(_SCORERS)
BUDGETED = tuple(n for n, c in _SCORERS.items() if c.budgeted)   # need budget.keep or budget.tokens
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
    allocation: Literal["uniform", "adaptive"] = Field(
        "uniform", description="how a layer's budget is shared by its KV heads: uniform (each head keeps "
        "the budget) or adaptive (AdaKV, arXiv 2407.11550: the top budget x heads scores over all heads "
        "jointly, each head at least safeguard x budget; a head-wise ragged store holds them)")
    safeguard: float = Field(0.2, ge=0, le=1, description="allocation adaptive: the fraction of the budget "
                             "every head keeps at least (AdaKV's alpha, kvpress alpha_safeguard 0.20)")

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
        if self.allocation == "uniform" and self.safeguard != 0.2:
            raise conflict("safeguard", self.safeguard, "allocation: adaptive to go with it (the per-head "
                           "floor of AdaKV; remove safeguard or set allocation: adaptive)")
        if self.schedule == "pyramid" and self.keep is None and self.tokens is None:
            raise conflict("schedule", "pyramid", "budget.keep or budget.tokens to go with it "
                           "(pyramid spreads that budget over layers)")
        return self


def _eviction_fields() -> tuple[dict, dict]:
    """The ``eviction:`` fields: ``scorer``, ``group_reduce``, ``chunk`` and every registered
    scorer's parameters, and {parameter: the scorers that declare it}."""
    fields: dict[str, Any] = {
        "scorer": (Literal[SCORERS], Field("none", description="the eviction method: " + ", ".join(SCORERS))),
        "group_reduce": (Literal["mean", "max"], Field("mean", description="how a GQA group's query heads "
                                                         "combine")),
        "chunk": (Optional[int], Field(None, ge=1, description="ChunkKV (arXiv 2502.00299): keep whole chunks "
                                       "of this many consecutive tokens, ranked by their mean score summed over "
                                       "KV heads (kvpress: 20); null: single tokens")),
    }
    owners: dict[str, list[str]] = {}
    for name, cls in _SCORERS.items():
        for f, ann in registry.param_types(cls).items():
            default = next(x for x in registry.params_of(cls) if x.name == f)
            if f in fields and f not in owners:
                raise TypeError(f"scorer {name}: parameter {f!r} shadows a common eviction field")
            if f in owners:
                if registry.param_default(default) != fields[f][1]:
                    raise TypeError(f"scorer {name}: parameter {f!r} is declared by {owners[f]} with "
                                    "another default")
            else:
                fields[f] = (ann, registry.param_default(default))
            owners.setdefault(f, []).append(name)
    return fields, {k: tuple(v) for k, v in owners.items()}


_FIELDS, _OWNERS = _eviction_fields()


def _eviction_checks(self: BaseModel) -> BaseModel:
    """A parameter set for another scorer than the chosen one is an error naming its owner."""
    if self.scorer == "none":
        return self
    for field, owners in self.OWNERS.items():
        if self.scorer in owners:
            continue
        default = type(self).model_fields[field].get_default(call_default_factory=True)
        value = getattr(self, field)
        if value != default:
            shown = value.model_dump() if isinstance(value, BaseModel) else value
            owner = " or ".join(owners)
            raise conflict(field, shown, f"no {field} with scorer {self.scorer}: it is a {owner} "
                           f"parameter (remove it or set scorer: {owners[0]})")
    return self


Eviction = create_model(
    "Eviction", __base__=_Model, __doc__="Which tokens leave the cache. Each scorer's parameters "
    "(from its file in kvfx/methods) apply to that scorer only.",
    __validators__={"_method_fields": model_validator(mode="after")(_eviction_checks)},
    **_FIELDS)
Eviction.OWNERS = _OWNERS


def scorer_of(eviction: Any, budget: Any) -> registry.Scorer:
    """The registered scorer instance a validated ``eviction`` section (with its budget) describes."""
    return registry.from_policy(eviction, budget)


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
    residual_dtype: Literal["model", "float16", "bfloat16"] = Field(
        "model", description="dtype the full-precision residual and the outlier pool are held in: model "
        "(the model's dtype) or float16/bfloat16, used where the model's dtype is wider (fp32: half the "
        "residual's bytes; a 16-bit model keeps its own). Reads upcast to fp32. float16 refuses keys or "
        "values beyond +-65504 (use bfloat16 then)")

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


def adaptive(p: Any) -> bool:
    """The (layer) policy allocates its budget head-wise (AdaKV) with a scorer that evicts."""
    return p.budget.allocation == "adaptive" and p.eviction.scorer != "none"


def store_kind(p: Any) -> str:
    """The cache representation a (layer) policy asks for: a key of ``registry.STORE_CAPS``."""
    if p.lowrank is not None:
        return "latent-quantized" if p.quant is not None else "latent"
    if p.quant is not None:
        return "quantized"
    return "ragged" if adaptive(p) else "dense"


_STORE_WHAT = {"ragged": ("budget.allocation", "a head-wise ragged store (budget.allocation: adaptive)"),
               "quantized": ("quant", "a quantized store (quant:)"),
               "latent": ("lowrank", "a low-rank latent store (lowrank:)"),
               "latent-quantized": ("quant", "quantized low-rank latents (lowrank: + quant:)")}


def check_capabilities(p: Any) -> None:
    """What the scorer, ``max_tokens`` and calibration need from the store that ``quant:`` /
    ``lowrank:`` choose (``registry.STORE_CAPS``); raises :func:`conflict` at the key to change."""
    kind = store_kind(p)
    if kind == "dense":
        return
    cls = _SCORERS[p.eviction.scorer]
    rolling = p.budget.max_tokens is not None
    have = registry.STORE_CAPS[kind]
    key, store = _STORE_WHAT[kind]
    for cap in sorted(cls.needs(rolling) - have):
        if cap == "evict" and rolling and not (cls.rolls or cls.partitioned):
            raise conflict("budget.max_tokens", p.budget.max_tokens,
                           f"null with {store}: it cannot drop held tokens during decode (rolling caps); "
                           "prompt-time eviction (" + ", ".join(
                               n for n, c in _SCORERS.items() if c.budgeted and not c.needs(False)) +
                           ") combines with it")
        what = {"evict": "evict during decode (or per partition)",
                "probs": "read each decode step's attention probabilities"}[cap]
        fine = ", ".join(n for n, c in _SCORERS.items() if n != "none" and not (c.needs(False) - have))
        raise conflict("eviction.scorer", p.eviction.scorer,
                       f"a scorer that does not {what} with {store} (store capability {cap!r}): {fine}; "
                       f"or remove {key}")
    if p.calibration is not None and "calibration" not in have:
        raise conflict("calibration", p.calibration.method, f"no calibration with {store} (CaliDrop folds "
                       "each evicted token's exact key into its statistics); remove calibration")


def check_sections(p: Any) -> None:
    """Contradictions between sections of a document or a layer policy (raises :func:`conflict`)."""
    b, scorer = p.budget, p.eviction.scorer
    cls = _SCORERS[scorer]
    if p.calibration is not None and scorer == "none":
        raise conflict("calibration", p.calibration.method, "eviction.scorer set too: calibration restores "
                       "evicted tokens (set eviction.scorer or remove calibration)")
    if cls.budgeted and b.keep is None and b.tokens is None:
        raise conflict("budget.keep", NOTHING, f"budget.keep or budget.tokens with eviction.scorer {scorer} "
                       "(e.g. keep: 0.25)")
    cls.check(p.eviction, b)
    if scorer == "none" and b.max_tokens is not None:
        raise conflict("budget.max_tokens", b.max_tokens, "null with eviction.scorer none (rolling "
                       "eviction needs a scorer, e.g. streaming)")
    if adaptive(p) and (cls.partitioned or not cls.budgeted):
        raise conflict("budget.allocation", "adaptive", f"uniform with eviction.scorer {scorer} (AdaKV shares "
                       "a layer's budget among its heads by one top-k over their token scores; "
                       f"{scorer} {'selects per partition' if cls.partitioned else 'has no token scores'}); "
                       "or a top-k scorer (snapkv, knorm, h2o, tova, ...)")
    if adaptive(p) and p.eviction.chunk is not None:
        raise conflict("budget.allocation", "adaptive", f"uniform with eviction.chunk {p.eviction.chunk} (ChunkKV "
                       "keeps the same chunks in every KV head; AdaKV gives each head its own tokens)")
    if adaptive(p) and p.quant is not None:
        raise conflict("budget.allocation", "adaptive", "uniform with quant: (KIVI quantizes R-token key groups "
                       "and flushes its residual at the same step for every head; a head-wise ragged store "
                       "holds a different number of tokens per head, which the quantized store cannot hold); "
                       "or remove quant")
    if adaptive(p) and p.lowrank is not None:
        raise conflict("budget.allocation", "adaptive", "uniform with lowrank: (a low-rank latent row is "
                       "shared by all KV heads, so every head keeps the same tokens)")
    if p.eviction.chunk is not None and scorer != "none" and (not cls.budgeted or cls.partitioned):
        raise conflict("eviction.chunk", p.eviction.chunk, f"null with eviction.scorer {scorer} (ChunkKV "
                       "ranks chunks by a scorer's token scores; use a top-k scorer such as snapkv or knorm)")
    check_capabilities(p)


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
            s += f" adaptive(safeguard={_g(b.safeguard)})" if b.allocation == "adaptive" else ""
            s += f" sink={b.sink} window={b.window}" + scorer_of(ev, b).describe()
            s += f" chunk={ev.chunk}" if ev.chunk is not None else ""
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
                         + (f" outliers={o.per_group}/{o.pool}{o.norm}" if o else "")
                         + (f" residual_dtype={q.residual_dtype}" if q.residual_dtype != "model" else ""))
        if self.lowrank is not None:
            parts.append(f"lowrank artifact={self.lowrank.artifact or 'none'}")
        return " + ".join(parts) or "full"
