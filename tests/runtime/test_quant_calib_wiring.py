"""CaliDrop over a quantized store, fused (DESIGN rule 9): with KVFX_FORCE_TRITON=1 (the Triton
interpreter on CPU), `calibrated_decode` hands the calibration partition to the quantized decode
kernel's reduction, and its output equals the unfused reference path (quantized attention, then
`calidrop.merge`) for snapkv-calidrop-ott2."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")

from test_calib_wiring import _compress, _prompt  # noqa: E402

from kvfx.runtime.attention import calibrated_decode  # noqa: E402
from kvfx.runtime.qstore import QuantStore  # noqa: E402
from kvfx.templates import launch_quant  # noqa: E402


def test_fused_quant_calibration_equals_reference_path(monkeypatch, tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    q, k, v = _prompt(n=600)  # keep 0.25 > residual 128: a key flush, so the outlier pool fills
    c, store = _compress("snapkv-calidrop-ott2", q, k, v)
    assert isinstance(store, QuantStore) and store.nk > 0 and bool(store.pool.occupied.any())
    n = q.shape[2]
    gen = torch.Generator().manual_seed(1)
    store.append(torch.randn(2, 2, 1, 64, generator=gen), torch.randn(2, 2, 1, 64, generator=gen),
                 torch.tensor([n]))
    # Head 0's query is a stored one (use), the others are not (-q: cosine -1 with its stored self).
    qt = q[:, :, -5:-4].clone()
    qt[:, 1:] = -qt[:, 1:]
    state = store.calib  # calibrate is functional: restore it between the two runs

    monkeypatch.delenv("KVFX_FORCE_TRITON", raising=False)
    want, _ = calibrated_decode(store, qt, None, False, n, None, False, c.calib)
    store.calib = state

    calls = []
    real = launch_quant.quant_decode_attention

    def spy(*args, **kw):
        calls.append(kw.get("calib") is not None)
        return real(*args, **kw)

    monkeypatch.setenv("KVFX_FORCE_TRITON", "1")
    monkeypatch.setenv("KVFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launch_quant, "quant_decode_attention", spy)
    got, probs = calibrated_decode(store, qt, None, False, n, None, False, c.calib)
    assert calls == [True] and probs is None  # one kernel call, the merge inside it
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    # Heads with use = 0 are exactly the store's own (calib-free) kernel attention.
    use = c.calib.calibrate(state, qt, scale=64**-0.5)[2]
    assert use.any() and not use.all()
    plain = store.attend(qt, None, False, n, None)
    assert torch.equal(got[~use], plain[~use])
    assert (got[use] - plain[use]).abs().max() > 1e-4  # calibration changed the used heads
