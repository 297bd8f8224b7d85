"""The ``kvfx`` dynamo backend.

    model.compile(backend="kvfx", options={"policy": "streaming"})      # in place: generate()
    compiled = torch.compile(model, backend="kvfx", options={...})      # own decode loops

Options:
    policy: a preset name, a path to a YAML file, a dict, or a :class:`kvfx.Policy`
            (default ``"full"``: no compression, exact).
    inner:  the compiler that runs the rewritten graph: ``"inductor"`` (default), ``"eager"``
            or ``"aot_eager"`` (debugging).

Every graph dynamo hands over goes through :func:`kvfx.passes.run_passes`; graphs without
attention pass through unchanged. ``kvfx.sites()`` lists what happened to each site.
"""

from __future__ import annotations

import itertools
import logging

import torch

from kvfx.passes import run_passes
from kvfx.policy import Policy, load_policy

log = logging.getLogger("kvfx")

_INNER = ("inductor", "eager", "aot_eager")
# [Note] keyed by id(options) *and* holding the options object: a freed dict's id can be reused
# by a new one, which must not inherit the old policy or namespace.
_namespaces: dict[int, tuple[dict, str]] = {}
_counter = itertools.count()
_policies: dict[int, tuple[dict | None, Policy]] = {}
STATS = {"graphs": 0, "rewritten": 0, "left_alone": 0}


def _namespace(options: dict | None) -> str:
    """One namespace per torch.compile call (its options object), so that the prefill and
    decode graphs of one compiled model share stores and two compiled models do not."""
    if not options:
        return "default"
    entry = _namespaces.get(id(options))
    if entry is None or entry[0] is not options:
        entry = _namespaces[id(options)] = (options, f"c{next(_counter)}")
    return entry[1]


def _policy(options: dict | None) -> Policy:
    key = id(options) if options else 0
    entry = _policies.get(key)
    if entry is None or entry[0] is not (options or None):
        entry = _policies[key] = (options or None, load_policy((options or {}).get("policy", "full")))
    return entry[1]


def _guard_against_eager_fallback() -> None:
    """[Note] Once kvfx rewrote a graph, the model's cache holds ghost tensors; if dynamo ever
    ran the original Python instead (recompile limit hit), attention would read zeros. So:
    static shapes (which recompile every step) are refused, and hitting the recompile limit is
    made an error instead of a silent fallback."""
    cfg = torch._dynamo.config
    if not cfg.automatic_dynamic_shapes:
        raise RuntimeError("kvfx: compiled with dynamic=False, but the KV cache grows every "
                           "decode step, so static shapes would recompile each step; compile "
                           "without dynamic=False (the default marks the growing dim dynamic)")
    if not cfg.fail_on_recompile_limit_hit:
        log.info("kvfx: setting torch._dynamo.config.fail_on_recompile_limit_hit = True")
        cfg.fail_on_recompile_limit_hit = True


def kvfx_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Dynamo backend entry point (registered as ``kvfx`` through the
    ``torch_dynamo_backends`` entry point). ``kwargs`` (e.g. HF's ``mode=``) are ignored."""
    options = dict(options) if options is not None and not isinstance(options, dict) else options
    unknown = set(options or {}) - {"policy", "inner"}
    if unknown:
        raise ValueError(f"kvfx backend: unknown option(s) {sorted(unknown)}; expected 'policy' "
                         "(preset, path, dict or Policy) and 'inner' (inductor, eager, aot_eager)")
    inner = (options or {}).get("inner", "inductor")
    if inner not in _INNER:
        raise ValueError(f"kvfx backend: option inner={inner!r}, expected one of {', '.join(_INNER)}")
    _guard_against_eager_fallback()
    stats = run_passes(gm, _policy(options), _namespace(options))
    STATS["graphs"] += 1
    STATS["rewritten"] += stats["rewritten"]
    STATS["left_alone"] += stats["left_alone"]
    log.info("kvfx: graph with %d attention sites, %d rewritten", stats["found"], stats["rewritten"])
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
