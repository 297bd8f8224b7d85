"""ReCalKV (arXiv 2505.24357): low-rank key and value projections, calibrated offline.

Plain PyTorch, float64 for all linear algebra (ALGORITHMS.md, "ReCalKV"). Notation, per layer:
x (.., D) the input of k_proj / v_proj (D = hidden size), W (m, D) the projection weight with
m = Hkv·d rows (head h owns rows h·d .. (h+1)·d), X (N, D) calibration inputs, G = XᵀX.
A factorization W ≈ L·R has L (m, r), R (r, D): the cache stores the latent z = x Rᵀ (r < m
numbers per token) and keys / values are rebuilt as z Lᵀ (RoPE is applied after rebuilding keys).

Whitening. ‖X Wᵀ - X Rᵀ Lᵀ‖_F² = tr((W - LR) G (W - LR)ᵀ) = ‖(W - LR) S‖_F² for any S with
S Sᵀ = G. So with S from the Cholesky of G + λI (λ = ``damp`` · tr(G)/D keeps it positive
definite when N < D or X is rank deficient; eigh with clamped eigenvalues if Cholesky still
fails), the truncated SVD W S = U Σ Vᵀ gives the optimal rank-r factors (Eckart–Young):

    L = U_r Σ_r^{1/2},    R = Σ_r^{1/2} V_rᵀ S⁻¹            (L R S = U_r Σ_r V_rᵀ)

Keys, head-wise similarity-aware reordering (HSR). Head h's block of W S, transposed, is
A_h = (W S)[h·d:(h+1)·d]ᵀ (D, d): D samples (whitened input directions), d features. Linear CKA
(Kornblith et al. 2019) between heads i, j, with Ā = A - 1·mean_rows(A):

    CKA(A_i, A_j) = ‖Ā_jᵀ Ā_i‖_F² / (‖Ā_iᵀ Ā_i‖_F · ‖Ā_jᵀ Ā_j‖_F)
                  = HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i) HSIC(K_j, K_j)),
    K = A Aᵀ, HSIC(K, K') = tr(K H K' H) / (D - 1)², H = I - 11ᵀ/D

(the official code's definition). Without the centering, and with λ = 0, A_jᵀ A_i = W_j S Sᵀ W_iᵀ
= K_jᵀ K_i for the head outputs K_h = X W_hᵀ, so uncentered it is exactly the CKA of the heads'
keys over the calibration tokens (on SmolLM2-135M both pick the same groups in all 30 layers).
Heads are grouped greedily (:func:`group_heads`), each group gets one whitened SVD with rank
keep·|g|·d, and the latent is the groups' latents side by side; L is block diagonal (zero outside
a group's rows × latent columns), so a head's key reads only its group's latent. Without HSR the
groups are contiguous runs of heads of the same sizes (Palu's grouped low-rank decomposition).

Values, offline value calibration (OVC). One whitened SVD over all heads, then one step of
alternating least squares on the calibration error f(L, R) = ‖X Wᵀ - X Rᵀ Lᵀ‖_F²:

    L ← argmin_L f = lstsq(X Rᵀ, X Wᵀ)ᵀ = W G Rᵀ (R G Rᵀ)⁻¹       (normal equations, from G)
    R ← argmin_R f = pinv(L) W

[Note] ALGORITHMS.md writes the R step as (W_vᵀ pinv(L))ᵀ: that is the official code, where L
is the (r, m) solution of lstsq, i.e. our Lᵀ; in our (m, r) convention it reads (W_vᵀ pinv(Lᵀ))ᵀ
= pinv(L) W_v. It minimizes ‖(W - LR) M‖_F for EVERY M (substitute R' = R M: the minimum of
‖W M - L R'‖ over R' is pinv(L) W M), so it is the exact minimizer of f for any G. Each step
minimizes f over one block, so f never increases: OVC never loses to the whitened SVD on the
calibration set. With λ = 0 the whitened SVD is already the global minimizer of f, and both steps
return it unchanged (pinv(L) W = Σ^{-1/2} U_rᵀ W = R); OVC then only undoes the damping, or
adapts the factors to inputs ``ovc_gram`` that differ from the whitening statistics (in the
official code: inputs produced by the already-compressed earlier layers). L can later be folded
into o_proj.

Rank budget: keep_rank · min(rows of the group, D), rounded to a multiple of ``rank_multiple`` (8 when
Hkv·d < 1024, else 32), at least one multiple, never above full.

    >>> W, X = torch.randn(128, 64, dtype=torch.float64), torch.randn(500, 64, dtype=torch.float64)
    >>> f = ReCalKV(keep_rank=0.5).factorize(W, W, gram(X), n_heads=2, head_dim=64)
    >>> f.k.L.shape, f.k.R.shape, f.k.groups
    (torch.Size([128, 64]), torch.Size([64, 64]), ((0,), (1,)))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "LayerFactors",
    "LowRank",
    "ReCalKV",
    "Whitening",
    "contiguous_groups",
    "default_group_size",
    "default_rank_multiple",
    "factorize_keys",
    "factorize_values",
    "gram",
    "group_heads",
    "group_sizes",
    "head_cka",
    "linear_cka",
    "ovc_refine",
    "rank_budget",
    "reconstruct",
    "relative_error",
    "whitened_svd",
    "whitening",
]

_F64 = torch.float64


def gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX in float64 on the CPU for inputs x (..., D) (all leading dims are samples)."""
    x = x.reshape(-1, x.shape[-1]).to("cpu", _F64)
    return x.mT @ x


# --------------------------------------------------------------------------------------------- whitening


@dataclass(frozen=True, eq=False)
class Whitening:
    """S (D, D) float64 with S Sᵀ = G + λI. ``method``: "cholesky" (S lower triangular), "eigh"
    (S = Q Λ^{1/2}, stored as Q and the eigenvalues) or "identity" (S = I: plain SVD)."""

    S: torch.Tensor
    method: str
    damping: float
    eigvals: Optional[torch.Tensor] = None
    Q: Optional[torch.Tensor] = None

    @staticmethod
    def identity(dim: int) -> "Whitening":
        return Whitening(torch.eye(dim, dtype=_F64), "identity", 0.0)

    def right_solve(self, a: torch.Tensor) -> torch.Tensor:
        """a S⁻¹ for a (k, D), without forming S⁻¹ for the Cholesky factor."""
        if self.method == "identity":
            return a
        if self.method == "cholesky":
            return torch.linalg.solve_triangular(self.S, a, upper=False, left=False)
        return (a / self.eigvals.sqrt()) @ self.Q.mT  # S⁻¹ = Λ^{-1/2} Qᵀ


def whitening(g: torch.Tensor, *, damp: float = 1e-4) -> Whitening:
    """S with S Sᵀ = G + λI, λ = damp · tr(G) / D (float64).

    Cholesky first; if G + λI is still not numerically positive definite, eigh with eigenvalues
    clamped to at least max(λ, 1e-12 · largest): S = Q Λ^{1/2}.

    Raises:
        ValueError: G is not square, or holds NaN / inf (the message names the fix).
    """
    g = g.to("cpu", _F64)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"whitening: Gram matrix has shape {tuple(g.shape)}, expected (D, D)")
    if not torch.isfinite(g).all():
        raise ValueError("whitening: the Gram matrix XᵀX holds NaN or inf; the calibration inputs "
                         "overflowed (run the model in float32 for calibration)")
    if damp < 0:
        raise ValueError(f"whitening damp: got {damp}, expected >= 0")
    d = g.shape[0]
    g = 0.5 * (g + g.mT)
    lam = damp * float(torch.diagonal(g).sum()) / d
    eye = torch.eye(d, dtype=_F64)
    s, info = torch.linalg.cholesky_ex(g + lam * eye)
    if int(info) == 0:
        return Whitening(s, "cholesky", lam)
    evals, q = torch.linalg.eigh(g)
    floor = max(lam, 1e-12 * float(evals.abs().max()), torch.finfo(_F64).tiny)
    evals = (evals + lam).clamp_min(floor)
    return Whitening(q * evals.sqrt(), "eigh", lam, eigvals=evals, Q=q)


def whitened_svd(w: torch.Tensor, wh: Whitening, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of w (m, D): L = U_r Σ_r^{1/2} (m, r), R = Σ_r^{1/2} V_rᵀ S⁻¹ (r, D)."""
    w = w.to("cpu", _F64)
    ws = w @ wh.S
    if ws.shape[0] < ws.shape[1]:
        # [Note] LAPACK is far slower on wide than on tall inputs here (1.9 s vs 0.25 s for
        # 192 x 576 on 2 busy cores); svd(Aᵀ) = V Σ Uᵀ gives the same factors.
        v, sig, uh = torch.linalg.svd(ws.mT, full_matrices=False)
        u, vh = uh.mT, v.mT
    else:
        u, sig, vh = torch.linalg.svd(ws, full_matrices=False)
    root = sig[:rank].sqrt()
    return u[:, :rank] * root, wh.right_solve(root[:, None] * vh[:rank])


# --------------------------------------------------------------------------------------------- HSR


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Centered linear CKA of a (n, p) and b (n, q) (rows are samples), in [0, 1]:
    ‖b̄ᵀ ā‖_F² / (‖āᵀ ā‖_F ‖b̄ᵀ b̄‖_F) with ā = a - mean over rows. 0 if either is constant."""
    a = a.to(_F64) - a.to(_F64).mean(0)
    b = b.to(_F64) - b.to(_F64).mean(0)
    den = float(torch.linalg.matrix_norm(a.mT @ a) * torch.linalg.matrix_norm(b.mT @ b))
    return float(torch.linalg.matrix_norm(b.mT @ a) ** 2) / den if den > 0 else 0.0


def head_cka(ws: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(H, H) CKA between the per-head row blocks of ws = W S (m, D), each taken as (D, d)."""
    # Ā_h = a_hᵀ with a = ws centered over its D columns (the samples), so Ā_jᵀ Ā_i = C_ji for
    # C = a aᵀ (m, m): one product gives every pair.
    a = ws.to(_F64)
    a = a - a.mean(dim=1, keepdim=True)
    d = a.shape[0] // n_heads
    c = (a @ a.mT).reshape(n_heads, d, n_heads, d)
    cross = c.square().sum(dim=(1, 3))  # ‖C_ij‖_F²
    norms = cross.diagonal().sqrt()  # ‖C_ii‖_F
    den = norms[:, None] * norms[None, :]
    return torch.where(den > 0, cross / den.clamp_min(torch.finfo(_F64).tiny), 0.0)


def group_sizes(n_heads: int, group_size: int) -> tuple[int, ...]:
    """ceil(H / group_size) groups, sizes as equal as possible, largest first: (5, 4) -> (3, 2)."""
    if group_size < 1:
        raise ValueError(f"ReCalKV group_size: got {group_size}, expected >= 1")
    n = math.ceil(n_heads / group_size)
    base, extra = divmod(n_heads, n)
    return tuple(base + (i < extra) for i in range(n))


def contiguous_groups(n_heads: int, group_size: int) -> tuple[tuple[int, ...], ...]:
    """Heads in index order cut into :func:`group_sizes` runs (grouping without HSR)."""
    out, start = [], 0
    for s in group_sizes(n_heads, group_size):
        out.append(tuple(range(start, start + s)))
        start += s
    return tuple(out)


def group_heads(sim: torch.Tensor, group_size: int) -> tuple[tuple[int, ...], ...]:
    """Greedy HSR grouping of H heads from their (H, H) similarity, into :func:`group_sizes`.

    Head pairs are visited by decreasing similarity (ties: lower indices first). A pair of
    ungrouped heads opens the next empty group (largest first) that holds two; a pair with one
    grouped head adds the other to that group if it has room. Heads left over join the group with
    room whose members they are most similar to on average (an empty group only if no other has
    room). Returns groups of sorted head indices, ordered by their first head.
    """
    n = sim.shape[0]
    sizes = group_sizes(n, group_size)
    groups: list[list[int]] = [[] for _ in sizes]
    where = [-1] * n
    pairs = sorted(((float(sim[i, j]), i, j) for i in range(n) for j in range(i + 1, n)),
                   key=lambda t: (-t[0], t[1], t[2]))
    for _, i, j in pairs:
        gi, gj = where[i], where[j]
        if gi == -1 and gj == -1:
            g = next((g for g, m in enumerate(groups) if not m and sizes[g] >= 2), None)
            if g is not None:
                groups[g] += [i, j]
                where[i] = where[j] = g
        elif gi == -1 and len(groups[gj]) < sizes[gj]:
            groups[gj].append(i)
            where[i] = gj
        elif gj == -1 and gi != -1 and len(groups[gi]) < sizes[gi]:
            groups[gi].append(j)
            where[j] = gi
    for h in range(n):
        if where[h] != -1:
            continue
        room = [g for g in range(len(sizes)) if len(groups[g]) < sizes[g]]
        g = max(room, key=lambda g: (bool(groups[g]),
                                     sum(float(sim[h, o]) for o in groups[g]) / max(1, len(groups[g]))))
        groups[g].append(h)
        where[h] = g
    return tuple(sorted(tuple(sorted(m)) for m in groups))


def default_group_size(n_heads: int, group_size: Optional[int] = None) -> int:
    """``group_size`` if given; else 4, or ceil(Hkv / 2) when that is smaller, so that there are
    at least two groups for HSR to choose between (SmolLM2-135M: 3 KV heads -> 2)."""
    if group_size is not None:
        return min(int(group_size), n_heads)
    return max(1, min(4, math.ceil(n_heads / 2)))


# --------------------------------------------------------------------------------------------- ranks


def default_rank_multiple(full: int) -> int:
    """8 for small models (Hkv·d < 1024), else 32."""
    return 8 if full < 1024 else 32


def rank_budget(keep_rank: float, full: int, multiple: int) -> int:
    """round(keep_rank · full) to a multiple of ``multiple``, at least one multiple, at most full.

    >>> rank_budget(0.5, 192, 8), rank_budget(0.3, 64, 8), rank_budget(0.01, 64, 8), rank_budget(1.0, 60, 8)
    (96, 16, 8, 60)
    """
    if not 0.0 < keep_rank <= 1.0:
        raise ValueError(f"ReCalKV keep_rank: got {keep_rank}, expected a fraction in (0, 1]")
    r = multiple * math.floor(keep_rank * full / multiple + 0.5)
    return min(max(r, multiple), full)


# --------------------------------------------------------------------------------------------- factors


@dataclass(frozen=True, eq=False)
class LowRank:
    """W ≈ L R for one projection.

    Attributes:
        L: (m, r) rows in the original head order; block diagonal over ``groups`` × latent slices.
        R: (r, D); latent z = x Rᵀ holds the groups' latents side by side, in ``groups`` order.
        groups: head indices of each group (one group of all heads for values).
        ranks: latent width of each group, sum = r.
        head_dim: d.
    """

    L: torch.Tensor
    R: torch.Tensor
    groups: tuple[tuple[int, ...], ...]
    ranks: tuple[int, ...]
    head_dim: int

    @property
    def rank(self) -> int:
        return int(self.R.shape[0])

    def weight(self) -> torch.Tensor:
        """L R, (m, D)."""
        return self.L @ self.R

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """z = x Rᵀ: (..., D) -> (..., r), what the cache stores."""
        return x @ self.R.to(x.dtype).mT

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """z Lᵀ: (..., r) -> (..., m), the keys / values (before RoPE for keys)."""
        return z @ self.L.to(z.dtype).mT

    def to(self, dtype: torch.dtype) -> "LowRank":
        return LowRank(self.L.to(dtype), self.R.to(dtype), self.groups, self.ranks, self.head_dim)


@dataclass(frozen=True, eq=False)
class LayerFactors:
    """The keys' and values' factors of one attention layer."""

    k: LowRank
    v: LowRank


def reconstruct(x: torch.Tensor, f: LowRank, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """k ≈ (x Rᵀ) Lᵀ (+ bias): x (..., D) -> (..., m); the projection through its latent."""
    y = f.expand(f.latent(x))
    return y if bias is None else y + bias.to(y.dtype)


def relative_error(w: torch.Tensor, f: LowRank, *, x: Optional[torch.Tensor] = None,
                   gram: Optional[torch.Tensor] = None) -> float:
    """‖X Wᵀ - X Rᵀ Lᵀ‖_F / ‖X Wᵀ‖_F on inputs x (..., D), or from their Gram XᵀX (same value:
    ‖X Eᵀ‖_F² = tr(E G Eᵀ)). A bias is exact in both and left out of both norms."""
    if (x is None) == (gram is None):
        raise ValueError("relative_error: pass exactly one of x= or gram=")
    w = w.to("cpu", _F64)
    e = w - f.L.to("cpu", _F64) @ f.R.to("cpu", _F64)
    if x is not None:
        x = x.reshape(-1, x.shape[-1]).to("cpu", _F64)
        return float(torch.linalg.matrix_norm(x @ e.mT) / torch.linalg.matrix_norm(x @ w.mT))
    g = gram.to("cpu", _F64)
    num = float(((e @ g) * e).sum())
    den = float(((w @ g) * w).sum())
    return math.sqrt(max(num, 0.0) / den)


def _block_diag_factors(w: torch.Tensor, wh: Whitening, groups, ranks, head_dim: int):
    m, dim = w.shape
    L = torch.zeros(m, sum(ranks), dtype=_F64)
    Rs, col = [], 0
    for heads, r in zip(groups, ranks):
        rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
        lg, rg = whitened_svd(w[rows], wh, r)
        L[rows, col:col + r] = lg
        Rs.append(rg)
        col += r
    return L, torch.cat(Rs).reshape(-1, dim)


def factorize_keys(w: torch.Tensor, wh: Whitening, *, n_heads: int, keep_rank: float, hsr: bool = True,
                   group_size: int = 4, rank_multiple: int = 8) -> LowRank:
    """Grouped whitened SVD of W_k (Hkv·d, D); groups by HSR (CKA of W_k S blocks) or contiguous."""
    w = w.to("cpu", _F64)
    head_dim = _head_dim(w, n_heads)
    gs = min(group_size, n_heads)
    groups = group_heads(head_cka(w @ wh.S, n_heads), gs) if hsr else contiguous_groups(n_heads, gs)
    ranks = tuple(rank_budget(keep_rank, min(len(g) * head_dim, w.shape[1]), rank_multiple) for g in groups)
    L, R = _block_diag_factors(w, wh, groups, ranks, head_dim)
    return LowRank(L, R, groups, ranks, head_dim)


def ovc_refine(w: torch.Tensor, L: torch.Tensor, R: torch.Tensor, g: torch.Tensor):
    """One OVC step: L ← W G Rᵀ (R G Rᵀ)⁻¹ (= lstsq(X Rᵀ, X Wᵀ)ᵀ), then R ← pinv(L) W."""
    w, L, R, g = (t.to("cpu", _F64) for t in (w, L, R, g))
    rg = R @ g
    a = rg @ R.mT  # R G Rᵀ (r, r), = (X Rᵀ)ᵀ (X Rᵀ)
    b = rg @ w.mT  # R G Wᵀ (r, m), = (X Rᵀ)ᵀ (X Wᵀ)
    L = torch.linalg.lstsq(0.5 * (a + a.mT), b, driver="gelsd").solution.mT
    return L, torch.linalg.pinv(L) @ w


def factorize_values(w: torch.Tensor, wh: Whitening, *, n_heads: int, keep_rank: float, ovc: bool = True,
                     rank_multiple: int = 8, ovc_gram: Optional[torch.Tensor] = None) -> LowRank:
    """One whitened SVD of W_v (Hkv·d, D) over all heads, then (``ovc``) one OVC step on the Gram
    ``ovc_gram`` of the refinement inputs (required with ``ovc``; usually the calibration Gram)."""
    w = w.to("cpu", _F64)
    head_dim = _head_dim(w, n_heads)
    r = rank_budget(keep_rank, min(w.shape), rank_multiple)
    L, R = whitened_svd(w, wh, r)
    if ovc:
        if ovc_gram is None:
            raise ValueError("factorize_values: ovc=True needs ovc_gram (the calibration XᵀX)")
        L, R = ovc_refine(w, L, R, ovc_gram)
    return LowRank(L, R, (tuple(range(n_heads)),), (r,), head_dim)


def _head_dim(w: torch.Tensor, n_heads: int) -> int:
    if w.dim() != 2 or n_heads < 1 or w.shape[0] % n_heads:
        raise ValueError(f"ReCalKV: weight of shape {tuple(w.shape)} does not split into {n_heads} "
                         "heads; expected (num_kv_heads * head_dim, hidden_size)")
    return w.shape[0] // n_heads


# --------------------------------------------------------------------------------------------- method


@dataclass(frozen=True)
class ReCalKV:
    """ReCalKV hyperparameters (paper defaults: group size 4, keep 0.5 of the K/V dims).

    Attributes:
        keep_rank: fraction of Hkv·d latent dims kept, in (0, 1]; uniform over layers and groups.
        hsr: group key heads by CKA similarity (else contiguous groups of the same sizes).
        ovc: one least-squares refinement of the value factors.
        group_size: heads per key group; None: :func:`default_group_size`.
        rank_multiple: ranks are multiples of this; None: :func:`default_rank_multiple`.
        damp: whitening damping λ = damp · tr(G)/D.
    """

    keep_rank: float = 0.5
    hsr: bool = True
    ovc: bool = True
    group_size: Optional[int] = None
    rank_multiple: Optional[int] = None
    damp: float = 1e-4

    def __post_init__(self):
        rank_budget(self.keep_rank, 8, 8)  # validates keep_rank
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size < 1):
            raise ValueError(f"ReCalKV group_size: got {self.group_size}, expected an integer >= 1 or None")
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise ValueError(f"ReCalKV rank_multiple: got {self.rank_multiple}, expected >= 1 or None")
        if not self.damp >= 0:
            raise ValueError(f"ReCalKV damp: got {self.damp}, expected >= 0")

    def resolved(self, n_heads: int, head_dim: int) -> tuple[int, int]:
        """(group_size, rank_multiple) for a layer with ``n_heads`` KV heads of ``head_dim``."""
        return (default_group_size(n_heads, self.group_size),
                self.rank_multiple or default_rank_multiple(n_heads * head_dim))

    def factorize(self, w_k: torch.Tensor, w_v: torch.Tensor, g_k: torch.Tensor,
                  g_v: Optional[torch.Tensor] = None, *, n_heads: int, head_dim: int) -> LayerFactors:
        """Factors of one layer from W_k, W_v (Hkv·d, D) and the Gram XᵀX of their inputs
        (``g_v`` defaults to ``g_k``: in Llama-style layers k_proj and v_proj share the input)."""
        g_v = g_k if g_v is None else g_v
        for name, w in (("k_proj", w_k), ("v_proj", w_v)):
            if tuple(w.shape) != (n_heads * head_dim, g_k.shape[0]):
                raise ValueError(f"ReCalKV: {name} weight has shape {tuple(w.shape)}, expected "
                                 f"({n_heads}*{head_dim}, {g_k.shape[0]}) from the heads and the Gram matrix")
        gs, mult = self.resolved(n_heads, head_dim)
        wh_k = whitening(g_k, damp=self.damp)
        wh_v = wh_k if g_v is g_k else whitening(g_v, damp=self.damp)
        k = factorize_keys(w_k, wh_k, n_heads=n_heads, keep_rank=self.keep_rank, hsr=self.hsr,
                           group_size=gs, rank_multiple=mult)
        v = factorize_values(w_v, wh_v, n_heads=n_heads, keep_rank=self.keep_rank, ovc=self.ovc,
                             rank_multiple=mult, ovc_gram=g_v)
        return LayerFactors(k, v)
