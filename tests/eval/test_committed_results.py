"""The README's SmolLM2 results section matches the committed results it says it was generated
from (results/smollm2-grid), and that grid is complete for every policy examples/smollm2_grid.sh
runs. Reads JSONL only; no model."""

import collections
import re
from pathlib import Path

import pytest

from kvfx.eval.harness import load_results, pivot_table

ROOT = Path(__file__).resolve().parents[2]
GRID = ROOT / "results" / "smollm2-grid"


@pytest.fixture(scope="module")
def records():
    if not (GRID / "results.jsonl").exists():
        pytest.skip("no committed results/smollm2-grid in this checkout")
    return load_results(GRID)


def test_readme_table_is_the_committed_pivot(records):
    table = pivot_table(records)
    assert (GRID / "pivot.md").read_text().strip() == table, "rerun `kvfx report results/smollm2-grid --pivot`"
    assert table in (ROOT / "README.md").read_text(), "paste results/smollm2-grid/pivot.md into the README"


def test_readme_sample_count(records):
    m = re.search(r"(\d+)\s+samples, every cell complete", (ROOT / "README.md").read_text())
    assert m and int(m.group(1)) == len(records)


def test_grid_complete_for_every_policy_of_the_script(records):
    script = (ROOT / "examples" / "smollm2_grid.sh").read_text()
    policies = re.search(r'^P="([^"]+)"', script, re.MULTILINE).group(1).split()
    count = collections.Counter((r["task"], r["policy"], r["length"]) for r in records)
    expected = {("passkey", 2048): 10, ("passkey", 4096): 10, ("needle", 2048): 5, ("needle", 4096): 5,
                ("perplexity", 4096): 1}
    missing = [(p, t, n, count[(t, p, n)], k) for p in policies for (t, n), k in expected.items()
               if count[(t, p, n)] != k]
    assert not missing, f"(policy, task, length, samples, expected): {missing}"
    assert {r["policy"] for r in records} == set(policies)


def test_readme_ruler_tables_are_the_committed_ones():
    from kvfx.eval.leaderboard import ruler_table, shared_context_table

    d = ROOT / "results" / "smollm2-ruler-4k"
    if not (d / "results.jsonl").exists():
        pytest.skip("no committed results/smollm2-ruler-4k in this checkout")
    recs = load_results(d)
    readme = (ROOT / "README.md").read_text()
    for name, table in (("ruler.md", ruler_table(recs)), ("shared_context.md", shared_context_table(recs))):
        assert (d / name).read_text().strip() == table, f"rerun `kvfx report {d}`"
        assert table in readme, f"paste {d / name} into the README"


def test_readme_all_task_ruler_table_is_the_committed_one():
    """The 11-task RULER subset (results/smollm2-ruler-4k-all): the README's table is its ruler.md,
    every policy of the script's ALL_TASKS list has one sample of each of the 11 tasks."""
    from kvfx.eval.leaderboard import ruler_table
    from kvfx.eval.ruler import RULER_TASKS

    d = ROOT / "results" / "smollm2-ruler-4k-all"
    if not (d / "results.jsonl").exists():
        pytest.skip("no committed results/smollm2-ruler-4k-all in this checkout")
    recs = load_results(d)
    table = ruler_table(recs)
    assert (d / "ruler.md").read_text().strip() == table, f"rerun `kvfx report {d}`"
    assert table in (ROOT / "README.md").read_text(), f"paste {d / 'ruler.md'} into the README"
    script = (ROOT / "examples" / "smollm2_ruler.sh").read_text()
    block = script.split('ALL_TASKS:-0}" = 1 ]; then', 1)[1].split("do", 1)[0]
    policies = block.split("for p in", 1)[1].replace("\\", " ").split(";")[0].split()
    count = collections.Counter((r["policy"], r["subtask"]) for r in recs)
    assert {r["policy"] for r in recs} == set(policies)
    assert all(count[(p, t)] == 1 for p in policies for t in RULER_TASKS), count


def test_readme_chunked_accuracy_matrix_is_the_committed_one():
    """Issue 17's accuracy matrix: the README table is what examples/chunked_accuracy_table.py writes
    from results/chunked-prefill/, and every cell of it ran (each method at keep 0.25 and 0.125,
    passkey and needle at 4k and 8k, one call and chunks of 512; eviction with quant: refused)."""
    import importlib.util

    path = ROOT / "examples" / "chunked_accuracy_table.py"
    spec = importlib.util.spec_from_file_location("chunked_accuracy_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not (mod.ROOT / "accuracy" / "results.jsonl").exists():
        pytest.skip("no committed results/chunked-prefill in this checkout")
    table = mod.table()
    assert table in (ROOT / "README.md").read_text(), "paste `python examples/chunked_accuracy_table.py` into the README"
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    methods = ["snapkv", "knorm", "lagkv", "h2o", "tova", "snapkv-ott2"]
    assert rows == ["full"] + [f"{m}@{k}" for m in methods for k in ("0.25", "0.125")]
    assert "not run" not in table and "(of" not in table, "a cell of the matrix is missing or incomplete"
