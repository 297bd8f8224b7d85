"""The ``kvfx`` dynamo backend.

    model.compile(backend="kvfx", options={"policy": "streaming"})      # in place: generate()
    kvfx.compile(model, "streaming")                                    # the same, recommended
    compiled = torch.compile(model, backend="kvfx", options={...})      # own decode loops

Options:
    policy: a preset name (``NAME`` or ``NAME@KEEP``), a path to a YAML file, a dict, or a
            :class:`kvfx.Policy` (default ``"full"``: no compression, exact).
    inner:  the compiler that runs the rewritten graph: ``"inductor"`` (default), ``"eager"``
            or ``"aot_eager"`` (debugging).

Every graph dynamo hands over goes through :func:`kvfx.passes.run_passes`, which returns the
graph's :class:`kvfx.runtime.state.Program`; the compiled graph is wrapped so that, at run time,
the kvfx operators find their program and their caller's session (:mod:`kvfx.runtime.state`).
Graphs without attention pass through unchanged. Nothing here is module state, and kvfx changes
no process-wide torch setting.
"""

from __future__ import annotations

import logging

import torch

from kvfx.passes import run_passes
from kvfx.policy import load_policy

log = logging.getLogger("kvfx")

_INNER = ("inductor", "eager", "aot_eager")


def _options(options) -> tuple[object, str]:
    options = dict(options) if options is not None and not isinstance(options, dict) else (options or {})
    unknown = set(options) - {"policy", "inner"}
    if unknown:
        raise ValueError(f"kvfx backend: unknown option(s) {sorted(unknown)}; expected 'policy' "
                         "(preset, path, dict or Policy) and 'inner' (inductor, eager, aot_eager)")
    inner = options.get("inner", "inductor")
    if inner not in _INNER:
        raise ValueError(f"kvfx backend: option inner={inner!r}, expected one of {', '.join(_INNER)}")
    return options.get("policy", "full"), inner


def _check_dynamic() -> None:
    """[Note] static shapes would recompile every decode step (the cache grows), so they are
    refused. This only reads dynamo's configuration; kvfx never changes it."""
    if not torch._dynamo.config.automatic_dynamic_shapes:
        raise RuntimeError("kvfx: compiled with dynamic=False, but the KV cache grows every "
                           "decode step, so static shapes would recompile each step; compile "
                           "without dynamic=False (the default marks the growing dim dynamic)")


def kvfx_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Dynamo backend entry point (registered as ``kvfx`` through the
    ``torch_dynamo_backends`` entry point). ``kwargs`` (e.g. HF's ``mode=``) are ignored."""
    policy, inner = _options(options)
    _check_dynamic()
    program = run_passes(gm, load_policy(policy))
    program.params = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
    program.anchor = program.params[0] if program.params else None
    log.info("kvfx: graph with %d attention sites, %d rewritten", len(program.infos), len(program.sites))
    if inner == "eager":
        compiled = gm.forward
    elif inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        compiled = aot_eager(gm, example_inputs)
    else:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs)
    return program.wrap(compiled)


def compile(model: torch.nn.Module, policy="full", *, inner: str = "inductor", **compile_kwargs):
    """Compile ``model`` in place with kvfx and ``policy`` (what ``model.compile(backend="kvfx",
    options={"policy": policy})`` does), with its own dynamo recompile budget
    (``isolate_recompiles=True``): in transformers 5 every model shares one forward code object,
    so without it each policy compiled in a process spends the budget of all of them, and dynamo
    falls back to eager (no compression) after a few. ``compile_kwargs`` go to ``torch.compile``.
    Returns ``model``."""
    compile_kwargs.setdefault("isolate_recompiles", True)
    model.compile(backend="kvfx", options={"policy": policy, "inner": inner}, **compile_kwargs)
    return model
