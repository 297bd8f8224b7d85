"""Shared context: one long context compressed once, then several different questions asked of it.

Serving and chat reuse one compressed context for many questions (SCBench, arXiv 2412.10319;
kvpress's pipeline runs one context with many questions). A query-aware method (SnapKV scores
the prompt's tokens by the attention of its last window, which holds the question when the
question is part of the prompt) chooses what to keep for *that* question; asked another one it may
have dropped what that one needs. This task measures it, on RULER's multi-query NIAH setting:
``k`` needles ("One of the special magic numbers for {key} is: {value}.") in the essays, and one
question per key, in RULER's single-needle wording and answer prefix.

Two modes, each scored with RULER's string match per question:

``shared``  the context alone is prefilled (and compressed: the question is not in the window),
            then the question's tokens continue that compressed cache, then greedy generation.
``joint``   context and question are prefilled together (and compressed together), as in RULER.

[Note] kvfx cannot fork a compressed cache: a cache continued by one question cannot be handed to
a second continuation (kvfx refuses a cache continued from a point other than its end, and a
copy of its cache entries is refused as foreign). So ``shared`` prefills the same context again
for every question and continues it with that question as a separate, later step. Compression is
deterministic, so every question sees the cache a single compression of the context would give;
only the prefill time is paid ``k`` times. The token ids are the same in both modes (the context's
ids followed by the question's), so with the ``full`` policy the two modes give the same tokens.

Example::

    s = make_shared_context_sample(tok, 4096, seed=0, questions=4)
    r = evaluate_shared_context(model, tok, s, mode="shared", max_new_tokens=32)
    r["score"]       # mean over the 4 questions
"""

from __future__ import annotations

import contextlib
import inspect
import random
import time
from dataclasses import dataclass

import torch

from kvfx.eval.ruler import (
    NIAH_ANSWER,
    NIAH_CONTEXT,
    NIAH_QUERY,
    _essay_words,
    _niah_haystack,
    _singular,
    largest_fitting,
    ruler_score,
)

__all__ = ["MODES", "SharedContextSample", "evaluate_shared_context", "make_shared_context_sample"]

MODES = ("shared", "joint")
TOKENS_TO_GENERATE = 128  # RULER's NIAH budget, reserved when fitting the length


@dataclass(frozen=True, eq=False)
class SharedContextSample:
    """A context with ``k`` needles and one question per needle.

    Attributes:
        context: the prompt up to the question (RULER's plural NIAH instruction and the essays).
        context_ids: ``(1, n)`` LongTensor of the context (special tokens added).
        questions: ``k`` questions, each with RULER's answer prefix.
        question_ids: ``k`` ``(1, m_i)`` LongTensors (no special tokens).
        answers: ``k`` tuples of expected strings.
        length: requested length: context + longest question + 128 tokens fit in it.
        seed: the seed of the sample.
    """

    context: str
    context_ids: torch.Tensor
    questions: tuple[str, ...]
    question_ids: tuple[torch.Tensor, ...]
    answers: tuple[tuple[str, ...], ...]
    length: int
    seed: int

    @property
    def n_tokens(self) -> int:
        """Tokens of the context plus the longest question."""
        return int(self.context_ids.shape[1]) + max(int(q.shape[1]) for q in self.question_ids)


def make_shared_context_sample(tokenizer, length: int, seed: int, *, questions: int = 4) -> SharedContextSample:
    """``questions`` needles in the essays (RULER ``niah_multiquery``'s setting: word keys, 7-digit
    values, RULER's depths) and one question per needle, the context as long as fits ``length``
    with the longest question and 128 generated tokens. Same arguments, same sample.

    Raises:
        ValueError: ``questions < 1`` or ``length`` too small.
    """
    if questions < 1:
        raise ValueError(f"make_shared_context_sample questions: got {questions}, expected >= 1")
    p = dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
             num_needle_k=questions, num_needle_v=1, num_needle_q=questions)

    def build(n: int):
        rng = random.Random(f"shared-context/{questions}/{seed}")
        text, keys, values = _niah_haystack(p, rng, n)
        ctx = NIAH_CONTEXT.format(type_needle_v="numbers", context=text)
        qs = [_singular(NIAH_QUERY).format(type_needle_v="number", query=k)
              + _singular(NIAH_ANSWER).format(type_needle_v="number", query=k) for k in keys]
        return ctx, qs, [tuple(v) for v in values]

    def fits(n: int) -> bool:
        ctx, qs, _ = build(n)
        longest = max(len(tokenizer(q, add_special_tokens=False).input_ids) for q in qs)
        return len(tokenizer(ctx).input_ids) + longest + TOKENS_TO_GENERATE <= length

    n = largest_fitting(fits, 1, len(_essay_words()), f"make_shared_context_sample length: got {length}, too "
                        f"short for {questions} needles, their questions and {TOKENS_TO_GENERATE} tokens")
    ctx, qs, answers = build(n)
    return SharedContextSample(
        context=ctx, context_ids=tokenizer(ctx, return_tensors="pt").input_ids.long(),
        questions=tuple(qs),
        question_ids=tuple(tokenizer(q, add_special_tokens=False, return_tensors="pt").input_ids.long()
                           for q in qs),
        answers=tuple(answers), length=int(length), seed=int(seed))


def evaluate_shared_context(model, tokenizer, sample: SharedContextSample, *, mode: str,
                            max_new_tokens: int = 32) -> dict:
    """Ask every question of ``sample`` in ``mode`` (see the module docstring) with greedy
    decoding; returns ``{"score", "scores", "answers", "seconds", "cache"}`` (``cache``: the
    model's cache after the last question, for the memory report)."""
    if mode not in MODES:
        raise ValueError(f"evaluate_shared_context mode: got {mode!r}, expected one of {', '.join(MODES)}")
    inner = getattr(model, "_orig_mod", model)
    device = next(inner.parameters()).device
    params = inspect.signature(inner.forward).parameters
    kw = "cache" if "cache" in params else "past_key_values"
    first = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    ctx = sample.context_ids.to(device)
    scores, texts, cache = [], [], None
    t0 = time.perf_counter()
    for q, expected in zip(sample.question_ids, sample.answers):
        ids = torch.cat([ctx, q.to(device)], dim=1)
        gen_kw = {}
        if mode == "shared":
            from kvfx.eval.perplexity import _new_cache, _returned_cache

            cache = _new_cache(inner)
            with torch.no_grad():
                out = model(input_ids=ctx, use_cache=True, **{kw: cache}, **first)
            gen_kw[kw] = _returned_cache(out, cache)
        import kvfx

        # shared: the question is appended to the context compressed once (not a prompt chunk)
        with torch.no_grad(), (kvfx.appending() if mode == "shared" else contextlib.nullcontext()):
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, return_dict_in_generate=True, **gen_kw)
        text = tokenizer.decode(gen.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        cache = gen["cache"] if "cache" in gen else gen.get("past_key_values")
        texts.append(text.strip())
        scores.append(ruler_score(text, expected))
    return {"score": sum(scores) / len(scores), "scores": scores, "answers": texts,
            "seconds": time.perf_counter() - t0, "cache": cache}
