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


def policy_from_spec(spec: str):
    """``snapkv@0.125`` -> the snapkv preset with keep 0.125; anything else -> load_policy."""
    from kvfx.policy import load_policy

    if "@" in spec:
        name, keep = spec.split("@", 1)
        try:
            keep_f = float(keep)
        except ValueError:
            raise ValueError(f"policy spec {spec!r}: {keep!r} after '@' is not a number; "
                             "write NAME@KEEP, e.g. snapkv@0.125") from None
        return load_policy({"kvfx": 1, "name": f"{name}-keep{keep}", "extends": name,
                            "budget": {"keep": keep_f}})
    return load_policy(spec)


def _sample_key(r: dict) -> tuple:
    return (r["task"], r["policy"], r["length"], round(r["depth"], 4), r["seed"])


def load_results(out: Path) -> list[dict]:
    path = Path(out) / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_passkey_eval(model_name: str, policies: list[str], *, lengths=(4096,), depths=(0.5,),
                     seeds=(0,), out: str | Path = "runs/eval", inner: str = "eager",
                     max_new_tokens: int = 8, progress: bool = True) -> list[dict]:
    """Passkey retrieval for every (policy, length, depth, seed); returns all records."""
    import torch._dynamo
    from tqdm.auto import tqdm

    import kvfx
    from kvfx.eval.passkey import make_passkey_sample, score_passkey
    from kvfx.models import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {_sample_key(r) for r in load_results(out)}
    grid = [(p, n, d, s) for p in policies for n in lengths for d in depths for s in seeds]
    todo = [g for g in grid if ("passkey", g[0], g[1], round(g[2], 4), g[3]) not in done]
    model, tok = load_model(model_name, progress=progress)
    samples = {}
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="passkey", unit="sample",
               disable=not progress)
    current = None
    with open(out / "results.jsonl", "a") as f:
        for spec, n, depth, seed in todo:
            if spec != current:  # one compile per policy; prefill/decode graphs are reused
                policy = policy_from_spec(spec)
                torch._dynamo.reset()
                kvfx.reset()
                model.compile(backend="kvfx", options={"policy": policy, "inner": inner})
                current = spec
            key = (n, depth, seed)
            if key not in samples:
                samples[key] = make_passkey_sample(tok, n, depth, seed)
            sample = samples[key]
            t0 = time.perf_counter()
            with torch.no_grad():
                gen = model.generate(sample.input_ids, attention_mask=torch.ones_like(sample.input_ids),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     return_dict_in_generate=True)
            seconds = time.perf_counter() - t0
            cache = gen["cache"] if "cache" in gen else gen.get("past_key_values")
            mem = kvfx.memory(cache)
            answer = tok.decode(gen.sequences[0, sample.input_ids.shape[1]:], skip_special_tokens=True)
            held = [s["tokens_held"] for s in mem["sites"].values()]
            rec = {
                "task": "passkey", "model": model_name, "policy": spec, "policy_hash": policy.hash,
                "length": n, "n_tokens": sample.n_tokens, "depth": depth, "seed": seed,
                "passkey": sample.passkey, "answer": answer.strip(),
                "correct": score_passkey(answer, sample.passkey),
                "kept_tokens": sum(held) / len(held) if held else None,
                "held_bytes": mem["held_bytes"], "dense_bytes": mem["dense_bytes"],
                "seconds": round(seconds, 3), "kvfx": kvfx.__version__,
            }
            f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.set_postfix_str(f"{spec} len={n} depth={depth:.2f} {'ok' if rec['correct'] else 'miss'}")
            bar.update()
    bar.close()
    records = load_results(out)
    write_summary(records, out / "summary.csv")
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per (task, policy, length): accuracy, mean held/dense, mean kept tokens, mean time."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["policy"], r["length"]), []).append(r)
    rows = []
    for (task, policy, length), rs in sorted(groups.items()):
        dense = [r["held_bytes"] / r["dense_bytes"] for r in rs if r.get("dense_bytes")]
        rows.append({
            "task": task, "policy": policy, "length": length, "samples": len(rs),
            "accuracy": sum(bool(r.get("correct")) for r in rs) / len(rs),
            "held_over_dense": sum(dense) / len(dense) if dense else float("nan"),
            "kept_tokens": sum(r["kept_tokens"] or 0 for r in rs) / len(rs),
            "seconds": sum(r["seconds"] for r in rs) / len(rs),
        })
    return rows


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
    rows = summarize(records)
    lines = ["| task | policy | length | samples | accuracy | held / dense | kept tokens | s / sample |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['policy']} | {r['length']} | {r['samples']} | "
                     f"{r['accuracy']:.2f} | {r['held_over_dense']:.3f} | {r['kept_tokens']:.0f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)
