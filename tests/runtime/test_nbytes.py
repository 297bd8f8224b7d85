"""kvfx.memory(cache) on any cache: plain tensors, shared storages, wrapper tensor subclasses."""

import torch
from torch.testing._internal.two_tensor import TwoTensor

import kvfx
from kvfx.runtime.nbytes import storage_bytes


def test_storage_bytes_counts_shared_storages_once_and_wrappers_by_their_inner_tensors():
    a, b = torch.zeros(4, 8), torch.zeros(2, 8, dtype=torch.float16)
    assert storage_bytes([a, a[1:], a.t()]) == 4 * 8 * 4
    w = TwoTensor(a, torch.zeros(4, 8))  # a wrapper subclass: its own storage cannot be read
    assert storage_bytes([w]) == 2 * 4 * 8 * 4
    assert storage_bytes([w, a, b]) == 2 * 4 * 8 * 4 + 2 * 8 * 2  # a is w's inner tensor: once
    assert storage_bytes([torch.zeros(0)]) == 0


def test_memory_of_a_cache_holding_wrapper_tensors():
    """A foreign cache whose tensors are wrapper subclasses (as quanto's quantized cache holds)
    is measured instead of crashing on their storage ("invalid python storage")."""
    from transformers import DynamicCache

    cache = DynamicCache()
    k = TwoTensor(torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16, 8))
    cache.update(k, TwoTensor(torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16, 8)), 0)
    mem = kvfx.memory(cache)
    assert mem["model_cache_bytes"] == 4 * (2 * 16 * 8 * 4)
    assert mem["held_bytes"] >= mem["model_cache_bytes"]
