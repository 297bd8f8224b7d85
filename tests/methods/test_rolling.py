"""Rolling eviction during decode ("oldest first"): the victim is the oldest token that is
neither a sink nor in the recent window (snapkv/pyramidkv/knorm-free policies with
budget.max_tokens, and streaming with a budget)."""

import torch

from kvfx.methods.compressor import build_compressor
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
