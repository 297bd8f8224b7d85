"""One attention site's decode step on the CPU, dense (`full`) against quantized (`kivi2`, `kivi4`)
stores, in thread CPU time (``time.thread_time``: robust to other processes on a shared machine),
and where the quantized step's time goes (issue 22). No model: a store holding N random tokens of
H KV heads × 64, one query head per KV head (or ``--group`` of them), stepped through
:func:`kvfx.runtime.lifecycle.decode_step` as a compiled model does. One torch thread.

    python examples/quant_site_step.py --tokens 4096 --heads 8
"""

import argparse
import time

import torch

from kvfx.methods.quant_attention import fold_query, quant_attention_split
from kvfx.policy import load_policy
from kvfx.runtime import cpu_fused
from kvfx.runtime.compressor import build_compressor
from kvfx.runtime.lifecycle import decode_step
from kvfx.runtime.qstore import QuantStore
from kvfx.runtime.store import SiteStore


def make(name, m, H, d, g):
    c = build_compressor(load_policy(name).resolve(0, "model.layers.0.self_attn", 1), 0, 1)
    st = SiteStore("t") if c.quant is None else QuantStore("t", c.quant)
    k, v = torch.randn(1, H, m, d, generator=g), torch.randn(1, H, m, d, generator=g)
    st.write_kept(k, v, torch.arange(m).expand(1, H, m), torch.full((1, H), m), m + 1)
    st.seen = m
    return c, st


def per_call(fn, n=100, warm=10):
    for _ in range(warm):
        fn()
    t = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=1, help="query heads per KV head")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    g, d = torch.Generator().manual_seed(0), 64
    setups = {n: make(n, a.tokens, a.heads, d, g) for n in ("full", "kivi2", "kivi4")}
    q = torch.randn(1, a.heads * a.group, 1, d, generator=g)
    k1, v1 = torch.randn(1, a.heads, 1, d, generator=g), torch.randn(1, a.heads, 1, d, generator=g)

    def step(c, st):
        decode_step(c, st, q, k1, v1, None, st.seen, None, False, "site")

    for c, st in setups.values():  # compile round
        for _ in range(40):
            step(c, st)
    res = {n: [] for n in setups}
    for _ in range(a.rounds):  # interleaved rounds
        for n, (c, st) in setups.items():
            res[n].append(per_call(lambda: step(c, st), n=50, warm=0))
    full = sorted(res["full"])[len(res["full"]) // 2]
    print(f"{a.tokens} tokens, {a.heads} KV heads x {d}, {a.group} query head(s) each; CPU ms per site step "
          f"(median of {a.rounds} interleaved rounds of 50 steps):")
    for n, ts in res.items():
        med = sorted(ts)[len(ts) // 2]
        print(f"  {n:6s} {med:.3f} ms  ({med / full:.2f}x full)")
    c, st = setups["kivi2"]  # kivi2's read and flush, piece by piece
    kv = st.view()
    sm = d ** -0.5
    qf = q.float().reshape(1, a.heads, a.group, d) * sm
    qs, qm = fold_query(qf, kv.kscale, kv.kmin)
    p = torch.rand(1, a.heads, a.group, kv.vcodes.shape[2])
    torch._dynamo.maybe_mark_dynamic(p, 3)
    parts = {
        "attend (whole read)": lambda: st.attend_step(c, q, None, False, st.seen, None),
        "  read: compiled reductions + eager rest": lambda: quant_attention_split(
            q, kv, scale=sm, key_logits=cpu_fused.key_logits, value_sum=cpu_fused.value_sum),
        "  fold q into key scales": lambda: fold_query(qf, kv.kscale, kv.kmin),
        "  key reduction (compiled)": lambda: cpu_fused.key_logits(qs, qm, kv.kcodes, kbits=kv.kbits, kgroup=kv.kgroup),
        "  value reduction (compiled)": lambda: cpu_fused.value_sum(p, kv.vcodes, kv.vscale, kv.vmin, vbits=kv.vbits,
                                                                    vgroup=kv.vgroup),
        "  one-slot value quantization (compiled)": lambda: cpu_fused.quantize_values(v1, kv.vbits, kv.vgroup,
                                                                                      kv.vscale.dtype),
    }
    print("kivi2, per call:")
    for label, fn in parts.items():
        print(f"  {label}: {per_call(fn):.3f} ms")
    print(f"  dense SDPA read (full): {per_call(lambda: setups['full'][1].attend_step(setups['full'][0], q, None, False, setups['full'][1].seen, None)):.3f} ms")


if __name__ == "__main__":
    main()
