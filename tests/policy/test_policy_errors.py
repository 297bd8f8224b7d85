"""Malformed policies: each error is one line, FILE:LINE:COL key.path: got VALUE, expected WHAT."""

import re
from pathlib import Path

import pytest

from kvfx.methods import registry

from kvfx.policy import PolicyError, load_policy

BAD = Path(__file__).with_name("bad")

# file -> (LINE:COL or OTHER_FILE:LINE:COL, key path (None: YAML error), got VALUE, regex after "expected ")
CASES = {
    "artifact_pickle.yaml": ("4:13", "lowrank.artifact", "'factors.pt'", r"a \.safetensors file"),
    "bad_enum.yaml": ("5:11", "eviction.scorer", "'snapkvv'",
                      "one of " + ", ".join(registry.scorers()) + "$"),  # every registered scorer
    "bad_extends.yaml": ("3:10", "extends", "'snapkb'",
                         r"a preset name \(did you mean snapkv\?\) or a path to a \.yaml file; "
                         r"presets: adakv-snapkv, chunkkv, .*\bfull, "),
    "bad_extends_path.yaml": ("3:10", "extends", "'./missing/base.yaml'",
                              r"a preset name or an existing \.yaml file"),
    "bad_yaml.yaml": ("5:8", None, None, "mapping values are not allowed here$"),
    "bits_3.yaml": ("4:18", "quant.keys.bits", "3", "one of 2, 4, 8$"),
    "bool_bits.yaml": ("4:16", "quant.keys.bits", "true", "one of 2, 4, 8$"),
    "budget_missing.yaml": ("1:1", "budget.keep", "nothing",
                            r"budget\.keep or budget\.tokens with eviction\.scorer snapkv "
                            r"\(e\.g\. keep: 0\.25\)$"),
    "calibration_without_eviction.yaml": ("4:1", "calibration", "'calidrop'",
                                          r"eviction\.scorer set too: .*remove calibration\)$"),
    "cycle_a.yaml": ("cycle_b.yaml:3:10", "extends", "'cycle_a.yaml'",
                     r"a policy that does not extend itself "
                     r"\(cycle: .*cycle_a\.yaml -> .*cycle_b\.yaml -> .*cycle_a\.yaml\)$"),
    "cycle_b.yaml": ("cycle_a.yaml:3:10", "extends", "'cycle_b.yaml'",
                     "a policy that does not extend itself"),
    "duplicate_key.yaml": ("5:3", "budget.keep", "'keep' twice", "each key once$"),
    "even_pool_kernel.yaml": ("6:29", "eviction.pool.kernel", "6",
                              r"an odd integer \(same padding needs a centre; use 5 or 7\)$"),
    "group_not_power_of_two.yaml": ("4:26", "quant.keys.group", "24", "a power of two from 4 to 256"),
    "keep_and_tokens.yaml": ("5:11", "budget.tokens", "1024",
                             r"only one of budget\.keep \(0\.25\) and budget\.tokens \(remove one\)$"),
    "keep_too_big.yaml": ("4:9", "budget.keep", "1.5", r"a number in \(0, 1\]$"),
    "keep_zero.yaml": ("4:9", "budget.keep", "0", r"a number in \(0, 1\]$"),
    "max_tokens_without_scorer.yaml": ("4:15", "budget.max_tokens", "4096",
                                       r"null with eviction\.scorer none"),
    "method_field_mismatch.yaml": ("6:8", "eviction.lag", "64",
                                   r"no lag with scorer snapkv: it is a lagkv parameter \(remove it or set "
                                   r"scorer: lagkv\)$"),
    "missing_name.yaml": ("1:1", "name", "nothing", "a policy name"),
    "missing_version.yaml": ("1:1", "kvfx", "nothing", "1, the schema version"),
    "negative_window.yaml": ("5:11", "budget.window", "-8", "an integer >= 0$"),
    "outliers_per_group.yaml": ("5:25", "quant.outliers.per_group", "32", r"< quant\.keys\.group \(32\)$"),
    "override_bad_bits.yaml": ("9:20", "layers[1].quant.keys.bits", "5", "one of 2, 4, 8$"),
    "override_bad_range.yaml": ("5:16", "layers[0].match[1]", "'7-3'",
                                r"a range with start <= end \(write '3-7'\)$"),
    "override_without_section.yaml": ("5:5", "layers[0]", '{"match": 3}',
                                      "match plus at least one of budget, eviction"),
    "pyramid_without_budget.yaml": ("4:13", "budget.schedule", "'pyramid'",
                                    r"budget\.keep or budget\.tokens"),
    "recompute_threshold.yaml": ("6:35", "calibration.recompute.threshold", "0.95",
                                 r"< calibration\.threshold \(0\.9\)"),
    "residual_not_multiple.yaml": ("6:13", "quant.residual", "100",
                                   r"a multiple of quant\.keys\.group \(32\), e\.g\. 96 or 128$"),
    "residual_dtype.yaml": ("5:19", "quant.residual_dtype", "'float8'", "one of model, float16, bfloat16$"),
    "schema_version_2.yaml": ("1:7", "kvfx", "2", "1, the schema version"),
    "top_level_list.yaml": ("1:1", "policy", "a list", "a mapping of policy keys"),
    "unknown_key.yaml": ("6:3", "eviction.pooling", "unknown key 'pooling'",
                         r"one of scorer, .*\bpool\b.* \(did you mean pool\?\)$"),
    "unsafe_tag.yaml": ("4:13", None, None,
                        r"unsupported tag 'tag:yaml\.org,2002:python/object/apply:os\.system'$"),
    "wrong_type.yaml": ("5:9", "budget.sink", "'four'", "an integer >= 0$"),
}


def expected_message(name):
    pos, path, got, expected = CASES[name]
    where = str(BAD / pos) if ".yaml:" in pos else f"{BAD / name}:{pos}"
    if path is None:
        return "^" + re.escape(f"{where}: invalid YAML: ") + expected
    return "^" + re.escape(f"{where} {path}: got {got}, expected ") + expected


def test_every_fixture_has_a_case():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(CASES)
    assert len(CASES) >= 12


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_policy(name):
    with pytest.raises(PolicyError, match=expected_message(name)) as info:
        load_policy(str(BAD / name))
    assert "\n" not in str(info.value)
    assert info.value.line is not None and info.value.col is not None


def test_error_parts_are_attributes():
    with pytest.raises(PolicyError) as info:
        load_policy(BAD / "bits_3.yaml")
    e = info.value
    assert (e.file, e.line, e.col, e.path) == (str(BAD / "bits_3.yaml"), 4, 18, "quant.keys.bits")
    assert isinstance(e, ValueError)


@pytest.mark.parametrize("spec,pattern", [
    ({"quant": {"keys": {"bits": 3}}}, r"^<dict> quant\.keys\.bits: got 3, expected one of 2, 4, 8$"),
    ({"kvfx": 2}, r"^<dict> kvfx: got 2, expected 1"),
    ({"budget": {"keep": 0}}, r"^<dict> budget\.keep: got 0, expected a number in \(0, 1\]$"),
    ({"eviction": {"scorer": "h2o"}, "budget": {"keep": 0.2, "tokens": 64}},
     r"^<dict> budget\.tokens: got 64, expected only one of"),
    ({"budget": {"sink": "4"}}, r"^<dict> budget\.sink: got '4', expected an integer >= 0$"),
    ({"eviction": "snapkv"}, r"^<dict> eviction: got 'snapkv', expected a mapping$"),
    ({"layers": {"match": 1}}, r"^<dict> layers: got \{\"match\": 1\}, expected a list$"),
    ({"layers": [{"match": 1.5, "quant": {}}]},
     r"^<dict> layers\[0\]\.match: got 1\.5, expected a layer index"),
    ({"layers": [{"quant": {}}]}, r"^<dict> layers\[0\]\.match: got nothing, expected match \(.*\), window "
                                  r"\(true: sliding-window layers\), or both$"),
    ({"layers": [{"match": 0, "quant": {"residual": 48}}]},
     r"^<dict> layers\[0\]\.quant\.residual: got 48, expected a multiple of quant\.keys\.group \(32\), "
     r"e\.g\. 32 or 64$"),
    ({"name": "no spaces"}, r"^<dict> name: got 'no spaces', expected policy name: letters, digits"),
    ({"eviction": {"scorer": "lagkv", "lag": 4}, "budget": {"keep": 0.1}},
     r"^<dict> eviction\.lag: got 4, expected >= 11 with budget\.keep 0\.1"),
    ({"eviction": {"scorer": "lagkv"}, "budget": {"tokens": 512}},
     r"^<dict> budget\.tokens: got 512, expected budget\.keep with scorer lagkv"),
    ({"eviction": {"scorer": "streaming"}, "budget": {"sink": 0, "window": 0}},
     r"^<dict> budget\.window: got 0, expected > 0 with scorer streaming"),
    ({"eviction": {"scorer": "snapkv"}, "budget": {"keep": 0.5, "window": 0}},
     r"^<dict> budget\.window: got 0, expected >= 1 with scorer snapkv"),
    ({"eviction": {"scorer": "h2o", "heavy": 0, "recent": 0}, "budget": {"keep": 0.5}},
     r"^<dict> eviction\.heavy: got 0\.0, expected heavy \+ recent > 0"),
    ({"budget": {"tokens": 16}}, r"^<dict> budget\.tokens: got 16, expected >= sink \+ window = 36"),
    ({"quant": {"keys": {"axis": "token"}, "outliers": {}}},
     r"^<dict> quant\.outliers: got .*expected keys\.axis channel"),
    ({"extends": "snapkv", "quant": {"keys": {"bits": 16}}}, r"^<dict> quant\.keys\.bits: got 16"),
    ({"extends": "snapkv", "layers": [{"match": 0, "quant": {"keyz": {}}}]},
     r"^<dict> layers\[0\]\.quant\.keyz: got unknown key 'keyz', expected one of keys, values, residual, "
     r"outliers, residual_dtype \(did you mean keys\?\)$"),
    ({"extends": "snapkv", "layers": [{"match": 0, "quant": 4}]},
     r"^<dict> layers\[0\]\.quant: got 4, expected a mapping$"),
    ({"extends": "snapkv.yaml"},
     r"^<dict> extends: got 'snapkv\.yaml', expected .*did you mean extends: snapkv\?\)$"),
])
def test_dict_errors_have_no_position(spec, pattern):
    with pytest.raises(PolicyError, match=pattern):
        load_policy(spec)


def test_error_from_preset_value_points_at_preset():
    with pytest.raises(PolicyError, match=r"^<preset h2o>:8:11 budget\.window: got 0, expected >= 1 "
                       r"with scorer snapkv \(the observation window\)$"):
        load_policy({"extends": "h2o", "eviction": {"scorer": "snapkv", "heavy": None, "recent": None}})


@pytest.mark.parametrize("spec,pattern", [
    ("snapkb", r"^policy: got 'snapkb', expected a preset name \(did you mean snapkv\?\)"),
    (42, r"^policy: got int, expected a preset name, a path to a \.yaml file, a dict or a Policy$"),
    ("does/not/exist.yaml", r"^does/not/exist\.yaml: cannot read policy file: No such file or directory$"),
])
def test_bad_spec(spec, pattern):
    with pytest.raises(PolicyError, match=pattern):
        load_policy(spec)


@pytest.mark.parametrize("text,pattern", [
    ("kvfx: 1\nname: x\n<<: {budget: {keep: 0.5}}\n", r"x\.yaml:3:1 <<: got a merge key"),
    ("kvfx: 1\nname: x\n1: 2\n", r"x\.yaml:3:1 policy: got key 1, expected a string key$"),
    ("kvfx: 1\nname: x\n---\nkvfx: 1\n",
     r"x\.yaml:3:1: invalid YAML: expected a single document in the stream, but found another document$"),
    ("a: &a [*a]\n", r"x\.yaml:1:4: invalid YAML: a recursive alias$|x\.yaml:1:\d+: invalid YAML"),
    ("kvfx: 1\nname: x\nbudget: {keep: !!float 0.5, sink: !custom 4}\n", r"x\.yaml:3:\d+: invalid YAML: "),
    ("", r"x\.yaml:1:1 kvfx: got nothing"),
    ("\tkvfx: 1\n", r"x\.yaml:1:1: invalid YAML: "),
])
def test_yaml_edge_cases(tmp_path, text, pattern):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError, match=pattern) as info:
        load_policy(f)
    assert "\n" not in str(info.value)
