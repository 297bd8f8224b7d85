"""The scorer registry: an eviction method is one file in ``kvfx/methods`` that registers a frozen
dataclass by name.

A scorer's dataclass fields are its policy parameters (``eviction.<field>`` in a policy file),
annotated with their checks and written with their paper defaults::

    @register
    @dataclass(frozen=True)
    class KeyDiff(Scorer):
        name: ClassVar[str] = "keydiff"
        def scores(self, q, k, v, valid, scale):      # (B, Hkv, n), higher = keep
            ...

A few field names are not parameters but *context* the runtime fills in from the policy's
``budget`` and ``eviction`` sections (:data:`CONTEXT`): ``sink``, ``window`` (the recent
window; SnapKV's observation window) and ``group_reduce`` (how a GQA group's query heads
combine). Declare them as fields when the scorer reads them.

What a scorer declares (class variables, all optional):

* ``budgeted``: it needs ``budget.keep`` or ``budget.tokens`` (default True);
* ``decode``: the order in which a rolling cache evicts during decode: ``"oldest"`` (default),
  ``"accumulated"`` (H2O: the step's attention added to the prompt score), ``"current"`` (TOVA:
  the step's attention alone) or ``"self"`` (:meth:`Scorer.decode_scores` of the held keys);
* ``rolls``: during decode, the cache rolls at the prompt budget (H2O, TOVA);
* ``kernel_scores``: what the fused prefill kernel can emit for it (``"window_colsum"``,
  ``"colsum"``, ``"last_row"``, ``"key_norm"``), with ``from_votes``/``from_logits`` to turn that
  into scores;
* ``partitioned``: it selects per partition of the prompt instead of one top-k (LagKV).

:meth:`Scorer.check` adds checks between its parameters and the budget; the policy schema
(:mod:`kvfx.policy.schema`) builds the ``eviction:`` section, its errors, ``describe()`` and the
JSON Schema from this registry, so a scorer's name is written once: in its own file.

This module is torch-free (the policy package reads it); the method files import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import re
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

CONTEXT = ("sink", "window", "group_reduce")
DECODE_ORDERS = ("oldest", "accumulated", "current", "self")
MIN_BUDGET = 16
"""The fewest tokens a budget ever holds (when ``sink + window`` is smaller): a 2-token prompt
under ``h2o`` (``sink: 0, window: 0``) keeps both and its rolling cache grows to 16 before it
evicts, instead of holding 0 tokens for the whole generation. ``budget.max_tokens`` below it wins."""

# What each cache representation can do (kvfx.runtime.store declares its stores from this table):
# evict (drop a held token during decode), probs (the attention probabilities of each decode
# step), calibration (CaliDrop's fold of evicted keys), quantized (low-bit codes).
STORE_CAPS = {
    "dense": frozenset({"evict", "probs", "calibration"}),
    # head-wise budgets (AdaKV): per-head token counts in one flat pool (kvfx.runtime.ragged);
    # rolling caps evict per head; probabilities from the reference read; CaliDrop per head
    "ragged": frozenset({"evict", "probs", "calibration"}),
    "quantized": frozenset({"quantized", "calibration"}),
    "latent": frozenset({"evict", "probs"}),
    "latent-quantized": frozenset({"quantized"}),
}


# ---- errors in the policy's one-line format (kvfx.policy.loader prints them with file:line:col) ----

class _Nothing:
    def __repr__(self) -> str:
        return "nothing"


NOTHING = _Nothing()   # "got nothing": a key not set


def show_value(value: Any) -> str:
    """The value as a policy author wrote it: ``3``, ``'maxx'``, ``null``, ``true``, ``[0, 1]``."""
    if value is None:
        return "null"
    if value is NOTHING:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return repr(value)
    try:
        text = json.dumps(value, default=str, separators=(", ", ": "))
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def conflict(path: str, got: Any, expected: str) -> PydanticCustomError:
    """An error at ``path`` (relative to the model raising it; ``""`` for the field itself)."""
    loc = tuple(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path))
    return PydanticCustomError("kvfx", "{path}: got {got}, expected {expected}",
                               {"path": path, "loc": loc, "got": show_value(got), "expected": expected})


class ParamModel(BaseModel):
    """Base of nested parameter sections (frozen, strict, unknown keys refused)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


# ---- the scorer contract -------------------------------------------------------------------------

class Scorer:
    """Base of registered scorers (subclasses are frozen dataclasses; see the module docstring)."""

    name: ClassVar[str] = ""
    budgeted: ClassVar[bool] = True
    decode: ClassVar[str] = "oldest"
    rolls: ClassVar[bool] = False
    kernel_scores: ClassVar[str] = "none"
    partitioned: ClassVar[bool] = False
    rotary: ClassVar[bool] = False  # scores(..., rope=(cos, sin)): the site's RoPE, when the pass finds it

    def scores(self, q, k, v, valid, scale):
        """q (B, Hq, n, d), k/v (B, Hkv, n, d), valid (B, n) bool -> (B, Hkv, n), higher = keep;
        None keeps the most recent tokens (streaming)."""
        raise NotImplementedError(f"{type(self).__name__}.scores")

    def chunk_scores(self, q, k, v, valid, q_valid, scale):
        """Scores when only the rows ``q_valid`` (B, n) of q are real queries: a prompt chunk's
        queries over the tokens held so far (right-aligned: the chunk's queries are the last
        rows). Default: :meth:`scores` (right for scorers that read no queries)."""
        return self.scores(q, k, v, valid, scale)

    def decode_scores(self, k):
        """``decode = "self"``: scores (B, Hkv, n) of the held keys k (B, Hkv, n, d)."""
        raise NotImplementedError(f"{type(self).__name__}.decode_scores")

    @classmethod
    def check(cls, params: Any, budget: Any) -> None:
        """Raise :func:`conflict` (path relative to the policy document, e.g. ``"budget.window"``)
        for parameter values that contradict each other or the budget. ``params``: the policy's
        ``eviction`` section, ``budget``: its ``budget`` section."""

    def describe(self) -> str:
        """The parameters in one short string for ``LayerPolicy.describe()`` (e.g. ``" lag=128"``)."""
        out = ""
        for f in params_of(type(self)):
            value = getattr(self, f.name)
            if isinstance(value, BaseModel):
                value = "".join(str(x) for x in value.model_dump().values())
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, float):
                value = f"{value:g}"
            out += f" {f.name}={value}"
        return out

    @classmethod
    def needs(cls, rolling: bool) -> frozenset:
        """The store capabilities this scorer needs (``rolling``: the layer evicts during decode)."""
        out = set()
        if rolling or cls.rolls or cls.partitioned:
            out.add("evict")
        if cls.decode in ("accumulated", "current") and (rolling or cls.rolls):
            out.add("probs")
        return frozenset(out)


_REGISTRY: dict[str, type[Scorer]] = {}
_LOADED = False


def register(cls: type) -> type:
    """Class decorator: add a frozen-dataclass :class:`Scorer` subclass under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Scorer) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register: {cls!r} must be a @dataclass(frozen=True) subclass of Scorer")
    if not cls.__dataclass_params__.frozen:
        raise TypeError(f"register: {cls.__name__} must be frozen (@dataclass(frozen=True))")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name or ""):
        raise TypeError(f"register: {cls.__name__}.name must be a lower-case identifier, got {cls.name!r}")
    if cls.decode not in DECODE_ORDERS:
        raise TypeError(f"register: {cls.__name__}.decode must be one of {DECODE_ORDERS}, got {cls.decode!r}")
    old = _REGISTRY.get(cls.name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise TypeError(f"register: scorer {cls.name!r} is already {old.__module__}.{old.__qualname__}")
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"register: {cls.__name__}.{f.name} needs a default (the paper's)")
    _REGISTRY[cls.name] = cls
    return cls


def scorers() -> dict[str, type[Scorer]]:
    """Every registered scorer by name (``none`` first), importing the method files of
    ``kvfx.methods`` once."""
    global _LOADED
    if not _LOADED:
        import kvfx.methods as pkg

        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if mod.name != "registry":
                importlib.import_module(f"kvfx.methods.{mod.name}")
        _LOADED = True
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[0] != "none", kv[0])))


def get(name: str) -> type[Scorer]:
    found = scorers()
    if name not in found:
        raise KeyError(f"eviction.scorer {name!r} (registered: {', '.join(found)})")
    return found[name]


def params_of(cls: type) -> list[dataclasses.Field]:
    """The policy parameters of a scorer class: its dataclass fields minus :data:`CONTEXT`."""
    return [f for f in dataclasses.fields(cls) if f.name not in CONTEXT]


def param_types(cls: type) -> dict[str, Any]:
    """{parameter: its annotation with pydantic metadata (``Annotated[float, Field(ge=0)]``)}."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in params_of(cls)}


def param_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def from_policy(eviction: Any, budget: Any) -> Scorer:
    """The scorer instance of a validated ``eviction`` section (context from ``budget``)."""
    cls = get(eviction.scorer)
    context = {"sink": budget.sink, "window": budget.window, "group_reduce": eviction.group_reduce}
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {f.name: getattr(eviction, f.name) for f in params_of(cls)}
    kw.update({k: v for k, v in context.items() if k in names})
    return cls(**kw)


@register
@dataclasses.dataclass(frozen=True)
class NoEviction(Scorer):
    """``scorer: none``: nothing leaves the cache (``full``; quantization or low rank alone)."""

    name: ClassVar[str] = "none"
    budgeted: ClassVar[bool] = False

    def scores(self, q, k, v, valid, scale):
        return None


__all__ = ["CONTEXT", "MIN_BUDGET", "NOTHING", "ParamModel", "STORE_CAPS", "Scorer", "conflict",
           "from_policy", "get", "param_types", "params_of", "register", "scorers", "show_value"]
