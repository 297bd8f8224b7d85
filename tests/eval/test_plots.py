"""Heatmap and accuracy-vs-compression plots from synthetic harness records."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("matplotlib")

from kvfx.eval.plots import accuracy_vs_compression, needle_heatmap  # noqa: E402

_PNG = b"\x89PNG\r\n\x1a\n"
POLICIES = [("full", 1.0, 0.97), ("snapkv@0.125", 0.14, 0.7), ("streaming", 0.06, 0.3), ("kivi4", 0.28, 0.9)]


def _records(task="needle", policies=POLICIES, lengths=(1024, 2048, 4096), depths=(0.1, 0.5, 0.9), seeds=2):
    rng = random.Random(0)
    out = []
    for policy, ratio, p in policies:
        for n in lengths:
            for d in depths:
                for s in range(seeds):
                    out.append({
                        "task": task, "policy": policy, "length": n, "depth": d, "seed": s,
                        "correct": rng.random() < p, "held_bytes": int(ratio * 1000 * n),
                        "dense_bytes": 1000 * n, "seconds": 1.0, "kept_tokens": n * ratio,
                    })
    return out


def _png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == _PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _assert_plot(path, min_bytes=10_000):
    assert path.is_file() and path.stat().st_size > min_bytes
    w, h = _png_size(path)
    assert w >= 400 and h >= 300
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("policy", ["full", "streaming"])
def test_needle_heatmap_writes_png(tmp_path, policy):
    out = needle_heatmap(_records(), policy, tmp_path / "sub" / f"{policy}.png")
    assert out == tmp_path / "sub" / f"{policy}.png"
    _assert_plot(out)


def test_needle_heatmap_missing_cells_and_other_tasks(tmp_path):
    recs = [r for r in _records() if not (r["length"] == 4096 and r["depth"] == 0.5)]
    recs += _records(task="passkey")  # ignored: other task
    _assert_plot(needle_heatmap(recs, "snapkv@0.125", tmp_path / "gap.png"))
    _assert_plot(needle_heatmap(recs, "kivi4", tmp_path / "passkey.png", task="passkey"))


def test_needle_heatmap_single_cell(tmp_path):
    recs = _records(policies=[("full", 1.0, 1.0)], lengths=(2048,), depths=(0.5,), seeds=1)
    _assert_plot(needle_heatmap(recs, "full", tmp_path / "one.png"), min_bytes=5_000)


def test_needle_heatmap_unknown_policy(tmp_path):
    with pytest.raises(ValueError, match=r"got 'h2o', but there are no 'needle' records for it; "
                                         r"policies with 'needle' records: \['full', 'kivi4',"):
        needle_heatmap(_records(), "h2o", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_accuracy_vs_compression_writes_png(tmp_path):
    out = accuracy_vs_compression(_records(), "needle", tmp_path / "tradeoff.png")
    _assert_plot(out)


def test_accuracy_vs_compression_linear_scale_and_no_full(tmp_path):
    # Ratios within 5x: linear axis; no `full` policy: nothing highlighted, still a plot.
    recs = _records(policies=[("kivi4", 0.28, 0.9), ("kivi2", 0.16, 0.6), ("ott4", 0.3, 0.95)])
    _assert_plot(accuracy_vs_compression(recs, "needle", tmp_path / "linear.png"))


def test_accuracy_vs_compression_skips_records_without_bytes(tmp_path):
    recs = _records() + [{"task": "needle", "policy": "broken", "length": 1024, "depth": 0.5,
                          "correct": True, "held_bytes": None, "dense_bytes": 0}]
    _assert_plot(accuracy_vs_compression(recs, "needle", tmp_path / "skip.png"))


def test_accuracy_vs_compression_unknown_task(tmp_path):
    with pytest.raises(ValueError, match=r"task: got 'ruler', but there are no records for it; "
                                         r"tasks present: \['needle'\]"):
        accuracy_vs_compression(_records(), "ruler", tmp_path / "x.png")


def test_accuracy_vs_compression_numeric_metric(tmp_path):
    # agreement records: y is the mean of a number in [0, 1] instead of the share of `correct`
    recs = [dict(r, task="agreement", depth=None, prefix_agreement=0.25 * (i % 5))
            for i, r in enumerate(_records(lengths=(1024,), depths=(0.5,)))]
    _assert_plot(accuracy_vs_compression(recs, "agreement", tmp_path / "agree.png",
                                         metric="prefix_agreement", label="prefix agreement"))


def test_accuracy_curves_and_heatmap_grid(tmp_path):
    """The large-grid figures: one curve per method over its budgets, a panel per length; every
    policy's heatmap in one figure. Both reject a task without records by name."""
    from kvfx.eval.plots import accuracy_curves, heatmap_grid

    pols = POLICIES + [("snapkv@0.25", 0.26, 0.8), ("snapkv@0.5", 0.51, 0.9), ("streaming@0.25", 0.25, 0.4)]
    recs = _records("passkey", pols, lengths=(2048, 4096))
    p = accuracy_curves(recs, "passkey", tmp_path / "curves.png")
    _assert_plot(p)
    w, h = _png_size(p)
    assert w > 1.5 * h  # two panels side by side
    g = heatmap_grid(recs, "passkey", tmp_path / "grid.png", cols=3)
    _assert_plot(g)
    w, h = _png_size(g)
    assert h > 0.8 * w  # 7 policies in 3 columns: 3 rows
    for fn in (accuracy_curves, heatmap_grid):
        with pytest.raises(ValueError, match="no records for it"):
            fn(recs, "needle", tmp_path / "x.png")


def test_report_switches_to_grid_figures_for_many_policies(tmp_path, monkeypatch):
    """Up to HEATMAP_FILES_UP_TO policies: a heatmap PNG per policy; more: the grid figures."""
    import json

    from kvfx.eval import harness

    recs = _records("passkey", POLICIES, lengths=(2048,))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    _, pngs = harness.write_report(tmp_path)
    assert {p.name for p in pngs} >= {"passkey_accuracy_vs_compression.png", "passkey_heatmap_full.png"}
    monkeypatch.setattr(harness, "HEATMAP_FILES_UP_TO", 2)
    _, pngs = harness.write_report(tmp_path)
    assert sorted(p.name for p in pngs) == ["passkey_accuracy_curves.png", "passkey_heatmaps.png"]
    assert (tmp_path / "pivot.md").read_text().startswith("| policy | passkey 2k |")


def test_accuracy_curves_legend_names_methods_of_every_panel(tmp_path, monkeypatch):
    """A method with points at one length only still gets a legend entry (the legend used to be
    the last panel's alone)."""
    import matplotlib.axes

    from kvfx.eval.plots import accuracy_curves

    recs = _records("needle", POLICIES + [("snapkv@0.25", 0.26, 0.8)], lengths=(2048, 4096))
    recs = [r for r in recs if r["length"] == 2048 or r["policy"] in ("full", "snapkv@0.25")]
    seen = []
    real = matplotlib.axes.Axes.legend

    def spy(self, *args, **kwargs):
        seen.append([str(x) for x in args[1]] if len(args) > 1 else None)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", spy)
    _assert_plot(accuracy_curves(recs, "needle", tmp_path / "curves.png"))
    methods = {p.split("@")[0] for p, _, _ in POLICIES}
    assert len(seen) == 1 and methods <= set(seen[0]), seen
