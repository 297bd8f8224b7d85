"""DESIGN rule 7 on a real model (SmolLM2-135M, offline from its pip package), at a small size:
two models, interleaved sequences (equal and unequal lengths), beams, a foreign prefix, multi-turn
continuation, memory freed after generate and after del, seven policies in one process, padded
kivi2 rows, and an unrelated compiled function that still falls back after kvfx ran. The cases that
compile many models run on SmolLM2's first 6 layers (``smol6``); the others on all 30."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

import kvfx
from kvfx.runtime.state import KvfxStateError, sessions, site_stores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from kvfx.models import load_model

    model, tok = load_model("smollm2-135m", progress=False)
    return model, tok


@pytest.fixture(scope="module")
def smol6(smol):
    """SmolLM2's first 6 of 30 layers (its weights and tokenizer): the cases below that compile
    many models only need real weights, and dynamo traces 6 layers 5x faster (CI time)."""
    model, tok = smol
    short = copy.deepcopy(model)
    short.model.layers = short.model.layers[:6]
    short.config.num_hidden_layers = 6
    if getattr(short.config, "layer_types", None):
        short.config.layer_types = short.config.layer_types[:6]
    return short, tok


def _prompt(tok, n, seed):
    from kvfx.eval.perplexity import long_text_ids

    ids = long_text_ids(tok, n + 64 * seed, "essays")[:, 64 * seed:64 * seed + n]
    return ids


def _gen(model, ids, steps=6, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=kw.pop("attention_mask", torch.ones_like(ids)),
                              max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              return_dict_in_generate=True, **kw)


def _compiled(model, policy):
    return kvfx.compile(copy.deepcopy(model), policy, inner="eager")


def test_two_models_and_interleaved_sequences(smol6):
    model, tok = smol6
    a, b = _prompt(tok, 120, 1), _prompt(tok, 120, 2)  # equal lengths: the silent case
    c = _prompt(tok, 90, 3)
    m1 = _compiled(model, "snapkv@0.25")
    alone = {k: _gen(m1, x).sequences for k, x in (("a", a), ("b", b), ("c", c))}
    assert len({tuple(alone[k][0, -6:].tolist()) for k in "abc"}) == 3  # not degenerate: a mix-up shows
    # a second model of the same class, equal options, other weights
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.01)
    ref_other = _gen(other, b).sequences  # what the model does (uncompressed, uncompiled)
    m2 = _compiled(other, "snapkv@0.25")
    out2 = _gen(m2, b).sequences
    assert torch.equal(_gen(m1, a).sequences, alone["a"])
    assert torch.equal(_gen(m2, b).sequences, out2)
    assert out2.shape == ref_other.shape
    # interleaving on one compiled model: prefill a, prefill b, prefill c, then decode alternately
    kw = "past_key_values"
    caches = {k: DynamicCache(config=model.config) for k in "abc"}
    toks = {}
    with torch.no_grad():
        for k, x in (("a", a), ("b", b), ("c", c)):
            toks[k] = [m1(input_ids=x, use_cache=True, **{kw: caches[k]}).logits[:, -1].argmax(-1)]
        for _ in range(5):
            for k in "abc":
                nxt = m1(input_ids=toks[k][-1][:, None], use_cache=True, **{kw: caches[k]})
                toks[k].append(nxt.logits[:, -1].argmax(-1))
    for k in "abc":
        assert torch.equal(torch.stack(toks[k], 1), alone[k][:, -6:]), k


def test_beams_foreign_prefix_and_multi_turn(smol6):
    model, tok = smol6
    ids = _prompt(tok, 60, 4)
    comp = _compiled(model, "full")
    with pytest.raises(Exception, match="beam search"):
        with torch.no_grad():
            comp.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2, max_new_tokens=3)
    with torch.no_grad():
        prefix = model(input_ids=ids, use_cache=True).past_key_values  # uncompiled run
    with pytest.raises(Exception, match="not made by this kvfx model") as e:
        _gen(comp, torch.cat([ids, ids[:, :1]], 1), past_key_values=prefix)
    assert isinstance(e.value, KvfxStateError) or isinstance(e.value.__cause__, KvfxStateError)
    # multi-turn: continue the cache a kvfx generate returned, exactly as the model continues its own
    outs = {}
    for name, m in (("eager", model), ("kvfx", comp)):
        first = _gen(m, ids)
        turn2 = torch.cat([first.sequences, _prompt(tok, 20, 5)], 1)
        outs[name] = _gen(m, turn2, past_key_values=first.past_key_values).sequences
    assert torch.equal(outs["kvfx"], outs["eager"])


def test_memory_freed_after_generate_and_del(smol):
    model, tok = smol
    ids = _prompt(tok, 200, 6)
    comp = _compiled(model, "snapkv@0.25")
    out = _gen(comp, ids)
    held = kvfx.memory(out.past_key_values)
    assert 0 < held["store_bytes"] < held["dense_bytes"]  # (short prompt: decode headroom counts)
    for site in held["sites"].values():  # round(0.25 * 200) prompt tokens + 5 decoded, of 205 seen
        assert (site["tokens_held"], site["tokens_seen"]) == (55, 205), site
    refs = [weakref.ref(st.k) for st in site_stores(out.past_key_values).values()]
    assert len(refs) == 30
    del out
    gc.collect()
    assert all(r() is None for r in refs) and kvfx.memory()["sequences"] == 0
    _gen(comp, ids)  # the cache is dropped by generate
    assert kvfx.memory()["store_bytes"] == 0
    wm = weakref.ref(comp)
    del comp
    gc.collect()
    assert wm() is None and not sessions()


def test_seven_policies_in_one_process(smol6):
    model, tok = smol6
    ids = _prompt(tok, 160, 7)
    policies = ["full", "snapkv@0.25", "h2o@0.25", "streaming@0.5", "kivi4", "kivi2", "tova@0.25"]
    models = {p: _compiled(model, p) for p in policies}
    first = {p: _gen(m, ids, 3).sequences for p, m in models.items()}
    for p in reversed(policies):
        out = _gen(models[p], ids, 3)
        assert torch.equal(out.sequences, first[p]), p
        assert all(s.rewritten for s in kvfx.sites(models[p])), kvfx.explain(models[p])
    assert torch.equal(first["full"], _gen(model, ids, 3).sequences)


def test_padded_kivi2_rows_are_independent(smol):
    model, tok = smol
    comp = _compiled(model, "kivi2")
    # the long row crosses the 128-token residual at prefill, the short one only when alone
    long_, short = _prompt(tok, 150, 8), _prompt(tok, 60, 9)
    ids = torch.zeros(2, 150, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = long_[0], 1
    ids[1, 90:], mask[1, 90:] = short[0], 1
    batch = _gen(comp, ids, 16, attention_mask=mask).sequences
    for row, x in ((0, long_), (1, short)):
        alone = _gen(comp, x, 16).sequences
        assert torch.equal(batch[row, -16:], alone[0, -16:]), row


def test_unrelated_compiled_function_still_falls_back(smol):
    model, tok = smol
    before = torch._dynamo.config.get_config_copy()
    comp = _compiled(model, "full")
    _gen(comp, _prompt(tok, 40, 10), 2)
    assert torch._dynamo.config.get_config_copy() == before
    f = torch.compile(lambda x: x + 1, backend="eager", dynamic=False)
    for n in range(1, torch._dynamo.config.recompile_limit + 3):
        assert torch.equal(f(torch.zeros(n)), torch.ones(n))


@pytest.mark.parametrize("policy", ["expected-attention@0.25", "adakv-snapkv@0.25"])
def test_interleaved_sequences_newer_stores(smol6, policy):
    """Interleaved sequences on one compiled model give each sequence its tokens alone, for the
    scorer that reads the queries' RoPE (Expected Attention) and the head-wise ragged store (AdaKV)."""
    model, tok = smol6
    xs = {"a": _prompt(tok, 120, 1), "b": _prompt(tok, 120, 2), "c": _prompt(tok, 90, 3)}
    m = _compiled(model, policy)
    alone = {k: _gen(m, x).sequences for k, x in xs.items()}
    assert len({tuple(alone[k][0, -6:].tolist()) for k in xs}) == 3
    assert all(s.rewritten for s in kvfx.sites(m)), kvfx.explain(m)
    caches = {k: DynamicCache(config=model.config) for k in xs}
    toks = {}
    with torch.no_grad():
        for k, x in xs.items():
            toks[k] = [m(input_ids=x, use_cache=True, past_key_values=caches[k]).logits[:, -1].argmax(-1)]
        for _ in range(5):
            for k in xs:
                nxt = m(input_ids=toks[k][-1][:, None], use_cache=True, past_key_values=caches[k])
                toks[k].append(nxt.logits[:, -1].argmax(-1))
    for k in xs:
        assert torch.equal(torch.stack(toks[k], 1), alone[k][:, -6:]), (policy, k)
