"""AdaKV head-wise allocation (kvfx.methods.adakv) against a float64 loop implementation of its
definition (ALGORITHMS.md; kvpress AdaKVPress): a row's H·b kept tokens are the top H·b scores
over all (head, token) pairs jointly, each head first given its own top floor(α·b); sinks and
the window are kept in every head; pads never. GQA: scores are reduced over a group's query heads
first (kvpress: mean)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfx.methods.adakv import head_budgets
from kvfx.methods.select import budget_from_keep, priority, select_gather_reference
from kvfx.policy import PolicyError, load_policy
from kvfx.runtime.compressor import build_compressor


def _oracle(scores, valid, budget, sink, window, alpha):
    """Kept token sets {(b, h): set of j} by the definition, with plain Python loops.

    ``scores`` (B, H, n) float64 (higher = keep); ties: a head's own ranking by (-score, j), the
    joint ranking by (-score, h, j)."""
    B, H, n = len(scores), len(scores[0]), len(scores[0][0])
    out = {}
    for b in range(B):
        real = [j for j in range(n) if valid[b][j]]
        nv = len(real)
        prot = set(real[:sink]) | set(real[max(0, nv - window):] if window else [])
        bud = int(budget[b])
        f = math.floor(bud * alpha)
        val = {}
        for h in range(H):
            for j in real:
                val[h, j] = math.inf if j in prot else float(scores[b][h][j])
            own = sorted(real, key=lambda j: (-val[h, j], j))
            for j in own[:f]:
                val[h, j] = math.inf  # the safeguard: each head's own top floor(α·b)
        joint = sorted(val, key=lambda hj: (-val[hj], hj[0], hj[1]))
        kept = joint[:H * bud]
        for h in range(H):
            out[b, h] = {j for (hh, j) in kept if hh == h}
    return out


def _kept_sets(pos, count):
    B, H, _ = pos.shape
    return {(b, h): set(pos[b, h, :int(count[b, h])].tolist()) for b in range(B) for h in range(H)}


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 4))
    n = draw(st.integers(1, 48))
    pads = [draw(st.integers(0, n - 1)) for _ in range(B)]
    return (B, H, n, pads, draw(st.integers(0, 4)), draw(st.integers(0, 8)), draw(st.floats(0.05, 1.0)),
            draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])), draw(st.booleans()), draw(st.integers(0, 2**16)))


@settings(max_examples=120, deadline=None)
@given(cases())
def test_head_budgets_match_the_definition(case):
    """Counts, and the kept sets the shared select+gather takes with them, equal the loop oracle;
    ties (integer scores) included; the total equals the uniform total."""
    B, H, n, pads, sink, window, keep, alpha, ties, seed = case
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, n, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False  # left padding
    scores = torch.randint(0, 4, (B, H, n), generator=g).float() if ties else torch.randn(B, H, n, generator=g)
    n_valid = valid.sum(-1)
    budget = budget_from_keep(n_valid, keep=keep, tokens=None, sink=sink, window=window)
    prio = priority(scores, valid, sink=sink, window=window, kv_heads=H)
    count = head_budgets(prio, budget, alpha)
    assert torch.equal(count.sum(1), budget * H)  # the same total as uniform allocation
    assert bool((count <= n_valid[:, None]).all())
    _, _, pos, got = select_gather_reference(prio, count, prio[..., None], prio[..., None], n)
    assert torch.equal(got, count)
    want = _oracle(scores.double().tolist(), valid.tolist(), budget.tolist(), sink, window, alpha)
    assert _kept_sets(pos, got) == want


class _Capture:
    """A store that records what the compressor writes."""

    def __init__(self):
        self.extra = {}

    def write_selection(self, prio, budget, k, v, slack=1):
        m = int(budget.max())
        _, _, self.pos, self.count = select_gather_reference(prio, budget, k, v, m)


def _policy(keep, alpha):
    return {"kvfx": 1, "name": "ada", "extends": "adakv-snapkv", "budget": {"keep": keep, "safeguard": alpha}}


@pytest.mark.parametrize("alpha", [0.2, 0.0, 1.0])
def test_snapkv_gqa_padded_rows_match_the_definition(alpha):
    """Through the compressor (SnapKV, GQA 4:2, a left-padded row): the oracle reduces the
    per-query-head SnapKV scores (computed with each query head on its own KV head) over each group
    by a float64 mean; each row of the padded batch keeps what it keeps alone."""
    torch.manual_seed(0)
    B, Hq, Hkv, n, d = 2, 4, 2, 400, 16
    q, k, v = torch.randn(B, Hq, n, d), torch.randn(B, Hkv, n, d), torch.randn(B, Hkv, n, d)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :17] = False
    lp = load_policy(_policy(0.25, alpha)).resolve(0, "m", 1)
    c = build_compressor(lp)
    st_ = _Capture()
    c.prefill(st_, q, k, v, valid, None)
    # oracle: per query head scores (g = 1), group mean in float64
    per_q = c.scorer.scores(q, k.repeat_interleave(Hq // Hkv, 1), v, valid, d ** -0.5).double()
    reduced = per_q.view(B, Hkv, Hq // Hkv, n).mean(2).float().double()
    budget = c.budget(valid.sum(-1))
    want = _oracle(reduced.tolist(), valid.tolist(), budget.tolist(), 4, 32, alpha)
    assert _kept_sets(st_.pos, st_.count) == want
    assert len({len(s) for s in want.values()}) > 1 or alpha == 1.0  # heads really differ
    # row 1 alone (its pads removed) keeps the same tokens, shifted by its padding
    alone = _Capture()
    c.prefill(alone, q[1:, :, 17:], k[1:, :, 17:], v[1:, :, 17:], valid[1:, 17:], None)
    for h in range(Hkv):
        assert {j + 17 for j in _kept_sets(alone.pos, alone.count)[0, h]} == want[1, h]


def test_uniform_when_safeguard_is_one():
    """α = 1: every head keeps its own budget, exactly as uniform allocation."""
    torch.manual_seed(1)
    prio = torch.randn(2, 3, 50)
    budget = torch.tensor([12, 20])
    assert torch.equal(head_budgets(prio, budget, 1.0), budget[:, None].expand(2, 3))


@pytest.mark.parametrize("doc, match", [
    ({"extends": "snapkv", "budget": {"safeguard": 0.3}}, r"budget.safeguard: got 0.3, expected allocation: adaptive"),
    ({"extends": "adakv-snapkv", "budget": {"safeguard": 1.5}}, r"budget.safeguard: got 1.5"),
    ({"extends": "adakv-snapkv", "budget": {"allocation": "greedy"}}, r"budget.allocation: got 'greedy'"),
    ({"extends": "lagkv", "budget": {"allocation": "adaptive"}}, r"budget.allocation: got 'adaptive', expected "
     r"uniform with eviction.scorer lagkv \(AdaKV .* selects per partition"),
    ({"extends": "snapkv-ott2", "budget": {"allocation": "adaptive"}}, r"budget.allocation: got 'adaptive', "
     r"expected uniform with quant"),
    ({"extends": "chunkkv", "budget": {"allocation": "adaptive"}}, r"expected uniform with eviction.chunk"),
    ({"extends": "streaming", "budget": {"allocation": "adaptive"}}, r"budget.allocation: got 'adaptive', "
     r"expected uniform with eviction.scorer streaming \(.*has no token scores"),
])
def test_policy_errors_are_located(doc, match):
    with pytest.raises(PolicyError, match=match):
        load_policy({"kvfx": 1, "name": "bad", **doc})


def test_preset_and_keep_suffix():
    lp = load_policy("adakv-snapkv@0.125").resolve(0, "m", 1)
    assert lp.budget.allocation == "adaptive" and lp.budget.keep == 0.125 and lp.budget.safeguard == 0.2
    assert "adaptive(safeguard=0.2)" in lp.describe()


def test_uniform_policies_keep_their_hash():
    """Policies without head-wise allocation hash as before the fields existed (results keep their
    policy_hash); an adaptive one hashes differently from its uniform twin."""
    assert load_policy("snapkv@0.25").hash == "369fb587a699"  # the hash at commit 9bbdf64
    assert load_policy("adakv-snapkv@0.25").hash != load_policy(
        {"kvfx": 1, "name": "adakv-snapkv", "extends": "snapkv", "budget": {"keep": 0.25}}).hash
