"""The ``kvfx`` command.

    kvfx demo [--policy P ...] [--length 4096]     passkey demo on SmolLM2-135M
    kvfx explain --model M [--policy P]            the site report for a model
    kvfx eval --policy P ... [--task T] --out DIR  accuracy (passkey, needle, perplexity, agreement,
                                                   ruler, shared-context), resumable, one record a sample
    kvfx report DIR [--pivot]                      tables and plots of an eval directory
    kvfx policy validate|show|schema|list          policy files
    kvfx calibrate --keep-rank K --out F           ReCalKV low-rank K/V factors (safetensors)
    kvfx calib-error [--length 4k] [--keep 0.25,...]  CaliDrop per-layer error vs full
    kvfx bench e2e|kernels                         speed and memory as ratios vs baselines, one run
    kvfx models                                    registered model names
"""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from kvfx.demo import format_rows, run_demo

    rows, passkey = run_demo(args.model, args.policy, length=args.length, depth=args.depth,
                             seed=args.seed, inner=args.inner, max_new_tokens=args.max_new_tokens)
    print(format_rows(rows, passkey))
    return 0


def _explain(args) -> int:
    import torch

    import kvfx
    from kvfx.models import load_model

    model, tok = load_model(args.model, attn_implementation=args.attn, progress=False)
    model.compile(backend="kvfx", options={"policy": args.policy, "inner": "eager"})
    ids = tok("kvfx explains the attention sites of this model.", return_tensors="pt").input_ids
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    print(kvfx.explain())
    return 0


def _parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            out.append(int(float(part.rstrip("k")) * mult))
        except ValueError:
            raise SystemExit(f"kvfx eval: --lengths {text!r}: {part!r} is not a length "
                             "(write e.g. 1k,2k,4096)") from None
    return out


def _eval(args) -> int:
    from kvfx.eval.harness import markdown_table, run_eval

    if args.depths.isdigit():
        k = int(args.depths)
        depths = [round((i + 0.5) / k, 4) for i in range(k)] if k > 1 else [0.5]
    else:
        depths = [float(x) for x in args.depths.split(",")]
    subtasks = args.subtasks.split(",") if args.subtasks else None
    try:
        records = run_eval(args.model, args.policy, task=args.task, lengths=_parse_lengths(args.lengths),
                           depths=depths, seeds=range(args.seeds), out=args.out, inner=args.inner,
                           max_new_tokens=args.max_new_tokens, chunk=args.chunk, subtasks=subtasks,
                           questions=args.questions, prefill_chunk=args.prefill_chunk,
                           passkeys=args.passkeys, progress=not args.no_progress)
    except ValueError as e:
        if str(e).startswith("kvfx eval"):
            raise SystemExit(str(e)) from None
        raise
    print(markdown_table(records))
    return 0


def _report(args) -> int:
    from pathlib import Path

    from kvfx.eval.harness import load_results, write_report

    if not load_results(Path(args.dir)):
        raise SystemExit(f"kvfx report: no results.jsonl in {args.dir}")
    table, pngs = write_report(Path(args.dir))
    print((Path(args.dir) / "pivot.md").read_text() if args.pivot else table)
    for p in pngs:
        print(f"wrote {p}")
    return 0


def _calibrate(args) -> int:
    from pathlib import Path

    from kvfx.calibrate import calibrate, format_summary, heldout_errors, save_artifact, text_ids
    from kvfx.eval.text import TEXT_SOURCES, TextSourceError, filler_text
    from kvfx.models import load_model

    if args.text in TEXT_SOURCES:
        try:
            text, source = filler_text(args.text), args.text
        except TextSourceError as e:
            raise SystemExit(f"kvfx calibrate: {e}") from None
    elif Path(args.text).is_file():
        text, source = Path(args.text).read_text(encoding="utf-8"), Path(args.text).name
    else:
        raise SystemExit(f"kvfx calibrate: --text {args.text!r} is neither a text source "
                         f"({', '.join(TEXT_SOURCES)}) nor a readable file")
    model, tok = load_model(args.model, progress=False)
    try:
        factors, prov = calibrate(model, tok, text, args.keep_rank, tokens=args.tokens, hsr=not args.no_hsr,
                                  ovc=not args.no_ovc, group_size=args.group_size, chunk=args.chunk,
                                  text_source=source, model_name=args.model)
        heldout = None
        if args.heldout_tokens:
            ids = text_ids(tok, text, args.tokens + args.heldout_tokens)[args.tokens:]
            heldout = heldout_errors(model, factors, ids, chunk=args.chunk)
    except ValueError as e:
        raise SystemExit(f"kvfx calibrate: {e}") from None
    path = save_artifact(args.out, factors, prov)
    print(format_summary(prov, heldout))
    print(f"wrote {path}")
    return 0


def _calib_error(args) -> int:
    from kvfx.eval.calib_error import markdown, run_calib_error

    keeps = tuple(float(x) for x in args.keep.split(","))
    thresholds = tuple(float(x) for x in args.thresholds.split(","))
    r = run_calib_error(args.model, length=_parse_lengths(args.length)[0], steps=args.steps, keeps=keeps,
                        methods=tuple(args.methods.split(",")), thresholds=thresholds,
                        adjusts=tuple(args.adjust.split(",")), source=args.text, out=args.out)
    print(markdown(r))
    print(f"wrote {args.out}/calib_error.json and calib_error.png ({r['seconds']:.0f} s)")
    return 0


def _models(args) -> int:
    from kvfx.models import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kvfx import __version__
    from kvfx.bench.commands import register as register_bench
    from kvfx.policy.commands import register as register_policy

    p = argparse.ArgumentParser(prog="kvfx", description="KV-cache compression as a "
                                "torch.compile backend")
    p.add_argument("--version", action="version", version=f"kvfx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="passkey retrieval with the full cache and compressed caches")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--policy", nargs="+", default=["full", "streaming", "snapkv"],
                   help="presets or policy files (default: full streaming snapkv)")
    d.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    d.add_argument("--depth", type=float, default=0.5, help="passkey depth in [0, 1]")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.add_argument("--inner", default="eager", choices=["eager", "inductor", "aot_eager"],
                   help="compiler for the rewritten graph (eager compiles fastest on CPU)")
    d.set_defaults(func=_demo)

    e = sub.add_parser("explain", help="print what kvfx does to every attention site of a model")
    e.add_argument("--model", required=True, help="registry name, HF name or directory")
    e.add_argument("--policy", default="full")
    e.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    e.set_defaults(func=_explain)

    ev = sub.add_parser("eval", help="long-context evaluation of policies against full")
    ev.add_argument("--model", default="smollm2-135m",
                    help="a registry name (kvfx models), a local Hugging Face model directory (config.json, "
                         "weights, tokenizer) or a .gguf file")
    ev.add_argument("--policy", nargs="+", required=True,
                    help="presets, files or NAME@KEEP (e.g. snapkv@0.125); include full")
    ev.add_argument("--task", default="passkey",
                    choices=["passkey", "needle", "perplexity", "agreement", "ruler", "shared-context"],
                    help="agreement: greedy tokens and next-token distributions against full; ruler: RULER's "
                         "synthetic tasks (string-match score); shared-context: a context compressed once, "
                         "then --questions questions (--depths is ignored by these three)")
    ev.add_argument("--subtasks", default=None,
                    help="ruler: comma-separated RULER tasks (default all: niah_single_1,... vt,cwe,fwe); "
                         "shared-context: shared,joint (default both)")
    ev.add_argument("--questions", type=int, default=4, help="shared-context: questions per context")
    ev.add_argument("--lengths", default="4k", help="comma separated, e.g. 1k,2k,4k")
    ev.add_argument("--depths", default="10", help="a count (evenly spaced) or a list 0.1,0.5")
    ev.add_argument("--seeds", type=int, default=1, help="samples per cell (ruler: per task)")
    ev.add_argument("--out", default="runs/eval")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: 8 for passkey, 24 for needle, 32 for agreement and shared-context; "
                         "ruler: RULER's budget per task (128 NIAH, 30 vt, 120 cwe, 50 fwe), capped by this")
    ev.add_argument("--chunk", type=int, default=1, help="perplexity: tokens per decode step")
    ev.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                    help="passkey/needle/ruler: prefill the prompt in chunks of N tokens "
                         "(generate's prefill_chunk_size; kvfx compresses at every chunk boundary); the "
                         "records' policy reads 'POLICY prefill-chunk=N'")
    ev.add_argument("--passkeys", default="per-cell", choices=["per-cell", "per-seed"],
                    help="passkey: one key per (seed, length, depth) cell (default), or one per seed as "
                         "results/smollm2-grid drew them (to add rows comparable with that grid)")
    ev.add_argument("--inner", default="eager", choices=["eager", "inductor", "aot_eager"])
    ev.add_argument("--no-progress", action="store_true",
                    help="no progress bars (for logs); the summary table is still printed")
    ev.add_argument("--tp", type=int, default=None,
                    help="tensor parallelism over N processes: launch with `torchrun --nproc_per_node N -m "
                         "kvfx.cli eval --tp N ...` (rank 0 writes; see README 'More than one device')")
    ev.set_defaults(func=_eval)

    rp = sub.add_parser("report", help="tables from an eval directory")
    rp.add_argument("dir")
    rp.add_argument("--pivot", action="store_true", help="print one row per policy, a column per task and "
                    "length (also written to DIR/pivot.md) instead of the long table (DIR/report.md)")
    rp.set_defaults(func=_report)

    ca = sub.add_parser("calibrate", help="ReCalKV: calibrate low-rank key/value factors offline")
    ca.add_argument("--model", default="smollm2-135m")
    ca.add_argument("--text", default="essays",
                    help="calibration text: a source (essays, pydoc, grass, auto) or a UTF-8 file")
    ca.add_argument("--keep-rank", type=float, required=True,
                    help="fraction of the Hkv*head_dim key/value dims kept, in (0, 1]")
    ca.add_argument("--out", required=True, help="artifact path (.safetensors)")
    ca.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ca.add_argument("--chunk", type=int, default=512, help="tokens per calibration sequence")
    ca.add_argument("--group-size", type=int, default=None,
                    help="key heads per SVD group (default 4, or ceil(Hkv/2) when smaller)")
    ca.add_argument("--no-hsr", action="store_true", help="contiguous key head groups (no reordering)")
    ca.add_argument("--no-ovc", action="store_true", help="no least-squares refinement of the values")
    ca.add_argument("--heldout-tokens", type=int, default=0,
                    help="also report the error on this many tokens of the text after the calibration ones")
    ca.set_defaults(func=_calibrate)

    ce = sub.add_parser("calib-error", help="CaliDrop: per-layer decode attention error vs the full "
                        "cache, with and without calibration")
    ce.add_argument("--model", default="smollm2-135m")
    ce.add_argument("--length", default="4k", help="prompt tokens")
    ce.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps measured")
    ce.add_argument("--keep", default="0.25,0.125,0.0625", help="budgets (fractions of the prompt)")
    ce.add_argument("--methods", default="snapkv,streaming")
    ce.add_argument("--thresholds", default="0.5", help="CaliDrop cosine thresholds to compare, e.g. 0.9,0.5 "
                    "(default: the presets')")
    ce.add_argument("--adjust", default="tangent", help="LSE estimates to compare: none, tangent or both "
                    "(none,tangent)")
    ce.add_argument("--text", default="essays", help="text source (essays, pydoc, grass)")
    ce.add_argument("--out", default="runs/calib-error")
    ce.set_defaults(func=_calib_error)

    m = sub.add_parser("models", help="list registered model names")
    m.set_defaults(func=_models)

    register_policy(sub)
    register_bench(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from kvfx.distributed import cli_session  # under torchrun: process group, sharded model, rank 0 writes

    with cli_session(args):
        return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
