"""``kvfx bench e2e`` and ``kvfx bench kernels`` as argparse subcommands.

    import argparse
    from kvfx.bench.commands import register
    parser = argparse.ArgumentParser(prog="kvfx")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "kernels", "--contexts", "256"])
    exit_code = args.func(args)

Each run writes JSON + Markdown (+ a PNG for e2e) under ``--out`` and prints the table; the
Markdown starts with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import shlex

_DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench`` with ``e2e`` and ``kernels`` to ``subparsers``."""
    bench = subparsers.add_parser("bench", help="speed and memory as ratios against baselines, one run",
                                  description="Benchmarks whose every number is a ratio against a "
                                              "baseline measured in the same run.")
    sub = bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)

    e = sub.add_parser("e2e", help="prefill / decode speed, memory, compile time: eager, inductor, "
                                   "kvfx full and policies")
    e.add_argument("--model", default="smollm2-135m", help="registry name, HF name, directory, or synthetic:kv-heavy (random weights)")
    e.add_argument("--policy", nargs="+", default=[], metavar="P",
                   help="kvfx policies besides full (presets, files, NAME@KEEP)")
    e.add_argument("--lengths", default="2k,4k,8k", help="prefill lengths, e.g. 1k,2k,4096")
    e.add_argument("--steps", type=int, default=32, help="timed one-token decode steps per sequence")
    e.add_argument("--warmup", type=int, default=4, help="untimed decode steps before them")
    e.add_argument("--rounds", type=int, default=2, help="measured rounds (after one compile round)")
    e.add_argument("--inner", default="inductor", choices=["inductor", "eager", "aot_eager"],
                   help="kvfx's compiler for the rewritten graph")
    e.add_argument("--dynamic", default="auto", choices=["auto", "true"],
                   help="torch.compile dynamic= for every compiled configuration (auto: None); under "
                        "true kvfx may leave sites alone, which the report flags")
    e.add_argument("--greedy", action="store_true", help="feed back the argmax instead of the text")
    e.add_argument("--hf-quantized", nargs="+", default=[], metavar="B",
                   help="Hugging Face QuantizedCache baselines: quanto:2 quanto:4 hqq:2 hqq:4 fp8, or auto "
                        "(quanto and HQQ at 2 and 4 bits, those installed)")
    e.add_argument("--baseline", default="inductor",
                   help="dynamo backend of the compiled baseline the ratios use (default inductor)")
    e.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill the prompt in calls of N tokens continuing the cache (as generate's "
                        "prefill_chunk_size; kvfx compresses at every boundary), for every configuration")
    e.add_argument("--tp", type=int, default=None,
                   help="tensor parallelism over N processes (torchrun --nproc_per_node N -m kvfx.cli bench e2e "
                        "--tp N ...); each rank times and measures its own shard, rank 0 writes")
    _common(e, "runs/bench/e2e")
    e.set_defaults(func=cmd_e2e)

    k = sub.add_parser("kernels", help="kvfx attention entry points vs F.scaled_dot_product_attention")
    k.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                   help="prefill prefill+scores decode decode+calib decode+softcap decode+quant decode+latent "
                        "(default: all)")
    k.add_argument("--contexts", default=None, help="e.g. 1k,4k (default: 1k..128k on CUDA, 256,1k on CPU)")
    k.add_argument("--batches", default=None, help="e.g. 1,4,16 (default: 1,4,16 on CUDA, 1,2 on CPU)")
    k.add_argument("--head-dims", default=None, help="e.g. 64,128 (default: 64,128 on CUDA, 64 on CPU)")
    k.add_argument("--heads", default=None, help="query/KV heads, e.g. 32/8 (default 32/8; 8/2 on CPU)")
    k.add_argument("--quant-bits", type=int, default=2, choices=[2, 4, 8])
    k.add_argument("--group", type=int, default=32, help="quantization group (tokens for K, channels for V)")
    k.add_argument("--min-time", type=float, default=0.2, help="CPU: seconds of repetitions per timing")
    k.add_argument("--peak-bw", type=float, default=None, help="peak DRAM bandwidth in TB/s (override)")
    k.add_argument("--prefill-max-context", default=None,
                   help="prefill cases only up to this context (default 32k on CUDA, no limit on CPU)")
    _common(k, "runs/bench/kernels")
    k.set_defaults(func=cmd_kernels)
    return bench


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=_DTYPES,
                   help="default: float32 on CPU; bfloat16 (e2e) / float16 (kernels) on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=out)
    p.add_argument("--no-progress", action="store_true")


def _setup(args):
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"kvfx bench: --threads {args.threads}, expected >= 1")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.device(device).type == "cuda"


def _ints(text: str | None, option: str) -> list[int] | None:
    """``"1k,4096"`` -> [1024, 4096] (a ``k`` suffix multiplies by 1024)."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            n = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            n = 0
        if n < 1:
            raise SystemExit(f"kvfx bench: {option} {text!r}: {part!r} is not a positive count "
                             "(write e.g. 1k,2k,4096)")
        out.append(n)
    return out


def _command(args, names) -> str:
    """The ``kvfx bench ...`` command line that reproduces ``args`` (every option spelled out)."""
    parts = ["kvfx", "bench", args.bench_command]
    for name in names:
        v = getattr(args, name.replace("-", "_"))
        if v is None or v is False or v == []:
            continue
        flag = f"--{name}"
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [flag, *map(str, v)]
        else:
            parts += [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_e2e(args) -> int:
    import torch

    from kvfx.bench import e2e

    device, cuda = _setup(args)
    lengths = _ints(args.lengths, "--lengths")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    command = _command(args, ["model", "policy", "lengths", "steps", "warmup", "rounds", "inner", "dynamic",
                              "greedy", "baseline", "hf-quantized", "device", "dtype", "threads", "out"])
    model, ids = e2e.load_inputs(args.model, max(lengths) + args.warmup + args.steps, device=device, dtype=dtype)
    try:
        result = e2e.run_e2e(model, ids, lengths=lengths, policies=args.policy, steps=args.steps,
                             warmup=args.warmup, rounds=args.rounds, inner=args.inner,
                             dynamic=None if args.dynamic == "auto" else True, greedy=args.greedy,
                             baseline=args.baseline, hf_quantized=args.hf_quantized,
                             model_name=args.model, command=command, progress=not args.no_progress,
                             prefill_chunk=args.prefill_chunk)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    paths = e2e.write_outputs(result, args.out)
    print(e2e.markdown_table(result))
    for p in paths.values():
        print(f"wrote {p}")
    return 0


def cmd_kernels(args) -> int:
    from kvfx.bench import kernels

    device, _ = _setup(args)
    heads = None
    if args.heads is not None:
        try:
            heads = tuple(int(x) for x in args.heads.split("/"))
        except ValueError:
            heads = ()
        if len(heads) != 2 or min(heads) < 1 or heads[0] % heads[1]:
            raise SystemExit(f"kvfx bench kernels: --heads {args.heads!r}, expected Q/KV with Q a multiple "
                             "of KV, e.g. 32/8")
    shapes = kernels.default_grid(device, contexts=_ints(args.contexts, "--contexts"),
                                  batches=_ints(args.batches, "--batches"),
                                  head_dims=_ints(args.head_dims, "--head-dims"), heads=heads, dtype=args.dtype)
    command = _command(args, ["cases", "contexts", "batches", "head-dims", "heads", "quant-bits", "group",
                              "min-time", "peak-bw", "prefill-max-context", "device", "dtype", "threads", "out"])
    try:
        result = kernels.run_kernels(shapes, device=device, cases=args.cases or kernels.CASES,
                                     quant_bits=args.quant_bits, group=args.group,
                                     peak_bw=args.peak_bw * 1e12 if args.peak_bw else None,
                                     min_time=args.min_time, command=command, progress=not args.no_progress,
                                     prefill_max_context=(_ints(args.prefill_max_context, "--prefill-max-context")
                                                          or [None])[0])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    paths = kernels.write_outputs(result, args.out)
    print(kernels.markdown_table(result))
    for p in paths.values():
        print(f"wrote {p}")
    return 0
