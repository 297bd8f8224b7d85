"""Attention entry points: argument errors, and dispatch to the reference on CPU."""
import builtins
import sys

import pytest
import torch

from kvfx.methods.attention import decode_attention_reference, prefill_attention_reference
from kvfx.templates import decode_attention, prefill_attention


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.delenv("KVFX_FORCE_TRITON", raising=False)


def _qkv(B=2, Hq=4, Hkv=2, n=6, d=64, dtype=torch.float32, cap=None):
    q = torch.randn(B, Hq, 1 if cap else n, d, dtype=dtype)
    k = torch.randn(B, Hkv, cap or n, d, dtype=dtype)
    return q, k, torch.randn_like(k)


def test_cpu_runs_the_reference():
    q, k, v = _qkv()
    starts = torch.tensor([0, 2])
    for got, want in zip(prefill_attention(q, k, v, scale=0.1, kv_start=starts),
                         prefill_attention_reference(q, k, v, scale=0.1, kv_start=starts)):
        assert torch.equal(got, want)
    for kind in ("window_colsum", "colsum", "last_row"):
        got = prefill_attention(q, k, v, scale=0.1, kv_start=starts, scores=kind, window=3)
        want = prefill_attention_reference(q, k, v, scale=0.1, kv_start=starts, scores=kind, window=3)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    q, k, v = _qkv(cap=9)
    lengths = torch.tensor([[3, 9], [0, 4]], dtype=torch.int32)
    for got, want in zip(decode_attention(q, k, v, lengths, scale=0.1),
                         decode_attention_reference(q, k, v, lengths, scale=0.1)):
        assert torch.equal(got, want)
    got = decode_attention(q, k, v, lengths, scale=0.1, return_probs=True)
    want = decode_attention_reference(q, k, v, lengths, scale=0.1, return_probs=True)
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_cpu_path_works_without_triton(monkeypatch):
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    q, k, v = _qkv()
    o, lse = prefill_attention(q, k, v, scale=0.1)
    assert o.shape == q.shape and lse.shape == q.shape[:3]
    monkeypatch.setenv("KVFX_FORCE_TRITON", "1")
    with pytest.raises(RuntimeError, match="KVFX_FORCE_TRITON=1 but triton is not importable"):
        prefill_attention(q, k, v, scale=0.1)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(d=96), r"prefill_attention: head_dim 96 not supported, expected one of 16, 32, 64, 128, 256"),
        (dict(dtype=torch.float64), r"q has dtype torch.float64, expected one of torch.float32, torch.float16"),
        (dict(Hq=3), r"q has 3 heads and k has 2; expected Hq a multiple of Hkv"),
    ],
)
def test_prefill_argument_errors(change, match):
    q, k, v = _qkv(**change)
    with pytest.raises(ValueError, match=match):
        prefill_attention(q, k, v, scale=0.1)


def test_prefill_mismatched_inputs():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q, k, v dtypes differ"):
        prefill_attention(q, k.half(), v.half(), scale=0.1)
    with pytest.raises(ValueError, match=r"k has shape \(2, 2, 6, 64\) but v has \(2, 2, 5, 64\)"):
        prefill_attention(q, k, v[:, :, :5], scale=0.1)
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 6, 64\), expected \(B=2, Hkv, n, d=64\)"):
        prefill_attention(q, k[:1], v[:1], scale=0.1)
    with pytest.raises(ValueError, match=r"q must be a 4-d tensor \(B, Hq, n_q, d\), got \(4, 6, 64\)"):
        prefill_attention(q[0], k, v, scale=0.1)
    with pytest.raises(ValueError, match=r"kv_start must be an integer tensor of shape \(B,\) = \(2,\)"):
        prefill_attention(q, k, v, scale=0.1, kv_start=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale must be a finite Python float, got tensor"):
        prefill_attention(q, k, v, scale=torch.tensor(0.1))


def test_decode_argument_errors():
    q, k, v = _qkv(cap=8, d=96)
    lengths = torch.full((2, 2), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="decode_attention: head_dim 96 not supported, expected one of 16, 32"):
        decode_attention(q, k, v, lengths, scale=0.1)
    q, k, v = _qkv(cap=8)
    with pytest.raises(ValueError, match=r"q has 3 queries per sequence \(shape \(2, 4, 3, 64\)\), expected 1"):
        decode_attention(q.expand(2, 4, 3, 64), k, v, lengths, scale=0.1)
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \(B, Hkv\) = \(2, 2\)"):
        decode_attention(q, k, v, lengths.float(), scale=0.1)
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(B, 1, cap\) or \(B, Hkv, cap\)"):
        decode_attention(q, k, v, lengths, scale=0.1, bias=torch.zeros(2, 1, 7))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scores="h2o"), r"prefill_attention: scores got 'h2o', expected one of none, window_colsum, "
                             r"colsum, last_row"),
        (dict(scores="window_colsum", window=0), r"prefill_attention: window got 0, expected an int >= 1"),
        (dict(scores="window_colsum", window=2.5), r"window got 2.5, expected an int >= 1"),
    ],
)
def test_prefill_score_argument_errors(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        prefill_attention(q, k, v, scale=0.1, **kwargs)


def test_decode_return_probs_must_be_bool():
    q, k, v = _qkv(cap=8)
    lengths = torch.full((2, 2), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="decode_attention: return_probs got 'yes', expected True or False"):
        decode_attention(q, k, v, lengths, scale=0.1, return_probs="yes")


def test_empty_shapes_still_return_scores():
    q, k, v = _qkv(n=0)
    o, lse, s = prefill_attention(q, k, v, scale=0.1, scores="colsum")
    assert s.shape == (2, 4, 0) and o.shape == q.shape
    q, k, v = _qkv(cap=1)
    o, lse, probs = decode_attention(q, k[:, :, :0], v[:, :, :0], torch.zeros(2, 2, dtype=torch.int32),
                                     scale=0.1, return_probs=True)
    assert probs.shape == (2, 4, 0) and (lse == float("-inf")).all()
