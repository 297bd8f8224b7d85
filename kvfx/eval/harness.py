"""``kvfx eval``: every policy through the same harness, model and samples, in one process.

Results are appended to ``OUT/results.jsonl`` one sample at a time (so a rerun skips what is
done: the harness is resumable) and summarized to ``OUT/summary.csv``.

Policy specs: a preset name, a YAML path, or ``NAME@KEEP`` (a preset with ``budget.keep``
overridden, e.g. ``snapkv@0.125``).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from kvfx.eval.summary import summarize  # noqa: F401  (kvfx.eval.harness.summarize, as before)


def policy_from_spec(spec: str):
    """``snapkv@0.125`` -> the snapkv preset with keep 0.125; anything else -> load_policy."""
    from kvfx.policy import load_policy

    return load_policy(spec)


def _depth_key(depth):
    return None if depth is None else round(depth, 4)


def _sample_key(r: dict) -> tuple:
    return (r["task"], r.get("subtask"), r["policy"], r["length"], _depth_key(r["depth"]), r["seed"])


def load_results(out: Path) -> list[dict]:
    path = Path(out) / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TASKS = ("passkey", "needle", "perplexity", "agreement", "ruler", "shared-context")
# Tasks whose records carry a ``subtask`` (a RULER task; a shared-context mode) and a ``score``.
SUBTASK_TASKS = ("ruler", "shared-context")


def _task_rank(task: str) -> tuple:
    """Column order: TASKS order, then ``ruler`` (the mean) before ``ruler/<task>``."""
    base, _, sub = task.partition("/")
    return (TASKS.index(base), sub)


def _task_tools(task: str):
    """(make_sample, score, max_new_tokens) for a generation task."""
    if task == "passkey":
        from kvfx.eval.passkey import make_passkey_sample, score_passkey

        return make_passkey_sample, lambda text, s: score_passkey(text, s.passkey), 8
    if task == "needle":
        from kvfx.eval.needle import make_needle_sample, score_needle

        return make_needle_sample, score_needle, 24
    raise ValueError(f"kvfx eval: task {task!r} is not one of {', '.join(TASKS)}")


def check_chunked_policies(model, specs, chunk: int, command: str = "kvfx") -> None:
    """Refuse, before anything runs, the policy specs (presets, files, ``NAME@KEEP``) that a prompt
    fed in chunks of ``chunk`` tokens would stop at the first chunk boundary (:func:`kvfx.runtime.lifecycle.chunk_refusal`:
    eviction combined with ``quant:``, CaliDrop, head-wise budgets or ``lowrank:``), naming each
    policy, the layer and the reason: ``kvfx eval/bench --prefill-chunk`` then fails in seconds
    instead of after the policies before it ran."""
    from kvfx.models import attention_sites
    from kvfx.runtime.compressor import build_compressor
    from kvfx.runtime.lifecycle import chunk_refusal

    paths = attention_sites(model)
    refused = []
    for spec in specs or ():
        pol = policy_from_spec(spec)
        for i, path in enumerate(paths):
            lp = pol.resolve(i, path, len(paths))
            try:
                c = build_compressor(lp, i, len(paths))
            except NotImplementedError:
                break  # not a chunking question: compiling the policy raises its own error
            if getattr(c, "prompt_eviction", False) and (why := chunk_refusal(c, lp.quant is not None)):
                refused.append(f"{spec} (layer {i}, {path}): its {why}")
                break
    if refused:
        raise ValueError(
            f"{command}: --prefill-chunk {chunk}: these policies cannot compress a prompt fed in chunks: "
            + "; ".join(refused) + ". Run them without --prefill-chunk, or drop them from --policy.")


def run_eval(model_name: str, policies: list[str], *, task: str = "passkey", lengths=(4096,),
             depths=(0.5,), seeds=(0,), out: str | Path = "runs/eval", inner: str = "eager",
             max_new_tokens: int | None = None, chunk: int = 1, progress: bool = True,
             subtasks=None, questions: int = 4, prefill_chunk: int | None = None,
             passkeys: str = "per-cell") -> list[dict]:
    """Run ``task`` for every (policy, length, depth, seed) not already in ``out``; every
    policy in this process, on the same samples. Returns all records of ``out``.

    ``task="ruler"``: ``subtasks`` are RULER task names (default: all of
    :data:`kvfx.eval.ruler.RULER_TASKS`), one sample per seed; ``max_new_tokens`` caps each
    task's RULER generation budget. ``task="shared-context"``: ``questions`` questions per
    context, both modes (``subtasks``: ``shared``, ``joint``); ``max_new_tokens`` default 32.
    ``passkeys``: ``"per-cell"`` (default) draws one passkey per (seed, length, depth);
    ``"per-seed"`` one per seed, as grids written before per-cell keys did (results/smollm2-grid),
    so that new rows are comparable with them (records then carry ``"passkeys": "per-seed"``)."""
    import torch._dynamo
    from tqdm.auto import tqdm

    import kvfx
    from kvfx.models import load_model

    if task not in TASKS:
        raise ValueError(f"kvfx eval: task {task!r} is not one of {', '.join(TASKS)}")
    if passkeys not in ("per-cell", "per-seed"):
        raise ValueError(f"kvfx eval: --passkeys got {passkeys!r}, expected per-cell or per-seed")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if task == "perplexity":
        depths = (0.0,)  # one sample per length: the text's first `length` tokens
    elif task in ("agreement", "ruler", "shared-context"):
        depths = (None,)  # one sample per (length, seed): nothing hidden at a chosen depth
    subs = _subtasks(task, subtasks)
    done = {_sample_key(r) for r in load_results(out)}
    grid = [(p, n, d, s, b) for p in policies for n in lengths for d in depths for s in seeds for b in subs]
    if prefill_chunk is not None and task not in ("passkey", "needle", "ruler"):
        raise ValueError(f"kvfx eval: --prefill-chunk applies to the passkey, needle and ruler tasks, not {task}")
    label = (lambda spec: spec) if prefill_chunk is None else (lambda spec: f"{spec} prefill-chunk={prefill_chunk}")
    gen_kw = {} if prefill_chunk is None else {"prefill_chunk_size": int(prefill_chunk)}
    todo = [g for g in grid if (task, g[4], label(g[0]), g[1], _depth_key(g[2]), g[3]) not in done]
    if not todo:
        records = load_results(out)
        write_summary(records, out / "summary.csv")
        return records
    model, tok = load_model(model_name, progress=progress)
    if prefill_chunk is not None:  # a policy that stops at the first chunk fails here, before any sample
        check_chunked_policies(model, sorted({g[0] for g in todo}), prefill_chunk, "kvfx eval")
    info = model_info(model, model_name)
    samples, current, policy = {}, None, None
    if task == "agreement":  # the full-cache references first, with kvfx `full`, once per sample
        from kvfx.eval.agreement import DEFAULT_NEW_TOKENS

        current, policy = _agreement_references(model, tok, model_name, todo, samples, out, inner,
                                                max_new_tokens or DEFAULT_NEW_TOKENS)
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc=task, unit="sample",
               disable=not progress)
    with open(out / "results.jsonl", "a") as f:
        for spec, n, depth, seed, sub in todo:
            if spec != current:  # one compile per policy; prefill/decode graphs are reused
                policy = policy_from_spec(spec)
                torch._dynamo.reset()
                kvfx.reset()
                model.compile(backend="kvfx", options={"policy": policy, "inner": inner})
                current = spec
            rec = {"task": task, "model": model_name, "policy": label(spec), "policy_hash": policy.hash,
                   "length": n, "depth": depth, "seed": seed, "kvfx": kvfx.__version__}
            if prefill_chunk is not None:
                rec["prefill_chunk"] = int(prefill_chunk)
            if task == "passkey" and passkeys == "per-seed":
                rec["passkeys"] = "per-seed"
            if sub is not None:
                rec["subtask"] = sub
            rec["model_info"] = info
            if task == "ruler":
                rec.update(_ruler_sample(model, tok, samples, sub, n, seed, max_new_tokens, gen_kw))
            elif task == "shared-context":
                rec.update(_shared_context_sample(model, tok, samples, sub, n, seed, questions,
                                                  max_new_tokens or 32))
            elif task == "perplexity":
                rec.update(_perplexity_sample(model, tok, n, seed, chunk))
            elif task == "agreement":
                rec.update(_agreement_sample(model, tok, samples[(n, seed)]))
            else:
                rec.update(_generation_sample(model, tok, task, samples, n, depth, seed, max_new_tokens, gen_kw,
                                              per_cell=passkeys == "per-cell"))
            f.write(json.dumps(rec) + "\n")
            f.flush()
            if task == "perplexity":
                shown = f"ppl={rec['ppl']:.2f}"
            elif task == "agreement":
                shown = f"agree={rec['prefix_agreement']:.2f} kl={rec['kl']:.3f}"
            elif sub is not None:
                shown = f"{sub} score={rec['score']:.2f}"
            else:
                shown = "ok" if rec["correct"] else "miss"
            where = "" if depth is None else f" depth={depth:.2f}"
            bar.set_postfix_str(f"{spec} len={n}{where} {shown}")
            bar.update()
    bar.close()
    records = load_results(out)
    write_summary(records, out / "summary.csv")
    return records


def _subtasks(task: str, subtasks) -> list:
    """The subtasks of ``task`` to run (``[None]`` for tasks without), checked."""
    if task == "ruler":
        from kvfx.eval.ruler import RULER_TASKS as allowed
    elif task == "shared-context":
        from kvfx.eval.shared_context import MODES as allowed
    else:
        if subtasks:
            raise ValueError(f"kvfx eval: --subtasks is for {' and '.join(SUBTASK_TASKS)}, not {task!r}")
        return [None]
    subs = list(subtasks or allowed)
    bad = [s for s in subs if s not in allowed]
    if bad:
        raise ValueError(f"kvfx eval: {task} subtasks {bad} unknown; expected some of {', '.join(allowed)}")
    return subs


def model_info(model, name: str) -> dict:
    """What the results record about the model: its name (registry name or path), class,
    parameter dtype, layer count and attention implementation."""
    inner = getattr(model, "_orig_mod", model)
    cfg = inner.config
    return {"name": name, "name_or_path": str(getattr(cfg, "_name_or_path", "") or name),
            "architecture": type(inner).__name__, "dtype": str(next(inner.parameters()).dtype).replace("torch.", ""),
            "layers": getattr(cfg, "num_hidden_layers", None),
            "attn_implementation": getattr(cfg, "_attn_implementation", None)}


def _ruler_sample(model, tok, samples, sub, n, seed, max_new_tokens, gen_kw=None) -> dict:
    from kvfx.eval.ruler import make_ruler_sample, ruler_score

    key = ("ruler", sub, n, seed)
    if key not in samples:
        samples[key] = make_ruler_sample(tok, sub, n, seed)
    s = samples[key]
    new = min(s.tokens_to_generate, max_new_tokens) if max_new_tokens else s.tokens_to_generate
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(s.input_ids, attention_mask=torch.ones_like(s.input_ids), max_new_tokens=new,
                             do_sample=False, return_dict_in_generate=True, **(gen_kw or {}))
    seconds = time.perf_counter() - t0
    answer = tok.decode(gen.sequences[0, s.n_tokens:], skip_special_tokens=True)
    cache = gen["cache"] if "cache" in gen else gen.get("past_key_values")
    score = ruler_score(answer, s.answers)
    return {"n_tokens": s.n_tokens, "new_tokens": new, "expected": list(s.answers), "answer": answer.strip(),
            "score": score, "correct": score == 1.0, "seconds": round(seconds, 3), **_memory_fields(cache)}


def _shared_context_sample(model, tok, samples, mode, n, seed, questions, max_new_tokens) -> dict:
    from kvfx.eval.shared_context import evaluate_shared_context, make_shared_context_sample

    key = ("shared-context", n, seed, questions)
    if key not in samples:
        samples[key] = make_shared_context_sample(tok, n, seed, questions=questions)
    s = samples[key]
    r = evaluate_shared_context(model, tok, s, mode=mode, max_new_tokens=max_new_tokens)
    return {"n_tokens": s.n_tokens, "questions": questions, "new_tokens": max_new_tokens,
            "expected": [list(a) for a in s.answers], "answer": r["answers"], "scores": r["scores"],
            "score": r["score"], "correct": r["score"] == 1.0, "seconds": round(r["seconds"], 3),
            **_memory_fields(r["cache"])}


def _memory_fields(cache) -> dict:
    import kvfx

    mem = kvfx.memory(cache)
    held = [s["tokens_held"] for s in mem["sites"].values()]
    mean = [s["tokens_held_mean"] for s in mem["sites"].values()]
    return {"kept_tokens": sum(held) / len(held) if held else None,
            # per (row, KV head), averaged over sites: below kept_tokens for head-wise budgets
            "kept_tokens_mean": sum(mean) / len(mean) if mean else None,
            "held_bytes": mem["held_bytes"], "dense_bytes": mem["dense_bytes"],
            "dense_fp16_bytes": mem.get("dense_fp16_bytes"),
            "coverage": mem.get("summary") or None}  # e.g. "policy applied to 3 of 18 layers; ..."


def _generation_sample(model, tok, task, samples, n, depth, seed, max_new_tokens, gen_kw=None,
                       per_cell: bool = True) -> dict:
    make, score, default_new = _task_tools(task)
    key = (task, n, depth, seed)
    if key not in samples:  # passkey: an independent passkey per (seed, length, depth) cell
        kw = {"key_seed": passkey_cell_seed(seed, n, depth)} if task == "passkey" and per_cell else {}
        samples[key] = make(tok, n, depth, seed, **kw)
    sample = samples[key]
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(sample.input_ids, attention_mask=torch.ones_like(sample.input_ids),
                             max_new_tokens=max_new_tokens or default_new, do_sample=False,
                             return_dict_in_generate=True, **(gen_kw or {}))
    seconds = time.perf_counter() - t0
    answer = tok.decode(gen.sequences[0, sample.input_ids.shape[1]:], skip_special_tokens=True)
    cache = gen["cache"] if "cache" in gen else gen.get("past_key_values")
    expected = getattr(sample, "passkey", None) or getattr(sample, "answer", None)
    return {"n_tokens": sample.n_tokens, "expected": expected, "answer": answer.strip(),
            "correct": bool(score(answer, sample)), "seconds": round(seconds, 3),
            **_memory_fields(cache)}


def passkey_cell_seed(seed: int, length: int, depth: float) -> str:
    """The seed of a passkey cell's key (``random.Random`` hashes the string): one key per
    (seed, length, depth). Records written before this (results/smollm2-grid) used ``seed``
    alone, one key for every depth and length of a seed."""
    return f"passkey/{seed}/{length}/{round(depth, 4)}"


def _perplexity_sample(model, tok, n, seed, chunk) -> dict:
    """Perplexity of the second half of the first ``n`` essay tokens, the cache compressed
    on the first half and extended token by token (``chunk``) as in generation."""
    from kvfx.eval.perplexity import long_text_ids, perplexity_under_compression

    ids = long_text_ids(tok, n)
    r = perplexity_under_compression(model, ids, prefix=n // 2, chunk=chunk, keep_cache=True)
    return {"n_tokens": n, "prefix": n // 2, "ppl": r["ppl"], "nll_sum": r["nll_sum"],
            "tokens": r["tokens"], "seconds": round(r["seconds"], 3), **_memory_fields(r["cache"])}


def _agreement_references(model, tok, model_name, todo, refs, out, inner, max_new_tokens):
    """Load or make (with kvfx ``full``, saved under ``OUT/agreement_refs``) the reference of
    every (length, seed) in ``todo`` into ``refs``; returns the compiled (spec, policy) or
    (None, None) when every reference was on disk."""
    import torch._dynamo

    import kvfx
    from kvfx.eval.agreement import load_reference, make_reference, reference_path, save_reference

    current, policy = None, None
    for n, seed in sorted({(g[1], g[3]) for g in todo}):
        path = reference_path(out, n, seed, max_new_tokens)
        if path.exists():
            refs[(n, seed)] = load_reference(path, model=model_name, length=n, seed=seed,
                                             max_new_tokens=max_new_tokens)
            continue
        if current is None:
            policy = policy_from_spec("full")
            torch._dynamo.reset()
            kvfx.reset()
            model.compile(backend="kvfx", options={"policy": policy, "inner": inner})
            current = "full"
        ref = make_reference(model, tok, n, seed, max_new_tokens=max_new_tokens)
        save_reference(ref, path, model=model_name, policy_hash=policy.hash, kvfx=kvfx.__version__)
        refs[(n, seed)] = ref
    return current, policy


def _agreement_sample(model, tok, ref) -> dict:
    """Greedy and teacher-forced agreement with the full-cache reference; see kvfx/eval/agreement.py."""
    from kvfx.eval.agreement import evaluate_agreement

    r = evaluate_agreement(model, ref)
    mem = _memory_fields(r.pop("cache"))
    tokens = r.pop("tokens")
    r.pop("compared")
    return {"n_tokens": int(ref["prompt_ids"].shape[1]), "new_tokens": int(ref["max_new_tokens"]),
            "source": ref["source"], "correct": r["prefix_agreement"] == 1.0, **r,
            "seconds": round(r["seconds"], 3), "forced_seconds": round(r["forced_seconds"], 3),
            "expected": tok.decode(ref["tokens"]), "answer": tok.decode(tokens),
            "expected_ids": [int(t) for t in ref["tokens"]], "answer_ids": [int(t) for t in tokens], **mem}


def run_passkey_eval(model_name: str, policies: list[str], **kw) -> list[dict]:
    """:func:`run_eval` with ``task="passkey"``."""
    return run_eval(model_name, policies, task="passkey", **kw)


def write_summary(records: list[dict], path: Path) -> None:
    rows = summarize(records)
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown_table(records: list[dict]) -> str:
    """The summary as a Markdown table (what ``kvfx report`` prints)."""
    head = ("| task | policy | length | samples | accuracy | ppl (Δ vs full) | top-1 (forced) | KL vs full "
            "| held / dense | kept tokens | s / sample |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summarize(records):
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        ppl = "" if r["ppl"] is None else f"{r['ppl']:.2f}" + (
            "" if r["delta_ppl"] is None else f" ({r['delta_ppl']:+.2f})")
        top1 = "" if r["top1_agreement"] is None else f"{r['top1_agreement']:.2f}"
        kl = "" if r["kl"] is None else f"{r['kl']:.4f}"
        lines.append(f"| {r['task']} | {r['policy']} | {r['length']} | {r['samples']} | {acc} | {ppl} | "
                     f"{top1} | {kl} | {r['held_over_dense']:.3f} | {r['kept_tokens']:.0f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def pivot_table(records: list[dict]) -> str:
    """One row per policy (``full`` first, then in the order the records name them), one column
    per (task, length): accuracy for passkey / needle / agreement, Δ perplexity for perplexity;
    then held / dense bytes and kept tokens of the longest generation task (all tokens seen)."""
    rows = summarize(records)
    cols = sorted({(r["task"], r["length"]) for r in rows}, key=lambda c: (_task_rank(c[0])[0], c[1], c[0]))
    gen = [c for c in cols if c[0] != "perplexity"]
    mem_col = max(gen, key=lambda c: (c[1], -_task_rank(c[0])[0])) if gen else (cols[-1] if cols else None)
    order = list(dict.fromkeys(["full"] + [r["policy"] for r in records]))
    cell = {(r["policy"], r["task"], r["length"]): r for r in rows}
    head = [f"{t} {n // 1024}k" if n % 1024 == 0 else f"{t} {n}" for t, n in cols]
    head = [h.replace("perplexity", "Δppl") for h in head]
    mem_name = f"{mem_col[0]} {mem_col[1] // 1024}k" if mem_col and mem_col[1] % 1024 == 0 else str(mem_col)
    lines = ["| policy | " + " | ".join(head) + f" | held / dense ({mem_name}) | kept tokens |",
             "|---|" + "---|" * (len(cols) + 2)]
    for policy in order:
        if not any((policy, t, n) in cell for t, n in cols):
            continue
        vals = []
        for t, n in cols:
            r = cell.get((policy, t, n))
            if r is None:
                vals.append("")
            elif t == "perplexity":
                vals.append(f"{r['delta_ppl']:+.2f}" if r["delta_ppl"] is not None else f"{r['ppl']:.2f}")
            else:
                vals.append(f"{r['accuracy']:.2f}")
        m = cell.get((policy, *mem_col)) if mem_col else None
        lines.append(f"| {policy} | " + " | ".join(vals) + " | "
                     + (f"{m['held_over_dense']:.3f} | {m['kept_tokens']:.0f} |" if m else " | |"))
    return "\n".join(lines)


HEATMAP_FILES_UP_TO = 16  # policies per task up to which the report writes a PNG per policy


def write_report(out: Path) -> tuple[str, list[Path]]:
    """``kvfx report``: the Markdown table (also written to ``OUT/report.md``, and the pivot to
    ``OUT/pivot.md``) and PNGs: for needle/passkey a depth × length heatmap per policy and
    accuracy vs compression per task, or, with more than HEATMAP_FILES_UP_TO policies, one curve
    per method (budgets joined) and every heatmap in one figure; for agreement prefix agreement
    and teacher-forced top-1 agreement vs compression; for ruler the leaderboard table
    (``OUT/ruler.md``) and the score vs compression plot; for shared-context its table
    (``OUT/shared_context.md``)."""
    from kvfx.eval.plots import accuracy_curves, accuracy_vs_compression, heatmap_grid, needle_heatmap

    out = Path(out)
    records = load_results(out)
    table = markdown_table(records)
    pngs = []
    from kvfx.eval.leaderboard import ruler_table, score_vs_compression, shared_context_table

    tasks = {r["task"] for r in records}
    if "ruler" in tasks:
        (out / "ruler.md").write_text(ruler_table(records) + "\n")
        pngs.append(score_vs_compression(records, out / "ruler_score_vs_compression.png"))
    if "shared-context" in tasks:
        (out / "shared_context.md").write_text(shared_context_table(records) + "\n")
    for task in sorted(tasks - {"perplexity", *SUBTASK_TASKS}):
        rs = [r for r in records if r["task"] == task]
        if task == "agreement":
            pngs.append(accuracy_vs_compression(rs, task, out / f"{task}_accuracy_vs_compression.png",
                                                metric="prefix_agreement", label="prefix agreement"))
            pngs.append(accuracy_vs_compression(rs, task, out / f"{task}_top1_vs_compression.png",
                                                metric="top1_agreement", label="top-1 agreement (forced)"))
            continue
        policies = sorted({r["policy"] for r in rs})
        if len(policies) <= HEATMAP_FILES_UP_TO:
            pngs.append(accuracy_vs_compression(rs, task, out / f"{task}_accuracy_vs_compression.png"))
            for policy in policies:
                safe = policy.replace("@", "_at_").replace("/", "_")
                pngs.append(needle_heatmap(rs, policy, out / f"{task}_heatmap_{safe}.png", task=task))
        else:  # a large grid: one curve per method, every policy's heatmap in one figure
            pngs.append(accuracy_curves(rs, task, out / f"{task}_accuracy_curves.png"))
            pngs.append(heatmap_grid(rs, task, out / f"{task}_heatmaps.png"))
    (out / "report.md").write_text(table + "\n")
    (out / "pivot.md").write_text(pivot_table(records) + "\n")
    write_summary(records, out / "summary.csv")
    return table, pngs
