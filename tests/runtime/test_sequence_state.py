"""State belongs to the sequence (DESIGN rule 7): two models, interleaved sequences, beams, foreign
prefixes, multi-turn continuation, memory freed with the cache, several policies in one process,
no process-wide torch settings, and reports that never mix two models."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import DynamicCache
from zoo import cache_kwarg, clone_model, hf_model

import kvfx
from kvfx.runtime.state import KvfxStateError, sequences_of_cache, site_stores

STEPS = 5


def _greedy(model, ids, steps=STEPS, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **kw)


def _ids(n, seed, batch=1):
    return torch.randint(1, 90, (batch, n), generator=torch.Generator().manual_seed(seed))


class Stepper:
    """One sequence driven step by step through ``model(...)`` with its own cache object."""

    def __init__(self, model, ids):
        self.model, self.kw = model, cache_kwarg(getattr(model, "_orig_mod", model))
        self.cache = DynamicCache(config=getattr(model, "_orig_mod", model).config)
        self.logits = [self._call(ids)]

    def _call(self, ids):
        with torch.no_grad():
            return self.model(input_ids=ids, use_cache=True, **{self.kw: self.cache}).logits[:, -1]

    def step(self):
        self.logits.append(self._call(self.logits[-1].argmax(-1, keepdim=True)))


def _alone(model, ids, steps):
    s = Stepper(model, ids)
    for _ in range(steps):
        s.step()
    return torch.stack(s.logits, 1)


def test_two_models_equal_options_each_produce_what_they_produce_alone():
    """Same class, equal options: dynamo shares the compiled graphs, kvfx must not share state."""
    m1, m2 = hf_model("llama", seed=1), hf_model("llama", seed=2)
    a, b = _ids(40, 1), _ids(42, 2)
    refs = []
    for m, x, n in ((m1, a, 3), (m2, b, STEPS)):  # each alone in the process
        torch._dynamo.reset()
        alone = clone_model(m)
        alone.compile(backend="kvfx", options={"policy": "snapkv@0.5", "inner": "eager"})
        refs.append(_greedy(alone, x, n))
        del alone
    ref1, ref2 = refs
    torch._dynamo.reset()
    for m in (m1, m2):
        m.compile(backend="kvfx", options={"policy": "snapkv@0.5", "inner": "eager"})
    out1 = _greedy(m1, a, 3)
    out2 = _greedy(m2, b)
    assert torch.equal(out1.sequences, ref1.sequences) and torch.equal(out2.sequences, ref2.sequences)
    for x, y in zip(ref2.logits, out2.logits):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    # reports never mix the two models: two sessions, each with its own two sites, and the report
    # of every live model labels each site with its model
    s1, s2 = kvfx.runtime.state.sessions(m1), kvfx.runtime.state.sessions(m2)
    assert len(s1) == len(s2) == 1 and s1[0] is not s2[0]
    assert len(kvfx.sites(m1)) == len(kvfx.sites(m2)) == 2
    labels = {s.module_path.split("/")[0] for s in kvfx.sites()}
    assert {s1[0].label, s2[0].label} <= labels, kvfx.explain()
    assert kvfx.memory(out2.past_key_values)["sites"].keys() == {s.module_path for s in kvfx.sites(m2)}


@pytest.mark.parametrize("policy,lengths", [("full", (24, 24)), ("h2o@0.5", (24, 24)),
                                            ("snapkv@0.5", (30, 17)), ("kivi2", (30, 17))])
def test_interleaved_sequences_on_one_compiled_model(policy, lengths):
    """Prefill A, prefill B (own cache), then decode A and B alternately: each equals its run alone
    (equal lengths were the case where A silently read B's store)."""
    model = hf_model("llama", heads=2, kv_heads=1)  # head dim 32: whole quant groups
    a, b = _ids(lengths[0], 3), _ids(lengths[1], 4)
    comp = clone_model(model)
    comp.compile(backend="kvfx", options={"policy": policy, "inner": "eager"})
    ref_a, ref_b = _alone(comp, a, 4), _alone(comp, b, 4)
    sa, sb = Stepper(comp, a), Stepper(comp, b)
    for _ in range(4):
        sa.step()
        sb.step()
    torch.testing.assert_close(torch.stack(sa.logits, 1), ref_a, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(sb.logits, 1), ref_b, rtol=0, atol=0)
    if policy == "full":  # and equal to the uncompiled model
        torch.testing.assert_close(ref_a, _alone(model, a, 4), rtol=1e-5, atol=1e-5)


def test_beam_search_fails_naming_beam_search():
    model = hf_model("llama")
    model.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    with pytest.raises(Exception, match="beam search") as e:
        with torch.no_grad():
            model.generate(_ids(12, 5), num_beams=3, max_new_tokens=4, do_sample=False)
    assert isinstance(e.value, KvfxStateError) or isinstance(e.value.__cause__, KvfxStateError)


def test_foreign_prefix_fails_naming_it():
    model = hf_model("llama")
    plain = clone_model(model)
    ids = _ids(16, 6)
    with torch.no_grad():
        prefix = plain(input_ids=ids, use_cache=True).past_key_values  # an uncompiled run's cache
    model.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    with pytest.raises(Exception, match="not made by this kvfx model"):
        with torch.no_grad():
            model(input_ids=_ids(1, 7), use_cache=True, **{cache_kwarg(model): prefix})


def test_cropped_cache_fails_naming_cropping():
    model = hf_model("llama")
    model.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    s = Stepper(model, _ids(16, 8))
    s.step()
    s.cache.crop(-3)
    with pytest.raises(Exception, match="cropped"):
        s.step()


def test_multi_turn_continuation_is_exact():
    """generate(full_ids, past_key_values=out.past_key_values): the second turn continues the
    compressed cache exactly as an uncompiled model continues its own (policy full)."""
    model = hf_model("llama")
    comp = clone_model(model)
    comp.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    ids = _ids(20, 9)
    outs = {}
    for name, m in (("eager", model), ("kvfx", comp)):
        first = _greedy(m, ids)
        turn2 = torch.cat([first.sequences, _ids(6, 10)], 1)
        outs[name] = _greedy(m, turn2, past_key_values=first.past_key_values)
    assert torch.equal(outs["kvfx"].sequences, outs["eager"].sequences)
    for x, y in zip(outs["eager"].logits, outs["kvfx"].logits):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_memory_is_freed_with_the_cache_and_the_model():
    model = hf_model("llama")
    model.compile(backend="kvfx", options={"policy": "snapkv@0.5", "inner": "eager"})
    out = _greedy(model, _ids(64, 11))
    cache = out.past_key_values
    stores = site_stores(cache)
    assert len(stores) == 2 and kvfx.memory(cache)["store_bytes"] > 0
    refs = [weakref.ref(st.k) for st in stores.values()]
    seq = weakref.ref(sequences_of_cache(cache)[0])
    assert kvfx.memory(model=model)["sequences"] == 1
    del out, cache, stores
    gc.collect()
    assert seq() is None and all(r() is None for r in refs)
    assert kvfx.memory()["store_bytes"] == 0 and kvfx.memory()["sequences"] == 0
    # generate without keeping the cache: nothing stays behind
    with torch.no_grad():
        model.generate(_ids(64, 12), max_new_tokens=3, do_sample=False)
    assert kvfx.memory()["sequences"] == 0
    # dropping the compiled model drops its session
    assert len(kvfx.runtime.state.sessions(model)) == 1
    wm = weakref.ref(model)
    del model
    gc.collect()
    assert wm() is None or not kvfx.runtime.state.sessions(wm())
    assert not kvfx.runtime.state.sessions()


def test_options_dict_mutated_between_compiles():
    """torch.compile keeps the options dict (it does not copy it) and dynamo reuses a graph when
    the dicts compare equal, so after a mutation the second model silently ran graphs compiled
    for the first policy. Now each model runs the policy its dict held when it compiled."""
    opts = {"policy": "full", "inner": "eager"}
    m1, m2, m3 = hf_model("llama"), hf_model("llama"), hf_model("llama")
    m1.compile(backend="kvfx", options=opts)
    _greedy(m1, _ids(40, 13), 2)
    opts["policy"] = "snapkv@0.25"
    m2.compile(backend="kvfx", options=opts)
    for m in (m2, m3):
        if m is m3:
            m.compile(backend="kvfx", options=dict(opts))
        out = _greedy(m, _ids(40, 13), 2)
        held = [st.tokens_held() for st in site_stores(out.past_key_values).values()]
        assert held and all(h == 36 + 1 for h in held), held  # the floor sink + window, one decode step
        assert all("snapkv" in s.policy for s in kvfx.sites(m))
    out = _greedy(m1, _ids(40, 13), 2)  # and m1 still runs its own policy
    assert all(st.tokens_held() == 41 for st in site_stores(out.past_key_values).values())


def test_no_process_wide_torch_settings_and_unrelated_code_still_falls_back():
    before = torch._dynamo.config.get_config_copy()
    model = hf_model("llama")
    kvfx.compile(model, "full", inner="eager")
    _greedy(model, _ids(10, 14), 2)
    assert torch._dynamo.config.get_config_copy() == before

    calls = []

    def f(x):
        calls.append(1)
        return x * 2

    g = torch.compile(f, backend="eager", dynamic=False)
    for n in range(1, torch._dynamo.config.recompile_limit + 3):  # past the limit: eager, no error
        assert torch.equal(g(torch.ones(n)), torch.full((n,), 2.0))


def test_seven_policies_in_one_process_used_alternately():
    policies = ["full", "snapkv@0.5", "h2o@0.5", "streaming@0.5", "kivi4", "knorm", "tova@0.5"]
    base = hf_model("llama", heads=2, kv_heads=1)
    ids = _ids(300, 15)  # longer than streaming's floor (4 sinks + a 256-token window)
    models = {}
    for p in policies:
        models[p] = kvfx.compile(clone_model(base), p, inner="eager")
    first = {p: _greedy(m, ids, 3).sequences for p, m in models.items()}
    for p in reversed(policies):  # alternately, again: same tokens, and each policy really ran
        out = _greedy(models[p], ids, 3)
        assert torch.equal(out.sequences, first[p]), p
        assert {s.policy for s in kvfx.sites(models[p])} and all(s.rewritten for s in kvfx.sites(models[p]))
        held = max(st.tokens_held() for st in site_stores(out.past_key_values).values())
        assert (held < 300) == (p not in ("full", "kivi4", "knorm")), (p, held)
    assert torch.equal(first["full"], _greedy(base, ids, 3).sequences)


def test_reset_mid_sequence_keeps_the_sequence_working():
    model = hf_model("llama")
    model.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    ids = _ids(12, 16)
    ref = _alone(model, ids, 3)
    s = Stepper(model, ids)
    s.step()
    kvfx.reset()
    s.step()
    s.step()
    torch.testing.assert_close(torch.stack(s.logits, 1), ref, rtol=0, atol=0)


def test_explain_tells_nothing_compiled_from_no_attention():
    torch._dynamo.reset()
    gc.collect()
    assert "nothing compiled yet" in kvfx.explain()

    class Gemma2Like(torch.nn.Module):  # tanh between two different constants: not a soft-cap
        def forward(self, q, k, v):
            s = torch.matmul(q, k.transpose(-1, -2)) * 0.125
            s = torch.tanh(s / 30.0) * 50.0
            return torch.matmul(torch.softmax(s, -1), v)

    m = Gemma2Like()
    m.compile(backend="kvfx", options={"inner": "eager"})
    x = torch.randn(1, 2, 4, 8)
    m(x, x, x)
    text = kvfx.explain()
    assert "no attention recognized" in text and "soft-capping" in text, text
