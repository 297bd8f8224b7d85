"""Plots of evaluation records: a depth x length heatmap per policy, and accuracy vs compression.

Records are the dicts ``kvfx/eval/harness.py`` writes to ``results.jsonl`` (keys ``task``,
``policy``, ``length``, ``depth``, ``correct``, ``held_bytes``, ``dense_bytes``; others ignored).
Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so
this works headless and leaves the caller's matplotlib state alone.

Example::

    from kvfx.eval.harness import load_results
    records = load_results("runs/eval")
    needle_heatmap(records, "snapkv@0.125", "runs/eval/needle-snapkv.png")
    accuracy_vs_compression(records, "needle", "runs/eval/needle-tradeoff.png")
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["accuracy_curves", "accuracy_vs_compression", "heatmap_grid", "needle_heatmap"]

_DPI = 120


def _COLORS(i):
    from matplotlib import colormaps

    return colormaps["tab20"](i)


def needle_heatmap(records: list[dict], policy: str, path: str | Path, *, task: str = "needle") -> Path:
    """Accuracy of ``policy`` on ``task`` as a depth (rows) x length (columns) grid, saved as PNG.

    Each cell is the fraction of correct samples at that (depth, length), annotated with the
    fraction and the sample count; cells without samples are grey. The title names the task, the
    policy and its mean held / dense bytes.

    Raises:
        ValueError: no record has this ``task`` and ``policy`` (the message lists those present).

    Example::

        needle_heatmap(records, "full", "needle-full.png")
    """
    rs = [r for r in records if r.get("task") == task and r.get("policy") == policy]
    if not rs:
        present = sorted({r.get("policy") for r in records if r.get("task") == task})
        raise ValueError(
            f"needle_heatmap policy: got {policy!r}, but there are no {task!r} records for it; "
            f"policies with {task!r} records: {present or 'none'}"
        )
    depths = sorted({round(float(r["depth"]), 4) for r in rs})
    lengths = sorted({int(r["length"]) for r in rs})
    hits = [[0] * len(lengths) for _ in depths]
    counts = [[0] * len(lengths) for _ in depths]
    for r in rs:
        i, j = depths.index(round(float(r["depth"]), 4)), lengths.index(int(r["length"]))
        counts[i][j] += 1
        hits[i][j] += bool(r.get("correct"))
    acc = [[h / c if c else math.nan for h, c in zip(hr, cr)] for hr, cr in zip(hits, counts)]

    fig, ax = _figure(max(4.0, 1.1 * len(lengths) + 2.4), max(3.0, 0.5 * len(depths) + 1.8))
    import matplotlib

    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#d0d0d0")  # grey: no samples
    im = ax.imshow(acc, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if counts[i][j]:
                label = f"{acc[i][j]:.2f}\n{hits[i][j]}/{counts[i][j]}"
                extreme = acc[i][j] < 0.2 or acc[i][j] > 0.85  # the dark ends of RdYlGn
                ax.text(j, i, label, ha="center", va="center", fontsize=8,
                        color="white" if extreme else "black")
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ratio = _mean_ratio(rs)
    ratio_txt = f"{ratio:.3f}" if not math.isnan(ratio) else "n/a"
    total = sum(map(sum, hits)) / sum(map(sum, counts))
    ax.set_title(f"{task}: {policy}\naccuracy {total:.2f}, held / dense {ratio_txt}", fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy", fraction=0.05, pad=0.03)
    return _save(fig, path)


def accuracy_vs_compression(records: list[dict], task: str, path: str | Path, *,
                            metric: str = "correct", label: str = "accuracy") -> Path:
    """Accuracy against memory for every policy on ``task``, saved as PNG.

    One labelled marker per policy: x is the mean held / dense bytes ratio (lower = more
    compression; log scale when the ratios span more than 5x), y the mean of the record field
    ``metric`` (a bool or a number in [0, 1]; ``correct``: the accuracy) over all its samples,
    named ``label`` on the axis and title. ``full`` is drawn as a larger star with a dashed line
    at its value.

    Raises:
        ValueError: no record has this ``task`` (the message lists the tasks present).

    Example::

        accuracy_vs_compression(records, "passkey", "passkey-tradeoff.png")
        accuracy_vs_compression(records, "agreement", "agree.png", metric="prefix_agreement",
                                label="prefix agreement")
    """
    rs = [r for r in records if r.get("task") == task]
    if not rs:
        present = sorted({str(r.get("task")) for r in records})
        raise ValueError(
            f"accuracy_vs_compression task: got {task!r}, but there are no records for it; "
            f"tasks present: {present or 'none'}"
        )
    by_policy: dict[str, list[dict]] = {}
    for r in rs:
        by_policy.setdefault(str(r["policy"]), []).append(r)
    points = {p: (_mean_ratio(v), sum(float(r.get(metric) or 0) for r in v) / len(v), len(v))
              for p, v in sorted(by_policy.items())}

    fig, ax = _figure(7.2, 4.6)
    xs = [x for x, _, _ in points.values() if not math.isnan(x) and x > 0]
    log = bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 5
    # one marker shape per method (the part before "@"), a distinct colour per policy; a text
    # label only where no labelled point is close (the legend names every point)
    methods = sorted({p.split("@")[0] for p in points})
    shapes = "osD^vP<>Xph"
    labelled: list[tuple[float, float]] = []
    for k, (policy, (x, y, n)) in enumerate(points.items()):
        if math.isnan(x):
            continue
        if _is_full(policy):
            ax.scatter([x], [y], s=220, marker="*", color="black", zorder=4, label=f"{policy} (n={n})")
            ax.axhline(y, color="black", lw=0.8, ls="--", zorder=1)
        else:
            marker = shapes[methods.index(policy.split("@")[0]) % len(shapes)]
            ax.scatter([x], [y], s=60, marker=marker, color=_COLORS(k % 20), edgecolor="black", lw=0.5,
                       zorder=3, label=f"{policy} (n={n})")
        lx = math.log10(x) if log and x > 0 else x
        if all(abs(lx - a) > 0.12 or abs(y - b) > 0.06 for a, b in labelled):
            labelled.append((lx, y))
            ax.annotate(policy, (x, y), xytext=(6, 5), textcoords="offset points", fontsize=8,
                        fontweight="bold" if _is_full(policy) else "normal")
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.8)  # room for the labels right of the markers
    elif xs:
        ax.set_xlim(0.0, max(xs) * 1.2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    minor = FuncFormatter(lambda v, _: f"{v:g}" if log and _leading(v) in (2, 5) else "")
    ax.xaxis.set_minor_formatter(minor)
    ax.set_ylim(-0.05, 1.08)
    ax.set_xlabel("held / dense bytes" + (" (log scale)" if log else ""))
    ax.set_ylabel(label)
    lengths = sorted({int(r["length"]) for r in rs if r.get("length") is not None})
    ax.set_title(f"{task}: {label} vs memory ({', '.join(_tokens(n) for n in lengths)} tokens)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), framealpha=0.9)
    return _save(fig, path)


def accuracy_curves(records: list[dict], task: str, path: str | Path, *, metric: str = "correct",
                    label: str = "accuracy") -> Path:
    """Accuracy against memory per method, one panel per context length, saved as PNG.

    A method is the policy name before ``@`` (``snapkv@0.25`` and ``snapkv@0.125`` are one
    method): its budgets are joined by a line, ordered by their held / dense bytes (log x). A
    policy without budgets (``full``, ``kivi2``) is one marker; ``full`` a black star and a dashed
    line. The readable form of a large grid (every preset at several budgets).

    Raises:
        ValueError: no record has this ``task``.
    """
    rs = [r for r in records if r.get("task") == task]
    if not rs:
        present = sorted({str(r.get("task")) for r in records})
        raise ValueError(f"accuracy_curves task: got {task!r}, but there are no records for it; "
                         f"tasks present: {present or 'none'}")
    lengths = sorted({int(r["length"]) for r in rs})
    methods = list(dict.fromkeys(str(r["policy"]).split("@")[0] for r in rs))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(lengths) + 2.4, 4.8), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(lengths), squeeze=False, sharey=True)[0]
    shapes = "osD^vP<>Xph*"
    for ax, n in zip(axes, lengths):
        at_n = [r for r in rs if int(r["length"]) == n]
        for i, m in enumerate(methods):
            pts = []
            for policy in sorted({str(r["policy"]) for r in at_n if str(r["policy"]).split("@")[0] == m}):
                v = [r for r in at_n if r["policy"] == policy]
                pts.append((_mean_ratio(v), sum(float(r.get(metric) or 0) for r in v) / len(v)))
            pts = sorted(p for p in pts if not math.isnan(p[0]))
            if not pts:
                continue
            if _is_full(m):
                ax.scatter(*zip(*pts), s=200, marker="*", color="black", zorder=4, label=m)
                ax.axhline(pts[0][1], color="black", lw=0.8, ls="--", zorder=1)
                continue
            ax.plot(*zip(*pts), marker=shapes[i % len(shapes)], ms=5, lw=1.3, color=_COLORS(i % 20),
                    markeredgecolor="black", markeredgewidth=0.4, label=m)
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _leading(v) in (2, 5) else ""))
        ax.set_ylim(-0.05, 1.08)
        ax.set_xlabel("held / dense bytes (log scale)")
        ax.set_title(f"{task}, {_tokens(n)} tokens", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(label)
    # One legend for every panel: a method may have points at one length only.
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[-1].legend(handles.values(), handles.keys(), fontsize=7, loc="center left",
                    bbox_to_anchor=(1.01, 0.5), framealpha=0.9)
    return _save(fig, path)


def heatmap_grid(records: list[dict], task: str, path: str | Path, *, cols: int = 6) -> Path:
    """Every policy's depth x length accuracy on ``task`` as small multiples in one PNG (the
    per-policy :func:`needle_heatmap` without the cell labels), titled with the accuracy and
    held / dense bytes; green = found, red = missed, grey = not run.

    Raises:
        ValueError: no record has this ``task``.
    """
    rs = [r for r in records if r.get("task") == task]
    if not rs:
        raise ValueError(f"heatmap_grid task: got {task!r}, but there are no records for it")
    policies = list(dict.fromkeys(["full"] + [str(r["policy"]) for r in rs]))
    policies = [p for p in policies if any(r["policy"] == p for r in rs)]
    depths = sorted({round(float(r["depth"]), 4) for r in rs})
    lengths = sorted({int(r["length"]) for r in rs})
    rows = -(-len(policies) // cols)
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.1 * cols, 1.9 * rows + 0.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = colormaps["RdYlGn"].with_extremes(bad="#d0d0d0")
    for k, ax in enumerate(axes.flat):
        if k >= len(policies):
            ax.axis("off")
            continue
        policy = policies[k]
        v = [r for r in rs if r["policy"] == policy]
        acc = [[math.nan] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                cell = [r for r in v if round(float(r["depth"]), 4) == d and int(r["length"]) == n]
                if cell:
                    acc[i][j] = sum(bool(r.get("correct")) for r in cell) / len(cell)
        ax.imshow(acc, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        total = sum(bool(r.get("correct")) for r in v) / len(v)
        ax.set_title(f"{policy}\nacc {total:.2f}, held {_mean_ratio(v):.3f}", fontsize=7)
        ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths], fontsize=6)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=5)
    fig.suptitle(f"{task}: found (green) / missed (red) by depth (rows) and context length (columns)",
                 fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- internals


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _mean_ratio(rs: list[dict]) -> float:
    ratios = [r["held_bytes"] / r["dense_bytes"] for r in rs
              if r.get("dense_bytes") and r.get("held_bytes") is not None]
    return sum(ratios) / len(ratios) if ratios else math.nan


def _is_full(policy: str) -> bool:
    return policy == "full" or policy.startswith("full@")


def _leading(v: float) -> int:
    """First significant digit of ``v > 0`` (labels minor log ticks at 2 and 5 only)."""
    return int(round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)) if v > 0 else 0


def _tokens(n: int) -> str:
    return f"{n / 1024:g}k" if n >= 1024 and n % 256 == 0 else str(n)
