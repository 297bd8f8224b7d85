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


@pytest.mark.parametrize("calibration", [False, True])
def test_adakv_decode_runs_the_ragged_kernel(monkeypatch, tmp_path, calibration):
    """AdaKV (head-wise ragged store) on the kernel path: prefill selects into the pool with the
    ragged select+gather kernel, decode reads it with the ragged kernel (no mask: every step), the
    store holds the same per-head tokens and the logits equal
    the PyTorch path's; with CaliDrop the evicted partition is merged after the kernel's read."""
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
    runs = _both_paths(monkeypatch, model, pol, ids, 4, lambda ss: {
        path: (type(st), st.count.clone(), st.positions().clone()) for path, st in ss.items()})
    assert len(calls) == 2 * 3, calls  # two sites, three decode steps, kernel path only
    assert len(selects) == 2, selects  # the prompt selected straight into each site's pool
    torch.testing.assert_close(runs["1"][0], runs["0"][0], rtol=1e-4, atol=1e-4)
    for key, (kind, count, pos) in runs["0"][1].items():
        assert kind is RaggedStore and len(set(count.reshape(-1).tolist())) > 1, (kind, count)
        assert torch.equal(count, runs["1"][1][key][1]) and torch.equal(pos, runs["1"][1][key][2]), key
