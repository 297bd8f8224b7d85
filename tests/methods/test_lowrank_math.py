"""The math of low-rank KV sites: RoPE is undone exactly, and the latent taken from the model's own
keys rebuilds exactly what ReCalKV's x·Rᵀ·Lᵀ rebuilds."""

import pytest
import torch

from kvfx.methods.lowrank import latent_basis, rope, unrope
from kvfx.methods.recalkv import ReCalKV, gram


def _cos_sin(n, d, scaling=1.0, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)
    return (emb.cos() * scaling)[None, None], (emb.sin() * scaling)[None, None]


@pytest.mark.parametrize("scaling", [1.0, 1.3])
def test_unrope_inverts_rope(scaling):
    x = torch.randn(2, 3, 700, 64)
    cos, sin = _cos_sin(700, 64, scaling)
    torch.testing.assert_close(unrope(rope(x, cos, sin), cos, sin), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hsr,ovc", [(True, True), (False, False)])
def test_latent_of_keys_rebuilds_recalkv_reconstruction(hsr, ovc):
    """(x Wᵀ) Q Qᵀ == x Rᵀ Lᵀ: the store may take the latent from the keys, not from x."""
    torch.manual_seed(0)
    n_heads, d, dim = 3, 16, 40
    w_k, w_v = (torch.randn(n_heads * d, dim, dtype=torch.float64) for _ in range(2))
    x = torch.randn(600, dim, dtype=torch.float64) @ torch.randn(dim, dim, dtype=torch.float64)
    f = ReCalKV(keep_rank=0.5, hsr=hsr, ovc=ovc, rank_multiple=8).factorize(
        w_k, w_v, gram(x), n_heads=n_heads, head_dim=d)
    for w, lr in ((w_k, f.k), (w_v, f.v)):
        q = latent_basis(lr).double()
        assert lr.rank < n_heads * d
        torch.testing.assert_close(q.mT @ q, torch.eye(lr.rank, dtype=torch.float64), atol=1e-6, rtol=0)
        want = x @ lr.R.mT @ lr.L.mT
        got = (x @ w.mT) @ q @ q.mT
        err = float((got - want).norm() / want.norm())
        assert err < 1e-5, err
        # and it is a real compression: far from the exact keys
        assert float((want - x @ w.mT).norm() / (x @ w.mT).norm()) > 1e-2
