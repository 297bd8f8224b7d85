import os
import sys

# [Note] Triton decides interpreted vs compiled when a function is decorated, including its own
# standard library (tl.minimum, ...), so TRITON_INTERPRET must be set before anything imports
# triton (torch._dynamo.utils does). CPU test runs interpret the kernels; on a GPU machine set
# KVFX_TEST_REAL_TRITON=1 to run them compiled.
if os.environ.get("KVFX_TEST_REAL_TRITON") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one torch thread per pytest-xdist worker (`-n 2`: two workers on two cores), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_kvfx():
    """Each test starts with no kvfx sites and a clean dynamo cache."""
    import torch._dynamo

    import kvfx

    torch._dynamo.reset()
    kvfx.reset()
    yield
    torch._dynamo.reset()
