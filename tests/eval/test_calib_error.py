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
            res["variants"][f"{method}@0.25" + ("+calidrop" if cal else "")] = list(err.values())
    assert load_policy(variant_policy("streaming", 0.25, False, 200)).resolve(0, "m", 2).budget.window == 46
    plot_calib_error(res, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 10_000
