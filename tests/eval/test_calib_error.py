"""The CaliDrop error measurement: recording a full-cache run and replaying policies on it."""

import torch

import kvfx
from kvfx.eval.calib_error import plot_calib_error, record_full, replay, variant_policy
from kvfx.policy import load_policy


def _recorded(steps=6):
    from zoo import hf_model

    kvfx.reset()
    torch._dynamo.reset()
    model = hf_model("llama", layers=2)
    model.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    ids = torch.randint(1, 90, (1, 200 + steps), generator=torch.Generator().manual_seed(0))
    return record_full(model, ids, steps)


def test_replaying_full_reproduces_the_recorded_outputs_exactly():
    rec = _recorded()
    assert len(rec) == 2 and all(len(r.steps) == 6 for r in rec.values())
    errors = replay(rec, "full", 2)
    assert all(e == 0.0 for e in errors.values()), errors


def test_compression_has_error_and_variants_are_valid_policies(tmp_path):
    rec = _recorded()
    res = {"model": "tiny", "length": 200, "steps": 6, "layers": [0, 1], "variants": {}}
    for method in ("snapkv", "streaming"):
        for cal in (False, True):
            doc = variant_policy(method, 0.25, cal, 200)
            pol = load_policy(doc)
            assert (pol.resolve(1, "m", 2).calibration is not None) == cal
            err = replay(rec, doc, 2)
            assert all(0 < e < 2 for e in err.values()), err
            res["variants"][f"{method}@0.25" + ("+calidrop(t=0.5,tangent)" if cal else "")] = list(err.values())
    assert load_policy(variant_policy("streaming", 0.25, False, 200)).resolve(0, "m", 2).budget.window == 46
    plot_calib_error(res, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 10_000


def test_hit_rate_follows_the_threshold_and_unused_calibration_changes_nothing():
    rec = _recorded()
    base = replay(rec, variant_policy("snapkv", 0.25, False, 200), 2)
    hits_never, hits_always = {}, {}
    never = replay(rec, variant_policy("snapkv", 0.25, True, 200, threshold=1.0), 2, hits_never)
    always = replay(rec, variant_policy("snapkv", 0.25, True, 200, threshold=-1.0), 2, hits_always)
    # a cosine of exactly 1 never occurs for these random queries: no head is calibrated, and the
    # output is the uncalibrated one (up to the round-off of the explicit-softmax decode path the
    # calibrated sites take instead of SDPA)
    assert set(hits_never) == set(base) and all(h == 0.0 for h in hits_never.values())
    assert all(abs(never[p] - base[p]) <= 1e-6 * base[p] for p in base)
    # every cosine is >= -1: every (head, step) is calibrated, and the error changes
    assert all(h == 1.0 for h in hits_always.values())
    assert all(abs(always[p] - base[p]) > 1e-3 * base[p] for p in base)


def test_variant_names_spell_non_default_calibration():
    from kvfx.eval.calib_error import variant_name

    assert variant_name("snapkv", 0.25, False) == "snapkv@0.25"
    assert variant_name("snapkv", 0.25, True) == "snapkv@0.25+calidrop(t=0.5,tangent)"
    assert variant_name("snapkv", 0.125, True, 0.7, "tangent") == "snapkv@0.125+calidrop(t=0.7,tangent)"
    assert variant_name("streaming", 0.25, True, 0.8, "none") == "streaming@0.25+calidrop(t=0.8)"
    doc = variant_policy("snapkv", 0.25, True, 200, threshold=0.7, adjust="tangent")
    c = load_policy(doc).resolve(0, "m", 2).calibration
    assert (c.threshold, c.adjust) == (0.7, "tangent")


def test_default_variant_is_the_presets_calibration():
    """calib-error's default calibration is the one the CaliDrop presets ship."""
    from kvfx.eval.calib_error import DEFAULT_ADJUST, DEFAULT_THRESHOLD

    for preset in ("snapkv-calidrop", "streaming-calidrop", "snapkv-calidrop-ott2"):
        c = load_policy(preset).resolve(0, "m", 2).calibration
        assert (c.threshold, c.adjust) == (DEFAULT_THRESHOLD, DEFAULT_ADJUST), preset
