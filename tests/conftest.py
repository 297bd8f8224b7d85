import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_kvfx():
    """Each test starts with no kvfx sites and a clean dynamo cache."""
    import torch._dynamo

    import kvfx

    torch._dynamo.reset()
    kvfx.reset()
    yield
    torch._dynamo.reset()
