"""Launch configurations of the attention kernels: one table per kernel, one prune function each,
keyed on shape parameters only (head_dim, dtype, lengths, B·H), plus the decode split heuristic.

The first config that survives pruning is used (deterministic, no host sync, CUDA-graph safe).
`KVFX_AUTOTUNE=1` instead times the survivors once per key on CUDA and keeps the fastest.
"""
from __future__ import annotations

import dataclasses
import math
import os

# Shared-memory budget for K/V pipelining (bytes): fits A100 (164 KiB) and H100/H200 (227 KiB).
SMEM_BUDGET = 160 * 1024
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    block_m: int  # query rows per program (prefill); unused (0) for decode
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# Preference order: the best config for long prompts first (Triton tutorial 06 sizes).
PREFILL_CONFIGS = (
    AttnConfig(128, 64, 8, 3),
    AttnConfig(128, 32, 4, 3),
    AttnConfig(64, 64, 4, 3),
    AttnConfig(64, 32, 4, 2),
    AttnConfig(32, 32, 4, 2),
    AttnConfig(16, 16, 2, 1),
)
DECODE_CONFIGS = (
    AttnConfig(0, 64, 4, 2),
    AttnConfig(0, 32, 4, 2),
    AttnConfig(0, 16, 2, 1),
)

# Split-K heuristic for decode: enough programs to fill a GPU, never tiny splits.
TARGET_PROGRAMS = 264  # ~2 waves on 132 SMs
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def _smem_bytes(cfg: AttnConfig, head_dim: int, dtype: str, block_g: int = 0) -> int:
    rows = cfg.block_m or block_g
    return ELEMENT_BYTES[dtype] * head_dim * (rows + 2 * cfg.block_n * max(1, cfg.num_stages))


def prune_prefill(configs, *, head_dim: int, dtype: str, n_q: int, n_k: int):
    """Configs that fit shared memory and whose blocks are not larger than the problem."""
    fit = [c for c in configs if _smem_bytes(c, head_dim, dtype) <= SMEM_BUDGET]
    m_cap, n_cap = _pow2_at_least(n_q), _pow2_at_least(n_k)
    small = [c for c in fit if c.block_m <= m_cap and c.block_n <= n_cap]
    return small or fit[-1:] or list(configs[-1:])


def prune_decode(configs, *, head_dim: int, dtype: str, block_g: int, cap: int):
    fit = [c for c in configs if _smem_bytes(c, head_dim, dtype, block_g) <= SMEM_BUDGET]
    small = [c for c in fit if c.block_n <= _pow2_at_least(cap)]
    return small or fit[-1:] or list(configs[-1:])


def decode_probs_block(cap: int) -> int:
    """Slots per program of the elementwise decode probs kernel (stage 3): the store, up to 1024."""
    return min(1024, _pow2_at_least(cap))


def decode_num_splits(cap: int, bh: int, block_n: int) -> int:
    """Number of split-K partitions of a store of `cap` slots, for `bh` = B·Hkv programs per split."""
    want = math.ceil(TARGET_PROGRAMS / max(1, bh))
    by_len = max(1, cap // MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, by_len, math.ceil(cap / block_n), MAX_SPLITS))


_TUNED: dict = {}


def choose(key, candidates, bench=None):
    """Pick a config for `key` (a tuple of shape parameters). `bench(cfg) -> ms` is used only when
    KVFX_AUTOTUNE=1 and not interpreting; the winner is cached per key."""
    if len(candidates) == 1 or bench is None or os.environ.get("KVFX_AUTOTUNE") != "1":
        return candidates[0]
    if os.environ.get("TRITON_INTERPRET") == "1":
        return candidates[0]
    if key not in _TUNED:
        _TUNED[key] = min(candidates, key=bench)
    return _TUNED[key]
