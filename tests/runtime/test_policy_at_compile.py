"""Policy errors that need the model surface as kvfx.PolicyError before any token is generated:
at kvfx.compile for a malformed policy, and at the first forward (the graph's compile) for an
override that matches no attention site, as the one located line, never wrapped by dynamo."""

import pytest
import torch

import kvfx
from kvfx.policy import PolicyError
from zoo import hf_model


def _ids():
    return torch.randint(1, 90, (1, 12), generator=torch.Generator().manual_seed(0))


def test_malformed_policy_fails_at_kvfx_compile():
    model = hf_model("llama")
    with pytest.raises(PolicyError, match=r"budget.keep: got 2\.0"):
        kvfx.compile(model, {"kvfx": 1, "name": "bad", "extends": "snapkv", "budget": {"keep": 2.0}})
    assert not hasattr(model, "_compiled_call_impl") or model._compiled_call_impl is None


@pytest.mark.parametrize("match", [99, "*.mlp", -9])
@pytest.mark.parametrize("how", ["kvfx.compile", "model.compile"])
def test_override_matching_no_layer_is_a_policy_error(tmp_path, match, how):
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"kvfx": 1, "name": "p", "extends": "snapkv",
                                    "layers": [{"match": match, "budget": {"keep": 0.5}}]}, sort_keys=False))
    model = hf_model("llama")
    if how == "kvfx.compile":
        kvfx.compile(model, str(path), inner="eager")
    else:
        model.compile(backend="kvfx", options={"policy": str(path), "inner": "eager"})
    with pytest.raises(PolicyError) as info:
        model.generate(_ids(), max_new_tokens=2, do_sample=False)
    msg = str(info.value)
    assert msg.startswith(f"{path}:") and "layers[0].match: got" in msg and "\n" not in msg, msg
    assert "attention site" in msg and info.value.line is not None


def test_matching_override_and_name_at_keep_compile_and_run():
    model = hf_model("llama")
    kvfx.compile(model, "keydiff@0.5", inner="eager")
    out = model.generate(_ids(), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 15)
    model2 = hf_model("llama")
    model2.compile(backend="kvfx", options={"policy": "chunkkv@0.5", "inner": "eager"})
    assert model2.generate(_ids(), max_new_tokens=3, do_sample=False).shape == (1, 15)
    assert all(s.rewritten for s in kvfx.sites(model2)) and kvfx.sites(model2)
