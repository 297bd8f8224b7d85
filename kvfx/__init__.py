"""kvfx: KV-cache compression as a torch.compile backend.

    import kvfx
    model.compile(backend="kvfx", options={"policy": "streaming"})
    model.generate(...)
    print(kvfx.explain())         # what happened to every attention site
    kvfx.memory()                 # bytes held vs the dense cache
"""

__version__ = "0.1.0"

from kvfx.policy import Policy, PolicyError, load_policy  # noqa: E402
from kvfx.runtime.registry import memory, reset, sites  # noqa: E402


def explain() -> str:
    """The site report as a table (see :func:`sites`)."""
    from kvfx.passes.report import format_report

    return format_report(sites())


__all__ = ["Policy", "PolicyError", "load_policy", "memory", "reset", "sites", "explain",
           "__version__"]
