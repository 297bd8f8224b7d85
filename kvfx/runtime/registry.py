"""Process-wide registry: every attention site the passes saw, and the store of each
rewritten one.

A site key is ``"<namespace>/<module path>"``: the namespace identifies one ``torch.compile``
call (its options), the module path comes from ``nn_module_stack``. Prefill and decode graphs,
and recompiles, of the same compiled model therefore map to the same store.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from kvfx.runtime.qstore import QuantStore
from kvfx.runtime.store import SiteStore


@dataclass
class SiteInfo:
    """One attention site as the passes saw it (``kvfx.sites()`` lists these)."""

    key: str
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


@dataclass
class Binding:
    """What the runtime needs for a rewritten site."""

    info: SiteInfo
    compressor: object
    store: SiteStore | QuantStore
    ghosts: list = field(default_factory=list)  # weakrefs to the ghost tensors handed back


def make_store(key: str, compressor) -> SiteStore | QuantStore:
    """The store a compressor writes: quantized when its layer policy has ``quant:``."""
    if getattr(compressor, "lowrank", False):  # ReCalKV latents (kvfx.runtime.lowrank)
        from kvfx.runtime.lowrank import LatentStore

        return LatentStore(key, compressor.kv_heads, compressor.head_dim, compressor.quant)
    quant = getattr(compressor, "quant", None)
    return SiteStore(key) if quant is None else QuantStore(key, quant)


class Registry:
    def __init__(self):
        self.sites: dict[str, SiteInfo] = {}
        self.bindings: dict[str, Binding] = {}
        self.shared: dict[str, object] = {}  # state shared by sites (low-rank RoPE tables), by key

    def add_site(self, info: SiteInfo, compressor=None) -> None:
        old = self.sites.get(info.key)
        if old is not None:
            info.graphs = old.graphs + 1
        self.sites[info.key] = info
        if info.rewritten:
            quant = getattr(compressor, "quant", None)
            b = self.bindings.get(info.key)
            lowrank = bool(getattr(compressor, "lowrank", False))
            if (b is not None and getattr(b.store, "cfg", None) == quant
                    and hasattr(b.store, "lat") == lowrank):
                b.info, b.compressor = info, compressor
            else:
                self.bindings[info.key] = Binding(info, compressor, make_store(info.key, compressor))

    def binding(self, key: str) -> Binding:
        try:
            return self.bindings[key]
        except KeyError:
            raise RuntimeError(f"kvfx: no store for site {key!r}; was kvfx.reset() called while "
                               "a compiled model is still in use? Recompile the model.") from None

    def note_ghost(self, key: str, t: torch.Tensor) -> None:
        b = self.bindings.get(key)
        if b is not None:
            b.ghosts = [r for r in b.ghosts if r() is not None][-1:] + [weakref.ref(t)]


REGISTRY = Registry()


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


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


def memory(cache=None) -> dict:
    """Bytes held for KV, per rewritten site and in total, against the dense equivalent.

    Args:
        cache: optionally the model's own cache object (e.g. ``past_key_values`` or
            ``outputs.past_key_values``); its tensors are measured directly and reported as
            ``model_cache_bytes`` (this includes sites kvfx left alone). Without it, the
            model-side bytes are those of the ghost tensors kvfx handed back.
    Returns:
        ``{"sites": {path: {...}}, "held_bytes", "dense_bytes", "dense_fp16_bytes",
        "model_cache_bytes", "store_bytes", "shared_bytes", "ratio", "ratio_fp16"}``; dense bytes are
        for every token seen, in the model's dtype (``dense_bytes``) and in fp16
        (``dense_fp16_bytes``). ``shared_bytes`` (state several sites share, e.g. the RoPE table of
        low-rank sites) is part of ``store_bytes``, counted once.
    """
    sites, store_total, dense_total, ghost_total, dense16_total = {}, 0, 0, 0, 0
    for key, b in REGISTRY.bindings.items():
        st = b.store
        if st.empty:
            continue
        ghosts = [r() for r in b.ghosts if r() is not None]
        ghost_bytes = _storage_bytes(ghosts)
        per_token = st.seen * st.batch * st.kv_heads * sum(st.head_dims())
        dense = per_token * st.dtype.itemsize
        held = st.held_bytes()
        sites[b.info.module_path] = {
            "held_bytes": held, "kv_bytes": st.kv_bytes(), "ghost_bytes": ghost_bytes,
            "calib_bytes": st.calib_bytes(),
            "dense_bytes": dense, "dense_fp16_bytes": per_token * 2, "tokens_seen": st.seen,
            "tokens_held": st.tokens_held(), "capacity": st.capacity, "policy": b.info.policy,
        }
        store_total += held
        ghost_total += ghost_bytes
        dense_total += dense
        dense16_total += per_token * 2
    shared_total = sum(t.held_bytes() for t in REGISTRY.shared.values())  # each counted once
    store_total += shared_total
    model_bytes = _storage_bytes(cache_tensors(cache)) if cache is not None else ghost_total
    held_total = store_total + model_bytes
    return {
        "sites": sites, "store_bytes": store_total, "shared_bytes": shared_total,
        "model_cache_bytes": model_bytes,
        "held_bytes": held_total, "dense_bytes": dense_total, "dense_fp16_bytes": dense16_total,
        "ratio": held_total / dense_total if dense_total else float("nan"),
        "ratio_fp16": held_total / dense16_total if dense16_total else float("nan"),
    }


def sites() -> list[SiteInfo]:
    """Every attention site seen by the kvfx passes, in layer order."""
    return sorted(REGISTRY.sites.values(), key=lambda s: (s.key.split("/")[0], s.layer_index, s.key))


def reset() -> None:
    """Forget all sites and stores (compiled models must be recompiled afterwards)."""
    REGISTRY.sites.clear()
    REGISTRY.bindings.clear()
    REGISTRY.shared.clear()
