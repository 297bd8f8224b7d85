"""The chunked-prefill accuracy matrix of the README (issue 17): for each policy, passkey and needle
at 4k and 8k, correct answers in one call → with the prompt prefilled in chunks of 512, from the
committed records in results/chunked-prefill/ (written by `kvfx eval ... [--prefill-chunk 512]`).

    python examples/chunked_accuracy_table.py
"""

import collections
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "results" / "chunked-prefill"
CELLS = [("passkey 4k", ["accuracy"], "passkey", 4096), ("needle 4k", ["needle-4k"], "needle", 4096),
         ("passkey 8k", ["passkey-8k", "passkey-8k-h2o-tova"], "passkey", 8192),
         ("needle 8k", ["needle-8k"], "needle", 8192)]
ORDER = ["full", "snapkv", "knorm", "lagkv", "h2o", "tova", "snapkv-ott2"]
REFUSED = ("snapkv-ott2",)  # eviction with quant: is refused at the first prompt chunk


def records(root: Path = ROOT) -> dict:
    """{policy: {cell: {"one" | "chunked": [records]}}}"""
    data = collections.defaultdict(dict)
    for name, dirs, task, length in CELLS:
        for d in dirs:
            for line in (root / d / "results.jsonl").read_text().splitlines():
                r = json.loads(line)
                if r["task"] != task or r["length"] != length:
                    continue
                base = r["policy"].split(" prefill-chunk=")[0]
                mode = "chunked" if base != r["policy"] else "one"
                data[base].setdefault(name, {}).setdefault(mode, []).append(r)
    return data


def _order(p: str):
    m, _, k = p.partition("@")
    return ORDER.index(m) if m in ORDER else len(ORDER), -float(k or 1)


DEPTHS = {4096: 5, 8192: 3}  # depths per length in these runs


def _frac(rs) -> str:
    """correct/run; a cell stopped before its last depth says how many of its depths ran."""
    ok, n, want = sum(r["correct"] for r in rs), len(rs), DEPTHS.get(rs[0]["length"], len(rs))
    return f"{ok}/{n}" if n >= want else f"{ok}/{n} (of {want})"


def _held(rs) -> str:
    return f"{sum(r['held_bytes'] / r['dense_bytes'] for r in rs) / len(rs):.2f}" if rs else "–"


def table(root: Path = ROOT) -> str:
    data = records(root)
    lines = ["| policy | " + " | ".join(c[0] for c in CELLS) + " | held / dense, passkey 4k (one call, chunked) |",
             "|---|" + "---|" * (len(CELLS) + 1)]
    for p in sorted(data, key=_order):
        cells = []
        for name, *_ in CELLS:
            m = data[p].get(name)
            if not m or "one" not in m:
                cells.append("not run")
            elif p == "full":
                cells.append(_frac(m["one"]))
            else:
                chunked = _frac(m["chunked"]) if "chunked" in m else (
                    "refused" if p.split("@")[0] in REFUSED else "not run")
                cells.append(f"{_frac(m['one'])} → {chunked}")
        a = data[p].get("passkey 4k") or data[p].get("needle 4k") or {}
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {_held(a.get('one'))}, {_held(a.get('chunked'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
