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
    import kvfx.runtime.ops as ops
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
    ops.TAP = tap
    try:
        with torch.no_grad():
            cache = _new_cache(inner)
            out = model(ids[:, :n], **{kw: cache}, use_cache=True)
            cache = _returned_cache(out, cache)
            for t in range(n, n + steps):
                out = model(ids[:, t:t + 1], **{kw: cache}, use_cache=True)
                cache = _returned_cache(out, cache)
    finally:
        ops.TAP = None
    if not rec:
        raise RuntimeError("calib_error: no kvfx attention site was called; compile the model with "
                           "backend='kvfx' and the full policy first")
    return rec


def variant_policy(method: str, keep: float, calibrate: bool, prompt_len: int, history: int = 32,
                   threshold: float = 0.9) -> dict:
    """A policy dict: ``snapkv`` at ``keep``, or ``streaming`` with the window sized so it keeps
    the same number of tokens (sink + window = keep · prompt), each with or without CaliDrop."""
    name = f"{method}-keep{keep:g}" + ("+calidrop" if calibrate else "")
    doc = {"kvfx": 1, "name": name, "extends": method}
    if method == "streaming":
        doc["budget"] = {"window": max(1, round(keep * prompt_len) - 4)}
    else:
        doc["budget"] = {"keep": keep}
    if calibrate:
        doc["calibration"] = {"history": history, "threshold": threshold}
    return doc


def replay(rec: dict[str, SiteRecord], policy, num_layers: int) -> dict[str, float]:
    """Relative L1 error per site of ``policy`` (anything ``load_policy`` takes) replayed on the
    recorded calls."""
    from kvfx.methods.compressor import build_compressor
    from kvfx.policy import load_policy
    from kvfx.runtime.ops import site_attention
    from kvfx.runtime.registry import make_store

    pol = load_policy(policy)
    errors = {}
    for path, r in rec.items():
        c = build_compressor(pol.resolve(r.layer, path, num_layers), r.layer, num_layers)
        store = make_store(path, c)
        q, k, v, mask, scale, causal = r.prompt
        site_attention(c, store, q, k, v, mask, 0, scale, causal, path)
        err = ref = 0.0
        for q, k, v, mask, past_len, full in r.steps:
            o = site_attention(c, store, q, k, v, mask, past_len, scale, False, path)
            err += float((o.float() - full.float()).abs().sum())
            ref += float(full.float().abs().sum())
        errors[path] = err / ref if ref else float("nan")
    return errors


def run_calib_error(model_name: str = "smollm2-135m", *, length: int = 4096, steps: int = 32,
                    keeps=(0.25, 0.125, 0.0625), methods=("snapkv", "streaming"),
                    source: str = "essays", out: str | Path | None = None, progress: bool = True) -> dict:
    """Record a full-cache run of ``model_name`` on ``length`` tokens of ``source`` (the last
    ``steps`` teacher-forced), replay every (method × keep × calibration) variant, and return
    ``{"layers": [...], "variants": {name: [error per layer]}, "mean": {name: mean error}, ...}``;
    with ``out``, also write ``calib_error.json`` and ``calib_error.png`` there."""
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
    variants = [(m, kp, cal) for m in methods for kp in keeps for cal in (False, True)]
    table = {}
    it = variants
    if progress:
        from tqdm import tqdm

        it = tqdm(variants, desc="calib-error replay", unit="variant")
    for m, kp, cal in it:
        doc = variant_policy(m, kp, cal, length)
        err = replay(rec, doc, n_layers)
        table[f"{m}@{kp:g}" + ("+calidrop" if cal else "")] = [err[p] for p in order]
    result = {
        "model": model_name, "length": length, "steps": steps, "source": source,
        "layers": [rec[p].layer for p in order],
        "variants": table,
        "mean": {k: sum(v) / len(v) for k, v in table.items()},
        "seconds": time.perf_counter() - t0,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "calib_error.json").write_text(json.dumps(result, indent=1))
        plot_calib_error(result, out / "calib_error.png")
    return result


def markdown(result: dict) -> str:
    """Mean relative L1 error over layers, with and without calibration, per method and keep."""
    rows = ["| method | keep | error without | error with CaliDrop | change |", "|---|---|---|---|---|"]
    for name, e in result["mean"].items():
        if name.endswith("+calidrop"):
            continue
        method, keep = name.split("@")
        e_cal = result["mean"].get(name + "+calidrop")
        change = f"{100 * (e_cal - e) / e:+.1f}%" if e_cal is not None and e else ""
        rows.append(f"| {method} | {keep} | {e:.4f} | {e_cal:.4f} | {change} |")
    return "\n".join(rows)


def plot_calib_error(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({n.split("@")[0] for n in result["variants"]})
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        names = [n for n in result["variants"] if n.startswith(method + "@") and not n.endswith("+calidrop")]
        for i, name in enumerate(names):
            color = f"C{i}"
            ax.plot(result["layers"], result["variants"][name], color=color, ls="--",
                    label=f"keep {name.split('@')[1]}")
            cal = result["variants"].get(name + "+calidrop")
            if cal is not None:
                ax.plot(result["layers"], cal, color=color, ls="-", label=f"keep {name.split('@')[1]} + CaliDrop")
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
