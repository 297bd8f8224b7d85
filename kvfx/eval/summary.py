"""Per (task, policy, length) summaries of evaluation records (:func:`summarize`), shared by the
harness's tables and the leaderboard's."""

from __future__ import annotations


def summarize(records: list[dict]) -> list[dict]:
    """Per (task, policy, length): accuracy or perplexity (and Δ against ``full`` of the same
    run), mean held/dense bytes, mean kept tokens, mean seconds. For ``agreement`` the accuracy
    is the mean prefix agreement, with the mean position agreement, teacher-forced top-1
    agreement and KL(full || policy) alongside."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        label = r["task"] if r.get("subtask") is None else f"{r['task']}/{r['subtask']}"
        groups.setdefault((label, r["policy"], r["length"]), []).append(r)
    rows = []
    for (task, policy, length), rs in sorted(groups.items()):
        ratios = [r["held_bytes"] / r["dense_bytes"] for r in rs if r.get("dense_bytes")]
        row = {"task": task, "policy": policy, "length": length, "samples": len(rs),
               "accuracy": None, "ppl": None, "delta_ppl": None,
               "position_agreement": None, "top1_agreement": None, "kl": None,
               "held_over_dense": sum(ratios) / len(ratios) if ratios else float("nan"),
               "kept_tokens": sum(r.get("kept_tokens") or 0 for r in rs) / len(rs),
               "kept_tokens_mean": _mean_of(rs, "kept_tokens_mean"),
               "seconds": sum(r["seconds"] for r in rs) / len(rs)}
        if task == "perplexity":
            row["ppl"] = sum(r["ppl"] for r in rs) / len(rs)
        elif task == "agreement":
            row["accuracy"] = sum(r["prefix_agreement"] for r in rs) / len(rs)
            for key in ("position_agreement", "top1_agreement", "kl"):
                row[key] = sum(r[key] for r in rs) / len(rs)
        elif "/" in task:  # RULER string-match score (a fraction of the expected strings found)
            row["accuracy"] = sum(r["score"] for r in rs) / len(rs)
        else:
            row["accuracy"] = sum(bool(r.get("correct")) for r in rs) / len(rs)
        rows.append(row)
    rows += _ruler_means(rows)
    base = {(r["task"], r["length"]): r["ppl"] for r in rows if r["policy"] == "full" and r["ppl"]}
    for r in rows:
        if r["ppl"] is not None and (r["task"], r["length"]) in base:
            r["delta_ppl"] = r["ppl"] - base[(r["task"], r["length"])]
    return rows


def _mean_of(rs: list[dict], key: str):
    """The mean of ``key`` over the records that have it (results of older versions lack some)."""
    vals = [r[key] for r in rs if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _ruler_means(rows: list[dict]) -> list[dict]:
    """RULER's score: per (policy, length) the mean over the RULER tasks' scores (row ``ruler``)."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["task"].startswith("ruler/"):
            by.setdefault((r["policy"], r["length"]), []).append(r)
    out = []
    for (policy, length), rs in sorted(by.items()):
        ratios = [r["held_over_dense"] for r in rs if r["held_over_dense"] == r["held_over_dense"]]
        out.append({**{k: None for k in rs[0]}, "task": "ruler", "policy": policy, "length": length,
                    "samples": sum(r["samples"] for r in rs),
                    "accuracy": sum(r["accuracy"] for r in rs) / len(rs),
                    "held_over_dense": sum(ratios) / len(ratios) if ratios else float("nan"),
                    "kept_tokens": sum(r["kept_tokens"] for r in rs) / len(rs),
                    "kept_tokens_mean": _mean_of(rs, "kept_tokens_mean"),
                    "seconds": sum(r["seconds"] for r in rs) / len(rs)})
    return out
