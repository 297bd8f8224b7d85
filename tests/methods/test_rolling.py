"""Rolling eviction during decode ("oldest first"): the victim is the oldest token that is
neither a sink nor in the recent window (snapkv/pyramidkv/knorm-free policies with
budget.max_tokens, and streaming with a budget)."""

import torch

from kvfx.runtime.compressor import build_compressor
from kvfx.policy import load_policy
from kvfx.runtime.store import SiteStore


def _run(policy, n=64, steps=5, seed=0):
    lp = load_policy(policy).resolve(0, "m", 1)
    c = build_compressor(lp, 0, 1)
    g = torch.Generator().manual_seed(seed)
    B, H, d = 1, 2, 16
    q = torch.randn(B, 2 * H, n, d, generator=g)
    k, v = torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    store = SiteStore("t")
    c.prefill(store, q, k, v, torch.ones(B, n, dtype=torch.bool), d**-0.5, None)
    store.seen = n
    held = [set(store.pos[0, 0, :store.length].tolist()) - {-1}]
    for t in range(n, n + steps):
        store.append(torch.randn(B, H, 1, d, generator=g), torch.randn(B, H, 1, d, generator=g),
                     torch.tensor([t]))
        c.after_decode(store, 1, None)
        store.seen += 1
        held.append(set(store.pos[0, 0, :store.length].tolist()) - {-1})
    return held


def test_snapkv_with_max_tokens_evicts_the_oldest_unprotected_token():
    pol = {"kvfx": 1, "name": "r", "extends": "snapkv", "budget": {"keep": 0.5, "sink": 2, "window": 4,
                                                                     "max_tokens": 20}}
    held = _run(pol)
    assert len(held[0]) == 20
    for before, after, t in zip(held, held[1:], range(64, 69)):
        gone = (before | {t}) - after
        candidates = sorted(p for p in before if p >= 2 and p < t - 3)  # not a sink, not recent
        assert gone == {candidates[0]}, (gone, candidates[:3])
        assert len(after) == 20


def test_streaming_with_keep_rolls_at_its_budget():
    pol = {"kvfx": 1, "name": "r", "budget": {"keep": 0.25, "sink": 2, "window": 4},
           "eviction": {"scorer": "streaming"}}
    held = _run(pol)
    assert held[0] == {0, 1} | set(range(64 - 14, 64))  # 16 = 2 sinks + the 14 most recent
    for i, h in enumerate(held):
        t = 64 + i  # tokens seen
        assert h == {0, 1} | set(range(t - 14, t)), (i, sorted(h))


def test_tova_chunked_decode_evicts_by_the_steps_attention_not_oldest_first():
    """A decode step of nq > 1 tokens (chunked teacher forcing, speculative decoding) evicts
    up to nq tokens, every one by the step's attention. Regression: only the first eviction used
    the attention and the rest fell back to oldest first, which with TOVA's zero sinks dropped
    the first tokens (perplexity at 4k with --chunk 16: +18.6 at keep 0.5)."""
    lp = load_policy({"kvfx": 1, "name": "t", "extends": "tova", "budget": {"keep": 0.5}}).resolve(0, "m", 1)
    c = build_compressor(lp, 0, 1)
    g = torch.Generator().manual_seed(0)
    B, H, d, n, nq = 1, 2, 16, 64, 6
    q = torch.randn(B, 2 * H, n, d, generator=g)
    k, v = torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    store = SiteStore("t")
    c.prefill(store, q, k, v, torch.ones(B, n, dtype=torch.bool), d**-0.5, None)
    store.seen = n
    cap = int(store.count[0, 0])
    store.append(torch.randn(B, H, nq, d, generator=g), torch.randn(B, H, nq, d, generator=g),
                 torch.arange(n, n + nq))
    m = store.length
    pos_before = store.pos[0, :, :m].clone()
    # the step's attention: the first tokens (positions 0..3) get the most, the rest random
    probs = torch.rand(B, 2 * H, nq, m, generator=g) * 0.01
    early = (store.pos[0, :, :m] < 4).repeat_interleave(2, 0)  # (Hq, m)
    probs[0] += early[:, None, :] * 1.0
    c.after_decode(store, nq, probs)
    store.seen += nq
    score = probs.sum(2).view(B, H, 2, m).mean(2)[0]  # group_reduce "mean"
    for h in range(H):
        held = set(store.pos[0, h, :int(store.count[0, h])].tolist())
        assert len(held) == cap
        before = pos_before[h][pos_before[h] >= 0]
        assert {p for p in before.tolist() if p < 4} <= held  # the most attended tokens survive
        unprotected = [(float(score[h, i]), int(p)) for i, p in enumerate(pos_before[h].tolist())
                       if p >= 0 and p != n + nq - 1]  # TOVA's window of 1 protects the newest
        expected_gone = {p for _, p in sorted(unprotected)[:len(before) - cap]}
        assert set(before.tolist()) - held == expected_gone
