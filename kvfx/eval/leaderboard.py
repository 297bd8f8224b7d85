"""The RULER leaderboard view (kvpress's protocol): score vs compression, one curve per method,
with the full-cache score beside every row; and the shared-context comparison table.

Compression is the fraction of the cache a policy removes: ``1 - keep`` for ``NAME@KEEP``
policies (kvpress's "compression ratio"), else ``1 - held/dense`` as measured (quantized
presets); the measured held / dense bytes are in the table either way.

Example::

    records = load_results("results/smollm2-ruler-4k")
    print(ruler_table(records))
    score_vs_compression(records, "results/smollm2-ruler-4k/ruler_score_vs_compression.png")
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["compression_of", "ruler_table", "score_vs_compression", "shared_context_table"]


def compression_of(policy: str, held_over_dense: float | None = None) -> float:
    """``1 - keep`` of ``NAME@KEEP``; 0 for ``full``; else ``1 - held_over_dense``. A run
    qualifier after a space (``snapkv@0.25 prefill-chunk=512``) is ignored."""
    policy = policy.split()[0] if policy.strip() else policy
    if policy == "full":
        return 0.0
    if "@" in policy:
        return 1.0 - float(policy.split("@", 1)[1])
    if held_over_dense is None or held_over_dense != held_over_dense:
        raise ValueError(f"compression_of: {policy!r} has no @KEEP and no measured held / dense bytes")
    return 1.0 - held_over_dense


def _rows(records, task):
    from kvfx.eval.summary import summarize

    return [r for r in summarize(records) if r["task"] == task or r["task"].startswith(task + "/")]


def ruler_table(records: list[dict]) -> str:
    """One row per (policy, length): compression, held / dense, the RULER score (mean over the
    RULER tasks run, x100), the full-cache score of the same length, the relative score
    (score / full), then each task's score. Policies in record order, ``full`` first."""
    rows = _rows(records, "ruler")
    tasks = sorted({r["task"].split("/", 1)[1] for r in rows if "/" in r["task"]})
    mean = {(r["policy"], r["length"]): r for r in rows if r["task"] == "ruler"}
    cell = {(r["policy"], r["length"], r["task"]): r["accuracy"] for r in rows}
    order = list(dict.fromkeys(["full"] + [r["policy"] for r in records if r["task"] == "ruler"]))
    head = ("| policy | length | removed | held / dense | RULER | full cache | relative | "
            + " | ".join(tasks) + " |")
    lines = [head, "|---" * (7 + len(tasks)) + "|"]
    for n in sorted({r["length"] for r in rows}):
        full = mean.get(("full", n))
        for policy in order:
            m = mean.get((policy, n))
            if m is None:
                continue
            rel = "" if not full or not full["accuracy"] else f"{m['accuracy'] / full['accuracy']:.2f}"
            per = [f"{100 * cell[(policy, n, 'ruler/' + t)]:.1f}" if (policy, n, "ruler/" + t) in cell else ""
                   for t in tasks]
            full_txt = "" if full is None else f"{100 * full['accuracy']:.1f}"
            lines.append(f"| {policy} | {n} | {compression_of(policy, m['held_over_dense']):.3f} | "
                         f"{m['held_over_dense']:.3f} | {100 * m['accuracy']:.1f} | {full_txt} | {rel} | "
                         + " | ".join(per) + " |")
    return "\n".join(lines)


def shared_context_table(records: list[dict]) -> str:
    """One row per (policy, length): the score with the context compressed alone and the
    questions asked after (``shared``), with context and question compressed together
    (``joint``), their difference, and ``full``'s scores of the same length beside them."""
    rows = _rows(records, "shared-context")
    cell = {(r["policy"], r["length"], r["task"].split("/", 1)[1]): r for r in rows}
    order = list(dict.fromkeys(["full"] + [r["policy"] for r in records if r["task"] == "shared-context"]))
    lines = ["| policy | length | removed | held / dense | shared (compressed once) | joint (with the question) "
             "| shared - joint | full: shared | full: joint | questions |", "|---" * 10 + "|"]
    for n in sorted({r["length"] for r in rows}):
        for policy in order:
            sh, jo = cell.get((policy, n, "shared")), cell.get((policy, n, "joint"))
            if sh is None and jo is None:
                continue
            fs, fj = cell.get(("full", n, "shared")), cell.get(("full", n, "joint"))
            any_row = sh or jo

            def f(r):
                return "" if r is None else f"{100 * r['accuracy']:.1f}"

            diff = "" if sh is None or jo is None else f"{100 * (sh['accuracy'] - jo['accuracy']):+.1f}"
            qs = sum(len(r.get("scores") or []) for r in records if r["task"] == "shared-context"
                     and r["policy"] == policy and r["length"] == n and r.get("subtask") == "shared")
            lines.append(f"| {policy} | {n} | {compression_of(policy, any_row['held_over_dense']):.3f} | "
                         f"{any_row['held_over_dense']:.3f} | {f(sh)} | {f(jo)} | {diff} | {f(fs)} | {f(fj)} | "
                         f"{qs} |")
    return "\n".join(lines)


def score_vs_compression(records: list[dict], path: str | Path, *, task: str = "ruler") -> Path:
    """RULER score (x100) against the fraction of the cache removed, one curve per method (the
    policy name before ``@``), a panel per length, ``full`` a dashed line; saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kvfx.eval.plots import _COLORS, _save

    rows = [r for r in _rows(records, task) if r["task"] == task]
    if not rows:
        raise ValueError(f"score_vs_compression: no {task!r} records (run `kvfx eval --task {task}`)")
    lengths = sorted({r["length"] for r in rows})
    fig = Figure(figsize=(5.6 * len(lengths) + 2.2, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(lengths), squeeze=False, sharey=True)[0]
    methods = list(dict.fromkeys(r["policy"].split("@")[0] for r in rows))
    for ax, n in zip(axes, lengths):
        at = [r for r in rows if r["length"] == n]
        for i, m in enumerate(methods):
            pts = sorted((compression_of(r["policy"], r["held_over_dense"]), 100 * r["accuracy"])
                         for r in at if r["policy"].split("@")[0] == m)
            if not pts:
                continue
            if m == "full":
                ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="full cache")
                continue
            # distinct colours, markers and dashes: methods with equal scores still show
            ax.plot(*zip(*pts), marker="osD^vP<>X"[i % 9], ms=9 - 2 * (i % 3), lw=1.4,
                    ls=("-", "--", ":")[i % 3], color=_COLORS(2 * (i % 10)), label=m, alpha=0.85)
        ax.set_xlabel("fraction of the KV cache removed")
        ax.set_title(f"{task} at {n} tokens", fontsize=10)
        ax.set_xlim(-0.02, 1.0)
        ax.set_ylim(-3, 105)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("score (string match, x100)")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)
