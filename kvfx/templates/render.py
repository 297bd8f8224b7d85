"""Render a `KernelSpec` to Triton source and import it.

`render(spec)` is deterministic: the same spec gives byte-identical source. `load(spec)` writes
that source once per URI to `<cache root>/<kvfx version>/<URI>.py`, where the cache root is
`$KVFX_CACHE_DIR` or `~/.cache/kvfx/kernels`, atomically (temp file + `os.replace`), and imports
it by path; `@triton.jit` needs its source in a real file. An existing file is rewritten only if
its content differs (a template edited within one version), so a second load leaves it untouched.

    >>> src = render(KernelSpec("prefill_attention", "fp16", head_dim=64, causal=True))
    >>> "_kvfx_prefill_attention_kernel" in src
    True
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import jinja2

from kvfx.templates.spec import KernelSpec

TEMPLATE_DIR = Path(__file__).resolve().parent
_TL_DTYPES = {"fp32": "tl.float32", "fp16": "tl.float16", "bf16": "tl.bfloat16"}
# Kinds whose template renders calibration=True (the CaliDrop partition in the split-K reduction).
CALIBRATION_KINDS = ("decode_attention", "quant_decode_attention")


@functools.cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _kvfx_version() -> str:
    try:
        from importlib.metadata import version

        return version("kvfx")
    except Exception:  # not installed (source checkout): fall back to the package attribute
        import kvfx

        return str(getattr(kvfx, "__version__", "dev"))


def render(spec: KernelSpec) -> str:
    """Triton source for `spec` (a str). Raises NotImplementedError for slots not rendered yet."""
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"render: expected a KernelSpec, got {type(spec).__name__}")
    for name, default in (("quant_bits", 0), ("calibration", False)):
        if name == "calibration" and spec.kind in CALIBRATION_KINDS:
            continue
        if getattr(spec, name) != default:
            raise NotImplementedError(
                f"render: {spec.kind} has no '{name}={getattr(spec, name)!r}' variant yet "
                f"(only {name}={default!r})"
            )
    # Only validated spec fields and kvfx's own identifiers reach the template.
    context = dict(
        uri=spec.uri,
        kind=spec.kind,
        dtype=spec.dtype,
        tl_dtype=_TL_DTYPES[spec.dtype],
        head_dim=spec.head_dim,
        gqa_group=spec.gqa_group,
        causal=spec.causal,
        scores=spec.scores,
        calibration=spec.calibration,
        key_bits=spec.key_bits,
        key_group=spec.key_group,
        value_bits=spec.value_bits,
        value_group=spec.value_group,
        outlier_pool=spec.outlier_pool,
        outlier_norm=spec.outlier_norm,
        key_rank=spec.key_rank,
        value_rank=spec.value_rank,
        ragged=spec.ragged,
    )
    return _env().get_template(f"{spec.kind}.py.jinja").render(**context)


def cache_dir() -> Path:
    root = os.environ.get("KVFX_CACHE_DIR") or os.path.join("~", ".cache", "kvfx", "kernels")
    return Path(root).expanduser() / _kvfx_version()


def write_source(spec: KernelSpec) -> Path:
    """Write `render(spec)` to the cache (once per URI, atomically) and return the file's path."""
    source = render(spec)
    directory = cache_dir()
    path = directory / f"{spec.uri}.py"
    try:
        if path.read_text() == source:
            return path
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{spec.uri}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@functools.cache
def load(spec: KernelSpec):
    """The imported module of `spec`'s rendered source (cached per spec for the process)."""
    path = write_source(spec)
    name = f"kvfx_kernels.{spec.uri}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # triton resolves a kernel's globals through its module
    module_spec.loader.exec_module(module)
    return module
