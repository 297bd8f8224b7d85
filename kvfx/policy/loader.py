"""Reading policy documents: safe YAML with positions, ``extends:`` merging, presets, one-line errors.

Every mapping read from YAML is a :class:`MarkedMap` that remembers the ``file:line:col`` of each key
and value; :func:`merge` carries those marks along, so an error in a merged document still points
at the file and line that wrote the bad value. :func:`from_validation` turns a pydantic error into
the one-line ``FILE:LINE:COL key.path: got VALUE, expected WHAT`` of a :class:`PolicyError`.
"""

from __future__ import annotations

import difflib
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel, ValidationError

from .schema import PolicyError, show_value

PRESET_DIR = Path(__file__).with_name("presets")
_MAP_TAG, _SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_MAX_NODES = 100_000   # alias expansion guard ("billion laughs")


class Mark(NamedTuple):
    """A 1-based position in a policy file."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class MarkedMap(dict):
    """A dict that remembers where its keys and values were written (marks may be missing)."""

    def __init__(self, *args: Any, mark: Mark | None = None):
        super().__init__(*args)
        self.mark, self.key_marks, self.value_marks = mark, {}, {}


class MarkedList(list):
    """A list that remembers where its items were written."""

    def __init__(self, *args: Any, mark: Mark | None = None):
        super().__init__(*args)
        self.mark, self.item_marks = mark, []


# ---- errors ------------------------------------------------------------------------------------

def format_path(loc: tuple) -> str:
    """``("layers", 0, "quant")`` -> ``"layers[0].quant"``; the empty path is ``"policy"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "policy"


def locate(data: Any, loc: tuple, key: bool = False) -> Mark | None:
    """The mark of the value at ``loc`` (of its key for containers, or when ``key``); else the closest."""
    node, mark = data, getattr(data, "mark", None)
    for i, part in enumerate(loc):
        if isinstance(node, dict) and not isinstance(part, int) and part in node:
            child = node[part]
            at_key = (key and i == len(loc) - 1) or isinstance(child, (dict, list))
            marks = getattr(node, "key_marks" if at_key else "value_marks", {})
            mark, node = marks.get(part), child
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            marks = getattr(node, "item_marks", [])
            mark, node = (marks[part] if part < len(marks) else None), node[part]
        else:
            break
    return mark


def error_at(data: Any, label: str, loc: tuple, got: str, expected: str, prefix: tuple = (),
             key: bool = False) -> PolicyError:
    """A :class:`PolicyError` for the value at ``loc`` in ``data`` (``got`` is already formatted)."""
    mark, path = locate(data, loc, key), format_path(prefix + loc)
    where = str(mark) if mark else label
    return PolicyError(f"{where} {path}: got {got}, expected {expected}", file=mark.file if mark else label,
                       line=mark.line if mark else None, col=mark.col if mark else None, path=path)


def _unwrap(ann: Any) -> list:
    """The concrete types inside Optional/Union/list annotations."""
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (typing.Union, list, types.UnionType):
        return [t for a in args for t in _unwrap(a)]
    return [ann]


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """(model that owns the last key of ``loc``, its FieldInfo or None)."""
    owner, info = model, None
    for part in loc:
        if isinstance(part, int):
            continue
        if owner is None or part not in owner.model_fields:
            return owner, None
        info = owner.model_fields[part]
        nested = [t for t in _unwrap(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        owner = nested[0] if nested else None
    return owner, info


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def type_text(info: Any) -> str:
    """What a field accepts, e.g. ``"one of 2, 4, 8"`` or ``"a number in (0, 1]"``."""
    kinds = [t for t in _unwrap(info.annotation) if t is not type(None)]
    if kinds and typing.get_origin(kinds[0]) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(kinds[0]))
    t = kinds[0] if kinds else None
    is_model = isinstance(t, type) and issubclass(t, BaseModel)
    noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(t, "a mapping" if is_model else "a value")
    b = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    lo = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
    hi = (")", b["lt"]) if "lt" in b else ("]", b["le"]) if "le" in b else None
    if lo and hi:
        return f"{noun} in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{noun} {'>' if lo[0] == '(' else '>='} {_num(lo[1])}"
    if hi:
        return f"{noun} {'<' if hi[0] == ')' else '<='} {_num(hi[1])}"
    return noun


_GENERIC = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
            "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
            "bool_type": "true or false", "model_type": "a mapping", "dict_type": "a mapping",
            "model_attributes_type": "a mapping", "list_type": "a list"}


def from_validation(exc: ValidationError, model: type[BaseModel], data: Any, label: str,
                    prefix: tuple = ()) -> PolicyError:
    """The first error of ``exc`` (validating ``data`` as ``model``) as a one-line PolicyError."""
    err = exc.errors(include_url=False)[0]
    loc, typ, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    if typ == "kvfx":
        return error_at(data, label, loc + tuple(ctx["loc"]), ctx["got"], ctx["expected"], prefix)
    owner, info = _field_at(model, loc)
    if typ == "extra_forbidden":
        owner, _ = _field_at(model, loc[:-1]) if loc[:-1] else (model, None)
        allowed = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        expected = "one of " + ", ".join(allowed) + (f" (did you mean {close[0]}?)" if close else "")
        return error_at(data, label, loc, f"unknown key {show_value(loc[-1])}", expected, prefix, key=True)
    if typ == "missing":
        what = (info.description or type_text(info)) if info else "a value"
        return error_at(data, label, loc, "nothing", f"{what} (required)", prefix)
    if typ == "string_pattern_mismatch" and info is not None and info.description:
        expected = info.description
    elif typ == "string_too_long":
        expected = f"at most {ctx.get('max_length')} characters"
    elif info is not None and typ.startswith(("literal", "greater", "less", "int_", "float_")):
        expected = type_text(info)
    else:
        expected = _GENERIC.get(typ, err["msg"][:1].lower() + err["msg"][1:])
    return error_at(data, label, loc, show_value(err["input"]), expected, prefix)


# ---- YAML --------------------------------------------------------------------------------------

def parse_yaml(text: str, label: str) -> Any:
    """Parse with the safe loader; mappings become :class:`MarkedMap`, sequences :class:`MarkedList`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return MarkedMap(mark=Mark(label, 1, 1))
        count = [0]
        return _convert(node, loader, label, (), set(), count)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark or e.context_mark
        where = f"{label}:{m.line + 1}:{m.column + 1}" if m else label
        why = ", ".join(filter(None, [e.context, e.problem]))
        raise PolicyError(f"{where}: invalid YAML: {why}", file=label,
                          line=m.line + 1 if m else None, col=m.column + 1 if m else None) from None
    except yaml.YAMLError as e:
        raise PolicyError(f"{label}: invalid YAML: {e}", file=label) from None
    finally:
        loader.dispose()


def _yaml_error(m: Mark, why: str) -> PolicyError:
    return PolicyError(f"{m}: invalid YAML: {why}", file=m.file, line=m.line, col=m.col)


def _mark(node: yaml.Node, label: str) -> Mark:
    return Mark(label, node.start_mark.line + 1, node.start_mark.column + 1)


def _convert(node: yaml.Node, loader: yaml.SafeLoader, label: str, loc: tuple, stack: set,
             count: list) -> Any:
    count[0] += 1
    if count[0] > _MAX_NODES or id(node) in stack:
        why = "too many nodes" if count[0] > _MAX_NODES else "a recursive alias"
        raise _yaml_error(_mark(node, label), why)
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node)
    bad_tag = node.tag not in (_MAP_TAG, _SEQ_TAG)
    if bad_tag:
        raise _yaml_error(_mark(node, label), f"unsupported tag {node.tag!r}")
    stack = stack | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        out = MarkedList(mark=_mark(node, label))
        for i, item in enumerate(node.value):
            out.append(_convert(item, loader, label, loc + (i,), stack, count))
            out.item_marks.append(_mark(item, label))
        return out
    out = MarkedMap(mark=_mark(node, label))
    for knode, vnode in node.value:
        merge_key = knode.tag == "tag:yaml.org,2002:merge"
        scalar = isinstance(knode, yaml.ScalarNode) and not merge_key
        key = loader.construct_object(knode) if scalar else "<<" if merge_key else None
        problem = ("a merge key '<<', expected plain keys (use extends: to reuse a policy)" if merge_key else
                   f"key {show_value(key)}, expected a string key" if not isinstance(key, str) else
                   f"{show_value(key)} twice, expected each key once" if key in out else None)
        if problem:
            m, path = _mark(knode, label), format_path(loc + ((key,) if isinstance(key, str) else ()))
            raise PolicyError(f"{m} {path}: got {problem}", file=label, line=m.line, col=m.col, path=path)
        out[key] = _convert(vnode, loader, label, loc + (key,), stack, count)
        out.key_marks[key], out.value_marks[key] = _mark(knode, label), _mark(vnode, label)
    return out


# ---- merging and extends -----------------------------------------------------------------------

def merge(base: dict, over: dict) -> MarkedMap:
    """Deep merge: ``over``'s keys win, mappings merge, ``None`` removes a key; marks travel along."""
    out = MarkedMap(mark=getattr(over, "mark", None) or getattr(base, "mark", None))
    for src in (base, over):
        for k, v in src.items():
            if v is None:
                out.pop(k, None)
                out.key_marks.pop(k, None), out.value_marks.pop(k, None)
                continue
            if isinstance(v, dict):
                v = merge(out[k] if src is over and isinstance(out.get(k), dict) else {}, v)
            out[k] = v
            for name in ("key_marks", "value_marks"):
                getattr(out, name)[k] = getattr(src, name, {}).get(k)
    return out


def list_presets() -> list[str]:
    """The names of the shipped presets, sorted: ``['full', 'h2o', 'kivi2', ...]``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@functools.cache
def _preset_text(name: str) -> str:
    return (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8")


def preset_description(name: str) -> str:
    """The first comment line of a preset file (its one-line description)."""
    for line in _preset_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def is_preset_name(spec: str) -> bool:
    """A string names a preset when it has no path separator and no .yaml/.yml suffix."""
    return "/" not in spec and os.sep not in spec and not spec.endswith((".yaml", ".yml"))


def _unknown_preset(name: str) -> str:
    close = difflib.get_close_matches(name, list_presets(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"a preset name{hint} or a path to a .yaml file; presets: {', '.join(list_presets())}"


def read_document(spec: Any) -> tuple[MarkedMap, str, str]:
    """Read ``spec`` (preset name, path or dict) and merge its ``extends:`` chain.

    Returns ``(document, label, source)``: label names the input in errors (``"<dict>"`` for dicts),
    source is the file path, ``"preset:NAME"`` or ``"dict"``.
    """
    if isinstance(spec, dict):
        doc = _resolve(spec, "<dict>", os.getcwd(), (), is_file=False)
        doc.setdefault("kvfx", 1)
        if spec.get("name") is None:   # a dict without a name is not its parent
            doc["name"] = "dict"
        return doc, "<dict>", "dict"
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if isinstance(spec, str) and is_preset_name(s):
            if s not in list_presets():
                raise PolicyError(f"policy: got {s!r}, expected {_unknown_preset(s)}", path="policy")
            return _load(f"preset:{s}", s), f"<preset {s}>", f"preset:{s}"
        return _load(s, s), s, s
    raise PolicyError(f"policy: got {type(spec).__name__}, expected a preset name, a path to a .yaml file, "
                      "a dict or a Policy", path="policy")


def _load(ident: str, display: str, chain: tuple = ()) -> MarkedMap:
    """Load a preset (``ident`` ``preset:NAME``) or a file, then resolve its extends."""
    if ident.startswith("preset:"):
        name = ident[len("preset:"):]
        label, text, base_dir = f"<preset {name}>", _preset_text(name), str(PRESET_DIR)
    else:
        label, base_dir = display, os.path.dirname(display) or "."
        try:
            text = Path(display).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise PolicyError(f"{label}: cannot read policy file: {why}", file=label) from None
        ident = os.path.realpath(display)
    data = parse_yaml(text, label)
    return _resolve(data, label, base_dir, chain + ((ident, display),), is_file=True)


def _resolve(data: Any, label: str, base_dir: str, chain: tuple, is_file: bool) -> MarkedMap:
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else show_value(data)
        raise error_at(data, label, (), kind, "a mapping of policy keys (kvfx, name, budget, ...)")
    version = data.get("kvfx")
    if version is None and is_file:
        raise error_at(data, label, ("kvfx",), "nothing",
                       "1, the schema version (start the file with 'kvfx: 1')")
    if version is not None and (type(version) is not int or version != 1):
        raise error_at(data, label, ("kvfx",), show_value(version), "1, the schema version this kvfx reads")
    if is_file and data.get("name") is None:
        raise error_at(data, label, ("name",), "nothing", "a policy name (add 'name: ...')")
    body = MarkedMap({k: v for k, v in data.items() if k != "extends"}, mark=getattr(data, "mark", None))
    for name in ("key_marks", "value_marks"):
        getattr(body, name).update({k: v for k, v in getattr(data, name, {}).items() if k != "extends"})
    ext = data.get("extends")
    if ext is None:
        return merge({}, body)
    if not isinstance(ext, str) or not ext.strip():
        raise error_at(data, label, ("extends",), show_value(ext), "a preset name or a path to a .yaml file")
    if is_preset_name(ext):
        if ext not in list_presets():
            raise error_at(data, label, ("extends",), show_value(ext), _unknown_preset(ext))
        ident, display = f"preset:{ext}", f"preset:{ext}"
    else:
        display = ext if os.path.isabs(ext) else os.path.normpath(os.path.join(base_dir, ext))
        if not os.path.isfile(display):
            stem = Path(ext).stem
            hint = f"; did you mean extends: {stem}?" if stem in list_presets() else ""
            raise error_at(data, label, ("extends",), show_value(ext),
                           f"a preset name or an existing .yaml file (no file {display}{hint})")
        ident = os.path.realpath(display)
    if ident in [c[0] for c in chain]:
        cycle = " -> ".join([c[1] for c in chain] + [display])
        raise error_at(data, label, ("extends",), show_value(ext),
                       f"a policy that does not extend itself (cycle: {cycle})")
    return merge(_load(ident, display, chain), body)
