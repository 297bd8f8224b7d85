"""`KernelSpec`: the complete, validated description of one rendered kernel.

A spec is the *only* input of `kvfx.templates.render`: the rendered source is a pure function of
it, and `spec.uri` spells every field, so two specs with the same URI render the same source.

Security (DESIGN rule 8): every field is checked in `__post_init__` to be a validated number, a
bool, or a member of a closed enum below, so nothing taken from a policy file can reach the
generated source as text.

    >>> KernelSpec("decode_attention", "fp16", head_dim=128, gqa_group=4).uri
    'decode_attention_dtype_fp16_hd_128_g_4_causal_0_scores_none_qbits_0_calib_0'
"""
from __future__ import annotations

import dataclasses

import torch

# Attention kernels, and the store kernels: quantized decode attention and quantize+pack
# (KIVI/OTT), select+gather (eviction), per-token K/V statistics (KNorm, LagKV).
KINDS = ("prefill_attention", "decode_attention", "quant_decode_attention", "quant_compress",
         "select_gather", "kv_stats")
DTYPES = ("fp32", "fp16", "bf16")
HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_GQA_GROUP = 64
# Fused scoring side outputs a later attention kernel may produce (kernel-level names, not policy
# scorer names): none | window_colsum (SnapKV/PyramidKV) | colsum (H2O) | last_row (TOVA; for
# decode, whose one query row is the last row: the attention row H2O accumulates).
SCORE_KINDS = ("none", "window_colsum", "colsum", "last_row")
DECODE_SCORE_KINDS = ("none", "last_row")
QUANT_BITS = (0, 2, 4, 8)  # 0: the store holds full-precision K/V

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


def _check_int(name: str, value, allowed=None, lo=None, hi=None) -> None:
    # bool is an int subclass; a string such as "64; import os" is rejected here too.
    if type(value) is not int:
        raise ValueError(f"KernelSpec.{name}: got {value!r} ({type(value).__name__}), expected an int")
    if allowed is not None and value not in allowed:
        raise ValueError(f"KernelSpec.{name}: got {value}, expected one of {_choices(allowed)}")
    if lo is not None and not lo <= value <= hi:
        raise ValueError(f"KernelSpec.{name}: got {value}, expected an int in [{lo}, {hi}]")


def _check_enum(name: str, value, allowed) -> None:
    if type(value) is not str or value not in allowed:
        raise ValueError(f"KernelSpec.{name}: got {value!r}, expected one of {_choices(allowed)}")


def _check_bool(name: str, value) -> None:
    if type(value) is not bool:
        raise ValueError(f"KernelSpec.{name}: got {value!r}, expected True or False")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel variant.

    kind: "prefill_attention" | "decode_attention".
    dtype: element type of q, k, v and o: "fp32" | "fp16" | "bf16" (accumulation is always fp32).
    head_dim: d, one of HEAD_DIMS.
    gqa_group: g = Hq // Hkv, query heads per KV head (query head h reads KV head h // g). A spec
        field (not a runtime argument) because the decode kernel processes a whole group per
        program, so g sizes a block.
    causal: bottom-right aligned causal mask (prefill only; must be False for decode).
    scores: fused eviction-score side output (SCORE_KINDS). Prefill: "window_colsum" (SnapKV
        votes of the last rows; the window is a runtime argument), "colsum" (H2O column sums),
        "last_row" (TOVA). Decode: "none" or "last_row" (the attention probabilities over the
        store slots).
    quant_bits, calibration: slots for quantized stores and the CaliDrop partition; validated
        now, rendered by later templates (non-defaults raise NotImplementedError in `render`).
    """

    kind: str
    dtype: str
    head_dim: int
    gqa_group: int = 1
    causal: bool = False
    scores: str = "none"
    quant_bits: int = 0
    calibration: bool = False

    def __post_init__(self) -> None:
        _check_enum("kind", self.kind, KINDS)
        _check_enum("dtype", self.dtype, DTYPES)
        _check_int("head_dim", self.head_dim, allowed=HEAD_DIMS)
        _check_int("gqa_group", self.gqa_group, lo=1, hi=MAX_GQA_GROUP)
        _check_bool("causal", self.causal)
        _check_enum("scores", self.scores, SCORE_KINDS)
        _check_int("quant_bits", self.quant_bits, allowed=QUANT_BITS)
        _check_bool("calibration", self.calibration)
        if self.kind == "decode_attention" and self.causal:
            raise ValueError(
                "KernelSpec.causal: got True for decode_attention, expected False "
                "(one query per sequence sees every valid slot; mask with lengths or bias)"
            )
        if self.kind == "decode_attention" and self.scores not in DECODE_SCORE_KINDS:
            raise ValueError(
                f"KernelSpec.scores: got {self.scores!r} for decode_attention, expected one of "
                f"{_choices(DECODE_SCORE_KINDS)} (one query row: its probabilities are all three "
                "of window_colsum, colsum and last_row; use last_row)"
            )

    @property
    def uri(self) -> str:
        """Deterministic name spelling every field; also the cached source's file stem."""
        return (
            f"{self.kind}_dtype_{self.dtype}_hd_{self.head_dim}_g_{self.gqa_group}"
            f"_causal_{int(self.causal)}_scores_{self.scores}_qbits_{self.quant_bits}"
            f"_calib_{int(self.calibration)}"
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]
