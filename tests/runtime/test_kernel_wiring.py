"""The runtime's kernel path (what CUDA runs) wired end to end, executed by the Triton
interpreter on CPU: a model compiled with kvfx gives the eager logits."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

import kvfx
from zoo import clone_model, hf_decode, hf_model

pytest.importorskip("triton")


def _both_paths(monkeypatch, model, policy, ids, steps, collect):
    """{"0": ..., "1": ...}: (logits, collect({module path: store})) with the PyTorch path and with
    the kernels (KVFX_FORCE_TRITON=1, interpreted), each a fresh compile of a copy of ``model``."""
    from kvfx.runtime.state import site_stores

    runs = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("KVFX_FORCE_TRITON", forced)
        torch._dynamo.reset()
        kvfx.reset()
        with torch.no_grad():
            out, cache = hf_decode(torch.compile(clone_model(model), backend="kvfx",
                                                 options={"policy": policy, "inner": "eager"}), ids, steps)
        assert all(s.rewritten for s in kvfx.sites()), kvfx.explain()
        stores = site_stores(cache)
        assert len(stores) == len(kvfx.sites())
        runs[forced] = (out, collect(stores))
    return runs


@pytest.mark.parametrize("policy", ["full", "snapkv"])
def test_model_through_triton_kernels(monkeypatch, tmp_path, policy):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))

    calls = {"prefill": 0, "decode": 0}
    import kvfx.templates.launch as launch

    for name in calls:
        real = getattr(launch, f"{name}_attention")

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(launch, f"{name}_attention", counted)
    model = hf_model("llama", "sdpa")  # head_dim 16, GQA 2
    ids = torch.randint(1, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = hf_decode(model, ids, 4)
        monkeypatch.setenv("KVFX_FORCE_TRITON", "1")
        pol = policy if policy == "full" else {"kvfx": 1, "name": "s", "extends": "snapkv",
                                              "budget": {"keep": 1.0}}
        out, _ = hf_decode(torch.compile(clone_model(model), backend="kvfx",
                                         options={"policy": pol, "inner": "eager"}), ids, 4)
    assert calls["prefill"] == 2 and calls["decode"] == 2 * 3, calls
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert all(s.rewritten for s in kvfx.sites())


@pytest.mark.parametrize("preset", ["snapkv", "h2o", "tova"])
def test_kernel_votes_select_what_the_reference_selects(monkeypatch, tmp_path, preset):
    """With the kernels (fused votes, decode probs) the store ends up holding the same tokens
    as with the PyTorch path, and the logits agree."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    pol = {"kvfx": 1, "name": "p", "extends": preset, "budget": {"keep": 0.5}}
    model = hf_model("llama", "sdpa")
    ids = torch.randint(1, 90, (1, 64), generator=torch.Generator().manual_seed(1))
    held = _both_paths(monkeypatch, model, pol, ids, 4, lambda ss: {
        path: st.pos[:, :, :st.length].sort(-1).values.clone() for path, st in ss.items()})
    torch.testing.assert_close(held["1"][0], held["0"][0], rtol=1e-4, atol=1e-4)
    for key in held["0"][1]:
        assert torch.equal(held["0"][1][key], held["1"][1][key]), key


@pytest.mark.parametrize("preset, history", [("snapkv", 32), ("snapkv", 48), ("tova", 32)])
def test_calidrop_state_comes_from_the_prefill_kernels_window_logits(monkeypatch, tmp_path, preset, history):
    """With CaliDrop on the kernel path, the prefill kernel emits the window's logits: the scores
    and the evicted partition's statistics both come from them (no second q·Kᵀ pass: build_state
    never runs), the state equals the PyTorch path's, and the same tokens are kept."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    import kvfx.methods.calidrop as cd
    import kvfx.templates.launch as launch

    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    second_pass, kinds = [], []
    real_build = cd.build_state
    monkeypatch.setattr(cd, "build_state", lambda *a, **kw: second_pass.append(1) or real_build(*a, **kw))
    real_prefill = launch.prefill_attention
    monkeypatch.setattr(launch, "prefill_attention",
                        lambda *a, **kw: kinds.append((kw.get("scores"), kw.get("window"))) or real_prefill(*a, **kw))
    pol = {"kvfx": 1, "name": "p", "extends": preset, "budget": {"keep": 0.25, "window": 16},
           "calibration": {"history": history}}
    model = hf_model("llama", "sdpa")
    ids = torch.randint(1, 90, (1, 80), generator=torch.Generator().manual_seed(2))
    runs = _both_paths(monkeypatch, model, pol, ids, 3, lambda ss: {
        path: (st.pos[:, :, :st.length].sort(-1).values.clone(), st.calib) for path, st in ss.items()})
    assert second_pass == []  # neither path ran a second pass over the keys
    assert kinds and all(k == ("window_logits", max(16, history)) for k in kinds), kinds
    torch.testing.assert_close(runs["1"][0], runs["0"][0], rtol=1e-4, atol=1e-4)
    for key, (pos, state) in runs["0"][1].items():
        pos_k, state_k = runs["1"][1][key]
        assert torch.equal(pos, pos_k), key
        assert state.q_hist.shape[2] == min(history, 80)
        for name in ("q_hist", "o_e", "lse_e", "valid"):
            torch.testing.assert_close(getattr(state_k, name), getattr(state, name), rtol=1e-4, atol=1e-4)


def test_lowrank_decode_runs_the_latent_kernel(monkeypatch, tmp_path):
    """A low-rank (ReCalKV) model on the kernel path: decode attention over the latents is the
    latent decode kernel (keys rebuilt and rotated in registers), and the logits equal the
    PyTorch path's."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    from types import SimpleNamespace

    import kvfx.templates.launch_lowrank as launch_lowrank
    from kvfx.calibrate import calibrate, save_artifact

    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    model = hf_model("llama", "sdpa", heads=2, kv_heads=1)  # head_dim 32, GQA 2
    calib_ids = torch.randint(1, 90, (512,), generator=torch.Generator().manual_seed(3))
    tok = lambda text, add_special_tokens=False: SimpleNamespace(input_ids=[int(w) for w in text.split()])  # noqa: E731
    factors, prov = calibrate(model, tok, " ".join(map(str, calib_ids.tolist())), 0.5, tokens=512, chunk=128,
                              progress=False)
    path = str(save_artifact(tmp_path / "lr.safetensors", factors, prov))
    calls = []
    real = launch_lowrank.latent_decode_attention
    monkeypatch.setattr(launch_lowrank, "latent_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids = torch.randint(1, 90, (1, 40), generator=torch.Generator().manual_seed(4))
    runs = _both_paths(monkeypatch, model, {"kvfx": 1, "name": "lr", "lowrank": {"artifact": path}}, ids, 5,
                       lambda bs: None)
    assert len(calls) == 2 * 4  # 2 layers x 4 decode steps, kernel path only
    torch.testing.assert_close(runs["1"][0], runs["0"][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "calibration", "rolling", "tova"])
def test_adakv_decode_runs_the_ragged_kernel(monkeypatch, tmp_path, variant):
    """AdaKV (head-wise ragged store) on the kernel path: prefill selects into the pool with the
    ragged select+gather kernel, decode reads it with the ragged kernel (no mask: every step), the
    store holds the same per-head tokens and the logits equal
    the PyTorch path's; with CaliDrop the evicted partition is merged after the kernel's read.
    ``rolling`` (max_tokens: each head rolls at its own cap, oldest first) reads through the kernel
    too; ``tova`` needs each step's probabilities, which the kernel does not return, so its decode
    reads through the reference on the kernel path as well (no kernel call), with the same result."""
    calibration = variant == "calibration"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    import kvfx.templates.launch_ragged as launch_ragged
    from kvfx.runtime.ragged import RaggedStore

    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    import kvfx.templates.launch_evict as launch_evict

    calls, selects = [], []
    real = launch_ragged.ragged_decode_attention
    monkeypatch.setattr(launch_ragged, "ragged_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    real_select = launch_evict.select_gather_ragged
    monkeypatch.setattr(launch_evict, "select_gather_ragged",
                        lambda *a, **kw: selects.append(1) or real_select(*a, **kw))
    model = hf_model("llama", "sdpa")  # head_dim 16, GQA 2
    ids = torch.randint(1, 90, (1, 200), generator=torch.Generator().manual_seed(5))
    pol = {"kvfx": 1, "name": "ada", "extends": "adakv-snapkv", "budget": {"keep": 0.25}}
    if calibration:
        pol["calibration"] = {"threshold": 0.5}
    if variant == "rolling":  # budget 50, cap 51: every head grows one token, then rolls
        pol["budget"]["max_tokens"] = 51
    if variant == "tova":
        pol = {"kvfx": 1, "name": "ada-tova", "extends": "tova", "budget": {"allocation": "adaptive"}}
    runs = _both_paths(monkeypatch, model, pol, ids, 4, lambda ss: {
        path: (type(st), st.count.clone(), st.positions().clone()) for path, st in ss.items()})
    assert len(calls) == (0 if variant == "tova" else 2 * 3), calls  # two sites x three decode steps
    if variant in ("rolling", "tova"):
        for _, count, _ in runs["1"][1].values():
            assert int(count.sum()) == 2 * (51 if variant == "rolling" else 50), count  # at the caps
    assert len(selects) == 2, selects  # the prompt selected straight into each site's pool
    torch.testing.assert_close(runs["1"][0], runs["0"][0], rtol=1e-4, atol=1e-4)
    for key, (kind, count, pos) in runs["0"][1].items():
        assert kind is RaggedStore, kind
        # heads keep different counts (TOVA's last-query scores split this prompt evenly: exempt)
        assert variant == "tova" or len(set(count.reshape(-1).tolist())) > 1, count
        assert torch.equal(count, runs["1"][1][key][1]) and torch.equal(pos, runs["1"][1][key][2]), key


class _CapAttention(torch.nn.Module):
    """Eager attention with Gemma-2's soft-capped logits (cap 2) over a list cache; the prompt is
    causally masked, a decode step (one query) sees every cached key without a mask, which is
    what lets the runtime pick the decode kernel."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, heads * self.d, bias=False)
        self.k = torch.nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v = torch.nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, past):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        v = self.v(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        g = self.h // self.hkv
        s = torch.matmul(q, k.repeat_interleave(g, dim=1).transpose(2, 3)) * self.d**-0.5
        s = torch.tanh(s / 2.0) * 2.0
        if T > 1:
            s = s.masked_fill(torch.ones(T, k.shape[2], dtype=torch.bool).triu(k.shape[2] - T + 1), float("-inf"))
        a = torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32), v.repeat_interleave(g, dim=1))
        return x + self.o(a.transpose(1, 2).reshape(B, T, -1)), (k, v)


class _CapDecoder(torch.nn.Module):
    def __init__(self, vocab=64, dim=64, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList([_CapAttention(dim) for _ in range(layers)])
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, cache=None):
        x, new = self.emb(ids) * 4.0, []  # large activations: the cap is far from the identity
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if cache is None else cache[i])
            new.append(kv)
        return self.head(x), new


@pytest.mark.parametrize("policy", ["full", "h2o"])
def test_soft_capped_decode_runs_the_kernel_with_the_cap(monkeypatch, tmp_path, policy):
    """A soft-capped site (eager, Gemma-2's tanh cap) on the kernel path: each unmasked decode step
    is the dense decode kernel with softcap=2 (H2O: with its probabilities), the prompt (masked) the
    reference; logits equal the PyTorch path's and the eager model's, and H2O's store holds the same
    tokens on both paths."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    import kvfx.templates.launch as launch
    from kvfx.runtime.state import site_stores

    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    calls = []
    real = launch.decode_attention
    def counted(*a, **kw):
        calls.append((kw.get("softcap"), kw.get("return_probs")))
        return real(*a, **kw)

    monkeypatch.setattr(launch, "decode_attention", counted)
    pol = policy if policy == "full" else {"kvfx": 1, "name": "h", "extends": "h2o",
                                           "budget": {"keep": 0.5, "sink": 2, "window": 4}}
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(6))
    ref = _CapDecoder().eval()

    def decode(model, steps=4):
        logits, cache = model(ids)
        out = [logits[:, -1]]
        for _ in range(steps):
            logits, cache = model(out[-1].argmax(-1, keepdim=True), cache)
            out.append(logits[:, -1])
        return torch.stack(out, 1), cache

    with torch.no_grad():
        want, _ = decode(ref)
    runs = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("KVFX_FORCE_TRITON", forced)
        torch._dynamo.reset()
        kvfx.reset()
        calls.clear()
        model = torch.compile(_CapDecoder().eval(), backend="kvfx", options={"policy": pol, "inner": "eager"})
        with torch.no_grad():
            out, cache = decode(model)
        sites = kvfx.sites(model)
        assert [s.rewritten for s in sites] == [True, True], kvfx.explain(model)
        assert {s.softcap for s in sites} == {2.0}
        held = {p: st.pos[:, :, :st.length].sort(-1).values.clone()
                for p, st in site_stores([(k, v) for k, v in cache]).items()}
        runs[forced] = (out, held, list(calls))
    assert runs["0"][2] == []  # the PyTorch path never launches
    assert runs["1"][2] == [(2.0, policy == "h2o")] * (2 * 4), runs["1"][2]  # 2 sites x 4 decode steps
    torch.testing.assert_close(runs["1"][0], runs["0"][0], rtol=1e-4, atol=1e-4)
    if policy == "full":
        torch.testing.assert_close(runs["1"][0], want, rtol=1e-4, atol=1e-4)
    assert len(runs["0"][1]) == 2
    for key, pos in runs["0"][1].items():
        assert torch.equal(pos, runs["1"][1][key]), key
        full = ids.shape[1] + 4
        assert pos.shape[-1] == full if policy == "full" else pos.shape[-1] < full, pos.shape  # h2o evicts


def test_soft_capped_prefill_runs_the_kernel_with_the_cap(monkeypatch, tmp_path):
    """A capped site's prompt without an explicit mask (causal) takes the prefill kernel with the cap
    and no fused scores; its output is the reference's (the routing of kvfx.runtime.softcap)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    import kvfx.templates.launch as launch
    from kvfx.runtime.compressor import Compressor
    from kvfx.runtime.softcap import capped_attention, capped_site_attention
    from kvfx.runtime.store import SiteStore

    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    kinds = []
    real = launch.prefill_attention
    def counted(*a, **kw):
        kinds.append((kw.get("softcap"), kw.get("scores", "none")))
        return real(*a, **kw)

    monkeypatch.setattr(launch, "prefill_attention", counted)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 20, 32, generator=gen) * 6
    k, v = (torch.randn(1, 2, 20, 32, generator=gen) for _ in range(2))
    want, _ = capped_attention(q, k, v, None, scale=None, softcap=3.0, is_causal=True)
    for forced, expect in (("0", []), ("1", [(3.0, "none")])):
        monkeypatch.setenv("KVFX_FORCE_TRITON", forced)
        kinds.clear()
        got = capped_site_attention(Compressor(), SiteStore("s"), q, k, v, None, 0, None, True, 3.0)
        assert kinds == expect, kinds
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "h2o@0.5"])
def test_masked_decode_runs_the_kernel_with_a_bias(monkeypatch, tmp_path, policy):
    """A left-padded batch passes a mask at every decode step: the dense decode kernel takes it as
    its per-KV-head bias (runtime.attention.kernel_bias) instead of falling back to the reference,
    and the logits (and H2O's probabilities, through the tokens they keep) equal the reference's."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    import kvfx.templates.launch as launch

    calls = {"bias": 0}
    real = launch.decode_attention

    def counted(*a, **kw):
        calls["bias"] += kw.get("bias") is not None
        return real(*a, **kw)

    monkeypatch.setattr(launch, "decode_attention", counted)
    model = hf_model("llama", "sdpa")  # head_dim 16, GQA 2
    ids = torch.randint(1, 90, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    out = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("KVFX_FORCE_TRITON", forced)
        torch._dynamo.reset()
        kvfx.reset()
        with torch.no_grad():
            out[forced], _ = hf_decode(torch.compile(clone_model(model), backend="kvfx",
                                                     options={"policy": policy, "inner": "eager"}), ids, 4, mask)
    assert calls["bias"] == 2 * 3, calls  # 2 sites x 3 decode steps, all through the kernel
    torch.testing.assert_close(out["1"], out["0"], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref, _ = hf_decode(model, ids, 4, mask)
    if policy == "full":
        torch.testing.assert_close(out["1"], ref, rtol=1e-4, atol=1e-4)
