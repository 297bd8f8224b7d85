"""StreamingLLM end to end: real bytes freed, and outputs equal to eager attention that only
sees the kept tokens (sinks + the most recent window)."""

import torch

import kvfx
from zoo import cache_kwarg, clone_model, hf_model

SINK, WINDOW, PROMPT, STEPS = 4, 64, 1024, 12
POLICY = {"kvfx": 1, "name": "stream-4-64", "budget": {"sink": SINK, "window": WINDOW},
          "eviction": {"scorer": "streaming"}}


def _reference(model, ids, steps, sink=SINK, window=WINDOW):
    """Eager model, full cache, with a 2-D mask that hides every evicted position."""
    from transformers import DynamicCache

    kw = cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, use_cache=True, **{kw: cache})
    logits = [out.logits[:, -1]]
    n = ids.shape[1]
    for step in range(steps - 1):
        t = n + step  # position of the new token
        mask = torch.zeros(1, t + 1, dtype=torch.long)
        mask[:, :sink] = 1
        mask[:, t - window:] = 1  # the last `window` past tokens and the token itself
        tok = logits[-1].argmax(-1, keepdim=True)
        out = model(input_ids=tok, attention_mask=mask, position_ids=torch.tensor([[t]]),
                    use_cache=True, **{kw: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_streaming_matches_kept_token_reference_and_frees_memory():
    _check_streaming(POLICY, SINK, WINDOW)


def test_streaming_with_a_budget_keeps_sinks_and_the_most_recent_tokens_up_to_it():
    """budget.keep with scorer streaming: sinks + the most recent round(keep·n) − sink tokens at
    prefill, rolling at that budget (oldest first), i.e. StreamingLLM with window = budget − sink;
    the policy's own window (16) stays protected inside it."""
    keep = 0.0625  # 64 of 1024 tokens: 4 sinks + 60 recent
    pol = {"kvfx": 1, "name": "stream-keep", "budget": {"sink": SINK, "window": 16, "keep": keep},
           "eviction": {"scorer": "streaming"}}
    _check_streaming(pol, SINK, round(keep * PROMPT) - SINK)


def _check_streaming(policy, sink, window):
    from transformers import DynamicCache

    model = hf_model("llama", "sdpa")
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _reference(model, ids, STEPS, sink, window)
        comp = torch.compile(clone_model(model), backend="kvfx",
                             options={"policy": policy, "inner": "eager"})
        kw = cache_kwarg(model)
        cache = DynamicCache(config=model.config)
        out = comp(input_ids=ids, use_cache=True, **{kw: cache})
        logits = [out.logits[:, -1]]
        for _ in range(STEPS - 1):
            tok = logits[-1].argmax(-1, keepdim=True)
            out = comp(input_ids=tok, use_cache=True, **{kw: cache})
            logits.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), ref, rtol=1e-4, atol=1e-4)
    assert all(s.rewritten for s in kvfx.sites())
    mem = kvfx.memory(cache)
    assert mem["dense_bytes"] > 0
    assert mem["held_bytes"] <= 0.1 * mem["dense_bytes"], mem
    for site in mem["sites"].values():
        assert site["tokens_held"] == sink + window
        assert site["tokens_seen"] == PROMPT + STEPS - 1


def test_streaming_store_stays_flat_during_decode():
    model = hf_model("llama", "sdpa")
    model.compile(backend="kvfx", options={"policy": POLICY, "inner": "eager"})
    ids = torch.randint(1, 90, (2, 200), generator=torch.Generator().manual_seed(1))
    held = []
    from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

    cache = DynamicCache(config=model.config)  # generate's cache: kvfx's state lives with it

    def track(*_):
        mem = kvfx.memory(cache)
        assert len(mem["sites"]) == 2
        held.append(mem["store_bytes"])
        return False

    class Track(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool) | track()

    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                       min_new_tokens=40, do_sample=False, **{cache_kwarg(model): cache},
                       stopping_criteria=StoppingCriteriaList([Track()]))
    assert len(held) == 40 and len(set(held)) == 1, held
