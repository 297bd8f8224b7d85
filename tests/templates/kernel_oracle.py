"""The STYLE item-4 oracle shared by the kernel tests (tests/templates/test_kernel*.py).

golden = the reference in float64 on the same inputs; the kernel passes when
err(kernel) <= K_FACTOR * err(reference run in the kernel's dtype) + atol, with no NaN; err is the
max abs error. Importing this module sets TRITON_INTERPRET=1 (before triton is imported).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # kernels are interpreted on CPU

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
K_FACTOR = 3.0
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Scores are fp32 sums of fp32 probabilities in every dtype (p is not rounded to the input dtype
# on this path), and the fp32 reference can be exact where the kernel is not (a sum of one term):
# atol = SCORE_ULPS fp32 round-offs of the largest golden score (+1 for the row-sum scale).
# Measured over 800 random cases (the three prefill kinds and decode probs, three dtypes, blocks
# of 16 and 32 rows): err(kernel) - 3 err(ref) stayed below 3.7 such round-offs.
SCORE_ULPS = 16


def layout(x: torch.Tensor, seq_major: bool) -> torch.Tensor:
    """Same values; with seq_major, strides of a (B, n, H, d) buffer viewed as (B, H, n, d)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2) if seq_major else x


def softcap_logit_err(cap) -> float:
    """The absolute error the kernels' fp32 soft-capped logits may carry beyond the reference's:
    their tanh (built from exp2, kvfx/templates/_softcap.jinja) is within 1.7 ulp of fp32 where
    torch.tanh is within 0.5, and they fold sm_scale / cap and cap * log2(e) into rounded constants;
    each error is a few ulps of tanh, multiplied by the cap. Allowed: 4 unit round-offs of the cap
    (2 ulp). Over 800 random cases (test_softcap_kernels' strategies, logits far beyond the cap)
    the kernel never needed it; the worst case Hypothesis found (fp32, cap 50, test_softcap_kernels'
    regression example) used 2% of it. 0 without a cap."""
    return 0.0 if cap is None else 4 * UNIT_ROUNDOFF[torch.float32] * cap


def check_attention(kernel, ref_lo, golden, v, name, logit_err=0.0):
    """kernel, ref_lo: (o, lse) in the kernel's dtype; golden: (o, lse) in float64; v the values.
    logit_err: an absolute logit error the kernel may carry beyond the reference's
    (:func:`softcap_logit_err`); it moves o by at most 2 * logit_err * max|v| and lse by logit_err.

    Every row the golden marks empty (lse = -inf) must be empty in the kernel too (o = 0,
    lse = -inf). The reference rounds only its output; the kernel also rounds p to the input dtype
    before the PV product (as FlashAttention does), an extra error bounded by u * max|v| (u the
    unit round-off), hence atol = u * max|v|. bf16: the interpreter casts fp32 to bf16 by
    truncation (round toward zero; 2.12497 -> 2.109375, where CUDA and torch give 2.125), so there
    the kernel's p and its output each lose up to a whole ulp (2u relative), which K * err(ref) does
    not cover when the reference's own rounding happens to be tiny (a row whose o is nearly one v):
    atol = 2u * (max|v| + max|o|)."""
    (o_k, l_k), (o_r, l_r), (o_g, l_g) = kernel, ref_lo, golden
    assert o_k.dtype == o_r.dtype and l_k.dtype == torch.float32, name
    assert not torch.isnan(o_k).any() and not torch.isnan(l_k).any(), f"{name}: NaN in kernel output"
    empty = l_g == float("-inf")
    assert torch.equal(l_k == float("-inf"), empty), f"{name}: empty rows differ"
    assert (o_k[empty] == 0).all(), f"{name}: empty rows must have o = 0"
    err_k = (o_k.double() - o_g).abs().max().item() if o_k.numel() else 0.0
    err_r = (o_r.double() - o_g).abs().max().item() if o_r.numel() else 0.0
    v_max = v.double().nan_to_num(0.0).abs().max().item() if v.numel() else 0.0
    u = UNIT_ROUNDOFF[o_k.dtype]
    atol = u * v_max + 2 * logit_err * v_max + 1e-7
    if o_k.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        atol += u * v_max + 2 * u * (o_g.abs().max().item() if o_g.numel() else 0.0)
    assert err_k <= K_FACTOR * err_r + atol, f"{name}: o err {err_k:.3g} vs reference {err_r:.3g}"
    if (~empty).any():
        lk, lr, lg = l_k.double()[~empty], l_r.double()[~empty], l_g[~empty]
        e_k, e_r = (lk - lg).abs().max().item(), (lr - lg).abs().max().item()
        tol = K_FACTOR * e_r + 1e-5 * (1 + lg.abs().max().item()) + logit_err
        assert e_k <= tol, f"{name}: lse err {e_k:.3g} vs reference {e_r:.3g}"


def score_errors(s_k, s_r, s_g, logit_err=0.0):
    """(err(kernel), err(reference), atol) of fp32 scores against the float64 golden; a probability
    p moves by at most 2 * logit_err * p (see :func:`check_attention`), a sum of them likewise."""
    err_k = (s_k.double() - s_g).abs().max().item() if s_k.numel() else 0.0
    err_r = (s_r.double() - s_g).abs().max().item() if s_r.numel() else 0.0
    top = s_g.abs().max().item() if s_g.numel() else 0.0
    return err_k, err_r, SCORE_ULPS * UNIT_ROUNDOFF[torch.float32] * (1.0 + top) + 2 * logit_err * top


def check_scores(s_k, s_r, s_g, name, logit_err=0.0):
    """s_k, s_r: fp32 scores of the kernel and of the reference in the kernel's dtype; s_g: the
    float64 golden. Also: exact zeros wherever the golden is 0 (masked keys, keys no voter sees)."""
    assert s_k.dtype == torch.float32 and s_k.shape == s_g.shape, f"{name}: {s_k.dtype} {tuple(s_k.shape)}"
    assert not torch.isnan(s_k).any(), f"{name}: NaN in kernel scores"
    err_k, err_r, atol = score_errors(s_k, s_r, s_g, logit_err)
    assert err_k <= K_FACTOR * err_r + atol, f"{name}: scores err {err_k:.3g} vs reference {err_r:.3g}"
    assert (s_k[s_g == 0] == 0).all(), f"{name}: scores must be exactly 0 where no voter sees the key"
