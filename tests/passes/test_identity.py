"""`full` through the kvfx backend reproduces eager exactly, on every model family, through
both ``model.compile`` + ``generate`` and ``torch.compile`` + a manual decode loop."""

import pytest
import torch

import kvfx
from zoo import HandDecoder, clone_model, hand_decode, hf_decode, hf_model

STEPS = 32
FAMILIES = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager"),
            ("mistral", "sdpa"), ("mistral", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")]


def _assert_all_rewritten(n_layers, pattern=None):
    sites = kvfx.sites()
    assert len(sites) == n_layers, kvfx.explain()
    assert all(s.rewritten for s in sites), kvfx.explain()
    assert sorted(s.layer_index for s in sites) == list(range(n_layers))
    if pattern:
        assert {s.pattern for s in sites} == {pattern}


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS,
                              output_logits=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("family,attn", FAMILIES)
def test_generate_full_equals_eager(family, attn):
    model = hf_model(family, attn)
    ids = torch.randint(1, 90, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = _generate(model, ids)
    comp = clone_model(model)
    comp.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    out = _generate(comp, ids)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    _assert_all_rewritten(2, attn)


@pytest.mark.parametrize("family,attn", FAMILIES)
def test_torch_compile_decode_loop_equals_eager(family, attn):
    model = hf_model(family, attn)
    ids = torch.randint(1, 90, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, _ = hf_decode(model, ids, STEPS)
        compiled = torch.compile(clone_model(model), backend="kvfx", options={"inner": "eager"})
        out, cache = hf_decode(compiled, ids, STEPS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    _assert_all_rewritten(2, attn)
    # the model's own cache no longer holds the history: only ghost tensors remain
    mem = kvfx.memory(cache)
    assert mem["model_cache_bytes"] <= 2 * 2 * 4, mem["model_cache_bytes"]


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_hand_written_decoder(eager):
    model = HandDecoder(layers=3, eager=eager).eval()
    ids = torch.randint(1, 90, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = hand_decode(model, ids, STEPS)
        out, cache = hand_decode(torch.compile(clone_model(model), backend="kvfx",
                                               options={"inner": "eager"}), ids, STEPS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_all_rewritten(3, "eager" if eager else "sdpa")
    assert kvfx.memory(cache)["model_cache_bytes"] <= 3 * 2 * 4
    # and compiled in place (model.compile), the form generate() users take
    torch._dynamo.reset()
    kvfx.reset()
    inplace = clone_model(model)
    inplace.compile(backend="kvfx", options={"inner": "eager"})
    with torch.no_grad():
        out2, _ = hand_decode(inplace, ids, STEPS)
    torch.testing.assert_close(out2, ref, rtol=1e-5, atol=1e-5)
    _assert_all_rewritten(3)


def test_inductor_inner_compiler_llama():
    """The default inner compiler (inductor) around the kvfx ops."""
    model = hf_model("llama", "sdpa")
    ids = torch.randint(1, 90, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, _ = hf_decode(model, ids, 8)
        out, _ = hf_decode(torch.compile(clone_model(model), backend="kvfx"), ids, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_all_rewritten(2)


def test_batch_left_padding_full_equals_eager():
    model = hf_model("llama", "sdpa")
    g = torch.Generator().manual_seed(5)
    lengths = [21, 9, 15]
    ids = torch.zeros(3, 21, dtype=torch.long)
    mask = torch.zeros(3, 21, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 21 - n:] = torch.randint(1, 90, (n,), generator=g)
        mask[b, 21 - n:] = 1
    ref = _generate(model, ids, attention_mask=mask)
    comp = clone_model(model)
    comp.compile(backend="kvfx", options={"policy": "full", "inner": "eager"})
    out = _generate(comp, ids, attention_mask=mask)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_two_generate_calls_do_not_leak():
    model = hf_model("llama", "sdpa")
    comp = clone_model(model)
    comp.compile(backend="kvfx", options={"inner": "eager"})
    a = torch.randint(1, 90, (1, 30), generator=torch.Generator().manual_seed(6))
    b = torch.randint(1, 90, (1, 12), generator=torch.Generator().manual_seed(7))
    _generate(comp, a)
    out = _generate(comp, b)  # a shorter, different prompt right after
    ref = _generate(model, b)
    assert torch.equal(out.sequences, ref.sequences)
    for x, y in zip(ref.logits, out.logits):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    held = kvfx.memory()["sites"]
    assert all(s["tokens_seen"] == 12 + STEPS - 1 for s in held.values())


def test_compiled_frames_constant():
    """Frames compiled over a 32-token generation stay a small constant; the recompile limit
    is never hit (no per-step recompiles)."""
    import torch._dynamo.utils as dutils

    model = hf_model("llama", "sdpa")
    before = torch._dynamo.config.get_config_copy()
    model.compile(backend="kvfx", options={"inner": "eager"})
    ids = torch.randint(1, 90, (1, 16))
    dutils.counters.clear()
    _generate(model, ids)
    first = dutils.counters["stats"]["unique_graphs"]
    _generate(model, torch.randint(1, 90, (1, 23)))  # a new prompt length: at most one more
    total = dutils.counters["stats"]["unique_graphs"]
    assert first <= 3, first  # prefill, first decode, dynamic decode
    assert total <= first + 1, total
    _assert_all_rewritten(2)
    # kvfx changes no process-wide dynamo setting (DESIGN rule 7)
    assert torch._dynamo.config.get_config_copy() == before
