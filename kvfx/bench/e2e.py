"""``kvfx bench e2e``: prefill and decode speed, memory and compile time of a model under kvfx
policies, each as a ratio against baselines measured in the same process and the same run.

Configurations (every run has the first three, then the requested policies):

    eager          the model as loaded, default cache (``DynamicCache``), no compiler
    hf-<b>-<n>bit  (``hf_quantized=``) the eager model with Hugging Face's ``QuantizedCache``
                   (backend quanto or hqq, n bits; ``hf-fp8``: per-tensor float8), what users pick
                   instead of kvfx; its bytes are measured by ``kvfx.memory(cache)`` through the
                   backends' wrapper tensors
    inductor       ``torch.compile(model, backend="inductor")``, default cache (``baseline=`` names
                   another dynamo backend for quick tests; the row takes its name, ``dynamo-eager``
                   for dynamo's ``eager``)
    kvfx:full      ``torch.compile(model, backend="kvfx", options={"policy": "full", "inner": ...})``
    kvfx:<spec>    the same with each requested policy (preset, file or ``NAME@KEEP``)

All of them are wrappers of one model (same weights). They run interleaved: a *round* runs one
sequence of every configuration at every length, the configuration order rotating each round.
Round 0 compiles (its times give the compile time only); rounds 1..R are measured.

One sequence at context ``L``: a prefill forward of ``L`` token ids (``logits_to_keep=1``), then
``warmup + steps`` forwards of one token each through the cache the model returned (teacher-forced
from the same text by default; ``greedy=True`` feeds back the argmax). Measured per configuration
and length:

    prefill_s        median over the measured rounds of the prefill forward's wall time
    decode_ms        median of the ``steps`` one-token forwards after ``warmup``, pooled over rounds
                     (decode_ms_rounds: the median of each round; their spread shows the noise)
    compile_s        round 0's sequence time minus its steady-state estimate
                     (prefill_s + (warmup + steps) * decode_ms); ~0 for eager, up to the noise
    graphs           graphs dynamo compiled during round 0 (``counters["stats"]["unique_graphs"]``);
                     graphs_later: during the measured rounds (a recompile there is a bug)
    kv_held_bytes    bytes held for KV at the end of the sequence: ``kvfx.memory(cache)["held_bytes"]``
                     (the kvfx store plus the model's own cache tensors) with every other
                     configuration's store released first; for the baselines that is the bytes of
                     the ``DynamicCache`` tensors
    peak_rss_delta   the process's peak RSS during the sequence above its RSS at the start
                     (see :class:`kvfx.bench.measure.PeakMemory`), max over the measured rounds;
                     split into the prefill forward (``peak_rss_prefill_delta``: prompt activations
                     and the prompt's K/V before compression) and the decode steps
                     (``peak_rss_decode_delta``, after handing what the prefill freed back to the OS:
                     what stays held while generating, the KV cache, plus decode's transients)

Ratios (``vs_baseline``, ``vs_full``) divide a number by the same number of the ``inductor`` (the
baseline) or ``kvfx:full`` configuration at the same length in the same run (< 1: faster or smaller).

Example::

    from kvfx.bench.e2e import run_e2e, write_outputs
    result = run_e2e(model, ids, lengths=[1024, 2048], policies=["snapkv"], steps=16)
    write_outputs(result, "runs/bench/e2e")      # e2e.json, e2e.md, e2e_decode.png
"""

from __future__ import annotations

import gc
import inspect
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from kvfx.bench.measure import PeakMemory, environment, median, ratio, timed
from kvfx.runtime.ranks import world_size

__all__ = ["FULL", "markdown_table", "plot_decode", "run_e2e", "write_outputs"]

FULL = "kvfx:full"
INNER = ("inductor", "eager", "aot_eager")


@dataclass
class Setup:
    name: str
    kind: str  # "eager" | "baseline" | "kvfx"
    policy: str | None
    policy_hash: str | None
    fn: object
    options: dict | None = None  # the kvfx options (None for the eager and baseline rows)
    cache: object = None  # model -> a new cache object (None: the model's default cache)


def baseline_name(backend: str) -> str:
    """The row name of the compiled baseline: its backend (``dynamo-eager`` for dynamo's ``eager``,
    which is not the uncompiled ``eager`` row)."""
    return "dynamo-eager" if backend == "eager" else backend


HF_QUANT_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq"), "fp8": (None, None)}


def hf_quantized_specs(specs) -> list[tuple[str, int | None]]:
    """``["quanto:2", "hqq:4", "fp8"]`` -> [(backend, bits)]; ``["auto"]``: quanto and HQQ at 2 and 4
    bits for each backend that is installed (none: an empty list). Raises ValueError naming the
    package to install for a backend that is not."""
    import importlib.util

    def installed(backend):
        mod = HF_QUANT_PACKAGES[backend][0]
        return mod is None or (importlib.util.find_spec(mod.split(".")[0]) is not None
                               and importlib.util.find_spec(mod) is not None)

    out = []
    for spec in specs:
        if spec == "auto":
            out += [(b, n) for b in ("quanto", "hqq") if installed(b) for n in (2, 4)]
            continue
        backend, _, bits = spec.partition(":")
        if backend not in HF_QUANT_PACKAGES:
            raise ValueError(f"kvfx bench e2e: hf-quantized {spec!r}, expected quanto:BITS, hqq:BITS, fp8 or auto")
        if backend == "fp8":
            if bits:
                raise ValueError("kvfx bench e2e: hf-quantized fp8 quantizes per tensor and takes no bits")
            out.append(("fp8", None))
            continue
        if bits not in ("2", "4"):
            raise ValueError(f"kvfx bench e2e: hf-quantized {spec!r}, expected {backend}:2 or {backend}:4")
        if not installed(backend):
            raise ValueError(f"kvfx bench e2e: hf-quantized {spec!r} needs the {HF_QUANT_PACKAGES[backend][1]} "
                             f"package (pip install {HF_QUANT_PACKAGES[backend][1]}), which is not installed")
        out.append((backend, int(bits)))
    return list(dict.fromkeys(out))


def _hf_quantized_setup(model, backend: str, bits: int | None) -> Setup:
    """The eager model with Hugging Face's ``QuantizedCache`` (its default residual and groups)."""
    from transformers import QuantizedCache

    name = f"hf-{backend}" + (f"-{bits}bit" if bits else "")
    kw = {} if bits is None else {"nbits": bits}
    return Setup(name, "hf-quantized", None, None, model,
                 cache=lambda m: QuantizedCache(backend=backend, config=m.config, **kw))


def make_setups(model, policies, *, inner: str = "inductor", dynamic: bool | None = None,
                baseline: str = "inductor", hf_quantized=()) -> list[Setup]:
    """eager, ``baseline`` (inductor), the ``hf_quantized`` caches (:func:`hf_quantized_specs`),
    kvfx:full, then ``kvfx:<spec>`` for each other spec."""
    from kvfx.eval.harness import policy_from_spec

    if inner not in INNER:
        raise ValueError(f"kvfx bench e2e: inner={inner!r}, expected one of {', '.join(INNER)}")
    if dynamic is False:
        raise ValueError("kvfx bench e2e: dynamic=False recompiles every decode step (the cache grows); "
                         "use None (automatic dynamic shapes) or True")
    if baseline == "kvfx":
        raise ValueError("kvfx bench e2e: baseline='kvfx', expected a dynamo backend other than kvfx "
                         "(inductor; eager or aot_eager for quick tests)")
    setups = [Setup("eager", "eager", None, None, model),
              Setup(baseline_name(baseline), "baseline", None, None,
                    torch.compile(model, backend=baseline, dynamic=dynamic))]
    setups += [_hf_quantized_setup(model, b, n) for b, n in hf_quantized_specs(hf_quantized)]
    specs = ["full"] + [p for p in policies if p != "full"]
    for spec in dict.fromkeys(specs):
        policy = policy_from_spec(spec)
        options = {"policy": policy, "inner": inner}
        # each policy its own recompile budget (kvfx.compile does the same for model.compile)
        fn = torch.compile(model, backend="kvfx", dynamic=dynamic, options=options, isolate_recompiles=True)
        setups.append(Setup(f"kvfx:{spec}", "kvfx", spec, policy.hash, fn, options))
    return setups


def run_e2e(model, ids: torch.Tensor, *, lengths, policies=(), steps: int = 32, warmup: int = 4,
            rounds: int = 2, inner: str = "inductor", dynamic: bool | None = None, greedy: bool = False,
            baseline: str = "inductor", model_name: str = "", command: str = "", progress: bool = True,
            hf_quantized=(), prefill_chunk: int | None = None) -> dict:
    """Measure every configuration at every length (see the module docstring).

    Args:
        model: a Hugging Face causal LM (eval mode, on its device).
        ids: ``(1, N)`` token ids with ``N >= max(lengths) + warmup + steps``.
        lengths: prefill context lengths in tokens.
        policies: kvfx policy specs besides ``full`` (which always runs).
        steps, warmup: timed and untimed one-token decode steps per sequence.
        rounds: measured rounds (after the compile round), >= 1.
        inner: kvfx's inner compiler; dynamic: ``torch.compile(dynamic=)`` (None or True).
        greedy: feed back the argmax instead of the next token of ``ids``.
        baseline: the dynamo backend of the compiled baseline and of the ratios (inductor).
        hf_quantized: Hugging Face ``QuantizedCache`` baselines on the eager model, e.g.
            ``["quanto:2", "hqq:4"]``, ``["auto"]`` (every installed backend at 2 and 4 bits) or
            ``["fp8"]`` (see :func:`hf_quantized_specs`).
    Returns:
        ``{"meta": {...}, "configs": [...], "rows": [...]}``, one row per (configuration, length).
    """
    import torch._dynamo
    from torch._dynamo.utils import counters
    from tqdm.auto import tqdm

    lengths = sorted({int(n) for n in lengths})
    for name, v, lo in (("steps", steps, 1), ("warmup", warmup, 0), ("rounds", rounds, 1)):
        if type(v) is not int or v < lo:
            raise ValueError(f"kvfx bench e2e: {name}={v!r}, expected an int >= {lo}")
    if not lengths or lengths[0] < 1:
        raise ValueError(f"kvfx bench e2e: lengths {lengths}, expected positive token counts")
    need = lengths[-1] + warmup + steps
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < need:
        raise ValueError(f"kvfx bench e2e: ids has shape {tuple(ids.shape)}, expected (1, >= {need}) "
                         "(the longest length + warmup + steps)")
    if prefill_chunk is not None:  # a policy that stops at the first chunk fails before any run
        from kvfx.eval.harness import check_chunked_policies

        check_chunked_policies(model, policies, prefill_chunk, "kvfx bench e2e")
    device = next(model.parameters()).device
    ids = ids.to(device)
    setups = make_setups(model, policies, inner=inner, dynamic=dynamic, baseline=baseline,
                         hf_quantized=hf_quantized)
    params = inspect.signature(model.forward).parameters
    kw = "cache" if "cache" in params else "past_key_values"
    first_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    probe = PeakMemory(device)
    env = environment(device)
    runs: dict[tuple[str, int], list[dict]] = {(s.name, n): [] for s in setups for n in lengths}
    limit = max(torch._dynamo.config.recompile_limit, 8 * len(setups))
    total = (rounds + 1) * len(lengths) * len(setups)
    bar = tqdm(total=total, desc="bench e2e", unit="seq", disable=not progress)
    # [Note] every sequence starts with a gc.collect() (kvfx.bench.measure.release_memory); freezing
    # what exists now (torch, transformers, the model) keeps that from rescanning ~1M module objects.
    gc.collect()
    gc.freeze()
    try:
        with torch._dynamo.config.patch(recompile_limit=limit), torch.no_grad():
            for r in range(rounds + 1):
                order = setups[r % len(setups):] + setups[:r % len(setups)]
                for n in lengths:
                    for s in order:
                        bar.set_postfix_str(f"round {r}/{rounds} {s.name} L={n}")
                        graphs0 = counters["stats"]["unique_graphs"]
                        rec = _sequence(s, model, ids, n, warmup, steps, kw, first_kw, greedy, probe, device,
                                        prefill_chunk)
                        rec["graphs"] = counters["stats"]["unique_graphs"] - graphs0
                        runs[(s.name, n)].append(rec)
                        bar.update()
    finally:
        gc.unfreeze()
        bar.close()
    rows = [_summarize(s, n, runs[(s.name, n)], warmup, steps) for n in lengths for s in setups]
    _add_ratios(rows, baseline_name(baseline))
    meta = {"model": model_name or type(model).__name__, "lengths": lengths, "steps": steps,
            "warmup": warmup, "rounds": rounds, "inner": inner, "baseline": baseline_name(baseline),
            "dynamic": "auto" if dynamic is None else dynamic, "feed": "greedy" if greedy else "teacher-forced",
            "prefill_chunk": prefill_chunk,
            "dtype": str(next(model.parameters()).dtype), "memory_measure": probe.what,
            "recompile_limit": limit, "command": command, "tp": world_size(), **env}
    configs = [{"name": s.name, "kind": s.kind, "policy": s.policy, "policy_hash": s.policy_hash,
                **_site_summary(s)} for s in setups]
    return {"meta": meta, "configs": configs, "rows": rows}


def _site_summary(s: Setup) -> dict:
    """For a kvfx configuration: attention sites found, rewritten, and why the others were left
    alone (a config that rewrote nothing measures the uncompressed model)."""
    if s.options is None:
        return {}
    from kvfx.runtime.state import sessions

    model = getattr(s.fn, "_orig_mod", s.fn)
    sites = [x for ss in sessions(model) if ss.policy.hash == s.policy_hash for x in ss.sites()]
    reasons: dict[str, int] = {}
    for x in sites:
        if not x.rewritten:
            reasons[x.reason] = reasons.get(x.reason, 0) + 1
    return {"sites": len(sites), "rewritten": sum(x.rewritten for x in sites), "left_alone": reasons}


def _tokens(ids, a: int, b: int):
    """ids[:, a:b] as a tensor of its own (offset 0, contiguous strides), as generate feeds them.
    [Note] Slices of one long id tensor change their storage offset and keep its row stride at every
    step; under tensor parallelism dynamo then traces the vocabulary-sharded embedding's DTensor
    input with symbolic strides/offset, which DTensor's sharding cache cannot hash ("unhashable
    type: non-nested SymInt"). Fresh tensors trace like generate's and compile."""
    return ids[:, a:b].clone(memory_format=torch.contiguous_format)


def _prefill(s: Setup, ids, n, kw, first_kw, cache, chunk: int | None):
    """The prompt's n tokens in one call, or in calls of ``chunk`` tokens continuing the cache
    (what ``generate(prefill_chunk_size=chunk)`` does; kvfx compresses at every boundary)."""
    if not chunk:
        return s.fn(input_ids=_tokens(ids, 0, n), use_cache=True, **{kw: cache}, **first_kw)
    out = None
    for a in range(0, n, chunk):
        out = s.fn(input_ids=_tokens(ids, a, min(a + chunk, n)), use_cache=True, **{kw: cache}, **first_kw)
        cache = _returned_cache(out, cache)
    return out


def _sequence(s: Setup, model, ids, n, warmup, steps, kw, first_kw, greedy, probe, device,
              prefill_chunk: int | None = None) -> dict:
    """One prefill of n tokens (in chunks of ``prefill_chunk``) and warmup + steps decode steps;
    times, memory, KV bytes."""
    import kvfx

    probe.reset()  # (the previous sequence's kvfx stores went with its cache)
    cache = s.cache(model) if s.cache is not None else _new_cache(model)
    out, prefill_s = timed(partial(_prefill, s, ids, n, kw, first_kw, cache, prefill_chunk), device)
    cache = _returned_cache(out, cache)
    mem_prefill = probe.read()
    probe.rearm(release=True)  # [Note] without it, heap pages the prefill freed count as decode's
    decode_s = []
    for i in range(warmup + steps):
        tok = out.logits[:, -1:].argmax(-1) if greedy else _tokens(ids, n + i, n + i + 1)
        out, t = timed(partial(s.fn, input_ids=tok, use_cache=True, **{kw: cache}), device)
        cache = _returned_cache(out, cache)
        decode_s.append(t)
    mem = {f"{k}_prefill": v for k, v in mem_prefill.items()} | {f"{k}_decode": v for k, v in probe.read().items()}
    kv = kvfx.memory(cache)
    held = [v["tokens_held"] for v in kv["sites"].values()]
    rec = {"prefill_s": prefill_s, "decode_s": decode_s, **mem, "kv_held_bytes": kv["held_bytes"],
           "kv_dense_bytes": (kv["dense_bytes"] if s.kind == "kvfx" else
                              _dense_kv_bytes(model, n + warmup + steps) if s.kind == "hf-quantized"
                              else kv["held_bytes"]),
           "kv_store_bytes": kv["store_bytes"], "kv_model_cache_bytes": kv["model_cache_bytes"],
           "kv_peak_store_bytes": kv.get("peak_store_bytes"),
           "tokens_held": (sum(held) / len(held)) if held else None}
    return rec


def _dense_kv_bytes(model, tokens: int) -> int:
    """Bytes of an uncompressed K/V cache of ``tokens`` tokens in the model's dtype."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * hd * tokens * next(model.parameters()).element_size()


def _summarize(s: Setup, n: int, recs: list[dict], warmup: int, steps: int) -> dict:
    first, measured = recs[0], recs[1:]
    step_ms = [[1e3 * t for t in r["decode_s"][warmup:]] for r in measured]
    decode_ms = median([t for ts in step_ms for t in ts])
    prefill_s = median([r["prefill_s"] for r in measured])
    steady = prefill_s + (warmup + steps) * decode_ms / 1e3
    first_total = first["prefill_s"] + sum(first["decode_s"])
    last = measured[-1]
    row = {
        "config": s.name, "kind": s.kind, "policy": s.policy, "policy_hash": s.policy_hash,
        "length": n, "context_end": n + warmup + steps,
        "prefill_s": prefill_s, "prefill_s_rounds": [r["prefill_s"] for r in measured],
        "decode_ms": decode_ms, "decode_ms_rounds": [median(ts) for ts in step_ms],
        "decode_ms_steps": step_ms,
        "compile_s": first_total - steady, "first_prefill_s": first["prefill_s"],
        "first_decode_ms": [1e3 * t for t in first["decode_s"]],
        "graphs": first["graphs"], "graphs_later": sum(r["graphs"] for r in measured),
        "kv_held_bytes": last["kv_held_bytes"], "kv_dense_bytes": last["kv_dense_bytes"],
        "kv_store_bytes": last["kv_store_bytes"], "kv_model_cache_bytes": last["kv_model_cache_bytes"],
        "tokens_held": last["tokens_held"],
        "rss_start_bytes": last["rss_start_bytes_prefill"],
    }
    for mem in ("rss", "cuda"):
        if f"peak_{mem}_delta_bytes_prefill" not in last:
            continue
        for phase in ("prefill", "decode"):
            row[f"peak_{mem}_{phase}_delta_bytes"] = max(r[f"peak_{mem}_delta_bytes_{phase}"] for r in measured)
        row[f"peak_{mem}_delta_bytes"] = max(row[f"peak_{mem}_prefill_delta_bytes"],
                                             row[f"peak_{mem}_decode_delta_bytes"])
        row[f"compile_peak_{mem}_delta_bytes"] = max(first[f"peak_{mem}_delta_bytes_{p}"]
                                                     for p in ("prefill", "decode"))
    row["peak_rss_bytes"] = max(max(r["peak_rss_bytes_prefill"], r["peak_rss_bytes_decode"]) for r in measured)
    return row


_RATIO_FIELDS = ("prefill_s", "decode_ms", "kv_held_bytes", "peak_rss_delta_bytes", "peak_rss_prefill_delta_bytes",
                 "peak_rss_decode_delta_bytes", "peak_cuda_delta_bytes", "peak_cuda_prefill_delta_bytes",
                 "peak_cuda_decode_delta_bytes")


def _add_ratios(rows: list[dict], baseline: str) -> None:
    by = {(r["config"], r["length"]): r for r in rows}
    for r in rows:
        for tag, ref_name in (("vs_baseline", baseline), ("vs_full", FULL)):
            ref = by.get((ref_name, r["length"]))
            r[tag] = {f: ratio(r.get(f), ref.get(f) if ref else None) for f in _RATIO_FIELDS if f in r}


# --------------------------------------------------------------------------------------------- output


def _mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:.2f}"


def _x(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.2f}"


def _spread(r: dict) -> str:
    rs = [x for x in r["decode_ms_rounds"] if not math.isnan(x)]
    if len(rs) < 2 or not r["decode_ms"]:
        return ""
    return f" ±{50 * (max(rs) - min(rs)) / r['decode_ms']:.0f}%"


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table, with the command, the machine and what each column means."""
    m = result["meta"]
    x = f"×{m['baseline']}"
    head = (f"| config | context | prefill s | {x} | decode ms/tok | {x} | ×full | KV held MiB | {x} "
            f"| held/dense | peak ΔRSS prefill MiB | peak ΔRSS decode MiB | {x} | compile s | graphs "
            "| sites rewritten |")
    lines = [f"# kvfx bench e2e: {m['model']}", "",
             *([f"`{m['command']}`", ""] if m.get("command") else []),
             (f"{m['device']} ({m['device_name']}), {m['torch_threads']} torch threads of {m['cpu_count']} "
              f"CPUs, load average {m.get('loadavg')}, torch {m['torch']}, kvfx {m['kvfx']}, {m['dtype']}, "
              f"{m['time']}"), "",
             (f"{m['rounds']} measured rounds after a compile round, configurations interleaved; "
              f"decode: {m['steps']} {m['feed']} one-token steps after {m['warmup']} warm-up steps; "
              f"kvfx inner compiler {m['inner']}, dynamic shapes {m['dynamic']}."
              + (f" Tensor parallelism over {m['tp']} ranks: times, memory and bytes are rank 0's "
                 "(its shard of the heads)." if m.get("tp", 1) > 1 else "")), "",
             head, "|" + "---|" * (head.count("|") - 1)]
    configs = {c["name"]: c for c in result["configs"]}
    for r in result["rows"]:
        c = configs[r["config"]]
        sites = f"{c['rewritten']}/{c['sites']}" if "sites" in c else "–"
        vi, vf = r["vs_baseline"], r["vs_full"]
        ratio_hd = ratio(r["kv_held_bytes"], r["kv_dense_bytes"])
        graphs = f"{r['graphs']}" + (f" (+{r['graphs_later']} later!)" if r["graphs_later"] else "")
        lines.append(
            f"| {r['config']} | {r['length']} | {r['prefill_s']:.3f} | {_x(vi['prefill_s'])} "
            f"| {r['decode_ms']:.2f}{_spread(r)} | {_x(vi['decode_ms'])} | {_x(vf['decode_ms'])} "
            f"| {_mib(r['kv_held_bytes'])} | {_x(vi['kv_held_bytes'])} | {_x(ratio_hd)} "
            f"| {_mib(r['peak_rss_prefill_delta_bytes'])} | {_mib(r['peak_rss_decode_delta_bytes'])} "
            f"| {_x(vi['peak_rss_decode_delta_bytes'])} "
            f"| {r['compile_s']:.1f} | {graphs} | {sites} |")
    lines += ["", (
        f"{x}, ×full: this number ÷ the same number of `{m['baseline']}` / `kvfx:full` at the same context "
        "in this run (< 1: faster or smaller). prefill s: median prefill forward. decode ms/tok: "
        "median one-token step (± half the range of the per-round medians, relative). KV held: "
        "bytes of the kvfx store plus the model's own cache tensors at the end of the sequence "
        "(baselines: the DynamicCache tensors); held/dense: against the uncompressed cache of every "
        f"token seen. peak ΔRSS: {m['memory_measure']}, during the prefill forward and during the "
        "decode steps (after returning what the prefill freed to the OS; the "
        f"{x} ratio is the decode one), max over rounds. compile s: the compile "
        "round's sequence time minus its steady-state estimate (eager shows the noise level). "
        "graphs: graphs dynamo compiled in the compile round. sites rewritten: attention sites kvfx "
        "rewrote / found.")]
    for c in result["configs"]:
        if c.get("sites") is not None and c["rewritten"] < c["sites"]:
            lines.append(f"\n**{c['name']} left {c['sites'] - c['rewritten']} of {c['sites']} attention sites "
                         f"alone** ({'; '.join(f'{n}x {why}' for why, n in c['left_alone'].items())}): those "
                         "run uncompressed and its numbers are partly or wholly the plain model's.")
    return "\n".join(lines)


def plot_decode(result: dict, path: str | Path) -> Path:
    """Decode ms/token (left) and KV bytes held (right) against context length, one line per
    configuration; error bars span the per-round medians."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    names = [c["name"] for c in result["configs"]]
    m = result["meta"]

    colors = matplotlib.colormaps["tab10"]
    for i, name in enumerate(names):
        rs = sorted((r for r in result["rows"] if r["config"] == name), key=lambda r: r["length"])
        xs = [r["length"] for r in rs]
        ys = [r["decode_ms"] for r in rs]
        lo = [y - min(r["decode_ms_rounds"]) for y, r in zip(ys, rs)]
        hi = [max(r["decode_ms_rounds"]) - y for y, r in zip(ys, rs)]
        style = {"color": colors(i % 10), "marker": "os^Dv<>ph*"[i % 10], "lw": 1.6, "ms": 5, "label": name,
                 "ls": {"eager": ":", m["baseline"]: "--"}.get(name, "-")}
        ax.errorbar(xs, ys, yerr=[[max(0.0, v) for v in lo], [max(0.0, v) for v in hi]], capsize=3, **style)
        ax2.plot(xs, [r["kv_held_bytes"] / 2**20 for r in rs], **style)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(m["lengths"], [f"{n / 1024:g}k" if n % 256 == 0 else str(n) for n in m["lengths"]])
        a.set_xlabel("context length (tokens)")
        a.grid(True, alpha=0.3)
    ax.set_ylabel("decode ms / token (median)")
    ax.set_ylim(bottom=0)
    ax2.set_ylabel("KV bytes held (MiB)")
    ax2.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax2.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.legend(fontsize=8)
    ax.set_title(f"decode step, {m['steps']} steps x {m['rounds']} rounds", fontsize=10)
    ax2.set_title("KV cache held at the end of the sequence", fontsize=10)
    fig.suptitle(f"{m['model']} on {m['device']} ({m['device_name']}), {m['torch_threads']} threads, "
                 f"{m['dtype']}, load {m.get('loadavg')}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_outputs(result: dict, out: str | Path) -> dict[str, Path]:
    """``OUT/e2e.json``, ``OUT/e2e.md`` and ``OUT/e2e_decode.png``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "e2e.json", "md": out / "e2e.md", "png": out / "e2e_decode.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown_table(result) + "\n")
    plot_decode(result, paths["png"])
    return paths


SYNTHETIC = {
    # decode dominated by reading the KV cache: 4 layers of 8 KV heads of 64 (fp32: 16 KiB of K/V
    # per token), 7.4 M weights (vocab 1024); random weights (speed only, never accuracy)
    "synthetic:kv-heavy": dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=65536),
}


def synthetic_model(name: str, *, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight Llama of :data:`SYNTHETIC` (``synthetic:kv-heavy``), eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name not in SYNTHETIC:
        raise ValueError(f"kvfx bench e2e: unknown synthetic model {name!r}; known: {', '.join(SYNTHETIC)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SYNTHETIC[name]), attn_implementation="sdpa",
                                             dtype=dtype)
    return model.eval()


def load_inputs(model_name: str, n_tokens: int, *, device: str, dtype: torch.dtype):
    """The model (registry name, directory or cached HF name) and ``(1, n_tokens)`` ids of long
    real text (:func:`kvfx.eval.perplexity.long_text_ids`); for a ``synthetic:`` name
    (:data:`SYNTHETIC`), a random-weight model and uniformly random ids (seeded)."""
    if model_name.startswith("synthetic:"):
        model = synthetic_model(model_name, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        return model.to(device), torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=g)
    from kvfx.eval.perplexity import long_text_ids
    from kvfx.models import load_model

    model, tok = load_model(model_name, dtype=dtype, progress=False)
    return model.to(device), long_text_ids(tok, n_tokens)


def _new_cache(model):
    from kvfx.eval.perplexity import _new_cache as new_cache

    return new_cache(model)


def _returned_cache(out, cache):
    from kvfx.eval.perplexity import _returned_cache as returned

    return returned(out, cache)
