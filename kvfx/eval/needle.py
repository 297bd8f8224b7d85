"""Needle-in-a-haystack: one out-of-place sentence hidden in the Paul Graham essays.

Prompt (Kamradt's needle-in-a-haystack, with an answer prefix that turns the question into a
completion, as in Anthropic's "Claude 2.1 prompting" follow-up)::

    <INSTRUCTION>
    <essays ...>
    The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.
    <essays ...>
    <QUESTION_PREFIX> What is the best thing to do in San Francisco?
    <ANSWER_LEAD> The best thing to do in San Francisco is

The needle goes at ``depth`` of the filler's tokens, moved back to the previous sentence end; the
filler is cut so the tokenized prompt is within ``TOLERANCE`` of the requested length. ``seed``
picks the needle from :data:`NEEDLES` (``seed % len(NEEDLES)``; seed 0 is Kamradt's San Francisco
needle). Each needle has a short key fact that the question asks for and that no prior knowledge
supplies; :func:`score_needle` looks for it in the answer.

Measured on SmolLM2-135M-Instruct, full cache (not compiled), fp32 sdpa, greedy, 24 new tokens,
2048 tokens, ``template="plain"`` (the default):

=====  =========  ========
depth  seeds      correct
=====  =========  ========
0.1    0, 2       2/2
0.3    0, 2       2/2
0.5    0 ... 4    5/5 (every needle)
0.7    0, 2       2/2
0.9    0, 2       2/2
=====  =========  ========

13/13 in all; ``template="chat"`` at depth 0.5, seed 0: 1/1. Through kvfx (depth 0.5, seed 0):
``full`` answers right, ``snapkv@0.125`` answers " eat a sandwich and watch the internet." (wrong),
so the task separates policies at 2k already. The answer lead matters more than
the instruction: the model copies the rest of the needle sentence, sometimes paraphrased
("eating a sandwich and sitting in Dolores Park"), which is why each key fact is a short proper
phrase ("Dolores Park") rather than the whole clause. After the key fact the model often repeats
the lead or drifts into essay text; that does not affect the score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kvfx.eval.text import filler_text

__all__ = [
    "INSTRUCTION",
    "NEEDLES",
    "TEMPLATES",
    "TOLERANCE",
    "Needle",
    "NeedleResult",
    "NeedleSample",
    "evaluate_needle",
    "make_needle_sample",
    "score_needle",
]

INSTRUCTION = (
    "Below is a collection of essays. One sentence in it does not belong to the essays. "
    "Read carefully: afterwards you will be asked about that sentence."
)
TEMPLATES = ("plain", "chat")
TOLERANCE = 0.02  # relative; the tokenized prompt length must be within this of length_tokens


@dataclass(frozen=True)
class Needle:
    """One needle: the sentence to hide, the question about it, and the key fact to find.

    ``lead`` starts the answer (the prompt ends with it), so the model only has to copy the rest
    of the sentence; ``key`` is a short part of that rest, checked by :func:`score_needle`.
    """

    sentence: str
    question: str
    lead: str
    key: str


NEEDLES: tuple[Needle, ...] = (
    Needle(
        "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
        "What is the best thing to do in San Francisco?",
        "The best thing to do in San Francisco is",
        "Dolores Park",
    ),
    Needle(
        "The secret ingredient in Grandma Rosa's pancakes is a spoonful of orange marmalade.",
        "What is the secret ingredient in Grandma Rosa's pancakes?",
        "The secret ingredient in Grandma Rosa's pancakes is",
        "orange marmalade",
    ),
    Needle(
        "The name of the lighthouse keeper's cat is Admiral Whiskers.",
        "What is the name of the lighthouse keeper's cat?",
        "The name of the lighthouse keeper's cat is",
        "Admiral Whiskers",
    ),
    Needle(
        "The password to the old library door is purple elephant.",
        "What is the password to the old library door?",
        "The password to the old library door is",
        "purple elephant",
    ),
    Needle(
        "The pirate treasure of Tern Island is buried under the crooked lemon tree.",
        "Where is the pirate treasure of Tern Island buried?",
        "The pirate treasure of Tern Island is buried under the",
        "lemon tree",
    ),
)

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, eq=False)
class NeedleSample:
    """One needle-in-a-haystack prompt.

    Attributes:
        prompt: the full prompt text (chat template applied for ``template="chat"``).
        input_ids: ``(1, n)`` LongTensor, the tokenized prompt (special tokens included).
        needle: the hidden sentence.
        question: the question asked at the end.
        answer: the key fact that a right answer contains (see :func:`score_needle`).
        depth: requested needle depth in [0, 1] (fraction of the filler before the needle).
        length: requested length in tokens (``n`` is within ``TOLERANCE`` of it).
        needle_start: token index of the needle's first token in ``input_ids``.
        needle_end: token index one past the needle's last token.
        seed: the seed; it picks ``NEEDLES[seed % len(NEEDLES)]``.
        template: ``"plain"`` or ``"chat"``.
    """

    prompt: str
    input_ids: torch.Tensor
    needle: str
    question: str
    answer: str
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


def score_needle(text: str, sample: NeedleSample | str) -> bool:
    """True when the key fact appears in ``text``, ignoring case and runs of whitespace.

    ``sample`` is a :class:`NeedleSample` or the key fact itself.

    >>> score_needle(" eat a sandwich and sit in  DOLORES\\npark.", "Dolores Park")
    True
    >>> score_needle(" sit in the park.", "Dolores Park"), score_needle("", "Dolores Park")
    (False, False)
    """
    key = sample if isinstance(sample, str) else sample.answer
    norm_key = _normalize(key)
    return bool(norm_key) and norm_key in _normalize(text or "")


def make_needle_sample(
    tokenizer,
    length_tokens: int,
    depth: float,
    seed: int,
    *,
    template: str = "plain",
    source: str = "essays",
) -> NeedleSample:
    """Build a needle prompt of about ``length_tokens`` tokens with the needle at ``depth``.

    Args:
        tokenizer: a Hugging Face tokenizer (fast tokenizers give exact needle positions).
        length_tokens: target prompt length in tokens; the result is within ``TOLERANCE``.
        depth: where the needle goes, as a fraction of the filler in [0, 1].
        seed: picks the needle, ``NEEDLES[seed % len(NEEDLES)]``; same arguments, same sample.
        template: ``"plain"`` (completion prompt) or ``"chat"`` (tokenizer's chat template).
        source: filler text source, see :func:`kvfx.eval.text.filler_text`.

    Returns:
        A :class:`NeedleSample`; ``input_ids`` is ``(1, n)``.

    Example::

        s = make_needle_sample(tok, 2048, depth=0.5, seed=0)
        new, _ = greedy_generate(model, s.input_ids, max_new_tokens=24)
        score_needle(tok.decode(new[0]), s)
    """
    if template not in TEMPLATES:
        raise ValueError(
            f"make_needle_sample template: got {template!r}, expected one of {', '.join(TEMPLATES)}"
        )
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"make_needle_sample depth: got {depth}, expected a fraction in [0, 1]")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "make_needle_sample template: got 'chat', but the tokenizer has no chat_template; use 'plain'"
        )
    needle = NEEDLES[seed % len(NEEDLES)]
    text = filler_text(source)
    overhead = _n_tokens(tokenizer, _render(tokenizer, template, needle, "", ""), template)
    if length_tokens < overhead + 16:
        raise ValueError(
            f"make_needle_sample length_tokens: got {length_tokens}, expected >= {overhead + 16} "
            f"(the prompt without filler is {overhead} tokens)"
        )
    offsets = _filler_offsets(tokenizer, text, length_tokens)
    k = min(length_tokens - overhead, len(offsets))
    best = None
    for _ in range(8):  # joins re-tokenize a little differently: correct k until the length fits
        prompt = _assemble(tokenizer, template, text, offsets, k, depth, needle)
        n = _n_tokens(tokenizer, prompt, template)
        if best is None or abs(n - length_tokens) < abs(best[1] - length_tokens):
            best = (prompt, n)
        if n == length_tokens or (n > length_tokens and k == 0):
            break
        k = max(0, min(len(offsets), k + (length_tokens - n)))
    prompt, n = best
    if abs(n - length_tokens) > max(1, int(TOLERANCE * length_tokens)):
        raise ValueError(
            f"make_needle_sample length_tokens: could only reach {n} tokens for {length_tokens} "
            f"(filler source {source!r} too short?)"
        )
    enc = tokenizer(prompt, add_special_tokens=template == "plain", return_tensors="pt")
    start = prompt.index(needle.sentence)
    end = start + len(needle.sentence)
    needle_start, needle_end = _token_span(tokenizer, enc, prompt, template, start, end)
    return NeedleSample(
        prompt=prompt, input_ids=enc.input_ids.long(), needle=needle.sentence, question=needle.question,
        answer=needle.key, depth=float(depth), length=int(length_tokens), needle_start=needle_start,
        needle_end=needle_end, seed=int(seed), template=template,
    )


@dataclass(frozen=True)
class NeedleResult:
    """Outcome of one sample: the answer text, whether it is right, and the generate() time."""

    length: int
    n_tokens: int
    depth: float
    seed: int
    answer: str
    correct: bool
    seconds: float


def evaluate_needle(model, tokenizer, sample: NeedleSample, *, max_new_tokens: int = 24) -> NeedleResult:
    """Greedy-decode ``sample`` with ``model`` (on its device) and score the answer."""
    from kvfx.eval.generate import greedy_generate

    device = next(model.parameters()).device
    new, seconds = greedy_generate(model, sample.input_ids.to(device), max_new_tokens)
    answer = tokenizer.decode(new[0], skip_special_tokens=True)
    return NeedleResult(
        length=sample.length, n_tokens=sample.n_tokens, depth=sample.depth, seed=sample.seed,
        answer=answer, correct=score_needle(answer, sample), seconds=seconds,
    )


# --------------------------------------------------------------------------------------------- internals


def _normalize(s: str) -> str:
    return _SPACE.sub(" ", s).strip().casefold()


def _render(tokenizer, template: str, needle: Needle, before: str, after: str) -> str:
    body = "\n".join(p for p in (INSTRUCTION, before, needle.sentence, after) if p)
    body = f"{body}\n\n{needle.question}"
    if template == "plain":
        return f"{body}\n{needle.lead}"
    messages = [{"role": "user", "content": body}]
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{head}{needle.lead}"


def _n_tokens(tokenizer, text: str, template: str) -> int:
    # Plain prompts get the tokenizer's own specials (BOS for Llama-style); chat templates carry theirs.
    return len(tokenizer(text, add_special_tokens=template == "plain").input_ids)


def _filler_offsets(tokenizer, text: str, length_tokens: int) -> list[tuple[int, int]]:
    """Character spans of the first >= length_tokens tokens of the filler."""
    chars = 8 * length_tokens + 1024
    while True:
        chunk = text[:chars]
        try:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, KeyError):  # slow tokenizer: approximate by words
            offsets = [m.span() for m in re.finditer(r"\S+\s*", chunk)]
        if len(offsets) >= length_tokens or chars >= len(text):
            return offsets
        chars *= 2


def _assemble(tokenizer, template, text, offsets, k: int, depth: float, needle: Needle) -> str:
    end = offsets[k - 1][1] if k > 0 else 0
    at = offsets[min(int(depth * k), k - 1)][0] if k > 0 else 0
    # Move back to the previous sentence end so the needle does not split a sentence.
    cut = text.rfind(".", 0, at + 1) + 1 if depth > 0.0 else 0
    if depth >= 1.0:
        cut = end
    return _render(tokenizer, template, needle, text[:cut].strip(), text[cut:end].strip())


def _token_span(tokenizer, enc, prompt: str, template: str, start: int, end: int) -> tuple[int, int]:
    try:
        first, last = enc.char_to_token(0, start), enc.char_to_token(0, end - 1)
        if first is not None and last is not None:
            return int(first), int(last) + 1
    except (ValueError, NotImplementedError):
        pass
    add = template == "plain"
    return (len(tokenizer(prompt[:start], add_special_tokens=add).input_ids),
            len(tokenizer(prompt[:end], add_special_tokens=add).input_ids))
