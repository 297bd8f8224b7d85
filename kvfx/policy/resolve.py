"""The policy document and its per-site resolution: ``layers:`` matching and the :class:`Policy` handle."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any, Iterable, Literal, NamedTuple, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from .loader import error_at, format_path, from_validation, is_preset_name, merge, read_document
from .schema import (NOTHING, Budget, Calibration, Eviction, LayerPolicy, LowRank, PolicyError, Quant, _Model,
                     check_sections, conflict, show_value)

# ---- layers: overrides -------------------------------------------------------------------------

SECTIONS = ("budget", "eviction", "calibration", "quant", "lowrank")
_INDEX = re.compile(r"^\s*-?\d+\s*$")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


class Matcher(NamedTuple):
    """A parsed ``match:``: layer indices (negative counts from the end), inclusive ranges, globs."""

    indices: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    globs: tuple[str, ...]

    def matches(self, layer: int, module_path: str, num_layers: int) -> bool:
        """Whether the site ``(layer, module_path)`` of a model with ``num_layers`` layers matches."""
        from fnmatch import fnmatchcase
        return (any(layer == (i if i >= 0 else i + num_layers) for i in self.indices)
                or any(a <= layer <= b for a, b in self.ranges)
                or any(fnmatchcase(module_path, g) for g in self.globs))


def parse_match(value: Any) -> Matcher:
    """Parse a ``match:`` value: int, ``"a-b"``, glob, or a non-empty list of those."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise conflict("", value, "a layer index, a range like '0-3', a module glob like '*.self_attn', "
                       "or a non-empty list of them")
    idx, ranges, globs = [], [], []
    for k, item in enumerate(items):
        where = f"[{k}]" if isinstance(value, list) else ""
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise conflict(where, item, "a layer index, a range like '0-3' or a module glob like "
                           "'*.self_attn'")
        if isinstance(item, int) or _INDEX.match(item):
            idx.append(int(item))
        elif m := _RANGE.match(item):
            a, b = int(m[1]), int(m[2])
            if a > b:
                raise conflict(where, item, f"a range with start <= end (write '{b}-{a}')")
            ranges.append((a, b))
        elif item.strip():
            globs.append(item.strip())
        else:
            raise conflict(where, item, "a non-empty module glob like '*.self_attn'")
    return Matcher(tuple(idx), tuple(ranges), tuple(globs))


Section = Optional[dict[str, Any]]


class LayerOverride(_Model):
    """One ``layers:`` entry: ``match`` and/or ``window`` plus partial sections merged into the base
    (null removes)."""

    match: Optional[Union[int, str, list[Union[int, str]]]] = Field(
        None, description="layer index (negative: from the end), range 'a-b', module-path glob, or a list; "
        "omitted: every layer (then window: is required)")
    window: Optional[bool] = Field(
        None, description="true: only sliding-window layers (the model's cache keeps the last W tokens, "
        "Gemma-2/3, Mistral); false: only the other layers; omitted: both")
    budget: Section = None
    eviction: Section = None
    calibration: Section = None
    quant: Section = None
    lowrank: Section = None

    @field_validator("match", mode="before")
    @classmethod
    def _match(cls, v: Any) -> Any:
        if v is not None:
            parse_match(v)
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> "LayerOverride":
        if self.match is None and self.window is None:
            raise conflict("match", NOTHING,
                           "match (layer index, range or glob), window (true: sliding-window layers), or both")
        if not self.model_fields_set - {"match", "window"}:
            shown = {k: getattr(self, k) for k in ("match", "window") if getattr(self, k) is not None}
            raise conflict("", shown, f"{' and '.join(shown)} plus at least one of {', '.join(SECTIONS)}")
        return self

    @property
    def matcher(self) -> Matcher | None:
        """The parsed ``match`` (None: every layer)."""
        return None if self.match is None else parse_match(self.match)

    def covers(self, layer: int, module_path: str, num_layers: int, window: bool | None) -> bool:
        """Whether this override applies to the site; ``window``: whether the site is a
        sliding-window layer (None: unknown, e.g. ``kvfx policy show`` without a model, where a
        ``window:`` override is taken to cover no site)."""
        m = self.matcher
        if m is not None and not m.matches(layer, module_path, num_layers):
            return False
        return self.window is None or (window is not None and self.window == window)


class PolicyDoc(_Model):
    """A whole policy document after ``extends:`` is merged (the file format, schema version 1)."""

    kvfx: Literal[1] = Field(description="schema version")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", max_length=100,
                      description="policy name: letters, digits, '.', '_', '+', '-'")
    extends: Optional[str] = Field(None, description="a preset name or a path relative to this file")
    budget: Budget = Field(default_factory=Budget)
    eviction: Eviction = Field(default_factory=Eviction)
    calibration: Optional[Calibration] = None
    quant: Optional[Quant] = None
    lowrank: Optional[LowRank] = None
    layers: list[LayerOverride] = Field(default_factory=list, description="overrides in order; last wins")

    @model_validator(mode="after")
    def _sections(self) -> "PolicyDoc":
        check_sections(self)
        return self


def policy_json_schema() -> dict:
    """JSON Schema of a policy file (for editor completion), e.g. ``json.dumps(policy_json_schema())``."""
    schema = PolicyDoc.model_json_schema()
    override = schema["$defs"]["LayerOverride"]["properties"]
    for name in SECTIONS:
        prop = schema["properties"][name]
        ref = prop["$ref"] if "$ref" in prop else next(a["$ref"] for a in prop["anyOf"] if "$ref" in a)
        override[name] = {"anyOf": [{"$ref": ref}, {"type": "null"}], "default": None,
                          "description": f"partial {name}, merged into the base; null removes it"}
    schema["title"] = "kvfx policy"
    return schema


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Policy:
    """A loaded, validated, immutable policy. Build it with :func:`load_policy`.

    >>> p = load_policy("knorm")
    >>> p.resolve(0, "model.layers.0.self_attn", num_layers=32).describe()
    'full'
    >>> p.resolve(5, "model.layers.5.self_attn", num_layers=32).eviction.scorer
    'knorm'
    """

    __slots__ = ("name", "hash", "source", "_label", "_doc", "_base", "_raw_layers", "_canonical", "_cache")

    def __init__(self, document: dict, *, label: str = "<dict>", source: str | None = None):
        """Validate a merged document (see :func:`kvfx.policy.loader.read_document`); raises PolicyError."""
        try:
            doc = PolicyDoc.model_validate(document)
        except ValidationError as e:
            raise from_validation(e, PolicyDoc, document, label) from None
        raw_layers = list(document.get("layers") or [])
        base = LayerPolicy(**{s: getattr(doc, s) for s in SECTIONS})
        canonical = {"kvfx": doc.kvfx, "name": doc.name,
                     **{s: (None if getattr(doc, s) is None else getattr(doc, s).model_dump(mode="json"))
                        for s in SECTIONS},
                     "layers": [_plain(r) for r in raw_layers]}
        budget = canonical.get("budget") or {}
        if budget.get("allocation") == "uniform" and budget.get("safeguard") == 0.2:
            # head-wise allocation (AdaKV) came later: a policy without it keeps its earlier hash
            canonical["budget"] = {k: v for k, v in budget.items() if k not in ("allocation", "safeguard")}
        quant = canonical.get("quant") or {}
        if quant.get("residual_dtype") == "model":  # quant.residual_dtype came later too
            canonical["quant"] = {k: v for k, v in quant.items() if k != "residual_dtype"}
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        for k, v in dict(name=doc.name, hash=hashlib.sha256(text.encode()).hexdigest()[:12], source=source,
                         _label=label, _doc=doc, _base=base, _raw_layers=raw_layers,
                         _canonical=canonical, _cache={}).items():
            object.__setattr__(self, k, v)
        for i in range(len(raw_layers)):   # each override on its own must give a valid layer policy
            self._merged((i,))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Policy is immutable")

    def __repr__(self) -> str:
        return f"Policy(name={self.name!r}, hash={self.hash!r}, source={self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __reduce__(self) -> tuple:
        return (_rebuild, (self._canonical, self._label, self.source))

    @property
    def base(self) -> LayerPolicy:
        """The policy of a site that no ``layers:`` override matches."""
        return self._base

    @property
    def overrides(self) -> tuple[LayerOverride, ...]:
        """The validated ``layers:`` entries, in order."""
        return tuple(self._doc.layers)

    def to_dict(self) -> dict:
        """The fully resolved document (extends merged, defaults filled); ``load_policy`` of it is equal."""
        return json.loads(json.dumps(self._canonical))

    def _merged(self, indices: tuple[int, ...]) -> LayerPolicy:
        if indices in self._cache:
            return self._cache[indices]
        data: dict = self._base.model_dump()
        for i in indices:
            raw = self._raw_layers[i]
            data = merge(data, {s: raw[s] for s in SECTIONS if s in raw})
        try:
            lp = LayerPolicy.model_validate(data)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            loc = tuple(err["loc"]) + tuple((err.get("ctx") or {}).get("loc", ()))
            blame = next((i for i in reversed(indices) if loc and loc[0] in self._raw_layers[i]), indices[-1])
            raise from_validation(e, LayerPolicy, self._raw_layers[blame], self._label,
                                  prefix=("layers", blame)) from None
        self._cache[indices] = lp
        return lp

    def resolve(self, layer_index: int, module_path: str, num_layers: int,
                window: bool | None = None) -> LayerPolicy:
        """The policy of the attention site ``module_path`` in layer ``layer_index`` of ``num_layers``.

        Overrides whose ``match`` (and ``window``: ``window`` says whether the site is a
        sliding-window layer) cover the site are deep-merged into the base in order (last wins).

        >>> load_policy("snapkv").resolve(3, "model.layers.3.self_attn", 32).budget.keep
        0.25
        """
        ints = isinstance(layer_index, int) and isinstance(num_layers, int)
        if not (ints and 0 <= layer_index < num_layers):
            raise PolicyError(f"resolve: got layer_index {layer_index!r} of num_layers {num_layers!r}, "
                              "expected 0 <= layer_index < num_layers")
        hits = tuple(i for i, ov in enumerate(self._doc.layers)
                     if ov.covers(layer_index, module_path, num_layers, window))
        try:
            return self._merged(hits)
        except PolicyError as e:
            raise PolicyError(f"{e} (at layer {layer_index}, {module_path})", file=e.file, line=e.line,
                              col=e.col, path=e.path) from None

    def targets_window(self, layer_index: int, module_path: str, num_layers: int) -> int | None:
        """Index of the last ``layers:`` override with ``window: true`` that covers this
        sliding-window site (None if none does): the user asked for that layer explicitly, so a
        request kvfx cannot honour there is an error, not a silently skipped layer."""
        hits = [i for i, ov in enumerate(self._doc.layers)
                if ov.window is True and ov.covers(layer_index, module_path, num_layers, True)]
        return hits[-1] if hits else None

    def check_overrides(self, sites: Iterable[tuple]) -> None:
        """Raise PolicyError naming the first override (with file:line:col) that matches no site.

        ``sites`` are the model's ``(layer_index, module_path)`` pairs, or ``(layer_index,
        module_path, is_window)`` triples when it is known which sites are sliding-window layers
        (with pairs, overrides with ``window:`` are not checked); negative indices in ``match``
        count from ``max(layer_index) + 1``.
        """
        sites = [tuple(s) + (None,) * (3 - len(s)) for s in sites]
        num_layers = max((s[0] for s in sites), default=-1) + 1
        kinds_known = all(s[2] is not None for s in sites)
        for i, ov in enumerate(self._doc.layers):
            if ov.window is not None and not kinds_known:
                continue
            if any(ov.covers(layer, path, num_layers, win) for layer, path, win in sites):
                continue
            span = "layer 0" if num_layers == 1 else f"layers 0-{num_layers - 1}"
            have = f"{span}, e.g. {sites[0][1]!r}" if sites else "none were given"
            if ov.window is not None:
                n_win = sum(bool(s[2]) for s in sites)
                have += f"; {n_win} of them sliding-window layers"
            key = "match" if ov.match is not None else "window"
            raise error_at(self._raw_layers[i], self._label, (key,), show_value(_plain(getattr(ov, key))),
                           f"to match at least one attention site of the model ({have}); fix the {key} "
                           f"or remove {format_path(('layers', i))}", prefix=("layers", i))


def _rebuild(canonical: dict, label: str, source: str | None) -> Policy:
    return Policy(canonical, label=label, source=source)


@functools.cache
def _preset(name: str) -> Policy:
    doc, label, source = read_document(name)
    return Policy(doc, label=label, source=source)


def load_policy(spec: Union[str, os.PathLike, dict, Policy]) -> Policy:
    """Load a policy from a preset name, ``NAME@KEEP`` (the preset with ``budget.keep: KEEP``), a
    ``.yaml``/``.yml`` path, a dict, or return a Policy as is.

    Raises :class:`PolicyError` with a one-line ``FILE:LINE:COL key.path: got V, expected W`` message.

    >>> load_policy("snapkv").name
    'snapkv'
    >>> load_policy({"extends": "snapkv", "budget": {"keep": 0.1}}).resolve(0, "m", 1).budget.keep
    0.1
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str) and "@" in spec and not os.path.exists(spec):  # NAME@KEEP
        name, keep = spec.split("@", 1)
        try:
            keep_f = float(keep)
        except ValueError:
            raise PolicyError(f"policy: got {spec!r}, expected NAME@KEEP with a number after '@' "
                              "(e.g. snapkv@0.125)", path="policy") from None
        return load_policy({"kvfx": 1, "name": f"{name}-keep{keep}", "extends": name,
                            "budget": {"keep": keep_f}})
    if isinstance(spec, str) and is_preset_name(spec):
        return _preset(spec)
    doc, label, source = read_document(spec)
    return Policy(doc, label=label, source=source)
