"""kvfx: KV-cache compression as a torch.compile backend.

    import kvfx
    kvfx.compile(model, "snapkv@0.25")     # or model.compile(backend="kvfx", options={"policy": ...})
    out = model.generate(..., return_dict_in_generate=True)
    print(kvfx.explain(model))             # what happened to every attention site
    kvfx.memory(out.past_key_values)       # bytes this sequence holds vs the dense cache
    with kvfx.appending(): model.generate(question_ids, past_key_values=cache)  # append, don't recompress

State belongs to the sequence: each cache object owns its compressed stores (freed with it), so
several models and sequences can run in one process (see :mod:`kvfx.runtime.state`).
"""

__version__ = "0.1.0"

from kvfx.policy import Policy, PolicyError, load_policy  # noqa: E402
from kvfx.runtime.lifecycle import appending  # noqa: E402
from kvfx.runtime.state import KvfxStateError, memory, reset, sites  # noqa: E402


def compile(model, policy="full", **kwargs):
    """Compile ``model`` in place with kvfx (see :func:`kvfx.backend.compile`); returns it."""
    from kvfx.backend import compile as _compile

    return _compile(model, policy, **kwargs)


def explain(model=None) -> str:
    """What kvfx did to every attention site (of ``model``, or of every compiled model), as a
    table; when no site was seen, why: nothing compiled yet, or graphs compiled in which no
    attention was recognized (and what they held instead)."""
    from kvfx.passes.report import format_report
    from kvfx.runtime.state import programs

    found = sites(model)
    if found:
        return format_report(found)
    progs = programs()
    if not progs:
        return ("nothing compiled yet: no graph has reached the kvfx backend. Compile in place with "
                "model.compile(backend='kvfx', options={...}) or kvfx.compile(model, policy) and call "
                "the model (torch.compile(model) returns a wrapper whose .generate() runs the "
                "uncompiled model)")
    if model is not None and any(p.infos for p in progs):
        return ("this model has not run through a kvfx-compiled graph yet (other models have); "
                "compile it with kvfx and call it")
    whys = sorted({p.why_none for p in progs if p.why_none})
    return (f"{len(progs)} graph(s) compiled, no attention recognized"
            + (": " + "; ".join(whys) if whys else " (no softmax or scaled_dot_product_attention in them)"))


__all__ = ["Policy", "PolicyError", "KvfxStateError", "load_policy", "compile", "memory", "reset",
           "sites", "explain", "appending", "__version__"]
