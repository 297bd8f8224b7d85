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
         "select_gather", "kv_stats", "latent_decode_attention")
# Latent decode attention (ReCalKV low-rank store): key_rank / value_rank are the latent widths
# (they size register blocks); every other kind keeps them 0. Its head_dim must be >= 32.
LATENT_KINDS = ("latent_decode_attention",)
MAX_LATENT_RANK = 1024
DTYPES = ("fp32", "fp16", "bf16")
HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_GQA_GROUP = 64
# Fused scoring side outputs a later attention kernel may produce (kernel-level names, not policy
# scorer names): none | window_colsum (SnapKV/PyramidKV) | colsum (H2O) | last_row (TOVA; for
# decode, whose one query row is the last row: the attention row H2O accumulates).
# The kv_stats kernel's mode is its scores field: knorm (-||k_j||_2 per token) | lagkv (LagKV
# partition scores); those two belong to kv_stats only, and select_gather takes "none".
STATS_SCORE_KINDS = ("knorm", "lagkv")
# window_logits (prefill only): the raw logits of the last rows (SnapKV/TOVA scores and CaliDrop's
# prompt statistics from one set of logits).
SCORE_KINDS = ("none", "window_colsum", "colsum", "last_row", "window_logits") + STATS_SCORE_KINDS
DECODE_SCORE_KINDS = ("none", "last_row")
QUANT_BITS = (0, 2, 4, 8)  # 0: the store holds full-precision K/V
# Quantized-store kernels (KIVI + outlier tokens): quant_decode_attention reads a QuantKV store
# (kvfx.methods.quant_attention), quant_compress quantizes and packs a flush. Their fields
# key_bits/key_group/value_bits/value_group/outlier_pool/outlier_norm must keep their defaults
# (0/0/0/0/False/"none") on every other kind.
QUANT_KINDS = ("quant_decode_attention", "quant_compress")
KV_BITS = (2, 4, 8)
MAX_QUANT_GROUP = 1024
OUTLIER_NORMS = ("none", "l1", "l2")  # quant_compress: trace outliers by smallest L1/L2 norm

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


def _check_quant_fields(spec) -> None:
    """The quantized-store fields (see QUANT_KINDS); the URI spells them for the quant kinds only,
    which is injective because every other kind must keep their defaults."""
    for name in ("key_bits", "value_bits"):
        _check_int(name, getattr(spec, name), allowed=(0,) + KV_BITS)
    for name in ("key_group", "value_group"):
        _check_int(name, getattr(spec, name), lo=0, hi=MAX_QUANT_GROUP)
    _check_bool("outlier_pool", spec.outlier_pool)
    _check_enum("outlier_norm", spec.outlier_norm, OUTLIER_NORMS)
    fields = dict(key_bits=0, key_group=0, value_bits=0, value_group=0, outlier_pool=False,
                  outlier_norm="none")
    if spec.kind not in QUANT_KINDS:
        for name, default in fields.items():
            if getattr(spec, name) != default:
                raise ValueError(f"KernelSpec.{name}: got {getattr(spec, name)!r} for {spec.kind}, expected "
                                 f"{default!r} (only {' and '.join(QUANT_KINDS)} read it)")
        return
    if (spec.causal, spec.scores, spec.quant_bits) != (False, "none", 0):
        raise ValueError(f"KernelSpec: {spec.kind} expects causal=False, scores='none', quant_bits=0 (its "
                         f"bits are key_bits/value_bits), got causal={spec.causal}, scores={spec.scores!r}, "
                         f"quant_bits={spec.quant_bits}")
    sides = (("key", spec.key_bits, spec.key_group), ("value", spec.value_bits, spec.value_group))
    for side, bits, group in sides:
        if bits == 0:
            if group != 0:
                raise ValueError(f"KernelSpec.{side}_group: got {group} with {side}_bits=0, expected 0")
            continue
        if group < 1 or group & (group - 1):
            raise ValueError(f"KernelSpec.{side}_group: got {group}, expected a power of two in "
                             f"[1, {MAX_QUANT_GROUP}] (with {side}_bits={bits})")
    if spec.key_bits and spec.key_group % (32 // spec.key_bits):
        raise ValueError(f"KernelSpec.key_group: got {spec.key_group}, expected a multiple of 32 // key_bits "
                         f"= {32 // spec.key_bits} (a group fills whole int32 words)")
    if spec.kind == "quant_decode_attention":
        if not (spec.key_bits and spec.value_bits) or spec.outlier_norm != "none":
            raise ValueError(f"KernelSpec: quant_decode_attention expects key_bits and value_bits in "
                             f"{_choices(KV_BITS)} and outlier_norm='none', got key_bits={spec.key_bits}, "
                             f"value_bits={spec.value_bits}, outlier_norm={spec.outlier_norm!r}")
    else:  # quant_compress: keys (key_bits, optional outlier_norm) and/or values (value_bits)
        if spec.gqa_group != 1 or spec.outlier_pool or not (spec.key_bits or spec.value_bits):
            raise ValueError(f"KernelSpec: quant_compress expects gqa_group=1, outlier_pool=False and "
                             f"key_bits or value_bits set, got gqa_group={spec.gqa_group}, outlier_pool="
                             f"{spec.outlier_pool}, key_bits={spec.key_bits}, value_bits={spec.value_bits}")
        if spec.outlier_norm != "none" and not spec.key_bits:
            raise ValueError(f"KernelSpec.outlier_norm: got {spec.outlier_norm!r} with key_bits=0, "
                             "expected 'none' (outliers are traced among keys)")
        if spec.value_group > spec.head_dim:
            raise ValueError(f"KernelSpec.value_group: got {spec.value_group}, expected at most "
                             f"head_dim={spec.head_dim}")


def _check_latent_fields(spec) -> None:
    """key_rank / value_rank: in [1, MAX_LATENT_RANK] for the latent kinds, 0 elsewhere (so the URI,
    which spells them for the latent kinds only, stays injective)."""
    for name in ("key_rank", "value_rank"):
        if spec.kind in LATENT_KINDS:
            _check_int(name, getattr(spec, name), lo=1, hi=MAX_LATENT_RANK)
        else:
            _check_int(name, getattr(spec, name), lo=0, hi=MAX_LATENT_RANK)
            if getattr(spec, name):
                raise ValueError(f"KernelSpec.{name}: got {getattr(spec, name)} for {spec.kind}, expected 0 "
                                 f"(only {', '.join(LATENT_KINDS)} reads it)")
    if spec.kind in LATENT_KINDS:
        if spec.head_dim < 32 or spec.causal or spec.scores != "none" or spec.calibration:
            raise ValueError(f"KernelSpec: {spec.kind} expects head_dim >= 32 (its rebuilt key halves feed "
                             f"tl.dot), causal=False, scores='none', calibration=False, got head_dim="
                             f"{spec.head_dim}, causal={spec.causal}, scores={spec.scores!r}, "
                             f"calibration={spec.calibration}")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel variant.

    kind: one of KINDS: the attention kernels ("prefill_attention", "decode_attention",
        "quant_decode_attention") and the store kernels ("quant_compress", "select_gather",
        "kv_stats").
    dtype: element type of q, k, v and o: "fp32" | "fp16" | "bf16" (accumulation is always fp32).
    head_dim: d, one of HEAD_DIMS.
    gqa_group: g = Hq // Hkv, query heads per KV head (query head h reads KV head h // g). A spec
        field (not a runtime argument) because the decode kernel processes a whole group per
        program, so g sizes a block.
    causal: bottom-right aligned causal mask (prefill only; must be False for decode).
    scores: fused eviction-score side output (SCORE_KINDS). Prefill: "window_colsum" (SnapKV
        votes of the last rows; the window is a runtime argument), "colsum" (H2O column sums),
        "last_row" (TOVA), "window_logits" (the logits of the last rows). Decode: "none" or
        "last_row" (the attention probabilities over the store slots). kv_stats: its mode, "knorm" or "lagkv". select_gather: "none".
    quant_bits, calibration: slots for quantized stores and the CaliDrop partition; validated
        now, rendered by later templates (non-defaults raise NotImplementedError in `render`),
        except calibration=True for decode_attention and quant_decode_attention
        (render.CALIBRATION_KINDS): the CaliDrop partition (o_e, lse_e, use per query head)
        merged in the split-K reduction.
    key_bits, key_group, value_bits, value_group: the quantized store of quant_decode_attention
        (both sides) and of quant_compress (keys and/or values): bits in KV_BITS, groups powers of
        two (keys: tokens per channel group, a multiple of 32 // key_bits; values: channels per
        token group); 0 = that side is absent.
    outlier_pool: quant_decode_attention attends an outlier pool as one more partition.
    outlier_norm: quant_compress traces outliers by the smallest "l1"/"l2" key norm ("none": no).
    key_rank, value_rank: latent_decode_attention's latent widths r_k, r_v (0 on every other kind).
    ragged: a head-wise ragged pool (kvfx.runtime.ragged): K, V are (P, D) pools and each (row, KV
        head) owns the segment from START[b, h]; decode_attention reads it (scores none, no
        calibration), select_gather writes its kept tokens into it.
    """

    kind: str
    dtype: str
    head_dim: int
    gqa_group: int = 1
    causal: bool = False
    scores: str = "none"
    quant_bits: int = 0
    calibration: bool = False
    key_bits: int = 0
    key_group: int = 0
    value_bits: int = 0
    value_group: int = 0
    outlier_pool: bool = False
    outlier_norm: str = "none"
    key_rank: int = 0
    value_rank: int = 0
    ragged: bool = False

    def __post_init__(self) -> None:
        _check_enum("kind", self.kind, KINDS)
        _check_enum("dtype", self.dtype, DTYPES)
        _check_int("head_dim", self.head_dim, allowed=HEAD_DIMS)
        _check_int("gqa_group", self.gqa_group, lo=1, hi=MAX_GQA_GROUP)
        _check_bool("causal", self.causal)
        _check_enum("scores", self.scores, SCORE_KINDS)
        _check_int("quant_bits", self.quant_bits, allowed=QUANT_BITS)
        _check_bool("calibration", self.calibration)
        _check_quant_fields(self)
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
        if (self.kind == "kv_stats") != (self.scores in STATS_SCORE_KINDS):
            allowed = [s for s in SCORE_KINDS if (s in STATS_SCORE_KINDS) == (self.kind == "kv_stats")]
            raise ValueError(f"KernelSpec.scores: got {self.scores!r} for {self.kind}, expected one of "
                             f"{_choices(allowed)} (knorm and lagkv are the modes of kv_stats only)")
        if self.kind in ("select_gather", "kv_stats") and (self.gqa_group, self.causal) != (1, False):
            raise ValueError(f"KernelSpec: {self.kind} reads K/V heads only, expected gqa_group=1 and "
                             f"causal=False, got gqa_group={self.gqa_group}, causal={self.causal}")
        if self.kind == "select_gather" and self.scores != "none":
            raise ValueError(f"KernelSpec.scores: got {self.scores!r} for select_gather, expected 'none'")
        _check_latent_fields(self)
        _check_bool("ragged", self.ragged)
        if self.ragged and (self.kind not in ("decode_attention", "select_gather") or self.scores != "none"
                            or self.calibration):
            raise ValueError(f"KernelSpec.ragged: got True for {self.kind} (scores={self.scores!r}, calibration="
                             f"{self.calibration}), expected decode_attention or select_gather with scores='none' "
                             "and calibration=False (the head-wise ragged store reads without probabilities or "
                             "CaliDrop)")

    @property
    def uri(self) -> str:
        """Deterministic name spelling every field; also the cached source's file stem."""
        return (
            f"{self.kind}_dtype_{self.dtype}_hd_{self.head_dim}_g_{self.gqa_group}"
            f"_causal_{int(self.causal)}_scores_{self.scores}_qbits_{self.quant_bits}"
            f"_calib_{int(self.calibration)}"
            + (f"_kq_{self.key_bits}_{self.key_group}_vq_{self.value_bits}_{self.value_group}"
               f"_pool_{int(self.outlier_pool)}_onorm_{self.outlier_norm}"
               if self.kind in QUANT_KINDS else "")
            + (f"_rk_{self.key_rank}_rv_{self.value_rank}" if self.kind in LATENT_KINDS else "")
            + ("_ragged_1" if self.ragged else "")
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]
