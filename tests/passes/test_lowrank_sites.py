"""Policy ``lowrank:`` (ReCalKV): rewritten sites hold per-token latents. At full rank the model is
eager to fp32 round-off; at lower rank it is exactly the model whose k_proj / v_proj are L·R; the
bytes held shrink by the rank ratio; sites the pass cannot handle are left alone with a reason."""

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache
from zoo import cache_kwarg, clone_model, hf_decode, hf_model

import kvfx
from kvfx.calibrate import ArtifactError, calibrate, load_artifact, save_artifact
from kvfx.policy import PolicyError
from kvfx.runtime.state import sequences_of_cache, site_stores

STEPS = 16


class _Tok:
    """Calibration without a tokenizer: the text is the token ids."""

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[int(w) for w in text.split()])


def _artifact(model, keep, path, tokens=1024):
    ids = torch.randint(1, 90, (tokens,), generator=torch.Generator().manual_seed(0))
    factors, prov = calibrate(model, _Tok(), " ".join(map(str, ids.tolist())), keep, tokens=tokens,
                              chunk=128, progress=False)
    return str(save_artifact(path, factors, prov))


def _policy(path, **extra):
    return {"kvfx": 1, "name": "lr", "lowrank": {"artifact": path}, **extra}


def _ids(n, seed, batch=1):
    return torch.randint(1, 90, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return hf_model("llama", "sdpa", layers=2)


@pytest.fixture(scope="module")
def full_rank(llama, tmp_path_factory):
    return _artifact(llama, 1.0, tmp_path_factory.mktemp("lr") / "full.safetensors")


@pytest.fixture(scope="module")
def half_rank(llama, tmp_path_factory):
    return _artifact(llama, 0.5, tmp_path_factory.mktemp("lr") / "half.safetensors")


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_full_rank_equals_eager(llama, full_rank, inner):
    ids = _ids(17, 2)
    with torch.no_grad():
        ref, _ = hf_decode(llama, ids, STEPS)
        comp = torch.compile(clone_model(llama), backend="kvfx",
                             options={"policy": _policy(full_rank), "inner": inner})
        out, cache = hf_decode(comp, ids, STEPS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    sites = kvfx.sites()
    assert len(sites) == 2 and all(s.rewritten for s in sites), kvfx.explain()
    assert all("lowrank" in s.policy for s in sites)
    mem = kvfx.memory(cache)
    assert mem["model_cache_bytes"] <= 2 * 2 * 4  # ghosts only
    assert mem["shared_bytes"] > 0  # one RoPE table for both layers, counted once
    (seq,) = sequences_of_cache(cache)
    assert len(seq.shared) == 1


def test_full_rank_generate_left_padding(llama, full_rank):
    """Batch 2 with left padding through model.compile + generate: per-row RoPE positions."""
    ids = _ids(20, 3, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    kw = {"attention_mask": mask, "max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False,
              "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        ref = llama.generate(ids, **kw)
        comp = clone_model(llama)
        comp.compile(backend="kvfx", options={"policy": _policy(full_rank), "inner": "eager"})
        out = comp.generate(ids, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert all(s.rewritten for s in kvfx.sites()), kvfx.explain()
    stores = site_stores(out.past_key_values)
    assert len(stores) == 2
    st = next(iter(stores.values()))
    assert int(st.lat.count[0, 0]) == 20 - 5 + STEPS - 1  # pads are not kept


def test_low_rank_equals_model_with_factored_projections(tmp_path):
    """One layer, keep_rank 0.5: every decode step equals the eager model whose k_proj / v_proj
    weights are L·R (the layer's input is the embedding in both, so their keys agree)."""
    model = hf_model("llama", "sdpa", layers=1)
    path = _artifact(model, 0.5, tmp_path / "half1.safetensors")
    f = load_artifact(path).factors[0]
    assert f.k.rank < 32 and f.v.rank < 32
    ref = clone_model(model)
    attn = ref.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.copy_(f.k.L.double() @ f.k.R.double())
        attn.v_proj.weight.copy_(f.v.L.double() @ f.v.R.double())
    comp = torch.compile(clone_model(model), backend="kvfx",
                         options={"policy": _policy(path), "inner": "eager"})
    ids, feed = _ids(13, 4), _ids(STEPS, 5)
    outs, kw = [], cache_kwarg(model)
    with torch.no_grad():
        for m in (ref, comp):
            cache = DynamicCache(config=model.config)
            m(input_ids=ids, use_cache=True, **{kw: cache})
            steps = [m(input_ids=feed[:, i:i + 1], use_cache=True, **{kw: cache}).logits
                     for i in range(STEPS - 4)]
            steps.append(m(input_ids=feed[:, -4:], use_cache=True, **{kw: cache}).logits)  # 4 at once
            outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert kvfx.sites()[0].rewritten


def test_bytes_shrink_by_rank_ratio(llama, half_rank):
    ids = _ids(40, 6)
    kv, held = {}, {}
    for name, pol in (("full", "full"), ("lowrank", _policy(half_rank))):
        torch._dynamo.reset()
        kvfx.reset()
        with torch.no_grad():
            comp = torch.compile(clone_model(llama), backend="kvfx", options={"policy": pol, "inner": "eager"})
            _, cache = hf_decode(comp, ids, STEPS)
        mem = kvfx.memory(cache)
        kv[name] = {p: s["kv_bytes"] for p, s in mem["sites"].items()}
        held[name] = mem["held_bytes"]
    # everything held (latents, positions, the shared RoPE table) against the full store
    assert held["lowrank"] < 0.75 * held["full"], held
    factors = load_artifact(half_rank).factors
    for path, full_bytes in kv["full"].items():
        f = factors[int(path.split(".")[2])]
        ratio = (f.k.rank + f.v.rank) / (2 * 2 * 16)
        assert ratio <= 0.5
        assert kv["lowrank"][path] == full_bytes * ratio, (path, kv)


def test_layer_without_factors_left_alone(tmp_path):
    one = hf_model("llama", "sdpa", layers=1)
    two = hf_model("llama", "sdpa", layers=2)
    path = _artifact(one, 1.0, tmp_path / "one.safetensors")
    ids = _ids(11, 7)
    with torch.no_grad():
        ref, _ = hf_decode(two, ids, 8)
        out, _ = hf_decode(torch.compile(clone_model(two), backend="kvfx",
                                         options={"policy": _policy(path), "inner": "eager"}), ids, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    s0, s1 = sorted(kvfx.sites(), key=lambda s: s.layer_index)
    assert s0.rewritten and not s1.rewritten
    assert "no factors for layer 1" in s1.reason


def test_bias_left_alone_with_reason(tmp_path):
    """Qwen2 has a bias on k_proj / v_proj: left alone, output still the model's."""
    model = hf_model("qwen2", "sdpa")
    path = _artifact(model, 1.0, tmp_path / "qwen.safetensors")
    ids = _ids(12, 8)
    with torch.no_grad():
        ref, _ = hf_decode(model, ids, 8)
        out, _ = hf_decode(torch.compile(clone_model(model), backend="kvfx",
                                         options={"policy": _policy(path), "inner": "eager"}), ids, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    sites = kvfx.sites()
    assert len(sites) == 2 and not any(s.rewritten for s in sites)
    assert all("has a bias" in s.reason for s in sites), kvfx.explain()


def test_fused_qkv_left_alone_with_reason(full_rank):
    """GPT-2 (fused c_attn, no RoPE): left alone, output still the model's."""
    model = hf_model("gpt2", "sdpa")
    ids = _ids(12, 9)
    with torch.no_grad():
        ref, _ = hf_decode(model, ids, 6)
        out, _ = hf_decode(torch.compile(clone_model(model), backend="kvfx",
                                         options={"policy": _policy(full_rank), "inner": "eager"}), ids, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    sites = kvfx.sites()
    assert sites and not any(s.rewritten for s in sites)
    assert all("fused QKV" in s.reason for s in sites), kvfx.explain()


@pytest.mark.parametrize("extra, match", [
    (dict(eviction={"scorer": "lagkv"}, budget={"keep": 0.5}), "lowrank together with eviction.scorer lagkv"),
    (dict(extends="snapkv-calidrop"), "calibration: got 'calidrop', expected no calibration with a low-rank"),
    (dict(extends="h2o", quant={"keys": {"bits": 4}, "values": {"bits": 4, "group": 16}}),
     "eviction.scorer: got 'h2o'.*with quantized low-rank latents"),
])
def test_unsupported_combinations(llama, full_rank, extra, match):
    ids = _ids(9, 10)
    pol = _policy(full_rank, **extra)
    comp = torch.compile(clone_model(llama), backend="kvfx", options={"policy": pol, "inner": "eager"})
    with pytest.raises(Exception, match=match) as e, torch.no_grad():
        hf_decode(comp, ids, 2)
    assert isinstance(e.value, PolicyError)  # raised as itself through dynamo (kvfx.backend.CompilePolicyError)


def test_missing_artifact(llama, tmp_path):
    ids = _ids(9, 10)
    missing = str(tmp_path / "nope.safetensors")
    comp = torch.compile(clone_model(llama), backend="kvfx", options={"policy": _policy(missing), "inner": "eager"})
    with pytest.raises(Exception, match="no such file") as e, torch.no_grad():
        hf_decode(comp, ids, 2)
    assert isinstance(e.value, ArtifactError) or "ArtifactError" in repr(e.value)


def test_no_per_step_recompiles(llama, half_rank):
    import torch._dynamo.utils as dutils

    model = clone_model(llama)
    model.compile(backend="kvfx", options={"policy": _policy(half_rank), "inner": "eager"})
    kw = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
    dutils.counters.clear()
    with torch.no_grad():
        model.generate(_ids(16, 11), **kw)
        first = dutils.counters["stats"]["unique_graphs"]
        model.generate(_ids(23, 12), **kw)  # a new prompt length: at most one more
    total = dutils.counters["stats"]["unique_graphs"]
    assert first <= 3, first
    assert total <= first + 1, total
    assert all(s.rewritten for s in kvfx.sites())


def test_k_proj_and_v_proj_leave_the_graph(llama, half_rank, monkeypatch):
    """The rewrite hands the projections' inputs and weights to the op: no Linear on a k_proj /
    v_proj weight is left in any rewritten graph (prefill and decode), and nothing reads the keys'
    RoPE (the op's latent down-projection replaces them)."""
    import kvfx.backend as backend

    graphs = []
    real = backend.run_passes

    def spy(gm, *a, **kw):
        out = real(gm, *a, **kw)
        graphs.append(gm)
        return out

    monkeypatch.setattr(backend, "run_passes", spy)
    with torch.no_grad():
        comp = torch.compile(clone_model(llama), backend="kvfx",
                             options={"policy": _policy(half_rank), "inner": "eager"})
        hf_decode(comp, _ids(12, 13), 4)
    assert len(graphs) >= 2
    for gm in graphs:
        lin = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
        weights = [str(n.args[1]) for n in lin]
        assert not any("k_proj" in w or "v_proj" in w for w in weights), weights
        assert any("q_proj" in w for w in weights)  # the other projections are still there
        ops = [n for n in gm.graph.nodes if n.target is torch.ops.kvfx.lowrank_attention.default]
        assert len(ops) == 2
        for op in ops:
            assert "k_proj" in str(op.args[2]) and "v_proj" in str(op.args[4])


@pytest.fixture(scope="module")
def mqa():
    return hf_model("llama", "sdpa", layers=2, kv_heads=1)


@pytest.fixture(scope="module")
def mqa_full_rank(mqa, tmp_path_factory):
    return _artifact(mqa, 1.0, tmp_path_factory.mktemp("lr") / "mqa_full.safetensors")


@pytest.mark.parametrize("preset", ["snapkv@0.5", "knorm@0.5", "h2o@0.5", "tova@0.5", "streaming@0.25"])
def test_full_rank_lowrank_with_eviction_equals_the_eviction(mqa, mqa_full_rank, preset):
    """With one KV head (nothing to reduce over heads) and a full-rank artifact, lowrank + an
    eviction policy keeps the same tokens and gives the same logits as the eviction alone:
    prompt-time selection, rolling eviction (H2O / TOVA attention rows from the latent store,
    streaming), all through the latents."""
    from kvfx.eval.harness import policy_from_spec

    base = policy_from_spec(preset)
    doc = {"kvfx": 1, "name": "lr-ev", "extends": preset.split("@")[0],
           "budget": {"keep": float(preset.split("@")[1])}, "lowrank": {"artifact": mqa_full_rank}}
    import torch._dynamo.utils as dutils

    ids = _ids(48, 14)
    held, outs = {}, {}
    for name, pol in (("plain", base), ("lowrank", doc)):
        torch._dynamo.reset()
        kvfx.reset()
        dutils.counters.clear()
        with torch.no_grad():
            comp = torch.compile(clone_model(mqa), backend="kvfx", options={"policy": pol, "inner": "eager"})
            outs[name], cache = hf_decode(comp, ids, STEPS)
        assert all(s.rewritten for s in kvfx.sites()), kvfx.explain()
        assert dutils.counters["stats"]["unique_graphs"] <= 3  # no per-step recompiles
        held[name] = {}
        stores = site_stores(cache)
        assert len(stores) == 2
        for path, store in stores.items():
            st = getattr(store, "lat", store)
            held[name][path] = st.pos[0, 0, :st.length].sort().values.clone()
    assert held["lowrank"].keys() == held["plain"].keys()
    for path, pos in held["plain"].items():
        assert torch.equal(held["lowrank"][path], pos), (path, pos.tolist(), held["lowrank"][path].tolist())
    torch.testing.assert_close(outs["lowrank"], outs["plain"], rtol=1e-4, atol=1e-4)


def test_lowrank_eviction_shares_one_token_set_and_frees_bytes(llama, half_rank):
    """GQA with two KV heads: the latent is shared, so one token set per row (scores reduced over
    the heads); latents of the kept tokens only are held."""
    ids = _ids(512, 15)
    doc = {"kvfx": 1, "name": "lr-snap", "extends": "snapkv", "budget": {"keep": 0.25, "window": 8},
           "lowrank": {"artifact": half_rank}}
    with torch.no_grad():
        comp = torch.compile(clone_model(llama), backend="kvfx", options={"policy": doc, "inner": "eager"})
        _, cache = hf_decode(comp, ids, 4)
    factors = load_artifact(half_rank).factors
    mem = kvfx.memory(cache)
    layer = {s.module_path: s.layer_index for s in kvfx.sites(comp)}
    stores = site_stores(cache)
    assert len(stores) == 2
    for path, store in stores.items():
        lat = store.lat
        assert lat.k.shape[1] == 1 and int(lat.count[0, 0]) == 128 + 3  # round(0.25 * 512) + 3 decoded
        f = factors[layer[path]]
        site = mem["sites"][path]
        # the latent buffers of the kept tokens (with the store's decode headroom), nothing else
        assert site["kv_bytes"] == lat.capacity * (f.k.rank + f.v.rank) * 4
        assert lat.capacity <= 256  # far below the 512 + 3 tokens seen (decode headroom: 64 slots)


def test_quantized_latents_error_shrinks_with_bits(llama, half_rank):
    """quant: on the latents: the logits approach the unquantized low-rank model's as bits grow,
    the store holds codes (fewer bytes than the fp32 latents), and nothing recompiles."""
    import torch._dynamo.utils as dutils

    ids = _ids(300, 16)
    outs, kvb = {}, {}
    for bits in (None, 8, 4, 2):
        doc = {"kvfx": 1, "name": f"lr-q{bits}", "lowrank": {"artifact": half_rank}}
        if bits:
            doc["quant"] = {"keys": {"bits": bits, "group": 32}, "values": {"bits": bits, "group": 16},
                            "residual": 64}
        torch._dynamo.reset()
        kvfx.reset()
        dutils.counters.clear()
        with torch.no_grad():
            comp = torch.compile(clone_model(llama), backend="kvfx", options={"policy": doc, "inner": "eager"})
            outs[bits], cache = hf_decode(comp, ids, 12)
        assert dutils.counters["stats"]["unique_graphs"] <= 3
        assert all(s.rewritten for s in kvfx.sites()), kvfx.explain()
        kvb[bits] = kvfx.memory(cache)["store_bytes"]
    err = {b: float((outs[b] - outs[None]).abs().max()) for b in (8, 4, 2)}
    assert 0 < err[8] < err[4] < err[2], err
    assert kvb[2] < kvb[4] < kvb[8] < kvb[None], kvb
