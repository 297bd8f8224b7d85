"""Invariants of the shared selection code, for any scores, budgets and padding."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfx.methods.select import budget_from_keep, select_kept


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    pads = [draw(st.integers(0, n - 1)) for _ in range(B)]
    sink = draw(st.integers(0, 4))
    window = draw(st.integers(0, 8))
    keep = draw(st.floats(0.05, 1.0))
    seed = draw(st.integers(0, 2**16))
    return B, H, n, pads, sink, window, keep, seed


@settings(max_examples=150, deadline=None)
@given(cases())
def test_kept_set_is_topk_with_sinks_window_and_no_pads(case):
    B, H, n, pads, sink, window, keep, seed = case
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, n, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False  # left padding
    scores = torch.randn(B, H, n, generator=g)
    n_valid = valid.sum(-1)
    budget = budget_from_keep(n_valid, keep=keep, tokens=None, sink=sink, window=window)
    idx, count = select_kept(scores, valid, budget, sink=sink, window=window, kv_heads=H)
    for b in range(B):
        nv = int(n_valid[b])
        want = min(nv, max(round(keep * nv), sink + window))
        assert int(budget[b]) == want  # budget honored exactly
        real = [j for j in range(n) if valid[b, j]]
        protected = set(real[:sink]) | set(real[max(0, nv - window):])
        for h in range(H):
            c = int(count[b, h])
            kept = idx[b, h, :c].tolist()
            assert c == want
            assert kept == sorted(kept) and len(set(kept)) == c  # position order, no repeats
            assert all(valid[b, j] for j in kept)  # pads never kept
            assert protected <= set(kept)  # sinks and window always kept
            rest = [j for j in real if j not in protected]
            chosen = [j for j in kept if j not in protected]
            if chosen and len(chosen) < len(rest):  # the others are the top scores
                worst_kept = min(scores[b, h, j] for j in chosen)
                best_dropped = max(scores[b, h, j] for j in rest if j not in chosen)
                assert worst_kept >= best_dropped


def test_budget_by_tokens_and_bounds():
    n_valid = torch.tensor([100, 10, 3])
    b = budget_from_keep(n_valid, keep=None, tokens=20, sink=2, window=4)
    assert b.tolist() == [20, 10, 3]
    b = budget_from_keep(n_valid, keep=0.01, tokens=None, sink=2, window=4)
    assert b.tolist() == [6, 6, 3]
