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

One hint reaches past kvfx's own frames (:func:`_install_generate_hint`): ``torch.compile(model)``
returns a wrapper whose ``.generate()`` runs the uncompiled model, so a kvfx policy would silently
compress nothing; when this module loads (dynamo loads it by name at ``torch.compile``), the
wrapper class's attribute lookup is wrapped to warn once per wrapper, only for wrappers made with
the kvfx backend and only for ``generate``. What every lookup returns is unchanged.
"""

from __future__ import annotations

import copy
import logging
import warnings
import weakref

import torch

from kvfx.passes import run_passes
from kvfx.policy import PolicyError, load_policy

log = logging.getLogger("kvfx")


class CompilePolicyError(PolicyError, torch._dynamo.exc.ShortenTraceback):
    """A :class:`kvfx.PolicyError` found while kvfx compiles a graph (a malformed policy, an
    override that matches no attention site, a quant group the head dim cannot hold).

    dynamo wraps a backend's exceptions in ``BackendCompilerFailed`` but lets its own
    ``ShortenTraceback`` through unchanged, so this error reaches the caller of the first forward
    as itself: ``except kvfx.PolicyError`` catches it, and ``str(err)`` stays the one located line
    (dynamo appends its hints to the exception's args, not to this message)."""

    def __init__(self, err: PolicyError):
        PolicyError.__init__(self, str(err), **{a: getattr(err, a, None) for a in ("file", "line", "col", "path")})
        self.first_useful_frame = None
        self._line = str(err)

    def __str__(self) -> str:
        return self._line

_INNER = ("inductor", "eager", "aot_eager")


def _options(options) -> tuple[object, str]:
    options = dict(options) if options is not None and not isinstance(options, dict) else (options or {})
    unknown = set(options) - {"policy", "inner", "tp"}
    if unknown:
        raise ValueError(f"kvfx backend: unknown option(s) {sorted(unknown)}; expected 'policy' "
                         "(preset, path, dict or Policy), 'inner' (inductor, eager, aot_eager) and 'tp' "
                         "(tensor-parallel ranks, set by kvfx.compile)")
    tp = options.get("tp", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"kvfx backend: option tp={tp!r}, expected an int >= 1 (the ranks the model's "
                         "heads are sharded over; kvfx.compile sets it)")
    inner = options.get("inner", "inductor")
    if inner not in _INNER:
        raise ValueError(f"kvfx backend: option inner={inner!r}, expected one of {', '.join(_INNER)}")
    return options.get("policy", "full"), inner


def _freeze_options(options: dict) -> dict:
    """[Note] torch.compile keeps the caller's options dict (no copy) in the backend wrapper that
    dynamo's BACKEND_MATCH guard compares by value, so a dict mutated after compiling would make
    dynamo reuse this graph for a later compile with the new options (running the old policy).
    The wrapper (our caller) is given a copy: later mutations then neither reach it nor match it.
    If the wrapper cannot be found, the caller's dict is returned and a mutation is refused at run
    time (:meth:`kvfx.runtime.state.Program.wrap`)."""
    import sys

    frozen = copy.deepcopy(options)
    f = sys._getframe(1)
    for _ in range(4):
        f = f.f_back
        if f is None:
            break
        w = f.f_locals.get("self")
        kw = getattr(w, "kwargs", None)
        if type(w).__name__ == "_TorchCompileWrapper" and isinstance(kw, dict) and kw.get("options") is options:
            kw["options"] = frozen
            return frozen
    return options


def _check_dynamic() -> None:
    """[Note] static shapes would recompile every decode step (the cache grows), so they are
    refused. This only reads dynamo's configuration; kvfx never changes it."""
    if not torch._dynamo.config.automatic_dynamic_shapes:
        raise RuntimeError("kvfx: compiled with dynamic=False, but the KV cache grows every "
                           "decode step, so static shapes would recompile each step; compile "
                           "without dynamic=False (the default marks the growing dim dynamic)")


def _sharded_over(example_inputs) -> int:
    """The tensor-parallel ranks the graph's weights are sharded over (DTensor parameters among the
    inputs, Hugging Face ``tp_plan``), 1 when none: the backend then sums ChunkKV's chunk scores
    over the ranks and refuses state that spans KV heads itself, so ``model.compile(backend="kvfx")``
    is as safe under TP as :func:`compile`."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return 1
    for x in example_inputs:
        if isinstance(x, DTensor):
            try:
                return int(x.device_mesh.size())
            except Exception:  # an opaque (traced) mesh: look at the next input
                continue
    return 1


def kvfx_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Dynamo backend entry point (registered as ``kvfx`` through the
    ``torch_dynamo_backends`` entry point). ``kwargs`` (e.g. HF's ``mode=``) are ignored."""
    policy, inner = _options(options)
    _check_dynamic()
    tp = (options or {}).get("tp", 1)
    world = _sharded_over(example_inputs)
    if world > 1 and tp == 1:  # a plain model.compile(backend="kvfx") of a tensor-parallel model
        tp = world
    try:
        program = run_passes(gm, load_policy(policy), tp=tp)
    except PolicyError as e:
        raise CompilePolicyError(e) from None
    if isinstance(options, dict):
        program.options, program.options_at_compile = _freeze_options(options), copy.deepcopy(options)
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


GENERATE_HINT = (
    "kvfx: torch.compile(model, backend='kvfx') returned a wrapper whose .generate() runs the "
    "uncompiled model, so this generate() compresses nothing. Compile the model in place instead: "
    "model.compile(backend='kvfx', options={...}) or kvfx.compile(model, policy); the wrapper itself "
    "is for calling the model directly (your own decode loop)")
_hinted: "weakref.WeakSet" = weakref.WeakSet()


def compiled_with_kvfx(module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper made with the kvfx backend. Walks the
    ``_torchdynamo_orig_backend`` chain from the wrapper's dynamo context down to the backend
    (torch's documented way to recover the unwrapped backend of a convert-frame callback)."""
    x = getattr(getattr(module, "__dict__", {}).get("dynamo_ctx"), "callback", None)
    for _ in range(8):
        if x is None:
            return False
        if x is kvfx_backend or getattr(x, "compiler_fn", None) is kvfx_backend:
            return True
        x = getattr(x, "_torchdynamo_orig_backend", None)
    return False


def _install_generate_hint() -> None:
    """Wrap ``OptimizedModule.__getattr__`` (idempotent) so that reading ``.generate`` from a kvfx
    wrapper warns once per wrapper (:data:`GENERATE_HINT`). Only lookups that fall through to the
    wrapped module reach ``__getattr__``; the value returned is always the original one."""
    from torch._dynamo.eval_frame import OptimizedModule

    orig = OptimizedModule.__getattr__
    if getattr(orig, "_kvfx_generate_hint", False):
        return

    def __getattr__(self, name):
        value = orig(self, name)
        if name == "generate" and self not in _hinted and compiled_with_kvfx(self):
            _hinted.add(self)
            warnings.warn(GENERATE_HINT, UserWarning, stacklevel=2)
        return value

    __getattr__._kvfx_generate_hint = True
    __getattr__.__wrapped__ = orig
    __getattr__.__doc__ = orig.__doc__
    OptimizedModule.__getattr__ = __getattr__


_install_generate_hint()


def compile(model: torch.nn.Module, policy="full", *, inner: str = "inductor", **compile_kwargs):
    """Compile ``model`` in place with kvfx and ``policy`` (what ``model.compile(backend="kvfx",
    options={"policy": policy})`` does), with two protections scoped to this model's calls:

    * its own dynamo recompile budget (``isolate_recompiles=True``): in transformers 5 every model
      shares one forward code object, so otherwise each policy compiled in a process spends the
      budget of all of them, and after a few dynamo runs the model eagerly (uncompressed);
    * reaching that budget raises instead of falling back to eager (dynamo's
      ``fail_on_recompile_limit_hit``, set only while this model runs; other compiled code keeps
      its fallback).

    On a model sharded with tensor parallelism (``tp_plan``), a policy whose state spans KV heads
    (AdaKV, lowrank) is refused here, before compiling (:func:`kvfx.distributed.check_tp_policy`);
    ChunkKV's chunk scores are summed over the ranks (backend option ``tp``, which this sets). A
    plain ``model.compile(backend="kvfx")`` of a sharded model gets both from the backend, which
    sees the DTensor weights (the refusal then comes at the first forward, as a ``kvfx.PolicyError``).

    ``compile_kwargs`` go to ``torch.compile``. Returns ``model``."""
    load_policy(policy)  # a malformed policy fails here, before anything is compiled
    from kvfx.distributed import check_tp_policy, tp_size

    check_tp_policy(model, policy)  # tensor parallelism: state that spans KV heads is refused here
    compile_kwargs.setdefault("isolate_recompiles", True)
    options = {"policy": policy, "inner": inner}
    if tp_size(model) > 1:  # ChunkKV's chunk scores are then summed over the ranks' KV heads
        options["tp"] = tp_size(model)
    model.compile(backend="kvfx", options=options, **compile_kwargs)
    compiled = model._compiled_call_impl

    def call(*args, **kwargs):
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise RuntimeError(
                "kvfx: dynamo reached its recompile limit for this model, and running it eagerly would "
                "leave its cache uncompressed (or read kvfx's cache entries as data); pass a higher "
                "recompile_limit= to kvfx.compile, or find what recompiles with "
                "TORCH_LOGS=recompiles") from e

    model._compiled_call_impl = call
    return model
