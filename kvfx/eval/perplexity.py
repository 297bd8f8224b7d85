"""Perplexity under compression: teacher-forced loss with the KV cache compressed as in generation.

One forward over ``input_ids[:, :prefix]`` fills the cache (this is where a kvfx policy
compresses, as it does on a prompt); the remaining tokens are then fed ``chunk`` at a time through
the same cache, and the negative log-likelihood of every token after the prefix is summed. With
``chunk=1`` each scored token sees exactly the cache a generation step would see. A model that is
not compiled with kvfx gives the ordinary perplexity of ``input_ids[:, prefix:]`` given the prefix.

Report Δ perplexity against the full cache on the same ids, in the same run (these machines are
noisy): ``ppl(policy) - ppl("full")``. Measured on SmolLM2-135M-Instruct (fp32, CPU) with
``long_text_ids(tok, 1024)``, ``prefix=512, chunk=8``: 27.548 not compiled, 27.548 with kvfx
``full`` (same NLL sum), 30.614 with ``snapkv@0.125`` (held / dense ≈ 0.17).

Example::

    model, tok = load_model("smollm2-135m")
    ids = long_text_ids(tok, 2048)
    model.compile(backend="kvfx", options={"policy": "snapkv", "inner": "eager"})
    perplexity_under_compression(model, ids, prefix=1024)["ppl"]
"""

from __future__ import annotations

import inspect
import math
import time

import torch
import torch.nn.functional as F

from kvfx.eval.text import TEXT_SOURCES, filler_text, tokenize_prefix
from kvfx.runtime.lifecycle import appending

__all__ = ["long_text_ids", "perplexity_under_compression"]


def perplexity_under_compression(model, input_ids: torch.Tensor, *, prefix: int, chunk: int = 1,
                                  keep_cache: bool = False) -> dict:
    """Teacher-forced NLL of ``input_ids[:, prefix:]`` with the cache built (and compressed) on the prefix.

    Args:
        model: a Hugging Face causal LM, compiled with kvfx or not (``torch.compile`` wrappers and
            ``model.compile`` both work). Run under ``torch.no_grad()`` here.
        input_ids: ``(1, N)`` token ids.
        prefix: tokens in the single first forward, ``1 <= prefix < N``. The logits of its last
            position score token ``prefix``; every later token is scored from the cache.
        chunk: tokens per teacher-forced step after the prefix (``1`` = decode-like).
        keep_cache: also return the model's cache (``"cache"``) at the end of the run: kvfx's
            compressed state lives as long as that cache object, so ``kvfx.memory(r["cache"])``
            measures it; without it the state is freed when the run returns.

    Returns:
        ``{"nll_sum", "tokens", "ppl", "seconds"}`` (and ``"cache"`` with ``keep_cache``): summed
        NLL in nats over ``tokens = N - prefix`` scored tokens, ``ppl = exp(nll_sum / tokens)``,
        and the wall time of all forwards (synchronized on CUDA).

    Raises:
        ValueError: bad ``input_ids`` shape, ``prefix`` or ``chunk`` (the message names the value).

    Example::

        r = perplexity_under_compression(model, ids, prefix=1024, chunk=1)
        r["ppl"], r["tokens"]   # tokens == ids.shape[1] - 1024
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"perplexity_under_compression input_ids: got shape {tuple(input_ids.shape)}, expected (1, N)"
        )
    n = int(input_ids.shape[1])
    if not 1 <= prefix < n:
        raise ValueError(
            f"perplexity_under_compression prefix: got {prefix}, expected 1 <= prefix < N = {n}"
        )
    if chunk < 1:
        raise ValueError(f"perplexity_under_compression chunk: got {chunk}, expected >= 1")
    inner = getattr(model, "_orig_mod", model)
    params = inspect.signature(inner.forward).parameters
    kw = "cache" if "cache" in params else "past_key_values"
    first_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    ids = input_ids.to(next(inner.parameters()).device).long()
    cache = _new_cache(inner)

    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize(ids.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefix], use_cache=True, **{kw: cache}, **first_kwargs)
        cache = _returned_cache(out, cache)
        nll = F.cross_entropy(out.logits[0, -1:].float(), ids[0, prefix : prefix + 1], reduction="sum")
        nll = nll.double()
        # Feed tokens prefix .. N-2; the logits of token i score token i + 1 (token N-1 is never fed).
        # The continuation is appended as generated tokens are (kvfx.appending): a step of chunk > 1
        # tokens before any one-token step would otherwise count as a prompt chunk and be compressed
        # with the prompt (chunked prefill), which is not what a generation step sees.
        with appending():
            for i in range(prefix, n - 1, chunk):
                j = min(i + chunk, n - 1)
                out = model(input_ids=ids[:, i:j], use_cache=True, **{kw: cache})
                cache = _returned_cache(out, cache)
                logits = out.logits[0, -(j - i) :].float()
                nll = nll + F.cross_entropy(logits, ids[0, i + 1 : j + 1], reduction="sum").double()
        nll_sum = float(nll)
    if cuda:
        torch.cuda.synchronize(ids.device)
    seconds = time.perf_counter() - t0
    tokens = n - prefix
    r = {"nll_sum": nll_sum, "tokens": tokens, "ppl": math.exp(nll_sum / tokens), "seconds": seconds}
    if keep_cache:
        r["cache"] = cache
    return r


def long_text_ids(tokenizer, n_tokens: int, source: str = "essays", *, start: int = 0) -> torch.Tensor:
    """The first ``n_tokens`` tokens of a long deterministic text, as ``(1, n_tokens)`` LongTensor.

    Args:
        tokenizer: a Hugging Face tokenizer; its own special tokens are added (BOS for Llama-style
            tokenizers; SmolLM2 adds none).
        n_tokens: how many tokens, ``>= 1``.
        source: ``"essays"`` (Paul Graham, ~154k tokens), ``"pydoc"`` (~113k tokens, no install),
            ``"grass"`` or ``"auto"``; see :func:`kvfx.eval.text.filler_text`.
        start: character offset in the text where tokenizing begins (``0``: its beginning; the
            agreement task starts other samples at paragraph boundaries).

    Raises:
        ValueError: ``n_tokens < 1``, or the source has fewer tokens than asked for.
        kvfx.eval.text.TextSourceError: unknown source, or the essays are not installed.

    Example::

        ids = long_text_ids(tok, 4096)            # essays
        ids = long_text_ids(tok, 4096, "pydoc")
    """
    if n_tokens < 1:
        raise ValueError(f"long_text_ids n_tokens: got {n_tokens}, expected >= 1")
    text = filler_text(source)
    if not 0 <= start < len(text):
        raise ValueError(f"long_text_ids start: got {start}, expected 0 <= start < {len(text)} "
                         f"(the length of source {source!r} in characters)")
    text = text[start:] if start else text
    ids = tokenize_prefix(tokenizer, text, n_tokens, add_special_tokens=True)
    if len(ids) < n_tokens:
        raise ValueError(
            f"long_text_ids n_tokens: got {n_tokens}, but source {source!r} has only {len(ids)} tokens"
            f"{f' after character {start}' if start else ''}; "
            f"use fewer tokens or another source ({', '.join(TEXT_SOURCES)})"
        )
    return torch.tensor([ids[:n_tokens]], dtype=torch.long)


# --------------------------------------------------------------------------------------------- internals


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _returned_cache(out, cache):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return cache
