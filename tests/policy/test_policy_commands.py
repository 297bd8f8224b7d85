"""kvfx policy validate | show | schema | list, through a parser built here."""

import argparse
import json
from pathlib import Path

import pytest

from kvfx.policy import list_presets, load_policy
from kvfx.policy.commands import register
from kvfx.policy.loader import PRESET_DIR

BAD = Path(__file__).with_name("bad")


@pytest.fixture
def cli():
    parser = argparse.ArgumentParser(prog="kvfx")
    register(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(["policy", *map(str, argv)])
        return args.func(args)
    return run


def test_validate_ok(cli, capsys):
    assert cli("validate", "snapkv", PRESET_DIR / "knorm.yaml") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok snapkv {load_policy('snapkv').hash}", f"ok knorm {load_policy('knorm').hash}"]


def test_validate_error_exit_code_and_one_line(cli, capsys):
    assert cli("validate", BAD / "bits_3.yaml", "kivi2") == 1
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [f"ok kivi2 {load_policy('kivi2').hash}"]
    expected = f"{BAD / 'bits_3.yaml'}:4:18 quant.keys.bits: got 3, expected one of 2, 4, 8"
    assert cap.err.splitlines() == [expected]


def test_show_groups_consecutive_layers(cli, capsys):
    assert cli("show", "knorm", "--layers", 30) == 0
    p = load_policy("knorm")
    assert capsys.readouterr().out.splitlines() == [
        f"policy knorm hash {p.hash} source preset:knorm",
        "layers 0-1: full",
        "layers 2-29: knorm keep=0.25 sink=4 window=32"]


def test_show_defaults_to_one_layer(cli, capsys):
    assert cli("show", "streaming") == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["layer 0: streaming sink=4 window=256"]


def test_show_file_with_overrides_and_full(cli, capsys, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("kvfx: 1\nname: p\nextends: snapkv\nlayers:\n  - match: [3, '5-6']\n    quant: {}\n"
                 "  - match: model.layers.6.*\n    eviction: {scorer: none}\n")
    assert cli("show", f, "--layers", 8, "--full") == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("  ")]
    spans = [ln.split(":")[0] for ln in lines[1:]]
    assert spans == ["layers 0-2", "layer 3", "layer 4", "layer 5", "layer 6", "layer 7"]
    assert lines[5] == "layer 6: quant keys=2bit/32ch values=2bit/32tok residual=128"


def test_show_warns_about_unmatched_override(cli, capsys):
    assert cli("show", "knorm", "--layers", 1) == 0
    assert capsys.readouterr().err == ""
    assert cli("show", "knorm", "--module", "blocks.{i}.attn", "--layers", 1) == 0   # '0-1' still matches 0


def test_show_bad_file(cli, capsys):
    assert cli("show", BAD / "keep_zero.yaml") == 1
    assert "budget.keep: got 0" in capsys.readouterr().err
    assert cli("show", "snapkv", "--layers", 0) == 2


def test_schema_prints_json(cli, capsys):
    assert cli("schema") == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"kvfx", "name", "extends", "budget", "eviction", "calibration", "quant", "lowrank",
            "layers"} <= set(schema["properties"])


def test_list(cli, capsys):
    assert cli("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list_presets()
    assert all(len(ln.split(None, 1)) == 2 for ln in lines)


def test_policy_needs_a_subcommand():
    parser = argparse.ArgumentParser(prog="kvfx")
    register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["policy"])


def test_show_window_override_prints_both_layer_kinds(cli, capsys, tmp_path):
    f = tmp_path / "w.yaml"
    f.write_text("kvfx: 1\nname: w\nextends: snapkv\nlayers:\n  - window: true\n    eviction: {scorer: none}\n"
                 "    quant: {keys: {bits: 2}, values: {bits: 2}}\n")
    assert cli("show", f, "--layers", 4) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines()[1:] == [
        "if global layers (not sliding-window):",
        "  layers 0-3: snapkv keep=0.25 sink=4 window=32 pool=max7",
        "if sliding-window layers:",
        "  layers 0-3: quant keys=2bit/32ch values=2bit/32tok residual=128"]
    assert cap.err == ""  # a window: override cannot be checked without the model: no warning


def test_residual_dtype_in_schema_and_show(cli, capsys, tmp_path):
    """quant.residual_dtype: documented by the schema (its values and description), printed by
    show when it is not the default."""
    assert cli("schema") == 0
    schema = json.loads(capsys.readouterr().out)
    field = schema["$defs"]["Quant"]["properties"]["residual_dtype"]
    assert field["enum"] == ["model", "float16", "bfloat16"] and field["default"] == "model"
    assert "outlier pool" in field["description"]
    f = tmp_path / "p.yaml"
    f.write_text("kvfx: 1\nname: p\nextends: ott2\nquant: {residual_dtype: float16}\n")
    assert cli("show", f) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        "quant keys=2bit/32ch values=2bit/32tok residual=128 outliers=1/64l1 residual_dtype=float16")
    assert cli("show", "kivi2") == 0
    assert "residual_dtype" not in capsys.readouterr().out
