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
    return "\n".join(lines)
