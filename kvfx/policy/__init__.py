"""kvfx policies: what happens to the KV cache of every attention site, declared in YAML.

>>> from kvfx.policy import load_policy
>>> policy = load_policy("snapkv")            # a preset name, a .yaml path, a dict or a Policy
>>> policy.resolve(0, "model.layers.0.self_attn", num_layers=32).describe()
'snapkv keep=0.25 sink=4 window=32 pool=max7'

This package is torch-free (it must not import torch, torch.fx or kernels).
"""

from .loader import list_presets
from .resolve import Policy, load_policy, policy_json_schema
from .schema import LayerPolicy, PolicyError

__all__ = ["Policy", "LayerPolicy", "PolicyError", "load_policy", "list_presets", "policy_json_schema"]
