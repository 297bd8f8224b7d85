"""Kernel templates: `KernelSpec` -> rendered Triton source (Jinja2) -> cached module -> launch.

Public API:
    KernelSpec                          the validated description of one kernel (spec.uri names it)
    prefill_attention, decode_attention the attention entry points (Triton on CUDA, else reference)
    kvfx.templates.launch_evict         select_gather, knorm_scores, lagkv_partition_scores: the
                                        eviction kernels' entry points (same dispatch)
    kvfx.templates.render.render(spec) -> str, .load(spec) -> module: deterministic source and its
        imported module, cached per URI (not re-exported here: the function would shadow the
        `render` submodule as an attribute of this package).
"""
from kvfx.templates.launch import decode_attention, prefill_attention
from kvfx.templates.spec import KernelSpec

__all__ = ["KernelSpec", "decode_attention", "prefill_attention"]
