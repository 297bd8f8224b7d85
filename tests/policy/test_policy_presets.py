"""Every shipped preset loads, resolves on a 32-layer model and has the paper settings."""

import re

import pytest

from kvfx.policy import LayerPolicy, list_presets, load_policy
from kvfx.policy.loader import PRESET_DIR

REQUIRED = {"full", "streaming", "knorm", "snapkv", "pyramidkv", "h2o", "tova", "lagkv", "kivi2", "kivi4",
            "ott2", "ott4", "snapkv-calidrop", "snapkv-calidrop-ott2", "snapkv-ott2"}
SITES = [(i, f"model.layers.{i}.self_attn") for i in range(32)]


def layer(name, i=5):
    return load_policy(name).resolve(i, f"model.layers.{i}.self_attn", 32)


def test_list_presets_sorted_and_complete():
    names = list_presets()
    assert names == sorted(names)
    assert REQUIRED <= set(names)


@pytest.mark.parametrize("name", list_presets())
def test_preset_loads_and_resolves(name):
    p = load_policy(name)
    assert p.name == name and p.source == f"preset:{name}"
    assert re.fullmatch(r"[0-9a-f]{12}", p.hash)
    for i, path in SITES:
        lp = p.resolve(i, path, 32)
        assert isinstance(lp, LayerPolicy)
        assert lp.describe() and "\n" not in lp.describe()
    p.check_overrides(SITES)
    assert load_policy(p.to_dict()).hash == p.hash
    assert load_policy(PRESET_DIR / f"{name}.yaml").hash == p.hash
    assert layer(name).compresses == (name != "full")


def test_full_is_identity():
    lp = layer("full")
    assert lp.describe() == "full" and lp.eviction.scorer == "none"
    assert lp.quant is None and lp.calibration is None and lp.lowrank is None


def test_streaming():
    lp = layer("streaming")
    assert (lp.eviction.scorer, lp.budget.sink, lp.budget.window) == ("streaming", 4, 256)
    assert lp.describe() == "streaming sink=4 window=256"


def test_knorm_skips_layers_0_and_1():
    assert [layer("knorm", i).eviction.scorer for i in range(4)] == ["none", "none", "knorm", "knorm"]
    assert layer("knorm").budget.keep == 0.25


def test_snapkv_and_pyramidkv():
    lp = layer("snapkv")
    assert (lp.budget.keep, lp.budget.window, lp.budget.sink, lp.budget.schedule) == (0.25, 32, 4, "uniform")
    assert (lp.eviction.pool.kind, lp.eviction.pool.kernel, lp.eviction.group_reduce) == ("max", 7, "mean")
    py = layer("pyramidkv")
    assert py.eviction == lp.eviction and py.budget.schedule == "pyramid" and py.budget.keep == 0.25


def test_h2o_tova_lagkv():
    h = layer("h2o")
    assert (h.eviction.scorer, h.eviction.heavy, h.eviction.recent, h.budget.keep) == ("h2o", 0.1, 0.1, 0.2)
    t = layer("tova")
    assert (t.eviction.scorer, t.budget.keep) == ("tova", 0.25)
    g = layer("lagkv")
    assert (g.eviction.lag, g.eviction.score_v_ratio, g.budget.keep) == (128, 1.0, 0.5)


@pytest.mark.parametrize("name,bits,outliers", [("kivi2", 2, False), ("kivi4", 4, False), ("ott2", 2, True),
                                                ("ott4", 4, True), ("snapkv-ott2", 2, True)])
def test_quant_presets(name, bits, outliers):
    q = layer(name).quant
    assert (q.keys.bits, q.keys.group, q.keys.axis) == (bits, 32, "channel")
    assert (q.values.bits, q.values.group, q.values.axis) == (bits, 32, "token")
    assert q.residual == 128
    if outliers:
        assert (q.outliers.per_group, q.outliers.pool, q.outliers.norm) == (1, 64, "l1")
    else:
        assert q.outliers is None


def test_calidrop_presets():
    for name in ("snapkv-calidrop", "snapkv-calidrop-ott2"):
        lp = layer(name)
        c = lp.calibration
        assert (c.method, c.history, c.threshold, c.adjust, c.recompute) == ("calidrop", 32, 0.5, "tangent", None)
        assert lp.eviction == layer("snapkv").eviction and lp.budget == layer("snapkv").budget
    assert layer("snapkv-calidrop").quant is None
    assert layer("snapkv-calidrop-ott2").quant == layer("ott2").quant
    assert layer("snapkv-ott2").calibration is None


def test_distinct_hashes():
    hashes = [load_policy(n).hash for n in list_presets()]
    assert len(set(hashes)) == len(hashes)
