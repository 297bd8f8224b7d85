"""The public contract: names, frozen strict models, JSON Schema, torch-free imports."""

import ast
import copy
import json
import pickle
from pathlib import Path

import pydantic
import pytest

import kvfx.policy as kp
from kvfx.policy import LayerPolicy, PolicyError, list_presets, load_policy, policy_json_schema
from kvfx.policy.loader import PRESET_DIR
from kvfx.policy.resolve import PolicyDoc


def test_exports():
    assert set(kp.__all__) == {"Policy", "LayerPolicy", "PolicyError", "load_policy", "list_presets",
                               "policy_json_schema"}


def test_policy_imports_no_fx_kernels_or_runtime():
    """The policy package reads the scorer registry (``kvfx.methods.registry``, which imports the
    method files and so torch) and nothing else of kvfx: no torch.fx, kernels, passes or runtime."""
    forbidden = ("torch", "triton", "kvfx.passes", "kvfx.templates", "kvfx.runtime", "kvfx.methods",
                 "kvfx.backend")
    allowed = ("kvfx.methods.registry", "kvfx.methods")
    for f in Path(kp.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.module == "kvfx.methods":
                    assert [a.name for a in node.names] == ["registry"], f
            else:
                names = []
            assert not [n for n in names if n.startswith(forbidden) and n not in allowed], f


def test_layer_policy_fields_and_defaults():
    lp = LayerPolicy()
    assert (lp.budget.keep, lp.budget.tokens, lp.budget.sink, lp.budget.window) == (None, None, 4, 32)
    assert (lp.budget.schedule, lp.budget.max_tokens) == ("uniform", None)
    ev = lp.eviction
    assert (ev.scorer, ev.pool.kind, ev.pool.kernel, ev.group_reduce) == ("none", "max", 7, "mean")
    assert (ev.heavy, ev.recent, ev.lag, ev.score_v_ratio) == (0.1, 0.1, 128, 1.0)
    assert lp.calibration is None and lp.quant is None and lp.lowrank is None
    assert not lp.compresses and lp.describe() == "full"


def test_describe_and_compresses():
    lp = LayerPolicy(eviction={"scorer": "streaming"}, budget={"sink": 4, "window": 64})
    assert lp.describe() == "streaming sink=4 window=64" and lp.compresses
    assert LayerPolicy(lowrank={"artifact": "f.safetensors"}).compresses
    full = load_policy("snapkv-calidrop-ott2").base.describe()
    assert full.startswith("snapkv keep=0.25") and "calidrop" in full and "outliers" in full


def test_models_are_frozen_and_strict():
    lp = load_policy("snapkv").base
    with pytest.raises(pydantic.ValidationError):
        lp.budget.keep = 0.5
    with pytest.raises(pydantic.ValidationError):
        LayerPolicy(budget={"keep": 0.5, "bogus": 1})
    with pytest.raises(pydantic.ValidationError):
        LayerPolicy(quant={"keys": {"bits": "4"}})
    assert hash(lp) == hash(copy.deepcopy(lp))


def test_policy_handle():
    p = load_policy("snapkv")
    assert load_policy(p) is p and load_policy("snapkv") is p
    with pytest.raises(AttributeError):
        p.name = "x"
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.source == p.source and q.resolve(0, "a", 1) == p.resolve(0, "a", 1)
    assert "snapkv" in repr(p)
    assert PolicyDoc.model_validate(p.to_dict()).name == "snapkv"


def test_paths_and_yml(tmp_path):
    f = tmp_path / "p.yml"
    f.write_text((PRESET_DIR / "h2o.yaml").read_text())
    assert load_policy(f).hash == load_policy(str(f)).hash == load_policy("h2o").hash
    assert load_policy(f).source == str(f)


def test_calibration_and_lowrank_fields():
    lp = LayerPolicy(eviction={"scorer": "tova"}, budget={"keep": 0.5},
                     calibration={"recompute": {"bits": 4, "threshold": 0.5}})
    c = lp.calibration
    assert (c.method, c.history, c.threshold) == ("calidrop", 32, 0.9)
    assert (c.recompute.bits, c.recompute.threshold) == (4, 0.5)
    assert LayerPolicy(lowrank={}).lowrank.artifact is None


def test_json_schema_refs_resolve():
    schema = policy_json_schema()
    text = json.dumps(schema)
    defs = schema["$defs"]
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/$defs/')[1:]}:
        assert ref in defs
    layer = defs["LayerOverride"]["properties"]
    assert any("$ref" in a for a in layer["quant"]["anyOf"])
    assert defs["QuantSide"]["properties"]["bits"]["enum"] == [2, 4, 8]


def test_presets_validate_against_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = policy_json_schema()
    for name in list_presets():
        jsonschema.validate(load_policy(name).to_dict(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kvfx": 1, "name": "x", "quant": {"keys": {"bits": 3}}}, schema)


def test_policy_error_is_single_line():
    e = PolicyError("a\nb  c")
    assert str(e) == "a b c"


def test_quant_residual_dtype_default_keeps_the_hash():
    """quant.residual_dtype: model (the default) hashes as before the field existed (committed
    results keep their policy_hash); float16 hashes differently and reaches the layer policy."""
    assert load_policy("kivi2").hash == "758055d47cfb"  # the hash at commit 4be8556
    assert load_policy("ott2").hash == "774f528033f9"
    narrow = load_policy({"kvfx": 1, "name": "kivi2", "extends": "kivi2", "quant": {"residual_dtype": "float16"}})
    assert narrow.hash != load_policy("kivi2").hash
    assert narrow.resolve(0, "model.layers.0.self_attn", 1).quant.residual_dtype == "float16"
