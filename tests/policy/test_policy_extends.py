"""extends: deep merge, null removal, chains, relative paths, cycles."""

import pytest

from kvfx.policy import PolicyError, load_policy


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def base(policy):
    return policy.resolve(0, "model.layers.0.self_attn", 1)


def test_deep_merge_over_preset(tmp_path):
    f = write(tmp_path / "child.yaml", "kvfx: 1\nname: child\nextends: snapkv\nbudget:\n  keep: 0.1\n"
              "eviction:\n  pool: {kernel: 5}\n")
    lp = base(load_policy(f))
    assert lp.budget.keep == 0.1 and lp.budget.window == 32 and lp.budget.sink == 4   # siblings kept
    assert (lp.eviction.scorer, lp.eviction.pool.kind, lp.eviction.pool.kernel) == ("snapkv", "max", 5)


def test_null_removes_a_section():
    p = load_policy({"extends": "snapkv-calidrop-ott2", "calibration": None, "quant": None})
    assert base(p).calibration is None and base(p).quant is None
    assert p.hash == load_policy({"extends": "snapkv", "name": "dict"}).hash


def test_null_removes_nested_and_resets_scalars():
    lp = base(load_policy({"extends": "ott2", "quant": {"outliers": None}}))
    assert lp.quant == base(load_policy("kivi2")).quant
    lp = base(load_policy({"extends": "lagkv", "eviction": {"scorer": "snapkv", "lag": None},
                           "budget": {"window": None}}))
    assert lp.eviction.scorer == "snapkv" and lp.eviction.lag == 128 and lp.budget.window == 32


def test_relative_path_chain_and_flat_hash(tmp_path):
    write(tmp_path / "base" / "root.yaml", "kvfx: 1\nname: root\nextends: kivi4\nbudget: {keep: 0.5}\n")
    write(tmp_path / "base" / "mid.yaml",
          "kvfx: 1\nname: mid\nextends: root.yaml\neviction: {scorer: knorm}\n")
    child = write(tmp_path / "sub" / "child.yaml", "kvfx: 1\nname: flat\nextends: ../base/mid.yaml\n")
    p = load_policy(str(child))
    lp = base(p)
    assert (lp.eviction.scorer, lp.budget.keep, lp.quant.keys.bits) == ("knorm", 0.5, 4)
    flat = write(tmp_path / "flat.yaml",
                 "kvfx: 1\nname: flat\nbudget: {keep: 0.5}\neviction: {scorer: knorm}\n"
                 "quant: {keys: {bits: 4}, values: {bits: 4}}\n")
    assert load_policy(flat).hash == p.hash          # hash of the resolved document
    assert p.source == str(child) and "extends" not in p.to_dict()


def test_child_layers_replace_parent_layers():
    p = load_policy({"extends": "knorm", "layers": [{"match": 5, "eviction": {"scorer": "none"}}]})
    assert base(p).eviction.scorer == "knorm"
    assert p.resolve(5, "m", 8).eviction.scorer == "none"


def test_dict_extends_path_relative_to_cwd(tmp_path, monkeypatch):
    write(tmp_path / "b.yaml", "kvfx: 1\nname: b\neviction: {scorer: streaming}\n")
    monkeypatch.chdir(tmp_path)
    p = load_policy({"extends": "b.yaml"})
    assert p.name == "dict" and base(p).eviction.scorer == "streaming"


def test_cycle_is_an_error(tmp_path):
    a = write(tmp_path / "a.yaml", "kvfx: 1\nname: a\nextends: b.yaml\n")
    write(tmp_path / "b.yaml", "kvfx: 1\nname: b\nextends: a.yaml\n")
    with pytest.raises(PolicyError, match=r"b\.yaml:3:10 extends: got 'a\.yaml', expected a policy "
                       r"that does not extend itself \(cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"):
        load_policy(a)


def test_self_extends_is_a_cycle(tmp_path):
    s = write(tmp_path / "self.yaml", "kvfx: 1\nname: s\nextends: ./self.yaml\n")
    with pytest.raises(PolicyError, match=r"self\.yaml:3:10 extends: .*cycle"):
        load_policy(s)


def test_error_in_parent_points_at_parent(tmp_path):
    write(tmp_path / "parent.yaml", "kvfx: 1\nname: p\nquant:\n  keys: {bits: 3}\n")
    child = write(tmp_path / "child.yaml", "kvfx: 1\nname: c\nextends: parent.yaml\n")
    with pytest.raises(PolicyError,
                       match=r"parent\.yaml:4:16 quant\.keys\.bits: got 3, expected one of 2, 4, 8"):
        load_policy(child)


def test_child_fixes_parent_contradiction(tmp_path):
    write(tmp_path / "parent.yaml", "kvfx: 1\nname: p\neviction: {scorer: snapkv}\n")   # needs a budget
    child = write(tmp_path / "child.yaml", "kvfx: 1\nname: c\nextends: parent.yaml\nbudget: {tokens: 2048}\n")
    assert base(load_policy(child)).budget.tokens == 2048


def test_extends_must_be_a_string(tmp_path):
    f = write(tmp_path / "x.yaml", "kvfx: 1\nname: x\nextends: [snapkv]\n")
    with pytest.raises(PolicyError, match=r'x\.yaml:3:1 extends: got \["snapkv"\], expected a preset name'):
        load_policy(f)
