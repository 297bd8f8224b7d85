"""Shared fixture of the kernel test modules."""

import pytest


@pytest.fixture(scope="module")
def force_triton(tmp_path_factory):
    """Route the launchers through the Triton kernels (interpreted on CPU) for one module, with a
    private kernel cache. Set here rather than at import: module-level writes happen at
    collection and would route every later test module of the session through the kernels.
    Use with ``pytestmark = pytest.mark.usefixtures("force_triton")``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KVFX_FORCE_TRITON", "1")
    mp.setenv("KVFX_CACHE_DIR", str(tmp_path_factory.mktemp("kvfx-kernels")))
    yield
    mp.undo()
