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
