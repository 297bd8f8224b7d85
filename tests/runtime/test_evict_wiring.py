"""The eviction kernels (select_gather, kv_stats) wired into the compressors, executed by the
Triton interpreter on CPU: with KVFX_FORCE_TRITON=1 a compressor keeps exactly the tokens the
PyTorch path keeps (store contents bit for bit), and a compiled model gives the same logits."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

import kvfx
from kvfx.runtime.compressor import build_compressor
from kvfx.policy import load_policy
from kvfx.runtime.store import SiteStore
from zoo import clone_model, hf_decode, hf_model

pytest.importorskip("triton")

KERNELS = ("select_gather", "knorm_scores", "lagkv_partition_scores")
POLICIES = {
    "snapkv": {"kvfx": 1, "name": "s", "extends": "snapkv", "budget": {"keep": 0.5, "window": 8}},
    "h2o": {"kvfx": 1, "name": "h", "extends": "h2o", "budget": {"keep": 0.5}},
    # KNorm with a rolling cap: prefill keeps 40, each decode step evicts the largest-norm key;
    # every layer compressed (the preset leaves layers 0-1 alone)
    "knorm": {"kvfx": 1, "name": "k", "extends": "knorm", "budget": {"keep": 0.5, "max_tokens": 40},
              "layers": []},
    # LagKV with lag 8: prefill compresses 6 partitions, decode re-triggers the recursion
    "lagkv": {"kvfx": 1, "name": "l", "extends": "lagkv", "eviction": {"lag": 8}},
}
# The launch functions each policy must reach with the kernels forced.
EXPECTED = {"snapkv": {"select_gather"}, "h2o": {"select_gather"},
            "knorm": {"select_gather", "knorm_scores"}, "lagkv": {"lagkv_partition_scores"}}


@pytest.fixture
def counted(monkeypatch, tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    import kvfx.templates.launch_evict as launch_evict

    calls = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        def wrapper(*a, _real=getattr(launch_evict, name), _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(launch_evict, name, wrapper)
    return calls


def _run_compressor(policy, forced, monkeypatch):
    """Prefill a padded batch, then 20 decode steps (appending and evicting); the final store."""
    monkeypatch.setenv("KVFX_FORCE_TRITON", forced)
    gen = torch.Generator().manual_seed(3)
    B, Hkv, g, n, d = 2, 2, 2, 70, 16
    q = torch.randn(B, Hkv * g, n, d, generator=gen)
    k, v = (torch.randn(B, Hkv, n, d, generator=gen) for _ in range(2))
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :9] = False  # left padding
    lp = load_policy(POLICIES[policy]).resolve(3, "model.layers.3.self_attn", 4)
    comp = build_compressor(lp, 3, 4)
    store = SiteStore("t")
    comp.prefill(store, q, k, v, valid, d ** -0.5)
    store.seen = n
    for step in range(20):
        kn, vn = (torch.randn(B, Hkv, 1, d, generator=gen) for _ in range(2))
        store.append(kn, vn, torch.tensor([n + step]))
        comp.after_decode(store, 1, None)
        store.seen += 1
    L = store.length
    return store.k[:, :, :L], store.v[:, :, :L], store.pos[:, :, :L], store.count


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_compressor_keeps_the_same_tokens_with_kernels(policy, counted, monkeypatch):
    ref = _run_compressor(policy, "0", monkeypatch)
    assert not any(counted.values()), counted  # the CPU path never launches a kernel
    got = _run_compressor(policy, "1", monkeypatch)
    assert {name for name, c in counted.items() if c} == EXPECTED[policy], counted
    for name, a, b in zip(("k", "v", "pos", "count"), got, ref):
        assert torch.equal(a, b), f"{policy}: store {name} differs"
    assert ((got[2][1] >= 9) | (got[2][1] == -1)).all()  # no pad of row 1 was kept


@pytest.mark.parametrize("policy", ["lagkv"])  # (knorm, snapkv: the compressor test above and
def test_model_keeps_the_same_tokens_with_kernels(policy, counted, monkeypatch):  # test_kernel_wiring)
    """End to end through torch.compile: LagKV on the kernels (prefill and the decode-time
    recursion) holds the same tokens in every site's store and gives the same logits."""
    pol = POLICIES[policy]
    model = hf_model("llama", "sdpa")  # head_dim 16, GQA 2
    ids = torch.randint(1, 90, (1, 64), generator=torch.Generator().manual_seed(1))
    held = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("KVFX_FORCE_TRITON", forced)
        torch._dynamo.reset()
        kvfx.reset()
        with torch.no_grad():
            out, cache = hf_decode(torch.compile(clone_model(model), backend="kvfx",
                                                 options={"policy": pol, "inner": "eager"}), ids, 6)
        from kvfx.runtime.state import site_stores

        held[forced] = (out, {path: st.pos[:, :, :st.length].clone()
                              for path, st in site_stores(cache).items()})
    assert {name for name, c in counted.items() if c} == EXPECTED[policy], counted
    torch.testing.assert_close(held["1"][0], held["0"][0], rtol=1e-4, atol=1e-4)
    assert held["0"][1].keys() == held["1"][1].keys() and held["0"][1]
    for key, pos in held["0"][1].items():
        assert torch.equal(held["1"][1][key], pos), key
