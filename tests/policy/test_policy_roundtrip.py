"""Hypothesis: valid budgets survive to_dict -> load (dict and YAML); invalid keeps are named errors."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest

from kvfx.policy import PolicyError, load_policy

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def budgets(draw):
    sink, window = draw(st.integers(0, 64)), draw(st.integers(1, 512))
    b = {"sink": sink, "window": window, "schedule": draw(st.sampled_from(["uniform", "pyramid"]))}
    if draw(st.booleans()):
        b["keep"] = draw(st.floats(min_value=1e-6, max_value=1.0, allow_nan=False))
    else:
        b["tokens"] = draw(st.integers(sink + window, 1 << 20))
    if draw(st.booleans()):
        b["max_tokens"] = draw(st.integers(sink + window, 1 << 20))
    return b


@SETTINGS
@given(budget=budgets(), scorer=st.sampled_from(["knorm", "snapkv", "h2o", "tova"]))
def test_valid_budget_round_trips(tmp_path, budget, scorer):
    p = load_policy({"kvfx": 1, "name": "rt", "budget": budget, "eviction": {"scorer": scorer}})
    d = p.to_dict()
    q = load_policy(d)
    assert q.hash == p.hash and q.to_dict() == d and q.name == "rt"
    lp = q.resolve(0, "model.layers.0.self_attn", 1)
    assert {k: getattr(lp.budget, k) for k in budget} == budget
    f = tmp_path / "rt.yaml"
    f.write_text(yaml.safe_dump(d))
    assert load_policy(f).hash == p.hash


@SETTINGS
@given(keep=st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0, exclude_min=True)))
def test_keep_outside_unit_interval_is_named(keep):
    with pytest.raises(PolicyError, match=r"^<dict> budget\.keep: got .*, expected a number in \(0, 1\]$"):
        load_policy({"budget": {"keep": keep}, "eviction": {"scorer": "snapkv"}})


@SETTINGS
@given(layers=st.lists(st.fixed_dictionaries({
    "match": st.one_of(st.integers(0, 7), st.sampled_from(["0-3", "*.self_attn", "model.layers.5.*"])),
    "budget": st.fixed_dictionaries({"keep": st.sampled_from([0.1, 0.5, 1.0])})}), max_size=4))
def test_overrides_round_trip_and_last_wins(layers):
    p = load_policy({"extends": "snapkv", "layers": layers})
    q = load_policy(p.to_dict())
    for i in range(8):
        path = f"model.layers.{i}.self_attn"
        assert q.resolve(i, path, 8) == p.resolve(i, path, 8)
        hits = [o for o in layers if o["match"] in (i, "*.self_attn")
                or (o["match"] == "0-3" and i <= 3) or (o["match"] == "model.layers.5.*" and i == 5)]
        assert p.resolve(i, path, 8).budget.keep == (hits[-1]["budget"]["keep"] if hits else 0.25)
