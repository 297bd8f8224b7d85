"""ReCalKV calibration: collect k_proj / v_proj inputs on text, factorize, save a safetensors artifact.

The model runs unchanged over ``tokens`` tokens of text cut into independent ``chunk``-token
sequences; forward hooks on every ``k_proj`` / ``v_proj`` Linear accumulate the float64 Gram
XᵀX of their inputs (an input shared by k_proj and v_proj, as in Llama, is counted once). Each
layer is then factorized by :class:`kvfx.methods.recalkv.ReCalKV` (math in that module).

Offline value calibration (OVC), sequential as in the official code: layer by layer, the model
runs again with the k_proj / v_proj outputs of every earlier layer replaced by their low-rank
reconstruction x·Rᵀ·Lᵀ (those layers' final factors), the Gram X'ᵀX' of layer l's v_proj inputs
is collected on those *compressed-model* inputs, and one least-squares step refits layer l's
value factors to them (:func:`kvfx.methods.recalkv.ovc_refine`). The whitening and the SVDs use
the unchanged model's statistics; OVC adapts the values to the inputs the compressed model feeds
them. (On the unchanged model's own inputs the step would return the whitened SVD unchanged: it
is already the optimum there.) The forward of layer l's pass stops at layer l's v_proj.

Artifact (safetensors, never pickle; DESIGN.md rule 8): tensors ``layers.{i}.k_proj.L`` (Hkv·d, r_k),
``layers.{i}.k_proj.R`` (r_k, D) and the same for ``v_proj``, float32; metadata ``format`` =
``kvfx.recalkv``, ``format_version`` and ``provenance`` (JSON: model, text source and hash, token
count, keep_rank, hsr / ovc, group size, rank multiple, damping, per layer the head groups, ranks
and calibration errors, the kvfx and torch versions). :func:`load_artifact` checks all of it.

Example::

    from kvfx.calibrate import calibrate, save_artifact, load_artifact
    from kvfx.eval.text import filler_text
    model, tok = load_model("smollm2-135m")
    factors, prov = calibrate(model, tok, filler_text("essays"), 0.5, text_source="essays")
    save_artifact("smollm2-recalkv-0.5.safetensors", factors, prov)
    factors, prov = load_artifact("smollm2-recalkv-0.5.safetensors", model=model)
    k = reconstruct(x, factors[3].k)   # layer 3 keys through the latent (before RoPE)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from kvfx.eval.text import tokenize_prefix
from kvfx.methods.recalkv import LayerFactors, LowRank, ReCalKV, ovc_refine, reconstruct, relative_error

__all__ = ["ARTIFACT_FORMAT", "ArtifactError", "Calibration", "KVProjection", "artifact_tensors",
           "calibrate", "collect_grams", "format_summary", "heldout_errors", "kv_projections",
           "load_artifact", "save_artifact", "text_ids"]

ARTIFACT_FORMAT = "kvfx.recalkv"
ARTIFACT_VERSION = 1
_RECALIBRATE = "fix: re-run `kvfx calibrate --model M --text T --keep-rank K --out {path}`"


class ArtifactError(ValueError):
    """A ReCalKV artifact is missing, unreadable or inconsistent; the message names what and the fix."""


class Calibration(NamedTuple):
    """``factors``: {layer index: LayerFactors}; ``provenance``: the JSON-able record saved with them."""

    factors: dict[int, LayerFactors]
    provenance: dict


class KVProjection(NamedTuple):
    layer: int
    name: str  # module path of the attention block, e.g. "model.layers.3.self_attn"
    k_proj: torch.nn.Linear
    v_proj: torch.nn.Linear


# --------------------------------------------------------------------------------------------- model


def kv_projections(model) -> list[KVProjection]:
    """Every attention block with separate ``k_proj`` and ``v_proj`` Linear layers, by layer index.

    Raises:
        ValueError: none found (fused QKV models such as GPT-2 are not supported).
    """
    mods = dict(model.named_modules())
    out = []
    for name, mod in mods.items():
        if not (name.endswith("k_proj") and isinstance(mod, torch.nn.Linear)):
            continue
        parent = name[: -len("k_proj")]
        v = mods.get(parent + "v_proj")
        found = re.findall(r"(?:^|\.)(\d+)(?=\.)", name)
        if isinstance(v, torch.nn.Linear) and found:
            out.append(KVProjection(int(found[-1]), parent.rstrip("."), mod, v))
    if not out:
        raise ValueError(f"{type(model).__name__}: no attention layers with separate k_proj and v_proj "
                         "Linear modules; ReCalKV calibration supports Llama-style models (Llama, "
                         "Mistral, Qwen, Gemma, SmolLM), not fused QKV projections")
    layers = [p.layer for p in out]
    if len(set(layers)) != len(layers):
        raise ValueError(f"{type(model).__name__}: several k_proj/v_proj pairs share a layer index "
                         f"({[p.name for p in out]}); cannot key the factors by layer")
    return sorted(out, key=lambda p: p.layer)


def _kv_geometry(model, projs: list[KVProjection]) -> tuple[int, int, int]:
    """(Hkv, d, D) from the config, checked against the projection shapes."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    n_q = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    d = getattr(cfg, "head_dim", None) or (cfg.hidden_size // n_q if n_q else None)
    if not n_kv or not d:
        raise ValueError(f"{type(model).__name__}: the config has no num_key_value_heads / head_dim; "
                         "ReCalKV needs the KV head layout")
    for p in projs:
        for lin in (p.k_proj, p.v_proj):
            if lin.out_features != n_kv * d or lin.in_features != projs[0].k_proj.in_features:
                raise ValueError(f"{p.name}: projection ({lin.out_features}, {lin.in_features}) does not "
                                 f"match num_key_value_heads {n_kv} x head_dim {d}")
    return int(n_kv), int(d), int(projs[0].k_proj.in_features)


def text_ids(tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text`` (no special tokens), as a (n_tokens,) LongTensor.

    Raises:
        ValueError: the text has fewer tokens.
    """
    if n_tokens < 1:
        raise ValueError(f"calibration tokens: got {n_tokens}, expected >= 1")
    ids = tokenize_prefix(tokenizer, text, n_tokens, add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"calibration text: {len(ids)} tokens, fewer than the {n_tokens} asked for; "
                         "use a longer text or fewer --tokens")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


@torch.no_grad()
def collect_grams(model, ids: torch.Tensor, *, chunk: int = 512, progress: bool = True,
                  desc: str = "calibrate") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (G_k, G_v)}: float64 CPU Grams XᵀX of the k_proj / v_proj inputs over ``ids``.

    ``ids`` (n,) is cut into ``ceil(n / chunk)`` independent sequences (the last may be shorter),
    each run through ``model`` without a cache. When v_proj gets the very tensor k_proj got, its
    Gram is the same object as G_k.
    """
    from tqdm.auto import tqdm

    if chunk < 1:
        raise ValueError(f"calibration chunk: got {chunk}, expected >= 1")
    projs = kv_projections(model)
    dim = projs[0].k_proj.in_features
    g_k = {p.layer: torch.zeros(dim, dim, dtype=torch.float64) for p in projs}
    g_v = {p.layer: torch.zeros(dim, dim, dtype=torch.float64) for p in projs}
    shared = {p.layer: True for p in projs}
    last: dict[int, tuple] = {}

    def _gram(x):
        x = x.reshape(-1, x.shape[-1]).double()
        return (x.mT @ x).cpu()

    def k_hook(layer):
        def hook(_mod, args, _out):
            inc = _gram(args[0])
            g_k[layer] += inc
            last[layer] = (args[0], inc)
        return hook

    def v_hook(layer):
        def hook(_mod, args, _out):
            prev = last.pop(layer, None)
            if prev is not None and prev[0] is args[0]:
                g_v[layer] += prev[1]
            else:
                shared[layer] = False
                g_v[layer] += _gram(args[0])
        return hook

    handles = [h for p in projs for h in (p.k_proj.register_forward_hook(k_hook(p.layer)),
                                          p.v_proj.register_forward_hook(v_hook(p.layer)))]
    device = next(model.parameters()).device
    starts = range(0, int(ids.numel()), chunk)
    try:
        for s in tqdm(starts, desc=desc, unit="chunk", disable=not progress):
            seq = ids.reshape(-1)[s:s + chunk].to(device)[None]
            model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False)
            last.clear()
    finally:
        for h in handles:
            h.remove()
    return {p.layer: (g_k[p.layer], g_k[p.layer] if shared[p.layer] else g_v[p.layer]) for p in projs}


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once the layer of interest has run."""


@torch.no_grad()
def _sequential_gram(model, ids: torch.Tensor, proj: KVProjection, earlier: dict[int, LayerFactors],
                     chunk: int) -> torch.Tensor:
    """float64 Gram of ``proj.v_proj``'s inputs over ``ids`` when every layer in ``earlier`` has its
    k_proj / v_proj outputs replaced by the low-rank reconstruction (the compressed model)."""
    g = None
    handles = []

    def lowrank(f):
        return lambda mod, args, out: reconstruct(args[0].double(), f.to(torch.float64), mod.bias).to(out.dtype)

    def take(_mod, args, _out):
        nonlocal g
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        inc = (x.mT @ x).cpu()
        g = inc if g is None else g + inc
        raise _Stop

    for p in kv_projections(model):
        if p.layer in earlier:
            f = earlier[p.layer]
            handles += [p.k_proj.register_forward_hook(lowrank(f.k)), p.v_proj.register_forward_hook(lowrank(f.v))]
    handles.append(proj.v_proj.register_forward_hook(take))
    device = next(model.parameters()).device
    try:
        for s in range(0, int(ids.numel()), chunk):
            seq = ids.reshape(-1)[s:s + chunk].to(device)[None]
            try:
                model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return g


# --------------------------------------------------------------------------------------------- calibrate


def calibrate(model, tokenizer, text: str, keep_rank: float, *, tokens: int = 4096, hsr: bool = True,
              ovc: bool = True, group_size: Optional[int] = None, chunk: int = 512, damp: float = 1e-4,
              rank_multiple: Optional[int] = None, text_source: Optional[str] = None,
              model_name: Optional[str] = None, progress: bool = True) -> Calibration:
    """Calibrate ReCalKV factors for every attention layer of ``model`` on ``text``.

    Args:
        model: a Hugging Face causal LM with separate k_proj / v_proj (Llama family).
        tokenizer: its tokenizer.
        text: calibration text (its first ``tokens`` tokens are used).
        keep_rank: fraction of the Hkv·d key / value dims kept in the latent, in (0, 1].
        tokens: calibration tokens; use several times the hidden size (below it XᵀX is singular
            and the whitening leans on ``damp``; a warning says so).
        hsr, ovc, group_size, damp, rank_multiple: see :class:`kvfx.methods.recalkv.ReCalKV`
            (``group_size`` None: 4, or ceil(Hkv / 2) when smaller).
        chunk: tokens per independent calibration sequence.
        text_source, model_name: labels for the provenance (default "text" and
            ``config._name_or_path``).
        progress: tqdm bars over chunks and layers.

    Returns:
        ``Calibration(factors, provenance)``; factors {layer: LayerFactors} in float32.

    Example::

        factors, prov = calibrate(model, tok, filler_text("essays"), 0.5, tokens=4096)
        prov["layers"][0]["k_ranks"]     # e.g. [64, 32]: a group of 2 heads and one of 1
    """
    from tqdm.auto import tqdm

    import kvfx

    method = ReCalKV(keep_rank=keep_rank, hsr=hsr, ovc=ovc, group_size=group_size,
                     rank_multiple=rank_multiple, damp=damp)
    projs = kv_projections(model)
    n_kv, d, dim = _kv_geometry(model, projs)
    if tokens < dim:
        warnings.warn(f"ReCalKV calibration on {tokens} tokens < hidden size {dim}: XᵀX is singular "
                      f"and the whitening relies on damping (damp={damp}); use >= {4 * dim} tokens",
                      stacklevel=2)
    ids = text_ids(tokenizer, text, tokens)
    grams = collect_grams(model, ids, chunk=chunk, progress=progress)
    factors, layers = {}, []
    svd = dataclasses.replace(method, ovc=False)  # OVC runs below, on the compressed model's inputs
    for p in tqdm(projs, desc="factorize", unit="layer", disable=not progress):
        g_k, g_v = grams[p.layer]
        w_k, w_v = p.k_proj.weight.detach(), p.v_proj.weight.detach()
        f = svd.factorize(w_k, w_v, g_k, g_v, n_heads=n_kv, head_dim=d)
        if ovc:
            g_seq = _sequential_gram(model, ids, p, {q.layer: factors[q.layer] for q in projs
                                                      if q.layer < p.layer}, chunk)
            L, R = ovc_refine(w_v, f.v.L, f.v.R, g_seq)
            refined = LowRank(L, R, f.v.groups, f.v.ranks, f.v.head_dim)
            seq_err = (relative_error(w_v, f.v, gram=g_seq), relative_error(w_v, refined, gram=g_seq))
            f = LayerFactors(f.k, refined)
        layers.append({"layer": p.layer, "module": p.name,
                       "k_groups": [list(g) for g in f.k.groups], "k_ranks": list(f.k.ranks),
                       "v_groups": [list(g) for g in f.v.groups], "v_ranks": list(f.v.ranks),
                       "calib_error_k": relative_error(w_k, f.k, gram=g_k),
                       "calib_error_v": relative_error(w_v, f.v, gram=g_v),
                       **({"ovc_error_v_before": seq_err[0], "ovc_error_v_after": seq_err[1]} if ovc else {})})
        factors[p.layer] = LayerFactors(f.k.to(torch.float32), f.v.to(torch.float32))
    gs, mult = method.resolved(n_kv, d)
    provenance = {
        "method": "recalkv",
        "model": model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown"),
        "text_source": text_source or "text",
        "text_sha256": hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest(),
        "tokens": int(ids.numel()), "chunk": chunk,
        "keep_rank": keep_rank, "hsr": hsr, "ovc": ovc, "ovc_inputs": "sequential" if ovc else None,
        "group_size": gs, "rank_multiple": mult,
        "damp": damp, "num_kv_heads": n_kv, "head_dim": d, "hidden_size": dim,
        "layers": layers,
        "kvfx_version": kvfx.__version__, "torch_version": torch.__version__.split("+")[0],
    }
    return Calibration(factors, provenance)


def heldout_errors(model, factors: dict[int, LayerFactors], ids: torch.Tensor, *, chunk: int = 512,
                   progress: bool = True, grams=None) -> dict[int, tuple[float, float]]:
    """{layer: (err_k, err_v)}: relative error ‖X Wᵀ - X Rᵀ Lᵀ‖_F / ‖X Wᵀ‖_F of k_proj / v_proj
    outputs on the inputs that ``ids`` produce (pass ``grams`` from :func:`collect_grams` to reuse them)."""
    grams = grams if grams is not None else collect_grams(model, ids, chunk=chunk, progress=progress,
                                                          desc="held-out")
    out = {}
    for p in kv_projections(model):
        f = factors[p.layer]
        g_k, g_v = grams[p.layer]
        out[p.layer] = (relative_error(p.k_proj.weight.detach(), f.k, gram=g_k),
                        relative_error(p.v_proj.weight.detach(), f.v, gram=g_v))
    return out


# --------------------------------------------------------------------------------------------- artifact


def artifact_tensors(factors: dict[int, LayerFactors]) -> dict[str, torch.Tensor]:
    """The safetensors payload: ``layers.{i}.{k_proj,v_proj}.{L,R}``, float32, contiguous."""
    out = {}
    for i, f in sorted(factors.items()):
        for proj, lr in (("k_proj", f.k), ("v_proj", f.v)):
            out[f"layers.{i}.{proj}.L"] = lr.L.detach().to("cpu", torch.float32).contiguous()
            out[f"layers.{i}.{proj}.R"] = lr.R.detach().to("cpu", torch.float32).contiguous()
    return out


def save_artifact(path, factors: dict[int, LayerFactors], provenance: dict) -> Path:
    """Write the factors and provenance to ``path`` (safetensors), atomically. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    # Never write a file load_artifact would reject: the provenance must describe these factors.
    _check_provenance(provenance, factors, str(path))
    _check_factors(factors, provenance, str(path))
    meta = {"format": ARTIFACT_FORMAT, "format_version": str(ARTIFACT_VERSION),
            "provenance": json.dumps(provenance, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(artifact_tensors(factors), tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; give it ordinary file permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_artifact(path, *, model=None) -> Calibration:
    """Read and validate an artifact written by :func:`save_artifact`.

    Args:
        path: the ``.safetensors`` file.
        model: optional; if given, the artifact must match its layers, KV heads, head dim and
            hidden size.

    Raises:
        ArtifactError: missing or unreadable file, not a kvfx ReCalKV artifact, unsupported
            version, bad provenance, missing / extra / misshapen / non-finite tensors, a key L not
            block diagonal over its groups, or a mismatch with ``model``. Each message names the
            problem and the fix.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    fix = _RECALIBRATE.format(path=path)
    if not path.is_file():
        raise ArtifactError(f"ReCalKV artifact {path}: no such file; {fix}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"ReCalKV artifact {path}: not a readable safetensors file ({e}); the file is "
                            f"truncated or corrupt; {fix}") from e
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"ReCalKV artifact {path}: metadata 'format' is {meta.get('format')!r}, expected "
                            f"{ARTIFACT_FORMAT!r}: not a file written by `kvfx calibrate`; {fix}")
    if meta.get("format_version") != str(ARTIFACT_VERSION):
        raise ArtifactError(f"ReCalKV artifact {path}: format_version {meta.get('format_version')!r}, this "
                            f"kvfx reads {ARTIFACT_VERSION}; {fix}")
    try:
        prov = json.loads(meta.get("provenance", ""))
    except ValueError as e:
        raise ArtifactError(f"ReCalKV artifact {path}: the 'provenance' metadata is not JSON ({e}); "
                            f"{fix}") from e
    factors = _factors_from(tensors, prov, str(path))
    _check_factors(factors, prov, str(path))
    if model is not None:
        _check_model(factors, prov, model, str(path))
    return Calibration(factors, prov)


_PROV_KEYS = ("model", "text_source", "tokens", "keep_rank", "hsr", "ovc", "num_kv_heads", "head_dim",
              "hidden_size", "layers", "kvfx_version")
_LAYER_KEYS = ("layer", "k_groups", "k_ranks", "v_groups", "v_ranks")


def _check_provenance(prov, factors: Optional[dict], where: str) -> None:
    fix = _RECALIBRATE.format(path=where)
    if not isinstance(prov, dict) or any(k not in prov for k in _PROV_KEYS):
        missing = [k for k in _PROV_KEYS if not isinstance(prov, dict) or k not in prov]
        raise ArtifactError(f"ReCalKV artifact {where}: provenance lacks {missing}; {fix}")
    if not isinstance(prov["layers"], list):
        raise ArtifactError(f"ReCalKV artifact {where}: provenance 'layers' is not a list; {fix}")
    for rec in prov["layers"]:
        if not isinstance(rec, dict) or any(k not in rec for k in _LAYER_KEYS):
            raise ArtifactError(f"ReCalKV artifact {where}: a provenance layer record lacks one of "
                                f"{list(_LAYER_KEYS)}: {rec!r}; {fix}")
    if factors is None:
        return
    described = {int(rec["layer"]): rec for rec in prov["layers"]}
    if sorted(described) != sorted(factors):
        raise ArtifactError(f"ReCalKV artifact {where}: the provenance describes layers {sorted(described)} "
                            f"but the factors have layers {sorted(factors)}; pass the provenance that "
                            "calibrate() returned with these factors")
    for i, f in factors.items():
        rec = described[i]
        for p, lr in (("k", f.k), ("v", f.v)):
            if ([list(g) for g in lr.groups] != [list(g) for g in rec[f"{p}_groups"]]
                    or list(lr.ranks) != list(rec[f"{p}_ranks"])):
                raise ArtifactError(f"ReCalKV artifact {where}: layer {i} {p}_proj has groups "
                                    f"{list(lr.groups)} and ranks {list(lr.ranks)}, the provenance says "
                                    f"{rec[f'{p}_groups']} and {rec[f'{p}_ranks']}; pass the provenance "
                                    "that calibrate() returned")


def _factors_from(tensors: dict, prov, where: str) -> dict[int, LayerFactors]:
    fix = _RECALIBRATE.format(path=where)
    _check_provenance(prov, None, where)
    expected, factors = set(), {}
    for rec in prov["layers"]:
        i = rec["layer"]
        parts = {}
        for proj in ("k_proj", "v_proj"):
            names = (f"layers.{i}.{proj}.L", f"layers.{i}.{proj}.R")
            for n in names:
                if n not in tensors:
                    raise ArtifactError(f"ReCalKV artifact {where}: tensor {n!r} is missing (the provenance "
                                        f"lists layer {i}); {fix}")
            expected.update(names)
            p = proj[0]
            parts[p] = LowRank(tensors[names[0]], tensors[names[1]],
                               tuple(tuple(int(h) for h in g) for g in rec[f"{p}_groups"]),
                               tuple(int(r) for r in rec[f"{p}_ranks"]), int(prov["head_dim"]))
        factors[int(i)] = LayerFactors(parts["k"], parts["v"])
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ArtifactError(f"ReCalKV artifact {where}: tensors {extra[:4]} are not described by the "
                            f"provenance; {fix}")
    return factors


def _check_factors(factors: dict[int, LayerFactors], prov: dict, where: str) -> None:
    fix = _RECALIBRATE.format(path=where)
    n_kv, d, dim = int(prov["num_kv_heads"]), int(prov["head_dim"]), int(prov["hidden_size"])
    if not factors:
        raise ArtifactError(f"ReCalKV artifact {where}: no layers; {fix}")
    for i, f in sorted(factors.items()):
        for proj, lr in (("k_proj", f.k), ("v_proj", f.v)):
            name = f"layers.{i}.{proj}"
            heads = sorted(h for g in lr.groups for h in g)
            if heads != list(range(n_kv)) or len(lr.ranks) != len(lr.groups) or min(lr.ranks) < 1:
                raise ArtifactError(f"ReCalKV artifact {where}: {name} groups {list(lr.groups)} with ranks "
                                    f"{list(lr.ranks)} are not a partition of the {n_kv} KV heads with a "
                                    f"positive rank per group; {fix}")
            r = sum(lr.ranks)
            for t, shape in (("L", (n_kv * d, r)), ("R", (r, dim))):
                got = tuple(getattr(lr, t).shape)
                if got != shape:
                    raise ArtifactError(f"ReCalKV artifact {where}: {name}.{t} has shape {got}, expected "
                                        f"{shape} (num_kv_heads*head_dim = {n_kv * d}, rank = sum of ranks "
                                        f"{list(lr.ranks)} = {r}, hidden_size = {dim}); {fix}")
                if not torch.isfinite(getattr(lr, t)).all():
                    raise ArtifactError(f"ReCalKV artifact {where}: {name}.{t} holds NaN or inf; {fix}")
            mask = torch.ones_like(lr.L, dtype=torch.bool)
            col = 0
            for heads_g, rg in zip(lr.groups, lr.ranks):
                for h in heads_g:
                    mask[h * d:(h + 1) * d, col:col + rg] = False
                col += rg
            if (lr.L[mask] != 0).any():
                raise ArtifactError(f"ReCalKV artifact {where}: {name}.L is not block diagonal over its "
                                    f"head groups {list(lr.groups)}; {fix}")


def _check_model(factors: dict[int, LayerFactors], prov: dict, model, where: str) -> None:
    projs = kv_projections(model)
    n_kv, d, dim = _kv_geometry(model, projs)
    got = (int(prov["num_kv_heads"]), int(prov["head_dim"]), int(prov["hidden_size"]))
    layers = sorted(p.layer for p in projs)
    if got != (n_kv, d, dim) or sorted(factors) != layers:
        raise ArtifactError(
            f"ReCalKV artifact {where} was calibrated for {prov['model']!r} ({len(factors)} layers, "
            f"{got[0]} KV heads x {got[1]}, hidden {got[2]}), which does not match this model "
            f"({len(layers)} layers, {n_kv} KV heads x {d}, hidden {dim}); fix: calibrate for this model "
            f"with `kvfx calibrate --model <this model> ...`")


def format_summary(prov: dict, heldout: Optional[dict[int, tuple[float, float]]] = None) -> str:
    """A per-layer table of groups, ranks and relative errors (calibration, and held-out if given)."""
    head = (f"ReCalKV {prov['model']}: keep_rank {prov['keep_rank']}, hsr {prov['hsr']}, ovc {prov['ovc']}, "
            f"group size {prov['group_size']}, {prov['tokens']} calibration tokens of {prov['text_source']}")
    cols = ["layer", "k groups", "k ranks", "v rank", "calib err k", "calib err v"]
    if heldout is not None:
        cols += ["held-out err k", "held-out err v"]
    rows = [" | ".join(cols), " | ".join("---" for _ in cols)]
    ek, ev = [], []
    for rec in prov["layers"]:
        row = [str(rec["layer"]), str(rec["k_groups"]), str(rec["k_ranks"]), str(sum(rec["v_ranks"])),
               f"{rec['calib_error_k']:.4f}", f"{rec['calib_error_v']:.4f}"]
        if heldout is not None:
            k, v = heldout[rec["layer"]]
            ek.append(k)
            ev.append(v)
            row += [f"{k:.4f}", f"{v:.4f}"]
        rows.append(" | ".join(row))
    n = len(prov["layers"])
    mean = ["mean", "", "", "", f"{sum(r['calib_error_k'] for r in prov['layers']) / n:.4f}",
            f"{sum(r['calib_error_v'] for r in prov['layers']) / n:.4f}"]
    if heldout is not None:
        mean += [f"{sum(ek) / n:.4f}", f"{sum(ev) / n:.4f}"]
    rows.append(" | ".join(mean))
    return "\n".join([head, ""] + ["| " + r + " |" for r in rows])


_FACTORS: dict[tuple, dict[int, LayerFactors]] = {}


def load_factors(path: str) -> dict[int, LayerFactors]:
    """The factors of a ReCalKV artifact, loaded once per (file, size, mtime).

    Raises:
        ArtifactError: missing or invalid file (the message names the fix).
    """
    p = Path(os.path.expanduser(path)).resolve()
    st = p.stat() if p.is_file() else None
    key = (str(p), st.st_size if st else None, st.st_mtime_ns if st else None)
    if key not in _FACTORS:
        _FACTORS[key] = load_artifact(p).factors
    return _FACTORS[key]
