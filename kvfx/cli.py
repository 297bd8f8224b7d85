"""The ``kvfx`` command.

    kvfx demo [--policy P ...] [--length 4096]     passkey demo on SmolLM2-135M
    kvfx explain --model M [--policy P]            the site report for a model
    kvfx policy validate|show|schema|list          policy files
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
    records = run_eval(args.model, args.policy, task=args.task, lengths=_parse_lengths(args.lengths),
                       depths=depths, seeds=range(args.seeds), out=args.out, inner=args.inner,
                       max_new_tokens=args.max_new_tokens, chunk=args.chunk)
    print(markdown_table(records))
    return 0


def _report(args) -> int:
    from pathlib import Path

    from kvfx.eval.harness import load_results, write_report

    if not load_results(Path(args.dir)):
        raise SystemExit(f"kvfx report: no results.jsonl in {args.dir}")
    table, pngs = write_report(Path(args.dir))
    print(table)
    for p in pngs:
        print(f"wrote {p}")
    return 0


def _models(args) -> int:
    from kvfx.models import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kvfx import __version__
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
    ev.add_argument("--model", default="smollm2-135m")
    ev.add_argument("--policy", nargs="+", required=True,
                    help="presets, files or NAME@KEEP (e.g. snapkv@0.125); include full")
    ev.add_argument("--task", default="passkey", choices=["passkey", "needle", "perplexity"])
    ev.add_argument("--lengths", default="4k", help="comma separated, e.g. 1k,2k,4k")
    ev.add_argument("--depths", default="10", help="a count (evenly spaced) or a list 0.1,0.5")
    ev.add_argument("--seeds", type=int, default=1)
    ev.add_argument("--out", default="runs/eval")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: 8 for passkey, 24 for needle")
    ev.add_argument("--chunk", type=int, default=1, help="perplexity: tokens per decode step")
    ev.add_argument("--inner", default="eager", choices=["eager", "inductor", "aot_eager"])
    ev.set_defaults(func=_eval)

    rp = sub.add_parser("report", help="tables from an eval directory")
    rp.add_argument("dir")
    rp.set_defaults(func=_report)

    m = sub.add_parser("models", help="list registered model names")
    m.set_defaults(func=_models)

    register_policy(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
