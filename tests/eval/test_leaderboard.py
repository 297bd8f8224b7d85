"""RULER summary (per task, then the mean over tasks), the leaderboard and shared-context tables,
on crafted records; no model."""

import pytest

from kvfx.eval.harness import pivot_table, summarize
from kvfx.eval.leaderboard import compression_of, ruler_table, shared_context_table


def _rec(policy, sub, score, seed=0, held=1.0, task="ruler", **kw):
    return {"task": task, "subtask": sub, "policy": policy, "length": 4096, "depth": None, "seed": seed,
            "score": score, "correct": score == 1.0, "seconds": 2.0, "held_bytes": held, "dense_bytes": 1.0,
            "kept_tokens": 100.0, **kw}


RECS = [_rec("full", "vt", 1.0), _rec("full", "vt", 0.6, seed=1), _rec("full", "cwe", 0.5),
        _rec("snapkv@0.25", "vt", 0.4, held=0.3), _rec("snapkv@0.25", "cwe", 0.1, held=0.3),
        _rec("kivi4", "vt", 0.8, held=0.2), _rec("kivi4", "cwe", 0.5, held=0.2)]


def test_summary_scores_per_task_then_the_mean():
    rows = {(r["task"], r["policy"]): r for r in summarize(RECS)}
    assert rows[("ruler/vt", "full")]["accuracy"] == pytest.approx(0.8)  # mean score, not exact matches
    assert rows[("ruler", "full")]["accuracy"] == pytest.approx((0.8 + 0.5) / 2)  # tasks weigh the same
    assert rows[("ruler", "full")]["samples"] == 3
    assert rows[("ruler", "snapkv@0.25")]["accuracy"] == pytest.approx(0.25)


def test_ruler_table_has_full_beside_every_row():
    lines = ruler_table(RECS).splitlines()
    assert lines[0] == ("| policy | length | removed | held / dense | RULER | full cache | relative | cwe | vt |")
    assert lines[2] == "| full | 4096 | 0.000 | 1.000 | 65.0 | 65.0 | 1.00 | 50.0 | 80.0 |"
    assert lines[3] == "| snapkv@0.25 | 4096 | 0.750 | 0.300 | 25.0 | 65.0 | 0.38 | 10.0 | 40.0 |"
    assert lines[4] == "| kivi4 | 4096 | 0.800 | 0.200 | 65.0 | 65.0 | 1.00 | 50.0 | 80.0 |"  # measured


def test_pivot_orders_the_ruler_mean_before_its_tasks():
    head = pivot_table(RECS).splitlines()[0]
    assert head.startswith("| policy | ruler 4k | ruler/cwe 4k | ruler/vt 4k |")


def test_shared_context_table():
    recs = [_rec("full", "shared", 1.0, task="shared-context", scores=[1.0, 1.0]),
            _rec("full", "joint", 1.0, task="shared-context", scores=[1.0, 1.0]),
            _rec("snapkv@0.25", "shared", 0.0, task="shared-context", held=0.3, scores=[0.0, 0.0]),
            _rec("snapkv@0.25", "joint", 0.5, task="shared-context", held=0.3, scores=[1.0, 0.0])]
    lines = shared_context_table(recs).splitlines()
    assert lines[2] == "| full | 4096 | 0.000 | 1.000 | 100.0 | 100.0 | +0.0 | 100.0 | 100.0 | 2 |"
    assert lines[3] == "| snapkv@0.25 | 4096 | 0.750 | 0.300 | 0.0 | 50.0 | -50.0 | 100.0 | 100.0 | 2 |"


def test_compression_needs_a_budget_or_bytes():
    assert compression_of("snapkv@0.125") == 0.875 and compression_of("full") == 0.0
    with pytest.raises(ValueError, match="no @KEEP"):
        compression_of("kivi2", None)
