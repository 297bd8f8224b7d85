"""layers: overrides: int, list, range, glob, negative index, last wins, partial merge, check_overrides."""

import pytest

from kvfx.policy import PolicyError, load_policy


def sites(n=8):
    return [(i, f"model.layers.{i}.self_attn") for i in range(n)]


def resolved(policy, n=8):
    return [policy.resolve(i, path, n) for i, path in sites(n)]


def scorers(policy, n=8):
    return [lp.eviction.scorer for lp in resolved(policy, n)]


def with_layers(*layers, parent="snapkv"):
    return load_policy({"extends": parent, "layers": list(layers)})


OFF = {"eviction": {"scorer": "none"}}


@pytest.mark.parametrize("match,expected", [
    (3, [3]),
    ([0, 7], [0, 7]),
    ("2-4", [2, 3, 4]),
    (["0-1", 6], [0, 1, 6]),
    ("6", [6]),
    (-1, [7]),
    ("model.layers.3.*", [3]),
    ("*.layers.[56].*", [5, 6]),
    ("*.self_attn", list(range(8))),
    (["model.layers.0.*", "3-4", 7], [0, 3, 4, 7]),
])
def test_match_forms(match, expected):
    p = with_layers({"match": match, **OFF})
    assert [i for i, s in enumerate(scorers(p)) if s == "none"] == expected
    p.check_overrides(sites())


def test_glob_does_not_match_other_modules():
    p = with_layers({"match": "*.self_attn", **OFF})
    assert p.resolve(0, "model.layers.0.cross_attn", 8).eviction.scorer == "snapkv"


def test_last_match_wins_and_merges_partially():
    p = with_layers({"match": "*.self_attn", "budget": {"keep": 0.5}, "quant": {"keys": {"bits": 4}}},
                    {"match": "2-3", "budget": {"keep": 0.1}},
                    {"match": 3, "quant": {"values": {"bits": 8}}}, parent="snapkv-ott2")
    lps = resolved(p)
    assert [lp.budget.keep for lp in lps[:5]] == [0.5, 0.5, 0.1, 0.1, 0.5]
    q = lps[3].quant
    assert (q.keys.bits, q.values.bits, q.keys.group, q.outliers.pool) == (4, 8, 32, 64)   # deep, partial
    assert lps[0].budget.window == 32 and lps[0].eviction.pool.kernel == 7


def test_override_null_removes_section_for_matched_layers():
    p = with_layers({"match": [0, 1], "quant": None, "calibration": None}, parent="snapkv-calidrop-ott2")
    lps = resolved(p)
    assert lps[0].quant is None and lps[1].calibration is None
    assert lps[2].quant is not None and lps[2].calibration is not None


def test_override_adds_section():
    p = with_layers({"match": "4-7", "quant": {}}, parent="snapkv")
    assert [lp.quant is not None for lp in resolved(p)] == [False] * 4 + [True] * 4
    assert resolved(p)[5].quant == load_policy("kivi2").base.quant


def test_resolve_is_cached_and_hashable():
    p = load_policy("knorm")
    assert p.resolve(0, "a", 4) is p.resolve(1, "b", 4)
    assert len({p.resolve(i, "x", 4) for i in range(4)}) == 2


def test_resolve_rejects_out_of_range_layer():
    with pytest.raises(PolicyError, match=r"layer_index 4 of num_layers 4"):
        load_policy("snapkv").resolve(4, "model.layers.4.self_attn", 4)


def test_check_overrides_names_unmatched_override(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("kvfx: 1\nname: p\nextends: snapkv\nlayers:\n  - match: 0\n    eviction: {scorer: none}\n"
                 "  - match: [40, 41]\n    budget: {keep: 0.1}\n")
    p = load_policy(f)
    with pytest.raises(PolicyError, match=r"p\.yaml:7:5 layers\[1\]\.match: got \[40, 41\], expected to "
                       r"match at least one attention site of the model \(layers 0-7, "
                       r"e\.g\. 'model\.layers\.0\.self_attn'\); fix the match or remove layers\[1\]$"):
        p.check_overrides(sites())
    p.check_overrides(sites(42))


def test_check_overrides_glob_and_dict_source():
    p = with_layers({"match": "*.attention", **OFF})
    with pytest.raises(PolicyError,
                       match=r"^<dict> layers\[0\]\.match: got '\*\.attention', expected to match"):
        p.check_overrides(sites())


def test_combination_of_valid_overrides_checked_at_resolve(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("kvfx: 1\nname: c\nextends: snapkv\nlayers:\n"
                 "  - match: 0-3\n    budget: {keep: null, tokens: 512}\n"
                 "  - match: 3-5\n    budget: {keep: 0.5}\n")
    p = load_policy(f)           # each override alone is valid
    assert p.resolve(0, "a", 8).budget.tokens == 512 and p.resolve(5, "a", 8).budget.keep == 0.5
    with pytest.raises(PolicyError, match=r"c\.yaml:8:5 layers\[1\]\.budget\.tokens: got 512, expected only "
                       r"one of budget\.keep \(0\.5\) and budget\.tokens \(remove one\) \(at layer 3, a\)$"):
        p.resolve(3, "a", 8)


def test_window_override_applies_by_layer_kind():
    p = load_policy({"kvfx": 1, "name": "w", "extends": "snapkv", "layers": [
        {"window": True, "eviction": {"scorer": "none"}, "quant": {"keys": {"bits": 2}, "values": {"bits": 2}}},
        {"match": 0, "window": False, "budget": {"keep": 0.5}}]})
    assert p.resolve(1, "m.1", 4, window=True).quant is not None
    assert p.resolve(1, "m.1", 4, window=False).quant is None
    assert p.resolve(1, "m.1", 4).quant is None  # kind unknown (no model): window overrides do not apply
    assert p.resolve(0, "m.0", 4, window=False).budget.keep == 0.5
    assert p.resolve(0, "m.0", 4, window=True).budget.keep == 0.25  # match 0 but not a global layer
    assert p.targets_window(2, "m.2", 4) == 0 and p.targets_window(2, "m.2", 4) is not None
    p.check_overrides([(0, "m.0", False), (1, "m.1", True)])
    p.check_overrides([(0, "m.0"), (1, "m.1")])  # kinds unknown: window overrides are not checked
    with pytest.raises(PolicyError, match=r"layers\[0\]\.window: got true, expected to match at least one "
                                          r"attention site .*0 of them sliding-window layers"):
        p.check_overrides([(0, "m.0", False), (1, "m.1", False)])


def test_window_override_needs_a_section():
    with pytest.raises(PolicyError, match=r"layers\[0\]: got \{\"window\": true\}, expected window plus at least one of"):
        load_policy({"kvfx": 1, "name": "w", "extends": "full", "layers": [{"window": True}]})
