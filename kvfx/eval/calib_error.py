"""Per-layer error of decode attention under compression, with and without CaliDrop.

The measurement of CaliDrop's paper ("loss before and after calibration"): how far each
layer's decode attention output moves from the full cache's when the cache is compressed.

Method. One run of the model with the ``full`` policy records, at every attention site, the
prompt's (q, k, v, mask) and, for each teacher-forced decode step, the step's (q, k, v) and the
full-cache output. Each compression variant is then *replayed* per site on exactly those
tensors through the same runtime code the compiled model runs
(:func:`kvfx.runtime.ops.site_attention`): the prompt is compressed, the steps are appended and
attended. Every layer therefore sees the same inputs in every variant, so the error of a layer
is its own, not inherited from the layers below.

    error(layer, variant) = Σ_steps |o_variant − o_full|₁ / Σ_steps |o_full|₁

Example::

    kvfx calib-error --model smollm2-135m --length 4096 --steps 32 --keep 0.25,0.125,0.0625
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["record_full", "replay", "variant_policy", "run_calib_error"]


@dataclass
class SiteRecord:
    path: str
    layer: int
    prompt: tuple  # (q, k, v, mask, scale, is_causal)
    steps: list = field(default_factory=list)  # [(q, k, v, mask, past_len, out_full)]


def record_full(model, ids: torch.Tensor, steps: int) -> dict[str, SiteRecord]:
    """Run ``model`` (compiled with kvfx ``full``) on ``ids[:, :-steps]`` and teacher-force the
    last ``steps`` tokens one at a time, recording every site's calls."""
    from kvfx.eval.perplexity import _new_cache, _returned_cache

    rec: dict[str, SiteRecord] = {}

    def tap(info, q, k, v, mask, past_len, scale, is_causal, out):
        m = None if mask is None else mask.detach().clone()
        if past_len == 0:
            rec[info.module_path] = SiteRecord(info.module_path, info.layer_index,
                                               (q.clone(), k.clone(), v.clone(), m, scale, is_causal))
        else:
            rec[info.module_path].steps.append((q.clone(), k.clone(), v.clone(), m, past_len, out.clone()))

    import inspect

    inner = getattr(model, "_orig_mod", model)
    kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    n = ids.shape[1] - steps
    from kvfx.runtime.state import tapping

    with tapping(model, tap), torch.no_grad():
        if True:
            cache = _new_cache(inner)
            out = model(ids[:, :n], **{kw: cache}, use_cache=True)
            cache = _returned_cache(out, cache)
            for t in range(n, n + steps):
                out = model(ids[:, t:t + 1], **{kw: cache}, use_cache=True)
                cache = _returned_cache(out, cache)
    if not rec:
        raise RuntimeError("calib_error: no kvfx attention site was called; compile the model with "
                           "backend='kvfx' and the full policy first")
    return rec


# The calibration of the CaliDrop presets (kvfx/policy/presets/*-calidrop*.yaml, a test keeps them
# equal), chosen with this tool: see the README's CaliDrop section.
DEFAULT_THRESHOLD, DEFAULT_ADJUST = 0.5, "tangent"


def variant_name(method: str, keep: float, calibrate: bool, threshold: float = DEFAULT_THRESHOLD,
                 adjust: str = DEFAULT_ADJUST) -> str:
    """``snapkv@0.25`` (no calibration) or ``snapkv@0.25+calidrop(t=0.5,tangent)`` /
    ``snapkv@0.25+calidrop(t=0.9)`` (the threshold, and the LSE adjustment unless "none")."""
    name = f"{method}@{keep:g}"
    if not calibrate:
        return name
    return name + f"+calidrop(t={threshold:g}" + (f",{adjust})" if adjust != "none" else ")")


def variant_policy(method: str, keep: float, calibrate: bool, prompt_len: int, history: int = 32,
                   threshold: float = DEFAULT_THRESHOLD, adjust: str = DEFAULT_ADJUST) -> dict:
    """A policy dict: ``snapkv`` at ``keep``, or ``streaming`` with the window sized so it keeps
    the same number of tokens (sink + window = keep · prompt), each with or without CaliDrop
    (``threshold``: the cosine a decode query needs; ``adjust``: the LSE estimate)."""
    name = variant_name(method, keep, calibrate, threshold, adjust)
    name = name.replace("@", "-keep").replace("(t=", "-t").replace(",", "-").replace(")", "")
    doc = {"kvfx": 1, "name": name, "extends": method}
    if method == "streaming":
        doc["budget"] = {"window": max(1, round(keep * prompt_len) - 4)}
    else:
        doc["budget"] = {"keep": keep}
    if calibrate:
        doc["calibration"] = {"history": history, "threshold": threshold, "adjust": adjust}
    return doc


class _CountingCaliDrop:
    """Wraps a compressor's :class:`kvfx.methods.calidrop.CaliDrop` and counts how many (query
    head, decode step) pairs were calibrated (``use`` True) out of all."""

    def __init__(self, inner):
        self.inner, self.used, self.total = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def calibrate(self, state, q, *, scale):
        o_e, lse_e, use, state = self.inner.calibrate(state, q, scale=scale)
        self.used += int(use.sum())
        self.total += use.numel()
        return o_e, lse_e, use, state


def replay(rec: dict[str, SiteRecord], policy, num_layers: int, hits: dict | None = None) -> dict[str, float]:
    """Relative L1 error per site of ``policy`` (anything ``load_policy`` takes) replayed on the
    recorded calls. ``hits``: a dict that receives, per site with calibration, the fraction of
    (query head, decode step) pairs whose nearest stored query passed the threshold."""
    from kvfx.runtime.compressor import build_compressor
    from kvfx.policy import load_policy
    from kvfx.runtime.ops import make_store, site_attention

    pol = load_policy(policy)
    errors = {}
    for path, r in rec.items():
        lp = pol.resolve(r.layer, path, num_layers)
        if lp.lowrank is not None:
            raise ValueError(f"calib_error: policy {pol.name!r} has lowrank:; the recorded calls hold keys "
                             "and values, not the projection inputs a low-rank site stores")
        c = build_compressor(lp, r.layer, num_layers)
        if c.calib is not None:
            c.calib = _CountingCaliDrop(c.calib)
        store = make_store(path, c)
        q, k, v, mask, scale, causal = r.prompt
        site_attention(c, store, q, k, v, mask, 0, scale, causal, path)
        err = ref = 0.0
        for q, k, v, mask, past_len, full in r.steps:
            o = site_attention(c, store, q, k, v, mask, past_len, scale, False, path)
            err += float((o.float() - full.float()).abs().sum())
            ref += float(full.float().abs().sum())
        errors[path] = err / ref if ref else float("nan")
        if hits is not None and c.calib is not None:
            hits[path] = c.calib.used / c.calib.total if c.calib.total else float("nan")
    return errors


def run_calib_error(model_name: str = "smollm2-135m", *, length: int = 4096, steps: int = 32,
                    keeps=(0.25, 0.125, 0.0625), methods=("snapkv", "streaming"),
                    thresholds=(DEFAULT_THRESHOLD,), adjusts=(DEFAULT_ADJUST,),
                    source: str = "essays", out: str | Path | None = None, progress: bool = True) -> dict:
    """Record a full-cache run of ``model_name`` on ``length`` tokens of ``source`` (the last
    ``steps`` teacher-forced), replay every variant (method × keep × [no calibration, CaliDrop
    with each threshold × adjust]) and return ``{"layers": [...], "variants": {name: [error per
    layer]}, "mean": {name: mean error}, "hit_rate": {name: mean over layers of the calibrated
    fraction of (head, step) pairs}, ...}`` (names: :func:`variant_name`); with ``out``, also
    write ``calib_error.json`` and ``calib_error.png`` there."""
    import kvfx
    from kvfx.eval.perplexity import long_text_ids
    from kvfx.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(model_name, progress=progress)
    kvfx.reset()
    model.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    ids = long_text_ids(tok, length + steps, source)
    rec = record_full(model, ids, steps)
    order = sorted(rec, key=lambda p: rec[p].layer)
    n_layers = len(order)
    cal_opts = [(t, a) for t in thresholds for a in adjusts]
    variants = [(m, kp, None) for m in methods for kp in keeps]
    variants += [(m, kp, ta) for m in methods for kp in keeps for ta in cal_opts]
    table, hit_rate = {}, {}
    it = variants
    if progress:
        from tqdm import tqdm

        it = tqdm(variants, desc="calib-error replay", unit="variant")
    for m, kp, ta in it:
        cal = ta is not None
        t, a = ta if cal else (DEFAULT_THRESHOLD, DEFAULT_ADJUST)
        hits: dict = {}
        err = replay(rec, variant_policy(m, kp, cal, length, threshold=t, adjust=a), n_layers, hits)
        name = variant_name(m, kp, cal, t, a)
        table[name] = [err[p] for p in order]
        if cal:
            hit_rate[name] = sum(hits.values()) / len(hits)
    result = {
        "model": model_name, "length": length, "steps": steps, "source": source,
        "layers": [rec[p].layer for p in order],
        "variants": table,
        "mean": {k: sum(v) / len(v) for k, v in table.items()},
        "hit_rate": hit_rate,
        "seconds": time.perf_counter() - t0,
    }
    result["thresholds"], result["adjusts"] = list(thresholds), list(adjusts)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "calib_error.json").write_text(json.dumps(result, indent=1))
        plot_calib_error(result, out / "calib_error.png")
        if len(cal_opts) > 1:
            plot_calib_sweep(result, out / "calib_sweep.png")
    return result


def markdown(result: dict) -> str:
    """Mean relative L1 error over layers without and with each calibration variant, per method
    and keep, and how often the calibration applied (the threshold's hit rate)."""
    rows = ["| method | keep | calibration | mean error | change | calibrated (head, step) pairs |",
            "|---|---|---|---|---|---|"]
    hit = result.get("hit_rate", {})
    for name, e in result["mean"].items():
        if "+" in name:
            continue
        method, keep = name.split("@")
        rows.append(f"| {method} | {keep} | none | {e:.4f} |  |  |")
        for cname, e_cal in result["mean"].items():
            if not cname.startswith(name + "+"):
                continue
            label = cname[len(name) + 1:]
            change = f"{100 * (e_cal - e) / e:+.1f}%" if e else ""
            h = hit.get(cname)
            rows.append(f"| {method} | {keep} | {label} | {e_cal:.4f} | {change} | "
                        + (f"{100 * h:.1f}% |" if h is not None else " |"))
    return "\n".join(rows)


def plot_calib_error(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({n.split("@")[0] for n in result["variants"]})
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        names = [n for n in result["variants"] if n.startswith(method + "@") and "+" not in n]
        for i, name in enumerate(names):
            color = f"C{i}"
            ax.plot(result["layers"], result["variants"][name], color=color, ls="--",
                    label=f"keep {name.split('@')[1]}")
            # the presets' calibration if it was run, else the first calibrated variant
            cals = [n for n in result["variants"] if n.startswith(name + "+")]
            preset = variant_name(*name.split("@")[:1], float(name.split("@")[1]), True)
            cal = preset if preset in cals else (cals[0] if cals else None)
            if cal is not None:
                label = cal[len(name) + 1:]
                ax.plot(result["layers"], result["variants"][cal], color=color, ls="-",
                        label=f"keep {name.split('@')[1]} + {label}")
        ax.set_title(f"{method}: decode attention error per layer")
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("relative L1 error vs full cache")
    fig.suptitle(f"{result['model']}, {result['length']}-token prompt, {result['steps']} decode steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweep_point(name: str) -> tuple[float, str] | None:
    """(threshold, adjust) of a calibrated variant name, None for an uncalibrated one."""
    if "+calidrop" not in name:
        return None
    tail = name.split("+calidrop", 1)[1]
    if not tail:  # written before names spelled the calibration: the then default
        return 0.9, "none"
    parts = tail.strip("()").split(",")
    return float(parts[0][2:]), (parts[1] if len(parts) > 1 else "none")


def plot_calib_sweep(result: dict, path) -> None:
    """Mean error over layers against the threshold, one line per (keep, LSE estimate), the
    uncalibrated error as a dotted level; a panel per method, and the hit rate below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({n.split("@")[0] for n in result["variants"]})
    fig, axes = plt.subplots(2, len(methods), figsize=(6 * len(methods), 6.5), squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for col, method in enumerate(methods):
        ax, hx = axes[0][col], axes[1][col]
        bases = [n for n in result["variants"] if n.startswith(method + "@") and "+" not in n]
        for i, base in enumerate(bases):
            color = f"C{i}"
            keep = base.split("@")[1]
            ax.axhline(result["mean"][base], color=color, ls=":", lw=1)
            for adjust, style in (("none", "--"), ("tangent", "-")):
                pts = sorted((pt[0], result["mean"][n]) for n in result["variants"]
                             if n.startswith(base + "+") and (pt := _sweep_point(n)) and pt[1] == adjust)
                if pts:
                    ax.plot(*zip(*pts), color=color, ls=style, marker="o", ms=3,
                            label=f"keep {keep}, LSE {adjust}")
            hits = sorted((pt[0], result["hit_rate"][n]) for n in result["hit_rate"]
                          if n.startswith(base + "+") and (pt := _sweep_point(n)))
            if hits and i == 0:
                hx.plot(*zip(*sorted(set(hits))), color="k", marker="o", ms=3)
        ax.set_title(f"{method}: mean decode attention error (dotted: no calibration)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        hx.set_xlabel("CaliDrop threshold (cosine to the nearest stored query)")
        hx.set_ylabel("calibrated\n(head, step)")
        hx.set_ylim(0, 1.05)
        hx.grid(alpha=0.3)
    axes[0][0].set_ylabel("relative L1 error vs full cache")
    fig.suptitle(f"{result['model']}, {result['length']}-token prompt ({result.get('source', '')}), "
                 f"{result['steps']} decode steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
