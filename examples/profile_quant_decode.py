"""Where a quantized decode step's time goes on the CPU (issue 22): the KV-heavy synthetic model
compiled with kvfx, a prompt of N tokens, 20 timed one-token steps (median CPU time of the one
thread, ``time.thread_time``: less sensitive than wall time to other processes), then optionally a
torch.profiler table (``prof``) and a cProfile table (``cprof``) of more steps. One torch thread.

    python examples/profile_quant_decode.py kivi2 4096 prof cprof
    python examples/profile_quant_decode.py full 4096
"""

import sys
import time

import torch
from transformers import DynamicCache

from kvfx.bench.e2e import synthetic_model


def main(policy: str, n: int, what: set[str]) -> None:
    torch.set_num_threads(1)
    model = synthetic_model("synthetic:kv-heavy")
    model.compile(backend="kvfx", options={"policy": policy, "inner": "inductor"})
    ids = torch.randint(0, 1024, (1, n + 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids[:, :n].clone(), cache=DynamicCache(config=model.config), use_cache=True,
                    logits_to_keep=1)

        def step(i):
            return model(input_ids=ids[:, n + i:n + i + 1].clone(), cache=out.past_key_values, use_cache=True)

        for i in range(8):
            out = step(i)
        ts = []
        for i in range(8, 28):
            t = time.thread_time()
            out = step(i)
            ts.append(time.thread_time() - t)
        ts.sort()
        print(f"{policy} at {n} tokens: median {1000 * ts[len(ts) // 2]:.2f} ms/step")
        if "prof" in what:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(28, 38):
                    out = step(i)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if "cprof" in what:
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            for i in range(38, 58):
                out = step(i)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), set(sys.argv[3:]))
