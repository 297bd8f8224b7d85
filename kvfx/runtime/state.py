"""Where kvfx's state lives (DESIGN rule 7): with the sequence, found through the graph's inputs.

Three objects, none of them a module global:

``Program``   one per graph the backend rewrote: the resolved configuration of each site
              (its :class:`SiteInfo` and compressor). Immutable after compilation. dynamo shares a
              compiled graph between model instances (and between every sequence run through a
              model) only when the backend options compare equal, so configuration found from the
              graph is always the right one; *state* never is.
``Session``   one per compiled model and policy: what ``kvfx.sites(model)``, ``kvfx.memory(model)``
              and ``kvfx.explain(model)`` report. It is found at run time from a parameter of the
              model that flows into the graph as an input (dynamo lifts parameters to graph inputs),
              so two models sharing one compiled graph still get two sessions. Dropping the model
              drops its session.
``Sequence``  one per sequence (one model cache object): the compressed store of every site and
              the state several sites share (low-rank RoPE tables). A site's store is found through
              the *ghost* kvfx handed back as the model's cache entry on the previous step: the
              ghost's storage carries a :class:`SiteHandle`. When the model's cache object is
              garbage-collected, its ghosts go, and with them the sequence and every byte it held.

The compiled graph is wrapped (:meth:`Program.wrap`): each call finds its session from the anchor
parameter and makes it, with the program, the *current context* of the kvfx operators for the
duration of the call (thread-local). The operators take only the site's index in the program.

Ghosts (:func:`make_ghost`) are one element expanded to the logical (B, H, T, d) shape of the
cache entry (stride 0), in the model's dtype (dynamo traces the model's own code over them, so
their metadata must be what the model expects). The element is NaN: code other than kvfx that reads
a ghost (an eager fallback attending over the cache) produces NaN, never a plausible attention over
zeros, and a copy of a ghost (beam search's ``index_select``) is recognizable.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

GHOST_VALUE = float("nan")  # what a ghost's one element holds (a copy shows it)
_ATTR = "_kvfx_handle"


class KvfxStateError(RuntimeError):
    """The model's cache and kvfx's state disagree (cropped, reordered, foreign or mixed caches)."""


@dataclass
class SiteInfo:
    """One attention site as the passes saw it (``kvfx.sites()`` lists these)."""

    key: str  # "<program>/<module path>": unique per compiled graph
    module_path: str
    layer_index: int
    pattern: str  # "sdpa" | "eager"
    provenance: str  # "dynamic_cache" | "static_cache" | "fresh" | "unknown"
    q_heads: int | None
    kv_heads: int | None
    head_dim: int | None
    rewritten: bool
    reason: str = ""  # why it was left alone
    policy: str = ""  # the applied layer policy, described
    graphs: int = 1  # graphs in which the site was seen
    softcap: float | None = None  # logits soft-capped as cap * tanh(s / cap) (Gemma-2)
    window: int | None = None  # a sliding-window layer: the tokens its cache keeps
    rope: str = ""  # for a scorer that reads the queries' RoPE: whether the pass found it


@dataclass
class SiteProgram:
    """A rewritten site's configuration: what the operator of site ``index`` runs."""

    info: SiteInfo
    compressor: object
    lowrank: bool = False


_program_ids = itertools.count()
_session_ids = itertools.count(1)


class Program:
    """The kvfx configuration of one compiled graph (see the module doc)."""

    def __init__(self, policy, infos: list[SiteInfo], sites: list[SiteProgram], why_none: str = ""):
        self.id = next(_program_ids)
        self.policy = policy
        self.infos = infos  # every site seen, rewritten or not
        self.sites = sites  # the rewritten ones, indexed by the operators' ``site`` argument
        self.why_none = why_none  # no site found: what the graph held instead (kvfx.passes.diagnose)
        self.anchor: int | None = None  # index of a model parameter among the graph's inputs
        self.params: list[int] = []  # indices of every model parameter among them
        self._fallback_session: Session | None = None
        self.options: dict | None = None  # the backend's options dict (torch.compile keeps it) ...
        self.options_at_compile: dict | None = None  # ... and a copy of it as compiled
        _PROGRAMS.add(self)

    def session_for(self, args) -> "Session":
        """The session of the model whose parameters are inputs of this call (found from the
        anchor; on a model's first call through this graph, from any of its parameters, and then
        all of them are indexed, so every graph of one model finds one session)."""
        if self.anchor is not None and self.anchor < len(args):
            key = self.policy.hash
            found = (_BY_PARAM.get(args[self.anchor]) or {}).get(key)
            if found is None:
                params = [args[i] for i in self.params if i < len(args) and isinstance(args[i], torch.Tensor)]
                found = next((s for s in ((_BY_PARAM.get(p) or {}).get(key) for p in params) if s), None)
                found = found or Session(self.policy)
                for p in params:
                    _BY_PARAM.setdefault(p, {})[key] = found
            found.add_program(self)
            return found
        if self._fallback_session is None:  # a graph without parameters: one session per graph
            self._fallback_session = Session(self.policy)
            self._fallback_session.add_program(self)
        return self._fallback_session

    def wrap(self, compiled):
        """The compiled graph, run with this program and its caller's session as the kvfx context.
        Keeps the inner compiler's calling convention (inductor's boxed calls)."""
        program = self
        boxed = getattr(compiled, "_boxed_call", False)

        def run(*args):
            if program.options is not None and program.options != program.options_at_compile:
                raise KvfxStateError(
                    "kvfx: the options dict given to torch.compile / model.compile was changed after "
                    f"compiling (policy {program.options_at_compile.get('policy')!r} -> "
                    f"{program.options.get('policy')!r}); torch.compile keeps that dict, so dynamo "
                    "would run graphs compiled for the old options: pass a new dict to each compile")
            seq_args = args[0] if len(args) == 1 and isinstance(args[0], list) else args
            if not program.sites:  # nothing to run, but the model's report lists the sites left alone
                program.session_for(seq_args)
                return compiled(*args)
            prev = getattr(_TLS, "ctx", None)
            ctx = _TLS.ctx = _Context(program, program.session_for(seq_args))
            if len(_TAPS) and program.anchor is not None and program.anchor < len(seq_args):
                ctx.tap = _TAPS.get(seq_args[program.anchor])
            try:
                return compiled(*args)
            finally:
                _TLS.ctx = prev

        if boxed:
            run._boxed_call = True
        run._kvfx_program = program
        return run


class _Context:
    __slots__ = ("program", "session", "new_sequence", "tap")

    def __init__(self, program: Program, session: "Session"):
        self.program, self.session = program, session
        self.tap = None  # set from tapping(model, fn)
        self.new_sequence: Sequence | None = None  # made by the first prefill site of the call


class Session:
    """Reports of one compiled model under one policy: its sites and its live sequences."""

    def __init__(self, policy):
        self.policy = policy
        self.label = f"model{next(_session_ids)}:{policy.name}"
        self.programs: list[Program] = []
        self.sequences: weakref.WeakSet[Sequence] = weakref.WeakSet()
        _SESSIONS.add(self)

    def add_program(self, program: Program) -> None:
        if not any(p is program for p in self.programs):
            self.programs.append(program)

    def sites(self) -> list[SiteInfo]:
        """Every site of the session's graphs, one entry per module path (``graphs`` counts)."""
        return _merge_sites(self.programs)


def _merge_sites(progs) -> list[SiteInfo]:
    """The sites of ``progs``, one entry per module path (``graphs``: in how many graphs it was
    seen; the rewritten entry wins over one left alone)."""
    out: dict[str, SiteInfo] = {}
    for p in progs:
        for info in p.infos:
            old = out.get(info.module_path)
            if old is None:
                out[info.module_path] = SiteInfo(**{**vars(info), "graphs": 1})
            else:
                old.graphs += 1
                if info.rewritten and not old.rewritten:
                    out[info.module_path] = SiteInfo(**{**vars(info), "graphs": old.graphs})
    return sorted(out.values(), key=lambda s: (s.layer_index, s.module_path))


class SiteHandle:
    """What a ghost's storage carries: its sequence and the site it is the cache entry of."""

    __slots__ = ("sequence", "path", "__weakref__")

    def __init__(self, sequence: "Sequence", path: str):
        self.sequence, self.path = sequence, path

    @property
    def store(self):
        return self.sequence.stores[self.path]


class Sequence:
    """The compressed cache of one sequence: a store per site, and state shared by sites."""

    def __init__(self, session: Session):
        self.session = session
        self.stores: dict[str, object] = {}  # module path -> store
        # weak: the ghosts own the handles, the handles own the sequence (no cycle, so the sequence
        # goes the moment its cache does, without waiting for the garbage collector)
        self.handles: weakref.WeakValueDictionary[str, SiteHandle] = weakref.WeakValueDictionary()
        self.shared: dict[str, object] = {}  # e.g. low-rank RoPE tables, by key
        self.ghosts: dict[str, tuple] = {}  # path -> weakrefs to its latest ghosts (model-side bytes)
        session.sequences.add(self)

    def handle(self, path: str) -> SiteHandle:
        h = self.handles.get(path)
        if h is None:
            h = self.handles[path] = SiteHandle(self, path)
        return h

    def note_ghosts(self, path: str, *ghosts) -> None:
        self.ghosts[path] = tuple(weakref.ref(g) for g in ghosts)

    def held_bytes(self) -> int:
        return sum(s.held_bytes() for s in self.stores.values()) + sum(
            t.held_bytes() for t in self.shared.values())


# ---- the operators' side ---------------------------------------------------------------------

def current() -> _Context:
    ctx = getattr(_TLS, "ctx", None)
    if ctx is None:
        raise KvfxStateError("kvfx: a kvfx operator ran outside a kvfx-compiled graph (no program "
                             "context); compile the model with model.compile(backend='kvfx', ...)")
    return ctx


def make_ghost(like: torch.Tensor, shape, handle: SiteHandle) -> torch.Tensor:
    """The model's cache entry: ``shape``, ``like``'s dtype and device, one NaN element; its
    storage carries ``handle``."""
    base = torch.full((1,), GHOST_VALUE, dtype=like.dtype, device=like.device)
    setattr(base.untyped_storage(), _ATTR, handle)
    return base.expand(*shape)


def ghost_fake(like: torch.Tensor, shape) -> torch.Tensor:
    return like.new_empty(1).expand(*shape)


def handle_of(t: torch.Tensor | None) -> SiteHandle | None:
    if t is None or not isinstance(t, torch.Tensor):
        return None
    return getattr(t.untyped_storage(), _ATTR, None)


def past_length(past: torch.Tensor | None):
    """Tokens in a cache entry (0 for None or the empty 1-D placeholder). Never ``int()``: under
    the fake implementations this is a symbolic size, and specializing it would recompile the
    graph at every decode step."""
    return 0 if past is None or past.dim() != 4 else past.shape[-2]


def find_store(ctx: _Context, sp: SiteProgram, past_k, past_v, B: int, make_store):
    """The store of site ``sp`` for this call's sequence: a new one when the model's cache is
    empty (prefill), else the one the ghosts of the previous step carry, after checking that the
    model's cache is exactly what kvfx handed back."""
    path = sp.info.module_path
    past_len = past_length(past_k)
    h = handle_of(past_k)
    if past_len == 0 and h is None:
        if past_k is not None and past_k.numel():
            raise KvfxStateError(f"kvfx: site {path}: the past keys have shape {tuple(past_k.shape)}; "
                                 "expected an empty cache or kvfx's own cache entry")
        seq = ctx.new_sequence
        if seq is None or path in seq.stores:
            seq = ctx.new_sequence = Sequence(ctx.session)
        store = seq.stores[path] = make_store(sp)
        return seq, store, 0
    if h is None:
        raise KvfxStateError(_foreign_message(path, past_k))
    if handle_of(past_v) is not h:
        raise KvfxStateError(f"kvfx: site {path}: the cached keys and values are not the pair kvfx "
                             "handed back (one of them was replaced or copied outside kvfx)")
    if h.path != path:
        raise KvfxStateError(f"kvfx: site {path} was given the cache entry of site {h.path}; the "
                             "model's cache layers were reordered or mixed")
    seq = h.sequence
    if seq.session is not ctx.session:
        raise KvfxStateError(
            f"kvfx: site {path}: this cache was made by another kvfx-compiled model or policy "
            f"({seq.session.label}), not by the one now running ({ctx.session.label}); each model "
            "continues only the caches it made: start a new cache for this model")
    store = h.store
    w = sp.info.window  # a sliding-window cache holds the last w tokens of what the store saw
    if (store.seen if w is None else min(store.seen, w)) != past_len or store.batch != B:
        what = ("cropped or rolled back (assisted decoding, `cache.crop`)" if past_len < store.seen
                else "extended outside kvfx" if store.batch == B
                else "given another batch size (beam or batch expansion, `batch_repeat_interleave`)")
        raise KvfxStateError(
            f"kvfx: site {path}: the model's cache reports {past_len} past tokens for batch {B}, the "
            f"kvfx store holds {store.seen} for batch {store.batch}: the cache was {what}. kvfx "
            "caches can only be continued as kvfx handed them back; start a new sequence with an "
            "empty cache.")
    return seq, store, past_len


def _foreign_message(path: str, past: torch.Tensor) -> str:
    if past.numel() and past.dtype.is_floating_point and bool(past.reshape(-1)[0].isnan()):
        return (f"kvfx: site {path}: the cache entry is a copy of a kvfx cache made outside kvfx "
                f"(shape {tuple(past.shape)}): beam search (`num_beams` > 1) and contrastive search "
                "reorder the cache with `index_select`, which kvfx's compressed cache does not "
                "support yet; use greedy or sampling decoding (`num_beams=1`)")
    return (f"kvfx: site {path}: the past cache ({past.shape[-2]} tokens) was not made by this kvfx "
            "model (a prefix cache from an uncompiled run or another library?). kvfx can only continue "
            "caches it made: run the prompt through the kvfx-compiled model from an empty cache")


# ---- reports ---------------------------------------------------------------------------------

def _model_params(model) -> list[torch.Tensor]:
    inner = getattr(model, "_orig_mod", model)
    return list(inner.parameters()) if isinstance(inner, torch.nn.Module) else []


def sessions(model=None) -> list[Session]:
    """The live sessions: every one, or those of ``model`` (an ``nn.Module`` compiled with kvfx)."""
    if model is None:
        return sorted(_SESSIONS, key=lambda s: s.label)
    out: list[Session] = []
    for p in _model_params(model):
        for s in (_BY_PARAM.get(p) or {}).values():
            if not any(s is o for o in out):
                out.append(s)
    return sorted(out, key=lambda s: s.label)


def programs() -> list[Program]:
    """The live programs (one per compiled graph that is still cached by dynamo)."""
    return sorted(_PROGRAMS, key=lambda p: p.id)


def sites(model=None) -> list[SiteInfo]:
    """Every attention site seen by the kvfx passes, in layer order: those of ``model``, or of
    every live compiled model (module paths then prefixed by the session label when several
    models are live, so two models' sites never mix)."""
    ss = sessions(model)
    if model is None and not any(s.programs for s in ss):  # compiled, no call yet: the graphs' sites
        return _merge_sites(programs())
    out = []
    ss = [s for s in ss if s.programs]
    for s in ss:
        for info in s.sites():
            if len(ss) > 1:
                info = SiteInfo(**{**vars(info), "module_path": f"{s.label}/{info.module_path}"})
            out.append(info)
    return out


def _storage_bytes(tensors) -> int:
    from kvfx.runtime.nbytes import storage_bytes  # wrapper subclasses (quanto's) included

    return storage_bytes(tensors)


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor reachable in a model's KV cache object (HF Cache, tuples, lists)."""
    out: list[torch.Tensor] = []
    stack, seen = [cache], set()
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif id(x) in seen or x is None or isinstance(x, (str, int, float, bool)):
            continue
        elif isinstance(x, (list, tuple)):
            seen.add(id(x))
            stack.extend(x)
        elif isinstance(x, dict):
            seen.add(id(x))
            stack.extend(x.values())
        elif hasattr(x, "__dict__"):
            seen.add(id(x))
            stack.extend(vars(x).values())
    return out


def _cache_entries(cache) -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor reachable in a cache object, the path naming how it was
    reached (``layers.3.keys`` in a Hugging Face cache, ``3.0`` in a tuple cache)."""
    out: list[tuple[str, torch.Tensor]] = []
    stack, seen = [("", cache)], set()
    while stack:
        path, x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append((path, x))
        elif id(x) in seen or x is None or isinstance(x, (str, int, float, bool)):
            continue
        elif isinstance(x, (list, tuple, dict)) or hasattr(x, "__dict__"):
            seen.add(id(x))
            items = (x.items() if isinstance(x, dict) else vars(x).items() if not isinstance(x, (list, tuple))
                     else enumerate(x))
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in items)
    return out


def _left_alone(cache, seqs) -> dict:
    """The cache tensors of layers kvfx left alone (no ghost), grouped by layer: ``{name: {"layer",
    "bytes", "tokens", "reason"}}``, named by the site of that layer when the passes saw one."""
    import re

    infos = {}
    for seq in seqs:
        for info in seq.session.sites():
            infos.setdefault(info.layer_index, info)
    groups: dict[int | None, list] = {}
    for path, t in _cache_entries(cache):
        if handle_of(t) is not None or t.dim() != 4 or not t.is_floating_point():
            continue
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
        groups.setdefault(int(m.group(1)) if m else None, []).append(t)
    out = {}
    for layer, ts in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        info = infos.get(layer)
        name = info.module_path if info is not None and not info.rewritten else (
            f"cache layer {layer}" if layer is not None else "cache (unattributed)")
        out[name] = {"layer": layer, "bytes": _storage_bytes(ts),
                     "fp16_bytes": sum(t.numel() * 2 for t in ts),
                     "tokens": max(t.shape[-2] for t in ts),
                     "reason": info.reason if info is not None and not info.rewritten else ""}
    return out


def _coverage(seqs, left: dict | None, held_total: int) -> str:
    """One line: how many sites the policy applies to, and what the others hold."""
    infos = {}
    for seq in seqs:
        for info in seq.session.sites():
            infos[info.module_path] = info
    n, rw = len(infos), sum(i.rewritten for i in infos.values())
    if not n or rw == n:
        return f"policy applied to {rw} of {n} layers" if n else ""
    line = f"policy applied to {rw} of {n} layers"
    if left is None:
        return (f"{line}; the other {n - rw} are left alone and not counted here (pass the model's "
                "cache to kvfx.memory to count them)")
    frac = sum(e["bytes"] for e in left.values()) / held_total if held_total else float("nan")
    return f"{line}; the other {n - rw} (left alone, uncompressed) hold {frac:.2f} of the cache"


def sequences_of_cache(cache) -> list[Sequence]:
    out: list[Sequence] = []
    for t in cache_tensors(cache):
        h = handle_of(t)
        if h is not None and not any(h.sequence is s for s in out):
            out.append(h.sequence)
    return out


def memory(cache=None, model=None, all_ranks: bool = False) -> dict:
    """Bytes held for KV, per rewritten site and in total, against the dense equivalent.

    Args:
        cache: the model's own cache object (``past_key_values``): exactly that sequence is
            measured, and the cache's own tensors are reported as ``model_cache_bytes`` (this
            includes layers kvfx left alone).
        model: a kvfx-compiled model: every live sequence of that model (caches not yet freed).
        Neither: every live sequence of every compiled model (sites prefixed by the model's
            label when several are live).
        Without ``cache``, a garbage collection runs first (caches in reference cycles, as Hugging
        Face's generate outputs are, count only while they are reachable); it costs ~0.1-0.2 s.
    Returns:
        ``{"sites": {path: {...}}, "held_bytes", "dense_bytes", "dense_fp16_bytes",
        "model_cache_bytes", "store_bytes", "shared_bytes", "ratio", "ratio_fp16", "sequences"}``;
        dense bytes are for every token seen, in the model's dtype (``dense_bytes``) and in fp16
        (``dense_fp16_bytes``). ``shared_bytes`` (state several sites of a sequence share, e.g.
        the RoPE table of low-rank sites) is part of ``store_bytes``, counted once.
        ``peak_store_bytes``: the sum of each store's high-water mark of held bytes over the
        sequence (a prompt chunk's tokens before they are compressed included; per site:
        ``peak_bytes``): an upper bound of the stores' joint peak.
        With ``cache``, layers kvfx left alone (sliding-window layers, sites a policy skips) hold
        their own uncompressed tensors: they are listed in ``left_alone`` (``{site: {"layer",
        "bytes", "fp16_bytes", "tokens", "reason"}}``, total ``left_alone_bytes``) and counted in
        both ``held_bytes`` and ``dense_bytes``, so ``ratio`` covers every layer of the model.
        Without ``cache`` they cannot be seen (``left_alone`` is None) and the dense bytes cover
        the rewritten sites only. ``summary``: one line saying how many layers the policy applies
        to and what the others hold (e.g. "policy applied to 3 of 18 layers; the other 15 (left
        alone, uncompressed) hold 0.56 of the cache").
        Under tensor parallelism (a ``torch.distributed`` process group is initialized) every
        count is this rank's: it holds the stores of its own KV heads. ``rank`` and ``world_size``
        say which; ``all_ranks=True`` (every rank must call it: a collective) adds ``all_ranks``,
        the byte counts summed over ranks (see :func:`kvfx.distributed.all_ranks_memory`).
    """
    if cache is not None:
        seqs = sequences_of_cache(cache)
    else:  # caches that are garbage but in a reference cycle (HF outputs are) are not live
        import gc

        gc.collect()
        seqs = [q for s in sessions(model) for q in list(s.sequences)]
    labels = {id(s.session) for s in seqs}
    sites, store_total, dense_total, dense16_total, shared_total = {}, 0, 0, 0, 0
    ghosts = []
    peak_total = 0  # the sum of each store's high-water mark (an upper bound of the joint peak)
    for seq in seqs:
        prefix = f"{seq.session.label}/" if len(labels) > 1 else ""
        ghosts += [g for refs in seq.ghosts.values() for g in (r() for r in refs) if g is not None]
        for path, st in seq.stores.items():
            if st.empty:
                continue
            # dense equivalent: what the model's own cache would hold (a window cache: the window)
            seen = st.seen if getattr(st, "window", None) is None else min(st.seen, st.window)
            per_token = seen * st.batch * st.kv_heads * sum(st.head_dims())
            dense = per_token * st.dtype.itemsize
            held = st.held_bytes()
            e = sites.setdefault(prefix + path, {
                "held_bytes": 0, "kv_bytes": 0, "calib_bytes": 0, "dense_bytes": 0,
                "dense_fp16_bytes": 0, "tokens_seen": 0, "tokens_held": 0, "tokens_held_mean": 0.0, "capacity": 0,
                "sequences": 0, "policy": _policy_of(seq.session, path)})
            for k, val in (("held_bytes", held), ("kv_bytes", st.kv_bytes()), ("calib_bytes", st.calib_bytes()),
                           ("dense_bytes", dense), ("dense_fp16_bytes", per_token * 2),
                           ("tokens_seen", st.seen), ("tokens_held", st.tokens_held()),
                           ("tokens_held_mean", st.tokens_held_mean()),
                           ("capacity", st.capacity), ("sequences", 1),
                           ("peak_bytes", max(getattr(st, "peak_bytes", 0), held))):
                e[k] = e.get(k, 0) + val
            peak_total += max(getattr(st, "peak_bytes", 0), held)
            store_total += held
            dense_total += dense
            dense16_total += per_token * 2
        shared_total += sum(t.held_bytes() for t in seq.shared.values())
    store_total += shared_total
    model_bytes = _storage_bytes(cache_tensors(cache) if cache is not None else ghosts)
    held_total = store_total + model_bytes
    # layers kvfx left alone hold their own dense cache: counted in held *and* dense, so the ratio
    # covers the same layers on both sides (without the cache they cannot be seen: see "summary")
    left = _left_alone(cache, seqs) if cache is not None else None
    dense_total += sum(e["bytes"] for e in (left or {}).values())
    dense16_total += sum(e["fp16_bytes"] for e in (left or {}).values())
    out = {
        "sites": sites, "store_bytes": store_total, "shared_bytes": shared_total,
        "peak_store_bytes": peak_total + shared_total,
        "left_alone": left, "left_alone_bytes": sum(e["bytes"] for e in left.values()) if left is not None else None,
        "summary": _coverage(seqs, left, held_total),
        "model_cache_bytes": model_bytes, "sequences": len(seqs),
        "held_bytes": held_total, "dense_bytes": dense_total, "dense_fp16_bytes": dense16_total,
        "ratio": held_total / dense_total if dense_total else float("nan"),
        "ratio_fp16": held_total / dense16_total if dense16_total else float("nan"),
    }
    from kvfx.runtime import ranks  # tensor parallelism: this rank's counts, and on request all ranks'

    out.update(rank=ranks.rank(), world_size=ranks.world_size())
    if all_ranks:
        out["all_ranks"] = ranks.all_ranks_memory(out)
    return out


def _policy_of(session: Session, path: str) -> str:
    for p in session.programs:
        for sp in p.sites:
            if sp.info.module_path == path:
                return sp.info.policy
    return ""


def site_stores(cache) -> dict[str, object]:
    """``{module path: store}`` of the sequence(s) whose ghosts ``cache`` holds (the model's cache
    object as returned by the model or by ``generate(..., return_dict_in_generate=True)``)."""
    return {p: st for q in sequences_of_cache(cache) for p, st in q.stores.items()}


class tapping:
    """``with tapping(model, fn):`` every kvfx attention call of ``model`` (sessions made during
    the block included) also calls ``fn(info, q, k, v, mask, past_len, scale, is_causal, out)``
    (``kvfx calib-error`` records a full-cache run with it)."""

    def __init__(self, model, fn):
        self.params, self.fn = _model_params(model), fn

    def __enter__(self):
        for p in self.params:
            _TAPS[p] = self.fn
        return self

    def __exit__(self, *exc):
        for p in self.params:
            _TAPS.pop(p, None)


def reset() -> None:
    """Forget the site reports of every compiled model (they fill again from the models' next
    calls). Live sequences and compiled models are not affected: their state belongs to their
    caches and models."""
    for s in list(_SESSIONS):
        s.programs = []
    _PROGRAMS.clear()


# Weak indexes of live objects (they own nothing: each entry dies with its object).
_TLS = threading.local()
_PROGRAMS: weakref.WeakSet[Program] = weakref.WeakSet()
_SESSIONS: weakref.WeakSet[Session] = weakref.WeakSet()
_BY_PARAM: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> {policy hash: Session}
_TAPS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> tap function
