"""Passkey retrieval: a 5-digit number hidden at a depth in filler text; the model must repeat it.

Prompt (Mohtashami & Jaggi 2023, "Landmark Attention"; LongLoRA's ``passkey_retrivial.py``)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key is 71432. Remember it. 71432 is the pass key.
    The grass is green. ...
    What is the pass key? The pass key is

The needle goes at ``depth`` of the filler's tokens, moved back to the previous sentence end (as
in Kamradt's needle-in-a-haystack). The filler is cut so the whole tokenized prompt is within
``TOLERANCE`` of the requested length (in practice within a token or two).

Measured on SmolLM2-135M-Instruct, full cache, fp32 sdpa, greedy, 8 new tokens, depths
0.1/0.3/0.5/0.7/0.9 at 2k and 4k tokens:

- ``template="plain"``, ``source="grass"`` (the defaults): 10/10 for seeds 0 and 1; 8k: 1/1.
- ``template="chat"`` (chat template, answer prefix in the assistant turn), grass: 7/10.
- plain with the Paul Graham essays as filler: 5/5 at 2k but 0/5 at 4k (the model answers
  "the pass key."), so passkey uses the literature's grass filler; the essays are the
  needle-in-a-haystack filler.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch

from kvfx.eval.text import filler_text

__all__ = [
    "ANSWER_PREFIX",
    "INSTRUCTION",
    "NEEDLE",
    "QUESTION",
    "TEMPLATES",
    "TOLERANCE",
    "PasskeyResult",
    "PasskeySample",
    "evaluate_passkey",
    "make_passkey_sample",
    "passkey_sweep",
    "score_passkey",
]

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
NEEDLE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
TEMPLATES = ("plain", "chat")
TOLERANCE = 0.02  # relative; the tokenized prompt length must be within this of length_tokens

_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True, eq=False)
class PasskeySample:
    """One passkey prompt.

    Attributes:
        prompt: the full prompt text (chat template applied for ``template="chat"``).
        input_ids: ``(1, n)`` LongTensor, the tokenized prompt (special tokens included).
        passkey: the 5-digit answer, as a string.
        depth: requested needle depth in [0, 1] (fraction of the filler before the needle).
        length: requested length in tokens (``n`` is within ``TOLERANCE`` of it).
        needle_start: token index of the needle's first token in ``input_ids``.
        needle_end: token index one past the needle's last token.
        seed: the seed that drew the passkey.
        template: ``"plain"`` or ``"chat"``.
    """

    prompt: str
    input_ids: torch.Tensor
    passkey: str
    depth: float
    length: int
    needle_start: int
    needle_end: int
    seed: int
    template: str

    @property
    def n_tokens(self) -> int:
        """Actual prompt length in tokens (``input_ids.shape[1]``)."""
        return int(self.input_ids.shape[1])


def score_passkey(generated_text: str, passkey: str) -> bool:
    """True when the first run of digits in ``generated_text`` equals ``passkey`` exactly.

    >>> score_passkey(" 71432. Remember it.", "71432")
    True
    >>> score_passkey(" 7143", "71432"), score_passkey("", "71432"), score_passkey("714321", "71432")
    (False, False, False)
    """
    m = _DIGITS.search(generated_text or "")
    return m is not None and m.group(0) == passkey


def make_passkey_sample(
    tokenizer,
    length_tokens: int,
    depth: float,
    seed: int,
    *,
    template: str = "plain",
    source: str = "grass",
    key_seed: int | str | None = None,
) -> PasskeySample:
    """Build a passkey prompt of about ``length_tokens`` tokens with the needle at ``depth``.

    Args:
        tokenizer: a Hugging Face tokenizer (fast tokenizers give exact needle positions).
        length_tokens: target prompt length in tokens; the result is within ``TOLERANCE``.
        depth: where the needle goes, as a fraction of the filler in [0, 1].
        seed: ``random.Random(seed)`` draws the 5-digit passkey; same arguments, same sample.
        template: ``"plain"`` (completion prompt) or ``"chat"`` (tokenizer's chat template).
        source: filler text source, see :func:`kvfx.eval.text.filler_text`.
        key_seed: seeds the passkey draw instead of ``seed`` (``kvfx eval`` passes one per
            (seed, length, depth) cell, so that depths are independent samples).

    Returns:
        A :class:`PasskeySample`; ``input_ids`` is ``(1, n)``.

    Example::

        s = make_passkey_sample(tok, 2048, depth=0.5, seed=0)
        new, _ = greedy_generate(model, s.input_ids, max_new_tokens=8)
        score_passkey(tok.decode(new[0]), s.passkey)
    """
    if template not in TEMPLATES:
        raise ValueError(
            f"make_passkey_sample template: got {template!r}, expected one of {', '.join(TEMPLATES)}"
        )
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"make_passkey_sample depth: got {depth}, expected a fraction in [0, 1]")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "make_passkey_sample template: got 'chat', but the tokenizer has no chat_template; use 'plain'"
        )
    passkey = str(random.Random(seed if key_seed is None else key_seed).randint(10000, 99999))
    needle = NEEDLE.format(passkey=passkey)

    overhead = _n_tokens(tokenizer, _render(tokenizer, template, "", needle, ""), template)
    if length_tokens < overhead + 16:
        raise ValueError(
            f"make_passkey_sample length_tokens: got {length_tokens}, expected >= {overhead + 16} "
            f"(the prompt without filler is {overhead} tokens)"
        )
    offsets = _filler_offsets(tokenizer, source, length_tokens)
    k = min(length_tokens - overhead, len(offsets))
    tol = max(1, int(TOLERANCE * length_tokens))
    best = None
    for _ in range(8):  # joins re-tokenize a little differently: correct k until the length fits
        prompt = _assemble(tokenizer, template, source, offsets, k, depth, needle)
        n = _n_tokens(tokenizer, prompt, template)
        if best is None or abs(n - length_tokens) < abs(best[1] - length_tokens):
            best = (prompt, n)
        if n == length_tokens or (n > length_tokens and k == 0):
            break
        k = max(0, min(len(offsets), k + (length_tokens - n)))
    prompt, n = best
    if abs(n - length_tokens) > tol:
        raise ValueError(
            f"make_passkey_sample length_tokens: could only reach {n} tokens for {length_tokens} "
            f"(filler source {source!r} too short?)"
        )
    enc = tokenizer(prompt, add_special_tokens=template == "plain", return_tensors="pt")
    input_ids = enc.input_ids.long()
    start_char = prompt.index(needle)
    end_char = start_char + len(needle)
    needle_start, needle_end = _token_span(tokenizer, enc, prompt, template, start_char, end_char)
    return PasskeySample(
        prompt=prompt,
        input_ids=input_ids,
        passkey=passkey,
        depth=float(depth),
        length=int(length_tokens),
        needle_start=needle_start,
        needle_end=needle_end,
        seed=int(seed),
        template=template,
    )


@dataclass(frozen=True)
class PasskeyResult:
    """Outcome of one sample: the answer text, whether it is right, and the generate() time."""

    length: int
    n_tokens: int
    depth: float
    seed: int
    passkey: str
    answer: str
    correct: bool
    seconds: float


def evaluate_passkey(model, tokenizer, sample: PasskeySample, *, max_new_tokens: int = 8) -> PasskeyResult:
    """Greedy-decode ``sample`` with ``model`` (on its device) and score the answer."""
    from kvfx.eval.generate import greedy_generate

    device = next(model.parameters()).device
    new, seconds = greedy_generate(model, sample.input_ids.to(device), max_new_tokens)
    answer = tokenizer.decode(new[0], skip_special_tokens=True)
    return PasskeyResult(
        length=sample.length,
        n_tokens=sample.n_tokens,
        depth=sample.depth,
        seed=sample.seed,
        passkey=sample.passkey,
        answer=answer,
        correct=score_passkey(answer, sample.passkey),
        seconds=seconds,
    )


def passkey_sweep(
    model,
    tokenizer,
    lengths=(1024, 2048, 4096, 8192),
    depths=(0.1, 0.3, 0.5, 0.7, 0.9),
    seeds=(0,),
    *,
    template: str = "plain",
    source: str = "grass",
    max_new_tokens: int = 8,
    progress: bool = True,
) -> list[PasskeyResult]:
    """Run :func:`evaluate_passkey` over lengths x depths x seeds; one result per sample.

    Example::

        rs = passkey_sweep(model, tok, lengths=(2048,), depths=(0.1, 0.5, 0.9))
        accuracy = sum(r.correct for r in rs) / len(rs)
    """
    grid = [(n, d, s) for n in lengths for d in depths for s in seeds]
    results = []
    t0 = time.perf_counter()
    for i, (n, d, s) in enumerate(grid):
        sample = make_passkey_sample(tokenizer, n, d, s, template=template, source=source)
        r = evaluate_passkey(model, tokenizer, sample, max_new_tokens=max_new_tokens)
        results.append(r)
        if progress:
            mark = "ok " if r.correct else "BAD"
            print(
                f"[{i + 1}/{len(grid)}] {mark} len={r.n_tokens} depth={d:.2f} seed={s} "
                f"key={r.passkey} answer={r.answer!r} {r.seconds:.1f}s "
                f"(total {time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    return results


# --------------------------------------------------------------------------------------------- internals


def _render(tokenizer, template: str, before: str, needle: str, after: str) -> str:
    body = "\n".join(p for p in (INSTRUCTION, before, needle, after, QUESTION) if p)
    if template == "plain":
        return f"{body} {ANSWER_PREFIX}"
    messages = [{"role": "user", "content": body}]
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{head}{ANSWER_PREFIX}"


def _n_tokens(tokenizer, text: str, template: str) -> int:
    # Plain prompts get the tokenizer's own specials (BOS for Llama-style); chat templates carry theirs.
    return len(tokenizer(text, add_special_tokens=template == "plain").input_ids)


def _filler_offsets(tokenizer, source: str, length_tokens: int) -> list[tuple[int, int]]:
    """Character spans of the first >= length_tokens tokens of the filler."""
    text = filler_text(source)
    chars = 8 * length_tokens + 1024
    while True:
        chunk = text[:chars]
        offsets = _offsets(tokenizer, chunk)
        if len(offsets) >= length_tokens or chars >= len(text):
            return offsets
        chars *= 2


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, KeyError):  # slow tokenizer: approximate by words
        spans = [m.span() for m in re.finditer(r"\S+\s*", text)]
        return spans


def _assemble(tokenizer, template, source, offsets, k: int, depth: float, needle: str) -> str:
    text = filler_text(source)
    end = offsets[k - 1][1] if k > 0 else 0
    at = offsets[min(int(depth * k), k - 1)][0] if 0 < k and depth < 1.0 else end
    # Move back to the previous sentence end so the needle does not split a sentence.
    cut = text.rfind(".", 0, at + 1)
    cut = cut + 1 if cut >= 0 and depth > 0.0 else 0
    if depth >= 1.0:
        cut = end
    before = text[:cut].strip()
    after = text[cut:end].strip()
    return _render(tokenizer, template, before, needle, after)


def _token_span(tokenizer, enc, prompt: str, template: str, start: int, end: int) -> tuple[int, int]:
    try:
        first = enc.char_to_token(0, start)
        last = enc.char_to_token(0, end - 1)
        if first is not None and last is not None:
            return int(first), int(last) + 1
    except (ValueError, NotImplementedError):
        pass
    add = template == "plain"
    first = len(tokenizer(prompt[:start], add_special_tokens=add).input_ids)
    last = len(tokenizer(prompt[:end], add_special_tokens=add).input_ids)
    return first, last
