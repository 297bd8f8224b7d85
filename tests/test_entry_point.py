"""After `pip install`, `torch.compile(..., backend="kvfx")` finds the backend through the
`torch_dynamo_backends` entry point, without the user importing kvfx."""

import subprocess
import sys
import textwrap


def test_backend_found_by_name_without_import():
    code = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        def f(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)
        x = torch.randn(1, 2, 4, 8)
        out = torch.compile(f, backend="kvfx", options={"inner": "eager"})(x, x, x)
        torch.testing.assert_close(out, f(x, x, x))
        assert "kvfx.backend" in sys.modules  # loaded by dynamo through the entry point
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_generate_on_a_torch_compile_wrapper_warns_once():
    """`torch.compile(model, backend="kvfx").generate()` runs the uncompiled model (the wrapper
    hands `generate` the inner module): kvfx warns once per wrapper, naming model.compile, without
    the user importing kvfx; other backends' wrappers and in-place compiles do not warn, and the
    attribute returned is the inner module's."""
    code = textwrap.dedent("""
        import sys, warnings, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.tensor([[1, 5, 9, 3]])
        def caught(fn):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                fn()
            return [str(x.message) for x in w if "kvfx" in str(x.message)]
        wrapper = torch.compile(model, backend="kvfx", options={"policy": "snapkv"})
        assert "kvfx.backend" in sys.modules
        first = caught(lambda: wrapper.generate(ids, max_new_tokens=2, do_sample=False))
        assert len(first) == 1 and "model.compile(backend='kvfx'" in first[0], first
        assert caught(lambda: wrapper.generate(ids, max_new_tokens=2, do_sample=False)) == []
        assert wrapper.generate.__self__ is model
        other = torch.compile(LlamaForCausalLM(cfg).eval(), backend="eager")
        assert caught(lambda: other.generate) == []
        import kvfx
        assert "nothing compiled yet" in kvfx.explain()
        kvfx.compile(model, "snapkv", inner="eager")
        assert caught(lambda: model.generate(ids, max_new_tokens=2, do_sample=False)) == []
        assert kvfx.sites(model)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
