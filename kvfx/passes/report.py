"""The site report: what the passes did to every attention site, as a table."""

from __future__ import annotations

from kvfx.runtime.state import SiteInfo

COLUMNS = ("layer", "site", "pattern", "kv_source", "heads", "head_dim", "status", "detail")


def rows(sites: list[SiteInfo]) -> list[tuple[str, ...]]:
    out = []
    for s in sites:
        heads = f"{s.q_heads}/{s.kv_heads}" if s.q_heads else "?"
        detail = s.policy if s.rewritten else s.reason
        pattern = s.pattern + (f"+softcap {s.softcap:g}" if s.softcap is not None else "")
        source = s.provenance + (f" (window {s.window})" if s.window else "")
        out.append((str(s.layer_index), s.module_path or "?", pattern, source, heads,
                    str(s.head_dim or "?"), "rewritten" if s.rewritten else "left alone", detail))
    return out


def format_report(sites: list[SiteInfo]) -> str:
    """A plain-text table of the sites (what ``kvfx explain`` prints)."""
    if not sites:
        return "no attention sites seen (was the model called after compiling?)"
    table = [COLUMNS, *rows(sites)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_rw = sum(s.rewritten for s in sites)
    lines.append(f"{n_rw}/{len(sites)} sites rewritten")
    if n_rw < len(sites):
        lines.append(coverage_line(sites))
    return "\n".join(lines)


def coverage_line(sites: list[SiteInfo]) -> str:
    """One line for a partly compressed model: how many layers the policy applies to, and why the
    others are left alone (their bytes: ``kvfx.memory(cache)["summary"]``)."""
    n_rw = sum(s.rewritten for s in sites)
    left = [s for s in sites if not s.rewritten]
    names = {"sliding_window": "sliding-window", "fresh": "without a KV cache", "static_cache": "static cache"}
    kinds = {}
    for s in left:
        kind = names.get(s.provenance, "see detail")
        kinds[kind] = kinds.get(kind, 0) + 1
    why = ", ".join(f"{k}: {n}" for k, n in kinds.items())
    return (f"policy applied to {n_rw} of {len(sites)} layers; the other {len(left)} are left alone "
            f"({why}), their caches uncompressed: kvfx.memory(cache) counts them in held and dense")
