"""Runtime of low-rank (ReCalKV) sites: a store of per-token latents and its operator.

``kvfx::lowrank_attention(q, k, v, cos, sin, mask, past_len, site, rope_key, scale, is_causal)``
    q (B, Hq, nq, d); k, v (B, Hkv, nq, d) the *new* tokens, k after RoPE (k = rope(k_pre, cos,
    sin)); cos, sin (B | 1, 1, nq, d) the RoPE tables of those tokens as the model applied them.
    Prefill (past_len 0): exact attention on the prompt as the model asked, then the latents of
    the prompt are stored. Decode: the new tokens' latents are appended, every key and value is
    rebuilt from its latent (keys re-rotated at their own positions) and attention runs over them.
    Rebuilding is the PyTorch path on every device (SDPA); there is no Triton kernel for it.

Layout:

    LatentStore.lat   a SiteStore with one "head": k (B, 1, cap, r_k), v (B, 1, cap, r_v) latents,
                      pos (B, 1, cap) logical positions, count (B, 1)
    RopeTable         cos, sin (B, cap, d) by logical position, shared by every site whose RoPE
                      comes from the same place (e.g. ``model.rotary_emb``): held once, counted
                      once by :func:`kvfx.memory` (REGISTRY.shared)

Every site writes the rows of the positions it sees (all sites sharing a table write equal rows),
so a site only ever reads rows written during its own sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.methods.compressor import Compressor
from kvfx.methods.lowrank import rope, unrope
from kvfx.runtime.attention import KvfxStateError, key_valid, positions_mask, prefill_attention, sdpa
from kvfx.runtime.registry import REGISTRY
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

    def __init__(self, site_id: str, kv_heads: int, head_dim: int):
        self.site_id = site_id
        self.lat = SiteStore(site_id)
        self.kv_heads, self.head_dim = kv_heads, head_dim
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


def rope_table(key: str) -> RopeTable:
    t = REGISTRY.shared.get(key)
    if t is None:
        t = REGISTRY.shared[key] = RopeTable(key)
    return t


@torch.library.custom_op("kvfx::lowrank_attention", mutates_args=())
def lowrank_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                      past_len: int, site: str, rope_key: str, scale: float | None,
                      is_causal: bool) -> Tensor:
    b = REGISTRY.binding(site)
    return lowrank_site_attention(b.compressor, b.store, rope_table(rope_key), q, k, v, cos, sin, mask,
                                  past_len, scale, is_causal, b.info.module_path)


@lowrank_attention.register_fake
def _(q, k, v, cos, sin, mask, past_len, site, rope_key, scale, is_causal):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def lowrank_site_attention(c, store: LatentStore, table: RopeTable, q, k, v, cos, sin, mask,
                           past_len: int, scale, is_causal: bool, where: str = "") -> Tensor:
    """One call of a low-rank site (compressor ``c``: :class:`kvfx.methods.lowrank.LowRankCompressor`)."""
    B, Hq, nq, _ = q.shape
    if past_len == 0:
        store.reset()
        store.table = table
        out, _ = prefill_attention(q, k, v, mask, scale=scale, is_causal=is_causal)
        with torch.no_grad():
            table.write(cos, sin, 0, B)
            zk, zv = c.latents(unrope(k, cos, sin), v)
            # the full policy's prefill: every valid (non-pad) token, in order
            Compressor.prefill(c, store.lat, q, zk, zv, key_valid(mask, B, nq, q.device))
        store.seen = nq
        return out.contiguous()
    if store.seen != past_len or store.batch != B or store.table is not table:
        raise KvfxStateError(
            f"kvfx: site {where}: the model's cache reports {past_len} past tokens for batch {B}, the "
            f"kvfx low-rank store has {store.seen} for batch {store.batch}"
            + ("" if store.table is table else " and another RoPE table") + ". kvfx does not support "
            "cropping or reordering the cache; start a new sequence with an empty cache.")
    with torch.no_grad():
        table.write(cos, sin, past_len, B)
        zk, zv = c.latents(unrope(k, cos, sin), v)
        lat = store.lat
        lat.append(zk, zv, torch.arange(past_len, past_len + nq, device=q.device))
        n = lat.length
        pos = lat.pos[:, 0, :n]
        k_pre, v_hat = c.expand(lat.k[:, :, :n], lat.v[:, :, :n])
        rc, rs = table.rows(pos)
        k_hat = rope(k_pre, rc, rs).to(q.dtype)
        keep = None
        if mask is not None or lat.ragged or (is_causal and nq > 1):
            H = store.kv_heads
            keep = positions_mask(pos[:, None].expand(B, H, n), mask, is_causal, nq, past_len, Hq // H)
        out = sdpa(q, k_hat, v_hat, keep, scale=scale)
    store.seen += nq
    return out.contiguous()


__all__ = ["LatentStore", "RopeTable", "lowrank_attention", "lowrank_site_attention", "rope_table"]
