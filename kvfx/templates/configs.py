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


# Select+gather (one program per row) and K/V statistics (one per token tile or partition).
SELECT_BLOCK_N = 1024  # scores per selection chunk
GATHER_TILE_ELEMENTS = 4096  # BLOCK_C * head_dim: K/V elements per compaction step
STATS_TILE_ELEMENTS = 8192  # BLOCK_N (knorm) or BLOCK_L (lagkv) * head_dim per reduced tile
EVICT_NUM_WARPS = 4


def select_blocks(n: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C) of the select_gather kernel for rows of n tokens."""
    cap_n = _pow2_at_least(n)
    return min(SELECT_BLOCK_N, cap_n), min(cap_n, max(16, GATHER_TILE_ELEMENTS // head_dim))


def stats_block(n: int, head_dim: int) -> int:
    """Tokens per tile of the kv_stats kernel (n: tokens per row, or lag for LagKV)."""
    return min(_pow2_at_least(n), max(16, STATS_TILE_ELEMENTS // head_dim))


# Quantized decode attention (KIVI): the K and V tiles are unpacked into fp32 registers, so the
# block is bounded by its elements (BLOCK_N * head dim) rather than by shared memory.
QUANT_DECODE_CONFIGS = (
    AttnConfig(0, 64, 4, 2),
    AttnConfig(0, 32, 4, 2),
    AttnConfig(0, 16, 2, 1),
)
QUANT_TILE_ELEMENTS = 8192  # BLOCK_N * max(d, dv) of an unpacked K or V tile
QUANT_COMPRESS_TILE_ELEMENTS = 4096  # tokens * d of one quant_compress program (values: BLOCK_T)


def prune_quant_decode(configs, *, head_dim: int, head_dim_v: int, slots: int):
    """Configs whose unpacked tiles fit QUANT_TILE_ELEMENTS and whose block is not larger than the
    longest partition (slots: max(n, pool size))."""
    fit = [c for c in configs if c.block_n * max(head_dim, head_dim_v) <= QUANT_TILE_ELEMENTS]
    small = [c for c in fit if c.block_n <= _pow2_at_least(slots)]
    return small or fit[-1:] or list(configs[-1:])


def quant_values_block(T: int, head_dim: int) -> int:
    """Tokens per program of the quant_compress values kernel."""
    return min(_pow2_at_least(T, floor=1), max(1, QUANT_COMPRESS_TILE_ELEMENTS // head_dim))


def quant_compress_warps(elements: int) -> int:
    """num_warps of a quant_compress program holding `elements` values."""
    return 4 if elements <= QUANT_COMPRESS_TILE_ELEMENTS else 8


# Latent decode attention (ReCalKV low-rank store): a program holds the latent tiles (BLOCK_N x
# BLOCK_RK and BLOCK_N x BLOCK_RV) and the two rebuilt key halves (BLOCK_N x d/2 each) in fp32.
LATENT_DECODE_CONFIGS = (
    AttnConfig(0, 64, 4, 2),
    AttnConfig(0, 32, 4, 2),
    AttnConfig(0, 16, 2, 1),
)
LATENT_TILE_ELEMENTS = 16384  # BLOCK_N * (r_k + r_v + d) fp32 registers of one step


LATENT_ROW_ELEMENTS = 8192  # BLOCK_Q * BLOCK_RV: the fp32 latent accumulator of one program (32 KiB)


def latent_heads_per_program(kv_heads: int, gqa_group: int, block_rv: int) -> int:
    """KV heads per latent decode program: as many as keep the accumulator (BLOCK_Q query rows x
    BLOCK_RV latent values, fp32) within LATENT_ROW_ELEMENTS, so the latents are read
    cdiv(Hkv, heads) times per slot instead of Hkv times; at least 1."""
    best = 1
    for h in range(1, kv_heads + 1):
        if _pow2_at_least(h * gqa_group) * block_rv <= LATENT_ROW_ELEMENTS:
            best = h
    return best


def prune_latent_decode(configs, *, head_dim: int, key_rank: int, value_rank: int, cap: int):
    """Configs whose fp32 tiles fit LATENT_TILE_ELEMENTS and whose block is not larger than the store."""
    fit = [c for c in configs if c.block_n * (key_rank + value_rank + head_dim) <= LATENT_TILE_ELEMENTS]
    small = [c for c in fit if c.block_n <= _pow2_at_least(cap)]
    return small or fit[-1:] or list(configs[-1:])


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
