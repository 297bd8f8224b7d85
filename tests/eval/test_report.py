"""kvfx report's pivot table: one row per policy, a column per (task, length), on crafted records."""

from kvfx.eval.harness import pivot_table


def _rec(task, policy, length, correct=None, ppl=None, held=1.0, kept=100.0):
    r = {"task": task, "policy": policy, "length": length, "depth": 0.5, "seed": 0, "seconds": 1.0,
         "held_bytes": held, "dense_bytes": 1.0, "kept_tokens": kept}
    if ppl is not None:
        r["ppl"] = ppl
    else:
        r["correct"] = correct
    return r


def test_pivot_rows_columns_and_values():
    recs = [_rec("passkey", "snapkv@0.25", 4096, True, held=0.3, kept=1024),
            _rec("passkey", "snapkv@0.25", 4096, False, held=0.3, kept=1024),
            _rec("passkey", "full", 4096, True, held=1.05, kept=4100),
            _rec("passkey", "full", 2048, True),
            _rec("needle", "full", 2048, True),
            _rec("needle", "snapkv@0.25", 2048, False),
            _rec("perplexity", "full", 4096, ppl=20.0),
            _rec("perplexity", "snapkv@0.25", 4096, ppl=21.5),
            _rec("perplexity", "kivi2", 4096, ppl=25.0)]
    lines = pivot_table(recs).splitlines()
    assert lines[0] == ("| policy | passkey 2k | passkey 4k | needle 2k | Δppl 4k | held / dense (passkey 4k) "
                        "| kept tokens |")
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert list(rows) == ["full", "snapkv@0.25", "kivi2"]  # full first, then in record order
    assert rows["full"] == "| full | 1.00 | 1.00 | 1.00 | +0.00 | 1.050 | 4100 |"
    assert rows["snapkv@0.25"] == "| snapkv@0.25 |  | 0.50 | 0.00 | +1.50 | 0.300 | 1024 |"
    assert rows["kivi2"] == "| kivi2 |  |  |  | +5.00 |  | |"  # no passkey 4k run: no bytes column
