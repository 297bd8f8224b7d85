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

    m = sub.add_parser("models", help="list registered model names")
    m.set_defaults(func=_models)

    register_policy(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
