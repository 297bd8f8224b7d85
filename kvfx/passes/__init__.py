"""FX passes over dynamo graphs: find attention, trace K/V provenance, rewrite, report.

``run_passes(gm, policy)`` runs them in order and returns the graph's
:class:`kvfx.runtime.state.Program`: every site it saw, and the configuration of each rewritten one
(the operators find it by the site's index in the program).
"""

from __future__ import annotations

import itertools

from torch.fx import GraphModule

from kvfx.passes import graph_utils as gu
from kvfx.passes.find_attention import AttentionMatch, find_attention
from kvfx.passes.lowrank import check_lowrank, match_rope
from kvfx.passes.rewrite import SitePlan, check, rewrite_site
from kvfx.passes.trace_kv import trace_kv_source
from kvfx.policy import PolicyError
from kvfx.runtime.state import Program, SiteInfo, SiteProgram


_graph_ids = itertools.count()


class UnsupportedPolicyError(NotImplementedError, PolicyError):
    """The policy asks a site for something this build of kvfx cannot do, or that the model cannot
    hold (a :class:`kvfx.PolicyError`, raised at compile time)."""


def _site_info(m: AttentionMatch, key: str, path: str, index: int, provenance: str,
               new_k) -> SiteInfo:
    qs, ks = gu.shape(m.q), gu.shape(new_k)
    hq = gu.static_int(qs[1]) if qs and len(qs) == 4 else None
    hkv = gu.static_int(ks[1]) if ks and len(ks) == 4 else None
    d = gu.static_int(qs[-1]) if qs else None
    return SiteInfo(key=key, module_path=path, layer_index=index, pattern=m.pattern,
                    provenance=provenance, q_heads=hq, kv_heads=hkv, head_dim=d, rewritten=False)


def _query_rope(m: AttentionMatch) -> tuple[tuple | None, str]:
    """For a scorer that reads the site's RoPE (``Scorer.rotary``): (cos, sin) nodes if the
    queries are ``q_pre·cos + rotate_half(q_pre)·sin`` (HF's apply_rotary_pos_emb), and what the
    report says either way."""
    found = match_rope(m.q)
    if isinstance(found, tuple):
        return (found[1], found[2]), "scorer reads the queries' RoPE (statistics before rotation)"
    return None, ("scorer uses the queries as they are: " + found.replace("keys", "queries")
                  + "; exact only without rotary embeddings")


def window_refusal(compressor, softcap=None) -> str:
    """Why a sliding-window site cannot run this layer policy ('' if it can). A window layer is
    rewritten only when its policy keeps every token (``full``, or ``quant:`` alone): the store then
    holds the window (rolled with it, :mod:`kvfx.runtime.window`), quantized or not. (A soft-capped
    window site is rewritten too: its dense path maps the same mask and rolls the same store;
    ``quant:`` on a capped site is refused by :func:`kvfx.runtime.softcap.check_policy`.)"""
    from kvfx.runtime.compressor import Compressor

    if getattr(compressor, "lowrank", False):
        return "low-rank latents (lowrank:) are not rolled with a window"
    if compressor.calib is not None:
        return "CaliDrop's statistics of evicted tokens are not defined for tokens that leave a window"
    if type(compressor) is not Compressor:
        return "eviction inside a sliding window is not defined (the window already bounds the layer)"
    return ""


def _check_quant_fits(compressor, info: SiteInfo, policy_name: str) -> None:
    """A quantized layout the site's head dim cannot hold is a policy error, raised at compile
    time (not at the first generated token)."""
    from kvfx.methods.quant_pack import per_word

    q = getattr(compressor, "quant", None)
    if q is None or info.head_dim is None:
        return
    lowrank = getattr(compressor, "lowrank", False) and getattr(compressor, "factors", None) is not None
    # a low-rank site quantizes its latents: r_k key channels and r_v value channels
    dims = compressor.ranks if lowrank else (info.head_dim, info.head_dim)
    what = "latent width" if lowrank else "head dim"
    for side, group, bits, d in (("keys", None, q.kbits, dims[0]), ("values", q.vgroup, q.vbits, dims[1])):
        if d % per_word(bits) or (group is not None and d % group):
            raise UnsupportedPolicyError(
                f"kvfx: policy {policy_name!r}: site {info.module_path} has {side} {what} {d}, which "
                f"quant.{side} (bits={bits}{f', group={group}' if group else ''}) cannot split into "
                f"whole groups and 32-bit words; set quant.values.group to a divisor of {d}"
                + (" (or calibrate another keep-rank)" if lowrank else ""))


def _factors(lp):
    """A ``lowrank:`` layer policy's ReCalKV factors (loaded once per file), else None."""
    if lp.lowrank is None:
        return None
    from kvfx.calibrate import ArtifactError, load_factors

    if not lp.lowrank.artifact:
        raise ArtifactError("policy lowrank.artifact: got null, expected the .safetensors file written "
                            "by `kvfx calibrate --keep-rank K --out F.safetensors`")
    return load_factors(lp.lowrank.artifact)


def run_passes(gm: GraphModule, policy, tp: int = 1) -> Program:
    """Rewrite every cached attention site of ``gm`` in place according to ``policy``.

    ``tp``: the ranks the model's attention heads are sharded over (tensor parallelism; set by
    :func:`kvfx.compile` from the model): state that spans a layer's KV heads is then reduced over
    the ranks (ChunkKV's chunk scores).

    Returns the graph's :class:`Program` (``program.infos``: every site found; ``program.sites``:
    the rewritten ones). Raises
    :class:`UnsupportedPolicyError` before touching the graph if the policy asks a site for
    something not implemented.
    """
    from kvfx.runtime.compressor import build_compressor

    matches = find_attention(gm.graph)
    plans, infos, sites, rope_owner = [], [], [], {}
    namespace = f"g{next(_graph_ids)}"
    num_layers = len(matches)
    traced = [trace_kv_source(m.k, m.v, {m.out, *m.chain}) for m in matches]
    sites_seen = [(gu.layer_index(p) if gu.layer_index(p) is not None else i, p, ks.provenance == "sliding_window")
                  for i, (p, (ks, _)) in enumerate(zip((gu.module_path(m.out) or f"attention_{i}"
                                                        for i, m in enumerate(matches)), traced))]
    if sites_seen:  # a layers: override that matches no attention site of this graph is an error
        policy.check_overrides(sites_seen)
    for order, m in enumerate(matches):
        ks, vs = traced[order]
        path = gu.module_path(m.out) or f"attention_{order}"
        index = gu.layer_index(path)
        index = order if index is None else index
        key = f"{namespace}/{path}"
        info = _site_info(m, key, path, index, ks.provenance, ks.new if ks.new is not None else m.k)
        info.softcap, info.window = m.softcap, ks.window
        reason = check(m, ks, vs)
        compressor = lowrank = None
        sliding = ks.provenance == "sliding_window"
        if not reason:
            lp = policy.resolve(index, path, max(num_layers, index + 1), window=sliding)
            if tp > 1:  # tensor parallelism: state spanning KV heads a rank does not hold is refused
                from kvfx.distributed import tp_refusal

                if why := tp_refusal(lp, tp):
                    raise UnsupportedPolicyError(f"kvfx: policy {policy.name!r} at site {path} (layer {index}): {why}")
            try:
                compressor = build_compressor(lp, index, max(num_layers, index + 1), _factors(lp))
            except NotImplementedError as e:
                raise UnsupportedPolicyError(
                    f"kvfx: policy {policy.name!r} asks site {path} (layer {index}) for {e}, "
                    "which this version of kvfx does not implement yet; use a preset from "
                    "`kvfx policy list` that only needs implemented features") from None
            _check_quant_fits(compressor, info, policy.name)
            if tp > 1 and getattr(compressor, "chunk", None) is not None:
                from kvfx.runtime.ranks import all_reduce_sum

                compressor.chunk_reduce = all_reduce_sum  # chunk scores over every rank's KV heads
            if sliding and (why := window_refusal(compressor, m.softcap)):
                asked = policy.targets_window(index, path, max(num_layers, index + 1))
                if asked is not None:  # the user targeted this layer: an error, not a skipped layer
                    raise UnsupportedPolicyError(
                        f"kvfx: policy {policy.name!r}: layers[{asked}] (window: true) asks the sliding-window "
                        f"site {path} (layer {index}) for {lp.describe()}, but {why}; on sliding-window layers "
                        "use full or quant: alone (eviction.scorer: none, no calibration:/lowrank:)")
                reason = (f"sliding-window layer (the model's cache keeps the last {ks.window} tokens) under "
                          f"{compressor.name}: {why}; it keeps its dense window cache (to quantize it: a "
                          "layers: override with `window: true` and quant:)")
            if not reason and m.softcap is not None:
                from kvfx.runtime.softcap import check_policy

                if (what := check_policy(compressor)):
                    raise UnsupportedPolicyError(
                        f"kvfx: policy {policy.name!r} asks site {path} (layer {index}) for {what}, "
                        f"but the site's logits are soft-capped (tanh, cap {m.softcap}) and kvfx "
                        "applies the cap only with a dense store; use full or an eviction policy "
                        "without quant:, lowrank:, calibration: or budget.allocation: adaptive on this model")
            if not reason and getattr(compressor, "lowrank", False):
                lowrank, reason = check_lowrank(m, ks, vs, compressor, info, rope_owner)
        rope = None
        if not reason and lowrank is None and getattr(getattr(compressor, "scorer", None), "rotary", False):
            rope, info.rope = _query_rope(m)
        if not reason:
            info.policy = lp.describe() + (f"; {info.rope}" if info.rope else "")
            info.rewritten = True
            plans.append(SitePlan(m, ks, vs, len(plans), lowrank=lowrank, rope=rope))
            sites.append(SiteProgram(info, compressor, lowrank is not None))
        else:
            info.reason = reason
            compressor = None
        infos.append(info)
    for plan in plans:
        rewrite_site(gm, plan)
    gm.graph.lint()
    gm.recompile()
    why = ""
    if not matches:
        from kvfx.passes.diagnose import why_no_attention

        why = why_no_attention(gm.graph)
    return Program(policy, infos, sites, why_none=why)


__all__ = ["run_passes", "UnsupportedPolicyError", "find_attention", "trace_kv_source"]
