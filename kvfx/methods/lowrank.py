"""Low-rank KV cache (ReCalKV factors): what a site keeps per token, and how keys come back.

Notation per layer: Hkv KV heads of dim d, m = Hkv·d, x (.., D) the input of k_proj / v_proj,
W (m, D), an artifact's factors W ≈ L R with L (m, r), R (r, D) (:mod:`kvfx.methods.recalkv`).

The cache stores, per token, a latent of width r instead of the m key (and m value) numbers and
rebuilds the keys as latent·basisᵀ, then applies RoPE at the token's position. The rewritten
graph no longer runs k_proj / v_proj at decode: the latent of a new token is x·W_downᵀ with the
down-projection W_down = Qᵀ W (r × D, :meth:`kvfx.runtime.compressor.LowRankCompressor.down`); the prompt's exact keys
(for the prompt's own attention, as every kvfx policy keeps it exact) are x·Wᵀ inside the op.

[Note] Which latent. ReCalKV builds R = pinv(L)·W (the whitened SVD: R = Σ^{1/2} V_rᵀ S⁻¹ =
Σ^{-1/2} U_rᵀ W = pinv(L) W; the OVC step sets R ← pinv(L) W explicitly; pinv of a block-diagonal
L is block diagonal, so HSR groups too). So its reconstruction x Rᵀ Lᵀ = (x Wᵀ) pinv(L)ᵀ Lᵀ is the
orthogonal projection of the pre-RoPE key k = x Wᵀ onto span(L). With Q (m, r) an orthonormal
basis of span(L) (QR of L in float64), the latent z = k Q (= x (T R)ᵀ for the invertible
T = Q⁺ L, the same r numbers per token up to a change of basis) rebuilds z Qᵀ = x Rᵀ Lᵀ exactly,
and Q is perfectly conditioned where pinv(L) may not be. The latent is x·(Qᵀ W)ᵀ, so the
down-projection replaces k_proj at decode; at the prompt the op computes the exact keys x·Wᵀ
anyway (for exact prompt attention) and takes z = k Q from them. The keys the graph
hands over are post-RoPE: RoPE rotates each pair (i, i + d/2) by a 2x2 matrix built from
cos / sin, inverted exactly by :func:`unrope`.

Composition (DERIVED where no paper says how):

* eviction (prompt-time and rolling): the scorer scores the prompt's exact keys per KV head; a
  latent is shared by all KV heads, so the scores are reduced over the heads with the policy's
  ``group_reduce`` (mean / max) and a token is kept or evicted for all heads at once. KNorm
  scores a latent by −‖z‖₂ (= −‖k̂‖ over all heads: Q is orthonormal and RoPE a rotation).
  LagKV (per-head partitions) and CaliDrop (whose folds need each evicted key) are refused.
* quant: the latents are quantized as KIVI quantizes keys and values, on latent channels (keys
  per latent channel over token groups, values per token over groups of latent channels).

Example::

    c = LowRankCompressor(factors[3], layer=3, artifact="f.safetensors")   # kvfx.runtime.compressor
    zk, zv = c.latents(k_pre, v)                       # (B, 1, n, r_k), (B, 1, n, r_v)
    k_pre_hat, v_hat = c.expand(zk, zv)                # (B, Hkv, n, d) each
    k_hat = rope(k_pre_hat, cos, sin)
"""

from __future__ import annotations

import torch

from kvfx.methods.recalkv import LowRank

__all__ = ["latent_basis", "project_kv", "rope", "rotate_half", "unrope"]


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


def project_kv(x_k: torch.Tensor, w_k: torch.Tensor, x_v: torch.Tensor, w_v: torch.Tensor, heads: int,
               head_dim: int, cos: torch.Tensor, sin: torch.Tensor):
    """The exact keys and values of a Llama-style attention block, as the model computes them:
    k_pre = linear(x_k, W_k).view(B, n, H, d).transpose(1, 2), k = rope(k_pre, cos, sin), v
    likewise without RoPE. x (B, n, D); returns (k_pre, k, v), each (B, H, n, d)."""
    B, n = x_k.shape[0], x_k.shape[1]
    heads_of = lambda y, dim: y.view(B, n, heads, dim).transpose(1, 2)  # noqa: E731
    k_pre = heads_of(torch.nn.functional.linear(x_k, w_k), head_dim)
    v = heads_of(torch.nn.functional.linear(x_v, w_v), w_v.shape[0] // heads)
    return k_pre, rope(k_pre, cos, sin), v
