"""Each scorer against a straightforward implementation of its paper's definition (loops,
float64, written here independently), and the kept set against the top-k of that score."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfx.methods.h2o import column_sums
from kvfx.methods.knorm import knorm_scores
from kvfx.methods.lagkv import lag_scores, lagkv_keep_indices
from kvfx.methods.pyramidkv import pyramid_budget
from kvfx.methods.snapkv import snapkv_scores
from kvfx.methods.tova import last_query_scores
from kvfx.runtime.compressor import build_compressor
from kvfx.policy import load_policy
from kvfx.runtime.store import SiteStore


def _rand(B, Hq, Hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, d, generator=g)
    k = torch.randn(B, Hkv, n, d, generator=g)
    v = torch.randn(B, Hkv, n, d, generator=g)
    return q, k, v


def naive_attention_row(q, K, p, valid, scale):
    """softmax over keys j <= p (valid only) of q·k_j·scale, float64, as a list."""
    logits = [float(q @ K[j]) * scale if (j <= p and valid[j]) else -math.inf for j in range(len(K))]
    m = max(logits)
    e = [math.exp(x - m) if x > -math.inf else 0.0 for x in logits]
    s = sum(e)
    return [x / s for x in e]


def naive_snapkv(q, k, valid, window, kernel, pool):
    B, Hq, n, d = q.shape
    Hkv, g = k.shape[1], Hq // k.shape[1]
    out = torch.zeros(B, Hkv, n, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            votes = [0.0] * n
            for p in range(n - min(window, n), n):
                if not valid[b, p]:
                    continue  # pad queries do not vote
                row = naive_attention_row(q[b, h, p].double(), k[b, h // g].double(), p, valid[b], d ** -0.5)
                votes = [a + r for a, r in zip(votes, row)]
            r = kernel // 2
            if pool == "max":
                pooled = [max(votes[max(0, j - r):j + r + 1]) for j in range(n)]
            else:
                pooled = [sum(votes[max(0, j - r):j + r + 1]) / len(votes[max(0, j - r):j + r + 1]) for j in range(n)]
            out[b, h // g] += torch.tensor(pooled, dtype=torch.float64) / g
    return out


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 2), st.sampled_from([1, 2, 3]), st.integers(5, 40), st.integers(0, 99),
       st.sampled_from(["max", "avg"]))
def test_snapkv_matches_definition(B, g, n, seed, pool):
    q, k, _ = _rand(B, 2 * g, 2, n, 8, seed)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[0, : n // 4] = False  # left padding on the first row
    got = snapkv_scores(q, k, valid, window=8, scale=8 ** -0.5, pool=pool, kernel=5)
    want = naive_snapkv(q, k, valid, 8, 5, pool)
    torch.testing.assert_close(got.double()[valid[:, None].expand_as(got)],
                               want[valid[:, None].expand_as(want)], rtol=1e-4, atol=1e-5)


def test_knorm_matches_definition():
    _, k, _ = _rand(2, 2, 2, 9, 8, 0)
    want = torch.tensor([[[-math.sqrt(sum(float(x) ** 2 for x in k[b, h, j])) for j in range(9)]
                          for h in range(2)] for b in range(2)])
    torch.testing.assert_close(knorm_scores(k), want.float())


@pytest.mark.parametrize("g", [1, 3])
def test_h2o_and_tova_match_definition(g):
    q, k, _ = _rand(2, 2 * g, 2, 13, 8, 1)
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, :3] = False
    hh = column_sums(q, k, valid, scale=8 ** -0.5, block=4)  # several query blocks
    last = last_query_scores(q, k, valid, scale=8 ** -0.5)
    for b in range(2):
        for h in range(2 * g):
            rows = [naive_attention_row(q[b, h, p].double(), k[b, h // g].double(), p, valid[b], 8 ** -0.5)
                    if valid[b, p] else [0.0] * 13 for p in range(13)]
            col = [sum(rows[p][j] for p in range(13) if valid[b, p]) for j in range(13)]
            torch.testing.assert_close(hh[b, h].double(), torch.tensor(col, dtype=torch.float64), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(last[b, h].double(), torch.tensor(rows[12], dtype=torch.float64), rtol=1e-4, atol=1e-6)


def naive_lag_scores(x, ref):
    """x, ref (lag, d) -> (lag,) per the LagKV definition, in Python floats."""
    lag, d = x.shape
    mn = [min(float(ref[t, c]) for t in range(ref.shape[0])) for c in range(d)]
    mx = [max(float(ref[t, c]) for t in range(ref.shape[0])) for c in range(d)]
    stds = []
    for t in range(lag):
        z = [(float(x[t, c]) - mn[c]) / (mx[c] - mn[c] + 1e-6) for c in range(d)]
        mean = sum(z) / d
        stds.append(math.sqrt(sum((a - mean) ** 2 for a in z) / (d - 1)))
    m = max(stds)
    e = [math.exp(s - m) for s in stds]
    return [a / sum(e) for a in e]


def test_lagkv_scores_and_partition_selection():
    _, k, v = _rand(1, 2, 2, 4 + 5 * 8, 6, 2)
    torch.testing.assert_close(lag_scores(k[0, 0, 4:12], k[0, 0, 12:20]).double(),
                               torch.tensor(naive_lag_scores(k[0, 0, 4:12], k[0, 0, 12:20]), dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    kept, tail = lagkv_keep_indices(k[0], v[0], sink=4, lag=8, keep=0.25, v_ratio=1.0)
    # 5 partitions: 4 compressed to 2 tokens each, the last full partition uncompressed
    assert tail == 8 and kept.shape == (2, 4 + 4 * 2 + 8)
    for h in range(2):
        for p in range(4):
            s0 = 4 + p * 8
            sk = naive_lag_scores(k[0, h, s0:s0 + 8], k[0, h, s0 + 8:s0 + 16])
            sv = naive_lag_scores(v[0, h, s0:s0 + 8], v[0, h, s0 + 8:s0 + 16])
            score = [a + b for a, b in zip(sk, sv)]
            want = sorted(sorted(range(8), key=lambda j: -score[j])[:2])
            assert kept[h, 4 + 2 * p:6 + 2 * p].tolist() == [s0 + j for j in want]


def official_pyramid(n, C, w, L, layer, beta=20):
    """PyramidKV's budget rule written out as in the paper/official code, per layer."""
    if n <= C:
        return n
    if n < 2 * (C - w):
        return (C - w) + w
    lo = (C - w) / beta
    hi = 2 * (C - w) - lo
    if hi >= n - w:
        hi = n - w
        lo = 2 * (C - w) - hi
    return int(math.floor(hi - layer * (hi - lo) / (L - 1))) + w


@pytest.mark.parametrize("n,C", [(4096, 1024), (4096, 512), (1000, 600), (300, 400), (2000, 1990)])
def test_pyramid_budgets_match_formula(n, C):
    for layer in range(30):
        got = pyramid_budget(torch.tensor([n]), torch.tensor([C]), window=32, layer=layer, num_layers=30)
        assert int(got) == min(official_pyramid(n, C, 32, 30, layer), n), (layer, int(got))
    total = sum(official_pyramid(n, C, 32, 30, i) for i in range(30))
    if n >= 2 * (C - 32) and n > C:
        assert abs(total / 30 - C) <= 2  # the average budget is C


@pytest.mark.parametrize("preset", ["knorm", "snapkv", "h2o", "tova"])
@pytest.mark.parametrize("g", [1, 3])
def test_kept_set_is_topk_of_reference_score(preset, g):
    """Prefill through the compressor: the store holds exactly the sinks, the window and the
    top-scoring rest of each (row, head), never a pad."""
    torch.manual_seed(0)
    B, Hkv, n, d = 2, 2, 48, 8
    q, k, v = _rand(B, Hkv * g, Hkv, n, d, 3)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :10] = False
    lp = load_policy(preset).resolve(5, "model.layers.5.self_attn", 8)
    comp = build_compressor(lp, 5, 8)
    store = SiteStore("t")
    comp.prefill(store, q, k, v, valid, d ** -0.5)
    scores = comp.scorer.scores(q, k, v, valid, d ** -0.5)
    n_valid = valid.sum(-1)
    budget = comp.budget(n_valid)
    for b in range(B):
        real = valid[b].nonzero()[:, 0].tolist()
        win = int(comp._window(n_valid)[b])
        protected = set(real[:comp.sink]) | set(real[len(real) - win:])
        for h in range(Hkv):
            c = int(store.count[b, h])
            kept = store.pos[b, h, :c].tolist()
            assert c == int(budget[b]) and set(kept) <= set(real) and protected <= set(kept)
            rest = sorted((j for j in real if j not in protected), key=lambda j: -float(scores[b, h, j]))
            assert set(kept) - protected == set(rest[:c - len(protected)])
            torch.testing.assert_close(store.k[b, h, :c], k[b, h, kept])
