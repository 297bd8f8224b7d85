"""KernelSpec validation and URI, deterministic rendering, the source cache."""
import ast
import dataclasses
import importlib.util

import pytest

from kvfx.templates.render import cache_dir, load, render, write_source
from kvfx.templates.spec import HEAD_DIMS, KernelSpec

SPECS = [
    KernelSpec("prefill_attention", "fp16", head_dim=128, gqa_group=4, causal=True),
    KernelSpec("prefill_attention", "fp32", head_dim=64, gqa_group=1, causal=False),
    KernelSpec("decode_attention", "bf16", head_dim=256, gqa_group=8),
    KernelSpec("decode_attention", "fp32", head_dim=16, gqa_group=1),
    KernelSpec("prefill_attention", "fp16", head_dim=64, gqa_group=2, causal=True, scores="window_colsum"),
    KernelSpec("prefill_attention", "bf16", head_dim=32, gqa_group=1, causal=True, scores="colsum"),
    KernelSpec("prefill_attention", "fp32", head_dim=16, gqa_group=3, causal=False, scores="last_row"),
    KernelSpec("decode_attention", "fp16", head_dim=128, gqa_group=4, scores="last_row"),
]


def test_uri_spells_every_field():
    spec = KernelSpec("decode_attention", "fp16", head_dim=128, gqa_group=3)
    assert spec.uri == "decode_attention_dtype_fp16_hd_128_g_3_causal_0_scores_none_qbits_0_calib_0"
    full = KernelSpec("prefill_attention", "bf16", 64, 2, True, "colsum", 4, True)
    assert full.uri == "prefill_attention_dtype_bf16_hd_64_g_2_causal_1_scores_colsum_qbits_4_calib_1"
    for kind in ("window_colsum", "last_row"):
        assert f"_scores_{kind}_" in dataclasses.replace(full, scores=kind).uri
    # Changing any single field changes the URI: no two specs share a cached source.
    base = dataclasses.replace(full, causal=False, scores="last_row")  # last_row: valid for decode too
    variants = {"kind": "decode_attention", "dtype": "fp32", "head_dim": 32, "gqa_group": 5,
                "causal": True, "scores": "window_colsum", "quant_bits": 2, "calibration": False}
    # The quantized-store fields only vary on the quant kinds: test_quant_kernels.py covers them;
    # the latent ranks only on latent_decode_attention (below).
    quant_fields = {"key_bits", "key_group", "value_bits", "value_group", "outlier_pool", "outlier_norm"}
    latent_fields = {"key_rank", "value_rank"}
    # ragged only on decode_attention / select_gather (tests/templates/test_ragged_kernel.py; below)
    assert set(variants) | quant_fields | latent_fields | {"ragged"} == {f.name for f in dataclasses.fields(KernelSpec)}
    for spec in (KernelSpec("decode_attention", "fp16", 64, 2), KernelSpec("select_gather", "fp16", 64)):
        assert dataclasses.replace(spec, ragged=True).uri != spec.uri
    for name, value in variants.items():
        assert dataclasses.replace(base, **{name: value}).uri != base.uri, name
    latent = KernelSpec("latent_decode_attention", "fp16", 64, 2, key_rank=48, value_rank=32)
    for name, value in (("key_rank", 32), ("value_rank", 48), ("head_dim", 128), ("gqa_group", 3)):
        assert dataclasses.replace(latent, **{name: value}).uri != latent.uri, name


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("head_dim", "64; import os", r"head_dim: got '64; import os' \(str\), expected an int"),
        ("head_dim", 96, r"head_dim: got 96, expected one of 16, 32, 64, 128, 256"),
        ("head_dim", True, r"head_dim: got True \(bool\)"),
        ("dtype", "fp16\nimport os", r"dtype: got 'fp16\\nimport os', expected one of fp32, fp16, bf16"),
        ("kind", "{{ 7*7 }}", r"kind: got '\{\{ 7\*7 \}\}', expected one of prefill_attention"),
        ("gqa_group", 0, r"gqa_group: got 0, expected an int in \[1, 64\]"),
        ("causal", 1, r"causal: got 1, expected True or False"),
        ("scores", "__import__('os')", r"scores: got .*, expected one of none, window_colsum"),
        ("quant_bits", 3, r"quant_bits: got 3, expected one of 0, 2, 4, 8"),
        ("calibration", "yes", r"calibration: got 'yes', expected True or False"),
    ],
)
def test_invalid_fields_are_rejected(field, value, match):
    kwargs = dict(kind="prefill_attention", dtype="fp16", head_dim=64)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        KernelSpec(**kwargs)


def test_decode_spec_cannot_be_causal():
    with pytest.raises(ValueError, match="causal: got True for decode_attention, expected False"):
        KernelSpec("decode_attention", "fp16", 64, causal=True)


@pytest.mark.parametrize("scores", ["window_colsum", "colsum"])
def test_decode_spec_scores_are_none_or_last_row(scores):
    with pytest.raises(ValueError, match=f"scores: got '{scores}' for decode_attention, expected one of "
                                         "none, last_row"):
        KernelSpec("decode_attention", "fp16", 64, scores=scores)


def test_spec_is_frozen_and_hashable():
    spec = SPECS[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.head_dim = 64
    assert hash(spec) == hash(KernelSpec("prefill_attention", "fp16", 128, 4, True))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.uri)
def test_render_is_deterministic_valid_python_and_names_its_kernels(spec):
    src = render(spec)
    assert src == render(dataclasses.replace(spec))
    ast.parse(src)
    assert f"# URI: {spec.uri}\n" in src
    assert f"def _kvfx_{spec.kind}_kernel(" in src
    assert f"HEAD_DIM == {spec.head_dim})" in src and f"GQA_GROUP == {spec.gqa_group})" in src
    assert "{{" not in src and "{%" not in src


def test_render_structural_variants_differ():
    causal = render(KernelSpec("prefill_attention", "fp16", 64, causal=True))
    plain = render(KernelSpec("prefill_attention", "fp16", 64, causal=False))
    assert "offs_m[:, None] + (N_K - N_Q)" in causal and "offs_m[:, None] + (N_K - N_Q)" not in plain
    fp32 = render(KernelSpec("prefill_attention", "fp32", 64))
    assert 'input_precision="ieee"' in fp32 and 'input_precision="ieee"' not in plain


def test_render_score_variants():
    plain = render(KernelSpec("prefill_attention", "fp16", 64, causal=True))
    srcs = {kind: render(KernelSpec("prefill_attention", "fp16", 64, causal=True, scores=kind))
            for kind in ("window_colsum", "colsum", "last_row")}
    def code(src):  # the kernel, without the header comments (which name every option)
        return src[src.index("@triton.jit"):]

    assert "atomic_add" not in plain and "SCORES" not in code(plain) and "pass 2" not in plain
    for kind, src in srcs.items():
        assert "tl.atomic_add(s_base + cols * stride_sn" in src and "stride_sb, stride_sh, stride_sn" in src
        assert f"# Fused eviction scores (scores={kind})" in src and "[Note] fp32 atomics" in src
        assert ("WINDOW" in code(src)) == (kind == "window_colsum"), kind
    assert "vote_lo = N_Q - WINDOW" in srcs["window_colsum"]
    assert "vote_lo = 0" in srcs["colsum"] and "vote_lo = N_Q - 1" in srcs["last_row"]
    # The none variant's kernel body is the score variants' up to the pass-2 block.
    body = plain[plain.index("    tl.static_assert(HEAD_DIM"):]
    assert body in srcs["colsum"]
    dec = render(KernelSpec("decode_attention", "fp16", 64, scores="last_row"))
    dec_plain = render(KernelSpec("decode_attention", "fp16", 64))
    assert "def _kvfx_decode_attention_probs_kernel(" in dec and "PROBS" in dec
    assert "_probs_kernel" not in dec_plain and "PROBS" not in code(dec_plain)


@pytest.mark.parametrize("field, value", [("quant_bits", 4), ("calibration", True)])
def test_render_rejects_slots_not_implemented_yet(field, value):
    spec = dataclasses.replace(SPECS[0], **{field: value})
    with pytest.raises(NotImplementedError, match=f"no '{field}="):
        render(spec)


def test_render_rejects_non_spec():
    with pytest.raises(TypeError, match="expected a KernelSpec"):
        render({"kind": "prefill_attention"})


def test_source_is_written_once_per_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    spec = SPECS[2]
    path = write_source(spec)
    assert path == cache_dir() / f"{spec.uri}.py" and path.parent.parent == tmp_path
    assert path.read_text() == render(spec)
    stamp = path.stat().st_mtime_ns
    assert write_source(spec) == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    path.write_text("# stale source from an older template\n")  # same version, edited template
    write_source(spec)
    assert path.read_text() == render(spec)


def test_default_cache_dir_is_per_user_and_versioned(monkeypatch, tmp_path):
    monkeypatch.delenv("KVFX_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    d = cache_dir()
    assert d.parent == tmp_path / ".cache" / "kvfx" / "kernels" and d.name


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_load_imports_the_cached_file_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = SPECS[3]
    load.cache_clear()
    try:
        module = load(spec)
        path = cache_dir() / f"{spec.uri}.py"
        assert module.__file__ == str(path)
        assert hasattr(module, "_kvfx_decode_attention_kernel")
        assert hasattr(module, "_kvfx_decode_attention_reduce_kernel")
        assert load(spec) is module
        stamp = path.stat().st_mtime_ns
        load.cache_clear()
        load(spec)
        assert path.stat().st_mtime_ns == stamp
    finally:
        load.cache_clear()


def test_head_dims_match_error_messages():
    assert HEAD_DIMS == (16, 32, 64, 128, 256)
