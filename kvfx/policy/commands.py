"""``kvfx policy ...``: validate, show, schema and list, as an argparse subcommand.

    import argparse
    from kvfx.policy.commands import register
    parser = argparse.ArgumentParser(prog="kvfx")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["policy", "validate", "snapkv"])
    exit_code = args.func(args)       # prints "ok snapkv <hash>"
"""

from __future__ import annotations

import argparse
import json
import sys

from .loader import list_presets, preset_description
from .resolve import load_policy, policy_json_schema
from .schema import PolicyError

DEFAULT_MODULE = "model.layers.{i}.self_attn"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``policy`` with ``validate``, ``show``, ``schema`` and ``list`` to ``subparsers``.

    Each leaf parser sets ``func``: a handler taking the parsed ``args`` and returning an exit code.
    """
    policy = subparsers.add_parser("policy", help="validate, show and list KV-cache policies",
                                   description="Validate, show and list kvfx policies.")
    sub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check policy files (or preset names); print 'ok NAME HASH'")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show", help="print the resolved policy per layer")
    p.add_argument("file", metavar="FILE", help="a policy file or a preset name")
    p.add_argument("--layers", type=int, default=1, metavar="N", help="number of layers (default 1)")
    p.add_argument("--module", default=DEFAULT_MODULE, metavar="TEMPLATE",
                   help=f"module path of layer {{i}}'s attention (default {DEFAULT_MODULE})")
    p.add_argument("--full", action="store_true", help="also print each group's fields as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("schema", help="print the JSON Schema of a policy file")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("list", help="list the shipped presets")
    p.set_defaults(func=cmd_list)
    return policy


def cmd_validate(args: argparse.Namespace) -> int:
    """Print ``ok NAME HASH`` per valid file; the one-line error (stderr) and exit 1 otherwise."""
    rc = 0
    for f in args.files:
        try:
            p = load_policy(f)
        except PolicyError as e:
            print(e, file=sys.stderr)
            rc = 1
        else:
            print(f"ok {p.name} {p.hash}")
    return rc


def _span(a: int, b: int) -> str:
    return f"layer {a}" if a == b else f"layers {a}-{b}"


def cmd_show(args: argparse.Namespace) -> int:
    """Print name and hash, then one line per run of consecutive identical layers."""
    if args.layers < 1:
        print(f"--layers: got {args.layers}, expected an integer >= 1", file=sys.stderr)
        return 2
    try:
        p = load_policy(args.file)
        sites = [(i, args.module.format(i=i)) for i in range(args.layers)]
        # a window: override applies by layer kind, which only the model knows: show both kinds
        kinds = [None] if all(ov.window is None for ov in p.overrides) else [False, True]
        resolved = {w: [p.resolve(i, path, args.layers, window=w) for i, path in sites] for w in kinds}
    except (PolicyError, KeyError, IndexError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"policy {p.name} hash {p.hash} source {p.source}")
    for w, runs in resolved.items():
        if w is not None:
            print("if sliding-window layers:" if w else "if global layers (not sliding-window):")
        start = 0
        for i in range(1, len(runs) + 1):
            if i == len(runs) or runs[i] != runs[start]:
                print(f"{'  ' if w is not None else ''}{_span(start, i - 1)}: {runs[start].describe()}")
                if args.full:
                    print("  " + json.dumps(runs[start].model_dump(mode="json"), sort_keys=True))
                start = i
    try:
        p.check_overrides(sites)
    except PolicyError as e:
        print(f"warning: {e}", file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of a policy document."""
    print(json.dumps(policy_json_schema(), indent=2, sort_keys=True))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print each preset with its one-line description."""
    names = list_presets()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}")
    return 0
