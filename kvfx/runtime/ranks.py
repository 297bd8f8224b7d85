"""Which rank of a ``torch.distributed`` process group this process is, and byte counts summed
over ranks: what :func:`kvfx.runtime.state.memory` needs under tensor parallelism (the rest of the
tensor-parallel support, set-up and loading, is :mod:`kvfx.distributed`)."""

from __future__ import annotations

import torch

# byte and token counts of kvfx.memory() that add up over ranks (each rank holds its own heads)
SUMMED = ("store_bytes", "shared_bytes", "model_cache_bytes", "held_bytes", "dense_bytes",
          "dense_fp16_bytes", "left_alone_bytes", "peak_store_bytes")
SITE_SUMMED = ("held_bytes", "kv_bytes", "calib_bytes", "dense_bytes", "dense_fp16_bytes")


class TPError(RuntimeError):
    """Tensor-parallel set-up that cannot work; the message names the problem and the fix."""


def is_distributed() -> bool:
    """A ``torch.distributed`` process group is initialized in this process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of the default process group (in place; every rank must call it
    with a tensor of the same shape, in the same order): ChunkKV's per-token scores under tensor
    parallelism, where each rank holds some of a layer's KV heads."""
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def all_ranks_memory(mem: dict) -> dict:
    """The totals of one rank's :func:`kvfx.memory` summed over all ranks (an ``all_reduce``;
    every rank must call it). Returns ``{"ranks", "per_rank_store_bytes", <summed keys>, "sites",
    "ratio", "ratio_fp16"}``; ``sites`` sums each site's byte counts."""
    import torch.distributed as dist

    if not is_distributed():
        raise TPError("kvfx.memory(..., all_ranks=True) needs an initialized torch.distributed process "
                      "group; fix: call it under torchrun after init_process_group (or drop all_ranks)")
    keys = [k for k in SUMMED if mem.get(k) is not None]
    names = sorted(mem["sites"])
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, names)  # every rank must report the same sites
    if any(g != names for g in gathered):
        raise TPError(f"kvfx.memory(all_ranks=True): ranks hold different sites ({gathered}); each rank "
                      f"must measure its shard of the same sequence")
    vals = [mem[k] for k in keys] + [mem["sites"][s][k] for s in names for k in SITE_SUMMED]
    vals.append(mem["store_bytes"])
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(vals, dtype=torch.float64, device=dev)
    per_rank = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(world_size())]
    dist.all_gather(per_rank, t[-1:].clone())
    dist.all_reduce(t)
    out = {"ranks": world_size(), "per_rank_store_bytes": [int(x.item()) for x in per_rank]}
    out.update({k: int(t[i].item()) for i, k in enumerate(keys)})
    i = len(keys)
    out["sites"] = {}
    for s in names:
        out["sites"][s] = {k: int(t[i + j].item()) for j, k in enumerate(SITE_SUMMED)}
        i += len(SITE_SUMMED)
    dense = out.get("dense_bytes", 0)
    dense16 = out.get("dense_fp16_bytes", 0)
    out["ratio"] = out["held_bytes"] / dense if dense else float("nan")
    out["ratio_fp16"] = out["held_bytes"] / dense16 if dense16 else float("nan")
    return out
