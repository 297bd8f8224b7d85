"""Peak memory of prefilling a long SmolLM2 prompt: uncompressed, compressed in one call, and
compressed while prefilling in chunks (generate's ``prefill_chunk_size``).

Each configuration runs in a fresh process (glibc told to mmap buffers of 64 KiB and more, so
freed tensors leave the RSS at once); after warming up every graph it resets the RSS high-water
mark (``/proc/self/clear_refs``) and reports its growth during ``generate`` (CPU: the allocator
keeps no peak statistics, so the process's high-water mark is what counts),
kvfx's peak store bytes (``kvfx.memory(cache)["peak_store_bytes"]``) and the final store bytes.

    python examples/chunked_prefill_memory.py --length 8192 --out results/chunked-prefill
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("full", None), ("snapkv@0.25", None), ("snapkv@0.25", 1024), ("snapkv@0.25", 512)]


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def one(policy: str, chunk: int | None, length: int) -> dict:
    import torch

    import kvfx
    from kvfx.eval.text import filler_text, tokenize_prefix
    from kvfx.models import load_model

    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m", progress=False)
    ids = torch.tensor([tokenize_prefix(tok, filler_text(), length, add_special_tokens=True)[:length]])
    kvfx.compile(model, policy, inner="eager")
    with torch.no_grad():  # warm up (compile every graph: prefill, chunk continuations with varying
        # sizes, decode) on short prompts, so compile memory is in the base of every configuration
        model.generate(ids[:, :256], max_new_tokens=2, do_sample=False)
        model.generate(ids[:, :256], max_new_tokens=2, do_sample=False, prefill_chunk_size=64)
        model.generate(ids[:, :288], max_new_tokens=2, do_sample=False, prefill_chunk_size=96)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the RSS high-water mark (VmHWM) to now
        f.write("5")
    base = _status_mib("VmRSS")
    t = time.perf_counter()
    kw = {} if chunk is None else {"prefill_chunk_size": chunk}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **kw)
    seconds = time.perf_counter() - t
    mem = kvfx.memory(out.past_key_values)
    return {"policy": policy, "chunk": chunk, "length": length, "seconds": round(seconds, 1),
            "peak_rss_growth_mib": round(_status_mib("VmHWM") - base, 1),
            "peak_store_mib": round(mem["peak_store_bytes"] / 2**20, 1),
            "final_store_mib": round(mem["store_bytes"] / 2**20, 1),
            "dense_mib": round(mem["dense_bytes"] / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--out", default="results/chunked-prefill")
    ap.add_argument("--one", nargs=2, metavar=("POLICY", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], None if a.one[1] == "none" else int(a.one[1]), a.length)))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy, chunk in CONFIGS:
        # large buffers mmapped, so freed tensors leave the RSS at once (glibc otherwise keeps
        # freed heap, and the high-water mark then depends on what earlier calls left behind)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        r = subprocess.run([sys.executable, __file__, "--length", str(a.length), "--one", policy, str(chunk).lower()],
                           capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    (out / "peak_memory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["| policy | prefill chunk | peak RSS growth MiB | peak store MiB | final store MiB | dense KV MiB | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['chunk'] or 'one call'} | {r['peak_rss_growth_mib']} | "
                     f"{r['peak_store_mib']} | {r['final_store_mib']} | {r['dense_mib']} | {r['seconds']} |")
    (out / "peak_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
