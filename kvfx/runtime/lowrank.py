"""Runtime of low-rank (ReCalKV) sites: a store of per-token latents and its operator.

``kvfx::lowrank_attention(q, x_k, w_k, x_v, w_v, cos, sin, mask, past_k, past_v, site, rope_key, scale,
is_causal, heads, head_dim) -> (out, ghost_k, ghost_v)``
    q (B, Hq, nq, d) after RoPE; x_k, x_v (B, nq, D) the *inputs* of k_proj / v_proj for the new
    tokens and w_k, w_v their weights (the rewrite removed k_proj, v_proj and the keys' RoPE from
    the graph); cos, sin (B | 1, 1, nq, d) the RoPE tables of the new tokens as the model applies
    them; heads, head_dim the KV geometry; past_k / past_v and site as for ``kvfx::attention``
    (:mod:`kvfx.runtime.ops`): the ghosts it returns have the (B, heads, T, head_dim) logical shape.
    Prefill (past_len 0): the exact keys and values (x·Wᵀ, RoPE) for exact attention on the prompt
    as the model asked, then the latents of the kept tokens are stored (the policy's evictor
    chooses them, :class:`kvfx.runtime.compressor.LowRankCompressor`). Decode: the new tokens'
    latents x·W_downᵀ are appended (k_proj / v_proj never run), and attention reads the latents:
    keys rebuilt and re-rotated at their own positions, values up-projected once per query
    (:mod:`kvfx.methods.lowrank_attention`); on CUDA the latent decode kernel does this in
    registers (one query, no mask, no attention row needed), else the PyTorch reference.

Layout:

    LatentStore.lat   a SiteStore with one "head": k (B, 1, cap, r_k), v (B, 1, cap, r_v) latents,
                      pos (B, 1, cap) logical positions, count (B, 1); or, with ``quant:``, a
                      QuantStore of the same one-head geometry (latents in low bit)
    RopeTable         cos, sin (B, cap, d) by logical position, shared by every site of a sequence
                      whose RoPE comes from the same place (e.g. ``model.rotary_emb``): held once
                      per sequence (``Sequence.shared``), counted once by :func:`kvfx.memory`

Every site writes the rows of the positions it sees (all sites sharing a table write equal rows),
so a site only ever reads rows written during its own sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.methods.lowrank import project_kv
from kvfx.methods.lowrank_attention import latent_attention_reference, latent_quant_attention_reference
from kvfx.runtime.attention import _use_kernel, positions_mask
from kvfx.runtime.lifecycle import check_continues, decode_step, prefill_step
from kvfx.runtime.qstore import QuantStore
from kvfx.runtime.state import KvfxStateError, current, find_store, ghost_fake, make_ghost, past_length
from kvfx.runtime.store import SiteStore, _round_up

_GROW = 64


class RopeTable:
    """cos / sin rows (B, cap, d) by logical position; ``length`` rows are filled (host int)."""

    def __init__(self, key: str):
        self.key = key
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None
        self.length = 0

    def write(self, cos: Tensor, sin: Tensor, start: int, batch: int) -> None:
        """Rows start .. start + n from cos / sin (B | 1, 1, n, d)."""
        n, d = cos.shape[-2], cos.shape[-1]
        if start > self.length or (start and (self.cos is None or self.cos.shape[0] != batch)):
            raise KvfxStateError(f"kvfx: RoPE table {self.key} holds {self.length} positions, a site "
                                 f"wrote position {start} for batch {batch}: the sites sharing it are out "
                                 "of step; start a new sequence with an empty cache")
        if self.cos is None or self.cos.shape[0] != batch or self.cos.shape[1] < start + n \
                or self.cos.dtype != cos.dtype:
            cap = _round_up(start + n + _GROW, 16)
            new_c = cos.new_zeros(batch, cap, d)
            new_s = sin.new_zeros(batch, cap, d)
            if start:
                new_c[:, :start] = self.cos[:, :start]
                new_s[:, :start] = self.sin[:, :start]
            self.cos, self.sin = new_c, new_s
        self.cos[:, start:start + n] = cos.expand(batch, 1, n, d)[:, 0]
        self.sin[:, start:start + n] = sin.expand(batch, 1, n, d)[:, 0]
        self.length = start + n

    def rows(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, 1, n, d) at logical positions pos (B, n) (-1: any row)."""
        idx = pos.clamp(min=0)[..., None].expand(*pos.shape, self.cos.shape[-1])
        return self.cos.gather(1, idx)[:, None], self.sin.gather(1, idx)[:, None]

    def held_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.cos, self.sin) if t is not None)


class LatentStore:
    """The store of a low-rank site: latents instead of keys and values (see the module doc).
    Exposes the dense geometry (``kv_heads``, ``head_dims``) for :func:`kvfx.memory`."""

    def __init__(self, site_id: str, kv_heads: int, head_dim: int, quant=None):
        self.site_id = site_id
        self.cfg = quant  # the latents' quantization (a QuantConfig), or None
        self.lat = SiteStore(site_id) if quant is None else QuantStore(site_id, quant)
        self.kv_heads, self.head_dim = kv_heads, head_dim
        # what the latent store inherits from its inner store (no CaliDrop: it needs exact keys)
        self.CAPS = frozenset({"latent"}) | (self.lat.CAPS - {"calibration"})
        self.table: RopeTable | None = None

    def reset(self) -> None:
        self.lat.reset()
        self.table = None

    seen = property(lambda self: self.lat.seen, lambda self, n: setattr(self.lat, "seen", n))
    batch = property(lambda self: self.lat.batch)
    dtype = property(lambda self: self.lat.dtype)
    capacity = property(lambda self: self.lat.capacity)
    empty = property(lambda self: self.lat.empty)

    def head_dims(self) -> tuple[int, int]:
        return self.head_dim, self.head_dim

    def append(self, zk: Tensor, zv: Tensor, positions: Tensor) -> None:
        self.lat.append(zk, zv, positions)

    def attend_step(self, c, q, mask, is_causal: bool, past_len: int, scale):
        return _attend(c, self, self.table, q, mask, is_causal, past_len, scale)

    def finish_step(self, c, nq: int, probs) -> None:
        if "quantized" in self.lat.CAPS:
            self.lat.flush()
        else:
            c.after_decode(self.lat, nq, probs)

    def held_bytes(self) -> int:
        """Latents, positions and counters (the shared RoPE table is counted once, elsewhere)."""
        return self.lat.held_bytes()

    def kv_bytes(self) -> int:
        """Bytes of the latent buffers (what replaces the K/V buffers)."""
        return self.lat.kv_bytes()

    def calib_bytes(self) -> int:
        return 0

    def tokens_held(self) -> int:
        return self.lat.tokens_held()

    def tokens_held_mean(self) -> float:
        return self.lat.tokens_held_mean()


def _new_latent_store(sp) -> LatentStore:
    c = sp.compressor
    return LatentStore(sp.info.module_path, c.kv_heads, c.head_dim, c.quant)


def _ghost_shape(x: Tensor, past: Tensor | None, heads: int, head_dim: int) -> list:
    return [x.shape[0], heads, past_length(past) + x.shape[1], head_dim]


@torch.library.custom_op("kvfx::lowrank_attention", mutates_args=())
def lowrank_attention(q: Tensor, x_k: Tensor, w_k: Tensor, x_v: Tensor, w_v: Tensor, cos: Tensor, sin: Tensor,
                      mask: Tensor | None, past_k: Tensor | None, past_v: Tensor | None, site: int, rope_key: str,
                      scale: float | None, is_causal: bool, heads: int,
                      head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    ctx = current()
    sp = ctx.program.sites[site]
    seq, store, past_len = find_store(ctx, sp, past_k, past_v, q.shape[0], _new_latent_store)
    table = seq.shared.get(rope_key)
    if table is None:
        table = seq.shared[rope_key] = RopeTable(rope_key)
    out = lowrank_site_attention(sp.compressor, store, table, q, x_k, w_k, x_v, w_v, cos, sin, mask,
                                 past_len, scale, is_causal, sp.info.module_path)
    h = seq.handle(sp.info.module_path)
    shape = _ghost_shape(x_k, past_k, heads, head_dim)
    gk, gv = make_ghost(x_k, shape, h), make_ghost(x_v, shape, h)
    seq.note_ghosts(sp.info.module_path, gk, gv)
    return out, gk, gv


@lowrank_attention.register_fake
def _(q, x_k, w_k, x_v, w_v, cos, sin, mask, past_k, past_v, site, rope_key, scale, is_causal, heads, head_dim):
    shape = _ghost_shape(x_k, past_k, heads, head_dim)
    return (q.new_empty(*q.shape[:-1], w_v.shape[0] // heads), ghost_fake(x_k, shape), ghost_fake(x_v, shape))


def _attend(c, store: LatentStore, table: RopeTable, q, mask, is_causal: bool, past_len: int, scale):
    """Decode attention over the latents (after the step's tokens were appended): (out, probs over
    the store slots or None)."""
    lat, H = store.lat, store.kv_heads
    B, Hq, nq, d = q.shape
    sm = scale if scale is not None else d ** -0.5
    qk, qv = c.basis(q.device)
    if "quantized" in lat.CAPS:
        pos = lat.positions()[:, 0]
        bias = None
        if mask is not None or (is_causal and nq > 1):
            keep = positions_mask(pos[:, None].expand(B, H, pos.shape[1]), mask, is_causal, nq, past_len, Hq // H)
            bias = keep.float() if keep.dtype != torch.bool else torch.zeros(
                keep.shape, device=q.device).masked_fill(~keep, float("-inf"))
        o, _ = latent_quant_attention_reference(q, lat.view(), pos, table.cos, table.sin, qk, qv, scale=sm, bias=bias)
        return o, None
    n = lat.length
    pos = lat.pos[:, 0, :n]
    keep = None
    if mask is not None or lat.ragged or (is_causal and nq > 1):
        keep = positions_mask(pos[:, None].expand(B, H, n), mask, is_causal, nq, past_len, Hq // H)
    lengths = lat.count[:, 0]
    if keep is None and nq == 1 and not c.needs_probs and _use_kernel(q):
        from kvfx.templates.launch_lowrank import latent_decode_attention

        o, _ = latent_decode_attention(q, lat.k[:, 0], lat.v[:, 0], lengths, lat.pos[:, 0], table.cos, table.sin,
                                       qk, qv, scale=sm)
        return o, None
    res = latent_attention_reference(q, lat.k[:, 0, :n], lat.v[:, 0, :n], lengths, pos, table.cos, table.sin,
                                     qk, qv, scale=sm, bias=keep, return_probs=c.needs_probs)
    return res[0], (res[2] if c.needs_probs else None)


def lowrank_site_attention(c, store: LatentStore, table: RopeTable, q, x_k, w_k, x_v, w_v, cos, sin, mask,
                           past_len: int, scale, is_causal: bool, where: str = "") -> Tensor:
    """One call of a low-rank site (compressor ``c``: :class:`kvfx.runtime.compressor.LowRankCompressor`)."""
    B = q.shape[0]
    if past_len == 0:
        k_pre, k, v = project_kv(x_k, w_k, x_v, w_v, store.kv_heads, store.head_dim, cos, sin)
        with torch.no_grad():
            table.write(cos, sin, 0, B)
            zk, zv = c.latents(k_pre, v)
        out = prefill_step(c, store, q, k, v, mask, scale, is_causal, latents=(zk, zv))
        store.table = table
        return out
    check_continues(store, past_len, B, where)
    with torch.no_grad():
        table.write(cos, sin, past_len, B)
        zk, zv = c.project(x_k, w_k, x_v, w_v)  # the step's latents: what the store appends
    return decode_step(c, store, q, zk, zv, mask, past_len, scale, is_causal, where)


__all__ = ["LatentStore", "RopeTable", "lowrank_attention", "lowrank_site_attention"]
