"""Low-rank KV cache (ReCalKV factors): what a site keeps per token, and how keys come back.

Notation per layer: Hkv KV heads of dim d, m = Hkv·d, x (.., D) the input of k_proj / v_proj,
W (m, D), an artifact's factors W ≈ L R with L (m, r), R (r, D) (:mod:`kvfx.methods.recalkv`).

The cache stores, per token, a latent of width r instead of the m key (and m value) numbers and
rebuilds the keys as latent·basisᵀ, then applies RoPE at the token's position.

[Note] Which latent. ReCalKV builds R = pinv(L)·W (the whitened SVD: R = Σ^{1/2} V_rᵀ S⁻¹ =
Σ^{-1/2} U_rᵀ W = pinv(L) W; the OVC step sets R ← pinv(L) W explicitly; pinv of a block-diagonal
L is block diagonal, so HSR groups too). So its reconstruction x Rᵀ Lᵀ = (x Wᵀ) pinv(L)ᵀ Lᵀ is the
orthogonal projection of the pre-RoPE key k = x Wᵀ onto span(L). With Q (m, r) an orthonormal
basis of span(L) (QR of L in float64), the latent z = k Q (= x (T R)ᵀ for the invertible
T = Q⁺ L, the same r numbers per token up to a change of basis) rebuilds z Qᵀ = x Rᵀ Lᵀ exactly,
and Q is perfectly conditioned where pinv(L) may not be. This lets the runtime take the latent
from the model's own (pre-RoPE) keys without moving k_proj out of the graph. The keys the graph
hands over are post-RoPE: RoPE rotates each pair (i, i + d/2) by a 2x2 matrix built from
cos / sin, inverted exactly by :func:`unrope`.

Example::

    c = LowRankCompressor(factors[3], layer=3, artifact="f.safetensors")
    zk, zv = c.latents(unrope(k, cos, sin), v)        # (B, 1, n, r_k), (B, 1, n, r_v)
    k_pre, v_hat = c.expand(zk, zv)                    # (B, Hkv, n, d) each
    k_hat = rope(k_pre, cos, sin)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvfx.methods.compressor import Compressor
from kvfx.methods.recalkv import LayerFactors, LowRank

__all__ = ["LowRankCompressor", "build_lowrank", "latent_basis", "load_factors", "rope", "rotate_half",
           "unrope"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim (Hugging Face ``rotate_half``)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, the same expression (and so the same rounding) as the model."""
    return x * cos + rotate_half(x) * sin


def unrope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The x with ``rope(x, cos, sin) == y``: per pair (a, b) = (y_i, y_{i+h}),
    [a; b] = [[c1, -s1], [s2, c2]] [x1; x2], so x1 = (c2 a + s1 b)/det, x2 = (c1 b - s2 a)/det with
    det = c1 c2 + s1 s2 (1 for plain RoPE, attention_scaling² for scaled variants). float32 at least."""
    dt = torch.promote_types(y.dtype, torch.float32)
    y, cos, sin = y.to(dt), cos.to(dt), sin.to(dt)
    h = y.shape[-1] // 2
    a, b = y[..., :h], y[..., h:]
    c1, c2, s1, s2 = cos[..., :h], cos[..., h:], sin[..., :h], sin[..., h:]
    det = c1 * c2 + s1 * s2
    return torch.cat(((c2 * a + s1 * b) / det, (c1 * b - s2 * a) / det), dim=-1)


def latent_basis(f: LowRank) -> torch.Tensor:
    """Q (m, r) float32: orthonormal basis of span(L) (see the module note)."""
    q, _ = torch.linalg.qr(f.L.to("cpu", torch.float64))
    return q.to(torch.float32)


_FACTORS: dict[tuple, dict[int, LayerFactors]] = {}


def load_factors(path: str) -> dict[int, LayerFactors]:
    """The factors of a ReCalKV artifact, loaded once per (file, size, mtime).

    Raises:
        kvfx.calibrate.ArtifactError: missing or invalid file (the message names the fix).
    """
    from kvfx.calibrate import load_artifact

    p = Path(os.path.expanduser(path)).resolve()
    st = p.stat() if p.is_file() else None
    key = (str(p), st.st_size if st else None, st.st_mtime_ns if st else None)
    if key not in _FACTORS:
        _FACTORS[key] = load_artifact(p).factors
    return _FACTORS[key]


class LowRankCompressor(Compressor):
    """Keep every token, as a latent of width r_k (keys) + r_v (values) instead of 2·Hkv·d.

    ``factors`` None: the artifact has no factors for this layer (the pass leaves the site alone).
    """

    name = "lowrank"
    lowrank = True  # the passes rewrite such sites onto kvfx::lowrank_attention

    def __init__(self, factors: LayerFactors | None, *, layer: int, artifact: str):
        self.factors, self.layer, self.artifact = factors, layer, artifact
        self._basis: dict = {}
        if factors is not None:
            self.kv_heads = factors.k.L.shape[0] // factors.k.head_dim
            self.head_dim = factors.k.head_dim
            self.ranks = (factors.k.rank, factors.v.rank)

    def basis(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_k (m, r_k), Q_v (m, r_v)) float32 on ``device``."""
        key = str(device)
        if key not in self._basis:
            self._basis[key] = (latent_basis(self.factors.k).to(device),
                                latent_basis(self.factors.v).to(device))
        return self._basis[key]

    def latents(self, k_pre: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values (B, Hkv, n, d) -> latents (B, 1, n, r_k), (B, 1, n, r_v), in v's
        dtype (one latent row per token, shared by all heads)."""
        qk, qv = self.basis(v.device)
        B, H, n, d = v.shape
        flat = lambda t: t.transpose(1, 2).reshape(B, n, H * d).float()  # row h·d + j
        return (flat(k_pre) @ qk).to(v.dtype)[:, None], (flat(v) @ qv).to(v.dtype)[:, None]

    def expand(self, zk: torch.Tensor, zv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, 1, n, r) -> pre-RoPE keys and values (B, Hkv, n, d) in the latents' dtype."""
        qk, qv = self.basis(zk.device)
        B, _, n, _ = zk.shape
        H, d = self.kv_heads, self.head_dim
        heads = lambda z, q: (z[:, 0].float() @ q.mT).to(z.dtype).view(B, n, H, d).transpose(1, 2)
        return heads(zk, qk), heads(zv, qv)


def build_lowrank(lp, layer: int) -> LowRankCompressor:
    """The compressor of a layer policy with ``lowrank:``; raises ``NotImplementedError`` for
    combinations this build cannot run and ``ArtifactError`` for a bad artifact."""
    others = [name for name, on in (("eviction", lp.eviction.scorer != "none"),
                                    ("budget.max_tokens", lp.budget.max_tokens is not None),
                                    ("quant", lp.quant is not None),
                                    ("calibration", lp.calibration is not None)) if on]
    if others:
        raise NotImplementedError(f"lowrank together with {', '.join(others)} (a low-rank store keeps "
                                  "every token as a latent; combine it with nothing else for now)")
    if not lp.lowrank.artifact:
        from kvfx.calibrate import ArtifactError

        raise ArtifactError("policy lowrank.artifact: got null, expected the .safetensors file written "
                            "by `kvfx calibrate --keep-rank K --out F.safetensors`")
    factors = load_factors(lp.lowrank.artifact)
    return LowRankCompressor(factors.get(layer), layer=layer, artifact=lp.lowrank.artifact)
