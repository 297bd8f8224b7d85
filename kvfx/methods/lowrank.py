"""Low-rank KV cache (ReCalKV factors): what a site keeps per token, and how keys come back.

Notation per layer: Hkv KV heads of dim d, m = Hkv·d, x (.., D) the input of k_proj / v_proj,
W (m, D), an artifact's factors W ≈ L R with L (m, r), R (r, D) (:mod:`kvfx.methods.recalkv`).

The cache stores, per token, a latent of width r instead of the m key (and m value) numbers and
rebuilds the keys as latent·basisᵀ, then applies RoPE at the token's position. The rewritten
graph no longer runs k_proj / v_proj at decode: the latent of a new token is x·W_downᵀ with the
down-projection W_down = Qᵀ W (r × D, :meth:`LowRankCompressor.down`); the prompt's exact keys
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

    c = LowRankCompressor(factors[3], layer=3, artifact="f.safetensors")
    zk, zv = c.latents(k_pre, v)                       # (B, 1, n, r_k), (B, 1, n, r_v)
    k_pre_hat, v_hat = c.expand(zk, zv)                # (B, Hkv, n, d) each
    k_hat = rope(k_pre_hat, cos, sin)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvfx.methods.compressor import Compressor
from kvfx.methods.recalkv import LayerFactors, LowRank

__all__ = ["LowRankCompressor", "build_lowrank", "latent_basis", "load_factors", "project_kv", "rope",
           "rotate_half", "unrope"]


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


class LowRankCompressor:
    """Keep tokens as latents of width r_k (keys) + r_v (values) instead of 2·Hkv·d, chosen by
    ``inner`` (the layer's evictor: keep everything, or a scorer with its budget).

    ``factors`` None: the artifact has no factors for this layer (the pass leaves the site alone).
    ``quant``: a :class:`kvfx.runtime.qstore.QuantConfig` for the latents, or None.
    """

    name = "lowrank"
    lowrank = True  # the passes rewrite such sites onto kvfx::lowrank_attention
    calib = None  # CaliDrop is refused with lowrank (build_lowrank)

    def __init__(self, factors: LayerFactors | None, *, layer: int, artifact: str, inner: Compressor | None = None,
                 quant=None):
        self.factors, self.layer, self.artifact = factors, layer, artifact
        self.inner = inner if inner is not None else Compressor()
        self.quant = quant
        self._basis: dict = {}
        self._down: dict = {}
        if factors is not None:
            self.kv_heads = factors.k.L.shape[0] // factors.k.head_dim
            self.head_dim = factors.k.head_dim
            self.ranks = (factors.k.rank, factors.v.rank)

    @property
    def needs_probs(self) -> bool:
        return self.inner.needs_probs

    def describe_inner(self) -> str:
        return self.inner.name

    def basis(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_k (m, r_k), Q_v (m, r_v)) float32 on ``device``."""
        key = str(device)
        if key not in self._basis:
            self._basis[key] = (latent_basis(self.factors.k).to(device),
                                latent_basis(self.factors.v).to(device))
        return self._basis[key]

    def down(self, w_k: torch.Tensor, w_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The down-projections Q_kᵀ W_k (r_k, D) and Q_vᵀ W_v (r_v, D) in the weights' dtype,
        computed once per weight tensor (keyed by its storage, version, dtype and device, so an
        in-place update of the model's weights is picked up)."""
        key = tuple((w.data_ptr(), w._version, w.dtype, str(w.device)) for w in (w_k, w_v))
        if self._down.get("key") != key:
            qk, qv = self.basis(w_k.device)
            self._down = {"key": key,
                          "w": ((qk.mT @ w_k.float()).to(w_k.dtype), (qv.mT @ w_v.float()).to(w_v.dtype))}
        return self._down["w"]

    def project(self, x_k, w_k, x_v, w_v) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of new tokens from the projections' inputs x (B, n, D): (B, 1, n, r_k),
        (B, 1, n, r_v): x·W_downᵀ, k_proj / v_proj are never run."""
        dk, dv = self.down(w_k, w_v)
        return (torch.nn.functional.linear(x_k, dk)[:, None],
                torch.nn.functional.linear(x_v, dv)[:, None])

    def latents(self, k_pre: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE keys and values (B, Hkv, n, d) -> latents (B, 1, n, r_k), (B, 1, n, r_v), in v's
        dtype (one latent row per token, shared by all heads)."""
        qk, qv = self.basis(v.device)
        B, H, n, d = v.shape
        flat = lambda t: t.transpose(1, 2).reshape(B, n, H * d).float()  # noqa: E731  (row h·d + j)
        return (flat(k_pre) @ qk).to(v.dtype)[:, None], (flat(v) @ qv).to(v.dtype)[:, None]

    def expand(self, zk: torch.Tensor, zv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, 1, n, r) -> pre-RoPE keys and values (B, Hkv, n, d) in the latents' dtype."""
        qk, qv = self.basis(zk.device)
        B, _, n, _ = zk.shape
        H, d = self.kv_heads, self.head_dim
        heads = lambda z, q: (z[:, 0].float() @ q.mT).to(z.dtype).view(B, n, H, d).transpose(1, 2)  # noqa: E731
        return heads(zk, qk), heads(zv, qv)

    # ---- what the site keeps: the inner evictor, on latents -----------------------------------
    def prefill(self, lat_store, q, k, v, valid, scale, zk, zv) -> None:
        """Write the kept prompt tokens' latents: ``inner`` scores the exact keys (q, k, v:
        (B, H, n, d)), its selection gathers the latents zk, zv (B, 1, n, r)."""
        if type(self.inner) is Compressor:
            Compressor.prefill(self.inner, lat_store, q, zk, zv, valid)
        else:
            self.inner.prefill(lat_store, q, k, v, valid, scale, None, payload=(zk, zv))

    def after_decode(self, lat_store, nq: int, probs=None) -> None:
        self.inner.after_decode(lat_store, nq, probs)


def build_lowrank(lp, layer: int, num_layers: int = 1) -> LowRankCompressor:
    """The compressor of a layer policy with ``lowrank:``; raises ``NotImplementedError`` for
    combinations this build cannot run and ``ArtifactError`` for a bad artifact."""
    from kvfx.methods.compressor import LagKVCompressor, _build_evictor

    if lp.calibration is not None:
        raise NotImplementedError("lowrank together with calibration (CaliDrop folds each evicted "
                                  "token's exact key into its statistics; a low-rank store holds latents)")
    if not lp.lowrank.artifact:
        from kvfx.calibrate import ArtifactError

        raise ArtifactError("policy lowrank.artifact: got null, expected the .safetensors file written "
                            "by `kvfx calibrate --keep-rank K --out F.safetensors`")
    inner = _build_evictor(lp, layer, num_layers)
    if isinstance(inner, LagKVCompressor):
        raise NotImplementedError("lowrank together with eviction.scorer lagkv (LagKV keeps a separate "
                                  "set of tokens per KV head; a low-rank latent is shared by all heads)")
    quant = None
    if lp.quant is not None:
        from kvfx.runtime.qstore import QuantConfig

        if getattr(inner, "roll_at_budget", False) or getattr(inner, "max_tokens", None) is not None:
            raise NotImplementedError(
                f"lowrank and quant together with decode-time eviction ({inner.name}); quantized latents "
                "combine with prompt-time eviction (snapkv, pyramidkv, knorm without max_tokens)")
        quant = QuantConfig.from_policy(lp.quant)
    factors = load_factors(lp.lowrank.artifact)
    return LowRankCompressor(factors.get(layer), layer=layer, artifact=lp.lowrank.artifact, inner=inner,
                             quant=quant)
